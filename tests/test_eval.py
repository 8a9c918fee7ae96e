"""Inference logic with a model whose outputs are known, and eval on the world from the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from synseg.errors import UserError
from trainer.cli import app
from trainer.eval.infer import InferConfig, Segmenter, read_templates
from trainer.methods.synseg.model import DecoderScorer


class _Backbone:
    patch_size = 8

    def encode_text(self, texts):
        # embedding = a one-hot of the prompt's class name (text after the template's prefix)
        names = ["cat", "kitty", "dog", "sky"]
        return torch.stack([torch.eye(4)[[n in t for n in names].index(True)] for t in texts])


class _Model(torch.nn.Module):
    """Class 'cat'/'kitty' left half, 'dog' right half, 'sky' nowhere; plus a positional ramp."""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.calls = []

    def segment(self, images, classes, chunk=256):
        self.calls.append(images.shape)
        B, _, H, W = images.shape
        out = torch.full((B, classes.shape[0], H, W), -5.0)
        for k, e in enumerate(classes):
            which = int(e.argmax())
            if which in (0, 1):
                out[:, k, :, : W // 2] = 5.0 if which == 0 else 3.0
            elif which == 2:
                out[:, k, :, W // 2 :] = 5.0
        return out


def test_synonyms_take_the_best_name_and_slide_covers_the_image():
    model = _Model()
    seg = Segmenter(
        DecoderScorer(model),
        [["cat", "kitty"], ["dog"], ["sky"]],
        ["a photo of a {}."],
        InferConfig(short_side=16, window=16, stride=8),
    )
    probs = seg.class_probs(Image.new("RGB", (32, 16)), (16, 32))
    assert probs.shape == (3, 16, 32)
    # the image is 16 x 32: three 16x16 windows at x = 0, 8, 16 (one backbone batch)
    assert model.calls == [(3, 3, 16, 16)]
    assert torch.allclose(probs[0, :, 0], torch.sigmoid(torch.tensor(5.0)))  # 'cat' beats 'kitty'
    pred, act = seg.predict(Image.new("RGB", (32, 16)), (16, 32))
    assert pred[:, :4].tolist() == [[0] * 4] * 16 and pred[:, -4:].tolist() == [[1] * 4] * 16


def test_background_threshold():
    seg = Segmenter(
        DecoderScorer(_Model()),
        [["background"], ["cat"], ["sky"]],
        ["{}"],
        InferConfig(mode="whole", short_side=16, bg_threshold=0.5),
        background=True,
    )
    pred, _ = seg.predict(Image.new("RGB", (16, 16)), (16, 16))
    # left half: cat (label 1); right half: no class above 0.5 -> background 0
    assert (pred[:, :6] == 1).all() and (pred[:, 10:] == 0).all()


def test_templates_and_settings_errors(tmp_path):
    assert read_templates("clip7")[0] == "itap of a {}."
    bad = tmp_path / "t.txt"
    bad.write_text("a photo\n")
    with pytest.raises(UserError, match="needs exactly one \\{\\}"):
        read_templates(str(bad))
    with pytest.raises(UserError, match="not found"):
        read_templates("nope")
    with pytest.raises(UserError, match="--stride"):
        InferConfig(stride=500)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run


def test_eval_on_the_world_from_the_command_line(world, checkpoint):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            "world",
            "--data-root",
            str(world),
            "--checkpoint",
            str(checkpoint),
            "--limit",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "world: mIoU" in result.stdout
    ckpt = checkpoint / "checkpoints" / "step-0000002"
    record = json.loads((ckpt / "eval-world-synseg-tcl-first6.json").read_text())
    assert record["images"] == 6 and len(record["per_class"]) == 20
    assert 0 <= record["mIoU"] <= 1
    s = record["settings"]
    # The tcl protocol, scaled to the 64-px model: 448 / 448 / 224 become 128 / 128 / 64.
    want = {"short_side": 128, "long_side": 585, "window": 128, "stride": 64, "average": "prob"}
    assert {k: s["inference"][k] for k in want} == want
    assert s["inference"]["synonyms"] is False and s["inference"]["pamr"] == "off"
    assert s["method"] == "synseg" and s["protocol"] == "tcl"
    assert s["templates_used"] == read_templates("tcl9") and s["normalisation"] == "clip"
    md = (ckpt / "eval-world-synseg-tcl-first6.md").read_text()
    assert "| grass |" in md and f"{100 * record['mIoU']:.1f}" in md


def test_result_names_never_replace_another_evaluation(world, tmp_path):
    """A method and a protocol of one name, a --limit, and settings the name does not hold
    each keep their own file; the same evaluation again replaces its own."""
    runner = CliRunner()

    def run(*extra):
        args = ["eval", "--dataset", "world", "--data-root", str(world), "--output"]
        res = runner.invoke(app, [*args, str(tmp_path), "--mode", "whole", *extra])
        assert res.exit_code == 0, res.output
        return res.stdout

    run()
    run("--limit", "2")
    run("--method", "sclip", "--limit", "2")
    run("--protocol", "sclip", "--limit", "2")
    run("--protocol", "sclip", "--limit", "2", "--pamr")
    said = run("--limit", "2", "--templates", "single")
    assert "eval-world-synseg-tcl-first2-2.json" in "".join(said.split())  # it says where
    run("--limit", "2", "--templates", "single")  # the same again: replaces its own
    names = sorted(p.stem for p in tmp_path.glob("eval-*.json"))
    assert names == [
        "eval-world",
        "eval-world-sclip-tcl-first2",
        "eval-world-synseg-sclip-first2",
        "eval-world-synseg-sclip-pamr-first2",
        "eval-world-synseg-tcl-first2",
        "eval-world-synseg-tcl-first2-2",
    ]
    got = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in names}
    assert got["eval-world"]["images"] == 12 and got["eval-world-synseg-tcl-first2"]["images"] == 2
    assert got["eval-world-sclip-tcl-first2"]["settings"]["method"] == "sclip"
    assert got["eval-world-synseg-sclip-first2"]["settings"]["protocol"] == "sclip"
    assert got["eval-world-synseg-tcl-first2-2"]["settings"]["templates_used"] == [
        "a photo of a {}."
    ]
    assert got["eval-world-synseg-tcl-first2"]["settings"]["templates_used"] != ["a photo of a {}."]


def test_eval_of_an_untrained_model_and_errors(world, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "world",
            "--data-root",
            str(world),
            "--limit",
            "3",
            "--output",
            str(tmp_path),
            "--mode",
            "whole",
            "--set",
            "model.init_seed=3",
            "--set",
            "model.normalise=imagenet",
        ],
    )
    assert ok.exit_code == 0, ok.output
    settings = json.loads((tmp_path / "eval-world-synseg-tcl-first3.json").read_text())
    settings = settings["settings"]
    assert settings["checkpoint"] is None and settings["model"]["init_seed"] == 3
    assert settings["normalisation"] == "imagenet"
    bad = runner.invoke(app, ["eval", "--dataset", "voc", "--data-root", str(world)])
    assert bad.exit_code == 1 and "expected JPEGImages/" in bad.stderr
    bad = runner.invoke(
        app,
        ["eval", "--dataset", "world", "--data-root", str(world), "--checkpoint", str(tmp_path)],
    )
    assert bad.exit_code == 1 and "is not a checkpoint" in bad.stderr


def test_metric_matches_a_manual_count_on_the_world(world, checkpoint):
    """The eval loop feeds the metric what the segmenter predicts, image by image."""
    from trainer.eval.datasets import open_dataset
    from trainer.eval.evaluate import EvalConfig, run_eval
    from trainer.train.checkpoint import load_model

    cfg = EvalConfig(dataset="world", data_root=str(world), checkpoint=str(checkpoint), limit=4)
    res = run_eval(cfg)
    model, _ = load_model(checkpoint)
    data = open_dataset("world", world, limit=4)
    seg = Segmenter(DecoderScorer(model), data.classes, read_templates("tcl9"), cfg.inference(64))
    inter = np.zeros(20)
    union = np.zeros(20)
    for s in data.samples:
        img, lab = data.load(s)
        pred, _ = seg.predict(img, lab.shape)
        keep = lab != 255
        for c in range(20):
            inter[c] += np.sum((pred == c) & (lab == c) & keep)
            union[c] += np.sum(((pred == c) | (lab == c)) & keep)
    iou = inter[union > 0] / union[union > 0]
    assert res.mIoU == pytest.approx(iou.mean())


def test_segment_writes_an_overlay_and_one_map_per_class(world, checkpoint, tmp_path):
    img = world / "VOC2012" / "JPEGImages" / "val_000000.jpg"
    result = CliRunner().invoke(
        app,
        [
            "segment",
            str(img),
            "--classes",
            "grass, ball,sea water",
            "--checkpoint",
            str(checkpoint),
            "--output",
            str(tmp_path),
            "--threshold",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "val_000000_ball.png",
        "val_000000_grass.png",
        "val_000000_overlay.png",
        "val_000000_sea_water.png",
    ]
    size = Image.open(img).size
    assert Image.open(tmp_path / "val_000000_grass.png").size == size
    overlay = Image.open(tmp_path / "val_000000_overlay.png")
    assert overlay.height >= size[1] and overlay.width > size[0]  # the legend sits beside the image
    bad = CliRunner().invoke(app, ["segment", str(tmp_path / "missing.jpg"), "--classes", "a"])
    assert bad.exit_code == 1 and "cannot read image" in bad.stderr


def test_activation_map_outlines_the_thresholded_region():
    from trainer.eval.visualize import activation_map, overlay

    act = np.zeros((2, 100, 100))
    act[0, 40:70, 40:70] = 0.9
    act[1, :, :] = 0.2
    img = Image.new("RGB", (100, 100), "gray")
    m = np.asarray(activation_map(img, act[0], "cat", 0.5))
    white = (m == 255).all(-1)
    assert white[40:70, 69].all() and white[40:70, 39].all()  # the region's outline
    assert not white[45:65, 45:65].any() and not white[80:, 80:].any()
    o = np.asarray(overlay(img, act, ["cat", "dog"], 0.5))
    assert (o[55, 55] != o[90, 10]).any()  # the cat square is tinted, the rest (dog at 0.2) is not
    assert (o[90, 10] == 128).all()


def test_the_python_api_segments_as_eval_does(world, checkpoint):
    """``trainer.load(run).segment(image, classes)``: the labels and probabilities of eval's
    segmenter under the same protocol; background by the protocol's threshold; a
    training-free method; input refused in one line."""
    import numpy as np

    import trainer
    from trainer import methods
    from trainer.eval.evaluate import EvalConfig, build_model, resolve_device
    from trainer.eval.infer import Segmenter, read_templates

    img = world / "VOC2012" / "JPEGImages" / "val_000000.jpg"
    seg = trainer.load(checkpoint, device="cpu", dataset="world")
    classes = ["grass", ["sea", "water"], "ball"]
    labels, probs = seg.segment(img, classes)
    w, h = Image.open(img).size
    assert labels.shape == (h, w) and probs.shape == (3, h, w)
    model, train_cfg, _, method = build_model(str(checkpoint), "tiny", None, resolve_device("cpu"))
    infer = EvalConfig("world", str(world)).inference(model.native_size, method)
    scorer = methods.scorer(method, model, train_cfg, infer)
    want, act = Segmenter(
        scorer, [["grass"], ["sea", "water"], ["ball"]], read_templates("tcl9"), infer
    ).predict(Image.open(img), (h, w))
    assert np.array_equal(labels, want) and torch.allclose(probs, act.cpu())
    labels_bg, probs_bg = seg.segment(img, ["grass", "ball"], background=True)
    top = probs_bg.max(0)
    expected = torch.where(top.values <= infer.bg_threshold, 0, top.indices + 1).numpy()
    assert np.array_equal(labels_bg, expected) and probs_bg.shape == (2, h, w)
    free = trainer.load(method="sclip", protocol="sclip", dataset="world", device="cpu")
    labels_tf, probs_tf = free.segment(np.asarray(Image.open(img)), ["grass", "sky"])
    assert free.method == "sclip" and labels_tf.shape == (h, w)
    assert torch.allclose(probs_tf.sum(0), torch.ones(h, w), atol=1e-5)  # one softmax
    # every kind of method: an untrained ViL-Seg, CLIPSeg's decoder from released weights
    vilseg = trainer.load(method="vilseg", dataset="world", device="cpu")
    assert vilseg.segment(img, classes)[0].shape == (h, w)
    weights = checkpoint.parent / "decoder-weights.pth"
    torch.save(model.decoder.state_dict(), weights)  # CLIPSeg's layout: the decoder's names
    clipseg = trainer.load(method="clipseg", decoder_init=str(weights), dataset="world")
    assert clipseg.method == "clipseg" and clipseg.segment(img, classes)[1].shape == (3, h, w)
    with pytest.raises(UserError, match="at least one class"):
        seg.segment(img, [])
    with pytest.raises(UserError, match="takes no setting windows"):
        trainer.load(checkpoint, windows=3)
    with pytest.raises(UserError, match="must be \\(H, W, 3\\) uint8"):
        seg.segment(np.zeros((4, 4)), ["grass"])
