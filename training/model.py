"""LeNet-5 as used today (ReLU and max-pooling instead of tanh and trainable subsampling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import NORMALIZATION

NUM_CLASSES = 10
EXPECTED_PARAMETERS = 61_706
MAX_DESKEW_SHEAR = 1.0
"""The largest slant `Deskew` undoes (x per row); beyond it the ink is not a leaning digit."""


class Deskew(nn.Module):
    """Shear each image so that its ink stands upright: the classic moment-based deskewing of MNIST.

    The slant is the ink-weighted covariance of x and y over the variance of y (x per row); the image
    is sheared by it about its centre of mass, rows moving sideways, so a digit written leaning is
    seen as if written straight. It has no parameters: it is part of the graph, so the server and the
    training see exactly the same pixels, and the ONNX file stays the whole contract.

    `background` is the model-input value of an empty pixel, ``(0 - mean) / std``.
    """

    centres: torch.Tensor

    def __init__(self, background: float, side: int = 28) -> None:
        super().__init__()
        self.background = float(background)
        # Pixel centres in grid_sample's [-1, 1] coordinates (align_corners=False).
        centres = (torch.arange(side, dtype=torch.float32) * 2 + 1) / side - 1
        self.register_buffer("centres", centres, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deskewed images [N, 1, H, W], still normalized."""
        ink = (x - self.background)[:, 0].clamp_min(0)
        ys, xs = self.centres.view(1, -1, 1), self.centres.view(1, 1, -1)
        total = ink.sum(dim=(1, 2)).clamp_min(1e-6)
        mean_y = (ink * ys).sum(dim=(1, 2)) / total
        mean_x = (ink * xs).sum(dim=(1, 2)) / total
        dy = ys - mean_y.view(-1, 1, 1)
        dx = xs - mean_x.view(-1, 1, 1)
        covariance = (ink * dx * dy).sum(dim=(1, 2)) / total
        variance = (ink * dy * dy).sum(dim=(1, 2)) / total
        slant = (covariance / variance.clamp_min(1e-6)).clamp(-MAX_DESKEW_SHEAR, MAX_DESKEW_SHEAR)
        # Output pixel (x, y) samples the input at (x + slant * (y - mean_y), y).
        grid_x = xs + slant.view(-1, 1, 1) * dy
        grid_y = ys.expand_as(grid_x)
        grid = torch.stack([grid_x, grid_y], dim=3)
        return F.grid_sample(x - self.background, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False) + self.background


class LeNet5(nn.Module):
    """1x28x28 normalized digit -> 10 logits.

    conv 6@5x5 (padding 2) - ReLU - maxpool 2 - conv 16@5x5 - ReLU - maxpool 2 - 400 - 120 - 84 - 10.
    With `deskew_background` (the normalized value of an empty pixel), a parameter-free `Deskew` stands
    in front of the first convolution; with `dropout` > 0, dropout follows each hidden dense layer while
    training (no parameters either: the exported graph is the same network).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, deskew_background: float | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.deskew = Deskew(deskew_background) if deskew_background is not None else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] for normalized images [N, 1, 28, 28]."""
        if self.deskew is not None:
            x = self.deskew(x)
        x = self.features(x)
        if self.dropout is None:
            return self.classifier(x)
        for layer in self.classifier:  # the same layers (and weight names), dropout after each hidden ReLU
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                x = self.dropout(x)
        return x


def lenet5(deskew: bool = False, dropout: float = 0.0) -> LeNet5:
    """A fresh LeNet-5 for the MNIST normalization, with the `Deskew` front when `deskew`."""
    return LeNet5(deskew_background=-NORMALIZATION.mean / NORMALIZATION.std if deskew else None, dropout=dropout)


class ExportModule(nn.Module):
    """What goes into the ONNX graph: the network plus the calibrated softmax, so servers get both outputs.

    `logits` stay the network's raw output; `probabilities` are ``softmax(logits / temperature)`` with
    the temperature fitted on held-out digits (1.0: uncalibrated). The server does not apply it again.
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, probabilities), both [N, 10]."""
        logits = self.model(image)
        if self.temperature == 1.0:
            return logits, torch.softmax(logits, dim=1)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
