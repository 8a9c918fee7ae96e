"""The offline synthetic world: images, CC12M-style captions and VOC-layout masks.

Nothing here needs the internet. A world is a folder:

    world.json                     what was generated (seed, counts, size, port)
    classes.txt                    one class per line; line i is mask value i
    cc12m.tsv                      header-less ``url<TAB>caption`` for the train split, as CC12M ships it
    http/train/NNNNNN.jpg          the files ``serve`` puts on a loopback port
    VOC2012/JPEGImages/*.jpg       held-out images with masks, in PASCAL VOC's layout
    VOC2012/SegmentationClass/*.png
    VOC2012/ImageSets/Segmentation/{val,ref}.txt

``val`` is the evaluation split; ``ref`` is a separate split of images with masks that plays the
part of the dense data CLIPSeg was trained on. Train images have captions only, like CC12M.

20 classes: 8 backgrounds and 12 objects. ``ref`` shows only the 14 seen classes (``SEEN``),
in another drawing style, so a decoder trained on it meets both new categories (``UNSEEN``) and
a domain shift on ``val``. Objects are large (roughly 8-30% of the image each; a little smaller
in ``ref``), because an object of a few percent is below what a patch-16 backbone can resolve at
low resolution. Captions carry the noise the
exclusion list exists for: ``<PERSON>``, stock-photo words, directions, units and generic nouns.
Every image is drawn from its own seed, so a larger world keeps the images of a smaller one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from synseg.errors import UserError
from synseg.fsutil import atomic_path, write_json

WORLD_VERSION = 2
BACKGROUNDS = ("grass", "sand", "water", "snow", "road", "wall", "lava", "carpet")
OBJECTS = (
    "ball", "kite", "house", "tree", "car", "fish",
    "boat", "star", "flower", "umbrella", "mushroom", "heart",
)  # fmt: skip
CLASSES = BACKGROUNDS + OBJECTS
# Classes the ``ref`` split never shows: the CLIPSeg-style decoder is trained with masks of the
# others only, and MCCL on the captions is what may carry it to these.
UNSEEN = ("snow", "lava", "fish", "boat", "umbrella", "mushroom")
SEEN = tuple(c for c in CLASSES if c not in UNSEEN)
IGNORE = 255

# Words a caption may use for each class; the first is the class name. Synonyms are rarer.
SYNONYMS = {
    "grass": ["grass", "lawn", "meadow"],
    "sand": ["sand", "beach", "desert"],
    "water": ["water", "sea", "lake"],
    "snow": ["snow", "snowfield"],
    "road": ["road", "street"],
    "wall": ["wall", "brick wall"],
    "lava": ["lava", "magma"],
    "carpet": ["carpet", "rug"],
    "ball": ["ball", "beach ball"],
    "kite": ["kite"],
    "house": ["house", "cottage"],
    "tree": ["tree", "pine tree"],
    "car": ["car", "sports car"],
    "fish": ["fish", "goldfish"],
    "boat": ["boat", "sailboat"],
    "star": ["star"],
    "flower": ["flower", "daisy"],
    "umbrella": ["umbrella", "parasol"],
    "mushroom": ["mushroom", "toadstool"],
    "heart": ["heart"],
}
COLOURS = {
    "red": (200, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (230, 200, 40),
    "purple": (130, 60, 170),
    "blue": (40, 80, 210),
    "pink": (230, 120, 170),
    "white": (235, 235, 235),
    "black": (30, 30, 30),
}
OBJECT_COLOURS = {
    "ball": ["red", "orange", "purple", "pink", "blue"],
    "kite": ["red", "yellow", "purple", "pink"],
    "house": ["white", "yellow", "red"],
    "tree": ["green"],
    "car": ["red", "blue", "black", "yellow"],
    "fish": ["orange", "yellow", "red"],
    "boat": ["white", "red", "blue"],
    "star": ["yellow", "orange", "red"],
    "flower": ["pink", "purple", "red", "yellow"],
    "umbrella": ["red", "blue", "purple", "pink"],
    "mushroom": ["red", "orange"],
    "heart": ["red", "pink", "purple"],
}
# Where a caption puts its objects on each background.
PLACE = {
    "grass": "on the",
    "sand": "on the",
    "water": "in the",
    "snow": "in the",
    "road": "on the",
    "wall": "in front of the",
    "lava": "over the",
    "carpet": "on the",
}
# Caption noise that a good exclusion list removes (stock-photo words, views, directions, units).
PREFIXES = [
    "",
    "",
    "",
    "stock photo of ",
    "royalty free image of ",
    "close-up of ",
    "illustration of ",
    "photo : ",
    "a picture of ",
    "top view of ",
]
SUFFIXES = [
    "",
    "",
    "",
    " in the background",
    " on the left side",
    " , copy space",
    " on a sunny day",
    " , front view",
    " at the north end of the area",
    " , size 12 inches",
    " , a pair of them",
    " for the first time",
    " in the southwest part of the image",
    " , concept of summer",
]


@dataclass(frozen=True)
class WorldConfig:
    output: Path = Path("data/world")  # folder for the world
    # The demo's sizes (``make demo`` fits about ten minutes on two cores); every other default
    # of a world's size (the demos, the command lines) is this one.
    count: int = 1600  # train images (captions only, served over HTTP)
    val_count: int = 100  # held-out images with masks, for evaluation
    ref_count: int = 600  # images with masks standing in for CLIPSeg's dense training data
    size: int = 128  # image side in pixels
    seed: int = 0  # random seed of everything drawn
    port: int = 8642  # loopback port written into the URL list
    dead_fraction: float = 0.03  # URLs that 404 or are refused, as in CC12M
    broken_fraction: float = 0.01  # served files that are not images
    replace: bool = False  # a world made with other settings (or an older version) is redone

    def __post_init__(self) -> None:
        problems = []
        if self.count < 1:
            problems.append("--count must be at least 1")
        if self.val_count < 0 or self.ref_count < 0:
            problems.append("--val-count and --ref-count must not be negative")
        if self.size < 32:
            problems.append("--size must be at least 32")
        if not 0 <= self.dead_fraction + self.broken_fraction < 1:
            problems.append("dead and broken fractions must be in [0, 1)")
        if not 0 < self.port < 65536:
            problems.append("--port must be in 1..65535")
        if problems:
            raise UserError("; ".join(problems))

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("output")
        d.pop("port")  # the port only changes URLs, which are rewritten cheaply
        d.pop("replace")
        d["version"] = WORLD_VERSION
        return d


@dataclass
class WorldStats:
    output: str
    train: int
    val: int
    ref: int
    dead_urls: int
    broken_files: int
    reused: bool


@dataclass
class Sample:
    image: Image.Image
    mask: np.ndarray  # (H, W) uint8 class ids, 255 on object borders
    caption: str
    present: list[str]  # classes with at least one pixel


# --------------------------------------------------------------------------- drawing


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ["train", "val", "ref"].index(split), index])


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An (H, W, 3) float texture that tells the backgrounds apart by colour and pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0, 1, (size, size)).astype(np.float32)
    if kind == "grass":
        blades = np.sin(xx * rng.uniform(60, 90) + rng.uniform(0, 6)) * 0.5 + 0.5
        base = np.stack([40 + 30 * blades, 120 + 50 * blades, 40 + 10 * blades], -1)
        base += noise[..., None] * 12
    elif kind == "sand":
        dunes = np.sin((xx + yy * 0.4) * rng.uniform(8, 14)) * 0.5 + 0.5
        base = np.stack([205 + 20 * dunes, 180 + 15 * dunes, 120 + 10 * dunes], -1)
        base += noise[..., None] * 10
    elif kind == "water":
        waves = np.sin(yy * rng.uniform(40, 60) + np.sin(xx * 9) * 2) * 0.5 + 0.5
        base = np.stack([30 + 30 * waves, 90 + 50 * waves, 170 + 50 * waves], -1)
        base += noise[..., None] * 8
    elif kind == "snow":
        base = np.stack([235 + 0 * xx, 240 + 0 * xx, 250 + 0 * xx], -1)
        base += noise[..., None] * 6 - (yy[..., None] * 25)
    elif kind == "road":
        lane = (np.abs(xx - rng.uniform(0.3, 0.7)) < 0.03) & (np.sin(yy * 25) > 0)
        base = np.stack([95 + 0 * xx, 95 + 0 * xx, 100 + 0 * xx], -1) + noise[..., None] * 14
        base[lane] = (225, 210, 90)
    elif kind == "wall":
        rows = np.floor(yy * 10)
        shift = (rows % 2) * 0.5
        mortar = (np.abs(yy * 10 - np.round(yy * 10)) < 0.08) | (
            np.abs((xx * 5 + shift) - np.round(xx * 5 + shift)) < 0.05
        )
        base = np.stack([150 + 0 * xx, 60 + 0 * xx, 45 + 0 * xx], -1) + noise[..., None] * 10
        base[mortar] = (200, 195, 185)
    elif kind == "lava":
        cracks = np.sin(xx * rng.uniform(15, 25) + np.sin(yy * 11) * 3) * np.sin(yy * 17)
        hot = np.clip(cracks * 2, 0, 1)
        base = np.stack([70 + 185 * hot, 20 + 140 * hot, 10 + 20 * hot], -1)
        base += noise[..., None] * 8
    else:  # carpet
        diamonds = (np.sin((xx + yy) * 30) * np.sin((xx - yy) * 30) > 0).astype(np.float32)
        base = np.stack([90 + 40 * diamonds, 40 + 20 * diamonds, 120 + 50 * diamonds], -1)
        base += noise[..., None] * 6
    return base


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple, fill, rng) -> None:
    """Draw one object of ``kind`` inside ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "ball":
        draw.ellipse(box, fill=fill)
    elif kind == "kite":
        draw.polygon([(cx, y0), (x1, cy - h * 0.1), (cx, y1), (x0, cy - h * 0.1)], fill=fill)
    elif kind == "house":
        draw.rectangle((x0 + w * 0.1, cy - h * 0.05, x1 - w * 0.1, y1), fill=fill)
        draw.polygon([(x0, cy), (cx, y0), (x1, cy)], fill=(150, 50, 40) if fill else 0)
    elif kind == "tree":
        draw.rectangle(
            (cx - w * 0.1, cy + h * 0.15, cx + w * 0.1, y1), fill=(110, 70, 30) if fill else 0
        )
        draw.polygon([(x0, cy + h * 0.25), (cx, y0), (x1, cy + h * 0.25)], fill=fill)
    elif kind == "car":
        draw.rectangle((x0, cy - h * 0.1, x1, cy + h * 0.25), fill=fill)
        draw.rectangle((x0 + w * 0.25, y0 + h * 0.1, x1 - w * 0.2, cy), fill=fill)
        r = h * 0.17
        for wx in (x0 + w * 0.25, x1 - w * 0.25):
            draw.ellipse((wx - r, y1 - 2 * r, wx + r, y1), fill=(20, 20, 20) if fill else 0)
    elif kind == "fish":
        draw.ellipse((x0 + w * 0.25, y0 + h * 0.2, x1, y1 - h * 0.2), fill=fill)
        draw.polygon([(x0, y0 + h * 0.15), (x0 + w * 0.35, cy), (x0, y1 - h * 0.15)], fill=fill)
    elif kind == "boat":
        hull = [(x0, cy + h * 0.2), (x1, cy + h * 0.2), (x1 - w * 0.15, y1), (x0 + w * 0.15, y1)]
        draw.polygon(hull, fill=(120, 70, 40) if fill else 0)
        draw.polygon([(cx, y0), (cx, cy + h * 0.15), (x0 + w * 0.1, cy + h * 0.15)], fill=fill)
        draw.polygon(
            [
                (cx + w * 0.05, y0 + h * 0.1),
                (cx + w * 0.05, cy + h * 0.15),
                (x1 - w * 0.1, cy + h * 0.15),
            ],
            fill=fill,
        )
    elif kind == "star":
        pts = []
        for i in range(10):
            r = 0.5 if i % 2 == 0 else 0.22
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * w * math.cos(a), cy + r * h * math.sin(a)))
        draw.polygon(pts, fill=fill)
    elif kind == "flower":
        for i in range(5):
            a = i * 2 * math.pi / 5
            px, py = cx + 0.27 * w * math.cos(a), cy + 0.27 * h * math.sin(a)
            draw.ellipse((px - w * 0.2, py - h * 0.2, px + w * 0.2, py + h * 0.2), fill=fill)
        draw.ellipse(
            (cx - w * 0.13, cy - h * 0.13, cx + w * 0.13, cy + h * 0.13),
            fill=(240, 210, 60) if fill else 0,
        )
    elif kind == "umbrella":
        canopy = [
            (cx + 0.5 * w * math.cos(a), cy + 0.1 * h - 0.55 * h * math.sin(a))
            for a in np.linspace(0, math.pi, 16)
        ]
        draw.polygon(canopy, fill=fill)
        draw.rectangle(
            (cx - w * 0.05, cy + h * 0.1, cx + w * 0.05, y1), fill=(60, 50, 40) if fill else 0
        )
    elif kind == "mushroom":
        cap = [
            (cx + 0.5 * w * math.cos(a), cy - 0.5 * h * math.sin(a))
            for a in np.linspace(0, math.pi, 16)
        ]
        draw.polygon(cap, fill=fill)
        draw.rectangle((cx - w * 0.15, cy, cx + w * 0.15, y1), fill=(235, 225, 200) if fill else 0)
    elif kind == "heart":
        r = w * 0.27
        draw.ellipse((cx - 2 * r, y0, cx, y0 + 2 * r), fill=fill)
        draw.ellipse((cx, y0, cx + 2 * r, y0 + 2 * r), fill=fill)
        draw.polygon(
            [(x0 + w * 0.02, y0 + r * 1.3), (x1 - w * 0.02, y0 + r * 1.3), (cx, y1)], fill=fill
        )
    else:
        raise ValueError(kind)


def _colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = (40, 150, 50) if name == "green" else COLOURS[name]
    return tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in base)


def _caption(objects: list[tuple[str, str]], background: str, rng: np.random.Generator) -> str:
    """A CC12M-style caption: mentions most of what is there, plus the usual noise."""

    def word(cls: str) -> str:
        names = SYNONYMS[cls]
        return names[0] if rng.random() < 0.8 or len(names) == 1 else str(rng.choice(names[1:]))

    mentions = []
    for cls, colour in objects:
        if rng.random() < 0.92:
            adj = f"{colour} " if rng.random() < 0.6 and colour != "green" else ""
            mentions.append(f"{'an' if adj[:1] in 'aeiou' and adj else 'a'} {adj}{word(cls)}")
    if not mentions and objects:
        mentions.append(f"a {word(objects[0][0])}")
    subject = (
        " and ".join(mentions)
        if len(mentions) <= 2
        else ", ".join(mentions[:-1]) + " and " + mentions[-1]
    )
    if rng.random() < 0.12:
        subject = f"<PERSON> with {subject}"
    place = ""
    if rng.random() < 0.8:
        place = f" {PLACE[background]} {word(background)}"
    caption = str(rng.choice(PREFIXES)) + subject + place + str(rng.choice(SUFFIXES))
    return caption[0].upper() + caption[1:] if rng.random() < 0.5 else caption


def render(seed: int, split: str, index: int, size: int) -> Sample:
    """Draw one image of the world, its mask and its caption, from its own seed.

    ``ref`` stands in for another dataset (CLIPSeg's PhraseCut): it shows the seen classes only,
    in another style: flat backgrounds with a gradient instead of textures, outlined objects
    that are somewhat smaller, a posterised palette, no blur."""
    rng = _rng(seed, split, index)
    ref = split == "ref"
    backgrounds = [b for b in BACKGROUNDS if b in SEEN] if ref else list(BACKGROUNDS)
    objects = [o for o in OBJECTS if o in SEEN] if ref else list(OBJECTS)
    background = str(rng.choice(backgrounds))
    pixels = _background(background, size, rng)
    if ref:
        shade = np.linspace(0.88, 1.12, size, dtype=np.float32)[:, None, None]
        pixels = pixels.reshape(-1, 3).mean(0) * shade * np.ones_like(pixels)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    mask = np.full((size, size), CLASSES.index(background), np.uint8)
    outline = np.zeros((size, size), bool)
    n_objects = int(rng.choice([1, 1, 2, 2, 3]))
    kinds = list(rng.choice(objects, size=n_objects, replace=False))
    placed = []
    for kind in kinds:
        side = rng.uniform(0.32, 0.48) * size if ref else rng.uniform(0.42, 0.62) * size
        aspect = {"car": 0.6, "fish": 0.6, "kite": 1.3, "tree": 1.3, "boat": 0.9}.get(kind, 1.0)
        w, h = side / math.sqrt(aspect), side * math.sqrt(aspect)
        box = _place(w, h, size, [b for _, _, b in placed], rng)
        if box is None:
            continue
        colour = str(rng.choice(OBJECT_COLOURS[kind]))
        _shape(ImageDraw.Draw(image), kind, box, _colour(colour, rng), rng)
        # The mask layer draws every part (roof, trunk, wheels too) as object pixels.
        layer_full = Image.new("L", (size, size), 0)
        _shape(_FullDraw(layer_full), kind, box, 255, rng)
        obj = np.asarray(layer_full) > 127
        edge = np.asarray(layer_full.filter(ImageFilter.MaxFilter(3))) > 127
        edge &= ~np.asarray(layer_full.filter(ImageFilter.MinFilter(3))).astype(bool)
        mask[obj] = CLASSES.index(kind)
        mask[edge & ~obj] = IGNORE
        mask[edge & obj] = IGNORE
        outline |= edge
        placed.append((kind, colour, box))
    if ref:
        arr = np.asarray(image).copy()
        arr[outline] = (25, 25, 25)
        image = ImageOps.posterize(Image.fromarray(arr), 3)
    else:
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    present = [c for i, c in enumerate(CLASSES) if (mask == i).any()]
    # Caption only what is still visible after overlaps (at least 2% of the image).
    visible = [(k, c) for k, c, _ in placed if (mask == CLASSES.index(k)).mean() >= 0.02]
    return Sample(image, mask, _caption(visible, background, rng), present)


def _place(w: float, h: float, size: int, boxes: list, rng) -> tuple | None:
    """A box of w x h inside the image that overlaps earlier boxes by at most 15% of its area."""
    for _ in range(30):
        x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        box = (x0, y0, x0 + w, y0 + h)
        overlap = sum(
            max(0, min(box[2], b[2]) - max(box[0], b[0]))
            * max(0, min(box[3], b[3]) - max(box[1], b[1]))
            for b in boxes
        )
        if overlap <= 0.15 * w * h:
            return box
    return None


class _FullDraw(ImageDraw.ImageDraw):
    """An ImageDraw whose fills ignore colour: every part of a shape is drawn as 255."""

    def polygon(self, xy, fill=None, outline=None, width=1):
        super().polygon(xy, fill=255 if fill is not None else None)

    def rectangle(self, xy, fill=None, outline=None, width=1):
        super().rectangle(xy, fill=255 if fill is not None else None)

    def ellipse(self, xy, fill=None, outline=None, width=1):
        super().ellipse(xy, fill=255 if fill is not None else None)


# --------------------------------------------------------------------------- writing


def _palette() -> list[int]:
    """VOC's colour map, so masks look like VOC's in an image viewer."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def url_for(base_url: str, index: int, kind: str) -> str:
    if kind == "ok" or kind == "broken":
        return f"{base_url}/train/{index:06d}.jpg"
    if kind == "missing":
        return f"{base_url}/missing/{index:06d}.jpg"
    return f"http://127.0.0.1:9/train/{index:06d}.jpg"  # nothing listens on port 9: refused


def _url_kinds(cfg: WorldConfig) -> list[str]:
    rng = np.random.default_rng([cfg.seed, 99])
    kinds = []
    for _ in range(cfg.count):
        r = rng.random()
        if r < cfg.dead_fraction * 0.7:
            kinds.append("missing")
        elif r < cfg.dead_fraction:
            kinds.append("refused")
        elif r < cfg.dead_fraction + cfg.broken_fraction:
            kinds.append("broken")
        else:
            kinds.append("ok")
    return kinds


def write_url_list(world: Path, port: int) -> Path:
    """(Re)write ``cc12m.tsv`` so its URLs point at ``port`` on 127.0.0.1."""
    meta = load_world(world)
    captions = json.loads((world / "captions.json").read_text())
    kinds = meta["url_kinds"]
    base = f"http://127.0.0.1:{port}"
    path = world / "cc12m.tsv"
    with atomic_path(path) as tmp:
        tmp.write_text(
            "".join(f"{url_for(base, i, k)}\t{captions[i]}\n" for i, k in enumerate(kinds))
        )
    meta["port"] = port
    write_json(world / "world.json", meta)
    return path


def load_world(world: Path) -> dict:
    path = Path(world) / "world.json"
    if not path.exists():
        raise UserError(
            f"{world} is not a synthetic world (no world.json); run `synseg-data world` first"
        )
    return json.loads(path.read_text())


def run_world(cfg: WorldConfig) -> WorldStats:
    """Generate the world into ``cfg.output``; reuse it if it was made with the same settings."""
    out = Path(cfg.output)
    if (out / "world.json").exists():
        meta = load_world(out)
        if meta["identity"] == cfg.identity():
            if meta.get("port") != cfg.port:
                write_url_list(out, cfg.port)
            return _stats(out, meta, reused=True)
        if not cfg.replace:
            version = meta["identity"].get("version")
            made_by = (
                ""
                if version == WORLD_VERSION
                else f" (world version {version}, this is {WORLD_VERSION})"
            )
            raise UserError(
                f"{out} holds a world made with other settings{made_by}; "
                "choose another --output or delete it"
            )
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds other files; choose an empty or new folder")

    # Build in a sibling folder and rename at the end: an interrupted run leaves no half world.
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "http" / "train").mkdir(parents=True)
    voc = tmp / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    kinds = _url_kinds(cfg)
    captions = []
    for i in range(cfg.count):
        sample = render(cfg.seed, "train", i, cfg.size)
        captions.append(sample.caption)
        target = tmp / "http" / "train" / f"{i:06d}.jpg"
        if kinds[i] == "broken":
            target.write_bytes(b"\xff\xd8\xff\xe0 this is not a complete JPEG file")
        elif kinds[i] == "ok":
            sample.image.save(target, quality=90)
    palette = _palette()
    for split, n in (("val", cfg.val_count), ("ref", cfg.ref_count)):
        ids, lines = [], []
        for i in range(n):
            sample = render(cfg.seed, split, i, cfg.size)
            name = f"{split}_{i:06d}"
            sample.image.save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
            m = Image.fromarray(sample.mask, mode="P")
            m.putpalette(palette)
            m.save(voc / "SegmentationClass" / f"{name}.png")
            ids.append(name)
            lines.append(f"{name}\t{sample.caption}")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "".join(f"{x}\n" for x in ids)
        )
        (voc / f"{split}_captions.tsv").write_text("".join(f"{x}\n" for x in lines))
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (tmp / "captions.json").write_text(json.dumps(captions))
    meta = {
        "identity": cfg.identity(),
        "url_kinds": kinds,
        "port": None,
        "classes": list(CLASSES),
        "unseen": list(UNSEEN),  # never in ``ref``: what the zero-shot report calls unseen
    }
    write_json(tmp / "world.json", meta)
    write_url_list(tmp, cfg.port)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return _stats(out, load_world(out), reused=False)


def _stats(out: Path, meta: dict, reused: bool) -> WorldStats:
    ident, kinds = meta["identity"], meta["url_kinds"]
    return WorldStats(
        output=str(out),
        train=ident["count"],
        val=ident["val_count"],
        ref=ident["ref_count"],
        dead_urls=sum(k in ("missing", "refused") for k in kinds),
        broken_files=sum(k == "broken" for k in kinds),
        reused=reused,
    )
