"""The Python entry point: a trained run, released weights or a training-free method, loaded
once and asked to segment any image with any class names.

    import trainer

    seg = trainer.load("runs/tiny")                       # a run or checkpoint folder
    labels, probs = seg.segment("photo.jpg", ["grass", "sky", "a red car"])

    seg = trainer.load(method="sclip", overrides=["model.pretrained=openai"], protocol="sclip")

``labels`` is an (H, W) array of class indices (with ``background=True``, 0 is background and
class ``i`` is ``i + 1``), ``probs`` the (classes, H, W) probabilities, both at the image's
size. The image is rescaled, windowed and scored as ``eval`` scores a benchmark under
``protocol`` (``trainer.eval.protocols``): ``dataset`` picks that protocol's sizes for a
benchmark (``world`` scales them to the model), and any ``InferConfig`` field given as a
keyword (``mode="whole"``, ``short_side=...``) replaces the protocol's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synseg.errors import UserError


class Segmenter:
    """A loaded model under a protocol: ``segment(image, classes) -> (labels, probabilities)``."""

    def __init__(self, scorer, infer, templates: list[str], method: str, train_cfg) -> None:
        self.scorer, self.infer, self.templates = scorer, infer, templates
        self.method, self.train_cfg = method, train_cfg
        self._prompted: dict[tuple, object] = {}  # class names -> their encoded prompts

    def segment(
        self,
        image: Image.Image | str | Path | np.ndarray,
        classes: Sequence[str | Sequence[str]],
        background: bool = False,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """(labels (H, W), probabilities (classes, H, W)) of ``image`` (a PIL image, a file, or
        an (H, W, 3) uint8 array). A class is a name or a list of synonyms (its best name
        scores it). ``background=True`` adds a background label 0 wherever no class's
        probability is above the protocol's threshold."""
        from trainer.eval.infer import Segmenter as Windows

        img = _image(image)
        names = tuple(tuple([c]) if isinstance(c, str) else tuple(c) for c in classes)
        if not names or any(not n or not all(isinstance(x, str) and x for x in n) for n in names):
            raise UserError("classes: give at least one class, each a name or a list of names")
        key = (names, background)
        if key not in self._prompted:
            prompts = [["background"], *map(list, names)] if background else list(map(list, names))
            self._prompted[key] = Windows(
                self.scorer, prompts, self.templates, self.infer, background=background
            )
        labels, probs = self._prompted[key].predict(img, (img.height, img.width))
        return labels, probs.cpu()


def load(
    run_or_checkpoint: str | Path | None = None,
    *,
    method: str | None = None,
    preset: str = "tiny",
    decoder_init: str | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    protocol: str = "tcl",
    dataset: str = "voc",
    templates: str | None = None,
    seed: int = 0,
    **inference,
) -> Segmenter:
    """A ``Segmenter``: the run's model and method (``run_or_checkpoint``), a training-free
    method on it or on a preset's frozen CLIP (``method``), or an untrained model of a preset
    (``decoder_init``: CLIPSeg weights; ``overrides`` as ``group.field=value``), scored as
    ``eval`` scores ``dataset`` under ``protocol``."""
    from trainer import methods
    from trainer.eval.evaluate import EvalConfig, build_model, check_weights, resolve_device
    from trainer.eval.infer import read_templates

    if method is not None:
        check_weights(
            method, None if run_or_checkpoint is None else str(run_or_checkpoint), decoder_init
        )
    fields = {"mode", "short_side", "long_side", "window", "stride", "average", "bg_threshold"}
    fields |= {"area_threshold", "synonyms", "logit_scale", "pamr"}
    unknown = sorted(set(inference) - fields)
    if unknown:
        raise UserError(
            f"load() takes no setting {', '.join(unknown)} (inference: {', '.join(sorted(fields))})"
        )
    dev = resolve_device(device)
    checkpoint = None if run_or_checkpoint is None else str(run_or_checkpoint)
    model, train_cfg, _, method = build_model(
        checkpoint, preset, decoder_init, dev, seed, tuple(overrides), method
    )
    cfg = EvalConfig(
        dataset,
        ".",
        checkpoint=checkpoint,
        decoder_init=decoder_init,
        method=method,
        protocol=protocol,
        templates=templates,
        **inference,
    )
    infer = cfg.inference(model.native_size, method)
    scorer = methods.scorer(method, model, train_cfg, infer)
    chosen = read_templates(templates or cfg.protocol_of(method).templates)
    return Segmenter(scorer, infer, chosen, method, train_cfg)


def _image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(
                f"an image array must be (H, W, 3) uint8, not {image.shape} {image.dtype}"
            )
        return Image.fromarray(image)
    try:
        return Image.open(image).convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {image}: {e}") from None
