"""eval: zero-shot mIoU of a checkpoint (or of an untrained model) on a validation split.

The method is the run's (``trainer.methods``), or one named by ``method``: a training-free
method on the run's frozen CLIP, or an untrained model of a preset. The result, with every
setting that produced it, goes to ``eval-<dataset>.json`` and ``eval-<dataset>.md`` beside
the checkpoint (``--output`` for an untrained model); another method, protocol, PAMR, subset
or ``--limit`` names both method and protocol and adds the rest
(``eval-voc-naclip-sclip-pamr.json``, ``result_stem``), and a name that holds a different
evaluation is never replaced. ``subset`` also scores a subset of the classes (ViL-Seg's
unseen classes: ``trainer/eval/subsets``), with all classes as candidates (``gzsl``) or only
the subset's (``zsl``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from synseg.errors import UserError
from synseg.fsutil import atomic_path, write_json
from trainer import methods
from trainer.eval.datasets import CLASSNAMES, Dataset, open_dataset, read_classnames
from trainer.eval.infer import InferConfig, Segmenter, read_templates
from trainer.eval.metrics import IGNORE, IoUAccumulator
from trainer.eval.protocols import Protocol, check_protocol, geometry, get_protocol

SUBSETS = Path(__file__).parent / "subsets"
SUBSET_MODES = ("gzsl", "zsl")
NAMES = ("protocol", "project")


@dataclass
class EvalConfig:
    dataset: str  # voc, voc20, context, context60, object, stuff, city, ade or world
    data_root: str  # the dataset's folder (MMSegmentation's layout)
    checkpoint: str | None = None  # run or checkpoint folder (none: an untrained model)
    preset: str = "tiny"  # the untrained model's settings, when there is no --checkpoint
    decoder_init: str | None = None  # the untrained model's decoder weights (CLIPSeg or HF)
    overrides: tuple[str, ...] = ()  # an untrained model's setting, e.g. model.normalise=clip
    classes: str | None = None  # class file: one class a line, ', ' between synonyms
    method: str | None = None  # what scores (synseg-train methods): the checkpoint's own by default
    protocol: str = "tcl"  # tcl, sclip (common to every method) or native (each method's own)
    pamr: bool | None = None  # PAMR refinement, where the protocol applies it (default: its own)
    names: str = "protocol"  # prompted class names: protocol (the peers' files) or project
    # Each of these, when given, replaces the protocol's value.
    templates: str | None = None  # prompt templates: tcl9, imagenet80, clip7, single or a file
    mode: str | None = None  # slide or whole (default: the protocol's)
    short_side: int = 0  # short side after resizing (0: the protocol's)
    long_side: int | None = None  # cap on the long side (0: none; default: the protocol's)
    window: int = 0  # sliding window (0: the protocol's)
    stride: int = 0  # sliding stride (0: the protocol's)
    average: str | None = None  # what windows average: prob or score (default: the protocol's)
    bg_threshold: float | None = None  # background where no class probability is above this
    area_threshold: float | None = None  # drop a class with no more of the foreground (SCLIP's)
    synonyms: bool | None = None  # every name of a class, or its first (default: the protocol's)
    logit_scale: float = 0.0  # softmax temperature of cosines (0: the protocol's or method's)
    limit: int = 0  # only the first N images (0: all)
    subset: str | None = None  # also score a class subset: vilseg-unseen, or a file
    subset_mode: str = "gzsl"  # gzsl: every class a candidate; zsl: only the subset's
    output: str | None = None  # folder for the result files (default: beside the checkpoint)
    device: str = "auto"  # auto, cpu or cuda
    seed: int = 0  # the untrained model's decoder weights are drawn from this seed

    def __post_init__(self) -> None:
        if self.method is not None:
            check_weights(self.method, self.checkpoint, self.decoder_init)
        check_protocol(self.protocol)
        if self.protocol == "native" and self.method is not None:
            self.protocol_of(self.method)  # one line now for a method or dataset it lacks
        problems = []
        if self.names not in NAMES:
            problems.append(f"--names must be one of {', '.join(NAMES)}")
        if self.subset_mode not in SUBSET_MODES:
            problems.append(f"--subset-mode must be one of {', '.join(SUBSET_MODES)}")
        for name in ("limit", "short_side", "window", "stride"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.bg_threshold is not None and not 0 <= self.bg_threshold <= 1:
            problems.append("--bg-threshold must be in [0, 1]")
        if self.area_threshold is not None and not 0 <= self.area_threshold < 1:
            problems.append(f"--area-threshold must be in [0, 1), not {self.area_threshold}")
        if problems:
            raise UserError("; ".join(problems))

    def protocol_of(self, method: str | None) -> Protocol:
        """The protocol on this dataset (``native``: ``method``'s own)."""
        return get_protocol(self.protocol, method, self.dataset)

    def uses_pamr(self, method: str | None = None) -> bool:
        return self.protocol_of(method).pamr_default if self.pamr is None else self.pamr

    def inference(self, model_size: int, method: str | None = None) -> InferConfig:
        """The protocol's settings on this dataset (``native``: ``method``'s own), with every
        given override applied."""
        p = self.protocol_of(method)
        pamr = self.uses_pamr(method)
        short, long, window, stride = geometry(p, self.dataset, model_size)
        thr = p.bg_threshold_pamr if pamr else p.bg_threshold

        def pick(given, default):
            return default if given is None else given

        window = self.window or (window if not self.short_side else min(window, self.short_side))
        return InferConfig(
            mode=self.mode or p.mode,
            short_side=self.short_side or short,
            long_side=pick(self.long_side, long),
            window=window,
            stride=self.stride or min(stride, window),
            average=pick(self.average, p.average),
            bg_threshold=pick(self.bg_threshold, thr),
            area_threshold=pick(self.area_threshold, p.area_threshold),
            synonyms=pick(self.synonyms, p.synonyms),
            pamr=p.pamr_on if pamr else "off",
            pamr_dilations=p.pamr_dilations,
            logit_scale=self.logit_scale or p.logit_scale,
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
    subset: dict | None = None  # mIoU and pixel accuracy of the class subset, when one is scored
    method: str = ""  # what scored (the checkpoint's own method unless another was named)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_weights(method: str, checkpoint: str | None, decoder_init: str | None) -> None:
    """One line for a method that is unknown, or that the given weights cannot serve."""
    if methods.info(method).kind == "weights" and (checkpoint or not decoder_init):
        raise UserError(
            f"--method {method} scores released weights: give --decoder-init "
            "(CLIPSeg or Hugging Face weights) and no --checkpoint"
        )


def build_model(
    checkpoint: str | None,
    preset: str,
    decoder_init: str | None,
    device: torch.device,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    method: str | None = None,
):
    """(model, its training config, checkpoint folder, method): a trained model and its
    method (or ``method``, when it is training-free), or, with no checkpoint, an untrained model
    of ``method`` (SynSeg's by default) from a preset (``decoder_init``: CLIPSeg weights for its
    decoder; ``overrides`` as ``group.field=value``)."""
    from trainer.train.checkpoint import find, load_model
    from trainer.train.config import resolve

    kind = methods.info(method).kind if method else None
    if checkpoint:
        model, train_cfg = load_model(checkpoint, device)
        if method and kind != "training-free" and method != train_cfg.method:
            raise UserError(
                f"{checkpoint} is a {train_cfg.method} run; --method {method} cannot score it "
                f"(leave --method out, or name a training-free method to run on its CLIP)"
            )
        return model, train_cfg, find(checkpoint), method or train_cfg.method
    owner = None  # the trained method whose model to build (None: the preset's, SynSeg's)
    if kind in ("trained", "weights"):
        owner = methods.info(method).model or method
    extra = [f"model.decoder_init={decoder_init}"] if decoder_init else []
    train_cfg = resolve(preset, overrides=[*overrides, *extra], method=owner)
    torch.manual_seed(seed)
    model = methods.trained(train_cfg.method).build(train_cfg.model).to(device).eval()
    return model, train_cfg, None, method or train_cfg.method


def read_subset(name_or_path: str, dataset: str, classes: list[list[str]]) -> list[int]:
    """The class indices (label values) a subset names for ``dataset``: a JSON file of
    ``{dataset: [class names]}`` (``trainer/eval/subsets/<name>.json``), or a text file of one
    class name a line; a name matches any synonym of a class."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SUBSETS / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SUBSETS.glob("*.json")))
        raise UserError(f"class subset {name_or_path!r} not found (a file, or one of: {known})")
    if path.suffix == ".json":
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"class subset {path} cannot be read: {e}") from None
        if dataset not in table:
            listed = ", ".join(k for k in table if not k.startswith("_"))
            raise UserError(
                f"class subset {path.name} has no classes of {dataset} (it has {listed})"
            )
        names = table[dataset]
    else:  # a class file: every name on its lines
        names = [n for line in read_classnames(path) for n in line]
    index = {n: i for i, syn in enumerate(classes) for n in syn}
    unknown = [n for n in names if n not in index]
    if unknown or not names:
        raise UserError(
            f"class subset {path.name}: {', '.join(unknown) or 'no classes'} "
            f"{'is' if len(unknown) == 1 else 'are'} not a class of {dataset}"
        )
    return sorted({index[n] for n in names})


def zsl_table(keep: list[int]) -> np.ndarray:
    """The lookup table from a dataset's label values to the subset's (0..len(keep)-1), every
    other pixel ignored (255): the zero-shot setting where only the subset is predicted."""
    lut = np.full(256, IGNORE, dtype=np.int64)
    lut[keep] = np.arange(len(keep))
    return lut


def subset_scores(acc: IoUAccumulator, keep: list[int], names: list[str]) -> dict:
    """mIoU over the classes ``keep`` and their pixel accuracy (pixels of those classes that
    were predicted right, over all their pixels)."""
    iou = acc.iou()[keep]
    area = acc.label_area[keep].sum()
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(acc.intersect[keep].sum() / area) if area else float("nan"),
        "classes": [names[i] for i in keep],
    }


@dataclass
class Scoring:
    """What scores an evaluation: the model and method, the protocol resolved for them, and
    the segmenter that prompts the classes."""

    model: torch.nn.Module
    train_cfg: object
    checkpoint: Path | None
    method: str
    protocol: Protocol
    infer: InferConfig
    templates: list[str]
    names_file: Path | None  # the peers' class file prompted (None: the dataset's own)
    classes: list[list[str]]  # each scored class's prompted names
    segmenter: Segmenter
    lut: np.ndarray | None  # label values to the subset's (zsl), or None


def _check_background_options(cfg: EvalConfig, data: Dataset, background: bool) -> None:
    for given, option in ((cfg.bg_threshold, "bg"), (cfg.area_threshold, "area")):
        if given is not None and not background:
            raise UserError(
                f"--{option}-threshold sets when a pixel is background, and {cfg.dataset}"
                f"{' under --subset-mode zsl' if data.spec.background else ''} has no "
                "background class: leave it out"
            )


def scoring(
    cfg: EvalConfig, data: Dataset, keep: list[int] | None, device, built: tuple | None = None
) -> Scoring:
    """The model, protocol and segmenter ``cfg`` scores ``data`` with (``keep``: a subset;
    ``built``: the (model, its TrainConfig, checkpoint folder, method) to score, else the one
    ``cfg`` names)."""
    zsl = keep is not None and cfg.subset_mode == "zsl"
    background = data.spec.background and not zsl
    _check_background_options(cfg, data, background)
    model, train_cfg, ckpt, method = built or build_model(
        cfg.checkpoint,
        cfg.preset,
        cfg.decoder_init,
        device,
        cfg.seed,
        tuple(cfg.overrides),
        cfg.method,
    )
    protocol = cfg.protocol_of(method)
    classes, names_file = prompted_names(cfg, data, protocol)
    prompt_background = protocol.prompt_background and names_file is not None
    lut = None
    if zsl:
        classes, lut = [classes[i] for i in keep], zsl_table(keep)
    infer = cfg.inference(model.native_size, method)
    templates = read_templates(cfg.templates or protocol.templates)
    scorer = methods.scorer(method, model, train_cfg, infer)
    seg = Segmenter(scorer, classes, templates, infer, background, prompt_background)
    return Scoring(
        model, train_cfg, ckpt, method, protocol, infer, templates, names_file, classes, seg, lut
    )


@torch.no_grad()
def validate(model, train_cfg, dataset: str, data_root: str, limit: int = 0, protocol: str = "tcl"):
    """mIoU, mAcc and aAcc of an in-memory model of ``train_cfg``'s method on a benchmark, as
    ``eval`` scores it (the training loop's ``run.val_every``)."""
    device = next(model.parameters()).device
    cfg = EvalConfig(dataset, data_root, protocol=protocol, limit=limit, device=str(device))
    data = open_dataset(dataset, data_root, None, limit)
    sc = scoring(cfg, data, None, device, built=(model, train_cfg, None, train_cfg.method))
    acc, _ = _score(sc.segmenter, data, len(sc.classes), None, None, None)
    summary = acc.summary([c[0] for c in data.classes])
    return {k: summary[k] for k in ("mIoU", "mAcc", "aAcc", "images")}


def run_eval(
    cfg: EvalConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> EvalResult:
    device = resolve_device(cfg.device)
    data = open_dataset(cfg.dataset, cfg.data_root, cfg.classes, cfg.limit)
    keep = read_subset(cfg.subset, cfg.dataset, data.classes) if cfg.subset else None
    sc = scoring(cfg, data, keep, device)
    n_classes = len(sc.classes)
    acc, rate = _score(sc.segmenter, data, n_classes, sc.lut, on_start, on_advance)
    # Results are keyed by this project's names, whatever was prompted.
    names = [data.classes[i][0] for i in (keep if sc.lut is not None else range(n_classes))]
    summary = acc.summary(names)
    if keep is not None:
        scored = list(range(len(keep))) if sc.lut is not None else keep
        summary["subset"] = {
            "name": cfg.subset,
            "mode": cfg.subset_mode,
            **subset_scores(acc, scored, names),
        }
    record = {
        "dataset": cfg.dataset,
        **summary,
        "images_per_second": rate,
        "settings": _settings(cfg, sc, device),
    }
    out = cfg.output or sc.checkpoint or "runs/untrained"
    own = sc.method == sc.train_cfg.method  # the model's own method, not a training-free one
    stem = result_stem(cfg, sc.method, own, sc.infer.pamr != "off")
    files = _write(Path(out), stem, record)
    return EvalResult(
        cfg.dataset,
        summary["mIoU"],
        summary["mAcc"],
        summary["aAcc"],
        summary["images"],
        rate,
        files,
        summary["per_class"],
        summary.get("subset"),
        sc.method,
    )


def _settings(cfg: EvalConfig, sc: Scoring, device) -> dict:
    """Every setting that produced a result, as its file records them."""
    kind = methods.info(sc.method).kind
    return {
        **asdict(cfg),
        "method": sc.method,
        "inference": asdict(sc.infer),
        "templates_used": sc.templates,
        "names_file": str(sc.names_file) if sc.names_file else None,
        "prompt_background": sc.segmenter.prompt_background,
        "protocol_source": sc.protocol.source or None,
        "logit_scale_used": getattr(sc.segmenter.scorer, "scale", None),
        "checkpoint_folder": str(sc.checkpoint) if sc.checkpoint else None,
        "model": asdict(sc.train_cfg.model),
        "normalisation": "clip" if kind == "training-free" else sc.model.normalisation,
        "torch": torch.__version__,
        "device": str(device),
    }


def prompted_names(
    cfg: EvalConfig, data: Dataset, protocol: Protocol
) -> tuple[list[list[str]], Path | None]:
    """The names each class is prompted by, and the peers' file they come from (None: the
    dataset's own class file or ``--classes``): ``--names protocol`` takes the protocol's
    (``trainer/eval/classnames/<protocol names>/<dataset>.txt``) where it has one."""
    path = CLASSNAMES / protocol.names / f"{cfg.dataset}.txt"
    if cfg.classes or cfg.names == "project" or not path.is_file():
        return data.classes, None
    prompts = read_classnames(path)
    if len(prompts) != len(data.classes):  # the shipped files are tied to the datasets by tests
        raise UserError(f"{path} has {len(prompts)} classes; {cfg.dataset} has {len(data.classes)}")
    return prompts, path


def _score(seg: Segmenter, data: Dataset, num_classes: int, lut, on_start, on_advance):
    """(the accumulated areas, images/s) of the segmenter over the dataset's samples; ``lut``
    maps label values first (the zero-shot subset setting)."""
    acc = IoUAccumulator(num_classes)
    if on_start:
        on_start(len(data.samples))
    t = time.time()
    for sample in data.samples:
        image, label = data.load(sample)
        if lut is not None:
            label = lut[label]
        pred, _ = seg.predict(image, label.shape)
        acc.add(pred, label)
        if on_advance:
            on_advance(1)
    return acc, len(data.samples) / max(time.time() - t, 1e-9)


# Settings that do not make another evaluation: where it ran and how the checkpoint was named.
SAME_EVALUATION_IGNORES = ("checkpoint", "output", "device", "torch")


def _same_evaluation(path: Path, settings: dict) -> bool:
    """Whether the result file ``path`` holds an evaluation with these settings (so a rerun
    may replace it); an unreadable file is kept too."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return False

    def key(s: dict) -> dict:
        return {k: v for k, v in s.items() if k not in SAME_EVALUATION_IGNORES}

    return key(old) == key(json.loads(json.dumps(settings, default=str)))


def _write(out: Path, stem: str, record: dict) -> list[str]:
    """The result as ``<stem>.json`` and ``.md``; where that name holds another evaluation
    (other templates, classes, windows, ...), as ``<stem>-2``, ``-3``, ...: a result is never
    replaced by a different one."""
    out.mkdir(parents=True, exist_ok=True)
    name, n = stem, 1
    while (out / f"{name}.json").exists() and not _same_evaluation(
        out / f"{name}.json", record["settings"]
    ):
        n += 1
        name = f"{stem}-{n}"
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    write_json(json_path, record)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(record))
    return [str(json_path), str(md_path)]


def result_stem(cfg: EvalConfig, method: str, own: bool, pamr: bool) -> str:
    """``eval-<dataset>`` for the model's own method under the default protocol (tcl), on all
    images, without PAMR or a class subset; else ``eval-<dataset>-<method>-<protocol>``, then
    ``-pamr`` (PAMR applied), ``-<subset>[-zsl]``, ``-project-names`` and ``-first<N>``
    (``--limit``) as they apply. Method and protocol both stand in the long form, so a method
    and a protocol of the same name (sclip) cannot give the same name."""
    parts = [f"eval-{cfg.dataset}"]
    tail = []
    if pamr:
        tail.append("pamr")
    if cfg.subset:
        tail.append(Path(cfg.subset).stem + ("-zsl" if cfg.subset_mode == "zsl" else ""))
    if cfg.names == "project":
        tail.append("project-names")
    if cfg.limit:
        tail.append(f"first{cfg.limit}")
    if own and cfg.protocol == "tcl" and not tail:
        return parts[0]
    return "-".join([*parts, method, cfg.protocol, *tail])


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
    ]
    if record.get("subset"):
        sub = record["subset"]
        lines += [
            f"Classes {', '.join(sub['classes'])} ({sub['name']}, {sub['mode']}): mIoU "
            f"**{_pct(sub['mIoU'])}**, pixel accuracy {_pct(sub['pixel_accuracy'])}.",
            "",
        ]
    lines += ["| setting | value |", "|---|---|"]
    for key in (
        "checkpoint",
        "checkpoint_folder",
        "preset",
        "decoder_init",
        "method",
        "protocol",
        "protocol_source",
        "pamr",
        "data_root",
        "classes",
        "templates",
        "limit",
        "subset",
        "subset_mode",
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
