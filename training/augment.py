"""Geometric augmentation on whole batches: random affine distortion (rotation, scale, shear, shift) and,
optionally, elastic distortion (Simard et al. 2003), in one `grid_sample` call per batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


@dataclass(frozen=True)
class AffineAugment:
    """Random affine (and optionally elastic) distortions, in the range real handwriting varies.

    `background` is the model-input value of an empty (black) pixel, ``(0 * scale - mean) / std``:
    the batch is already normalized, so pixels shifted in from outside the image must get that value.
    Elastic distortion displaces every pixel by a random field of uniform noise in [-1, 1] smoothed by
    a Gaussian of `elastic_sigma` pixels and scaled by `elastic_alpha` pixels (Simard's sigma 4, alpha
    34 moves pixels by about 1.4 px on average), applied to each image with `elastic_probability`.
    """

    background: float
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shear: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    elastic_probability: float = 0.5

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Distort normalized images [N, 1, H, W]; every random number comes from `generator`."""
        n, _, height, width = images.shape
        uniform = torch.rand((n, 5), generator=generator, dtype=images.dtype, device=images.device)
        angle = (uniform[:, 0] * 2 - 1) * math.radians(self.max_rotation_deg)
        low, high = self.scale_range
        scale = low + uniform[:, 1] * (high - low)
        # affine_grid works in [-1, 1] coordinates: one pixel is 2/size.
        shift_x = (uniform[:, 2] * 2 - 1) * self.max_shift_px * 2 / width
        shift_y = (uniform[:, 3] * 2 - 1) * self.max_shift_px * 2 / height
        shear = (uniform[:, 4] * 2 - 1) * self.max_shear
        # theta maps output coordinates to input ones, so the inverse scale enlarges the digit.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos, cos * shear - sin, shift_x], dim=1),
             torch.stack([sin, sin * shear + cos, shift_y], dim=1)], dim=1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        if self.elastic_alpha > 0:
            grid = grid + self._elastic(n, height, width, generator, images.dtype)
        # Sample (x - background) with zero padding: the exact equivalent of black padding in pixels.
        shifted = F.grid_sample(
            images - self.background, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return shifted + self.background

    def _elastic(self, n: int, height: int, width: int, generator: torch.Generator,
                 dtype: torch.dtype) -> torch.Tensor:
        """Smoothed random displacements [N, H, W, 2] in grid units, zero for images not drawn."""
        field = torch.rand((n * 2, 1, height, width), generator=generator, dtype=dtype) * 2 - 1
        kernel = _gaussian_kernel(self.elastic_sigma).to(dtype)
        size = kernel.numel()
        # Separable Gaussian: rows then columns (one 2-D kernel would cost size^2 per pixel).
        field = F.conv2d(field, kernel.view(1, 1, 1, size), padding=(0, size // 2))
        field = F.conv2d(field, kernel.view(1, 1, size, 1), padding=(size // 2, 0))
        chosen = (torch.rand((n, 1, 1, 1), generator=generator, dtype=dtype) < self.elastic_probability).to(dtype)
        field = field.view(n, 2, height, width) * self.elastic_alpha * chosen
        units = torch.tensor([2 / width, 2 / height], dtype=dtype).view(1, 2, 1, 1)
        return (field * units).permute(0, 2, 3, 1)
