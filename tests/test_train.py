"""The trainer on shards packed from the synthetic world, on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synseg.errors import UserError
from trainer.train.checkpoint import load_model
from trainer.train.config import resolve
from trainer.train.loop import run_train


def tiny(shards, out, *extra):
    return resolve(
        "tiny",
        overrides=[f"data.shards={shards}", f"run.output={out}", "data.batch_size=8", *extra],
    )


def weights(run, step):
    return load_file(str(Path(run) / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def losses(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    stats = run_train(
        tiny(
            shards,
            out,
            "optim.max_steps=8",
            "run.save_every=4",
            "model.projector_input=visual",
            "loss.straight_through=true",
        )
    )
    return out, stats


def test_tiny_preset_trains_and_writes_exactly_these_files(full_run):
    out, stats = full_run
    assert stats.steps == 8 and stats.start_step == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    cache = [f for f in files if f.startswith("text_cache/")]
    assert sorted(set(files) - set(cache)) == [
        "checkpoints/latest",
        "checkpoints/step-0000004/config.json",
        "checkpoints/step-0000004/model.safetensors",
        "checkpoints/step-0000004/optimizer.pt",
        "checkpoints/step-0000004/stream.json",
        "checkpoints/step-0000008/config.json",
        "checkpoints/step-0000008/model.safetensors",
        "checkpoints/step-0000008/optimizer.pt",
        "checkpoints/step-0000008/stream.json",
        "config.json",
        "metrics.jsonl",
    ]
    assert len(cache) == 2 and {Path(c).suffix for c in cache} == {".json", ".safetensors"}
    assert (out / "checkpoints/latest").read_text().strip() == "step-0000008"
    saved = json.loads((out / "checkpoints/step-0000008/config.json").read_text())
    assert saved["config"]["model"]["arch"] == "synseg-tiny" and saved["label_cache"]["phrases"] > 5
    assert not any(k.startswith("backbone.") for k in weights(out, 8))  # only what trains


def test_loss_terms_are_finite_and_fall(full_run):
    out, _ = full_run
    log = losses(out)
    assert [r["step"] for r in log] == list(range(1, 9))
    for r in log:
        assert all(torch.isfinite(torch.tensor(v)) for v in r["loss"].values())
    first, last = log[0]["loss"]["total"], sum(r["loss"]["total"] for r in log[-2:]) / 2
    assert last < first
    # The logged total is the weighted sum of the logged terms (the paper's 1/1/10/1), and
    # each term is a value of its own (not one number copied into every field).
    for r in log:
        t = r["loss"]
        assert t["total"] == pytest.approx(
            t["align"] + t["cont"] + 10 * t["back"] + t["sep"], abs=1e-5
        )
        assert len({round(t[k], 6) for k in ("align", "cont", "back", "sep")}) == 4
    assert len({r["loss"]["total"] for r in log}) == len(log), "a new value every step"


def test_resume_continues_at_the_next_step_with_the_same_result(full_run, shards, tmp_path):
    out, _ = full_run
    extra = ("model.projector_input=visual", "loss.straight_through=true", "run.save_every=4")
    half = run_train(tiny(shards, tmp_path, "optim.max_steps=4", *extra))
    assert half.steps == 4
    resumed = run_train(tiny(shards, tmp_path, "optim.max_steps=8", *extra), resume=True)
    assert resumed.start_step == 4 and resumed.steps == 8
    for k, v in weights(out, 8).items():
        torch.testing.assert_close(weights(tmp_path, 8)[k], v, rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in losses(tmp_path)] == [r["loss"] for r in losses(out)]


def test_resume_refusals(full_run, shards, tmp_path):
    out, _ = full_run
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        run_train(tiny(shards, out, "optim.max_steps=9"))
    with pytest.raises(UserError, match="other settings.*optim.lr"):
        run_train(
            tiny(
                shards,
                out,
                "optim.max_steps=9",
                "optim.lr=0.5",
                "model.projector_input=visual",
                "loss.straight_through=true",
                "run.save_every=4",
            ),
            resume=True,
        )
    with pytest.raises(UserError, match="not a checkpoint"):
        run_train(tiny(shards, tmp_path / "new"), resume=True)


def test_load_model_and_another_architecture(full_run):
    out, _ = full_run
    model, cfg = load_model(out)
    assert cfg.model.projector_input == "visual" and not model.training
    from trainer.methods.synseg.model import ModelConfig, SynSeg
    from trainer.train.checkpoint import find, load_weights

    other = SynSeg(
        ModelConfig(arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), reduce_dim=32, ffn_dim=64)
    )
    with pytest.raises(UserError, match="another architecture"):
        load_weights(other, find(out))


def test_bad_inputs(tmp_path, shards):
    with pytest.raises(UserError, match="does not exist; run `synseg-data pack`"):
        run_train(tiny(tmp_path / "none", tmp_path / "r"))
    (tmp_path / "nolabels").mkdir()
    with pytest.raises(UserError, match="no sizes.json"):
        run_train(tiny(tmp_path / "nolabels", tmp_path / "r"))
    with pytest.raises(UserError, match="unknown field optim.learning_rate"):
        resolve("tiny", overrides=["optim.learning_rate=1"])
    with pytest.raises(UserError, match="unknown preset"):
        resolve("giant")
    with pytest.raises(UserError, match="the loss is not finite from step"):
        run_train(
            tiny(
                shards,
                tmp_path / "nan",
                "optim.max_steps=5",
                "optim.lr=1e38",
                "optim.grad_clip=0",
                "optim.name=sgd",
                "optim.momentum=0",
            )
        )


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer.cli",
        "run",
        "--preset",
        "tiny",
        "--shards",
        str(shards),
        "--output",
        str(out),
        "--steps",
        "3",
        "--set",
        "data.batch_size=4",
        "--set",
        "run.save_every=1",  # every checkpoint checks that the ranks hold the same weights
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step-0000001",
        "step-0000002",
        "step-0000003",
    ]
    assert len(losses(out)) == 3
    saved = json.loads((out / "checkpoints/step-0000003/config.json").read_text())
    assert saved["config"]["data"]["batch_size"] == 4


def test_resume_is_exact_with_dropout_and_absent_negatives(shards, tmp_path):
    """Dropout and the absent-category draw use random numbers and the label cache's
    vocabulary: a resumed run must draw the same as an uninterrupted one."""
    extra = (
        "model.dropout=0.3",
        "data.absent=2",
        "loss.neg=1",
        "run.save_every=3",
        "run.log_every=1",
    )
    straight = run_train(tiny(shards, tmp_path / "straight", "optim.max_steps=7", *extra))
    assert straight.loss["neg"] > 0, "absent negatives were drawn"
    run_train(tiny(shards, tmp_path / "split", "optim.max_steps=3", *extra))
    resumed = run_train(tiny(shards, tmp_path / "split", "optim.max_steps=7", *extra), resume=True)
    assert resumed.start_step == 3 and resumed.steps == 7
    assert [r["loss"] for r in losses(tmp_path / "split")] == [
        r["loss"] for r in losses(tmp_path / "straight")
    ]
    for k, v in weights(tmp_path / "straight", 7).items():
        torch.testing.assert_close(weights(tmp_path / "split", 7)[k], v, rtol=0, atol=1e-6)
    # Dropout is really on: the same step without it gives another loss.
    no_drop = run_train(
        tiny(shards, tmp_path / "nodrop", "optim.max_steps=1", *extra[1:], "model.dropout=0")
    )
    assert no_drop.loss["total"] != losses(tmp_path / "straight")[0]["loss"]["total"]


def test_encode_labels_fills_the_cache_the_run_reads(shards, tmp_path):
    """`synseg-train encode-labels` encodes the shards' whole vocabulary once; the run with
    the same settings then encodes nothing, and its cache holds exactly the vocabulary."""
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from trainer.cli import app

    vocab = pq.read_table(shards / "vocabulary.parquet").column("phrase").to_pylist()
    args = ["--preset", "tiny", "--shards", str(shards), "--output", str(tmp_path / "r")]
    res = CliRunner().invoke(app, ["encode-labels", *args, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    saved = json.loads(next((tmp_path / "r/text_cache").glob("*.json")).read_text())
    assert saved["phrases"] == vocab
    stats = run_train(tiny(shards, tmp_path / "r", "optim.max_steps=2"))
    assert stats.phrases_encoded == 0 and stats.steps == 2
    fresh = run_train(tiny(shards, tmp_path / "fresh", "optim.max_steps=2"))
    assert fresh.phrases_encoded == len(vocab)
    assert [r["loss"] for r in losses(tmp_path / "r")] == [
        r["loss"] for r in losses(tmp_path / "fresh")
    ]
    res = CliRunner().invoke(app, ["encode-labels", *args])
    assert res.exit_code == 0 and "encoded" in res.output


@pytest.mark.gpu
def test_torchrun_on_gpu_with_nccl_resumes_like_an_uninterrupted_run(shards, tmp_path):
    """DDP over NCCL (one process per GPU, at most two), bf16 autocast, pinned batches, two
    loader workers: a run split at step 3 ends where an uninterrupted run does."""
    nproc = str(min(2, torch.cuda.device_count()))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def torchrun(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", nproc]
        cmd += ["-m", "trainer.cli", "run", "--preset", "tiny", "--shards", str(shards)]
        cmd += ["--output", str(out), "--steps", str(steps), "--device", "cuda"]
        for s in ("data.batch_size=4", "data.workers=2", "run.save_every=3", "run.log_every=1"):
            cmd += ["--set", s]
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    torchrun(tmp_path / "straight", 6)
    torchrun(tmp_path / "split", 3)
    torchrun(tmp_path / "split", 6, "--resume")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        for k in x["loss"]:
            assert x["loss"][k] == pytest.approx(y["loss"][k], rel=1e-3, abs=1e-4), (x["step"], k)


# --------------------------------------------------------------------------- guards a number needs


def test_an_infinite_loss_stops_the_run_as_nan_does(shards, tmp_path, monkeypatch):
    """Not only NaN: a loss of +inf (a log of zero, an overflow) stops the run at its step."""
    import dataclasses

    import trainer.methods as registry

    real_trained = registry.trained
    synseg = real_trained("synseg")
    real = synseg.objective

    def infinite_at_2(cfg):
        objective = real(cfg)

        class Inf(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner, self.calls = objective, 0

            def forward(self, *a, **k):
                terms = self.inner(*a, **k)
                self.calls += 1
                if self.calls == 2:
                    terms["total"] = terms["total"] + float("inf")
                return terms

        return Inf()

    patched = dataclasses.replace(synseg, objective=infinite_at_2)
    monkeypatch.setattr(
        registry, "trained", lambda name: patched if name == "synseg" else real_trained(name)
    )
    with pytest.raises(UserError, match="the loss is not finite from step 2"):
        run_train(tiny(shards, tmp_path / "inf", "optim.max_steps=3", "run.log_every=3"))
    assert not (tmp_path / "inf/checkpoints").exists()


@pytest.mark.parametrize("clip", [1e-3, 0.0])
def test_the_gradient_clip_bounds_the_first_update(shards, tmp_path, clip):
    """Plain SGD (no momentum, no decay, lr 1): the first step moves the trained weights by
    exactly the gradient, so with a clip its global norm is the clip; without one it is not."""
    from trainer import methods

    cfg = tiny(
        shards,
        tmp_path / "clip",
        "optim.max_steps=1",
        "optim.name=sgd",
        "optim.momentum=0",
        "optim.weight_decay=0",
        "optim.lr=1",
        f"optim.grad_clip={clip}",
    )
    run_train(cfg)
    torch.manual_seed(cfg.run.seed)  # the start the run built (trainer.train.loop._build)
    start = methods.trained(cfg.method).build(cfg.model).trainable_state_dict()
    after = load_file(str(tmp_path / "clip/checkpoints/step-0000001/model.safetensors"))
    moved = torch.sqrt(sum(((after[k] - v) ** 2).sum() for k, v in start.items()))
    if clip:
        assert moved == pytest.approx(clip, rel=1e-3)
    else:
        assert moved > 10 * 1e-3  # the gradient is far larger than the clip above


def test_each_rank_resumes_from_its_own_saved_position():
    """Rank r of a resumed DDP run continues from the stream position rank r saved."""
    from trainer.train.data import ShardSet
    from trainer.train.distributed import Ranks
    from trainer.train.loop import _Plan, _stream_start

    cfg = resolve("tiny", overrides=["data.workers=2"])
    ranks = [
        {"0": {"at": f"rank {r} worker 0"}, "1": {"at": f"rank {r} worker 1"}} for r in range(3)
    ]
    saved = {"epoch": 0, "batches": 5, "world": 3, "workers": 2, "ranks": ranks}
    plan = _Plan(ShardSet(["a", "b", "c"], 300), None, 10, 20, None, 5, 0, saved)
    for r in range(3):
        epoch, batch, resume = _stream_start(plan, cfg, Ranks(rank=r, world=3))
        assert (epoch, batch) == (0, 5) and resume == {"offset": 1, "workers": ranks[r]}
