"""The ``tcl`` protocol against a direct re-implementation of MMSegmentation 0.27's test path
with TCL's background channel, on inputs that tell the possible mistakes apart: a non-square
image whose long side is capped, a stride that is not half the window, a background threshold
that is not the default, and logits that depend on the position inside each window (so
averaging overlapping windows, taking their maximum or keeping the last one all differ).

The reference: mmcv's keep-ratio ``Resize`` (scale factor min(long / long side, short / short
side), sizes rounded half up, OpenCV bilinear); ``slide_inference`` (window grid, last window
shifted back inside the image, each window's output summed and divided by the number of windows
over each pixel, then resized bilinearly to the original size); TCL's ``encode_decode`` (the
sigmoid masks of the window, refined by PAMR when asked, with a constant background channel
``bg_thresh`` put first); then ``inference``'s softmax and the argmax.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.eval.infer import InferConfig, Segmenter
from trainer.eval.pamr import TCL_DILATIONS
from trainer.methods.synseg.model import DecoderScorer

D = 8  # text width of the fake model
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


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
        self.register_buffer("mean", MEAN.float())
        self.register_buffer("std", STD.float())

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


def reference_pamr(x, mask, iters, dilations):
    """PAMR written as its authors' code computes it: 3x3 shift kernels, replicate padding."""
    mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=True)
    places = [(i, j) for i in range(3) for j in range(3)]
    neighbours = [p for p in places if p != (1, 1)]
    k_all = torch.zeros(9, 1, 3, 3, dtype=x.dtype)
    for n, (i, j) in enumerate(places):
        k_all[n, 0, i, j] = 1
    k_diff = torch.zeros(8, 1, 3, 3, dtype=x.dtype)
    k_copy = torch.zeros(8, 1, 3, 3, dtype=x.dtype)
    for n, (i, j) in enumerate(neighbours):
        k_diff[n, 0, 1, 1], k_diff[n, 0, i, j] = 1, -1
        k_copy[n, 0, i, j] = 1

    def stencil(t, kernel):
        B, K, H, W = t.shape
        t = t.reshape(B * K, 1, H, W)
        out = [F.conv2d(F.pad(t, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(out, 1).reshape(B, K, -1, H, W)

    std = stencil(x, k_all).std(2, keepdim=True)
    aff = (-stencil(x, k_diff).abs() / (1e-8 + 0.1 * std)).mean(1, keepdim=True)
    aff = torch.softmax(aff, 2)
    for _ in range(iters):
        mask = (stencil(mask, k_copy) * aff).sum(2)
    return mask


def reference(img, classes, templates, short, long, win, stride, thr, background, pamr_on):
    """Labels and class probabilities as MMSegmentation 0.27 + TCL's inference compute them."""
    bb = _Backbone()
    w, h = img.size
    factor = min(long / max(h, w), short / min(h, w))
    size = int(w * factor + 0.5), int(h * factor + 0.5)
    arr = cv2.resize(np.asarray(img), size, interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(arr.astype(np.float64) / 255).permute(2, 0, 1)[None]
    H, W = x.shape[-2:]
    named = classes[1:] if background else classes
    names = [ns[0] for ns in named]  # TCL: one raw name per class
    text = torch.stack([bb.encode_text([t.format(n) for t in templates]).mean(0) for n in names])
    channels = len(names) + (1 if background else 0)
    preds = torch.zeros(1, channels, H, W, dtype=torch.float64)
    count = torch.zeros(1, 1, H, W, dtype=torch.float64)
    h_grids = max(H - win + stride - 1, 0) // stride + 1
    w_grids = max(W - win + stride - 1, 0) // stride + 1
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + win, H), min(x1 + win, W)
            y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
            crop = x[:, :, y1:y2, x1:x2]
            masks = torch.sigmoid(FakeModel.window_logits(crop, text))  # encode_decode
            if pamr_on:
                masks = reference_pamr((crop - MEAN) / STD, masks, 10, TCL_DILATIONS)
            if background:
                masks = torch.cat([torch.full_like(masks[:, :1], thr), masks], 1)
            preds += F.pad(masks, (x1, W - x2, y1, H - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (count > 0).all()
    preds = F.interpolate(preds / count, size=(h, w), mode="bilinear", align_corners=False)
    pred = F.softmax(preds, dim=1).argmax(1)[0].numpy()
    probs = preds[0, 1:] if background else preds[0]
    return pred, probs.numpy()


def _image(h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.NEAREST)  # blocks, not noise


@pytest.mark.parametrize(
    "short, long, win, stride, thr, background, pamr_on",
    [
        (40, 2048, 24, 10, 0.37, True, False),  # background by a non-default threshold
        (40, 60, 20, 20, 0.5, False, False),  # long side capped; windows that only touch
        (30, 2048, 30, 7, 0.5, False, False),  # short side equal to the window: one row
        (36, 2048, 24, 12, 0.4, True, True),  # PAMR on every window, then the background
    ],
)
def test_tcl_protocol_equals_mmsegmentation_slide_inference(
    short, long, win, stride, thr, background, pamr_on
):
    img = _image(53, 91)  # non-square, neither side a multiple of anything used
    classes = [["background"], ["cat", "kitty"], ["dog"], ["grass", "lawn"], ["sky"]]
    if not background:
        classes = classes[1:]
    templates = ["a photo of a {}.", "a {} in a picture."]
    cfg = InferConfig(
        mode="slide",
        short_side=short,
        long_side=long,
        window=win,
        stride=stride,
        average="prob",
        synonyms=False,
        bg_threshold=thr,
        pamr="window" if pamr_on else "off",
        pamr_dilations=TCL_DILATIONS,
    )
    seg = Segmenter(DecoderScorer(FakeModel()), classes, templates, cfg, background=background)
    pred, act = seg.predict(img, (53, 91))
    want_pred, want_act = reference(
        img, classes, templates, short, long, win, stride, thr, background, pamr_on
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


def test_pamr_equals_its_kernel_formulation():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 23, 31, generator=g, dtype=torch.float64)
    scores = torch.rand(2, 4, 12, 16, generator=g, dtype=torch.float64)
    from trainer.eval.pamr import pamr

    for dilations in (TCL_DILATIONS, (8, 16)):
        got = pamr(image, scores, 10, dilations)
        want = reference_pamr(image, scores, 10, dilations)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(pamr(image, scores, 10, (1,)), pamr(image, scores, 10, (2,)))


def test_rescale_rounds_half_up_and_caps_the_long_side_as_mmcv_does():
    from trainer.eval.infer import rescale_size

    assert rescale_size(93, 44, 22, 2048) == (47, 22)  # 46.5 rounds up (Python's round: 46)
    assert rescale_size(500, 375, 448, 2048) == (597, 448)  # a typical VOC image
    assert rescale_size(375, 500, 336, 2048) == (336, 448)
    assert rescale_size(2048, 256, 448, 2048) == (2048, 256)  # the long side's cap wins
    assert rescale_size(2048, 1024, 560, 2048) == (1120, 560)  # Cityscapes, sclip protocol
