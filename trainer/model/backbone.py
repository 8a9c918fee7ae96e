"""CLIP's towers (open_clip), read token by token: residual-stream taps of the image tower,
its tokens in the joint space, text embeddings.

``CLIPTowers`` runs an open_clip model's image tower block by block; ``FrozenCLIP`` is the
frozen reading SynSeg's decoder and the training-free methods use, and methods that train the
towers (ViL-Seg) use ``CLIPTowers`` as it is. CLIPSeg's decoder reads the visual residual stream, CLS token included, after chosen blocks
(``taps``, 0-based block indices, CLIPSeg's ``extract_layers``). open_clip's own
``forward_intermediates`` drops the CLS token by default and does not resize position
embeddings, so the tower is run here block by block, with the position embeddings resized
(bicubic) to whatever grid the input gives: training at 224 and evaluating at 448 both work.

Architectures are open_clip's registry plus the JSON files in ``trainer/model/configs``
(``synseg-tiny``: a four-layer model for tests and the offline world, built with no download).
"""

from __future__ import annotations

import os
import pickle
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError
from trainer.model.compat import import_open_clip

CONFIG_DIR = Path(__file__).parent / "configs"
# Normalisations by name: the backbone input must match what the decoder weights saw.
NORMALISE = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # CLIPSeg's training data
}


@lru_cache(maxsize=1)
def open_clip():
    oc = import_open_clip()
    oc.add_model_config(CONFIG_DIR)
    return oc


def create_clip(arch: str, pretrained: str | None, init_seed: int = 0):
    """An open_clip model: ``pretrained`` an open_clip tag, a local checkpoint file, or None
    (random weights drawn from ``init_seed``, so they can be drawn again identically)."""
    oc = open_clip()
    if arch not in oc.list_models():
        raise UserError(
            f"unknown architecture {arch!r}; open_clip knows e.g. ViT-B-16-quickgelu, synseg-tiny"
        )
    if pretrained and os.sep in pretrained and not Path(pretrained).is_file():
        raise UserError(f"checkpoint file {pretrained} does not exist")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return oc.create_model(arch, pretrained=pretrained or None)
    except RuntimeError as e:  # open_clip's words for an unknown tag or a failed download
        raise UserError(
            f"cannot load {arch} weights {pretrained!r}: {str(e).splitlines()[0]}"
        ) from None
    except pickle.UnpicklingError as e:  # torch's weights_only refusal: code, or no checkpoint
        raise UserError(
            f"cannot load {arch} weights {pretrained!r}: not a checkpoint torch reads without "
            f"running code ({str(e).splitlines()[0][:120]})"
        ) from None
    except OSError as e:  # no network, no cache
        raise UserError(f"cannot download {arch} weights {pretrained!r}: {e}") from None


def resample_grid(
    pos: torch.Tensor, grid_h: int, grid_w: int, resize: str = "size"
) -> torch.Tensor:
    """Position embeddings of a trained g x g patch grid (g*g, W) for an (h, w) grid, bicubic:
    ``resize="size"`` samples at the output size's own scale (h/g, w/g); ``"scale"`` as the
    SCLIP family's ``interpolate_pos_encoding`` does, with the scale factor ((h + 0.1)/g,
    (w + 0.1)/g), which samples other source coordinates off the trained grid."""
    g = int(pos.shape[0] ** 0.5)
    if (grid_h, grid_w) == (g, g):
        return pos
    grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    # Resampled in float32 at least (bicubic in half precision loses digits), never lower
    # than the weights' own precision.
    work = torch.promote_types(grid.dtype, torch.float32)
    if resize == "scale":
        factor = ((grid_h + 0.1) / g, (grid_w + 0.1) / g)
        grid = F.interpolate(grid.to(work), scale_factor=factor, mode="bicubic")
    else:
        grid = F.interpolate(
            grid.to(work), size=(grid_h, grid_w), mode="bicubic", align_corners=False
        )
    return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)


class CLIPTowers(nn.Module):
    """Both towers of an open_clip model, the image tower run block by block so that its
    position embeddings are resized (bicubic) to whatever patch grid the input gives.

    Nothing here is frozen: ``FrozenCLIP`` is the frozen reading a decoder taps, and a method
    that trains the towers (ViL-Seg) uses this class as it is.
    """

    def __init__(self, arch: str, pretrained: str | None, init_seed: int = 0) -> None:
        super().__init__()
        self.arch = arch
        model = create_clip(arch, pretrained, init_seed)
        self.model = model
        visual = model.visual
        self.width = visual.transformer.width
        self.embed_dim = (
            model.text_projection.shape[1]
            if isinstance(model.text_projection, torch.Tensor)
            else model.text_projection.out_features
        )
        self.patch_size = visual.conv1.kernel_size[0]
        self.train_size = (
            visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        )
        self.tokenizer = open_clip().get_tokenizer(arch)

    @property
    def blocks(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    def _position_embedding(self, grid_h: int, grid_w: int, resize: str = "size") -> torch.Tensor:
        """The position embeddings for an (h, w) patch grid, bicubic from the trained g x g:
        ``resize="size"`` samples at the output size's own scale (h/g, w/g); ``"scale"`` as
        the SCLIP family's ``interpolate_pos_encoding`` does, with the scale factor
        ((h + 0.1)/g, (w + 0.1)/g), which samples other source coordinates off the trained
        grid."""
        pos = self.model.visual.positional_embedding  # (1 + g*g, W)
        if (grid_h, grid_w) == (int((pos.shape[0] - 1) ** 0.5),) * 2:
            return pos
        return torch.cat([pos[:1], resample_grid(pos[1:], grid_h, grid_w, resize)], dim=0)

    def _embed(
        self, images: torch.Tensor, resize: str = "size"
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch and position embeddings, CLS first, after ``ln_pre``: (B, 1 + h*w, W), (h, w)."""
        v = self.model.visual
        x = v.conv1(images)  # (B, W, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._position_embedding(h, w, resize).to(x.dtype)
        return v.ln_pre(x), (h, w)

    def _blocks(self, x: torch.Tensor, count: int, taps: tuple[int, ...] = ()):
        """Run the first ``count`` blocks on a batch-first stream; the stream after each of
        ``taps`` and after the last one run."""
        resblocks = self.model.visual.transformer.resblocks
        batch_first = getattr(self.model.visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        out = []
        for i, block in enumerate(resblocks[:count]):
            x = block(x)
            if i in taps:
                out.append(x if batch_first else x.transpose(0, 1))
        return out, (x if batch_first else x.transpose(0, 1))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Residual-stream tokens (B, N, W) into the joint space: ``ln_post``, then the
        projection, as CLIP treats its class token: (B, N, d)."""
        visual = self.model.visual
        x = visual.ln_post(x)
        return x @ visual.proj if visual.proj is not None else x

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Every token of the image tower in the joint space, (B, 1 + h*w, d) with the class
        token first (its row is CLIP's image embedding), and the patch grid (h, w)."""
        x, grid = self._embed(images)
        return self.project(self._blocks(x, self.blocks)[1]), grid

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def text_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings (T, d) of token ids, not normalised."""
        return self.model.encode_text(tokens)

    def _device(self) -> torch.device:
        tp = self.model.text_projection
        return tp.device if isinstance(tp, torch.Tensor) else next(self.model.parameters()).device


class FrozenCLIP(CLIPTowers):
    """An open_clip model with every parameter frozen and always in eval mode, read at the
    blocks a decoder taps."""

    def __init__(
        self, arch: str, pretrained: str | None, taps: tuple[int, ...], init_seed: int = 0
    ) -> None:
        # Random weights (no ``pretrained``) come from ``init_seed``: checkpoints hold only
        # the trainable part, so the frozen towers must be rebuilt identically at load time.
        super().__init__(arch, pretrained, init_seed)
        self.model = self.model.eval().requires_grad_(False)
        n_blocks = self.blocks
        if not taps or max(taps) >= n_blocks or min(taps) < 0:
            raise UserError(f"taps {taps} must be block indices in 0..{n_blocks - 1} of {arch}")
        self.taps = tuple(taps)

    def train(self, mode: bool = True) -> FrozenCLIP:
        return super().train(False)  # frozen: dropout and the like stay off

    @torch.no_grad()
    def visual_taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Residual stream after each tap block: a list of (B, 1 + h*w, W), CLS first."""
        x, _ = self._embed(images)
        return self._blocks(x, max(self.taps) + 1, self.taps)[0]

    @torch.no_grad()
    def before_last_block(
        self, images: torch.Tensor, resize: str = "size"
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The residual stream entering the image tower's last block, (B, 1 + h*w, W), and
        the patch grid: what the training-free methods change the last block on (``resize``:
        how the position embeddings reach that grid, ``_position_embedding``)."""
        x, grid = self._embed(images, resize)
        return self._blocks(x, self.blocks - 1)[1], grid

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings (T, d), not normalised (CLIPSeg conditions on these)."""
        tokens = self.tokenize(texts).to(self._device())
        return self.text_embedding(tokens).float()
