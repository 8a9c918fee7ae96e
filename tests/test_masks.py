"""Mask supervision as a mode of the one trainer, and the physically-guided losses
(shared/seeds/003): the patch weights, L_sac and the focal loss against direct float64
implementations, Canny targets against OpenCV, the mask-edge targets, the readers' train
splits, resumes, and the README's command lines."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from pipeline.world import UNSEEN
from synseg.errors import UserError
from tests.test_prepare import _jpeg, _png
from trainer.cli import app
from trainer.eval.datasets import open_dataset
from trainer.eval.prepare import COCO_USED, PrepareConfig, run_prepare
from trainer.train.checkpoint import find
from trainer.train.config import resolve
from trainer.train.loop import run_train
from trainer.train.masks import MaskSet, epoch_batches, mask_loss
from trainer.train.physical import (
    PREFIX,
    AuxiliaryLosses,
    StructureHead,
    auxiliary_terms,
    canny,
    mask_edges,
    patch_align_loss,
    patch_weights,
    sigmoid_focal,
)

runner = CliRunner()


# --------------------------------------------------------------------------- the weights


def test_patch_weights_of_a_patch_split_three_to_one():
    """A 4x4 patch, 12 pixels of class 2 and 4 of class 0; a second patch all class 1 with
    half its pixels unlabelled; a third with none labelled."""
    labels = torch.full((1, 4, 12), 1, dtype=torch.long)
    labels[0, :, :4] = 2
    labels[0, 0, :4] = 0  # a row of 4 pixels: 12 : 4
    labels[0, :2, 4:8] = 255  # half unlabelled: the share is of the labelled pixels
    labels[0, :, 8:] = 255
    w = patch_weights(labels, 3, (1, 3))
    assert w.dtype == torch.float64 and w.shape == (1, 3, 1, 3)
    assert w[0, :, 0, 0].tolist() == [0.25, 0.0, 0.75]
    assert w[0, :, 0, 1].tolist() == [0.0, 1.0, 0.0]
    assert w[0, :, 0, 2].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="do not divide"):
        patch_weights(labels, 3, (3, 3))


def _direct_patch_align(logits: np.ndarray, labels: np.ndarray, grid) -> float:
    """Eq. 3 with its -log, written out: for every patch with a labelled pixel, the pixel
    counts per class over its labelled pixels, the softmax over classes, the weighted sum."""
    B, C, h, w = logits.shape
    ph, pw = labels.shape[1] // grid[0], labels.shape[2] // grid[1]
    total, n = 0.0, 0
    for b in range(B):
        for i in range(h):
            for j in range(w):
                patch = labels[b, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].ravel()
                patch = patch[patch != 255]
                if not len(patch):
                    continue
                e = np.exp(logits[b, :, i, j] - logits[b, :, i, j].max())
                p = e / e.sum()
                weights = np.array([(patch == c).sum() / len(patch) for c in range(C)])
                total += -math.log((weights * p).sum())
                n += 1
    return total / n


def test_patch_align_loss_equals_equation_three_with_its_log():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 5, (2, 12, 16), generator=g)
    labels[0, :4, :4] = 255  # a patch with no labelled pixel is left out
    labels[1, 4:8, :] = torch.where(torch.rand(4, 16, generator=g) < 0.5, 255, 2)
    w = patch_weights(labels, 5, (3, 4))
    got = patch_align_loss(logits, w)
    want = _direct_patch_align(logits.numpy(), labels.numpy(), (3, 4))
    assert got.item() == pytest.approx(want, rel=1e-12)
    # the patch without labels gives no NaN gradient
    x = logits.clone().requires_grad_(True)
    patch_align_loss(x, w).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0, :, 0, 0] == 0).all()
    # not the paper's printed ratio (its maximum is the loss's minimum)
    ratio = (w * torch.softmax(logits, 1)).sum(1)
    assert got.item() != pytest.approx(-ratio[w.sum(1) > 0].mean().item())


def test_focal_loss_is_its_formula():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 9, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(3, 7, 9, generator=g) < 0.2).double()
    for alpha, gamma in ((0.25, 2.0), (0.5, 0.0), (0.9, 3.0)):
        got = sigmoid_focal(x, t, alpha, gamma)
        p = 1 / (1 + np.exp(-x.numpy()))
        want = np.where(
            t.numpy() == 1,
            -alpha * (1 - p) ** gamma * np.log(p),
            -(1 - alpha) * p**gamma * np.log(1 - p),
        )
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-15)
    # gamma 0 and alpha 0.5: half the binary cross-entropy
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(sigmoid_focal(x, t, 0.5, 0.0), 0.5 * bce)


# --------------------------------------------------------------------------- the targets


def test_canny_targets_are_opencvs_on_a_fixed_image(world):
    names = (world / "VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[:3]
    rgb = [
        np.asarray(Image.open(world / "VOC2012/JPEGImages" / f"{n}.jpg").convert("RGB"))
        for n in names
    ]
    batch = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in rgb]).float() / 255
    for low, high in ((100, 200), (30, 60)):
        got = canny(batch, low, high)
        for k, a in enumerate(rgb):
            want = cv2.Canny(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), low, high) > 0
            assert want.any() and want.sum() < want.size / 2  # an image with edges
            assert torch.equal(got[k], torch.from_numpy(want).float()), (k, low)
    assert not torch.equal(canny(batch, 100, 200), canny(batch, 30, 60))
    # the structure term reads these targets: the focal mean against OpenCV's edges
    logits = torch.randn(batch.shape[0], 64, 64, generator=torch.Generator().manual_seed(0))
    cfg = AuxiliaryLosses(structure=1.0)
    term = auxiliary_terms({"structure": logits}, cfg, batch, None)["structure"]
    edges = torch.stack(
        [
            torch.from_numpy(cv2.Canny(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), 100, 200) > 0)
            for a in rgb
        ]
    ).double()
    want = sigmoid_focal(logits.double(), edges, 0.25, 2.0).mean()
    assert term.item() == pytest.approx(want.item(), rel=1e-5)


def test_mask_edges_mark_both_sides_of_a_boundary():
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    labels[0, :, 3:] = 4
    labels[0, 5, 0] = 255
    e = mask_edges(labels)[0]
    assert e[:, 2:4].eq(1).all() and e[:4, :2].eq(0).all() and e[:, 5].eq(0).all()
    assert e[4, 0] == 1 and e[4, 1] == 1 and e[5, 1] == 1  # around the ignored pixel
    cfg = AuxiliaryLosses(structure=1.0, structure_target="mask-edges")
    logits = torch.zeros(1, 6, 6)
    term = auxiliary_terms({"structure": logits}, cfg, None, labels)["structure"]
    valid = labels[0] != 255
    want = sigmoid_focal(logits[0].double(), e.double(), 0.25, 2.0)[valid].mean()
    assert term.item() == pytest.approx(want.item(), rel=1e-6)


def test_structure_head_fuses_adjacent_levels_and_reaches_the_image_size():
    head = StructureHead([8, 8, 8], 16)
    levels = [torch.randn(2, 8, 4, 4) for _ in range(3)]
    out = head(levels, (64, 64))
    assert out.shape == (2, 64, 64)
    assert [r.conv.in_channels for r in head.refine] == [16, 32, 32]  # F_t with F_{t-1}
    assert [e.out_channels for e in head.encode] == [16, 16, 16]
    out.sum().backward()
    assert all(e.weight.grad is not None for e in head.encode)  # every level is read


def test_mask_loss_is_clipsegs_bce_or_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 5, 5), generator=g)
    labels[0, 0] = 255
    valid = labels != 255
    target = np.stack([(labels.numpy() == c) for c in range(4)], 1).astype(np.float64)
    p = 1 / (1 + np.exp(-logits.numpy()))
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    want = bce.transpose(0, 2, 3, 1)[valid.numpy()].mean()
    assert mask_loss(logits, labels, "sigmoid").item() == pytest.approx(want, rel=1e-6)
    logp = torch.log_softmax(logits, 1).numpy().transpose(0, 2, 3, 1)[valid.numpy()]
    ce = -logp[np.arange(len(logp)), labels[valid].numpy()].mean()
    assert mask_loss(logits, labels, "softmax").item() == pytest.approx(ce, rel=1e-6)


# --------------------------------------------------------------------------- the data


def test_world_ref_is_the_ref_split_with_the_seen_classes_renumbered(world):
    ref = open_dataset("world-ref", world, split="train")
    full = (world / "classes.txt").read_text().split()
    assert [c[0] for c in ref.classes] == [c for c in full if c not in UNSEEN]
    ids = (world / "VOC2012/ImageSets/Segmentation/ref.txt").read_text().split()
    assert [s.name for s in ref.samples] == ids
    for s in ref.samples[:6]:
        raw = np.asarray(Image.open(s.label))
        _, label = ref.load(s)
        for v in np.unique(raw):
            got = np.unique(label[raw == v])
            assert len(got) == 1
            name = "-" if v == 255 else full[v]
            assert (got[0] == 255) if v == 255 else ref.classes[got[0]][0] == name
    with pytest.raises(UserError, match="world has no train split"):
        open_dataset("world", world, split="train")


def test_the_epochs_batches_are_a_seeded_permutation_split_over_ranks():
    a = epoch_batches(23, 4, seed=1, epoch=0, rank=0, world=2)
    b = epoch_batches(23, 4, seed=1, epoch=0, rank=1, world=2)
    assert len(a) == len(b) == 2 and all(len(x) == 4 for x in a + b)
    flat = [i for x in a + b for i in x]
    assert len(set(flat)) == 16  # no image twice in an epoch, across the ranks
    assert epoch_batches(23, 4, 1, 0, 0, 2) == a  # the same seed and epoch: the same batches
    assert epoch_batches(23, 4, 1, 1, 0, 2) != a  # another epoch: another order


@pytest.fixture
def coco_train(tmp_path):
    """COCO-Stuff in its published layout (stuffthingmaps), both splits, prepared."""
    src = tmp_path / "stuffthingmaps"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for k in range(n):
            stem = f"{split}{k:09d}"
            lab = rng.choice(np.array(COCO_USED[:6] + [255], np.uint8), (32, 32))
            lab[:16] = COCO_USED[100]  # a stuff class over the top half
            _jpeg(src / f"images/{split}2017" / f"{stem}.jpg", 32, 32, k)
            _png(src / f"annotations/{split}2017" / f"{stem}.png", lab)
    out = tmp_path / "coco_stuff164k"
    for split in ("val", "train"):
        run_prepare(PrepareConfig("stuff", str(src), str(out), processes=1, split=split))
    return out


def test_prepare_writes_the_train_split_beside_val(coco_train):
    train = open_dataset("stuff", coco_train, split="train")
    val = open_dataset("stuff", coco_train)
    assert len(train.samples) == 8 and len(val.samples) == 2
    assert all("train2017" in str(s.label) for s in train.samples)
    record = json.loads((coco_train / "prepare-stuff-train.json").read_text())
    assert record["split"] == "train" and record["images"] == 8
    assert json.loads((coco_train / "prepare-stuff.json").read_text())["split"] == "val"
    _, label = train.load(train.samples[0])
    assert set(np.unique(label[:16]).tolist()) == {100}  # the converter's train ids


@pytest.mark.parametrize(
    "dataset, files",
    [
        ("voc", ("ImageSets/Segmentation/train.txt", "JPEGImages", "SegmentationClass")),
        ("ade", ("images/training", "annotations/training")),
        ("city", ("leftImg8bit/train/aachen", "gtFine/train/aachen")),
    ],
)
def test_prepare_split_train_of_the_other_layouts(tmp_path, dataset, files):
    src, out = tmp_path / "src", tmp_path / "out"
    lab = np.zeros((8, 8), np.uint8)
    if dataset == "voc":
        root = src / "VOC2012"
        (root / "ImageSets/Segmentation").mkdir(parents=True)
        (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
        for i in "ab":
            _jpeg(root / "JPEGImages" / f"{i}.jpg", 8, 8)
            _png(root / "SegmentationClass" / f"{i}.png", lab)
    elif dataset == "ade":
        root = src / "ADEChallengeData2016"
        for i in "ab":
            _jpeg(root / "images/training" / f"{i}.jpg", 8, 8)
            _png(root / "annotations/training" / f"{i}.png", lab)
    else:
        for i in "ab":
            _jpeg(src / "leftImg8bit/train/aachen" / f"{i}_leftImg8bit.png", 8, 8)
            _png(src / "gtFine/train/aachen" / f"{i}_gtFine_labelIds.png", lab + 7)  # road
    stats = run_prepare(PrepareConfig(dataset, str(src), str(out), processes=1, split="train"))
    assert stats.images == 2 and (out / f"prepare-{dataset}-train.json").exists()
    for f in files:
        assert (out / f).exists(), f
    data = open_dataset(dataset, out, split="train")
    assert len(data.samples) == 2
    with pytest.raises(UserError, match="val split"):
        open_dataset(dataset, out)  # only train was written


# --------------------------------------------------------------------------- runs


def _settings(world, out, *extra):
    return resolve(
        "tiny",
        overrides=[
            "data.supervision=masks",
            "data.dataset=world-ref",
            f"data.root={world}",
            "data.batch_size=4",
            "data.workers=0",
            "optim.epochs=0",
            "optim.max_steps=5",
            "run.save_every=2",
            "run.device=cpu",
            f"run.output={out}",
            *extra,
        ],
    )


PHYSICAL = ("loss.structure=1", "loss.structure_dim=8", "loss.patch_align=0.5")


def test_a_mask_supervised_run_resumes_bit_identically(world, tmp_path):
    whole = _settings(world, tmp_path / "whole", *PHYSICAL)
    run_train(whole)
    cut = _settings(world, tmp_path / "cut", *PHYSICAL, "optim.max_steps=2")
    run_train(cut)  # stops inside epoch 0 (an epoch is 3 steps): the resume crosses into epoch 1
    again = _settings(world, tmp_path / "cut", *PHYSICAL, "data.workers=1")
    stats = run_train(again, resume=True)  # another number of data workers: the same batches
    assert stats.start_step == 2 and stats.steps == 5 and stats.replayed == 0
    from safetensors.torch import load_file

    a = load_file(str(find(tmp_path / "whole") / "model.safetensors"))
    b = load_file(str(find(tmp_path / "cut") / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith(PREFIX + "structure.") for k in a)
    assert any(k.startswith(PREFIX + "align.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    whole_loss, cut_loss = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert set(whole_loss[5]) == {"total", "seg", "structure", "patch_align"}
    for step in (3, 4, 5):
        assert whole_loss[step] == cut_loss[step], step
    # the resume reads its own checkpoint's heads: without them the next step differs
    assert whole_loss[5]["total"] != whole_loss[4]["total"]


def test_the_physical_losses_train_their_heads_and_eval_leaves_them(world, tmp_path):
    cfg = _settings(world, tmp_path / "run", *PHYSICAL, "optim.max_steps=2")
    run_train(cfg)
    weights_file = find(tmp_path / "run") / "model.safetensors"
    from safetensors.torch import load_file

    torch.manual_seed(cfg.run.seed)
    from trainer.methods import trained
    from trainer.train.physical import Trainee

    method = trained("synseg")
    fresh = Trainee(method.build(cfg.model), method.dense, cfg.loss, True)
    saved = load_file(str(weights_file))
    moved = [k for k, v in fresh.trainable_state_dict().items() if not torch.equal(v, saved[k])]
    assert any(k.startswith(PREFIX + "structure.") for k in moved)
    assert any(k.startswith(PREFIX + "align.") for k in moved)
    assert any(k.startswith("decoder.reduces.") for k in moved)
    # eval loads the model without the heads
    result = runner.invoke(
        app,
        ["eval", "--checkpoint", str(tmp_path / "run"), "--dataset", "world-ref"]
        + ["--data-root", str(world), "--limit", "2", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "world-ref: mIoU" in result.output


def test_caption_training_takes_the_canny_structure_loss(shards, tmp_path):
    """SynSeg's caption training with L_p on Canny edges: the first step's total is MCCL's
    (the same as without the head: the model is drawn before the head) plus the weighted
    structure term, and the head trains."""

    def first_step(name, *extra):
        cfg = resolve(
            "tiny",
            overrides=[
                f"data.shards={shards}",
                "optim.max_steps=2",
                "data.batch_size=4",
                f"run.output={tmp_path / name}",
                "run.device=cpu",
                *extra,
            ],
        )
        run_train(cfg)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return next(r["loss"] for r in map(json.loads, lines) if r.get("step") == 1)

    plain = first_step("plain")
    with_head = first_step("head", "loss.structure=0.5", "loss.structure_dim=8")
    assert with_head["structure"] > 0 and "structure" not in plain
    assert with_head["total"] == pytest.approx(plain["total"] + 0.5 * with_head["structure"])
    from safetensors.torch import load_file

    saved = load_file(str(find(tmp_path / "head") / "model.safetensors"))
    assert any(k.startswith(PREFIX + "structure.") for k in saved)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["loss.patch_align=1"], "loss.patch_align read masks: add --supervision masks"),
        (
            ["loss.structure=1", "loss.structure_target=mask-edges"],
            "loss.structure_target=mask-edges read masks",
        ),
        (["data.supervision=masks"], "--supervision masks reads --dataset and --data-root"),
        (["data.supervision=labels"], "data.supervision must be one of captions, masks"),
        (["loss.structure_target=sobel"], "structure_target must be one of canny, mask-edges"),
        (["loss.focal_alpha=2"], "focal_alpha must be in [0, 1]"),
    ],
)
def test_settings_that_cannot_work_are_refused_in_one_line(extra, message):
    with pytest.raises(UserError) as e:
        resolve("tiny", overrides=extra)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_method_without_dense_scores_is_refused_for_masks(world):
    with pytest.raises(UserError, match="vilseg gives no dense class scores"):
        resolve(
            "tiny",
            method="vilseg",
            overrides=["data.supervision=masks", "data.dataset=world-ref", f"data.root={world}"],
        )


def test_ovsegmentor_trains_on_masks_with_its_softmax_scores(world, tmp_path):
    cfg = resolve(
        "tiny",
        method="ovsegmentor",
        overrides=[
            "data.supervision=masks",
            "data.dataset=world-ref",
            f"data.root={world}",
            "data.batch_size=4",
            "optim.max_steps=2",
            "run.device=cpu",
            f"run.output={tmp_path / 'ov'}",
            "loss.structure=1",
            "loss.structure_dim=8",
        ],
    )
    stats = run_train(cfg)
    assert set(stats.loss) == {"total", "seg", "structure"}
    assert stats.loss["seg"] > 0 and math.isfinite(stats.loss["total"])


def readme_command(prefix: str) -> list[str]:
    """The README's command line that starts with ``prefix`` (continuations joined), as
    arguments of ``synseg-train``."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith(prefix))
    args = shlex.split(line)
    assert args[0] == "synseg-train"
    return args[1:]


# Shorter and smaller than the README's, for the tiny data here (a later option wins).
QUICK = ["--steps", "2", "--set", "data.batch_size=4", "--set", "run.device=cpu"]


def test_readme_mask_supervised_commands(world, tmp_path, monkeypatch):
    """The README's lines as written, on the world's ref split and on COCO-Stuff in its
    published layout (a tiny fake of stuffthingmaps), with QUICK added."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world").symlink_to(world)
    (tmp_path / "runs" / "world").mkdir(parents=True)
    tiny_clip_file(tmp_path / "runs" / "world" / "clip-tiny.pt")
    ref = readme_command("synseg-train run --preset tiny --supervision masks --dataset world-ref")
    done = runner.invoke(app, ref + QUICK)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "runs/ref-init/checkpoints/latest").exists()

    src = tmp_path / "coco_stuff164k"  # the README's --source: stuffthingmaps as published
    rng = np.random.default_rng(0)
    for k in range(8):
        lab = rng.choice(np.array(COCO_USED[:6] + [255], np.uint8), (32, 32))
        _jpeg(src / "images/train2017" / f"{k:012d}.jpg", 32, 32, k)
        _png(src / "annotations/train2017" / f"{k:012d}.png", lab)
    prepared = runner.invoke(app, readme_command("synseg-train prepare stuff --split train"))
    assert prepared.exit_code == 0, prepared.output
    run = readme_command("synseg-train run --preset tiny --supervision masks --dataset stuff")
    done = runner.invoke(app, run + QUICK)
    assert done.exit_code == 0, done.output
    config = json.loads((tmp_path / "runs/stuff-tiny/config.json").read_text())
    assert config["data"]["supervision"] == "masks" and config["data"]["dataset"] == "stuff"
    assert config["loss"]["structure_target"] == "mask-edges" and config["loss"]["patch_align"] == 1
    assert MaskSet("stuff", "data/coco_stuff164k", 64).names[:2] == ["person", "bicycle"]
    missing = runner.invoke(
        app,
        ["run", "--preset", "tiny", "--supervision", "masks", "--dataset", "ade"]
        + ["--data-root", "data/coco_stuff164k", "--output", "runs/ade"],
    )
    assert missing.exit_code != 0
    assert "prepare ade --split train" in missing.output


def tiny_clip_file(path):
    """A tiny CLIP's weights where the README's commands read the in-world CLIP."""
    from trainer.model.backbone import FrozenCLIP

    clip = FrozenCLIP("synseg-tiny", None, (1, 2, 3), 0)
    torch.save(clip.model.state_dict(), path)
