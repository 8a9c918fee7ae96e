"""OVSegmentor's model (the paper's section 3.1).

- image encoder: a ViT in DINO's layout (``patch_embed``, ``pos_embed``, ``blocks.N``
  with ``norm1``/``attn.qkv``/``attn.proj``/``norm2``/``mlp.fc1``/``mlp.fc2``, ``norm``), so a
  DINO checkpoint loads as it is; K learnable group tokens appended to the patch tokens after the
  first ``bind_after`` blocks' input (Eq. 2: [G; I] through Phi_enc^1), the binding module
  (``Binding``, Eqs. 3-6), then the remaining blocks on [G^bind; I'];
- text encoder: CLIP's text tower (open_clip), read token by token, a learnable [MASK]
  embedding at the masked entities' tokens; or the paper's BERT (``text_encoder="bert"``,
  transformers), its own [MASK] token: the caption, the caption with its entities masked and
  the prompted-entity sentence;
- projections: 2-layer MLPs of the mean group token and of the [EOT] text feature to a shared
  ``output_dim`` space (256), and the entity-completion decoder (one cross-attention layer over
  the group tokens, ``EntityDecoder``);
- a momentum copy of the image encoder and its projection (EMA, ``ema_update``), which gives
  the cross-image mask consistency its targets.

Inference (Eq. 1): each patch's affinity to the groups, softmax over the groups, times the
groups' cosines with the classes. The affinity is the product of the image tokens and the
group tokens in the shared space (the paper) or the binding module's own attention
(``infer_affinity="binding"``, what the public code's GroupViT harness reads).

Where the public code (Jazzcharles/OVSegmentor) differs from the paper, the paper's reading is
the default and the code's a setting where it is one: ``hard_assignment`` (the code: GroupViT's
straight-through hard assignment), ``assign_eps`` (the code: 1), ``infer_affinity``. The code's
GroupViT block (64 tokens mixed into 8 by an MLP, a cross-attention before the assignment, the
image tokens replaced by the groups after it) is not built: the paper's Eqs. 2-6 are.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError
from trainer.model.backbone import NORMALISE, create_clip, resample_grid

IMAGE_INITS = ("dino", "clip", "random")
TEXT_ENCODERS = ("clip", "bert")
AFFINITIES = ("tokens", "binding")


@dataclass
class ModelConfig:
    arch: str = "ViT-B-16"  # open_clip architecture: the text tower (and the image tower's shape)
    pretrained: str | None = None  # open_clip tag or local file of the CLIP (None: random)
    init_seed: int = 0  # seed of the random weights
    # The image encoder's start: dino (model.dino_checkpoint, the paper's), clip (arch's own
    # image tower, from pretrained) or random (a ViT of arch's image tower shape)
    image_init: str = "dino"
    dino_checkpoint: str | None = None  # a local DINO ViT checkpoint (dino_vitbase16_pretrain.pth)
    groups: int = 8  # K, the group tokens (the paper: 8; its Table 5 also 16)
    bind_after: int = 6  # blocks of Phi_enc^1, before the binding module (the rest: Phi_enc^2)
    hard_assignment: bool = False  # straight-through one-hot binding (the code's; the paper: soft)
    assign_eps: float = 1e-6  # added to Eq. 5's denominator (the code: 1.0)
    output_dim: int = 256  # the shared space (the paper: 256)
    projection_hidden: int = 4096  # the 2-layer projections' hidden width (the code: 4096)
    # The text encoder: clip (arch's text tower, from pretrained) or bert (the paper's: a BERT
    # of transformers, model.bert)
    text_encoder: str = "clip"
    bert: str = "bert-base-uncased"  # with text_encoder=bert: a Hugging Face name or local folder
    text_trainable: bool = True  # the text tower trains (the paper's BERT does)
    temperature: float = 0.07  # the learnable temperature's start (its logit scale capped at 100)
    infer_affinity: str = "tokens"  # tokens (Eq. 1's I G) or binding (the binding's attention)
    normalise: str = "imagenet"  # the images' normalisation: imagenet (DINO's) or clip

    def __post_init__(self) -> None:
        problems = []
        if self.image_init not in IMAGE_INITS:
            problems.append(f"image_init must be one of {', '.join(IMAGE_INITS)}")
        if self.groups < 2:
            problems.append("groups must be at least 2")
        if self.bind_after < 1:
            problems.append("bind_after must be at least 1")
        if self.assign_eps < 0:
            problems.append("assign_eps must not be negative")
        if min(self.output_dim, self.projection_hidden) < 1:
            problems.append("output_dim and projection_hidden must be at least 1")
        if not 0 < self.temperature <= 1:
            problems.append("temperature must be in (0, 1]")
        if self.text_encoder not in TEXT_ENCODERS:
            problems.append(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}")
        if self.infer_affinity not in AFFINITIES:
            problems.append(f"infer_affinity must be one of {', '.join(AFFINITIES)}")
        if self.normalise not in NORMALISE:
            problems.append(f"normalise must be one of {tuple(NORMALISE)}")
        if problems:
            raise UserError("; ".join(problems))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, W / heads)
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), act(), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block in DINO's (timm's) names."""

    def __init__(
        self, width: int, heads: int, hidden: int, act: type[nn.Module], eps: float
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.mlp = Mlp(width, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def bind_attention(keys: torch.Tensor, queries: torch.Tensor, hard: bool) -> torch.Tensor:
    """Eq. 4: A (B, L, K), each image token's softmax over the K groups (slot attention
    normalises over the queries, not over the tokens); straight-through one-hot if ``hard``."""
    a = torch.softmax(keys @ queries.transpose(1, 2) / math.sqrt(keys.shape[-1]), dim=-1)
    if hard:
        one_hot = F.one_hot(a.argmax(-1), a.shape[-1]).to(a.dtype)
        a = one_hot - a.detach() + a
    return a


class Binding(nn.Module):
    """The binding module (Eqs. 3-6): Q from the groups, K, V from the image tokens; A their
    softmax over the groups; each group the A-weighted mean of the values; G^bind = G' +
    W_o G~'."""

    def __init__(self, width: int, hard: bool, eps: float) -> None:
        super().__init__()
        self.norm_groups, self.norm_tokens = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.hard, self.eps = hard, eps

    def forward(self, groups: torch.Tensor, tokens: torch.Tensor):
        """groups (B, K, W) G', tokens (B, L, W) I' -> (G^bind (B, K, W), A (B, L, K))."""
        tok = self.norm_tokens(tokens)
        q = self.q(self.norm_groups(groups))
        a = bind_attention(self.k(tok), q, self.hard)  # (B, L, K)
        mean = (a.transpose(1, 2) @ self.v(tok)) / (a.sum(1)[..., None] + self.eps)  # (B, K, W)
        return groups + self.out(mean), a


def projection(width: int, hidden: int, out: int) -> nn.Sequential:
    """A 2-layer MLP into the shared space."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))


@dataclass
class Encoded:
    groups: torch.Tensor  # (B, K, W) the group tokens G after Phi_enc^2 and the final norm
    tokens: torch.Tensor  # (B, L, W) the image tokens I
    binding: torch.Tensor  # (B, L, K) the binding's attention A
    grid: tuple[int, int]


class ImageEncoder(nn.Module):
    """Phi_enc^2 o Phi_bind o Phi_enc^1 ([G; I]) on a ViT in DINO's layout."""

    def __init__(self, shape: dict, cfg: ModelConfig) -> None:
        super().__init__()
        W, P = shape["width"], shape["patch"]
        self.patch_size, self.width, self.train_size = P, W, shape["image_size"]
        g = self.train_size // P
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, W, P, P, bias=shape["patch_bias"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, W))  # DINO's; the groups replace it
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + g * g, W) * 0.02)
        self.pre_norm = nn.LayerNorm(W) if shape["pre_norm"] else nn.Identity()
        act = QuickGELU if shape["quick_gelu"] else nn.GELU
        self.blocks = nn.ModuleList(
            Block(W, shape["heads"], shape["mlp"], act, shape["norm_eps"])
            for _ in range(shape["layers"])
        )
        self.norm = nn.LayerNorm(W, eps=shape["norm_eps"])
        self.group_tokens = nn.Parameter(torch.randn(1, cfg.groups, W) * 0.02)
        self.binding = Binding(W, cfg.hard_assignment, cfg.assign_eps)
        self.bind_after = cfg.bind_after
        if cfg.bind_after >= shape["layers"]:
            raise UserError(
                f"model.bind_after ({cfg.bind_after}) must leave blocks after the binding: the "
                f"image tower has {shape['layers']}"
            )

    def forward(self, images: torch.Tensor) -> Encoded:
        x = self.patch_embed.proj(images)  # (B, W, h, w)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed[0, 1:]
        x = self.pre_norm(x + resample_grid(pos, *grid).to(x.dtype))
        K = self.group_tokens.shape[1]
        x = torch.cat([self.group_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for block in self.blocks[: self.bind_after]:
            x = block(x)
        groups, a = self.binding(x[:, :K], x[:, K:])
        x = torch.cat([groups, x[:, K:]], dim=1)
        for block in self.blocks[self.bind_after :]:
            x = block(x)
        x = self.norm(x)
        return Encoded(x[:, :K], x[:, K:], a, grid)


def _clip_shape(model) -> dict:
    v = model.visual
    block = v.transformer.resblocks[0]
    return {
        "width": v.transformer.width,
        "patch": v.conv1.kernel_size[0],
        "image_size": v.image_size[0] if isinstance(v.image_size, tuple) else v.image_size,
        "heads": block.attn.num_heads,
        "mlp": block.mlp.c_fc.out_features,
        "layers": len(v.transformer.resblocks),
        "quick_gelu": type(block.mlp.gelu).__name__ == "QuickGELU",
        "patch_bias": False,
        "pre_norm": True,
        "norm_eps": v.ln_post.eps,
    }


def clip_image_state(model) -> dict[str, torch.Tensor]:
    """open_clip's image tower in this encoder's (DINO's) names."""
    v = model.visual
    out = {
        "patch_embed.proj.weight": v.conv1.weight,
        "cls_token": v.class_embedding.view(1, 1, -1),
        "pos_embed": v.positional_embedding[None],
        "pre_norm.weight": v.ln_pre.weight,
        "pre_norm.bias": v.ln_pre.bias,
        "norm.weight": v.ln_post.weight,
        "norm.bias": v.ln_post.bias,
    }
    names = {"ln_1": "norm1", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i, block in enumerate(v.transformer.resblocks):
        for theirs, ours in names.items():
            m = block.get_submodule(theirs)
            out[f"blocks.{i}.{ours}.weight"], out[f"blocks.{i}.{ours}.bias"] = m.weight, m.bias
        out[f"blocks.{i}.attn.qkv.weight"] = block.attn.in_proj_weight
        out[f"blocks.{i}.attn.qkv.bias"] = block.attn.in_proj_bias
        out[f"blocks.{i}.attn.proj.weight"] = block.attn.out_proj.weight
        out[f"blocks.{i}.attn.proj.bias"] = block.attn.out_proj.bias
    return {k: t.detach().clone() for k, t in out.items()}


def read_dino(path: str) -> tuple[dict, dict]:
    """A DINO ViT checkpoint (its released ``dino_vit*_pretrain.pth``, or a DINO training
    checkpoint's ``teacher``): (state dict, the shape it gives)."""
    if not Path(path).is_file():
        raise UserError(f"DINO checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read DINO checkpoint {path}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "teacher" in state:
        state = state["teacher"]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise UserError(f"{path} is not a DINO ViT checkpoint (no patch_embed.proj, pos_embed)")
    W, _, P, _ = state["patch_embed.proj.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    g = int((state["pos_embed"].shape[1] - 1) ** 0.5)
    shape = {
        "width": W,
        "patch": P,
        "image_size": g * P,
        "heads": max(1, W // 64),  # DINO's ViTs: 64-dimensional heads
        "mlp": state["blocks.0.mlp.fc1.weight"].shape[0],
        "layers": layers,
        "quick_gelu": False,
        "patch_bias": "patch_embed.proj.bias" in state,
        "pre_norm": False,
        "norm_eps": 1e-6,
    }
    return state, shape


class TextEncoder(nn.Module):
    """CLIP's text tower read token by token, with a learnable [MASK] embedding."""

    def __init__(self, clip) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.width = clip.token_embedding.weight.shape[1]
        self.mask_embedding = nn.Parameter(torch.randn(self.width) * 0.02)

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Token features (B, L, W) of ids (B, L); ``masked`` (B, L) marks [MASK] positions."""
        x = self.token_embedding(tokens)
        if masked is not None:
            x = torch.where(masked[..., None], self.mask_embedding.to(x.dtype), x)
        x = x + self.positional_embedding.to(x.dtype)
        batch_first = getattr(self.transformer, "batch_first", True)
        x = x if batch_first else x.transpose(0, 1)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = x if batch_first else x.transpose(0, 1)
        return self.ln_final(x)

    def eot(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The [EOT] token's feature (B, W): CLIP's end token has the largest id."""
        return features[torch.arange(features.shape[0]), tokens.argmax(-1)]


class BertTextEncoder(nn.Module):
    """A BERT of transformers (the paper's text encoder), its [MASK] its own token; the [SEP]
    (the last token before the padding) read as the [EOT]."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from trainer.methods.ovsegmentor.text import from_transformers

        self.bert = from_transformers("AutoModel", name, "BERT")
        self.pad = self.bert.config.pad_token_id or 0
        self.width = self.bert.config.hidden_size

    def forward(self, tokens: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        return self.bert(input_ids=tokens, attention_mask=(tokens != self.pad).long())[0]

    def eot(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        last = (tokens != self.pad).sum(-1) - 1
        return features[torch.arange(features.shape[0]), last]


class EntityDecoder(nn.Module):
    """Eq. 8: one transformer decoder layer, the masked caption's tokens querying the groups
    (W_q of the text, W_k, W_v of the groups), post-norm, with its feed-forward network."""

    def __init__(self, text_width: int, group_width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(
            text_width, heads, kdim=group_width, vdim=group_width, batch_first=True
        )
        self.norm1, self.norm2 = nn.LayerNorm(text_width), nn.LayerNorm(text_width)
        self.ffn = Mlp(text_width, 4 * text_width, nn.GELU)

    def forward(self, text: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        x = self.norm1(text + self.attn(text, groups, groups, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))


@dataclass
class OVSegOutput:
    image: torch.Tensor  # (B, d) z^I: the mean group token, projected, normalised
    text: torch.Tensor  # (B, d) z^T: the caption's [EOT], projected, normalised
    logit_scale: torch.Tensor  # () exp of the learnable log-scale, capped at 100
    masked: torch.Tensor | None = None  # (B, d) z^M, or None without entity completion
    entity: torch.Tensor | None = None  # (B, d) z^E
    entity_rows: torch.Tensor | None = None  # (B,) bool: images with an entity
    # cross-image mask consistency (None when off this step): for each image and its partner,
    # the predicted masks (B, L, K') and the momentum model's binarised targets
    mask_pred: torch.Tensor | None = None
    mask_target: torch.Tensor | None = None
    mask_soft: torch.Tensor | None = None  # the targets before binarisation (matched on)
    mask_rows: torch.Tensor | None = None  # (B,) bool: images with a partner


class OVSegmentor(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        clip = create_clip(cfg.arch, cfg.pretrained, cfg.init_seed)
        if cfg.image_init == "dino":
            state, shape = read_dino(cfg.dino_checkpoint)
        else:
            shape, state = _clip_shape(clip), clip_image_state(clip)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            self.image_encoder = ImageEncoder(shape, cfg)
            if cfg.image_init != "random":
                self._load_image(state)
            if cfg.text_encoder == "bert":
                self.text_encoder = BertTextEncoder(cfg.bert)
            else:
                self.text_encoder = TextEncoder(clip)
            for p in self.text_encoder.parameters():
                p.requires_grad_(cfg.text_trainable)
            if hasattr(self.text_encoder, "mask_embedding"):
                self.text_encoder.mask_embedding.requires_grad_(True)
            W, Wt = shape["width"], self.text_encoder.width
            self.image_projection = projection(W, cfg.projection_hidden, cfg.output_dim)
            self.text_projection = projection(Wt, cfg.projection_hidden, cfg.output_dim)
            self.entity_decoder = EntityDecoder(Wt, W, max(1, Wt // 64))
            self.bridge_projection = projection(Wt, cfg.projection_hidden, cfg.output_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.temperature)))
        # the momentum model: the image encoder and its projection, updated by EMA only
        self.momentum = nn.ModuleDict(
            {
                "image_encoder": copy.deepcopy(self.image_encoder),
                "image_projection": copy.deepcopy(self.image_projection),
            }
        )
        self.momentum.requires_grad_(False)
        self.normalisation = cfg.normalise
        mean, std = NORMALISE[cfg.normalise]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _load_image(self, state: dict) -> None:
        own = self.image_encoder.state_dict()
        take = {k: v for k, v in state.items() if k in own}
        if own["pos_embed"].shape != take["pos_embed"].shape:
            raise UserError("the image checkpoint's position grid does not fit the encoder")
        missing = [
            k for k in own if k not in take and not k.startswith(("group_tokens", "binding"))
        ]
        if missing:
            raise UserError(f"the image checkpoint lacks {', '.join(missing[:3])}")
        self.image_encoder.load_state_dict(take, strict=False)

    @property
    def native_size(self) -> int:
        return self.image_encoder.train_size

    @property
    def patch_size(self) -> int:
        return self.image_encoder.patch_size

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()  # every weight, the momentum model's included

    def describe(self) -> dict:
        return {**asdict(self.cfg), "normalisation": self.cfg.normalise}

    @torch.no_grad()
    def ema_update(self, momentum: float) -> None:
        """The momentum model's weights: m <- momentum m + (1 - momentum) theta."""
        for name in ("image_encoder", "image_projection"):
            online = getattr(self, name).parameters()
            for m, p in zip(self.momentum[name].parameters(), online, strict=True):
                m.mul_(momentum).add_(p.detach(), alpha=1 - momentum)

    def encode_image(self, images: torch.Tensor, momentum: bool = False):
        """(groups (B, K, d), tokens (B, L, d), Encoded) in the shared space, normalised."""
        enc = self.momentum["image_encoder"] if momentum else self.image_encoder
        proj = self.momentum["image_projection"] if momentum else self.image_projection
        e = enc((images - self.mean) / self.std)
        return F.normalize(proj(e.groups), dim=-1), F.normalize(proj(e.tokens), dim=-1), e

    def text_embedding(self, tokens: torch.Tensor, masked: torch.Tensor | None = None):
        """z of token ids (B, L): the [EOT] feature, projected, normalised."""
        feats = self.text_encoder(tokens, masked)
        return F.normalize(self.text_projection(self.text_encoder.eot(feats, tokens)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100)

    def grid_scores(self, images: torch.Tensor, text: torch.Tensor, scale) -> tuple:
        """Eq. 1 on the patch grid: sum_k A_jk cos(G_k, T_c) for (C, d) normalised class
        embeddings, (B, C, h, w), A the binding's attention or the tokens' softmax affinity to
        the groups at ``scale`` (``infer_affinity``); and the encoder's output."""
        groups, tokens, e = self.encode_image(images)
        if self.cfg.infer_affinity == "binding":
            a = e.binding
        else:
            a = torch.softmax(scale * tokens @ groups.transpose(1, 2), dim=-1)  # (B, L, K)
        s = a @ (groups @ text.to(groups.dtype).T)  # (B, L, C)
        return s.transpose(1, 2).reshape(images.shape[0], -1, *e.grid), e

    def dense_train(self, images: torch.Tensor, text: torch.Tensor):
        """Eq. 1 with gradients, for mask-supervised training: the learnt scale times the grid
        scores, at the images' size; the image tokens are the one feature level."""
        from trainer.methods.base import DenseOutput

        s, e = self.grid_scores(images, text, self.scale())
        logits = F.interpolate(
            self.scale() * s, size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        level = e.tokens.transpose(1, 2).reshape(images.shape[0], -1, *e.grid)
        return DenseOutput(logits, [level])

    def forward(
        self,
        images: torch.Tensor,
        captions: torch.Tensor,
        masked_captions: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        entity_sentences: torch.Tensor | None = None,
        entity_rows: torch.Tensor | None = None,
        partners: torch.Tensor | None = None,
        shared: torch.Tensor | None = None,
        partner_rows: torch.Tensor | None = None,
        ratio: float = 0.5,
        delta: float = 0.65,
        binarise: str = "absolute",
    ) -> OVSegOutput:
        """images (B, 3, S, S) in [0, 1]; captions (B, L) ids; for entity completion the masked
        captions, their [MASK] positions and the prompted-entity sentences; for the mask
        consistency the partner images (B, 3, S, S), the shared entity's prompt (B, L) and
        which rows have a partner."""
        B = images.shape[0]
        with_masks = partners is not None
        both = torch.cat([images, partners]) if with_masks else images
        g_all, t_all, e_all = self.encode_image(both)
        out = OVSegOutput(
            image=F.normalize(self.image_projection(e_all.groups[:B].mean(1)), dim=-1),
            text=self.text_embedding(captions),
            logit_scale=self.scale(),
        )
        if masked_captions is not None:
            feats = self.text_encoder(masked_captions, masked_positions)
            done = self.entity_decoder(feats, e_all.groups[:B])
            out.masked = F.normalize(
                self.bridge_projection(self.text_encoder.eot(done, masked_captions)), dim=-1
            )
            out.entity = self.text_embedding(entity_sentences)
            out.entity_rows = entity_rows
        if with_masks:
            out.mask_pred, out.mask_target, out.mask_soft = self._cross_masks(
                g_all, t_all, both, shared, B, ratio, delta, binarise
            )
            out.mask_rows = partner_rows
        return out

    def _cross_masks(self, groups, tokens, both, shared, B, ratio, delta, binarise):
        """Eq. 10 both ways: image 1's tokens under its partner's entity groups (prediction)
        and under its own (the momentum model's, binarised: the target); and image 2 alike."""
        with torch.no_grad():
            entity = self.text_embedding(shared).detach()  # (B, d)
            entity = torch.cat([entity, entity])  # image and partner share it
            g_m, t_m, _ = self.encode_image(both, momentum=True)
        k = max(1, round(ratio * groups.shape[1]))
        sub = select_groups(groups, entity, k)  # (2B, K', d) online
        sub_m = select_groups(g_m, entity, k)
        swap = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(groups.device)
        pred = torch.sigmoid(tokens @ sub[swap].transpose(1, 2))  # (2B, L, K') I_1 G_2^sub
        soft = torch.sigmoid(t_m @ sub_m.transpose(1, 2))  # (2B, L, K') I_1 G_1^sub, momentum
        return pred, binarise_masks(soft, delta, binarise), soft


def select_groups(groups: torch.Tensor, entity: torch.Tensor, k: int) -> torch.Tensor:
    """The k groups (B, k, d) most similar to each image's entity embedding (B, d), in order
    of similarity."""
    sim = (groups @ entity[..., None]).squeeze(-1)  # (B, K)
    idx = sim.topk(k, dim=-1).indices
    return torch.gather(groups, 1, idx[..., None].expand(-1, -1, groups.shape[-1]))


def binarise_masks(masks: torch.Tensor, delta: float, rule: str) -> torch.Tensor:
    """The target masks: 1 where a mask (B, L, K') reaches delta (``absolute``, the paper's
    "binarising m_k with a threshold delta"), or delta times its own maximum (``relative``,
    the public code's)."""
    if rule == "relative":
        return (masks >= delta * masks.amax(1, keepdim=True)).to(masks.dtype)
    return (masks >= delta).to(masks.dtype)


class GroupScorer:
    """OVSegmentor's inference as dense scores (``trainer.methods.base.Scorer``), Eq. 1: a
    patch's score for a class is sum_k A_jk cos(G_k, T_c), A its softmax affinity to the
    groups."""

    def __init__(self, model: OVSegmentor, logit_scale: float) -> None:
        self.model = model
        self.scale = logit_scale or float(model.scale().detach())
        self.mean, self.std = model.mean, model.std
        self.patch_size = model.patch_size
        self.floors_whole = self.pads_windows = False

    @torch.no_grad()
    def encode_classes(self, names: list[str], templates: list[str]) -> torch.Tensor:
        from trainer.methods.ovsegmentor.text import codec

        m = self.model
        tokens = codec(m.cfg).tokenize([t.format(n) for n in names for t in templates])
        emb = m.text_embedding(tokens.to(self.mean.device))
        emb = emb.to(torch.promote_types(emb.dtype, torch.float32))
        emb = F.normalize(emb.view(len(names), len(templates), -1), dim=-1).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def grid_scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, names, h, w) on the patch grid."""
        return self.model.grid_scores(crops, text, self.scale)[0]

    def scores(self, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        grid = self.grid_scores(crops, text)
        return F.interpolate(grid, size=crops.shape[-2:], mode="bilinear", align_corners=False)

    def probabilities(self, scores: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.softmax(self.scale * scores, dim)
