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

from pipeline.errors import UserError
from pipeline.fsutil import TMP_SUFFIX, atomic_path, clean_stale


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
    clean_stale(folder)  # this one, or one a killed run left
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
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
    own = model.trainable_state_dict()
    wrong = [k for k in own if k not in weights or weights[k].shape != own[k].shape]
    extra = [k for k in weights if k not in own]
    if wrong or extra:
        key = (wrong or extra)[0]
        raise UserError(
            f"checkpoint {ckpt} is for another architecture ({key} does not fit this model)"
        )
    model.load_state_dict(weights, strict=False)


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
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None


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
