"""PAMR: pixel-adaptive mask refinement (Araslanov and Roth, CVPR 2020), as TCL and the SCLIP
family apply it to zero-shot masks.

Each pixel's scores become a weighted mean of its 8 neighbours' at each dilation d, repeated
``iters`` times. A neighbour's weight is a softmax, over all the neighbours, of
``-mean over colour channels of |I(p) - I(q)| / (1e-8 + 0.1 * sigma(p))``, where sigma(p) is
the (unbiased) standard deviation of the image over the 3x3 stencils of every dilation around
p, centre included. The image is padded by replication at its borders. The scores are first
resized (bilinear, corners aligned) to the image's size.

TCL refines each window's masks with dilations (1, 2, 4, 8, 12, 24); SCLIP and NACLIP refine
the whole image's scores with (8, 16); both iterate 10 times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TCL_DILATIONS = (1, 2, 4, 8, 12, 24)
SCLIP_DILATIONS = (8, 16)
# The 8 neighbours of a 3x3 stencil, row by row, centre left out.
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifts(x: torch.Tensor, dilations: tuple[int, ...], centre: bool):
    """The (B, C, H, W) map seen from each stencil position of each dilation, one at a time."""
    H, W = x.shape[-2:]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] if centre else _OFFSETS
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in offsets:
            yield padded[:, :, d + dy * d : d + dy * d + H, d + dx * d : d + dx * d + W]


def affinity(image: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """Neighbour weights (B, 8 * len(dilations), H, W) of an image (B, K, H, W)."""
    sigma = torch.stack(list(_shifts(image, dilations, centre=True)), 2).std(2)  # (B, K, H, W)
    logits = torch.stack(
        [
            (-(n - image).abs() / (1e-8 + 0.1 * sigma)).mean(1)
            for n in _shifts(image, dilations, centre=False)
        ],
        1,
    )  # (B, P, H, W)
    return torch.softmax(logits, 1)


def pamr(
    image: torch.Tensor,
    scores: torch.Tensor,
    iters: int = 10,
    dilations: tuple[int, ...] = TCL_DILATIONS,
) -> torch.Tensor:
    """Refined scores (B, C, H, W) at the image's size; image (B, K, H, W), scores (B, C, h, w)."""
    scores = F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=True)
    weights = affinity(image.to(scores.dtype), dilations)[:, None]  # (B, 1, P, H, W)
    for _ in range(iters):
        out = torch.zeros_like(scores)
        for p, neighbour in enumerate(_shifts(scores, dilations, centre=False)):
            out += weights[:, :, p] * neighbour
        scores = out
    return scores
