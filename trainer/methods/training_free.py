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

``native_config`` is how each method's authors score a benchmark (``eval --protocol native``):
their repository's ``configs/cfg_<dataset>.py`` over their segmentor's defaults, written here
as those defaults (``NATIVE_BASE``) and what each dataset's config changes
(``NATIVE_DATASETS``), tied to the files by ``tests/test_native.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError
from trainer.model.backbone import NORMALISE

TRAINING_FREE = ("maskclip", "sclip", "clearclip", "naclip")
# Softmax temperature of the cosine scores, as each method's own evaluation sets it.
LOGIT_SCALE = {"maskclip": 40.0, "sclip": 40.0, "clearclip": 50.0, "naclip": 40.0}
NACLIP_STD = 5.0  # NACLIP's Gaussian width, in patches


@dataclass(frozen=True)
class Native:
    """A training-free method's own evaluation of one benchmark: its repository's
    ``configs/cfg_<dataset>.py`` over its segmentor's defaults (``--protocol native``)."""

    source: str  # repository@commit and config file
    short_side: int  # mmcv's Resize(scale=(long, short), keep_ratio=True)
    long_side: int
    window: int  # slide_crop (0: the whole image at once)
    stride: int  # slide_stride
    logit_scale: float
    prob_thd: float  # background where the best class's probability is below this
    area_thd: (
        float  # SCLIP's area_thd: a class covering less of the foreground is dropped (0: none)
    )
    pamr: bool  # pamr_steps > 0 by default
    pamr_dilations: tuple[int, ...]  # pamr_stride
    names: str  # the class files it prompts: trainer/eval/classnames/<names>/
    templates: str  # its prompts: trainer/eval/templates/<templates>.txt


# Each repository's segmentor defaults, then what each dataset's config changes. The commits
# are those the values were read at; tests/test_peer_configs.py ties every value to the files.
NATIVE_REPOSITORIES = {
    "sclip": "wangf3014/SCLIP@b56bd30",
    "naclip": "sinahmr/NACLIP@0cac3a6",
    "clearclip": "mc-lan/ClearCLIP@ad68a40",
}
NATIVE_CONFIG_FILES = {
    "voc": "cfg_voc21.py",
    "voc20": "cfg_voc20.py",
    "context": "cfg_context59.py",
    "context60": "cfg_context60.py",
    "object": "cfg_coco_object.py",
    "stuff": "cfg_coco_stuff164k.py",
    "city": "cfg_city_scapes.py",
    "ade": "cfg_ade20k.py",
}
_SCLIP_BASE = dict(
    short_side=336,
    long_side=2048,
    window=224,
    stride=112,
    logit_scale=40.0,
    prob_thd=0.0,
    area_thd=0.0,
    pamr=False,
    pamr_dilations=(8, 16),
    names="sclip",
    templates="imagenet80",  # openai_imagenet_template, in each repository's prompts/
)
NATIVE_BASE = {
    "sclip": _SCLIP_BASE,
    # NACLIP's segmentor runs PAMR (10 steps) unless told not to; its README's figures have it
    # on (test_all.sh ... on). Its class files are SCLIP's.
    "naclip": {**_SCLIP_BASE, "pamr": True},
    "clearclip": {
        **_SCLIP_BASE,
        "short_side": 448,
        "window": 448,
        "stride": 224,
        "logit_scale": 50.0,
        "names": "clearclip",
    },
}
NATIVE_DATASETS = {
    "sclip": {
        "voc": dict(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
        "context60": dict(logit_scale=50.0, prob_thd=0.1),
        "object": dict(logit_scale=50.0, prob_thd=0.1),
        "stuff": dict(short_side=448),
        "city": dict(short_side=560),
    },
    "naclip": {
        "voc": dict(prob_thd=0.1, window=0),
        "voc20": dict(window=0),
        "context60": dict(prob_thd=0.1),
        "object": dict(prob_thd=0.1),
        "city": dict(short_side=560),
    },
    "clearclip": {
        "voc": dict(prob_thd=0.5),
        "context60": dict(prob_thd=0.15),
        "object": dict(prob_thd=0.4),
        "city": dict(window=224),  # its stride stays 224
    },
}


def native_config(method: str, dataset: str) -> Native:
    """``method``'s own evaluation of ``dataset``; one line for what has none."""
    if method not in NATIVE_BASE:
        raise UserError(
            f"{method}'s published figures come from its own harness, which this toolkit does "
            "not transcribe: score it under --protocol sclip or tcl"
        )
    if dataset not in NATIVE_CONFIG_FILES:
        raise UserError(
            f"--protocol native takes {method}'s own config of a benchmark "
            f"({', '.join(NATIVE_CONFIG_FILES)}); {dataset} has none: use --protocol sclip or tcl"
        )
    values = {**NATIVE_BASE[method], **NATIVE_DATASETS[method].get(dataset, {})}
    source = f"{NATIVE_REPOSITORIES[method]} configs/{NATIVE_CONFIG_FILES[dataset]}"
    return Native(source=source, **values)


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
