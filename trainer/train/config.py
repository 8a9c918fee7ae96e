"""Training settings: groups of dataclasses, presets as JSON data, dotted overrides.

    cfg = resolve(preset="tiny", files=["my.json"], overrides=["optim.lr=3e-4", "data.batch_size=32"])

Later sources win: defaults < preset < config files (in order) < overrides. Every unknown
field and every bad value is reported at once, in one line.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from trainer.model.losses import LossConfig
from trainer.model.synseg import ModelConfig

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    shards: str = "data/shards"  # a folder with sizes.json (from `synseg-data pack`)
    image_size: int = 224  # training resolution (images are resized if the shards differ)
    batch_size: int = 128  # images per step and per process
    max_labels: int = 8  # images with more labels use a random subset of this size
    absent: int = 0  # categories absent from an image sampled as negatives (needs loss.neg > 0)
    template: str = "a photo of a {}."  # prompt around each label phrase
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    workers: int = 4  # DataLoader worker processes


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd or adamw
    lr: float = 1e-5
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps (0: run the epochs)
    grad_clip: float = 1.0  # max gradient norm (0: off)


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
    tensorboard: bool = False  # also write TensorBoard events
    text_cache: str = ""  # folder of the label-embedding cache (default: <output>/text_cache)
    encode_batch: int = 1024  # phrases per text-tower call when the vocabulary is encoded


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"none": None, "null": None, "true": True, "false": False}.get(text.lower(), text)


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


_GROUPS = {
    "model": ModelConfig,
    "loss": LossConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


def _build(cls, data: dict, where: str, problems: list[str]):
    """Instantiate ``cls`` from plain data, checking each value against its default's type."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        if cls is TrainConfig and f.name in _GROUPS:
            kwargs[f.name] = _build(_GROUPS[f.name], value, f"{f.name}.", problems)
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool) and not isinstance(value, bool):
            problems.append(f"{where}{f.name} must be true or false, not {value!r}")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{where}{f.name} must be a number, not {value!r}")
            elif isinstance(default, int) and isinstance(value, float) and not value.is_integer():
                problems.append(f"{where}{f.name} must be a whole number, not {value!r}")
            else:
                value = type(default)(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except UserError as e:
        problems.append(str(e))
        return None
    except (TypeError, ValueError) as e:
        problems.append(f"{where.rstrip('.')}: {e}")
        return None


def resolve(preset: str = "", files: list[Path] = (), overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the preset, then config files, then ``key.path=value`` overrides."""
    data = TrainConfig().to_dict()
    problems: list[str] = []
    if preset:
        path = PRESETS_DIR / f"{preset}.json"
        if not path.exists():
            raise UserError(f"unknown preset {preset!r}; choose from {', '.join(list_presets())}")
        _merge(data, json.loads(path.read_text()), "", problems)
        data["preset"] = preset
    for f in files:
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
        _merge(data, loaded, "", problems)
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} is not key.path=value")
            continue
        key, value = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = _parse_value(value.strip())
        _merge(data, nested, "", problems)
    cfg = _build(TrainConfig, data, "", problems)  # unknown fields were skipped: check the rest too
    _check(cfg, problems)
    if problems:
        raise UserError("; ".join(problems))
    return cfg


def _check(cfg: TrainConfig | None, problems: list[str]) -> None:
    if cfg is None:
        return
    if cfg.optim.name not in ("sgd", "adamw"):
        problems.append("optim.name must be sgd or adamw")
    for name, value, low in (
        ("optim.max_steps", cfg.optim.max_steps, 0),
        ("optim.epochs", cfg.optim.epochs, 0),
        ("optim.weight_decay", cfg.optim.weight_decay, 0),
        ("optim.momentum", cfg.optim.momentum, 0),
        ("optim.grad_clip", cfg.optim.grad_clip, 0),
        ("data.absent", cfg.data.absent, 0),
        ("data.workers", cfg.data.workers, 0),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, 1),
        ("data.image_size", cfg.data.image_size, 8),
        ("run.log_every", cfg.run.log_every, 1),
        ("run.save_every", cfg.run.save_every, 0),
        ("run.encode_batch", cfg.run.encode_batch, 1),
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
    if cfg.data.absent and not cfg.loss.neg:
        problems.append("data.absent samples negatives for loss.neg, which is 0")
    if "{}" not in cfg.data.template:
        problems.append("data.template must contain {} where the label goes")


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a resolved config (as saved beside a checkpoint)."""
    problems: list[str] = []
    base = TrainConfig().to_dict()
    _merge(base, data, "", problems)
    cfg = None if problems else _build(TrainConfig, base, "", problems)
    if problems:
        raise UserError("; ".join(problems))
    return cfg
