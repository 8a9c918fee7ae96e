"""prepare: a benchmark's validation split (or, with ``--split train``, its training split, for
mask-supervised training), from the files its authors publish, into the MMSegmentation layout
``eval`` and ``synseg-train run --supervision masks`` read, without mmcv or the Pascal Context
Detail API.

| dataset | --source holds                                         | labels written                      |
|---------|--------------------------------------------------------|-------------------------------------|
| voc     | VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/SPLIT.txt} | copied (palette index = label) |
| context | VOC2010/JPEGImages and trainval_merged.json (its ``phase``) | the 59 kept ids of the 459 classes, sorted, -> 1..59; everything else 0 |
| object  | images/SPLIT2017/*.jpg, annotations/SPLIT2017/*.png (COCO-Stuff ``stuffthingmaps``) | thing ids 0-90 -> 1-80, stuff and unlabeled (255) -> 0 |
| stuff   | the same                                               | the 171 used ids -> 0-170, 255 kept |
| city    | leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, gtFine/SPLIT/CITY/*_gtFine_labelIds.png | Cityscapes' trainIds, 255 for the ignored |
| ade     | ADEChallengeData2016 images/ and annotations/{validation,training} | copied                  |

The rules are the converters of record: MMSegmentation 0.27's ``pascal_context.py`` (which
maps through ``np.digitize`` over the sorted kept ids), ``coco_stuff164k.py``, and GroupViT's
``cvt_coco_object.py`` (used by TCL, SCLIP and NACLIP; its ``k > 90 -> 0`` also sends the
unlabeled value 255 to background); Cityscapes' own label table (cityscapesscripts' ``labels.py``)
for ``labelTrainIds``. SPLIT is ``val`` unless ``--split train`` says otherwise; both splits may
share one output folder.

Images are hard-linked where the file system allows (copied otherwise); every file is written
atomically, so an interrupted run leaves no half-written file and a rerun redoes only what is
missing, or what a source changed since gives (``prepare-<dataset>.sources.json``: each
output's sources by name, size and modification time, written before any output, so a killed
run's outputs stay valid). Files get the umask's mode: a source with another mode is copied,
not linked. ``prepare-<dataset>.json`` (``prepare-<dataset>-train.json`` for the training split) records the image count, a label histogram and a SHA-256 of
the label maps (name, shape and values, in name order), written last: a folder without it is
not finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from synseg.cores import default_processes, parallel_map
from synseg.errors import UserError
from synseg.fsutil import atomic_path, clean_stale, file_mode, write_json
from trainer.eval.datasets import Sample, suffix_pairs

DATASETS = ("voc", "context", "object", "stuff", "city", "ade")
SPLITS = ("val", "train")

# Pascal Context: the 59 most frequent of the 459 category ids, and 0 (unlabelled).
CONTEXT_KEPT = sorted(
    [0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33]
    + [162, 420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68]
    + [326, 72, 458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189]
    + [368, 113, 115]
)
# COCO ids 0-181 (things 0-90, stuff 91-181) that no annotation uses.
COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
COCO_USED = [i for i in range(182) if i not in COCO_UNUSED]  # 171 ids; train id = rank
# Cityscapes labelIds -> trainIds (cityscapesscripts/helpers/labels.py); all others 255.
CITY_TRAIN_IDS = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}


def _lut(pairs: dict[int, int], default: int | None) -> np.ndarray:
    """A 256-entry lookup table: ``pairs``, every other value to ``default`` (None: kept)."""
    lut = np.arange(256, dtype=np.uint8) if default is None else np.full(256, default, np.uint8)
    for k, v in pairs.items():
        lut[k] = v
    return lut


STUFF_LUT = _lut({k: t for t, k in enumerate(COCO_USED)}, None)  # 255 and unused ids kept
OBJECT_LUT = _lut({k: t + 1 for t, k in enumerate(COCO_USED) if k <= 90}, 0)
CITY_LUT = _lut(CITY_TRAIN_IDS, 255)


# --------------------------------------------------------------------------- RLE (COCO's)


def _counts_from_string(s: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO run-length mask ({"size": [h, w], "counts": str or list}) as (h, w) bool."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _counts_from_string(counts)
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    for i, n in enumerate(counts):
        if i % 2:
            flat[pos : pos + n] = True
        pos += n
    if pos != h * w:
        raise UserError(f"a mask's run lengths cover {pos} pixels, not {h} x {w}")
    return flat.reshape(w, h).T  # column-major, as COCO stores it


# --------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class Job:
    image: str  # source image
    image_out: str
    label_out: str
    rule: str  # copy, lut:<name>, or context
    label: str | None = None  # source label map (not for context)
    shape: tuple[int, int] | None = None  # context: (h, w)
    segments: tuple = ()  # context: (category id, rle) in the annotation file's order


LUTS = {"stuff": STUFF_LUT, "object": OBJECT_LUT, "city": CITY_LUT}


def _label(job: Job) -> np.ndarray:
    if job.rule == "context":
        mask = np.zeros(job.shape, dtype=np.int64)
        for cat, rle in job.segments:  # later annotations overwrite, as the Detail API does
            mask[decode_rle(rle)] = cat
        kept = np.asarray(CONTEXT_KEPT)
        index = np.searchsorted(kept, mask)  # = np.digitize(mask, kept, right=True)
        known = (index < len(kept)) & (kept[np.minimum(index, len(kept) - 1)] == mask)
        return np.where(known, index, 0).astype(np.uint8)
    with Image.open(job.label) as im:
        if im.mode not in ("L", "P"):  # 16-bit ("I;16"), colour or float maps
            raise UserError(f"{job.label} is a {im.mode} image, not an 8-bit label map")
        label = np.asarray(im)
    if job.rule == "copy":
        return label
    return LUTS[job.rule.split(":")[1]][label]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it and the source already has the mode this
    umask gives (a link shares its source's mode), else a copy."""
    linked = (src.stat().st_mode & 0o777) == file_mode()
    with atomic_path(dst, keep_mode=linked) as tmp:
        tmp.unlink()
        if linked:
            try:
                os.link(src, tmp)
            except OSError:  # another file system
                linked = False
        if not linked:
            shutil.copyfile(src, tmp)  # a new file: the umask's mode


def run_job(job: Job) -> tuple[str, str, dict[int, int]]:
    """Write one image and its label map; (label file name, its digest, its histogram)."""
    image_out, label_out = Path(job.image_out), Path(job.label_out)
    if not image_out.exists():
        _link_or_copy(Path(job.image), image_out)
    if label_out.exists():
        label = np.asarray(Image.open(label_out))
    else:
        try:
            label = _label(job)
            with Image.open(job.image) as im:
                size = im.size[::-1]
        except (OSError, ValueError, IndexError, KeyError, TypeError) as e:
            raise UserError(f"cannot read the labels of {job.image}: {e}") from None
        if label.shape != size:
            raise UserError(
                f"the label map of {job.image} is {label.shape[1]} x {label.shape[0]}, "
                f"its image {size[1]} x {size[0]}"
            )
        if job.rule == "copy" and job.label:
            _link_or_copy(Path(job.label), label_out)
        else:
            with atomic_path(label_out) as tmp:
                Image.fromarray(label.astype(np.uint8)).save(tmp, format="PNG")
    digest = hashlib.sha256()
    digest.update(f"{label_out.name}:{label.shape}".encode())
    digest.update(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    values, counts = np.unique(label, return_counts=True)
    return (
        label_out.name,
        digest.hexdigest(),
        dict(zip(values.tolist(), counts.tolist(), strict=True)),
    )


# --------------------------------------------------------------------------- the plans


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"source is incomplete: {path} ({what}) does not exist")
    return path


def _under(source: Path, name: str, holds: str) -> Path:
    """The dataset's root: ``source`` itself if it is the ``name`` folder or holds ``holds``
    (a root under another name), else ``source/name``; one line if neither holds it."""
    if source.name == name or (source / holds).exists():
        return source
    if not (source / name / holds).exists():
        raise UserError(f"source is incomplete: neither {source / name} nor {source} holds {holds}")
    return source / name


def _pairs(
    root: Path, images: str, labels: str, label_suffix: str, image_suffix: str, nested=False
) -> list[Sample]:
    """The samples ``eval`` would pair (``suffix_pairs``), without a converter's earlier output
    (``*TrainIds*``); refuses labels without their image."""
    _need(root / images, "the images")
    _need(root / labels, "the annotations")
    find = suffix_pairs(images, labels, label_suffix, image_suffix, nested)
    out = [s for s in find(root) if "TrainIds" not in s.name]
    missing = [s for s in out if not s.image.exists()]
    if missing:
        raise UserError(
            f"source is incomplete: {len(missing)} of {len(out)} label maps have "
            f"no image, e.g. {missing[0].image}"
        )
    if not out:
        raise UserError(f"source is incomplete: no *{label_suffix} files under {root / labels}")
    paired = {s.image for s in out}
    unlabelled = sorted(
        p
        for p in (root / images).glob(f"*/*{image_suffix}" if nested else f"*{image_suffix}")
        if p not in paired
    )
    if unlabelled:
        raise UserError(
            f"source is incomplete: {len(unlabelled)} of {len(out) + len(unlabelled)} images "
            f"have no *{label_suffix} label map, e.g. {unlabelled[0]}"
        )
    return out


def _voc_plan(source: Path, out: Path, split: str) -> tuple[list[Job], dict[str, str]]:
    root = _under(source, "VOC2012", "ImageSets/Segmentation")
    listed = _need(root / f"ImageSets/Segmentation/{split}.txt", f"the {split} list")
    ids = listed.read_text().split()
    if not ids:
        raise UserError(f"{listed} lists no {split} images")
    jobs, missing = [], []
    for i in ids:
        img, lab = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
        if not (img.exists() and lab.exists()):
            missing.append(i)
        jobs.append(
            Job(
                str(img),
                str(out / "JPEGImages" / img.name),
                str(out / "SegmentationClass" / lab.name),
                "copy",
                str(lab),
            )
        )
    if missing:
        raise UserError(
            f"source is incomplete: {len(missing)} of {len(ids)} {split} images lack their JPEG "
            f"or SegmentationClass PNG, e.g. {missing[0]}"
        )
    return jobs, {f"ImageSets/Segmentation/{split}.txt": "".join(f"{i}\n" for i in ids)}


def _context_plan(
    source: Path, out: Path, annotations: str | None, split: str
) -> tuple[list[Job], dict[str, str]]:
    root = _under(source, "VOC2010", "JPEGImages")
    images = _need(root / "JPEGImages", "the VOC2010 images")
    ann_path = Path(annotations) if annotations else None
    if ann_path is None:
        candidates = [source / "trainval_merged.json", root / "trainval_merged.json"]
        ann_path = next((c for c in candidates if c.exists()), candidates[0])
    _need(ann_path, "Pascal Context's annotation file; --annotations names another place")
    try:
        data = json.loads(ann_path.read_text())
        imgs = [i for i in data["images"] if i.get("phase") == split]
        segs = data["annos_segmentation"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{ann_path} is not Pascal Context's trainval_merged.json ({e})") from None
    per_image = defaultdict(list)
    for n, seg in enumerate(segs):
        try:
            cat, rle = int(seg["category_id"]), seg["segmentation"]
            if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
                raise ValueError("segmentation is not an RLE with counts and size")
            per_image[seg["image_id"]].append((cat, rle))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{ann_path}: annotation {n} is not one of Pascal Context's ({e})"
            ) from None
    jobs, names, missing = [], [], []
    for im in imgs:
        try:
            file_name, shape = im["file_name"], (int(im["height"]), int(im["width"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"{ann_path}: image entry {im} is not one of Pascal Context's ({e})"
            ) from None
        if (
            not isinstance(file_name, str)
            or file_name in ("", ".", "..")
            or (Path(file_name).name != file_name or "\\" in file_name)
        ):
            raise UserError(
                f"{ann_path}: image file_name {file_name!r} is not a file name in {images}"
            )
        img = images / file_name
        if not img.exists():
            missing.append(file_name)
        stem = Path(file_name).stem
        names.append(stem)
        jobs.append(
            Job(
                str(img),
                str(out / "JPEGImages" / img.name),
                str(out / "SegmentationClassContext" / f"{stem}.png"),
                "context",
                shape=shape,
                segments=tuple(per_image.get(im["image_id"], ())),
            )
        )
    if not jobs:
        raise UserError(f"{ann_path} lists no {split} images")
    if missing:
        raise UserError(
            f"source is incomplete: {len(missing)} of {len(jobs)} {split} images are not in "
            f"{images}, e.g. {missing[0]}"
        )
    lists = {f"ImageSets/SegmentationContext/{split}.txt": "".join(f"{n}\n" for n in sorted(names))}
    return jobs, lists


def _coco_plan(
    source: Path, out: Path, rule: str, suffix: str, split: str
) -> tuple[list[Job], dict]:
    images, labels = f"images/{split}2017", f"annotations/{split}2017"
    jobs = [
        Job(
            str(s.image),
            str(out / images / s.image.name),
            str(out / labels / f"{s.name}{suffix}"),
            rule,
            str(s.label),
        )
        for s in _pairs(source, images, labels, ".png", ".jpg")
    ]
    return jobs, {}


def _city_plan(source: Path, out: Path, split: str) -> tuple[list[Job], dict]:
    jobs = []
    images, labels = f"leftImg8bit/{split}", f"gtFine/{split}"
    for s in _pairs(source, images, labels, "_gtFine_labelIds.png", "_leftImg8bit.png", True):
        city = s.label.parent.name
        jobs.append(
            Job(
                str(s.image),
                str(out / images / city / s.image.name),
                str(out / labels / city / f"{s.name}_gtFine_labelTrainIds.png"),
                "lut:city",
                str(s.label),
            )
        )
    return jobs, {}


def _ade_plan(source: Path, out: Path, split: str) -> tuple[list[Job], dict]:
    word = {"val": "validation", "train": "training"}[split]
    images, labels = f"images/{word}", f"annotations/{word}"
    root = _under(source, "ADEChallengeData2016", images)
    jobs = [
        Job(
            str(s.image),
            str(out / images / s.image.name),
            str(out / labels / s.label.name),
            "copy",
            str(s.label),
        )
        for s in _pairs(root, images, labels, ".png", ".jpg")
    ]
    return jobs, {}


# --------------------------------------------------------------------------- the command


@dataclass
class PrepareConfig:
    dataset: str  # voc, context, object, stuff, city or ade
    source: str  # the dataset as its authors publish it
    output: str  # folder for MMSegmentation's layout (--data-root of eval)
    annotations: str | None = None  # context: trainval_merged.json (default: in --source)
    processes: int = 0  # worker processes (0: one per core, at most 8)
    split: str = "val"  # val (what eval scores) or train (for --supervision masks)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise UserError(f"unknown split {self.split!r}; prepare writes {', '.join(SPLITS)}")
        if self.dataset not in DATASETS:
            raise UserError(
                f"unknown dataset {self.dataset!r}; prepare knows {', '.join(DATASETS)}"
            )
        if not Path(self.source).is_dir():
            raise UserError(f"source {self.source} is not a folder")
        if Path(self.output).resolve() == Path(self.source).resolve():
            raise UserError("--output must be another folder than --source")


@dataclass
class PrepareStats:
    dataset: str
    images: int
    output: str
    label_sha256: str
    manifest: str
    label_values: int  # distinct label values written (the histogram is in the manifest)


def plan(cfg: PrepareConfig) -> tuple[list[Job], dict[str, str]]:
    source, out, split = Path(cfg.source), Path(cfg.output), cfg.split
    if cfg.dataset == "voc":
        return _voc_plan(source, out, split)
    if cfg.dataset == "context":
        return _context_plan(source, out, cfg.annotations, split)
    if cfg.dataset == "object":
        return _coco_plan(source, out, "lut:object", "_instanceTrainIds.png", split)
    if cfg.dataset == "stuff":
        return _coco_plan(source, out, "lut:stuff", "_labelTrainIds.png", split)
    if cfg.dataset == "city":
        return _city_plan(source, out, split)
    return _ade_plan(source, out, split)


def record_name(cfg: PrepareConfig) -> str:
    """The manifest's stem: ``prepare-<dataset>`` for val, ``prepare-<dataset>-train``."""
    return f"prepare-{cfg.dataset}" + ("" if cfg.split == "val" else f"-{cfg.split}")


def _identity(job: Job) -> str:
    """What a job's output is made from: its sources' names, sizes and modification times
    (and Pascal Context's annotations of the image), so an edited source makes it again."""
    h = hashlib.sha1(json.dumps([job.rule, job.shape, Path(job.label_out).name]).encode())
    for f in (job.image, job.label):
        if f:
            st = os.stat(f)
            h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns};".encode())
    if job.segments:
        h.update(json.dumps(job.segments, sort_keys=True).encode())
    return h.hexdigest()


def _check_output(cfg: PrepareConfig, out: Path, jobs: list[Job], lists: dict) -> None:
    """Refuse an output inside the source, or one that holds what prepare did not write."""
    source = Path(cfg.source).resolve()
    if out.resolve().is_relative_to(source):
        raise UserError(f"--output {out} is inside --source {cfg.source}: choose another folder")
    if not out.is_dir():
        return
    ours = {Path(p).relative_to(out).parts[0] for j in jobs for p in (j.image_out, j.label_out)}
    ours |= {Path(rel).parts[0] for rel in lists}
    other = sorted(
        p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("prepare-")
    )
    if other:
        raise UserError(
            f"--output {out} holds files prepare did not write ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}): choose a new or empty folder"
        )


def _forget_changed(out: Path, stem: str, jobs: list[Job]) -> None:
    """Record each job's sources (before any job runs, so a killed run's outputs stay valid)
    and remove the outputs of those whose sources changed since: they are made again."""
    record = out / f"{stem}.sources.json"
    try:
        old = json.loads(record.read_text()) if record.exists() else {}
    except (OSError, ValueError):
        old = {}
    keys = [str(Path(j.label_out).relative_to(out)) for j in jobs]
    new = {k: _identity(j) for k, j in zip(keys, jobs, strict=True)}
    changed = [j for k, j in zip(keys, jobs, strict=True) if old.get(k) != new[k]]
    for j in changed:
        Path(j.image_out).unlink(missing_ok=True)
        Path(j.label_out).unlink(missing_ok=True)
    write_json(record, new)


def run_prepare(
    cfg: PrepareConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> PrepareStats:
    jobs, lists = plan(cfg)
    out = Path(cfg.output)
    _check_output(cfg, out, jobs, lists)
    manifest = out / f"{record_name(cfg)}.json"
    manifest.unlink(missing_ok=True)  # written again at the end, when everything is there
    _forget_changed(out, record_name(cfg), jobs)
    for folder in {Path(j.label_out).parent for j in jobs} | {
        Path(j.image_out).parent for j in jobs
    }:
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale(folder)
    if on_start:
        on_start(len(jobs))
    digests, histogram = [], defaultdict(int)
    for name, digest, counts in parallel_map(run_job, jobs, default_processes(cfg.processes)):
        digests.append((name, digest))
        for value, n in counts.items():
            histogram[int(value)] += n
        if on_advance:
            on_advance(1)
    for rel, text in lists.items():
        with atomic_path(out / rel) as tmp:
            tmp.write_text(text)
    total = hashlib.sha256("".join(d for _, d in sorted(digests)).encode()).hexdigest()
    labels = {str(k): histogram[k] for k in sorted(histogram)}
    record = {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "images": len(jobs),
        "label_sha256": total,
        "labels": labels,
        "settings": asdict(cfg),
    }
    write_json(manifest, record)
    return PrepareStats(cfg.dataset, len(jobs), str(out), total, str(manifest), len(labels))
