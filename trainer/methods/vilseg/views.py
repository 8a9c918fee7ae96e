"""ViL-Seg's views of a batch: local crops for the vision contrast, a colour-changed and
horizontally flipped copy for the clustering objective.

Every random draw comes from the ``torch.Generator`` passed in (seeded per step by the loop),
on the CPU, so a resumed run draws the same views; the images themselves stay on their device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crop_boxes(
    n: int, scale: tuple[float, float], generator: torch.Generator, ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """(n, 4) boxes (x0, y0, w, h) as fractions of the image: an area drawn uniformly in
    ``scale``, an aspect ratio log-uniformly in ``ratio`` (RandomResizedCrop's draws; a box is
    shrunk to fit the image instead of drawn again, so the count of draws is fixed)."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    x0 = (1 - w) * u[:, 2]
    y0 = (1 - h) * u[:, 3]
    return torch.stack([x0, y0, w, h], 1)


def resample(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box (x0, y0, w, h as fractions) resampled (bilinear) to size x size:
    images (n, 3, H, W), boxes (n, 4) -> (n, 3, size, size)."""
    n = images.shape[0]
    x0, y0, w, h = boxes.to(images.device, images.dtype).unbind(1)
    # An affine grid per crop: the output square onto its box, in grid_sample's [-1, 1] frame.
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = w
    theta[:, 0, 2] = 2 * x0 + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    # Samples beyond the image's outer pixel centres repeat the border, as a resize of the
    # cropped region would (zero padding would darken crops that touch the edge).
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def local_crops(
    images: torch.Tensor,
    k: int,
    size: int,
    scale: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """k crops of each image, resampled to size x size: (B * k, 3, size, size), the k crops of
    image 0 first."""
    boxes = crop_boxes(images.shape[0] * k, scale, generator)  # (B k, 4)
    return resample(images.repeat_interleave(k, dim=0), boxes, size)


def jitter_flip(
    images: torch.Tensor, mul: float, add: float, flip: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clustering view: per image and channel ``x a + b`` with a in [1 - mul, 1 + mul] and
    b in [-add, add] (clipped to [0, 1]), then a horizontal flip with probability ``flip``.
    Returns the views (B, 3, H, W) and which were flipped (B,) bool."""
    B = images.shape[0]
    u = torch.rand(B, 7, generator=generator)
    a = (1 + mul * (2 * u[:, :3] - 1)).view(B, 3, 1, 1).to(images)
    b = (add * (2 * u[:, 3:6] - 1)).view(B, 3, 1, 1).to(images)
    flipped = (u[:, 6] < flip).to(images.device)
    views = (images * a + b).clamp(0, 1)
    views = torch.where(flipped.view(B, 1, 1, 1), views.flip(-1), views)
    return views, flipped


def unflip(maps: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Maps (B, C, h, w) of flipped views put back in the original image's geometry."""
    return torch.where(flipped.view(-1, 1, 1, 1), maps.flip(-1), maps)
