"""The physically-guided losses (shared/seeds/003), for any method whose model gives feature
levels (``trainer.methods.base.Dense``): the weighted patch-text alignment loss ``L_sac`` and
the physical-structure head with its focal loss ``L_p``.

Their settings are ``AuxiliaryLosses``, the first fields of every method's ``loss`` group:

- ``loss.patch_align`` weighs ``L_sac`` (Eq. 3): each patch's softmax over the classes of the
  batch, of the similarities between its projected feature and the projected class embeddings
  at a learnable temperature, summed with the weights ``w_ij`` = pixels of class j in patch i /
  labelled pixels in patch i, then ``-log``, averaged over the patches with a labelled pixel.
  The paper prints the weighted ratio without the ``-log`` (a quantity to maximise, not a
  loss). Its Eq. 2 is a plain product of the projections; here they are L2-normalised first,
  as CLIP's similarities that the temperature is defined on are
  (``loss.patch_align_cosine=false``: the paper's product). It needs masks.
- ``loss.structure`` weighs ``L_p`` (Eq. 1): a head on the model's feature levels, deepest
  first: each a 1x1 convolution to 256 channels; a refine block on the deepest, then on the
  running map concatenated with the next level (adjacent levels fused); a 1x1 convolution and a
  sigmoid. Its target is the image's Canny edges (``structure_target=canny``, label-free, so
  caption training can use it too) or the masks' boundaries (``mask-edges``). The paper's
  Figure 3 does not give the refine block's layers; here: group normalisation of the
  concatenation (the paper: "fused by concatenation and then normalized"), a 3x3
  convolution, ReLU, and a 2x upsampling, so three blocks take a 16-pixel patch grid to half
  the image's resolution before the last bilinear step. The paper gives neither the focal
  loss's alpha and gamma nor Canny's thresholds: RetinaNet's 0.25 and 2 and OpenCV's
  customary 100 and 200 are the defaults.

The heads train with the model and are saved in its checkpoints under ``auxiliary.``; eval and
``segment`` do not use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError

STRUCTURE_TARGETS = ("canny", "mask-edges")
PREFIX = "auxiliary."  # the heads' keys in a checkpoint
IGNORE = 255  # the label value no loss reads


@dataclass(frozen=True)
class AuxiliaryLosses:
    """Loss settings every method shares (the first fields of its ``loss`` group)."""

    seg: float = 1.0  # masks: weight of the mask loss (BCE for sigmoid scores, CE for softmax)
    patch_align: float = 0.0  # weight of L_sac, the weighted patch-text alignment (masks only)
    patch_align_dim: int = 256  # width of its projections o_image and o_text
    patch_align_temperature: float = 0.07  # its learnable tau's start (the paper gives none)
    patch_align_cosine: bool = True  # normalised projections (the paper's Eq. 2: plain product)
    structure: float = 0.0  # weight of L_p, the physical-structure head's focal loss
    structure_target: str = "canny"  # canny (the image's edges) or mask-edges (masks only)
    structure_dim: int = 256  # channels each level is encoded to (the paper: 256)
    focal_alpha: float = 0.25  # the focal loss's alpha for the edge pixels (the paper: none)
    focal_gamma: float = 2.0  # ... and its gamma (RetinaNet's 0.25 and 2)
    canny_low: int = 100  # Canny's hysteresis thresholds on the 8-bit grey image
    canny_high: int = 200

    def __post_init__(self) -> None:
        problems = []
        if min(self.seg, self.patch_align, self.structure) < 0:
            problems.append("seg, patch_align and structure must not be negative")
        if self.structure_target not in STRUCTURE_TARGETS:
            problems.append(f"structure_target must be one of {', '.join(STRUCTURE_TARGETS)}")
        if not 0 <= self.focal_alpha <= 1 or self.focal_gamma < 0:
            problems.append("focal_alpha must be in [0, 1] and focal_gamma not negative")
        if not 0 <= self.canny_low <= self.canny_high:
            problems.append("canny_low and canny_high must be 0 <= low <= high")
        if not self.patch_align_temperature > 0:
            problems.append("patch_align_temperature must be positive")
        if min(self.patch_align_dim, self.structure_dim) < 1:
            problems.append("patch_align_dim and structure_dim must be at least 1")
        if problems:
            raise UserError("; ".join(problems))

    def masks_needed(self) -> list[str]:
        """The settings on that read masks (refused under caption supervision)."""
        out = ["loss.patch_align"] if self.patch_align else []
        if self.structure and self.structure_target == "mask-edges":
            out.append("loss.structure_target=mask-edges")
        return out


# --------------------------------------------------------------------------- targets


def patch_weights(labels: torch.Tensor, classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """w (B, C, h, w): the share of each patch's labelled pixels that are of each class (0 for
    a patch with none). labels (B, H, W) with ``IGNORE`` for unlabelled pixels; H, W multiples
    of the grid."""
    B, H, W = labels.shape
    if H % grid[0] or W % grid[1]:
        raise ValueError(f"labels {H}x{W} do not divide into a {grid[0]}x{grid[1]} patch grid")
    valid = labels != IGNORE
    onehot = F.one_hot(torch.where(valid, labels, 0), classes).permute(0, 3, 1, 2)
    onehot = (onehot * valid[:, None]).to(torch.float64)
    kernel = (H // grid[0], W // grid[1])
    counts = F.avg_pool2d(onehot, kernel)  # (B, C, h, w) shares of all the patch's pixels
    labelled = F.avg_pool2d(valid[:, None].to(torch.float64), kernel)
    return torch.where(labelled > 0, counts / labelled.clamp_min(1e-12), 0.0)


def mask_edges(labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) 1.0 where a pixel's 3x3 neighbourhood holds another label value (the ignored
    value 255 counts as one: VOC's boundary band borders its objects), else 0.0."""
    x = labels[:, None].to(torch.float32)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    high = F.max_pool2d(padded, 3, stride=1)
    low = -F.max_pool2d(-padded, 3, stride=1)
    return (high != low)[:, 0].to(torch.float32)


def canny(images: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """(B, H, W) 1.0 on OpenCV's Canny edges of each image, 0.0 elsewhere. images (B, 3, H, W)
    in [0, 1], as the batch holds them: rounded to 8 bits, turned grey by OpenCV."""
    import cv2

    pixels = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for rgb in pixels.permute(0, 2, 3, 1).numpy():
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        out.append(torch.from_numpy(cv2.Canny(grey, low, high) > 0))
    return torch.stack(out).to(torch.float32)


# --------------------------------------------------------------------------- losses


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float):
    """Per-pixel focal loss (Lin et al. 2017) of binary ``target``:
    -alpha_t (1 - p_t)^gamma log p_t, p = sigmoid(logits)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * (1 - p_t) ** gamma * ce


def patch_align_loss(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_sac: -log sum_j w_ij softmax_j(logits)_ij, averaged over the patches with a labelled
    pixel. logits, weights (B, C, h, w); the logits already divided by the temperature."""
    logp = torch.log_softmax(logits, dim=1)
    has = weights.sum(1) > 0  # (B, h, w)
    # log w (-inf for a class absent from the patch); a patch with no labelled pixel gets 0s,
    # so that no row is all -inf (whose gradient would be NaN even when left out of the mean)
    logw = torch.where(has[:, None], torch.log(weights.to(logp.dtype)), 0.0)
    mixed = torch.logsumexp(logp + logw, dim=1)  # log sum_j w_ij p_ij, (B, h, w)
    return -(mixed[has]).mean() if has.any() else logits.sum() * 0


# --------------------------------------------------------------------------- heads


class Refine(nn.Module):
    """A refine block: group normalisation, 3x3 convolution, ReLU, 2x bilinear upsampling."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.conv = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.norm(x)))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class StructureHead(nn.Module):
    """Feature levels (deepest first) -> structure logits at the image's size."""

    def __init__(self, widths: list[int], dim: int) -> None:
        super().__init__()
        self.encode = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in widths)
        self.refine = nn.ModuleList([Refine(dim, dim)] + [Refine(2 * dim, dim) for _ in widths[1:]])
        self.out = nn.Conv2d(dim, 1, 1)

    def forward(self, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.refine[0](self.encode[0](levels[0]))
        for encode, refine, level in zip(self.encode[1:], self.refine[1:], levels[1:], strict=True):
            f = F.interpolate(
                encode(level), size=x.shape[-2:], mode="bilinear", align_corners=False
            )
            x = refine(torch.cat([x, f], dim=1))
        logits = F.interpolate(self.out(x), size=size, mode="bilinear", align_corners=False)
        return logits[:, 0]


class PatchAlign(nn.Module):
    """o_image and o_text (linear), and the learnable temperature: patch-class logits."""

    def __init__(self, patch_width: int, text_width: int, cfg: AuxiliaryLosses) -> None:
        super().__init__()
        self.image = nn.Linear(patch_width, cfg.patch_align_dim)
        self.text = nn.Linear(text_width, cfg.patch_align_dim)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(1 / cfg.patch_align_temperature))))
        self.cosine = cfg.patch_align_cosine

    def forward(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """patches (B, c, h, w), text (C, d) -> logits (B, C, h, w) = sim / tau."""
        x = self.image(patches.permute(0, 2, 3, 1))  # (B, h, w, D)
        t = self.text(text.to(x.dtype))  # (C, D)
        if self.cosine:
            x, t = F.normalize(x, dim=-1), F.normalize(t, dim=-1)
        scale = self.log_scale.clamp(max=float(np.log(100))).exp()
        return scale * torch.einsum("bhwd,cd->bchw", x, t)


class Trainee(nn.Module):
    """What the loop trains: the method's model, and the heads the auxiliary losses need.

    Under mask supervision the forward is the method's dense one (``Dense.forward``), else the
    model's own; either way it returns (the method's output, the heads' outputs by name)."""

    def __init__(self, model: nn.Module, dense, cfg: AuxiliaryLosses, masks: bool) -> None:
        super().__init__()
        self.model = model
        self.dense = dense if masks else None
        self.heads = nn.ModuleDict()
        if cfg.structure or cfg.patch_align:
            if dense is None:
                raise UserError("the method's model gives no feature levels for the heads")
            widths, text_width = dense.widths(model)
            if cfg.structure:
                self.heads["structure"] = StructureHead(widths, cfg.structure_dim)
            if cfg.patch_align:
                self.heads["align"] = PatchAlign(widths[0], text_width, cfg)

    def forward(self, **inputs):
        out = self.dense.forward(self.model, **inputs) if self.dense else self.model(**inputs)
        aux = {}
        if len(self.heads):
            levels = out.levels
            if "structure" in self.heads:
                aux["structure"] = self.heads["structure"](levels, inputs["images"].shape[-2:])
            if "align" in self.heads:
                aux["align"] = self.heads["align"](levels[0], inputs["text"])
        return out, aux

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.model.trainable_parameters() + list(self.heads.parameters())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        heads = {f"{PREFIX}{k}": v for k, v in self.heads.state_dict().items()}
        return {**self.model.trainable_state_dict(), **heads}

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in weights.items() if not k.startswith(PREFIX)}
        self.model.load_state_dict(own, strict=False)
        heads = {k[len(PREFIX) :]: v for k, v in weights.items() if k.startswith(PREFIX)}
        self.heads.load_state_dict(heads)

    def describe(self) -> dict:
        return self.model.describe()


def with_auxiliary(terms: dict, aux: dict, cfg: AuxiliaryLosses, images_cpu, labels) -> dict:
    """``terms`` with the heads' losses added by name (unweighted) and, weighted, to its
    ``total``."""
    extra = auxiliary_terms(aux, cfg, images_cpu, labels)
    weights = {"structure": cfg.structure, "patch_align": cfg.patch_align}
    total = terms["total"] + sum(weights[name] * value for name, value in extra.items())
    return {**terms, "total": total, **extra} if extra else terms


def auxiliary_terms(aux: dict, cfg: AuxiliaryLosses, images_cpu, labels) -> dict:
    """The heads' losses by name (unweighted), in float32: ``structure`` (focal, against Canny
    edges of ``images_cpu`` or the boundaries of ``labels``) and ``patch_align``."""
    terms = {}
    if "structure" in aux:
        logits = aux["structure"].float()
        if cfg.structure_target == "canny":
            target = canny(images_cpu, cfg.canny_low, cfg.canny_high).to(logits.device)
            valid = torch.ones_like(target)
        else:
            target = mask_edges(labels)
            valid = (labels != IGNORE).to(torch.float32)
        focal = sigmoid_focal(logits, target, cfg.focal_alpha, cfg.focal_gamma)
        terms["structure"] = (focal * valid).sum() / valid.sum().clamp_min(1)
    if "align" in aux:
        logits = aux["align"].float()
        weights = patch_weights(labels, logits.shape[1], tuple(logits.shape[-2:]))
        terms["patch_align"] = patch_align_loss(logits, weights)
    return terms
