"""Light geometric augmentation on whole batches: random rotation, shift and scale via grid_sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineAugment:
    """Random small affine distortions, in the range real handwriting varies.

    `background` is the model-input value of an empty (black) pixel, ``(0 * scale - mean) / std``:
    the batch is already normalized, so pixels shifted in from outside the image must get that value.
    """

    background: float
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    scale_range: tuple[float, float] = (0.9, 1.1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Distort normalized images [N, 1, H, W]; every random number comes from `generator`."""
        n, _, height, width = images.shape
        uniform = torch.rand((n, 4), generator=generator, dtype=images.dtype, device=images.device)
        angle = (uniform[:, 0] * 2 - 1) * math.radians(self.max_rotation_deg)
        low, high = self.scale_range
        scale = low + uniform[:, 1] * (high - low)
        # affine_grid works in [-1, 1] coordinates: one pixel is 2/size.
        shift_x = (uniform[:, 2] * 2 - 1) * self.max_shift_px * 2 / width
        shift_y = (uniform[:, 3] * 2 - 1) * self.max_shift_px * 2 / height
        # theta maps output coordinates to input ones, so the inverse scale enlarges the digit.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift_x], dim=1), torch.stack([sin, cos, shift_y], dim=1)], dim=1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Sample (x - background) with zero padding: the exact equivalent of black padding in pixels.
        shifted = F.grid_sample(
            images - self.background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return shifted + self.background
