"""Bad input to synseg-train: one clear line, nothing trained or written by mistake.

Each test reproduces a failure a user met: it fails on the code before its fix.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
from cli_checks import one_error_line
from PIL import Image
from typer.testing import CliRunner

from pipeline.errors import UserError
from trainer.cli import app, picture_stems
from trainer.train import checkpoint
from trainer.train.config import resolve
from trainer.train.data import ShardSet, ShardStream
from trainer.train.loop import run_train

runner = CliRunner()
CLASSES = "grass,sand,water,snow,ball,kite,house,tree,car,fish"


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny(shards, out, *extra):
    return resolve(
        "tiny",
        overrides=[f"data.shards={shards}", f"run.output={out}", "data.batch_size=8", *extra],
    )


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(tiny(shards, out, "optim.max_steps=3", "run.log_every=1"))
    return out


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "-3"], "optim.max_steps must be at least 0"),
        (["--set", "optim.lr=-0.1"], "optim.lr must be positive"),
        (["--set", "optim.momentum=1.5"], "optim.momentum must be below 1"),
        (["--set", "data.workers=-1"], "data.workers must be at least 0"),
        (["--set", "run.log_every=0"], "run.log_every must be at least 1"),
    ],
)
def test_bad_settings_are_one_line(shards, tmp_path, args, needle):
    out = tmp_path / "run"
    one_error_line(
        cli("run", "--preset", "tiny", "--shards", shards, "--output", out, *args), needle
    )
    assert not out.exists(), "nothing trained, nothing written"


@pytest.mark.parametrize(
    "content, needle",
    [
        (b'[{"optim": {"lr": 0.1}}]', "must hold a JSON object"),
        (b'"adamw"', "must hold a JSON object"),
        (b'{"optim": {"lr": 0.1}}\xff\xfe', "not UTF-8"),
    ],
)
def test_bad_config_files_are_one_line(shards, tmp_path, content, needle):
    f = tmp_path / "c.json"
    f.write_bytes(content)
    one_error_line(
        cli("run", "--preset", "tiny", "--shards", shards, "--config", f, "--output", tmp_path),
        needle,
    )


# --------------------------------------------------------------------------- resume


def test_resuming_a_finished_run_trains_and_logs_nothing(shards, finished):
    log = (finished / "metrics.jsonl").read_text()
    result = cli(
        "run",
        "--preset",
        "tiny",
        "--shards",
        shards,
        "--output",
        finished,
        "--steps",
        3,
        "--set",
        "data.batch_size=8",
        "--set",
        "run.log_every=1",
        "--resume",
    )
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.stderr and "step 3 of 3" in result.stderr
    assert (finished / "metrics.jsonl").read_text() == log, "no step-4 line"
    assert [json.loads(x)["step"] for x in log.splitlines()] == [1, 2, 3]
    assert (finished / "checkpoints/latest").read_text().strip() == "step-0000003"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_optimizer_state_is_loaded_without_running_code(finished, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "owned"
    evil = _RunsCode()
    evil.marker = marker
    torch.save({"optimizer": evil, "step": 1, "epoch": 0}, ckpt / "optimizer.pt")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UserError, match="optimizer.pt cannot be loaded"):
        checkpoint.load_optimizer(opt, ckpt)
    assert not marker.exists()
    # The real file loads as it is.
    real = checkpoint.find(finished)
    state = torch.load(real / "optimizer.pt", weights_only=True)
    model_opt = torch.optim.AdamW(
        [
            torch.nn.Parameter(torch.zeros(p["exp_avg"].shape))
            for p in state["optimizer"]["state"].values()
        ],
        lr=1e-3,
    )
    assert checkpoint.load_optimizer(model_opt, real) == (3, 0)


# --------------------------------------------------------------------------- training data


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "labels, usable",
    [
        ("tree", False),  # a string, not a list: would train on t, r, e
        ([1, None], False),
        (["tree", ""], False),
        ([], False),
        (["tree", "sports car"], True),
    ],
)
def test_training_samples_need_a_list_of_phrases(labels, usable):
    stream = ShardStream(ShardSet([], 0), 16, 2, 8, 0, 10)
    sample = {"json": json.dumps({"labels": labels, "caption": "x"}).encode(), "jpg": _jpg()}
    item = stream._decode(sample, random.Random(0))
    assert (item is not None) is usable
    if usable:
        assert item[1] == labels


# --------------------------------------------------------------------------- eval and segment


def test_eval_checks_its_class_file_and_options(world, tmp_path):
    base = ["eval", "--dataset", "world", "--data-root", world, "--output", tmp_path]
    extra = tmp_path / "more.txt"
    extra.write_text((world / "classes.txt").read_text() + "zebra\n")
    n = len((world / "classes.txt").read_text().split())
    one_error_line(cli(*base, "--classes", extra), f"has {n + 1} classes; world labels have {n}")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    one_error_line(cli(*base, "--classes", binary), "not UTF-8")
    one_error_line(cli(*base, "--limit", -1), "--limit must not be negative")
    one_error_line(cli(*base, "--bg-threshold", 2), "--bg-threshold")
    bad = tmp_path / "d.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    one_error_line(cli(*base, "--decoder-init", bad), "not a readable safetensors file")


def _bomb(path: Path) -> None:
    """A valid PNG header claiming 100000 x 100000 pixels: Pillow refuses it as a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_segment_refuses_a_decompression_bomb(tmp_path):
    _bomb(tmp_path / "bomb.png")
    one_error_line(
        cli("segment", tmp_path / "bomb.png", "--classes", "cat", "--output", tmp_path),
        "cannot read image",
    )


def test_segment_keeps_images_with_the_same_name_apart(world, tmp_path):
    val = sorted((world / "VOC2012" / "JPEGImages").glob("val_*.jpg"))[:2]
    for folder, src in zip(("a", "b"), val, strict=True):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jpg").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    result = cli(
        "segment",
        tmp_path / "a" / "x.jpg",
        tmp_path / "b" / "x.jpg",
        "--classes",
        "grass,ball",
        "--output",
        out,
        "--set",
        "data.image_size=64",
    )
    assert result.exit_code == 0, result.output
    overlays = sorted(p.name for p in out.glob("*_overlay.png"))
    assert overlays == ["a_x_overlay.png", "b_x_overlay.png"]
    a, b = (Image.open(out / n).convert("RGB") for n in overlays)
    assert a.tobytes() != b.tobytes(), "each picture is its own image's"


def test_picture_stems():
    assert picture_stems([Path("a/x.jpg"), Path("b/x.jpg"), Path("y.png")]) == [
        "a_x",
        "b_x",
        "y",
    ]
    assert picture_stems([Path("q/a/x.jpg"), Path("r/a/x.jpg")]) == ["q_a_x", "r_a_x"]
    assert picture_stems([Path("a/x.jpg"), Path("a/x.jpg")]) == ["x", "x-2"]


def test_a_resumed_run_removes_what_a_killed_one_left(shards, tmp_path):
    out = tmp_path / "run"
    run_train(tiny(shards, out, "optim.max_steps=1"))
    stale = [
        out / ".config.json.k1ll3d.tmp",
        out / ".metrics.jsonl.k1ll3d.tmp",
        out / "text_cache" / ".0123abcd.safetensors.k1ll3d.tmp",
        out / "checkpoints" / ".step-0000002.tmp",
    ]
    for p in stale[:3]:
        p.write_text("half")
    stale[3].mkdir()
    stats = run_train(tiny(shards, out, "optim.max_steps=2"), resume=True)
    assert stats.start_step == 1 and stats.steps == 2
    assert not [p for p in stale if p.exists()]
    assert not list(out.rglob(".*.tmp"))
