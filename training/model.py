"""LeNet-5 as used today (ReLU and max-pooling instead of tanh and trainable subsampling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import NORMALIZATION
from training.recipe.config import TEACHER_MODELS

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
        self.side = side
        self.register_buffer("centres", torch.arange(side, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deskewed images [N, 1, H, W], still normalized."""
        # Moments from row and column sums and one product over the pixels (not one per moment): what the
        # graph costs in onnxruntime is the number of passes over [N, H, W] (a batched MatMul by a vector
        # costs it more than the network).
        shifted = x - self.background
        ink = shifted[:, 0].clamp_min(0)
        at = self.centres
        rows = ink.sum(dim=2)  # [N, H]
        total = rows.sum(dim=1).clamp_min(1e-6)
        mean_y = (rows * at).sum(dim=1) / total
        mean_x = (ink.sum(dim=1) * at).sum(dim=1) / total
        covariance = ((ink * at).sum(dim=2) * at).sum(dim=1) / total - mean_x * mean_y
        variance = (rows * (at * at)).sum(dim=1) / total - mean_y * mean_y
        slant = (covariance / variance.clamp_min(1e-6)).clamp(-MAX_DESKEW_SHEAR, MAX_DESKEW_SHEAR)
        # Row i moves by slant * (i - mean row) pixels: output column j reads the input at j + that, linearly
        # between two pixels. The padding is empty ink, wide enough for the largest shift, so no index
        # needs clamping or masking. (grid_sample gives the same, but onnxruntime's GridSample costs more
        # than the whole network.)
        shift = slant.unsqueeze(1) * (at.unsqueeze(0) - mean_y.unsqueeze(1))  # [N, H]
        left = torch.floor(shift)
        weight = (shift - left).view(-1, 1, self.side, 1)
        pad = int(MAX_DESKEW_SHEAR * self.side) + 2
        padded = F.pad(shifted, (pad, pad))
        index = (at.view(1, 1, -1) + left.unsqueeze(2) + pad).long().unsqueeze(1)  # [N, 1, H, W]
        first = torch.gather(padded, 3, index)
        second = torch.gather(padded, 3, index + 1)
        return first + weight * (second - first) + self.background


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
    """A fresh LeNet-5 for the MNIST normalization, with the `Deskew` front when `deskew` and `dropout`
    after its hidden dense layers."""
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


class WideTeacher(nn.Module):
    """A larger CNN that only teaches (distillation); it is never exported or served.

    Two blocks of two 3x3 convolutions (16 then 32 channels, batch-normalized, ReLU), each followed by
    max-pooling, then 32x7x7 -> 128 -> 10 with dropout: about 11 times LeNet-5's arithmetic per image
    (7 times its training time on one CPU thread), sized so that a distilled `make train` still fits in
    30 minutes on 2 cores (about 23 measured, docs/training.md).
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()

        def block(inputs: int, outputs: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), *block(16, 16), nn.MaxPool2d(2),
                                      *block(16, 32), *block(32, 32), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                                        nn.Dropout(0.3), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 10] for normalized images [N, 1, 28, 28]."""
        return self.classifier(self.features(x))


def teacher_model(name: str, deskew: bool = False, dropout: float = 0.0) -> nn.Module:
    """A fresh teacher network of kind `name` (one of TEACHER_MODELS); a LeNet-5 teacher gets the
    recipe's `deskew` and `dropout`, as its student does."""
    if name == "lenet5":
        return lenet5(deskew, dropout)
    if name == "wide":
        return WideTeacher()
    raise ValueError(f"teacher model must be one of {TEACHER_MODELS}, got {name!r}")


def teacher_kind(state: dict[str, torch.Tensor]) -> str:
    """Which TEACHER_MODELS network saved weights `state` are: only the wide one has batch norm."""
    return "wide" if any(key.endswith("running_mean") for key in state) else "lenet5"
