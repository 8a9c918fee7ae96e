"""Zero-shot inference: class prompts -> per-pixel class probabilities -> a label map.

Per image: rescale keeping the aspect ratio so the short side is ``short_side`` and the long
side at most ``long_side`` (mmcv's ``imrescale``: the smaller of the two factors, sizes rounded
half up, OpenCV's bilinear resize), then slide a ``window`` with ``stride`` as
MMSegmentation's ``slide_inference`` does (the last window of a row or column shifted back
inside the image; a side shorter than the window is taken whole), or run the whole image.

Each window gives a score per class name, from the method's scorer (``trainer.methods.base.Scorer``):
the decoder's logit (``synseg``, ``clipseg``), a training-free method's cosine, a ViL-Seg cluster's
cosine. The scorer turns scores into probabilities: a logit's sigmoid, or the softmax over all
names of a temperature times the cosines. ``average="prob"``
averages the windows' probabilities (TCL's protocol); ``average="score"`` averages their scores
and converts the average (the SCLIP family's). The average is resized (bilinear) to the
label's size, a class takes its best name, and, on datasets with a background, a pixel is
background where no class's probability is above ``bg_threshold``. PAMR (``pamr="window"`` or
``"image"``) refines each window's map, or the whole image's averaged map, against the
normalised image. The protocols in ``trainer.eval.protocols`` set all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from synseg.errors import UserError
from trainer.eval.pamr import TCL_DILATIONS, pamr

TEMPLATES_DIR = Path(__file__).parent / "templates"


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot prompt a class name (None if it can): it must hold exactly one
    ``{}`` and no other replacement field (``{name}``, ``{0}``, a lone brace)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"{template!r} is not a template ({e}; write a literal brace as {{{{ or }}}})"
    if fields != [""]:
        return f"{template!r} needs exactly one {{}} where the class name goes, and no other field"
    return None


def read_templates(name_or_path: str) -> list[str]:
    path = Path(name_or_path)
    if not path.is_file():
        path = TEMPLATES_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TEMPLATES_DIR.glob("*.txt")))
        raise UserError(f"prompt templates {name_or_path!r} not found (a file, or one of: {known})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt templates {path} are not UTF-8 text") from None
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    if not lines:
        raise UserError(f"{path}: no templates (one a line, with {{}} where the class name goes)")
    for t in lines:
        if problem := template_problem(t):
            raise UserError(f"{path}: {problem}")
    return lines


def rescale_size(width: int, height: int, short: int, long: int) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for ``scale=(long, short)``: (new width, new height)."""
    factor = short / min(width, height)
    if long:
        factor = min(factor, long / max(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_bilinear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """mmcv's ``imresize`` (OpenCV, bilinear) of an (H, W, 3) uint8 image."""
    import cv2

    if img.shape[1] == width and img.shape[0] == height:
        return img
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)


def window_boxes(H: int, W: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """MMSegmentation's sliding-window grid: (y1, x1, y2, x2) of every window."""
    rows = max(H - window + stride - 1, 0) // stride + 1
    cols = max(W - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, H), min(c * stride + window, W)
            boxes.append((max(y2 - window, 0), max(x2 - window, 0), y2, x2))
    return boxes


@dataclass
class InferConfig:
    mode: str = "slide"  # slide or whole
    short_side: int = 448  # images are rescaled so their short side is this...
    long_side: int = 2048  # ...and their long side at most this (0: no cap)
    window: int = 448  # sliding window side
    stride: int = 224  # sliding window stride
    average: str = "prob"  # what overlapping windows average: prob or score
    bg_threshold: float = 0.5  # background where no class probability is above this
    # SCLIP's area_thd: a class given no more than this share of the pixels not background is
    # dropped, and those pixels labelled again (0: none; datasets with a background only)
    area_threshold: float = 0.0
    synonyms: bool = True  # every name of a class (its best scores), or only the first
    pamr: str = "off"  # off, window (each window's map) or image (the averaged map)
    pamr_iters: int = 10
    pamr_dilations: tuple[int, ...] = field(default_factory=lambda: TCL_DILATIONS)
    logit_scale: float = 0.0  # softmax temperature of cosine scores (0: the method's own)
    chunk: int = 256  # (crop, prompt) pairs per decoder call
    crops_per_pass: int = 8  # windows through the backbone at once

    def __post_init__(self) -> None:
        self.pamr_dilations = tuple(self.pamr_dilations)
        problems = []
        if self.mode not in ("slide", "whole"):
            problems.append("--mode must be slide or whole")
        if self.short_side < 16 or self.window < 16 or not 0 < self.stride <= self.window:
            problems.append(
                f"--short-side and --window must be at least 16 and --stride at most --window "
                f"(here {self.short_side}, {self.window} and {self.stride}; 0 gives the "
                "protocol's value)"
            )
        if self.long_side and self.long_side < self.short_side:
            problems.append("--long-side must be 0 (no cap) or at least --short-side")
        if self.average not in ("prob", "score"):
            problems.append("--average must be prob or score")
        if self.pamr not in ("off", "window", "image"):
            problems.append("pamr must be off, window or image")
        if not 0 <= self.bg_threshold <= 1:
            problems.append("--bg-threshold must be in [0, 1]")
        if not 0 <= self.area_threshold < 1:
            problems.append(f"--area-threshold must be in [0, 1), not {self.area_threshold}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale >= 0):
            problems.append(
                f"--logit-scale must be a finite number, at least 0 (0: the method's own), "
                f"not {self.logit_scale}"
            )
        if problems:
            raise UserError("; ".join(problems))


class Segmenter:
    """A method's scorer (``trainer.methods.scorer``) plus class prompts: images in, label maps
    and class probabilities out."""

    def __init__(
        self,
        scorer,
        classes: list[list[str]],
        templates: list[str],
        cfg: InferConfig,
        background: bool = False,
        prompt_background: bool = False,
    ) -> None:
        self.scorer, self.cfg, self.background = scorer, cfg, background
        self.prompt_background = background and prompt_background
        self.device = scorer.mean.device
        # Background is a threshold (TCL's constant channel), or also a prompted class whose
        # names are those of line 0 (the SCLIP family's).
        named = classes[1:] if background and not prompt_background else classes
        if not cfg.synonyms:
            named = [names[:1] for names in named]
        self.names = [n for names in named for n in names]
        owner = [c for c, names in enumerate(named) for _ in names]
        self.groups = [
            torch.tensor([k for k, o in enumerate(owner) if o == c], device=self.device)
            for c in range(len(named))
        ]  # the names of each class
        self.num_classes = len(named)
        self.text = scorer.encode_classes(self.names, templates).to(self.device)

    # ------------------------------------------------------------------ pieces

    def _array(self, img: Image.Image) -> np.ndarray:
        """The image as the protocol rescales it, (H, W, 3) uint8."""
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        w, h = rescale_size(img.width, img.height, self.cfg.short_side, self.cfg.long_side)
        if self.cfg.mode == "whole":
            p = self.scorer.patch_size
            if self.scorer.floors_whole:  # as it is: the patch convolution floors the grid
                w, h = max(p, w), max(p, h)
            else:  # the whole image must tile into patches
                w, h = max(p, round(w / p) * p), max(p, round(h / p) * p)
        return resize_bilinear(arr, w, h)

    def _window_scores(self, crops: torch.Tensor) -> torch.Tensor:
        """The scorer's scores of windows (n, 3, h, w); for a scorer that pads its windows, a
        window that is not a patch multiple is padded around its centre with the mean colour
        (zeros once normalised) and the scores cut back to it."""
        h, w = crops.shape[-2:]
        p = self.scorer.patch_size
        if self.cfg.mode == "whole" or not self.scorer.pads_windows or not (h % p or w % p):
            return self.scorer.scores(crops, self.text).float()
        t, ll = (-h % p) // 2, (-w % p) // 2
        padded = (
            self.scorer.mean.to(crops.dtype)
            .expand(crops.shape[0], 3, h + (-h % p), w + (-w % p))
            .clone()
        )
        padded[:, :, t : t + h, ll : ll + w] = crops
        return self.scorer.scores(padded, self.text).float()[:, :, t : t + h, ll : ll + w]

    def _refine(self, image01: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """PAMR of maps (n, names, h, w) against images (n, 3, H, W) in [0, 1]."""
        mean, std = self.scorer.mean, self.scorer.std  # what the backbone sees
        image = (image01 - mean.to(image01.dtype)) / std.to(image01.dtype)
        return pamr(image, maps, self.cfg.pamr_iters, self.cfg.pamr_dilations)

    # ------------------------------------------------------------------ the map

    @torch.no_grad()
    def name_probs(self, img: Image.Image, out_size: tuple[int, int]) -> torch.Tensor:
        """(names, H, W) probabilities at ``out_size`` (H, W)."""
        arr = self._array(img)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(self.device, torch.float32) / 255
        H, W = x.shape[-2:]
        if self.cfg.mode == "whole":
            boxes = [(0, 0, H, W)]
        else:
            boxes = window_boxes(H, W, self.cfg.window, self.cfg.stride)
        prob_avg = self.cfg.average == "prob"
        acc = torch.zeros(len(self.names), H, W, device=self.device)
        count = torch.zeros(1, H, W, device=self.device)
        step = max(1, self.cfg.crops_per_pass)
        for i in range(0, len(boxes), step):
            part = boxes[i : i + step]
            crops = torch.stack([x[:, y1:y2, x1:x2] for y1, x1, y2, x2 in part])
            maps = self._window_scores(crops)  # (n, names, h, w)
            if prob_avg:
                maps = self.scorer.probabilities(maps, 1)
            if self.cfg.pamr == "window":
                maps = self._refine(crops, maps)
            for (y1, x1, y2, x2), m in zip(part, maps, strict=True):
                acc[:, y1:y2, x1:x2] += m
                count[:, y1:y2, x1:x2] += 1
        avg = F.interpolate(
            (acc / count)[None], size=out_size, mode="bilinear", align_corners=False
        )
        if self.cfg.pamr == "image":
            full = F.interpolate(x[None], size=out_size, mode="bilinear", align_corners=False)
            avg = self._refine(full, avg)
        avg = avg[0]
        return avg if prob_avg else self.scorer.probabilities(avg, 0)

    def class_probs(self, img: Image.Image, out_size: tuple[int, int]) -> torch.Tensor:
        """(C, H, W): each class its best name's probability."""
        probs = self.name_probs(img, out_size)
        return torch.stack([probs[idx].amax(0) for idx in self.groups])

    def predict(
        self, img: Image.Image, out_size: tuple[int, int]
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Label map (H, W) and class probabilities (C, H, W)."""
        act = self.class_probs(img, out_size)
        if self.background and self.cfg.area_threshold:
            act = self._drop_small_classes(act)
        return self._labels(act).cpu().numpy(), act

    def _labels(self, act: torch.Tensor) -> torch.Tensor:
        """The label map of class probabilities (C, H, W), background's rule applied."""
        pred = act.argmax(0)
        if self.prompt_background:  # SCLIP: background where the best class is below prob_thd
            pred = torch.where(act.max(0).values < self.cfg.bg_threshold, 0, pred)
        elif self.background:  # a constant background channel first: it wins ties, as argmax does
            pred = torch.where(act.max(0).values <= self.cfg.bg_threshold, 0, pred + 1)
        return pred

    def _drop_small_classes(self, act: torch.Tensor) -> torch.Tensor:
        """SCLIP's ``area_thd``: the classes other than background that the label map gives
        no more than ``area_threshold`` of the pixels it gives to any of them get probability
        0, before background's threshold. SCLIP counts its argmax over every class, its prompted
        background included; with a constant background channel, the argmax over that
        channel and the classes (the label map) is counted."""
        first = 1 if self.prompt_background else 0  # act's channel of label value 1
        labels = act.argmax(0) if self.prompt_background else self._labels(act)
        areas = torch.bincount(labels.flatten(), minlength=act.shape[0] + 1 - first)[1:]
        keep = (areas > self.cfg.area_threshold * areas.sum()).to(act.dtype)
        act = act.clone()
        act[first:] *= keep[:, None, None]
        return act
