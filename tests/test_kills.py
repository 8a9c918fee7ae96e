"""The kill harness: every data stage and `synseg-train run`, killed (SIGKILL) and interrupted
(SIGINT, as Ctrl-C sends to the terminal's process group) at random points, then run again as a
user would, until it finishes.

Each stage runs as its own command in its own process group. A kill is sent only once the run
has made progress of its own (a shard, a manifest, a checkpoint), after a random delay, so
kills land in the middle of the stage. At the end: every sample is present exactly once, the
outputs equal an uninterrupted run's, no temporary file is left, and every resumed training
run started at its latest checkpoint. `pytest -s tests/test_kills.py` prints the figures.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.download import done_shards, read_status
from pipeline.filter import FilterConfig, run_filter
from pipeline.nouns import NounsConfig, run_extract_nouns
from pipeline.pack import PackConfig, run_pack
from pipeline.serve import free_port, serving
from pipeline.world import WorldConfig, load_world, run_world

ROOT = Path(__file__).resolve().parents[1]
KILLS_PER_STAGE = 3  # 15 in all over the five commands
PER_SHARD = 50


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}


def _temporaries(*folders: Path) -> list[Path]:
    return [
        p
        for f in folders
        for p in f.rglob("*")
        if (p.name.startswith(".") and p.name.endswith(".tmp")) or p.name == "_tmp"
    ]


class Harness:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.events: list[dict] = []

    def run_until_done(
        self,
        stage: str,
        command: Callable[[], list[str]],
        progress: Callable[[], int],
        total: int,
        kills: int = KILLS_PER_STAGE,
        jitter: float = 0.4,
        timeout: float = 240,
        hint: Callable[[int], str] = lambda before: "run the same command again",
    ) -> list[tuple[int, str]]:
        """Start ``command()`` again and again until it exits 0; kill the first ``kills`` runs
        once they have made progress. Returns (progress at its start, stdout) of every run.
        An interrupted run's last line says how to go on: ``hint(progress at its start)``."""
        outputs = []
        for attempt in range(kills + 6):
            before = progress()
            proc = subprocess.Popen(
                command(),
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group, like a terminal job
            )
            event = None
            try:
                if attempt < kills:
                    deadline = time.time() + timeout
                    while proc.poll() is None and progress() <= before:
                        if time.time() > deadline:
                            raise AssertionError(f"{stage} made no progress in {timeout} s")
                        time.sleep(0.005)
                    if proc.poll() is None:
                        time.sleep(self.rng.uniform(0, jitter))
                        sig = self.rng.choice([signal.SIGKILL, signal.SIGINT])
                        done = progress()
                        os.killpg(proc.pid, sig)
                        event = {"stage": stage, "signal": sig.name, "done": done, "of": total}
                out, err = proc.communicate(timeout=timeout)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            outputs.append((before, out))
            if event is not None:
                event["rc"] = proc.returncode
                self.events.append(event)
                if event["signal"] == "SIGINT" and proc.returncode != 0:
                    # One line that says how to go on, and the exit code of an interrupt.
                    assert proc.returncode == 130, err[-2000:]
                    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
                    assert hint(before) in " ".join(err.split()), err[-2000:]
            if proc.returncode == 0:
                return outputs
            if event is None:
                raise AssertionError(f"{stage} failed without a kill:\n{err[-3000:]}")
        raise AssertionError(f"{stage} never finished")


@pytest.fixture(scope="module")
def big_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("killworld") / "world"
    run_world(
        WorldConfig(
            output=out,
            count=1000,
            val_count=4,
            ref_count=4,
            size=64,
            port=free_port(),
            dead_fraction=0.03,
            broken_fraction=0.01,
        )
    )
    return out


def _count(folder: Path, pattern: str) -> Callable[[], int]:
    return lambda: len(list(folder.glob(pattern))) if folder.is_dir() else 0


def _tar_uids(folder: Path) -> list[str]:
    uids = []
    for t in sorted(folder.glob("train-*.tar")):
        with tarfile.open(t) as tar:
            uids += [m.name.rsplit(".", 1)[0] for m in tar if m.name.endswith(".json")]
    return uids


def test_kill_every_stage_and_rerun(big_world, tmp_path):
    h = Harness(seed=20261130)
    py = sys.executable
    raw, nouns, labels, shards, run = (
        tmp_path / "raw",
        tmp_path / "nouns",
        tmp_path / "labels",
        tmp_path / "shards",
        tmp_path / "run",
    )
    kinds = load_world(big_world)["url_kinds"]
    n_shards = -(-len(kinds) // PER_SHARD)
    data = [py, "-m", "pipeline.cli"]

    with serving(big_world, load_world(big_world)["port"]):
        h.run_until_done(
            "download",
            lambda: [
                *data,
                "download",
                "--url-list",
                str(big_world / "cc12m.tsv"),
                "--output",
                str(raw),
                "--samples-per-shard",
                str(PER_SHARD),
                "--image-size",
                "64",
                "--threads",
                "2",
                "--timeout",
                "3",
            ],
            _count(raw, "*_stats.json"),
            n_shards,
        )
    status = read_status(raw).to_pylist()
    ok = [r["uid"] for r in status if r["status"] == "success"]
    assert len(ok) == len(set(ok)) == kinds.count("ok"), "every image downloaded exactly once"
    assert len(status) == len({r["uid"] for r in status}) == len(kinds)

    h.run_until_done(
        "extract-nouns",
        lambda: [*data, "extract-nouns", "--raw", str(raw), "--output", str(nouns)],
        _count(nouns, "*.parquet"),
        n_shards,
    )
    h.run_until_done(
        "filter",
        lambda: [*data, "filter", "--nouns", str(nouns), "--output", str(labels)],
        _count(labels, "*.parquet"),
        n_shards,
        jitter=0.01,  # the fastest stage: a few milliseconds a shard
    )
    h.run_until_done(
        "pack",
        lambda: [
            *data,
            "pack",
            "--raw",
            str(raw),
            "--labels",
            str(labels),
            "--output",
            str(shards),
            "--image-size",
            "64",
            "--max-count",
            "20",
        ],
        _count(shards / "_pack", "*.json"),
        n_shards,
    )

    # The outputs equal an uninterrupted run's, sample for sample.
    ref = tmp_path / "ref"
    run_extract_nouns(NounsConfig(raw=raw, output=ref / "nouns"))
    run_filter(FilterConfig(nouns=ref / "nouns", output=ref / "labels"))
    run_pack(
        PackConfig(
            raw=raw, labels=ref / "labels", output=ref / "shards", image_size=64, max_count=20
        )
    )
    for name, got, want in (("nouns", nouns, ref / "nouns"), ("labels", labels, ref / "labels")):
        files = sorted(p.name for p in want.glob("*.parquet"))
        assert sorted(p.name for p in got.glob("*.parquet")) == files, name
        for f in files:
            assert pq.read_table(got / f).equals(pq.read_table(want / f)), f"{name}/{f}"
    uids = _tar_uids(shards)
    assert len(uids) == len(set(uids)), "no sample packed twice"
    assert sorted(uids) == sorted(_tar_uids(ref / "shards")), "no sample lost"
    assert json.loads((shards / "sizes.json").read_text()) == json.loads(
        (ref / "shards" / "sizes.json").read_text()
    )
    for t in sorted(shards.glob("train-*.tar")):
        assert t.read_bytes() == (ref / "shards" / t.name).read_bytes(), t.name
    assert len(done_shards(raw)) == n_shards

    # Training: a run killed at random points and resumed with --resume as a user would.
    steps = 24

    def train() -> list[str]:
        resume = ["--resume"] if (run / "checkpoints" / "latest").exists() else []
        return [
            py,
            "-m",
            "trainer.cli",
            "run",
            "--preset",
            "tiny",
            "--shards",
            str(shards),
            "--output",
            str(run),
            "--steps",
            str(steps),
            "--set",
            "data.batch_size=8",
            "--set",
            "run.save_every=3",
            *resume,
        ]

    def latest() -> int:
        f = run / "checkpoints" / "latest"
        return int(f.read_text().strip().split("-")[1]) if f.exists() else 0

    def how_to_go_on(before: int) -> str:
        """A run started without --resume (no checkpoint then) that saved one before the
        interrupt needs --resume now; any other goes on as it was started."""
        if before == 0 and (run / "checkpoints" / "latest").exists():
            return "run the same command with --resume to go on"
        return "run the same command again to go on"

    runs = h.run_until_done("train", train, latest, steps, hint=how_to_go_on)
    # The run that finished resumed at the latest checkpoint the killed runs left.
    before, out = runs[-1]
    start = re.search(r"start_step\D+(\d+)", out)
    assert start and int(start.group(1)) == before > 0, out
    assert latest() == steps
    log = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert log == list(range(1, steps + 1)), "every step logged exactly once"

    assert not _temporaries(raw, nouns, labels, shards, run), "no temporary file left behind"
    kills = len(h.events)
    mid = [e for e in h.events if 0 < e["done"] < e["of"]]
    assert kills >= 10 and len(mid) >= 8, h.events
    print(f"\nkill harness: {kills} kills, {len(mid)} mid-stage")
    for e in h.events:
        print(f"  {e['stage']:14s} {e['signal']:8s} at {e['done']}/{e['of']}  exit {e['rc']}")


def _fake_ade(root: Path, n: int) -> None:
    """``n`` small ADE20K-layout validation pairs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        stem = f"ADE_val_{i:08d}"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            root / "images/validation" / f"{stem}.jpg"
        )
        Image.fromarray(rng.integers(0, 151, (24, 32), dtype=np.uint8)).save(
            root / "annotations/validation" / f"{stem}.png"
        )


def _cache_phrases(folder: Path) -> Callable[[], int]:
    def count() -> int:
        metas = list(folder.glob("*.json")) if folder.is_dir() else []
        return len(json.loads(metas[0].read_text())["phrases"]) if metas else 0

    return count


def test_kill_prepare_encode_labels_and_eval_and_rerun(shards, world, tmp_path):
    """prepare, encode-labels and eval, killed and interrupted mid-way and run again: each
    output equals an uninterrupted run's, and no result or temporary is half-written."""
    from safetensors.torch import load_file

    from trainer.eval.evaluate import EvalConfig, run_eval
    from trainer.eval.prepare import PrepareConfig, run_prepare

    py, h = sys.executable, Harness(seed=11)
    # prepare: the label maps written so far are the progress
    src, out = tmp_path / "ADEChallengeData2016", tmp_path / "ade"
    _fake_ade(src, 400)
    ref = run_prepare(PrepareConfig("ade", str(src), str(tmp_path / "ade-ref")))
    cmd = [py, "-m", "trainer.cli", "prepare", "ade", "--source", str(src), "--output", str(out)]
    cmd += ["--processes", "1"]
    h.run_until_done(
        "prepare", lambda: cmd, _count(out, "annotations/validation/*.png"), 400, jitter=0.3
    )
    got = json.loads((out / "prepare-ade.json").read_text())
    assert got["label_sha256"] == ref.label_sha256 and got["images"] == 400
    for f in sorted((tmp_path / "ade-ref").rglob("*.*")):
        if not f.name.startswith("prepare-"):
            assert (out / f.relative_to(tmp_path / "ade-ref")).read_bytes() == f.read_bytes()

    # encode-labels on a vocabulary of 2,000 phrases: what it has saved is the progress
    import shutil

    import pyarrow as pa

    big = tmp_path / "shards"
    shutil.copytree(shards, big)
    things = ["kite", "house", "tree", "car", "fish", "boat", "wall", "road", "star", "ball"]
    adjectives = ("red", "tall", "old", "wet")
    words = [f"{a} {n} {t}" for a in adjectives for n in range(50) for t in things]
    table = pa.table({"phrase": words, "images": [1] * len(words)})
    pq.write_table(table, big / "vocabulary.parquet")
    vocab_run = tmp_path / "enc"

    def encode(output: Path) -> list[str]:
        cmd = [py, "-m", "trainer.cli", "encode-labels", "--preset", "tiny", "--shards", str(big)]
        cmd += ["--output", str(output), "--device", "cpu", "--set", "run.encode_batch=4"]
        return [*cmd, "--set", "run.encode_save_every=0.05"]

    h.run_until_done(
        "encode-labels",
        lambda: encode(vocab_run),
        _cache_phrases(vocab_run / "text_cache"),
        len(words),
        jitter=1.0,
    )
    subprocess.run(
        encode(tmp_path / "enc-ref"), cwd=ROOT, env=_env(), check=True, capture_output=True
    )
    a, b = (sorted((r / "text_cache").glob("*.json")) for r in (vocab_run, tmp_path / "enc-ref"))
    assert [x.name for x in a] == [x.name for x in b]
    pa_, pb = (json.loads(x[0].read_text())["phrases"] for x in (a, b))
    ta, tb = (load_file(str(x[0].with_suffix(".safetensors")))["embeddings"] for x in (a, b))
    order = {p: i for i, p in enumerate(pb)}
    assert sorted(pa_) == sorted(pb) and len(pa_) == len(set(pa_))
    assert all((ta[i] == tb[order[p]]).all() for i, p in enumerate(pa_))

    # eval: nothing is written before the end, so a kill at a random time leaves nothing
    ev = tmp_path / "ev"
    eval_cmd = [
        py,
        "-m",
        "trainer.cli",
        "eval",
        "--dataset",
        "world",
        "--data-root",
        str(world),
        "--output",
        str(ev),
        "--mode",
        "whole",
    ]
    for delay in (1.0, 3.0):
        proc = subprocess.Popen(
            eval_cmd,
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not list(ev.glob("eval-*.json")) or proc.returncode == 0
    subprocess.run(eval_cmd, cwd=ROOT, env=_env(), check=True, capture_output=True)
    run_eval(EvalConfig("world", str(world), output=str(tmp_path / "ev-ref"), mode="whole"))
    got, want = (json.loads((f / "eval-world.json").read_text()) for f in (ev, tmp_path / "ev-ref"))
    for r in (got, want):
        r.pop("images_per_second")
        r["settings"].pop("output")
    assert got == want
    assert not _temporaries(out, vocab_run, ev), "no temporary file left behind"
    print(f"\nkill harness: {len(h.events)} kills")
    for e in h.events:
        print(f"  {e['stage']:14s} {e['signal']:8s} at {e['done']}/{e['of']}  exit {e['rc']}")
