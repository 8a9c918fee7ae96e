"""The evaluation protocols: two common ones of the zero-shot segmentation literature, and
each method's own.

| setting            | ``tcl`` (TCL, GroupViT; SynSeg's tables)  | ``sclip`` (SCLIP, NACLIP, ClearCLIP, ProxyCLIP) |
|--------------------|-------------------------------------------|--------------------------------------------|
| resize             | short side 448, long side at most 2048    | short side 336 (560 for Cityscapes), long at most 2048 |
|                    | (mmcv's keep-ratio rescale, bilinear)     | (the same rescale)                          |
| sliding window     | 448, stride 224                           | 224, stride 112                             |
| averaged over windows | probabilities                          | scores (logits, or cosines), softmax after |
| prompts            | TCL's 9 templates (``tcl9``)              | CLIP's 80 ImageNet templates (``imagenet80``) |
| class names        | MMSegmentation's raw ``CLASSES`` (TCL's   | SCLIP's ``cls_*.txt``: every name of a class,  |
|                    | own for VOC-20, COCO-Object), one a class | a class is its best name                    |
| background         | a constant channel: 0.5, or 0.4 with PAMR | its names prompted (SCLIP's line 0), and    |
|                    |                                           | ``prob_thd`` 0.1 on VOC, Context-60, COCO-Object |
| PAMR (``--pamr``)  | per window, dilations 1-24                | on the whole image, dilations 8, 16         |

``ovsegmentor`` is OVSegmentor's own (its section 4.1): ``tcl``'s geometry and names, CLIP's
ImageNet templates, and a background threshold per dataset (VOC 0.9, Context-60 0.35,
COCO-Object 0.9, ADE 0.95).

The common protocols run every method under one harness, for side-by-side tables. ``native``
scores each method as its own authors do: a training-free method with its repository's config
of that benchmark (``trainer.methods.training_free.native_config``: per dataset its short side,
windows or the whole image, temperature, ``prob_thd``, SCLIP's area threshold, PAMR and class
files), a trained method under the common protocol its paper reports (SynSeg: ``tcl``).

The names are the peers' own files (``trainer/eval/classnames/tcl``, ``.../sclip``,
``.../clearclip``, tied to them by ``tests/test_peer_configs.py``); ``--names project`` prompts
this project's (``trainer/eval/classnames/<dataset>.txt``) with background as a threshold only.
Every setting can be overridden on the command line, and the result file records the values
used. On the synthetic world, whose images are made for a 64-px model, every size is scaled
by (the backbone's input size / 224): the same geometry relative to the model as a 224-px
CLIP has on the real benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from synseg.errors import UserError
from trainer.eval.pamr import SCLIP_DILATIONS, TCL_DILATIONS


@dataclass(frozen=True)
class Protocol:
    name: str
    short_side: int
    long_side: int
    window: int
    stride: int
    templates: str
    average: str  # "prob": probabilities averaged over windows; "score": scores, then softmax
    synonyms: bool  # every name of a class, or only its first
    bg_threshold: float
    bg_threshold_pamr: float
    pamr_on: str  # "window" or "image"
    pamr_dilations: tuple[int, ...]
    names: str  # the peers' class names it prompts: trainer/eval/classnames/<names>/
    prompt_background: bool  # background's names prompted as a class (a threshold besides)
    short_side_city: int = 0  # Cityscapes' own short side (0: the same)
    mode: str = "slide"  # slide or whole
    logit_scale: float = 0.0  # softmax temperature of cosine scores (0: the method's own)
    area_threshold: float = 0.0  # SCLIP's area_thd (0: none)
    pamr_default: bool = False  # PAMR on unless --no-pamr
    source: str = ""  # where a native protocol's values come from
    # a dataset's own background threshold, over ``bg_threshold`` (dataset, value) pairs
    bg_by_dataset: tuple[tuple[str, float], ...] = ()


PROTOCOLS = {
    "tcl": Protocol(
        "tcl",
        short_side=448,
        long_side=2048,
        window=448,
        stride=224,
        templates="tcl9",
        average="prob",
        synonyms=False,
        bg_threshold=0.5,
        bg_threshold_pamr=0.4,
        pamr_on="window",
        pamr_dilations=TCL_DILATIONS,
        names="tcl",
        prompt_background=False,
    ),
    "sclip": Protocol(
        "sclip",
        short_side=336,
        long_side=2048,
        window=224,
        stride=112,
        templates="imagenet80",
        average="score",
        synonyms=True,
        bg_threshold=0.1,
        bg_threshold_pamr=0.1,
        pamr_on="image",
        pamr_dilations=SCLIP_DILATIONS,
        names="sclip",
        prompt_background=True,
        short_side_city=560,
    ),
    # OVSegmentor's section 4.1 (GroupViT's harness): short side 448, GroupViT's background
    # thresholds per dataset; its public configs slide 448-px windows at stride 224 and set
    # 0.95 for VOC (segmentation/configs/_base_/datasets/pascal_voc12.py) where the paper says
    # 0.9. Templates: CLIP's ImageNet ones, as GroupViT's harness prompts.
    "ovsegmentor": Protocol(
        "ovsegmentor",
        short_side=448,
        long_side=2048,
        window=448,
        stride=224,
        templates="imagenet80",
        average="prob",
        synonyms=False,
        bg_threshold=0.5,
        bg_threshold_pamr=0.5,
        pamr_on="window",
        pamr_dilations=TCL_DILATIONS,
        names="tcl",
        prompt_background=False,
        bg_by_dataset=(("voc", 0.9), ("context60", 0.35), ("object", 0.9), ("ade", 0.95)),
        source="OVSegmentor (CVPR 2023) section 4.1",
    ),
}


NAMES = (*PROTOCOLS, "native")


def check_protocol(name: str) -> None:
    if name not in NAMES:
        raise UserError(f"unknown --protocol {name!r}; choose from {', '.join(NAMES)}")


def get_protocol(name: str, method: str | None = None, dataset: str | None = None) -> Protocol:
    """The protocol ``name``; ``native`` is ``method``'s own on ``dataset``."""
    check_protocol(name)
    if name != "native":
        p = PROTOCOLS[name]
        own = dict(p.bg_by_dataset).get(dataset)
        return p if own is None else replace(p, bg_threshold=own, bg_threshold_pamr=own)
    if method is None or dataset is None:
        raise ValueError("the native protocol is a method's on a dataset")
    from trainer import methods

    own = methods.native(method, dataset)
    if isinstance(own, str):  # a trained method: the protocol its paper reports under
        return replace(
            get_protocol(own, method, dataset),
            name="native",
            source=f"{method}'s paper: the {own} protocol",
        )
    return Protocol(
        "native",
        short_side=own.short_side,
        long_side=own.long_side,
        window=own.window or own.short_side,  # unused in whole-image mode
        stride=own.stride or own.short_side,
        templates=own.templates,
        average="score",
        synonyms=True,
        bg_threshold=own.prob_thd,
        bg_threshold_pamr=own.prob_thd,
        pamr_on="image",
        pamr_dilations=own.pamr_dilations,
        names=own.names,
        prompt_background=True,
        mode="slide" if own.window else "whole",
        logit_scale=own.logit_scale,
        area_threshold=own.area_thd,
        pamr_default=own.pamr,
        source=own.source,
    )


def geometry(p: Protocol, dataset: str, model_size: int) -> tuple[int, int, int, int]:
    """(short side, long side, window, stride) of protocol ``p`` on ``dataset``."""
    short = p.short_side_city if dataset == "city" and p.short_side_city else p.short_side
    sizes = (short, p.long_side, p.window, p.stride)
    if not dataset.startswith("world"):
        return sizes
    return tuple(max(1, round(s * model_size / 224)) for s in sizes)
