"""Pictures a person can judge: a label overlay with a legend, and per-class activation maps.

Activation maps are the sigmoid of the decoder's logits: as in the SynSeg paper's Fig. 3, a
pixel may respond to several classes at once; the overlay shows the strongest class where it
reaches the threshold, and leaves the rest of the image as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from synseg.fsutil import atomic_path

# A qualitative palette (distinct hues), repeated past its length.
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
        [255, 250, 200],
        [128, 0, 0],
        [170, 255, 195],
        [128, 128, 0],
        [255, 215, 180],
        [0, 0, 128],
        [128, 128, 128],
    ],
    np.uint8,
)


def heat(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3): dark blue through red to yellow."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[20, 20, 80], [180, 30, 60], [250, 220, 60]], np.float32)
    low = stops[0] + (stops[1] - stops[0]) * np.clip(v * 2, 0, 1)
    high = stops[1] + (stops[2] - stops[1]) * np.clip(v * 2 - 1, 0, 1)
    return np.where(v < 0.5, low, high).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def overlay(image: Image.Image, act: np.ndarray, names: list[str], threshold: float) -> Image.Image:
    """The image with each pixel's strongest class (if >= threshold) tinted, and a legend."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    best = act.argmax(0)
    shown = act.max(0) >= threshold
    colours = PALETTE[best % len(PALETTE)].astype(np.float32)
    mixed = np.where(shown[..., None], 0.45 * rgb + 0.55 * colours, rgb).astype(np.uint8)
    h, w = best.shape
    font = _font(max(12, h // 30))
    row = max(16, h // 22)
    legend_w = max(120, w // 3)
    canvas = Image.new("RGB", (w + legend_w, max(h, row * (len(names) + 2))), "white")
    canvas.paste(Image.fromarray(mixed), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((w + 8, 4), f"threshold {threshold:g}", fill="black", font=font)
    for i, name in enumerate(names):
        y = row * (i + 1) + 4
        share = float((shown & (best == i)).mean())
        draw.rectangle(
            (w + 8, y, w + 8 + row - 4, y + row - 4),
            fill=tuple(int(c) for c in PALETTE[i % len(PALETTE)]),
        )
        draw.text((w + 12 + row, y), f"{name} {100 * share:.0f}%", fill="black", font=font)
    return canvas


def activation_map(image: Image.Image, act: np.ndarray, name: str, threshold: float) -> Image.Image:
    """One class's activation as a heat map over the image, the thresholded region outlined."""
    rgb = np.asarray(image.convert("RGB"), np.float32)
    mixed = (0.35 * rgb + 0.65 * heat(act)).astype(np.uint8)
    inside = act >= threshold
    edge = (
        inside ^ np.pad(inside, 1, mode="edge")[1:-1, 2:]
        | inside ^ np.pad(inside, 1, mode="edge")[2:, 1:-1]
    )
    mixed[edge] = 255
    canvas = Image.fromarray(mixed)
    draw = ImageDraw.Draw(canvas)
    text = f"{name} (>= {threshold:g}: {100 * inside.mean():.0f}%)"
    font = _font(max(12, act.shape[0] // 30))
    box = draw.textbbox((4, 4), text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill="black")
    draw.text((4, 4), text, fill="white", font=font)
    return canvas


def safe_name(text: str) -> str:
    """A file-name part for a class name: letters and digits of any script, ``.``, ``-``; runs
    of anything else become ``_``."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_.") or "class"


def picture_names(names: list[str]) -> list[str]:
    """A distinct file-name part per class, never ``overlay`` (the overlay's own): where two
    names give the same part ("a/b", "a b"), the later ones are numbered (``a_b-2``)."""
    taken, parts = {"overlay"}, []
    for name in names:
        base = part = safe_name(name)
        n = 1
        while part.casefold() in taken:  # case-insensitive file systems too
            n += 1
            part = f"{base}-{n}"
        taken.add(part.casefold())
        parts.append(part)
    return parts


def write_pictures(
    image: Image.Image, act: np.ndarray, names: list[str], threshold: float, out: Path, stem: str
) -> list[Path]:
    """``<stem>_overlay.png`` and one ``<stem>_<class>.png`` per class (``picture_names``),
    each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = [("overlay", overlay(image, act, names, threshold))]
    for i, (name, part) in enumerate(zip(names, picture_names(names), strict=True)):
        pictures.append((part, activation_map(image, act[i], name, threshold)))
    paths = []
    for part, picture in pictures:
        paths.append(out / f"{stem}_{part}.png")
        with atomic_path(paths[-1]) as tmp:
            picture.save(tmp, format="PNG")
    return paths
