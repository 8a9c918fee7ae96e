"""Tracking and schedules: a run with a cosine schedule, validation every N steps and
TensorBoard writes the learning rate and the validation mIoU, and they are what they should be."""

from __future__ import annotations

import json
import math

import pytest

from synseg.errors import UserError


def test_cosine_run_with_validation_writes_lr_and_val_miou_to_tensorboard(world, shards, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.eval.evaluate import EvalConfig, run_eval
    from trainer.train.config import resolve
    from trainer.train.loop import run_train

    out = tmp_path / "run"
    lr = 1e-3
    cfg = resolve(
        "tiny",
        overrides=[
            f"data.shards={shards}",
            f"run.output={out}",
            "optim.max_steps=4",
            "data.batch_size=4",
            f"optim.lr={lr}",
            "optim.schedule=cosine",
            "optim.warmup=1",
            "run.log_every=1",
            "run.val_every=2",
            f"run.val_root={world}",
            "run.val_limit=2",
            "run.report_to=tensorboard",
        ],
    )
    stats = run_train(cfg)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("lr")}
    # warm-up over step 1, then lr (1 + cos(pi e / 3)) / 2 for e = 0, 1, 2
    want = {
        1: lr,
        2: lr,
        3: lr * (1 + math.cos(math.pi / 3)) / 2,
        4: lr * (1 + math.cos(2 * math.pi / 3)) / 2,
    }
    assert logged == pytest.approx(want, rel=1e-6)
    val = {e.step: e.value for e in events.Scalars("val/mIoU")}
    assert sorted(val) == [2, 4]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    in_log = {r["step"]: r["val"]["mIoU"] for r in records if "val" in r}
    assert in_log == pytest.approx(val, rel=1e-6)
    # the last validation is what eval gives the final checkpoint
    final = run_eval(EvalConfig("world", str(world), checkpoint=str(out), limit=2, device="cpu"))
    assert stats.val["step"] == 4 and val[4] == pytest.approx(final.mIoU, abs=1e-6)


def test_tracking_settings_are_checked(shards, tmp_path):
    from trainer.train.config import from_dict, resolve
    from trainer.train.loop import run_train

    with pytest.raises(UserError, match="run.report_to: mlflow unknown"):
        resolve("tiny", overrides=["run.report_to=tensorboard,mlflow"])
    with pytest.raises(UserError, match="run.val_every must be at least 0"):
        resolve("tiny", overrides=["run.val_every=-1"])
    cfg = resolve(
        "tiny",
        overrides=[
            f"data.shards={shards}",
            f"run.output={tmp_path / 'r'}",
            "run.val_every=1",
            f"run.val_root={tmp_path / 'nothing'}",
        ],
    )
    with pytest.raises(UserError, match="does not"):
        run_train(cfg)  # refused before the first step
    assert not (tmp_path / "r" / "checkpoints").exists()
    # a run saved before run.report_to existed reads as it was meant
    old = resolve("tiny").to_dict()
    old["run"].pop("report_to")
    old["run"]["tensorboard"] = True
    assert from_dict(old).run.report_to == "tensorboard"


def test_validation_scores_in_eval_mode_and_leaves_training_as_it_was(
    world, shards, tmp_path, monkeypatch
):
    """The same run with and without run.val_every ends with the same weights; validation
    sees the model in eval mode (dropout off)."""
    import torch
    from safetensors.torch import load_file

    import trainer.eval.evaluate as evaluate
    from trainer.train.config import resolve
    from trainer.train.loop import run_train

    seen = []
    real = evaluate.validate

    def spy(model, *args, **kwargs):
        seen.append(model.training)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate, "validate", spy)
    base = [f"data.shards={shards}", "optim.max_steps=3", "data.batch_size=4", "optim.lr=1e-3"]
    base.append("model.dropout=0.5")  # so that a model left in eval mode trains otherwise
    for name, extra in (
        ("plain", []),
        ("validated", ["run.val_every=1", f"run.val_root={world}", "run.val_limit=1"]),
    ):
        run_train(resolve("tiny", overrides=[*base, f"run.output={tmp_path / name}", *extra]))
    assert seen == [False, False, False]
    from trainer.train.checkpoint import find

    a = load_file(find(tmp_path / "plain") / "model.safetensors")
    b = load_file(find(tmp_path / "validated") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
