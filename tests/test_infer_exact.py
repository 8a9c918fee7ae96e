"""Sliding-window inference against a direct re-implementation, with inputs that tell the
possible mistakes apart: a non-square image, a stride that is not half the window, a background
threshold that is not the default, and logits that depend on the position inside each window
(so averaging overlapping windows, taking their maximum or keeping the last one all differ).

The reference follows MMSegmentation's ``slide_inference`` (window grid, last window shifted
back inside the image, logits summed and divided by the count of windows over each pixel), then
a bilinear resize to the label's size, each class its best name, sigmoid, argmax, and
background wherever no class reaches the threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.eval.infer import InferConfig, Segmenter

D = 8  # text width of the fake model


class _Backbone:
    patch_size = 4

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        # A fixed, distinct embedding per prompt (a hash of its text), float64.
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(t)))
            out.append(torch.randn(D, generator=g, dtype=torch.float64))
        return torch.stack(out)


class FakeModel(torch.nn.Module):
    """Per-pixel logits: a linear function of the pixel's colour and of its place in the
    window, with coefficients taken from the prompt's embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.backbone = _Backbone()

    @staticmethod
    def window_logits(crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        crops = crops.double()
        n, _, h, w = crops.shape
        yy = torch.arange(h, dtype=torch.float64).view(1, 1, h, 1) / h
        xx = torch.arange(w, dtype=torch.float64).view(1, 1, 1, w) / w
        colour = torch.einsum("nchw,kc->nkhw", crops - 0.5, text[:, :3])  # (n, K, h, w)
        place = text[:, 3].view(1, -1, 1, 1) * yy - text[:, 4].view(1, -1, 1, 1) * xx
        return 3 * colour + 2 * place + text[:, 5].view(1, -1, 1, 1) * 0.3 - 1.0

    def segment(self, crops: torch.Tensor, text: torch.Tensor, chunk: int) -> torch.Tensor:
        return self.window_logits(crops, text)


def reference(
    img: Image.Image,
    classes: list[list[str]],
    templates: list[str],
    short: int,
    win: int,
    stride: int,
    thr: float,
    background: bool,
    out_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    bb = _Backbone()
    w, h = img.size
    s = short / min(w, h)
    img = img.resize((max(win, round(w * s)), max(win, round(h * s))), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float64) / 255).permute(2, 0, 1)
    H, W = x.shape[-2:]
    named = classes[1:] if background else classes
    names = [n for ns in named for n in ns]
    text = torch.stack([bb.encode_text([t.format(n) for t in templates]).mean(0) for n in names])
    acc = torch.zeros(len(names), H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    h_grids = max(H - win + stride - 1, 0) // stride + 1
    w_grids = max(W - win + stride - 1, 0) // stride + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + win, H), min(x1 + win, W)
            y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
            acc[:, y1:y2, x1:x2] += FakeModel.window_logits(x[None, :, y1:y2, x1:x2], text)[0]
            count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    logits = F.interpolate(
        (acc / count)[None], size=out_size, mode="bilinear", align_corners=False
    )[0]
    per_class, k = [], 0
    for ns in named:
        per_class.append(logits[k : k + len(ns)].max(0).values)
        k += len(ns)
    act = torch.sigmoid(torch.stack(per_class)).numpy()
    pred = act.argmax(0)
    if background:
        pred = np.where(act.max(0) < thr, 0, pred + 1)
    return pred, act


def _image(h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.NEAREST)  # blocks, not noise


@pytest.mark.parametrize(
    "short, win, stride, thr, background",
    [
        (40, 24, 10, 0.37, True),  # background by a non-default threshold, odd stride
        (36, 20, 20, 0.5, False),  # windows that touch without overlapping
        (30, 30, 7, 0.5, False),  # a short side equal to the window: one row of windows
    ],
)
def test_sliding_window_equals_a_direct_implementation(short, win, stride, thr, background):
    img = _image(53, 91)  # non-square, neither side a multiple of anything used
    classes = [["background"], ["cat", "kitty"], ["dog"], ["grass", "lawn"], ["sky"]]
    if not background:
        classes = classes[1:]
    templates = ["a photo of a {}.", "a {} in a picture."]
    seg = Segmenter(
        FakeModel(),
        classes,
        templates,
        InferConfig(mode="slide", short_side=short, window=win, stride=stride, bg_threshold=thr),
        background=background,
    )
    out_size = (53, 91)
    pred, act = seg.predict(img, out_size)
    want_pred, want_act = reference(
        img, classes, templates, short, win, stride, thr, background, out_size
    )
    np.testing.assert_allclose(act.numpy(), want_act, rtol=0, atol=1e-5)
    # Labels agree wherever the decision is not a float32 tie.
    top2 = np.sort(want_act, axis=0)[-2:]
    clear = (top2[1] - top2[0] > 1e-4) & (np.abs(want_act.max(0) - thr) > 1e-4)
    assert clear.mean() > 0.95
    assert (pred[clear] == want_pred[clear]).all()
    if background:
        assert 0 < (want_pred == 0).mean() < 1, "the threshold must matter for this input"
    assert len(np.unique(want_pred)) >= 3, "a prediction that only one class wins tests little"
