"""The frozen CLIP backbone (open_clip): residual-stream taps of the image tower, text embeddings.

CLIPSeg's decoder reads the visual residual stream, CLS token included, after chosen blocks
(``taps``, 0-based block indices, CLIPSeg's ``extract_layers``). open_clip's own
``forward_intermediates`` drops the CLS token by default and does not resize position
embeddings, so the tower is run here block by block, with the position embeddings resized
(bicubic) to whatever grid the input gives: training at 224 and evaluating at 448 both work.

Architectures are open_clip's registry plus the JSON files in ``trainer/model/configs``
(``synseg-tiny``: a four-layer model for tests and the offline world, built with no download).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
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


class FrozenCLIP(nn.Module):
    """An open_clip model with every parameter frozen and always in eval mode."""

    def __init__(
        self, arch: str, pretrained: str | None, taps: tuple[int, ...], init_seed: int = 0
    ) -> None:
        super().__init__()
        oc = open_clip()
        if arch not in oc.list_models():
            raise UserError(
                f"unknown architecture {arch!r}; open_clip knows e.g. ViT-B-16-quickgelu, synseg-tiny"
            )
        if pretrained and os.sep in pretrained and not Path(pretrained).is_file():
            raise UserError(f"checkpoint file {pretrained} does not exist")
        try:
            # Random weights (no ``pretrained``) come from ``init_seed``: checkpoints hold only
            # the trainable part, so the frozen towers must be rebuilt identically at load time.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model = oc.create_model(arch, pretrained=pretrained or None)
        except RuntimeError as e:  # open_clip's words for an unknown tag or a failed download
            raise UserError(
                f"cannot load {arch} weights {pretrained!r}: {str(e).splitlines()[0]}"
            ) from None
        except OSError as e:  # no network, no cache
            raise UserError(f"cannot download {arch} weights {pretrained!r}: {e}") from None
        self.model = model.eval().requires_grad_(False)
        visual = model.visual
        n_blocks = len(visual.transformer.resblocks)
        if not taps or max(taps) >= n_blocks or min(taps) < 0:
            raise UserError(f"taps {taps} must be block indices in 0..{n_blocks - 1} of {arch}")
        self.taps = tuple(taps)
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
        self.tokenizer = oc.get_tokenizer(arch)

    def train(self, mode: bool = True) -> FrozenCLIP:
        return super().train(False)  # frozen: dropout and the like stay off

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        pos = self.model.visual.positional_embedding  # (1 + g*g, W)
        g = int((pos.shape[0] - 1) ** 0.5)
        if (grid_h, grid_w) == (g, g):
            return pos
        grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
        # Resampled in float32 at least (bicubic in half precision loses digits), never lower
        # than the weights' own precision.
        work = torch.promote_types(grid.dtype, torch.float32)
        grid = F.interpolate(
            grid.to(work), size=(grid_h, grid_w), mode="bicubic", align_corners=False
        )
        grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
        return torch.cat([pos[:1], grid], dim=0)

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch and position embeddings, CLS first, after ``ln_pre``: (B, 1 + h*w, W), (h, w)."""
        v = self.model.visual
        x = v.conv1(images)  # (B, W, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._position_embedding(h, w).to(x.dtype)
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

    @torch.no_grad()
    def visual_taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Residual stream after each tap block: a list of (B, 1 + h*w, W), CLS first."""
        x, _ = self._embed(images)
        return self._blocks(x, max(self.taps) + 1, self.taps)[0]

    @torch.no_grad()
    def before_last_block(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The residual stream entering the image tower's last block, (B, 1 + h*w, W), and
        the patch grid: what the training-free methods change the last block on."""
        x, grid = self._embed(images)
        n = len(self.model.visual.transformer.resblocks)
        return self._blocks(x, n - 1)[1], grid

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings (T, d), not normalised (CLIPSeg conditions on these)."""
        device = (
            self.model.text_projection.device
            if isinstance(self.model.text_projection, torch.Tensor)
            else next(self.model.parameters()).device
        )
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens).float()
