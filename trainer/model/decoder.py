"""CLIPSeg's decoder, with FiLM conditioning, loadable from CLIPSeg and Hugging Face weights.

Start from the deepest tap: ``a = reduce_0(act_deepest)``, FiLM ``a = mul(t) * a + add(t)``,
``a = block_0(a)``; then for each shallower tap ``a = block_i(reduce_i(act) + a)``. Drop CLS,
fold the tokens back into the patch grid and upsample with a transposed convolution (one
``ConvTranspose2d(r, 1, p, stride=p)``, or CLIPSeg's "refined" stack). Parameter names follow
CLIPSeg's released state dicts (``film_mul``, ``film_add``, ``reduces.N``, ``blocks.N``,
``trans_conv``), so those load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError


@dataclass
class DecoderShape:
    """The decoder's own settings: a method's model settings take these over as they are."""

    reduce_dim: int = 64  # the decoder's width (CLIPSeg's rd64)
    heads: int = 4  # attention heads of each decoder block
    ffn_dim: int = 2048  # nn.TransformerEncoderLayer's default, as CLIPSeg uses it
    refined: bool = False  # CLIPSeg's "refined" upsampling (conv, two transposed convs)
    film_hidden: int = (
        0  # 0: linear FiLM (CLIPSeg); >0: an MLP with this hidden width (the paper's "small MLP")
    )
    dropout: float = 0.1  # in the decoder blocks (nn.TransformerEncoderLayer's default, as CLIPSeg)


@dataclass
class DecoderConfig(DecoderShape):
    """A decoder's shape and the backbone it reads."""

    width: int = 768  # backbone residual width
    cond_dim: int = 512  # text embedding width
    depth: int = 3  # number of taps
    patch_size: int = 16

    @classmethod
    def of(cls, shape: DecoderShape, **backbone) -> DecoderConfig:
        """The decoder of ``shape`` (any settings holding its fields) on a backbone."""
        return cls(**{f.name: getattr(shape, f.name) for f in fields(DecoderShape)}, **backbone)


def _film(cfg: DecoderConfig) -> nn.Module:
    if not cfg.film_hidden:
        return nn.Linear(cfg.cond_dim, cfg.reduce_dim)
    return nn.Sequential(
        nn.Linear(cfg.cond_dim, cfg.film_hidden),
        nn.ReLU(),
        nn.Linear(cfg.film_hidden, cfg.reduce_dim),
    )


class CLIPSegDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        r, p = cfg.reduce_dim, cfg.patch_size
        self.film_mul = _film(cfg)
        self.film_add = _film(cfg)
        self.reduces = nn.ModuleList(nn.Linear(cfg.width, r) for _ in range(cfg.depth))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                r, cfg.heads, cfg.ffn_dim, dropout=cfg.dropout, batch_first=True
            )
            for _ in range(cfg.depth)
        )
        if cfg.refined:
            k = p // 4
            self.trans_conv = nn.Sequential(
                nn.Conv2d(r, r, kernel_size=3, padding=1),
                nn.ReLU(),
                nn.ConvTranspose2d(r, r // 2, kernel_size=k, stride=k),
                nn.ReLU(),
                nn.ConvTranspose2d(r // 2, 1, kernel_size=k, stride=k),
            )
        else:
            self.trans_conv = nn.ConvTranspose2d(r, 1, kernel_size=p, stride=p)

    def reduce_taps(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-image linear reductions, deepest first: list of (B, L, r)."""
        return [reduce(act) for reduce, act in zip(self.reduces, taps[::-1], strict=True)]

    def forward(
        self,
        reduced: list[torch.Tensor],
        cond: torch.Tensor,
        pair_image: torch.Tensor | None,
        grid: tuple[int, int],
        out_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for (image, prompt) pairs.

        reduced: ``reduce_taps`` output, each (B, L, r). cond: (P, d) prompt embeddings.
        pair_image: (P,) index of each pair's image (None: pair i is image i).
        Returns logits (P, H, W) and the FiLM-conditioned tokens (P, L, r).
        """
        pick = (lambda t: t) if pair_image is None else (lambda t: t[pair_image])
        a = pick(reduced[0])  # (P, L, r)
        a = self.film_mul(cond)[:, None] * a + self.film_add(cond)[:, None]
        conditioned = a
        a = self.blocks[0](a)
        for red, block in zip(reduced[1:], self.blocks[1:], strict=True):
            a = block(pick(red) + a)
        a = a[:, 1:].transpose(1, 2)  # (P, r, h*w): drop CLS
        a = a.reshape(a.shape[0], a.shape[1], *grid)  # (P, r, h, w)
        logits = self.trans_conv(a)  # (P, 1, h*p, w*p)
        if logits.shape[-2:] != tuple(out_size):
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits[:, 0], conditioned


# --------------------------------------------------------------------------- loading weights


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors, .pth or .pt file (unwrapping ``state_dict``)."""
    if not Path(path).is_file():
        raise UserError(f"decoder weights {path} do not exist")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path} is not a PyTorch or safetensors state dict ({type(e).__name__})"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    return sd


def from_clipseg(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPSeg's released decoder (e.g. rd64-uni.pth): our names are its names.

    Its unused ``reduce.*`` layer and any CLIP weights (``model.*``) are left out.
    """
    return {k: v for k, v in sd.items() if not k.startswith(("reduce.", "model.", "clip."))}


# A decoder block's parts: nn.TransformerEncoderLayer's names -> transformers' CLIPSeg's
# (the attention's in-projection is split into q, k and v there).
HF_BLOCK_PARTS = {
    "self_attn.out_proj": "self_attn.out_proj",
    "linear1": "mlp.fc1",
    "linear2": "mlp.fc2",
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
}


def from_huggingface(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder of a Hugging Face ``CLIPSegForImageSegmentation`` state dict."""
    out: dict[str, torch.Tensor] = {}
    dec = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    if not dec:
        raise UserError("no 'decoder.*' weights: not a CLIPSegForImageSegmentation checkpoint")
    layer_ids = sorted({int(k.split(".")[1]) for k in dec if k.startswith("layers.")})
    for k, v in dec.items():
        if k.startswith(("film_mul.", "film_add.", "reduces.")):
            out[k] = v
        elif k.startswith("transposed_convolution."):
            out["trans_conv." + k.split(".", 1)[1]] = v
    for i in layer_ids:
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attn.in_proj_{kind}"] = torch.cat(
                [dec[src + f"self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")]
            )
            for ours, theirs in HF_BLOCK_PARTS.items():
                out[dst + f"{ours}.{kind}"] = dec[src + f"{theirs}.{kind}"]
    return out


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("decoder.") for k in sd):
        return "huggingface"
    if "film_mul.weight" in sd or "film_mul.0.weight" in sd:
        return "clipseg"
    raise UserError(
        "unrecognised decoder weights: expected CLIPSeg keys (film_mul, reduces.N, ...) "
        "or a Hugging Face CLIPSeg checkpoint (decoder.*)"
    )


def load_decoder_state(decoder: CLIPSegDecoder, source: Path | dict) -> str:
    """Load CLIPSeg or Hugging Face decoder weights into ``decoder``; return the format found."""
    sd = read_state_dict(Path(source)) if not isinstance(source, dict) else source
    fmt = detect_format(sd)
    mapped = from_huggingface(sd) if fmt == "huggingface" else from_clipseg(sd)
    own = decoder.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape of {wrong[0]}: {tuple(mapped[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"
        )
        raise UserError(
            f"decoder weights do not fit this decoder ({detail}); check the architecture "
            "(width, reduce_dim, taps, refined)"
        )
    decoder.load_state_dict(mapped)
    return fmt


def guess_config(sd: dict[str, torch.Tensor], patch_size: int) -> dict:
    """Decoder settings implied by a CLIPSeg or Hugging Face state dict."""
    mapped = from_huggingface(sd) if detect_format(sd) == "huggingface" else from_clipseg(sd)
    depth = len({k.split(".")[1] for k in mapped if k.startswith("reduces.")})
    r, width = mapped["reduces.0.weight"].shape
    film = mapped.get("film_mul.weight", mapped.get("film_mul.0.weight"))
    return {
        "width": int(width),
        "cond_dim": int(film.shape[1]),
        "depth": depth,
        "reduce_dim": int(r),
        "ffn_dim": int(mapped["blocks.0.linear1.weight"].shape[0]),
        "patch_size": patch_size,
        "refined": "trans_conv.0.weight" in mapped,
        "film_hidden": 0 if "film_mul.weight" in mapped else int(film.shape[0]),
    }
