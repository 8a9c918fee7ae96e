"""Readers of each benchmark layout, on tiny fake datasets written here."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synseg.errors import UserError
from trainer.eval.datasets import open_dataset


def write(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def image(h=8, w=12):
    return np.full((h, w, 3), 128)


LAYOUTS = {
    # name: (files to write as (image path, label path, label value), split file or None)
    "voc": (
        lambda r, i, v: (r / f"JPEGImages/{i}.jpg", r / f"SegmentationClass/{i}.png"),
        "ImageSets/Segmentation/val.txt",
    ),
    "context": (
        lambda r, i, v: (r / f"JPEGImages/{i}.jpg", r / f"SegmentationClassContext/{i}.png"),
        "ImageSets/SegmentationContext/val.txt",
    ),
    "object": (
        lambda r, i, v: (
            r / f"images/val2017/{i}.jpg",
            r / f"annotations/val2017/{i}_instanceTrainIds.png",
        ),
        None,
    ),
    "stuff": (
        lambda r, i, v: (
            r / f"images/val2017/{i}.jpg",
            r / f"annotations/val2017/{i}_labelTrainIds.png",
        ),
        None,
    ),
    "city": (
        lambda r, i, v: (
            r / f"leftImg8bit/val/aachen/{i}_leftImg8bit.png",
            r / f"gtFine/val/aachen/{i}_gtFine_labelTrainIds.png",
        ),
        None,
    ),
    "ade": (
        lambda r, i, v: (r / f"images/validation/{i}.jpg", r / f"annotations/validation/{i}.png"),
        None,
    ),
}


LAYOUTS["voc20"], LAYOUTS["context60"] = LAYOUTS["voc"], LAYOUTS["context"]  # the same files

# Classes of each benchmark (label values after reduce_zero_label), as its papers count them.
BENCHMARK_SIZES = {
    "voc": 21,
    "voc20": 20,
    "context": 59,
    "context60": 60,
    "object": 81,
    "stuff": 171,
    "city": 19,
    "ade": 150,
}


def make(root: Path, name: str, values=(0, 1, 255)):
    paths, split = LAYOUTS[name]
    ids = [f"img{k}" for k in range(3)]
    for k, i in enumerate(ids):
        img, lab = paths(root, i, None)
        write(img, image())
        label = np.zeros((8, 12))
        label[:, :4], label[:, 4:8], label[:, 8:] = values
        label[0, 0] = k  # a little difference per image
        write(lab, label, "L")
    if split:
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        (root / split).write_text("\n".join(ids[:2]) + "\n")  # the split lists only two
    return ids


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout(tmp_path, name):
    make(tmp_path, name)
    ds = open_dataset(name, tmp_path)
    expected = {"voc": 2, "context": 2, "voc20": 2, "context60": 2}.get(name, 3)
    assert len(ds.samples) == expected
    img, label = ds.load(ds.samples[1])
    assert img.size == (12, 8) and label.shape == (8, 12)
    if name in ("context", "ade", "voc20"):  # reduce_zero_label: 0 -> 255, 1 -> 0
        assert label[1, 0] == 255 and label[1, 5] == 0 and label[1, 10] == 255
    else:
        assert label[1, 0] == 0 and label[1, 5] == 1 and label[1, 10] == 255
    assert ds.num_classes == BENCHMARK_SIZES[name]
    assert ds.spec.background == (name in ("voc", "context60", "object"))


def test_world_layout(world):
    ds = open_dataset("world", world, limit=5)
    assert len(ds.samples) == 5 and ds.num_classes == 20
    assert ds.classes[0] == ["grass"]
    _, label = ds.load(ds.samples[0])
    assert set(np.unique(label)) <= set(range(20)) | {255}


def test_limit_and_errors(tmp_path):
    with pytest.raises(UserError, match="expected JPEGImages/, SegmentationClass/"):
        open_dataset("voc", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        open_dataset("voc", tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown dataset"):
        open_dataset("imagenet", tmp_path)
    make(tmp_path, "voc")
    assert len(open_dataset("voc", tmp_path, limit=1).samples) == 1
    short = tmp_path / "short.txt"
    short.write_text("background\ncat\ndog\n")
    with pytest.raises(UserError, match="has 3 classes; voc labels have 21"):
        open_dataset("voc", tmp_path, classes=short)


def test_label_outside_the_class_file_and_unreadable_image(tmp_path, world):
    make(tmp_path, "stuff", values=(0, 200, 255))
    ds = open_dataset("stuff", tmp_path)
    with pytest.raises(UserError, match="label value 200 .* outside the 171 classes"):
        ds.load(ds.samples[0])
    ds.samples[1].image.write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read"):
        ds.load(ds.samples[1])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_a_prediction_equal_to_the_ground_truth_scores_100(tmp_path, name):
    """Every benchmark: the label map read back as the prediction gives mIoU 100 over the
    classes present, with label values spread over the whole class range."""
    from trainer.eval.metrics import IoUAccumulator

    make(tmp_path / "probe", name)
    ds0 = open_dataset(name, tmp_path / "probe")
    top = ds0.num_classes - (0 if ds0.spec.reduce_zero_label else 1)  # highest raw label value
    make(tmp_path / "d", name, values=(1, top, 255))
    ds = open_dataset(name, tmp_path / "d")
    acc = IoUAccumulator(ds.num_classes)
    for sample in ds.samples:
        _, label = ds.load(sample)
        pred = np.where(label == 255, 0, label)  # ignored pixels may hold anything
        acc.add(pred, label)
    summary = acc.summary([n[0] for n in ds.classes])
    assert summary["mIoU"] == 1.0 and acc.label_area[ds.num_classes - 1] > 0
