"""Training settings: groups of dataclasses, presets as JSON data, dotted overrides.

    cfg = resolve(preset="tiny", files=["my.json"], overrides=["optim.lr=3e-4", "data.batch_size=32"])
    cfg = resolve(preset="vilseg-paper")              # the same as method="vilseg", preset="paper"

A run trains one method (``trainer.methods``): its ``model`` and ``loss`` groups are that
method's dataclasses, ``data``, ``optim`` and ``run`` are the loop's. Presets belong to their
method (``trainer/methods/<method>/presets/<name>.json``); ``--preset NAME`` is the chosen
method's (SynSeg's unless ``--method`` says otherwise), ``--preset METHOD-NAME`` chooses the
method too. Later sources win: defaults < preset < config files (in order) < overrides. Each
value is checked against its field's annotation (a number where a number belongs, finite,
text where text belongs), and every unknown field and bad value is reported at once, in one
line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synseg.errors import UserError
from trainer import methods
from trainer.eval.infer import template_problem

DEFAULT_METHOD = "synseg"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
REPORTERS = ("tensorboard", "wandb")  # where run.report_to sends the metrics too
SUPERVISIONS = ("captions", "masks")


@dataclass
class DataConfig:
    supervision: str = "captions"  # captions (the shards' labels) or masks (a dataset's masks)
    shards: str = "data/shards"  # a folder with sizes.json (from `synseg-data pack`)
    dataset: str = ""  # masks: the dataset whose train split is read (eval's names: stuff, ...)
    root: str = ""  # masks: its folder in MMSegmentation's layout (eval's --data-root)
    image_size: int = 224  # training resolution (images are resized if the shards differ)
    batch_size: int = 128  # images per step and per process
    max_labels: int = 8  # images with more labels use a random subset of this size
    absent: int = 0  # categories absent from an image sampled as negatives (synseg: loss.neg)
    template: str = "a photo of a {}."  # prompt around each label phrase
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    workers: int = 4  # DataLoader worker processes


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd, adam (weight decay as an L2 term) or adamw (decoupled)
    lr: float = 1e-5
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps (0: run the epochs)
    grad_clip: float = 1.0  # max gradient norm (0: off)
    warmup: int = 0  # steps of linear warm-up from 0 to lr (0: none)
    schedule: str = "constant"  # after the warm-up: constant, or cosine down to 0 at the last step


@dataclass
class RunConfig:
    output: str = "runs/synseg"  # checkpoints, config and metrics go here
    seed: int = 42
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32
    channels_last: bool = False  # images and convolutions in channels-last memory format
    compile: bool = False  # torch.compile the training forward pass
    log_every: int = 10  # steps between metric lines
    save_every: int = 1000  # steps between checkpoints (0: only at the end)
    report_to: str = ""  # also send metrics to tensorboard, wandb or both (comma-separated)
    val_every: int = 0  # steps between validations: mIoU on val_dataset, logged (0: none)
    val_dataset: str = "world"  # the benchmark validated on (eval's --dataset)
    val_root: str = "data/world"  # its folder (eval's --data-root)
    val_limit: int = 0  # its first N images only (0: all)
    val_protocol: str = "tcl"  # the protocol validation scores under
    text_cache: str = ""  # folder of the label-embedding cache (default: <output>/text_cache)
    encode_batch: int = 1024  # phrases per text-tower call when the vocabulary is encoded
    encode_save_every: float = 120.0  # seconds between saves of the label cache while encoding


@dataclass
class TrainConfig:
    method: str = DEFAULT_METHOD  # a trained method of trainer.methods
    model: Any = None  # the method's model settings (None: its defaults)
    loss: Any = None  # the method's loss settings (None: its defaults)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""

    def __post_init__(self) -> None:
        m = methods.trained(self.method)
        if self.model is None:
            self.model = m.model_config()
        if self.loss is None:
            self.loss = m.loss_config()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _groups(method: str) -> dict[str, type]:
    m = methods.trained(method)
    return {
        "model": m.model_config,
        "loss": m.loss_config,
        "data": DataConfig,
        "optim": OptimConfig,
        "run": RunConfig,
    }


def list_presets() -> list[str]:
    """Every preset as METHOD-NAME."""
    return [
        f"{name}-{p}"
        for name in methods.names("trained")
        for p in methods.trained(name).preset_names()
    ]


_WORDS = {"none": None, "null": None, "true": True, "false": False}
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def _parse_value(text: str) -> Any:
    """A ``--set`` value: JSON, else a word (none, true, ...), a non-finite number in any
    spelling (so that it is refused as one), or the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if text.lower() in _NON_FINITE:
            return float(text)
        return _WORDS.get(text.lower(), text)


def _merge(base: dict, update: dict, where: str, problems: list[str]) -> None:
    for key, value in update.items():
        if key.startswith("_"):
            continue  # comments in preset files
        if key not in base:
            problems.append(f"unknown field {where}{key} (known: {', '.join(k for k in base)})")
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                problems.append(f"{where}{key} is a group of settings, not a value")
            else:
                _merge(base[key], value, f"{where}{key}.", problems)
        else:
            base[key] = value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coerce(value: Any, hint: Any, name: str) -> tuple[Any, str | None]:
    """``value`` checked against the annotation ``hint``: (the value as the field holds it,
    None) or (None, the problem in words). Floats must be finite in every spelling."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name) if len(inner) == 1 else (value, None)
    if hint is bool:
        return (
            (value, None)
            if isinstance(value, bool)
            else (None, f"{name} must be true or false, not {value!r}")
        )
    if hint is int:
        if _is_number(value) and float(value).is_integer():
            return int(value), None
        return None, f"{name} must be a whole number, not {value!r}"
    if hint is float:
        if not _is_number(value):
            return None, f"{name} must be a number, not {value!r}"
        if not math.isfinite(value):
            return None, f"{name} must be a finite number, not {value!r}"
        return float(value), None
    if hint is str:
        return (
            (value, None)
            if isinstance(value, str)
            else (None, f"{name} must be text, not {value!r}")
        )
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return None, f"{name} must be a list, not {value!r}"
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return None, f"{name} must hold {len(items)} values, not {len(value)}"
        out = []
        for i, (v, h) in enumerate(zip(value, items, strict=True)):
            v, problem = coerce(v, h, f"{name}[{i}]")
            if problem:
                return None, problem
            out.append(v)
        return tuple(out), None
    return value, None  # Any, dict and the like: taken as given


def build(cls, data: dict, where: str, problems: list[str]):
    """Instantiate the settings dataclass ``cls`` from plain data, each value checked against
    its field's annotation; problems are appended, and None returned if there are any."""
    hints = typing.get_type_hints(cls)
    kwargs, bad = {}, False
    for f in dataclasses.fields(cls):
        value, problem = coerce(data[f.name], hints[f.name], f"{where}{f.name}")
        if problem:
            problems.append(problem)
            bad = True
        kwargs[f.name] = value
    if bad:
        return None
    try:
        return cls(**kwargs)
    except UserError as e:
        problems.append(f"{where.rstrip('.')}: {e}" if where else str(e))
    except (TypeError, ValueError) as e:
        problems.append(f"{where.rstrip('.')}: {e}")
    return None


def _read_file(f: Path) -> dict:
    f = Path(f)
    if not f.is_file():
        raise UserError(f"config file {f} does not exist")
    try:
        loaded = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file {f} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"config file {f} is not valid JSON: {e}") from None
    if not isinstance(loaded, dict):
        raise UserError(
            f"config file {f} must hold a JSON object of setting groups, "
            f"not a {type(loaded).__name__}"
        )
    return loaded


def _dotted(item: str) -> tuple[str, Any]:
    key, value = item.split("=", 1)
    return key.strip(), _parse_value(value.strip())


def _choose_method(
    preset: str, loaded: list[tuple[Path, dict]], overrides: list[str], method: str | None
) -> tuple[str, str]:
    """(method, preset name within it) from --method / method=..., a METHOD-NAME preset, or a
    config file's "method"; SynSeg when none says."""
    said = {}  # where each source put the method
    if method:
        said["--method"] = method
    for item in overrides:
        if "=" in item and _dotted(item)[0] == "method":
            said["--set method"] = _dotted(item)[1]
    name = preset
    head, _, tail = preset.partition("-")
    if tail and head in methods.names("trained"):
        said[f"--preset {preset}"], name = head, tail
    for path, data in loaded:
        if "method" in data:
            said[f"config file {path}"] = data["method"]
    chosen = set(map(str, said.values()))
    if len(chosen) > 1:
        raise UserError(
            "the method is given twice, differently: "
            + ", ".join(f"{k}: {v}" for k, v in said.items())
        )
    m = chosen.pop() if chosen else DEFAULT_METHOD
    if methods.info(m).kind != "trained":
        raise UserError(
            f"{m} is a {methods.info(m).kind} method: it has nothing to train; trained methods: "
            + ", ".join(methods.names("trained"))
        )
    return m, name


def resolve(
    preset: str = "",
    files: list[Path] = (),
    overrides: list[str] = (),
    method: str | None = None,
    values: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults of the method, then the preset, then config files, then ``key.path=value``
    overrides, then ``values`` (``{"run.output": "x"}``: typed values, e.g. from options)."""
    loaded = [(Path(f), _read_file(f)) for f in files]
    method, name = _choose_method(preset, loaded, list(overrides), method)
    data = TrainConfig(method=method).to_dict()
    problems: list[str] = []
    if name:
        path = methods.trained(method).presets / f"{name}.json"
        if not path.exists():
            raise UserError(f"unknown preset {preset!r}; choose from {', '.join(list_presets())}")
        _merge(data, json.loads(path.read_text()), "", problems)
        data["preset"] = preset
    for _, loaded_data in loaded:
        _merge(data, {k: v for k, v in loaded_data.items() if k != "method"}, "", problems)
    updates = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not key.path=value")
            continue
        key, value = _dotted(item)
        if key != "method":
            updates.append((key, value))
    updates += list((values or {}).items())
    for key, value in updates:
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = value
        _merge(data, nested, "", problems)
    cfg = _from_data(method, data, problems)  # unknown fields were skipped: check the rest too
    if cfg is not None:
        problems += _check(cfg)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def _from_data(method: str, data: dict, problems: list[str]) -> TrainConfig | None:
    groups = {g: build(cls, data[g], f"{g}.", problems) for g, cls in _groups(method).items()}
    if any(v is None for v in groups.values()):
        return None
    return TrainConfig(method=method, preset=str(data.get("preset") or ""), **groups)


def _check(cfg: TrainConfig) -> list[str]:
    problems = []
    if cfg.optim.name not in OPTIMIZERS:
        problems.append(f"optim.name must be one of {', '.join(OPTIMIZERS)}")
    if cfg.optim.schedule not in SCHEDULES:
        problems.append(f"optim.schedule must be one of {', '.join(SCHEDULES)}")
    for name, value, low in (
        ("optim.max_steps", cfg.optim.max_steps, 0),
        ("optim.epochs", cfg.optim.epochs, 0),
        ("optim.weight_decay", cfg.optim.weight_decay, 0),
        ("optim.momentum", cfg.optim.momentum, 0),
        ("optim.grad_clip", cfg.optim.grad_clip, 0),
        ("optim.warmup", cfg.optim.warmup, 0),
        ("data.absent", cfg.data.absent, 0),
        ("data.workers", cfg.data.workers, 0),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, 1),
        ("data.image_size", cfg.data.image_size, 8),
        ("run.log_every", cfg.run.log_every, 1),
        ("run.save_every", cfg.run.save_every, 0),
        ("run.encode_batch", cfg.run.encode_batch, 1),
        ("run.encode_save_every", cfg.run.encode_save_every, 0),
        ("run.val_every", cfg.run.val_every, 0),
        ("run.val_limit", cfg.run.val_limit, 0),
    ):
        if value < low:
            problems.append(f"{name} must be at least {low}, not {value}")
    if not cfg.optim.lr > 0:
        problems.append(f"optim.lr must be positive, not {cfg.optim.lr}")
    if cfg.optim.momentum >= 1:
        problems.append(f"optim.momentum must be below 1, not {cfg.optim.momentum}")
    if cfg.data.batch_size < 1 or cfg.data.max_labels < 1:
        problems.append("data.batch_size and data.max_labels must be at least 1")
    if cfg.optim.epochs < 1 and cfg.optim.max_steps < 1:
        problems.append("optim.epochs or optim.max_steps must be at least 1")
    if cfg.run.precision not in ("auto", "bf16", "fp32"):
        problems.append("run.precision must be auto, bf16 or fp32")
    unknown = sorted(set(reporters(cfg.run)) - set(REPORTERS))
    if unknown:
        problems.append(
            f"run.report_to: {', '.join(unknown)} unknown; choose from {', '.join(REPORTERS)}"
        )
    if cfg.run.val_protocol not in ("tcl", "sclip", "native"):
        problems.append("run.val_protocol must be tcl, sclip or native")
    if problem := template_problem(cfg.data.template):
        problems.append(f"data.template {problem}")
    problems += _supervision_problems(cfg)
    return problems + methods.trained(cfg.method).check(cfg)


def _supervision_problems(cfg: TrainConfig) -> list[str]:
    """What the supervision and the physically-guided losses need of the data and the method."""
    data, loss, method = cfg.data, cfg.loss, methods.trained(cfg.method)
    if data.supervision not in SUPERVISIONS:
        return [f"data.supervision must be one of {', '.join(SUPERVISIONS)}"]
    problems = []
    if data.supervision == "masks":
        if method.dense is None:
            problems.append(
                f"{cfg.method} gives no dense class scores to train on masks (--supervision "
                "masks needs a method with a Dense forward)"
            )
        if not data.dataset or not data.root:
            problems.append("--supervision masks reads --dataset and --data-root")
    elif needed := loss.masks_needed():
        problems.append(f"{' and '.join(needed)} read masks: add --supervision masks")
    if (loss.structure or loss.patch_align) and method.dense is None:
        problems.append(
            f"loss.structure and loss.patch_align train heads on feature levels, which "
            f"{cfg.method}'s model does not give"
        )
    return problems


def reporters(run: RunConfig) -> list[str]:
    """The names in ``run.report_to``."""
    return [r.strip() for r in run.report_to.split(",") if r.strip()]


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a resolved config (as saved beside a checkpoint; one saved before methods
    existed is SynSeg's)."""
    problems: list[str] = []
    method = data.get("method", DEFAULT_METHOD)
    methods.trained(method)
    run = data.get("run")
    if isinstance(run, dict) and "tensorboard" in run:  # saved before run.report_to
        run = {k: v for k, v in run.items() if k != "tensorboard"}
        run.setdefault("report_to", "tensorboard" if data["run"]["tensorboard"] else "")
        data = {**data, "run": run}
    base = TrainConfig(method=method).to_dict()
    _merge(base, data, "", problems)
    cfg = None if problems else _from_data(method, base, problems)
    if problems:
        raise UserError("; ".join(problems))
    return cfg
