"""ViL-Seg's model: both towers of a CLIP-style model, trained, with two heads.

- image tower (open_clip ViT, ``CLIPTowers``): e_v, the global feature, is the class token in
  the joint space (CLIP's image embedding); e_v^pxl, the per-pixel embeddings, are the patch
  tokens taken into the same space (``ln_post``, projection), so a region of them can be
  compared with the text;
- text tower: e_t, CLIP's text embedding of the caption;
- Phi_a, the vision-contrast head: a linear map of e_v to ``projection_dim`` (2048);
- Phi_c, the online clustering head: a convolution of the patch embeddings to C channels and a
  softmax over them (C = 25 in the paper's implementation details; its ablation text ends "we
  finally adopt C = 20": a setting).

Inference (the paper's section 3.3), per window: each patch takes its most likely cluster;
each cluster's region feature is the mean of its patches' embeddings; a patch scores a class
by the cosine between its cluster's region feature and the class's text embedding, so each
cluster takes its best class under argmax. ``ClusterScorer`` gives these as dense scores, and
their softmax with temperature 1/tau (the training temperature of L_cross) as probabilities.

Everything it uses trains (CLIP's own logit scale is frozen: ViL-Seg's tau is a setting), and a
checkpoint holds every weight. Initialisation: random (``pretrained``
None, the paper's), or from any CLIP that open_clip loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError
from trainer.model.backbone import NORMALISE, CLIPTowers


@dataclass
class ModelConfig:
    arch: str = "ViT-B-16"  # open_clip architecture of both towers (the paper: ViT-B/16, 512-d)
    pretrained: str | None = None  # None: random, as the paper; an open_clip tag or a local file
    init_seed: int = 0  # seed of the random towers
    clusters: int = 25  # C (the paper: 25 in its implementation details, 20 in its ablation)
    cluster_kernel: int = 1  # kernel of Phi_c's convolution (the paper: "a convolution layer")
    # Eq. 1 optimises L_cluster w.r.t. Phi_c alone; section 4.3 says the head "can learn to
    # improve the quality of visual embeddings". True lets its gradient reach the image tower.
    cluster_grad: bool = False
    projection_dim: int = 2048  # Phi_a's output (the paper: 2048)
    normalise: str = "clip"  # the images' normalisation: clip or imagenet

    def __post_init__(self) -> None:
        problems = []
        if self.clusters < 2:
            problems.append("clusters must be at least 2")
        if self.cluster_kernel < 1 or self.cluster_kernel % 2 == 0:
            problems.append("cluster_kernel must be odd (1, 3, ...)")
        if self.projection_dim < 1:
            problems.append("projection_dim must be at least 1")
        if self.normalise not in NORMALISE:
            problems.append(f"normalise must be one of {tuple(NORMALISE)}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class ViLSegOutput:
    image: torch.Tensor  # (B, d) e_v of the images
    text: torch.Tensor  # (B, d) e_t of their captions
    global_logits: torch.Tensor  # (B, P) Phi_a(e_v) of the images
    local_logits: torch.Tensor | None  # (B k, P) Phi_a(e_v) of the local views
    clusters: torch.Tensor  # (B, C, h, w) Phi_c of the images
    clusters_view: torch.Tensor  # (B, C, h, w) Phi_c of the transformed views (as they are)


class ViLSeg(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.towers = CLIPTowers(cfg.arch, cfg.pretrained, cfg.init_seed)
        if getattr(self.towers.model.visual, "attn_pool", None) is not None:
            raise UserError(
                f"{cfg.arch} pools by attention; ViL-Seg needs a ViT with a class token"
            )
        # CLIP's learnable logit scale (and bias) belong to its own loss; ViL-Seg's tau is a
        # setting. Left trainable they would get no gradient, which DDP refuses.
        for name in ("logit_scale", "logit_bias"):
            unused = getattr(self.towers.model, name, None)
            if isinstance(unused, nn.Parameter):
                unused.requires_grad_(False)
        d = self.towers.embed_dim
        k = cfg.cluster_kernel
        self.cluster_head = nn.Conv2d(d, cfg.clusters, kernel_size=k, padding=k // 2)  # Phi_c
        self.projection = nn.Linear(d, cfg.projection_dim)  # Phi_a
        self.normalisation = cfg.normalise
        mean, std = NORMALISE[cfg.normalise]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def native_size(self) -> int:
        return self.towers.train_size

    @property
    def patch_size(self) -> int:
        return self.towers.patch_size

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()  # both towers train: a checkpoint holds every weight

    def describe(self) -> dict:
        return {**asdict(self.cfg), "normalisation": self.normalisation}

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Joint-space tokens (B, 1 + h w, d) of images (B, 3, H, W) in [0, 1], and the grid."""
        return self.towers.image_tokens((images - self.mean) / self.std)

    def cluster_probs(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Phi_c: patch embeddings (B, h w, d) -> soft cluster assignments (B, C, h, w)."""
        x = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)  # (B, d, h, w)
        return torch.softmax(self.cluster_head(x), dim=1)

    def forward(
        self,
        images: torch.Tensor,
        view: torch.Tensor,
        local: torch.Tensor | None,
        captions: torch.Tensor,
    ) -> ViLSegOutput:
        """images, view (B, 3, S, S) in [0, 1] (the images and their clustering views); local
        (B k, 3, s, s) the local views or None; captions (B, L) token ids."""
        B = images.shape[0]
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise UserError(
                f"ViL-Seg trains on images whose side is a multiple of the patch "
                f"({self.patch_size} px), not {tuple(images.shape[-2:])}: flipping the "
                "clustering view must flip the patch grid (set data.image_size)"
            )
        tok, grid = self.tokens(torch.cat([images, view]))  # (2B, 1 + hw, d)
        patches = tok[:, 1:] if self.cfg.cluster_grad else tok[:, 1:].detach()
        clusters = self.cluster_probs(patches, grid)  # (2B, C, h, w)
        image = tok[:B, 0]  # e_v: (B, d)
        local_logits = None
        if local is not None:
            local_logits = self.projection(self.tokens(local)[0][:, 0])  # (B k, P)
        return ViLSegOutput(
            image=image,
            text=self.towers.text_embedding(captions),
            global_logits=self.projection(image),
            local_logits=local_logits,
            clusters=clusters[:B],
            clusters_view=clusters[B:],
        )


class ClusterScorer:
    """ViL-Seg's inference as dense scores (``trainer.methods.base.Scorer``): a patch's score
    for a class is the cosine between its cluster's region feature and the class's text
    embedding (each template's embedding normalised, averaged, normalised again)."""

    def __init__(self, model: ViLSeg, logit_scale: float) -> None:
        self.model, self.scale = model, logit_scale
        self.mean, self.std = model.mean, model.std
        self.patch_size = model.patch_size
        self.floors_whole = self.pads_windows = False  # the grid rounds to patches

    @torch.no_grad()
    def encode_classes(self, names: list[str], templates: list[str]) -> torch.Tensor:
        towers = self.model.towers
        tokens = towers.tokenize([t.format(n) for n in names for t in templates])
        emb = towers.text_embedding(tokens.to(self.mean.device))
        emb = emb.to(torch.promote_types(emb.dtype, torch.float32))
        emb = F.normalize(emb.view(len(names), len(templates), -1), dim=-1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def region_scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, names, h, w) on the patch grid: each patch its cluster's cosines."""
        tok, grid = self.model.tokens(crops)
        patches = tok[:, 1:]  # (n, hw, d)
        q = self.model.cluster_probs(patches, grid)  # (n, C, h, w)
        assign = q.flatten(2).argmax(1)  # (n, hw): M, the hard clusters
        member = F.one_hot(assign, q.shape[1]).to(patches.dtype)  # (n, hw, C)
        mass = member.sum(1)[..., None].clamp(min=1)  # (n, C, 1)
        region = member.transpose(1, 2) @ patches / mass  # (n, C, d): e_rgn(M_c)
        cos = F.normalize(region, dim=-1) @ text.to(region.dtype).T  # (n, C, names)
        per_patch = torch.gather(cos, 1, assign[..., None].expand(-1, -1, cos.shape[-1]))
        return per_patch.transpose(1, 2).reshape(crops.shape[0], -1, *grid)  # (n, names, h, w)

    def scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The patch grid's scores resized (bilinear) to the windows' size."""
        grid = self.region_scores(crops, text)
        return F.interpolate(grid, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    def probabilities(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.softmax(self.scale * scores, dim)
