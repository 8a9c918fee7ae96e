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

from synseg.errors import UserError
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


def test_a_deleted_training_shard_is_named_not_skipped(shards, tmp_path):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    sizes = json.loads((copy / "sizes.json").read_text())
    gone = sorted(n for n, k in sizes.items() if k > 0)[1]
    (copy / gone).unlink()
    one_error_line(
        cli("run", "--preset", "tiny", "--shards", copy, "--output", tmp_path / "run"),
        f"lacks 1 of the shards its sizes.json counts ({gone})",
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    (copy / "sizes.json").write_text("[1, 2]")
    one_error_line(
        cli("run", "--preset", "tiny", "--shards", copy, "--output", tmp_path / "run"),
        "sizes.json cannot be read",
    )


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_a_resume(shards, tmp_path):
    out = tmp_path / "run"
    run_train(tiny(shards, out, "optim.max_steps=2", "run.log_every=1"))
    log = out / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 3, "lo')  # killed while writing step 3's line
    stats = run_train(tiny(shards, out, "optim.max_steps=3", "run.log_every=1"), resume=True)
    assert stats.start_step == 2 and stats.steps == 3
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
    # a damaged line inside the log is not a kill's: refused, naming it
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl, line 2, is not a metrics record"):
        run_train(tiny(shards, out, "optim.max_steps=4", "run.log_every=1"), resume=True)


def test_segment_keeps_every_class_map_apart(world, tmp_path):
    """Names that give one file name ("a/b", "a b", "a?b"), a class called overlay, names of
    other scripts: each map its own file, the overlay kept, and the numbered ones said."""
    img = sorted((world / "VOC2012" / "JPEGImages").glob("val_*.jpg"))[0]
    out = tmp_path / "out"
    names = ["a/b", "a b", "a?b", "overlay", "猫", "犬", "A_B"]
    result = cli(
        "segment",
        img,
        "--classes",
        ",".join(names),
        "--output",
        out,
        "--set",
        "data.image_size=64",
    )
    assert result.exit_code == 0, result.output
    stem = img.stem
    got = sorted(p.name for p in out.glob("*.png"))
    parts = ["a_b", "a_b-2", "a_b-3", "overlay-2", "猫", "犬", "A_B-4"]
    assert got == sorted([f"{stem}_overlay.png", *(f"{stem}_{p}.png" for p in parts)])
    said = " ".join(result.stdout.split())
    assert "class 'a b': its maps are named <image>_a_b-2.png" in said
    assert "class 'overlay': its maps are named <image>_overlay-2.png" in said
    # each map is its own class's: the legend text differs, so the pictures do
    pictures = {p: Image.open(out / f"{stem}_{p}.png").tobytes() for p in parts}
    assert len(set(pictures.values())) == len(parts)
    one_error_line(cli("segment", img, "--classes", "cat,dog,cat"), "'cat' more than once")


def test_a_class_file_naming_one_class_twice_is_refused(world, tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("grass\nsand, beach\nball\nsand, dune\n")
    one_error_line(
        cli("eval", "--dataset", "world", "--data-root", world, "--classes", f),
        "classes 1 and 3 are both named 'sand'",
    )


def test_ctrl_c_says_how_to_go_on(shards, finished, tmp_path, monkeypatch):
    """After a checkpoint, the same command is refused without --resume: Ctrl-C says so; with
    no checkpoint yet (or under --resume) the same command again goes on."""
    import trainer.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run_train", interrupted)
    base = ["run", "--preset", "tiny", "--shards", shards, "--set", "data.batch_size=8"]
    for output, extra, hint in [
        (finished, [], "run the same command with --resume to go on"),
        (finished, ["--resume"], "run the same command again to go on"),
        (tmp_path / "new", [], "run the same command again to go on"),
    ]:
        result = cli(*base, "--output", output, *extra)
        assert result.exit_code == 130, result.output
        assert hint in " ".join(result.stderr.split()), result.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--stride", "100000"], "--stride at most --window (here 128, 128 and 100000"),
        (["--window", "8"], "--window must be at least 16"),
        (["--logit-scale", "nan"], "--logit-scale must be a finite number"),
        (["--logit-scale", "inf"], "--logit-scale must be a finite number"),
        (["--logit-scale", "-1"], "--logit-scale must be a finite number"),
        (["--bg-threshold", "nan"], "--bg-threshold must be in [0, 1]"),
        (["--bg-threshold", "0.5"], "world has no background class"),
    ],
)
def test_eval_refuses_options_that_would_score_nonsense(world, tmp_path, args, needle):
    base = ["eval", "--dataset", "world", "--data-root", world, "--output", tmp_path]
    one_error_line(cli(*base, "--limit", 2, *args), needle)
    assert not list(tmp_path.glob("eval-*.json"))


def test_eval_zeros_mean_the_protocols_values(world):
    """0 for --window, --stride and --short-side is the protocol's value, 0 for --limit every
    image: the same as leaving them out."""
    from trainer.eval.evaluate import EvalConfig

    given = EvalConfig("world", str(world), window=0, stride=0, short_side=0).inference(224)
    assert given == EvalConfig("world", str(world)).inference(224)
    assert (given.window, given.stride, given.short_side) == (448, 224, 448)
    from trainer.eval.datasets import open_dataset

    assert len(open_dataset("world", world, limit=0).samples) == 12


@pytest.mark.parametrize(
    "template, needle",
    [
        ("a {} and a {}", "needs exactly one {}"),
        ("a photo of {name}", "needs exactly one {}"),
        ("a photo of a {0}", "needs exactly one {}"),
        ("a {} with { brace", "is not a template"),
        ("no field", "needs exactly one {}"),
    ],
)
def test_templates_with_other_fields_are_one_line(shards, world, tmp_path, template, needle):
    f = tmp_path / "t.txt"
    f.write_text(f"a photo of a {{}}.\n{template}\n")
    base = ["eval", "--dataset", "world", "--data-root", world, "--output", tmp_path]
    one_error_line(cli(*base, "--templates", f), needle)
    one_error_line(
        cli(
            "run",
            "--preset",
            "tiny",
            "--shards",
            shards,
            "--output",
            tmp_path / "r",
            "--set",
            f"data.template={template}",
        ),
        needle,
    )
    assert not (tmp_path / "r").exists()


def test_templates_that_are_not_utf8_are_one_line(world, tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a photo of a \xff{}.\n")
    base = ["eval", "--dataset", "world", "--data-root", world, "--output", tmp_path]
    one_error_line(cli(*base, "--templates", f), "are not UTF-8 text")


def _spoil_stream(stream: dict, how: str) -> object:
    state = stream["ranks"][0]["0"]
    if how == "no rng":
        del state["rng"]
    elif how == "no ranks":
        del stream["ranks"]
    elif how == "a list":
        return [stream]
    elif how == "buffer past its shard":
        state["buffer"] = [[0, 10_000]]
    elif how == "next past its shard":
        state["next"] = [0, 10_000]
    elif how == "next past the last shard":
        state["next"] = [99, 0]
    return stream


@pytest.fixture(scope="module")
def midway(shards, tmp_path_factory):
    """A run stopped at step 2, mid-epoch: a resume reads its saved stream position."""
    out = tmp_path_factory.mktemp("midway") / "run"
    run_train(tiny(shards, out, "optim.max_steps=2", "run.log_every=1"))
    return out


@pytest.mark.parametrize(
    "how, needle",
    [
        ("no rng", "random state is missing"),
        ("no ranks", "no position for every rank"),
        ("a list", "not an object"),
        ("buffer past its shard", "past the end of its shards"),
        ("next past its shard", "past the end of its shards"),
        ("next past the last shard", "past the end of its shards"),
    ],
)
def test_a_damaged_stream_position_is_one_line(shards, midway, tmp_path, how, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(midway, run)
    path = run / "checkpoints/step-0000002/stream.json"
    path.write_text(json.dumps(_spoil_stream(json.loads(path.read_text()), how)))
    result = cli(
        "run",
        "--preset",
        "tiny",
        "--shards",
        shards,
        "--output",
        run,
        "--steps",
        3,
        "--set",
        "data.batch_size=8",
        "--set",
        "run.log_every=1",
        "--resume",
    )
    one_error_line(result, needle)
    assert "delete" in result.stderr


def test_no_checkpoint_holds_non_finite_weights(shards, tmp_path):
    from trainer.train import checkpoint as ckpt_mod

    class Tiny(torch.nn.Linear):
        def trainable_state_dict(self):
            return self.state_dict()

    model = Tiny(2, 2)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(UserError, match="step 5: 1 trained tensors hold NaN or infinite values"):
        ckpt_mod.save(tmp_path, 5, model, opt, 0, {}, {})
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_pretrained_weights_that_run_code_are_one_line(shards, tmp_path):
    marker = tmp_path / "owned"
    evil = _RunsCode()
    evil.marker = marker
    torch.save({"state_dict": evil}, tmp_path / "clip.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for f in ("clip.pt", "text.pt"):
        one_error_line(
            cli(
                "run",
                "--preset",
                "tiny",
                "--shards",
                shards,
                "--output",
                tmp_path / "r",
                "--set",
                f"model.pretrained={tmp_path / f}",
            ),
            "not a checkpoint torch reads without running code",
        )
    assert not marker.exists()


@pytest.mark.parametrize("size", [(1, 40), (40, 1), (1, 1)])
def test_segment_on_a_one_pixel_wide_image(tmp_path, size):
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "thin.png")
    out = tmp_path / "out"
    result = cli(
        "segment",
        tmp_path / "thin.png",
        "--classes",
        "cat,dog",
        "--output",
        out,
        "--set",
        "data.image_size=64",
    )
    assert result.exit_code == 0, result.output
    assert (out / "thin_overlay.png").is_file()  # the image and its legend
    for part in ("cat", "dog"):
        assert Image.open(out / f"thin_{part}.png").size == size
