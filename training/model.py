"""LeNet-5 as used today (ReLU and max-pooling instead of tanh and trainable subsampling)."""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
EXPECTED_PARAMETERS = 61_706


class LeNet5(nn.Module):
    """1x28x28 normalized digit -> 10 logits.

    conv 6@5x5 (padding 2) - ReLU - maxpool 2 - conv 16@5x5 - ReLU - maxpool 2 - 400 - 120 - 84 - 10.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
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
        return self.classifier(self.features(x))


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
