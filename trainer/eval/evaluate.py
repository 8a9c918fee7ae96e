"""eval: zero-shot mIoU of a checkpoint (or of an untrained model) on a validation split.

The result, with every setting that produced it, goes to ``eval-<dataset>.json`` and
``eval-<dataset>.md`` beside the checkpoint (``--output`` for an untrained model); another
method, protocol or PAMR adds to the name (``eval-voc-naclip-sclip-pamr.json``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.fsutil import atomic_path, write_json
from trainer.eval.datasets import open_dataset
from trainer.eval.infer import InferConfig, Segmenter, read_templates
from trainer.eval.methods import TRAINING_FREE, check_weights
from trainer.eval.metrics import IoUAccumulator
from trainer.eval.protocols import geometry, get_protocol


@dataclass
class EvalConfig:
    dataset: str
    data_root: str
    checkpoint: str | None = None  # a run or checkpoint folder; None: an untrained model
    preset: str = "tiny"  # the untrained model's settings (no checkpoint)
    decoder_init: str | None = None  # the untrained model's decoder weights (CLIPSeg or HF)
    overrides: tuple[str, ...] = ()  # the untrained model's settings, as ``group.field=value``
    classes: str | None = None  # class file (default: trainer/eval/classnames/<dataset>.txt)
    method: str = "synseg"  # synseg, clipseg or a training-free method (trainer.eval.methods)
    protocol: str = "tcl"  # tcl or sclip (trainer.eval.protocols): the defaults below
    pamr: bool = False  # PAMR refinement, where the protocol applies it
    # Each of these, when given, replaces the protocol's value.
    templates: str | None = None  # prompt templates: a name in trainer/eval/templates or a file
    mode: str = "slide"
    short_side: int = 0
    long_side: int | None = None  # 0: no cap
    window: int = 0
    stride: int = 0
    average: str | None = None  # prob or score
    bg_threshold: float | None = None
    synonyms: bool | None = None
    logit_scale: float = 0.0  # training-free methods' softmax temperature (0: the method's)
    limit: int = 0  # evaluate only the first N images (0: all)
    output: str | None = None  # where results go (default: beside the checkpoint)
    device: str = "auto"
    seed: int = 0  # fresh decoder weights of an untrained model

    def __post_init__(self) -> None:
        check_weights(self.method, self.checkpoint, self.decoder_init)
        get_protocol(self.protocol)
        problems = []
        for name in ("limit", "short_side", "window", "stride"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.bg_threshold is not None and not 0 <= self.bg_threshold <= 1:
            problems.append("--bg-threshold must be in [0, 1]")
        if problems:
            raise UserError("; ".join(problems))

    def inference(self, model_size: int) -> InferConfig:
        """The protocol's settings on this dataset, with every given override applied."""
        p = get_protocol(self.protocol)
        short, long, window, stride = geometry(p, self.dataset, model_size)
        thr = p.bg_threshold_pamr if self.pamr else p.bg_threshold

        def pick(given, default):
            return default if given is None else given

        window = self.window or (window if not self.short_side else min(window, self.short_side))
        return InferConfig(
            mode=self.mode,
            short_side=self.short_side or short,
            long_side=pick(self.long_side, long),
            window=window,
            stride=self.stride or min(stride, window),
            average=pick(self.average, p.average),
            bg_threshold=pick(self.bg_threshold, thr),
            synonyms=pick(self.synonyms, p.synonyms),
            pamr=p.pamr_on if self.pamr else "off",
            pamr_dilations=p.pamr_dilations,
            logit_scale=self.logit_scale,
        )


@dataclass
class EvalResult:
    dataset: str
    mIoU: float
    mAcc: float
    aAcc: float
    images: int
    images_per_second: float
    files: list[str] = field(default_factory=list)
    per_class: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(
    checkpoint: str | None,
    preset: str,
    decoder_init: str | None,
    device: torch.device,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
):
    """(model, its training config, checkpoint folder): a trained model, or an untrained one
    from a preset (a fresh decoder, or ``decoder_init``'s CLIPSeg weights; ``overrides`` as
    ``group.field=value``) when no checkpoint."""
    from trainer.model.synseg import SynSeg
    from trainer.train.config import resolve
    from trainer.train.loop import load_model

    if checkpoint:
        from trainer.train.checkpoint import find

        model, train_cfg = load_model(checkpoint, device)
        return model, train_cfg, find(checkpoint)
    extra = [f"model.decoder_init={decoder_init}"] if decoder_init else []
    train_cfg = resolve(preset, overrides=[*overrides, *extra])
    torch.manual_seed(seed)
    return SynSeg(train_cfg.model).to(device).eval(), train_cfg, None


def run_eval(
    cfg: EvalConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> EvalResult:
    device = resolve_device(cfg.device)
    data = open_dataset(cfg.dataset, cfg.data_root, cfg.classes, cfg.limit)
    model, train_cfg, ckpt = build_model(
        cfg.checkpoint, cfg.preset, cfg.decoder_init, device, cfg.seed, tuple(cfg.overrides)
    )
    infer = cfg.inference(model.backbone.train_size)
    templates = read_templates(cfg.templates or get_protocol(cfg.protocol).templates)
    seg = Segmenter(
        model, data.classes, templates, infer, background=data.spec.background, method=cfg.method
    )
    acc = IoUAccumulator(data.num_classes)
    if on_start:
        on_start(len(data.samples))
    t = time.time()
    for sample in data.samples:
        image, label = data.load(sample)
        pred, _ = seg.predict(image, label.shape)
        acc.add(pred, label)
        if on_advance:
            on_advance(1)
    rate = len(data.samples) / max(time.time() - t, 1e-9)
    names = [n[0] for n in data.classes]
    summary = acc.summary(names)

    out = Path(cfg.output) if cfg.output else (ckpt if ckpt is not None else Path("runs/untrained"))
    settings = {
        **asdict(cfg),
        "inference": asdict(infer),
        "templates_used": templates,
        "checkpoint_folder": str(ckpt) if ckpt else None,
        "model": train_cfg.model.__dict__ | {"taps": list(train_cfg.model.taps)},
        "normalisation": "clip" if cfg.method in TRAINING_FREE else model.normalisation,
        "torch": torch.__version__,
        "device": str(device),
    }
    record = {"dataset": cfg.dataset, **summary, "images_per_second": rate, "settings": settings}
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(cfg)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json(json_path, record)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(record))
    return EvalResult(
        cfg.dataset,
        summary["mIoU"],
        summary["mAcc"],
        summary["aAcc"],
        summary["images"],
        rate,
        [str(json_path), str(md_path)],
        summary["per_class"],
    )


def result_stem(cfg: EvalConfig) -> str:
    """eval-<dataset>, then -<method> unless synseg, -<protocol> unless tcl, -pamr with PAMR."""
    parts = [f"eval-{cfg.dataset}"]
    if cfg.method != "synseg":
        parts.append(cfg.method)
    if cfg.protocol != "tcl":
        parts.append(cfg.protocol)
    if cfg.pamr:
        parts.append("pamr")
    return "-".join(parts)


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        f"# Zero-shot segmentation: {record['dataset']}",
        "",
        f"mIoU **{_pct(record['mIoU'])}**, mAcc {_pct(record['mAcc'])}, aAcc {_pct(record['aAcc'])} "
        f"on {record['images']} images ({record['images_per_second']:.1f} images/s on {s['device']}).",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in (
        "checkpoint",
        "checkpoint_folder",
        "preset",
        "decoder_init",
        "method",
        "protocol",
        "pamr",
        "data_root",
        "classes",
        "templates",
        "limit",
        "normalisation",
    ):
        lines.append(f"| {key} | {s.get(key)} |")
    for key, value in s["inference"].items():
        lines.append(f"| inference.{key} | {value} |")
    lines.append(f"| prompts | {'; '.join(s['templates_used'])} |")
    lines += ["", "| class | IoU | Acc |", "|---|---|---|"]
    for name, v in record["per_class"].items():
        lines.append(f"| {name} | {_pct(v['IoU'])} | {_pct(v['Acc'])} |")
    return "\n".join(lines) + "\n"
