"""Zero-shot inference: class prompts -> per-pixel class scores -> a label map.

Per image: resize so the short side is ``short_side`` (keeping the aspect ratio), then either
slide a ``window`` x ``window`` crop with ``stride`` (TCL's protocol, as MMSegmentation's
``slide_inference``: overlapping logits are averaged) or run the whole image. All crops of an
image go through the backbone in one batch, and the decoder runs over every (crop, prompt)
pair. Logits are resized back to the label's size before the argmax.

A class may have several names (synonyms): its score is its best name's. Each name's
embedding is the mean over the prompt templates. For datasets with a background class, a
pixel is background when no class's activation (sigmoid) reaches ``bg_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import UserError

TEMPLATES_DIR = Path(__file__).parent / "templates"


def read_templates(name_or_path: str) -> list[str]:
    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATES_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt")))
        raise UserError(f"prompt templates {name_or_path!r} not found (a file, or one of: {known})")
    lines = [
        x.strip() for x in path.read_text().splitlines() if x.strip() and not x.startswith("#")
    ]
    if not lines or any("{}" not in t for t in lines):
        raise UserError(f"{path}: every template needs {{}} where the class name goes")
    return lines


@dataclass
class InferConfig:
    mode: str = "slide"  # slide or whole
    short_side: int = 448  # images are resized so their short side is this
    window: int = 448  # sliding window side
    stride: int = 224  # sliding window stride
    bg_threshold: float = 0.5  # background where no class activation reaches this
    chunk: int = 256  # (crop, prompt) pairs per decoder call

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("slide", "whole"):
            problems.append("--mode must be slide or whole")
        if self.short_side < 16 or self.window < 16 or not 0 < self.stride <= self.window:
            problems.append(
                "--short-side and --window must be at least 16, and 0 < --stride <= --window"
            )
        if not 0 <= self.bg_threshold <= 1:
            problems.append("--bg-threshold must be in [0, 1]")
        if problems:
            raise UserError("; ".join(problems))


class Segmenter:
    """A trained model plus class prompts: images in, label maps (and scores) out."""

    def __init__(
        self,
        model,
        classes: list[list[str]],
        templates: list[str],
        cfg: InferConfig,
        background: bool = False,
    ) -> None:
        self.model, self.cfg, self.background = model, cfg, background
        self.device = next(model.parameters()).device
        named = classes[1:] if background else classes  # background is a threshold, not a prompt
        self.names = [n for names in named for n in names]
        owner = [c for c, names in enumerate(named) for _ in names]
        self.groups = [
            torch.tensor([k for k, o in enumerate(owner) if o == c], device=self.device)
            for c in range(len(named))
        ]  # the names of each class
        self.num_classes = len(named)
        emb = model.backbone.encode_text([t.format(n) for n in self.names for t in templates])
        self.text = (
            emb.view(len(self.names), len(templates), -1).mean(1).to(self.device)
        )  # (names, d)

    def _to_tensor(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        return x.to(self.device)

    def _resize(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = self.cfg.short_side / min(w, h)
        p = self.model.backbone.patch_size
        if self.cfg.mode == "whole":  # the whole image must tile into patches
            return img.resize(
                (max(p, round(w * s / p) * p), max(p, round(h * s / p) * p)), Image.BICUBIC
            )
        return img.resize(
            (max(self.cfg.window, round(w * s)), max(self.cfg.window, round(h * s))), Image.BICUBIC
        )

    def _crops(self, H: int, W: int) -> list[tuple[int, int, int, int]]:
        win, st = self.cfg.window, self.cfg.stride
        rows = max(H - win + st - 1, 0) // st + 1
        cols = max(W - win + st - 1, 0) // st + 1
        boxes = []
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * st + win, H), min(c * st + win, W)
                boxes.append((max(y2 - win, 0), max(x2 - win, 0), y2, x2))
        return boxes

    @torch.no_grad()
    def class_logits(self, img: Image.Image, out_size: tuple[int, int]) -> torch.Tensor:
        """(C, H, W) logits at ``out_size`` (H, W), each class its best name."""
        x = self._to_tensor(self._resize(img))  # (3, H', W')
        H, W = x.shape[-2:]
        if self.cfg.mode == "whole":
            logits = self.model.segment(x[None], self.text, self.cfg.chunk)[0]  # (names, H', W')
        else:
            boxes = self._crops(H, W)
            crops = torch.stack([x[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
            out = self.model.segment(crops, self.text, self.cfg.chunk)  # (crops, names, win, win)
            logits = torch.zeros(len(self.names), H, W, device=self.device)
            count = torch.zeros(1, H, W, device=self.device)
            for (y1, x1, y2, x2), o in zip(boxes, out, strict=True):
                logits[:, y1:y2, x1:x2] += o
                count[:, y1:y2, x1:x2] += 1
            logits = logits / count
        logits = F.interpolate(
            logits[None].float(), size=out_size, mode="bilinear", align_corners=False
        )[0]
        return torch.stack([logits[idx].amax(0) for idx in self.groups])  # a class is its best name

    def predict(
        self, img: Image.Image, out_size: tuple[int, int]
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Label map (H, W) and class activations (C, H, W)."""
        act = torch.sigmoid(self.class_logits(img, out_size))
        pred = act.argmax(0)
        if self.background:
            pred = torch.where(act.max(0).values < self.cfg.bg_threshold, 0, pred + 1)
        return pred.cpu().numpy(), act
