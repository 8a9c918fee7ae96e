"""Checkpoints: trainable weights as safetensors, optimizer and step, the resolved config.

    <run>/checkpoints/step-0000100/model.safetensors   what the method trains (SynSeg: FiLM +
                                                       decoder + projector)
                                  /optimizer.pt        optimizer state, step, epoch
                                  /config.json         resolved TrainConfig (its method too),
                                                       model description, label cache identity
                                  /stream.json         where each rank's data workers stand
    <run>/checkpoints/latest                           name of the newest complete checkpoint

A checkpoint folder is written under a temporary name and renamed when complete, then
``latest`` is updated atomically: a crash never leaves a half checkpoint behind ``latest``.
``load_model`` rebuilds a run's model, whatever its method, for eval, ``segment`` or Python.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from synseg.errors import UserError
from synseg.fsutil import TMP_SUFFIX, atomic_path, clean_stale, file_mode


def refuse_non_finite(model, step: int) -> None:
    """One line, and no checkpoint, when a trained tensor holds NaN or an infinity: never a
    checkpoint that eval would score as if it were a model. (Every rank calls it before the
    main one saves: the weights are the same, so all of them stop together.)"""
    state = model.trainable_state_dict()
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise UserError(
            f"step {step}: {len(broken)} trained tensors hold NaN or infinite values "
            f"({', '.join(broken[:2])}); no checkpoint written (lower optim.lr, set "
            "optim.grad_clip, or resume from the last good checkpoint)"
        )


def save(
    run: Path,
    step: int,
    model,
    optimizer,
    epoch: int,
    config: dict,
    extra: dict,
    stream: dict | None = None,
) -> Path:
    from safetensors.torch import save_file

    folder = run / "checkpoints"
    name = f"step-{step:07d}"
    tmp = folder / f".{name}{TMP_SUFFIX}"
    refuse_non_finite(model, step)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    clean_stale(folder)  # this one, or one a killed run left
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    os.chmod(tmp / "model.safetensors", file_mode())  # safetensors writes 0600
    torch.save(
        {"optimizer": optimizer.state_dict(), "step": step, "epoch": epoch}, tmp / "optimizer.pt"
    )
    (tmp / "config.json").write_text(json.dumps({"config": config, **extra}, indent=2, default=str))
    if stream is not None:
        (tmp / "stream.json").write_text(json.dumps(stream))
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with atomic_path(folder / "latest") as t:
        t.write_text(name + "\n")
    return final


def find(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its latest), a checkpoints folder or itself."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").exists():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "model.safetensors").exists() and (p / "config.json").exists():
        return p
    raise UserError(
        f"{path} is not a checkpoint (no model.safetensors + config.json, no checkpoints/latest)"
    )


def read_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}/config.json cannot be read: {e}") from None


def load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as e:
        raise UserError(f"{ckpt}/model.safetensors cannot be read: {e}") from None
    from trainer.train.physical import PREFIX

    own = model.trainable_state_dict()
    wrong = [k for k in own if k not in weights or weights[k].shape != own[k].shape]
    # the auxiliary heads' weights are the training's (a Trainee loads them; eval has none)
    extra = [k for k in weights if k not in own and not k.startswith(PREFIX)]
    if wrong or extra:
        key = (wrong or extra)[0]
        raise UserError(
            f"checkpoint {ckpt} is for another architecture ({key} does not fit this model)"
        )
    if hasattr(model, "load_trainable"):
        model.load_trainable(weights)
    else:
        model.load_state_dict(
            {k: v for k, v in weights.items() if not k.startswith(PREFIX)}, strict=False
        )


def load_optimizer(optimizer, ckpt: Path) -> tuple[int, int]:
    # weights_only: tensors and plain containers only, so a crafted file cannot run code.
    try:
        state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), int(state["epoch"])
    except Exception as e:  # unpickling refusals, a damaged file, a foreign state
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{ckpt}/optimizer.pt cannot be loaded: {first[:200]}") from None


def load_stream(ckpt: Path) -> dict | None:
    """The data stream's position saved with a checkpoint (None for checkpoints without it)."""
    path = ckpt / "stream.json"
    if not path.exists():
        return None
    try:
        stream = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None
    if why := _stream_problem(stream):
        raise UserError(
            f"{path} is not a stream position this trainer wrote ({why}); "
            "delete it to replay the epoch instead"
        )
    return stream


def _ints(x, n: int) -> bool:
    return isinstance(x, list) and len(x) == n and all(type(v) is int and v >= 0 for v in x)


def _worker_problem(state) -> str | None:
    if not isinstance(state, dict):
        return "a worker's state is not an object"
    if type(state.get("cycle")) is not int or not _ints(state.get("next"), 2):
        return "a worker's cycle or next sample is missing"
    buffer = state.get("buffer")
    if not isinstance(buffer, list) or not all(_ints(b, 2) for b in buffer):
        return "a worker's shuffle buffer is not a list of (shard, sample)"
    if type(state.get("draining")) is not bool or not isinstance(state.get("shards"), str):
        return "a worker's draining flag or shards id is missing"
    rng = state.get("rng")
    if not (
        isinstance(rng, list)
        and len(rng) == 3
        and type(rng[0]) is int
        and _ints(rng[1], 625)
        and (rng[2] is None or isinstance(rng[2], float))
    ):
        return "a worker's random state is missing or damaged"
    return None


def _stream_problem(stream) -> str | None:
    """Why ``stream`` is not a saved stream position (None if it is one)."""
    if not isinstance(stream, dict):
        return "not an object"
    for key in ("epoch", "batches", "world", "workers"):
        if type(stream.get(key)) is not int or stream[key] < 0:
            return f"no {key}"
    ranks = stream.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != stream["world"]:
        return "no position for every rank"
    for rank in ranks:
        if not isinstance(rank, dict):
            return "a rank's position is not an object"
        for worker, state in rank.items():
            if not worker.isdigit():
                return f"worker {worker!r} is not a number"
            if why := _worker_problem(state):
                return why
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, its TrainConfig): a trained model from a run folder or checkpoint folder, built
    by the method the run trained, in eval mode."""
    from trainer import methods
    from trainer.train.config import from_dict

    ckpt = find(path)
    cfg = from_dict(read_config(ckpt)["config"])
    model = methods.trained(cfg.method).build(cfg.model)
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg
