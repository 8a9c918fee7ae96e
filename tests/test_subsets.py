"""Class subsets in eval: ViL-Seg's unseen classes tied to its paper and to MMSegmentation's
class order, and the subset's scores (gzsl, zsl) against counts made by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synseg.errors import UserError
from trainer.eval.datasets import CLASSNAMES, read_classnames
from trainer.eval.evaluate import EvalConfig, read_subset, run_eval

FIXTURES = Path(__file__).parent / "fixtures"


def norm(name: str) -> str:
    return name.lower().replace("-", "").replace(" ", "")


@pytest.mark.parametrize(
    ("dataset", "paper", "count"),
    [("voc", "voc", 5), ("voc20", "voc", 5), ("context", "context", 4), ("stuff", "stuff", 15)],
)
def test_vilseg_unseen_classes_are_the_papers(dataset, paper, count):
    """Each class the subset picks is, by its label value, the class MMSegmentation 0.27 names
    there, and those names are the paper's list (spellings aside: 'tv-monitor', 'tvmonitor')."""
    printed = json.loads((FIXTURES / "vilseg_unseen_classes.json").read_text())[paper]
    mmseg = json.loads((FIXTURES / "mmseg_0.27_classes.json").read_text())
    order = mmseg["voc"][1:] if dataset == "voc20" else mmseg[dataset]
    classes = read_classnames(CLASSNAMES / f"{dataset}.txt")
    picked = read_subset("vilseg-unseen", dataset, classes)
    assert len(picked) == count == len(printed)
    assert sorted(norm(order[i]) for i in picked) == sorted(norm(n) for n in printed)


def test_subset_refusals(tmp_path):
    classes = read_classnames(CLASSNAMES / "voc.txt")
    with pytest.raises(UserError, match="class subset 'nope' not found"):
        read_subset("nope", "voc", classes)
    with pytest.raises(UserError, match="has no classes of city"):
        read_subset("vilseg-unseen", "city", read_classnames(CLASSNAMES / "city.txt"))
    f = tmp_path / "mine.txt"
    f.write_text("cat\nunicorn\n")
    with pytest.raises(UserError, match="unicorn is not a class of voc"):
        read_subset(str(f), "voc", classes)
    f.write_text("sofa\ncouch\n")  # two names of one class: one class
    assert read_subset(str(f), "voc", classes) == [18]
    with pytest.raises(UserError, match="--subset-mode must be one of gzsl, zsl"):
        EvalConfig(dataset="voc", data_root=".", subset="vilseg-unseen", subset_mode="both")


def areas(world: Path, names: list[str], limit: int) -> dict[str, int]:
    """Pixels of each class in the first ``limit`` val label maps, counted directly."""
    classes = (world / "classes.txt").read_text().split()
    ids = (world / "VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[:limit]
    out = dict.fromkeys(names, 0)
    for i in ids:
        lab = np.asarray(Image.open(world / "VOC2012/SegmentationClass" / f"{i}.png"))
        for n in names:
            out[n] += int((lab == classes.index(n)).sum())
    return out


def test_gzsl_scores_the_subset_of_the_full_prediction(world, tmp_path):
    f = tmp_path / "two.txt"
    f.write_text("grass\nsand\nball\n")
    kw = dict(dataset="world", data_root=str(world), limit=6, output=str(tmp_path))
    full = run_eval(EvalConfig(**kw))
    sub = run_eval(EvalConfig(**kw, subset=str(f)))
    assert sub.per_class == full.per_class and sub.mIoU == full.mIoU  # nothing else moves
    s = sub.subset
    assert s["classes"] == ["grass", "sand", "ball"] and s["mode"] == "gzsl"
    ious = [full.per_class[n]["IoU"] for n in s["classes"] if full.per_class[n]["IoU"] is not None]
    assert s["mIoU"] == pytest.approx(sum(ious) / len(ious), abs=1e-12)
    area = areas(world, s["classes"], 6)
    right = sum(full.per_class[n]["Acc"] * area[n] for n in s["classes"] if area[n])
    assert s["pixel_accuracy"] == pytest.approx(right / sum(area.values()), abs=1e-12)
    assert (tmp_path / "eval-world-synseg-tcl-two-first6.json").is_file()


def fake_voc(root: Path) -> Path:
    """Four 64 x 64 VOC images whose labels hold background, cat (8), dog (12), sofa (18)
    and 255, in blocks; the pictures are the world's val images."""
    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(4)]
    for i in ids:
        lab = rng.choice([0, 8, 12, 18, 255], size=(4, 4)).repeat(16, 0).repeat(16, 1)
        Image.fromarray(lab.astype(np.uint8)).save(root / f"SegmentationClass/{i}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.mark.parametrize("dataset", ["world", "voc"])
def test_zsl_predicts_only_the_subset_and_ignores_other_pixels(world, tmp_path, dataset):
    from trainer import methods
    from trainer.eval.datasets import open_dataset
    from trainer.eval.evaluate import build_model, resolve_device
    from trainer.eval.infer import Segmenter, read_templates

    root = world
    present = areas(world, (world / "classes.txt").read_text().split(), 6)
    names = sorted(present, key=present.get)[-3:]  # three classes these images show
    if dataset == "voc":
        root = fake_voc(tmp_path / "VOC2012")
        shots = sorted((world / "VOC2012/JPEGImages").glob("val_*.jpg"))[:4]
        ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
        for shot, i in zip(shots, ids, strict=True):
            Image.open(shot).resize((64, 64)).save(root / f"JPEGImages/{i}.jpg")
        names = ["cat", "sofa", "dog"]
    f = tmp_path / "two.txt"
    f.write_text("\n".join(names) + "\n")
    cfg = EvalConfig(
        dataset=dataset,
        data_root=str(root),
        limit=6,
        output=str(tmp_path),
        subset=str(f),
        subset_mode="zsl",
    )
    res = run_eval(cfg)
    data = open_dataset(dataset, root, limit=6)
    keep = sorted(i for i, c in enumerate(data.classes) if c[0] in names)
    assert list(res.per_class) == [data.classes[i][0] for i in keep]  # in label order
    # by hand: only those classes prompted (no background rule), their pixels counted, every
    # other pixel left out
    model, train_cfg, _, method = build_model(None, "tiny", None, resolve_device("cpu"))
    infer = cfg.inference(model.native_size)
    seg = Segmenter(
        methods.scorer(method, model, train_cfg, infer),
        [data.classes[i] for i in keep],
        read_templates("tcl9"),
        infer,
    )
    inter, union, label_area = np.zeros(3), np.zeros(3), np.zeros(3)
    for sample in data.samples:
        img, lab = data.load(sample)
        pred, _ = seg.predict(img, lab.shape)
        counted = np.isin(lab, keep)
        for j, c in enumerate(keep):
            inter[j] += np.sum((pred == j) & (lab == c))
            union[j] += np.sum(((pred == j) & counted) | (lab == c))
            label_area[j] += np.sum(lab == c)
    assert label_area.min() > 0
    iou = inter[union > 0] / union[union > 0]
    assert res.subset["mIoU"] == pytest.approx(iou.mean(), abs=1e-12) == pytest.approx(res.mIoU)
    assert res.subset["pixel_accuracy"] == pytest.approx(inter.sum() / label_area.sum())
    assert (tmp_path / f"eval-{dataset}-synseg-tcl-two-zsl-first6.json").is_file()


def test_eval_prints_the_subsets_scores(world, tmp_path):
    from trainer.cli import app

    f = tmp_path / "some.txt"
    f.write_text("grass\n")
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--dataset",
            "world",
            "--data-root",
            str(world),
            "--limit",
            "2",
            "--output",
            str(tmp_path),
            "--subset",
            str(f),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "some (gzsl, 1 class): mIoU" in " ".join(res.output.split())
