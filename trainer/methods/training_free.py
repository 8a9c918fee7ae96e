"""Training-free baselines: the frozen CLIP's last image block changed the way each method
publishes it, on the same backbone and the same sliding window as SynSeg.

Every method keeps blocks 1..L-1 as they are and rewrites block L (``x`` is the residual
stream entering it, ``y = ln_1(x)``, q, k, v its projections, per head, scale 1/sqrt(head width)):

| method    | attention weights of block L                    | then                              |
|-----------|-------------------------------------------------|-----------------------------------|
| maskclip  | none: each token keeps its own value            | x + out(v), then x + FFN(ln_2(x)) |
| sclip     | softmax(q qᵀ) + softmax(k kᵀ)                    | x + out(A v), then the FFN        |
| clearclip | softmax(q qᵀ)                                   | out(A v) alone: no residual, no FFN |
| naclip    | softmax(k kᵀ + G), G a Gaussian of the patch    | out(A v) alone: no residual, no FFN |
|           | distance (sigma 5 patches; 0 for the CLS token) |                                   |

(MaskCLIP, Zhou et al. 2022; SCLIP, Wang et al. 2024, "correlative self-attention"; ClearCLIP,
Lan et al. 2024; NACLIP, Hajimiri et al. 2025, with its "reduced" architecture.) The tokens
then go through ``ln_post`` and the projection, as CLIP's class token does, and a patch scores
a class by the cosine between its token and the class's text embedding: each template's
embedding L2-normalised, averaged over the templates and normalised again (the SCLIP family's
text side). Images are normalised with CLIP's mean and std whatever the decoder was trained
with. ``DenseCLIP`` is their inference (``trainer.methods.base.Scorer``): cosine scores per patch,
turned into probabilities by a softmax with the method's own temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from trainer.model.backbone import NORMALISE

TRAINING_FREE = ("maskclip", "sclip", "clearclip", "naclip")
# Softmax temperature of the cosine scores, as each method's own evaluation sets it.
LOGIT_SCALE = {"maskclip": 40.0, "sclip": 40.0, "clearclip": 50.0, "naclip": 40.0}
NACLIP_STD = 5.0  # NACLIP's Gaussian width, in patches


def neighbourhood(grid: tuple[int, int], std: float, dtype, device) -> torch.Tensor:
    """NACLIP's attention addition: exp(-|p_i - p_j|² / 2σ²) between patches i and j on the
    grid, (1 + h*w, 1 + h*w), zero in the CLS token's row and column."""
    h, w = grid
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)  # (hw, 2)
    d2 = torch.cdist(pos, pos) ** 2
    out = torch.zeros(1 + h * w, 1 + h * w, dtype=torch.float64)
    out[1:, 1:] = torch.exp(-d2 / (2 * std**2))
    return out.to(dtype=dtype, device=device)


def last_block(
    block: nn.Module, x: torch.Tensor, method: str, grid: tuple[int, int], std: float = NACLIP_STD
) -> torch.Tensor:
    """Block L of the image tower under ``method``: (B, N, W) -> (B, N, W), batch first."""
    attn = block.attn  # nn.MultiheadAttention
    B, N, W = x.shape
    heads = attn.num_heads
    hd = W // heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, N, heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
    scale = hd**-0.5
    if method == "maskclip":
        mixed = v
    else:
        if method == "sclip":
            weights = torch.softmax(q @ q.transpose(-1, -2) * scale, -1) + torch.softmax(
                k @ k.transpose(-1, -2) * scale, -1
            )
        elif method == "clearclip":
            weights = torch.softmax(q @ q.transpose(-1, -2) * scale, -1)
        elif method == "naclip":
            bias = neighbourhood(grid, std, x.dtype, x.device)
            weights = torch.softmax(k @ k.transpose(-1, -2) * scale + bias, -1)
        else:
            raise ValueError(f"{method} is not a training-free method")
        mixed = weights @ v
    out = attn.out_proj(mixed.transpose(1, 2).reshape(B, N, W))
    if method in ("clearclip", "naclip"):  # residual and FFN dropped
        return out
    ls_1 = getattr(block, "ls_1", nn.Identity())
    ls_2 = getattr(block, "ls_2", nn.Identity())
    x = x + ls_1(out)
    return x + ls_2(block.mlp(block.ln_2(x)))


class DenseCLIP(nn.Module):
    """A frozen open_clip backbone (``trainer.model.backbone.FrozenCLIP``) read densely by a
    training-free method: images in, per-patch cosine scores against class embeddings out."""

    def __init__(self, backbone, method: str, logit_scale: float = 0.0) -> None:
        super().__init__()
        if method not in TRAINING_FREE:
            raise UserError(f"{method} is not one of the training-free methods {TRAINING_FREE}")
        self.backbone, self.method = backbone, method
        self.patch_size = backbone.patch_size
        # The SCLIP family feeds a whole image as it is (the patch convolution floors the grid);
        # ClearCLIP pads its windows to patch multiples (trainer.methods.base.Scorer).
        self.floors_whole, self.pads_windows = True, method == "clearclip"
        self.scale = logit_scale or LOGIT_SCALE[method]
        mean, std = NORMALISE["clip"]
        # float64 constants, cast to the images' precision where used
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1))

    @torch.no_grad()
    def encode_classes(self, names: list[str], templates: list[str]) -> torch.Tensor:
        """(names, d): per name, its templates' normalised embeddings averaged, normalised."""
        emb = self.backbone.encode_text([t.format(n) for n in names for t in templates])
        emb = F.normalize(emb.view(len(names), len(templates), -1), dim=-1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised patch embeddings (B, h*w, d) of images (B, 3, H, W) in [0, 1]."""
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        # The position embeddings reach the window's grid as the SCLIP family resizes them
        # (its interpolate_pos_encoding, also ClearCLIP's for its MaskCLIP baseline).
        stream, grid = self.backbone.before_last_block(x, resize="scale")
        visual = self.backbone.model.visual
        x = last_block(visual.transformer.resblocks[-1], stream, self.method, grid)
        x = self.backbone.project(x)  # ln_post, then the projection
        return F.normalize(x[:, 1:], dim=-1), grid

    @torch.no_grad()
    def scores(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine scores (B, names, H, W): the patch grid's, resized (bilinear) to the images'
        size, as the SCLIP family does before it averages windows."""
        tokens, grid = self.patch_tokens(images)
        cos = (tokens @ text.to(tokens.dtype).T).transpose(1, 2)  # (B, names, hw)
        cos = cos.reshape(cos.shape[0], cos.shape[1], *grid)
        return F.interpolate(cos, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def probabilities(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.softmax(self.scale * scores, dim)
