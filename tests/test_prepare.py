"""prepare on tiny fakes written in each benchmark's published layout: the label values it writes,
their tie to the class files (through MMSegmentation 0.27's class order), the manifest, reruns,
and the refusal of an incomplete source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synseg.errors import UserError
from tests.test_classnames import REFERENCE, same_class
from trainer.cli import app
from trainer.eval.datasets import open_dataset
from trainer.eval.metrics import IoUAccumulator
from trainer.eval.prepare import (
    CITY_TRAIN_IDS,
    COCO_USED,
    CONTEXT_KEPT,
    STUFF_LUT,
    PrepareConfig,
    decode_rle,
    run_prepare,
)

CONVERTERS = json.loads((Path(__file__).parent / "fixtures/mmseg_0.27_converters.json").read_text())


def test_context_ids_are_mmsegmentations():
    assert CONVERTERS["pascal_context_mapping"] == CONTEXT_KEPT


def _jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8)).save(path)


def _perfect_miou(name: str, root: Path) -> float:
    data = open_dataset(name, root)
    acc = IoUAccumulator(data.num_classes)
    for s in data.samples:
        _, label = data.load(s)
        acc.add(np.where(label == 255, 0, label), label)
    return acc.summary([c[0] for c in data.classes])["mIoU"]


# --------------------------------------------------------------------------- RLE


def rle_string(counts: list[int]) -> str:
    """pycocotools' rleToString: the inverse of the decoder under test."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def rle(mask: np.ndarray, compressed: bool) -> dict:
    flat = mask.T.flatten().astype(np.uint8)  # column-major
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": rle_string(counts) if compressed else counts}


def test_rle_decodes_both_count_formats():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 23)) > 0.6
    mask[:, :3] = True  # long runs: multi-character counts
    for compressed in (False, True):
        assert (decode_rle(rle(mask, compressed)) == mask).all()


# --------------------------------------------------------------------------- context


def test_context_from_the_annotation_file(tmp_path):
    src = tmp_path / "VOCdevkit"
    names = REFERENCE["context"]  # MMSegmentation's order = the converter's label order
    rng = np.random.default_rng(1)
    images, segs, truth = [], [], {}
    for n, (stem, phase) in enumerate(
        [("2008_000002", "val"), ("2008_000003", "val"), ("2008_000007", "train")]
    ):
        h, w = 20 + n, 30
        _jpeg(src / "VOC2010/JPEGImages" / f"{stem}.jpg", h, w, n)
        images.append(
            {"image_id": n + 1, "file_name": f"{stem}.jpg", "height": h, "width": w, "phase": phase}
        )
        want = np.zeros((h, w), np.uint8)
        for k in rng.choice(np.arange(1, 60), 5, replace=False):  # five kept categories
            m = np.zeros((h, w), bool)
            y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
            m[y : y + 6, x : x + 8] = True
            segs.append(
                {
                    "id": len(segs) + 1,
                    "image_id": n + 1,
                    "category_id": CONTEXT_KEPT[k],
                    "segmentation": rle(m, len(segs) % 2 == 0),
                }
            )
            want[m] = k  # a later annotation overwrites an earlier one
        other = np.zeros((h, w), bool)
        other[-2:, -3:] = True  # a category outside the 59: unlabelled
        segs.append(
            {
                "id": len(segs) + 1,
                "image_id": n + 1,
                "category_id": 1,
                "segmentation": rle(other, True),
            }
        )
        want[other] = 0
        truth[stem] = want
    cats = [{"category_id": CONTEXT_KEPT[k], "name": names[k - 1]} for k in range(1, 60)]
    (src / "trainval_merged.json").write_text(
        json.dumps({"images": images, "annos_segmentation": segs, "categories": cats})
    )
    out = tmp_path / "VOC2010"
    stats = run_prepare(PrepareConfig("context", str(src), str(out), processes=2))
    assert stats.images == 2  # the val images only
    assert (
        out / "ImageSets/SegmentationContext/val.txt"
    ).read_text() == "2008_000002\n2008_000003\n"
    for stem in ("2008_000002", "2008_000003"):
        got = np.asarray(Image.open(out / "SegmentationClassContext" / f"{stem}.png"))
        assert (got == truth[stem]).all()
    # the tie: the value written for a category indexes its name in context.txt (context60 too)
    data = open_dataset("context60", out)
    cat_name = {c["category_id"]: c["name"] for c in cats}
    for k in range(1, 60):
        assert same_class(cat_name[CONTEXT_KEPT[k]], data.classes[k]), k
    assert _perfect_miou("context", out) == 1.0 and _perfect_miou("context60", out) == 1.0


# --------------------------------------------------------------------------- COCO


@pytest.fixture
def coco(tmp_path):
    src = tmp_path / "stuffthingmaps"
    every = np.array(COCO_USED + [255], np.uint8)
    labels = {
        "000000000139": np.resize(every, (12, 16)),  # every used id, and unlabeled
        "000000000285": np.full((10, 14), 91, np.uint8),  # stuff only
    }
    labels["000000000285"][:4, :4] = 0  # a person
    for n, (stem, lab) in enumerate(labels.items()):
        _jpeg(src / "images/val2017" / f"{stem}.jpg", *lab.shape, n)
        _png(src / "annotations/val2017" / f"{stem}.png", lab)
    return src, labels


def test_stuff_and_object_follow_their_converters(coco, tmp_path):
    src, labels = coco
    stuff = tmp_path / "coco_stuff164k"
    run_prepare(PrepareConfig("stuff", str(src), str(stuff), processes=1))
    obj = tmp_path / "coco_object"
    run_prepare(PrepareConfig("object", str(src), str(obj), processes=1))
    raw = labels["000000000139"]
    s = np.asarray(Image.open(stuff / "annotations/val2017/000000000139_labelTrainIds.png"))
    o = np.asarray(Image.open(obj / "annotations/val2017/000000000139_instanceTrainIds.png"))
    # anchors of MMSegmentation's clsID_to_trID, and GroupViT's object rule
    for cid, train in {
        0: 0,
        10: 10,
        12: 11,
        26: 24,
        66: 60,
        89: 79,
        91: 80,
        181: 170,
        255: 255,
    }.items():
        assert (s[raw == cid] == train).all(), cid
        assert (o[raw == cid] == (train + 1 if cid <= 90 else 0)).all(), cid
    assert len(COCO_USED) == 171 and sum(c <= 90 for c in COCO_USED) == 80
    for cid, train in CONVERTERS["coco_stuff_clsID_to_trID"].items():  # MMSegmentation's table
        assert (s[raw == int(cid)] == train).all(), cid
    # the tie: stuff's train id t is stuff.txt line t; object's v is object.txt line v, the
    # v-th thing of COCO-Stuff's order
    stuff_data, obj_data = open_dataset("stuff", stuff), open_dataset("object", obj)
    for t, name in enumerate(REFERENCE["stuff"]):
        assert same_class(name, stuff_data.classes[t]), t
    for v in range(1, 81):
        assert same_class(REFERENCE["stuff"][v - 1], obj_data.classes[v]), v
    assert _perfect_miou("stuff", stuff) == 1.0 and _perfect_miou("object", obj) == 1.0


# --------------------------------------------------------------------------- Cityscapes

# cityscapesscripts' own table (helpers/labels.py), not this project's copy of it.
CITY_LABELS = json.loads((Path(__file__).parent / "fixtures/cityscapes_labels.json").read_text())[
    "labels"
]
CITY_NAMES = {r["id"]: r["name"] for r in CITY_LABELS if r["trainId"] not in (255, -1)}


def test_city_table_is_cityscapesscripts():
    want = {r["id"]: r["trainId"] for r in CITY_LABELS if r["trainId"] not in (255, -1)}
    assert want == CITY_TRAIN_IDS and sorted(want.values()) == list(range(19))
    assert all(r["ignoreInEval"] == (r["trainId"] in (255, -1)) for r in CITY_LABELS)


def test_city_label_ids_become_train_ids(tmp_path):
    src = tmp_path / "cityscapes-src"
    lab = np.resize(np.arange(34, dtype=np.uint8), (16, 32))
    for city, stem in (
        ("frankfurt", "frankfurt_000000_000294"),
        ("lindau", "lindau_000000_000019"),
    ):
        _jpeg(src / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png", 16, 32)
        _png(src / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png", lab)
    out = tmp_path / "cityscapes"
    stats = run_prepare(PrepareConfig("city", str(src), str(out)))
    assert stats.images == 2
    got = np.asarray(
        Image.open(out / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png")
    )
    for row in CITY_LABELS:  # every id of the table is in the fake label maps
        if row["id"] < 0:
            continue
        want = 255 if row["trainId"] in (255, -1) else row["trainId"]
        assert (lab == row["id"]).any() and (got[lab == row["id"]] == want).all(), row
    data = open_dataset("city", out)
    for label_id, t in CITY_TRAIN_IDS.items():
        assert same_class(CITY_NAMES[label_id], data.classes[t]) and same_class(
            REFERENCE["city"][t], data.classes[t]
        )
    assert _perfect_miou("city", out) == 1.0


# --------------------------------------------------------------------------- VOC, ADE, manifest


def _voc(src: Path, ids: list[str]) -> None:
    root = src / "VOC2012"
    for n, i in enumerate(ids):
        _jpeg(root / "JPEGImages" / f"{i}.jpg", 18, 24, n)
        lab = Image.fromarray(np.resize(np.array([0, 15, 255, 7], np.uint8), (18, 24)), mode="P")
        lab.putpalette([v for k in range(256) for v in (k, 255 - k, k // 2)])
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        lab.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in ids))


def test_voc_manifest_rerun_and_an_incomplete_source(tmp_path):
    src, out = tmp_path / "VOCdevkit", tmp_path / "VOC2012"
    _voc(src, ["2007_000033", "2007_000042"])
    runner = CliRunner()
    ok = runner.invoke(app, ["prepare", "voc", "--source", str(src), "--output", str(out)])
    assert ok.exit_code == 0, ok.output
    manifest = json.loads((out / "prepare-voc.json").read_text())
    assert manifest["images"] == 2 and manifest["labels"] == {
        "0": 216,
        "7": 216,
        "15": 216,
        "255": 216,
    }
    assert _perfect_miou("voc", out) == 1.0 and _perfect_miou("voc20", out) == 1.0
    # a rerun after a lost file writes it again, with the same checksum
    (out / "SegmentationClass/2007_000042.png").unlink()
    again = run_prepare(PrepareConfig("voc", str(src), str(out)))
    assert again.label_sha256 == manifest["label_sha256"]
    assert (out / "SegmentationClass/2007_000042.png").exists()
    # other labels, another checksum
    other = tmp_path / "other"
    _voc(other, ["2007_000033"])
    assert (
        run_prepare(PrepareConfig("voc", str(other), str(tmp_path / "o2"))).label_sha256
        != again.label_sha256
    )
    # an incomplete source: one line, exit 1, no manifest
    (src / "VOC2012/JPEGImages/2007_000042.jpg").unlink()
    bad = runner.invoke(
        app, ["prepare", "voc", "--source", str(src), "--output", str(tmp_path / "x")]
    )
    assert bad.exit_code == 1
    assert (
        "source is incomplete: 1 of 2 val images" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "x/prepare-voc.json").exists()
    bad = runner.invoke(
        app, ["prepare", "ade", "--source", str(src), "--output", str(tmp_path / "y")]
    )
    assert bad.exit_code == 1 and "source is incomplete" in bad.stderr


def test_ade_is_copied_into_place(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    for n in range(2):
        stem = f"ADE_val_0000000{n + 1}"
        _jpeg(src / "images/validation" / f"{stem}.jpg", 10, 12, n)
        _png(
            src / "annotations/validation" / f"{stem}.png",
            np.resize(np.arange(151, dtype=np.uint8), (10, 12)),
        )
    out = tmp_path / "ade"
    assert run_prepare(PrepareConfig("ade", str(src), str(out))).images == 2
    assert _perfect_miou("ade", out) == 1.0


# --------------------------------------------------------------------------- sources that lie


def _context_source(tmp_path: Path, image: dict, segment: dict | None = None) -> Path:
    src = tmp_path / "VOCdevkit"
    _jpeg(src / "VOC2010/JPEGImages/2008_000002.jpg", 8, 10)
    mask = np.zeros((8, 10), bool)
    mask[:3, :4] = True
    seg = {"id": 1, "image_id": 1, "category_id": CONTEXT_KEPT[3], "segmentation": rle(mask, True)}
    im = {"image_id": 1, "file_name": "2008_000002.jpg", "height": 8, "width": 10, "phase": "val"}
    im, seg = {**im, **image}, {**seg, **(segment or {})}
    for entry in (im, seg):
        for key in [k for k, v in entry.items() if v is DROP]:
            del entry[key]
    (src / "trainval_merged.json").write_text(
        json.dumps({"images": [im], "annos_segmentation": [seg]})
    )
    return src


DROP = object()  # a key the annotation lacks


@pytest.mark.parametrize(
    "image, segment, message",
    [
        ({"file_name": "/etc/hostname"}, None, "is not a file name in"),
        ({"file_name": "../../outside.jpg"}, None, "is not a file name in"),
        ({"file_name": "sub/2008_000002.jpg"}, None, "is not a file name in"),
        ({"height": DROP}, None, "is not one of Pascal Context's"),
        ({"width": "wide"}, None, "is not one of Pascal Context's"),
        ({}, {"segmentation": DROP}, "is not one of Pascal Context's"),
        ({}, {"segmentation": [[1, 2, 3, 4]]}, "is not one of Pascal Context's"),
        ({}, {"category_id": "sky"}, "is not one of Pascal Context's"),
        ({"height": 9}, None, "cannot read the labels"),  # masks of another size
    ],
)
def test_context_annotations_that_lie_are_refused(tmp_path, image, segment, message):
    src = _context_source(tmp_path, image, segment)
    (tmp_path / "outside.jpg").write_bytes(b"x")  # there, so only the name can refuse it
    result = CliRunner().invoke(
        app, ["prepare", "context", "--source", str(src), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out/prepare-context.json").exists()
    assert not (tmp_path / "out/JPEGImages/hostname").exists()


def test_context_in_order_gives_its_labels(tmp_path):
    """The fake above, unchanged, is accepted (so each refusal is its one change's)."""
    src = _context_source(tmp_path, {})
    stats = run_prepare(PrepareConfig("context", str(src), str(tmp_path / "out")))
    got = np.asarray(Image.open(tmp_path / "out/SegmentationClassContext/2008_000002.png"))
    assert stats.images == 1 and (got[:3, :4] == 3).all() and (got[3:] == 0).all()


def _ade(src: Path, n: int = 2, shape=(10, 12)) -> None:
    for k in range(n):
        stem = f"ADE_val_0000000{k + 1}"
        _jpeg(src / "images/validation" / f"{stem}.jpg", 10, 12, k)
        _png(src / "annotations/validation" / f"{stem}.png", np.ones(shape, np.uint8))


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda src: _ade(src, shape=(10, 13)), "is 13 x 10, its image 12 x 10"),
        (
            lambda src: Image.fromarray(np.ones((10, 12), np.uint16) * 300).save(
                src / "annotations/validation/ADE_val_00000001.png"
            ),
            "not an 8-bit label map",
        ),
        (
            lambda src: (src / "annotations/validation/ADE_val_00000002.png").unlink(),
            "1 of 2 images have no *.png label map",
        ),
    ],
)
def test_label_maps_that_do_not_fit_their_images_are_refused(tmp_path, spoil, message):
    src = tmp_path / "ADEChallengeData2016"
    _ade(src)
    spoil(src)
    result = CliRunner().invoke(
        app, ["prepare", "ade", "--source", str(src), "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out/prepare-ade.json").exists()


def test_a_root_under_another_name_is_found_and_a_wrong_one_named(tmp_path):
    src = tmp_path / "my-ade-copy"  # ADE's layout, not its folder name
    _ade(src)
    assert run_prepare(PrepareConfig("ade", str(src), str(tmp_path / "out"))).images == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"neither .*empty/ADEChallengeData2016 nor .*empty holds"):
        run_prepare(PrepareConfig("ade", str(tmp_path / "empty"), str(tmp_path / "o2")))


def test_outputs_get_the_umask_mode_whatever_the_source_mode(tmp_path):
    """A hard link shares its source's mode, so a source without the umask's mode is copied."""
    import os
    import stat

    src = tmp_path / "ADEChallengeData2016"
    _ade(src)
    for f in src.rglob("*.*"):
        f.chmod(0o600)
    old = os.umask(0o022)
    try:
        run_prepare(PrepareConfig("ade", str(src), str(tmp_path / "out")))
    finally:
        os.umask(old)
    written = sorted((tmp_path / "out").rglob("*.*"))
    assert len(written) == 6  # two images, two label maps, the manifest, the sources record
    assert {stat.S_IMODE(f.stat().st_mode) for f in written} == {0o644}
    assert {stat.S_IMODE(f.stat().st_mode) for f in src.rglob("*.*")} == {0o600}


def test_prepare_refuses_an_output_it_does_not_own_and_an_empty_split(tmp_path):
    src = tmp_path / "ADEChallengeData2016"
    _ade(src)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.pdf").write_text("x")
    with pytest.raises(UserError, match=r"holds files prepare did not write \(thesis.pdf\)"):
        run_prepare(PrepareConfig("ade", str(src), str(busy)))
    assert sorted(p.name for p in busy.iterdir()) == ["thesis.pdf"]
    with pytest.raises(UserError, match="is inside --source"):
        run_prepare(PrepareConfig("ade", str(src), str(src / "out")))
    assert not (src / "out").exists()
    # its own earlier output is fine
    run_prepare(PrepareConfig("ade", str(src), str(tmp_path / "out")))
    assert run_prepare(PrepareConfig("ade", str(src), str(tmp_path / "out"))).images == 2
    voc = tmp_path / "VOCdevkit"
    _voc(voc, ["2007_000033"])
    (voc / "VOC2012/ImageSets/Segmentation/val.txt").write_text("\n")
    with pytest.raises(UserError, match="lists no val images"):
        run_prepare(PrepareConfig("voc", str(voc), str(tmp_path / "v")))


def test_a_rerun_remakes_what_a_changed_source_would_give(tmp_path):
    src, out = tmp_path / "stuffthingmaps", tmp_path / "stuff"
    for n, stem in enumerate(["000000000139", "000000000285"]):
        _jpeg(src / "images/val2017" / f"{stem}.jpg", 6, 8, n)
        _png(src / "annotations/val2017" / f"{stem}.png", np.zeros((6, 8), np.uint8))
    first = run_prepare(PrepareConfig("stuff", str(src), str(out)))
    label = out / "annotations/val2017/000000000285_labelTrainIds.png"
    kept = out / "annotations/val2017/000000000139_labelTrainIds.png"
    kept_inode = kept.stat().st_ino
    assert (np.asarray(Image.open(label)) == 0).all()
    _png(src / "annotations/val2017/000000000285.png", np.full((6, 8), 91, np.uint8))  # sky
    again = run_prepare(PrepareConfig("stuff", str(src), str(out)))
    # made again from the new map (the converter's table is tested above; here only its use)
    assert STUFF_LUT[91] != 0 and (np.asarray(Image.open(label)) == STUFF_LUT[91]).all()
    assert kept.stat().st_ino == kept_inode  # the unchanged one is not rewritten
    assert again.label_sha256 != first.label_sha256
