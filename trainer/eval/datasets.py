"""The zero-shot benchmarks' splits, read from MMSegmentation's on-disk layouts: ``val`` for
``eval``, ``train`` for mask-supervised training (``synseg-train run --supervision masks``).

| name    | --data-root (MMSegmentation's folder) | labels (SPLIT: val or train)                |
|---------|---------------------------------------|---------------------------------------------|
| voc     | VOCdevkit/VOC2012                     | SegmentationClass/*.png, 0 = background; ImageSets/Segmentation/SPLIT.txt |
| voc20   | VOCdevkit/VOC2012                     | the same, 0 (background) ignored            |
| context | VOCdevkit/VOC2010                     | SegmentationClassContext/*.png, 0 ignored; ImageSets/SegmentationContext/SPLIT.txt |
| context60 | VOCdevkit/VOC2010                   | the same, 0 = background                    |
| object  | coco_stuff164k                        | annotations/SPLIT2017/*_instanceTrainIds.png |
| stuff   | coco_stuff164k                        | annotations/SPLIT2017/*_labelTrainIds.png   |
| city    | cityscapes                            | gtFine/SPLIT/*/*_gtFine_labelTrainIds.png   |
| ade     | ADEChallengeData2016                  | annotations/{validation,training}/*.png, 0 ignored |
| world   | the synthetic world's folder          | VOC2012/SegmentationClass/*.png (val.txt)   |
| world-ref | the synthetic world's folder        | the ``ref`` split (ref.txt), its seen classes only, for either split |

Class names are data: ``trainer/eval/classnames/<name>.txt`` (one class a line, in label order,
", " between synonyms); the world reads its own ``classes.txt``, and ``world-ref`` those of
them that are not unseen (the ref split never shows an unseen class: its labels are renumbered
to the seen classes, in the world's order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from synseg.errors import UserError

CLASSNAMES = Path(__file__).parent / "classnames"


@dataclass(frozen=True)
class Sample:
    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int  # label values 0..num_classes-1 after reduce_zero_label
    background: bool  # class 0 is "background" (scored by a threshold, not a prompt)
    reduce_zero_label: bool
    layout: str  # what --data-root must hold, for the error message ({split}: the split's word)
    list_samples: Callable[[Path, str], list[Sample]]  # root, the split's word
    splits: tuple[tuple[str, str], ...] = (("val", "val"), ("train", "train"))  # split -> word
    seen_only: bool = False  # a world split of the seen classes only (renumbered to them)

    def word(self, split: str) -> str:
        """The split's name in the dataset's own files (ADE: validation, COCO: val2017)."""
        words = dict(self.splits)
        if split not in words:
            raise UserError(f"{self.name} has no {split} split; it has {', '.join(words)}")
        return words[split]


def _voc_like(images: str, labels: str, lists: str) -> Callable[[Path, str], list[Sample]]:
    """Samples named by ``lists/<split>.txt``."""

    def find(root: Path, split: str) -> list[Sample]:
        ids = (root / lists / f"{split}.txt").read_text().split()
        return [Sample(i, root / images / f"{i}.jpg", root / labels / f"{i}.png") for i in ids]

    return find


def suffix_pairs(
    images: str, labels: str, suffix: str, img_suffix: str = ".jpg", nested: bool = False
):
    """Samples from label files named ``<stem><suffix>`` under ``labels`` (one folder deeper
    when ``nested``, e.g. Cityscapes' cities), each with ``images/[folder/]<stem><img_suffix>``."""

    def find(root: Path) -> list[Sample]:
        pattern = f"*/*{suffix}" if nested else f"*{suffix}"
        out = []
        for lab in sorted((root / labels).glob(pattern)):
            stem = lab.name[: -len(suffix)]
            sub = lab.parent.name if nested else ""
            out.append(Sample(stem, root / images / sub / f"{stem}{img_suffix}", lab))
        return out

    return find


def _split_pairs(
    images: str, labels: str, suffix: str, img_suffix: str = ".jpg", nested: bool = False
) -> Callable[[Path, str], list[Sample]]:
    """``suffix_pairs`` with the split's word in the folder names (``images/{split}``)."""
    return lambda root, word: suffix_pairs(
        images.format(split=word), labels.format(split=word), suffix, img_suffix, nested
    )(root)


COCO_SPLITS = (("val", "val2017"), ("train", "train2017"))
SPECS = {
    "voc": DatasetSpec(
        "voc",
        21,
        True,
        False,
        "JPEGImages/, SegmentationClass/, ImageSets/Segmentation/{split}.txt",
        _voc_like("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"),
    ),
    "context": DatasetSpec(
        "context",
        59,
        False,
        True,
        "JPEGImages/, SegmentationClassContext/, ImageSets/SegmentationContext/{split}.txt",
        _voc_like("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"),
    ),
    "object": DatasetSpec(
        "object",
        81,
        True,
        False,
        "images/{split}/*.jpg, annotations/{split}/*_instanceTrainIds.png",
        _split_pairs("images/{split}", "annotations/{split}", "_instanceTrainIds.png"),
        COCO_SPLITS,
    ),
    "stuff": DatasetSpec(
        "stuff",
        171,
        False,
        False,
        "images/{split}/*.jpg, annotations/{split}/*_labelTrainIds.png",
        _split_pairs("images/{split}", "annotations/{split}", "_labelTrainIds.png"),
        COCO_SPLITS,
    ),
    "city": DatasetSpec(
        "city",
        19,
        False,
        False,
        "leftImg8bit/{split}/CITY/*_leftImg8bit.png, "
        "gtFine/{split}/CITY/*_gtFine_labelTrainIds.png",
        _split_pairs(
            "leftImg8bit/{split}",
            "gtFine/{split}",
            "_gtFine_labelTrainIds.png",
            "_leftImg8bit.png",
            nested=True,
        ),
    ),
    "ade": DatasetSpec(
        "ade",
        150,
        False,
        True,
        "images/{split}/*.jpg, annotations/{split}/*.png",
        _split_pairs("images/{split}", "annotations/{split}", ".png"),
        (("val", "validation"), ("train", "training")),
    ),
    "world": DatasetSpec(
        "world",
        0,
        False,
        False,
        "classes.txt, VOC2012/JPEGImages/, VOC2012/SegmentationClass/, "
        "VOC2012/ImageSets/Segmentation/{split}.txt (made by `synseg-data world`)",
        _voc_like(
            "VOC2012/JPEGImages", "VOC2012/SegmentationClass", "VOC2012/ImageSets/Segmentation"
        ),
        (("val", "val"),),
    ),
    "world-ref": DatasetSpec(
        "world-ref",
        0,
        False,
        False,
        "classes.txt, world.json, VOC2012/JPEGImages/, VOC2012/SegmentationClass/, "
        "VOC2012/ImageSets/Segmentation/{split}.txt (made by `synseg-data world`)",
        _voc_like(
            "VOC2012/JPEGImages", "VOC2012/SegmentationClass", "VOC2012/ImageSets/Segmentation"
        ),
        (("val", "ref"), ("train", "ref")),
        seen_only=True,
    ),
}

# The same files read another way: VOC without its background (label 0 ignored, 1..20 ->
# 0..19), and Context with its background (label 0, scored by the threshold).
SPECS["voc20"] = replace(
    SPECS["voc"], name="voc20", num_classes=20, background=False, reduce_zero_label=True
)
SPECS["context60"] = replace(
    SPECS["context"], name="context60", num_classes=60, background=True, reduce_zero_label=False
)


def read_classnames(path: Path) -> list[list[str]]:
    """One class a line (``#`` comments skipped); ", " separates synonyms."""
    if not Path(path).is_file():
        raise UserError(f"class file {path} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"class file {path} is not UTF-8 text") from None
    classes = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            names = [n.strip() for n in line.split(",") if n.strip()]
            if not names or any(not n.isprintable() for n in names):
                raise UserError(f"class file {path} line {lineno} holds no usable class name")
            classes.append(names)
    if not classes:
        raise UserError(f"class file {path} lists no classes")
    # A class's first name keys the results and names its pictures: two classes of one first
    # name would lose one of them. A synonym may be shared (SCLIP's own COCO-Object file
    # prompts "bed" for background and for the bed): both classes score it.
    first: dict[str, int] = {}
    for i, names in enumerate(classes):
        if first.setdefault(names[0], i) != i:
            raise UserError(
                f"class file {path}: classes {first[names[0]]} and {i} are both named "
                f"{names[0]!r} (the first name of a line names its class)"
            )
    return classes


@dataclass
class Dataset:
    spec: DatasetSpec
    root: Path
    classes: list[list[str]]  # names (with synonyms) of each label value
    samples: list[Sample]
    split: str = "val"
    lookup: np.ndarray | None = None  # 256 entries: the files' label values renumbered

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, sample: Sample) -> tuple[Image.Image, np.ndarray]:
        """The RGB image and its label map (reduce_zero_label applied)."""
        from trainer.eval.metrics import reduce_zero_label

        try:
            image = Image.open(sample.image).convert("RGB")
            label = np.asarray(Image.open(sample.label))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read {sample.image.name} / {sample.label.name}: {e}") from None
        if label.ndim != 2:
            raise UserError(f"label {sample.label} is not a single-channel class map")
        if self.spec.reduce_zero_label:
            label = reduce_zero_label(label)
        if self.lookup is not None:
            label = self.lookup[label]
        bad = (label != 255) & (label >= self.num_classes)
        if bad.any():
            raise UserError(
                f"label value {int(label[bad].max())} in {sample.label.name} is outside the "
                f"{self.num_classes} classes of the class file; wrong --classes for {self.spec.name}?"
            )
        return image, label


def _seen_only(root: Path) -> tuple[list[list[str]], np.ndarray]:
    """The world's classes less its unseen ones, and the table renumbering its labels to them
    (an unseen class's pixels, which ref never has, would be ignored: 255)."""
    from pipeline.world import load_world

    names = read_classnames(root / "classes.txt")
    unseen = set(load_world(root).get("unseen", ()))
    lookup = np.full(256, 255, dtype=np.uint8)
    kept = []
    for value, synonyms in enumerate(names):
        if synonyms[0] not in unseen:
            lookup[value] = len(kept)
            kept.append(synonyms)
    return kept, lookup


def open_dataset(
    name: str,
    root: str | Path,
    classes: str | Path | None = None,
    limit: int = 0,
    split: str = "val",
) -> Dataset:
    if name not in SPECS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(SPECS)}")
    if limit < 0:
        raise UserError(f"--limit must be 0 (all images) or more, not {limit}")
    spec, root = SPECS[name], Path(root)
    word = spec.word(split)
    if not root.is_dir():
        raise UserError(f"data root {root} does not exist")
    try:
        samples = spec.list_samples(root, word)
    except FileNotFoundError:
        samples = []
    samples = [s for s in samples if s.label.exists()]
    if not samples:
        hint = (
            f" (`synseg-train prepare {name} --split {split}` writes it)" if split != "val" else ""
        )
        raise UserError(
            f"{root} does not hold the {split} split of {name} in MMSegmentation's layout: "
            f"expected {spec.layout.format(split=word)}{hint}"
        )
    missing = [s for s in samples if not s.image.exists()]
    if missing:
        raise UserError(f"{len(missing)} image(s) of {name} are missing, e.g. {missing[0].image}")
    lookup = None
    if spec.seen_only and classes is None:
        names, lookup = _seen_only(root)
    else:
        if classes is None:  # a world (num_classes 0) lists its own classes
            classes = root / "classes.txt" if not spec.num_classes else CLASSNAMES / f"{name}.txt"
        names = read_classnames(Path(classes))
        expected = spec.num_classes
        if not expected:  # the world: as many classes as the world itself lists
            expected = len(read_classnames(root / "classes.txt"))
        if len(names) != expected:
            raise UserError(
                f"class file {classes} has {len(names)} classes; {name} labels have {expected}"
            )
    if limit:
        samples = samples[:limit]
    return Dataset(spec, root, names, samples, split, lookup)
