"""The training-free methods against direct implementations of their published attention rules,
on the tiny open_clip model in float64 (agreement to 1e-10 means the same computation).

The reference runs the image tower itself (patch embedding, CLS, position embedding, ln_pre, the
first L-1 blocks), then rewrites block L head by head in the papers' (tokens, batch, width)
layout from the nn.MultiheadAttention weights, then ln_post and the projection. NACLIP's
Gaussian is built the way its authors build it (a convolution of one-hot maps with a Gaussian
window), not with the closed form the toolkit uses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.methods.training_free import TRAINING_FREE, DenseCLIP, neighbourhood
from trainer.model.backbone import FrozenCLIP


@pytest.fixture(scope="module")
def backbone():
    b = FrozenCLIP("synseg-tiny", None, (1,), init_seed=7)
    return b.double()


def naclip_addition(h: int, w: int, std: float) -> torch.Tensor:
    """NACLIP's own construction: each patch's one-hot map convolved with a (2h-1, 2w-1)
    Gaussian window, zero row and column for the CLS token."""
    c = 1 / (std * math.sqrt(2))
    ks = [torch.linspace(-(n - 1) * c, (n - 1) * c, 2 * n - 1, dtype=torch.float64) for n in (h, w)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    onehots = torch.einsum("ij,kl->ijkl", torch.eye(h), torch.eye(w)).permute(0, 3, 1, 2)
    onehots = onehots.reshape(-1, 1, h, w).double()
    out = F.conv2d(onehots, window[None, None], padding="same").reshape(h * w, h * w)
    full = torch.zeros(h * w + 1, h * w + 1, dtype=torch.float64)
    full[1:, 1:] = out
    return full


def reference_tokens(backbone, images: torch.Tensor, method: str) -> torch.Tensor:
    v = backbone.model.visual
    x = (images - backbone_mean()) / backbone_std()
    x = v.conv1(x)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    x = v.ln_pre(x + v.positional_embedding)  # native size: no resizing
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    block = v.transformer.resblocks[-1]
    x = x.transpose(0, 1)  # (N, B, W), as the papers' code holds it
    N, B, W = x.shape
    attn = block.attn
    heads, hd = attn.num_heads, W // attn.num_heads
    Wq, Wk, Wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    y = block.ln_1(x)
    out = torch.zeros_like(x)
    for b in range(B):
        heads_out = []
        for hh in range(heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            q = y[:, b] @ Wq[sl].T + bq[sl]
            k = y[:, b] @ Wk[sl].T + bk[sl]
            val = y[:, b] @ Wv[sl].T + bv[sl]
            if method == "maskclip":
                a = torch.eye(N, dtype=x.dtype)
            elif method == "sclip":
                a = torch.softmax(q @ q.T / math.sqrt(hd), -1) + torch.softmax(
                    k @ k.T / math.sqrt(hd), -1
                )
            elif method == "clearclip":
                a = torch.softmax(q @ q.T / math.sqrt(hd), -1)
            else:
                a = torch.softmax(k @ k.T / math.sqrt(hd) + naclip_addition(h, w, 5.0), -1)
            heads_out.append(a @ val)
        out[:, b] = attn.out_proj(torch.cat(heads_out, -1))
    if method in ("maskclip", "sclip"):
        x = x + out
        x = x + block.mlp(block.ln_2(x))
    else:
        x = out
    x = v.ln_post(x.transpose(0, 1)) @ v.proj
    return F.normalize(x[:, 1:], dim=-1)


def backbone_mean():
    return torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)


def backbone_std():
    return torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.mark.parametrize("method", TRAINING_FREE)
def test_method_equals_its_published_rule(backbone, method):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64)
    dense = DenseCLIP(backbone, method).double()
    got, grid = dense.patch_tokens(images)
    assert grid == (8, 8)
    want = reference_tokens(backbone, images, method)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # and the rule matters: the unmodified last block gives other tokens
    plain = backbone.model.visual
    with torch.no_grad():
        x, _ = backbone.before_last_block((images - dense.mean) / dense.std)
        x = plain.ln_post(plain.transformer.resblocks[-1](x)) @ plain.proj
    assert (F.normalize(x[:, 1:], dim=-1) - got).abs().max() > 1e-3


def test_naclip_neighbourhood_equals_its_authors_construction():
    for h, w in ((8, 8), (5, 7), (1, 4)):
        torch.testing.assert_close(
            neighbourhood((h, w), 5.0, torch.float64, "cpu"),
            naclip_addition(h, w, 5.0),
            rtol=0,
            atol=1e-12,
        )


def test_scores_are_cosines_on_any_window_shape(backbone):
    dense = DenseCLIP(backbone, "naclip").double()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 48, 40, generator=g, dtype=torch.float64)  # a 6 x 5 patch grid
    text = dense.encode_classes(["grass", "sky", "a car"], ["a photo of a {}.", "{}"])
    assert torch.allclose(text.norm(dim=-1), torch.ones(3))
    scores = dense.scores(images, text)
    assert scores.shape == (1, 3, 48, 40)
    tokens, grid = dense.patch_tokens(images)
    assert grid == (6, 5)
    cos = (tokens @ text.double().T).transpose(1, 2).reshape(1, 3, 6, 5)
    torch.testing.assert_close(
        scores, F.interpolate(cos, size=(48, 40), mode="bilinear", align_corners=False)
    )
    assert scores.abs().max() <= 1 + 1e-9


def test_class_embeddings_normalise_each_template_before_the_mean(backbone):
    """SCLIP's text side: each template's embedding L2-normalised, averaged, normalised."""
    dense = DenseCLIP(backbone, "sclip").double()
    names, templates = ["grass", "a red car"], ["a photo of a {}.", "{}", "art of the {}."]
    got = dense.encode_classes(names, templates)
    want, plain = [], []
    for n in names:
        e = backbone.encode_text([t.format(n) for t in templates]).double()
        norms = e.norm(dim=-1, keepdim=True)
        mean = (e / norms).mean(0)
        want.append(mean / mean.norm())
        raw = e.mean(0)  # without the per-template normalisation
        plain.append(raw / raw.norm())
    # the text tower answers in float32: the comparison is of the normalisations alone
    torch.testing.assert_close(got.double(), torch.stack(want), rtol=0, atol=1e-6)
    assert (torch.stack(plain) - got).abs().max() > 1e-4, "the order of the two must matter here"


@pytest.mark.parametrize("method, scale", [("sclip", 40.0), ("clearclip", 50.0)])
def test_probabilities_are_a_softmax_over_the_given_axis(backbone, method, scale):
    dense = DenseCLIP(backbone, method).double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) * 2 - 1
    for dim in (0, 1):
        e = torch.exp(scale * x - (scale * x).amax(dim, keepdim=True))
        torch.testing.assert_close(
            dense.probabilities(x, dim), e / e.sum(dim, keepdim=True), rtol=0, atol=1e-12
        )


def test_score_averaging_takes_the_softmax_over_classes_after_the_windows(backbone):
    """The sclip protocol's rule: every window's cosine scores (resized to the window) averaged
    where windows overlap, resized to the label's size, then a softmax over the names at each
    pixel; a direct float64 re-implementation of SCLIP's forward_slide, on a non-square image
    with windows that overlap unevenly."""
    import copy

    import numpy as np
    from PIL import Image

    from trainer.eval.infer import InferConfig, Segmenter

    single = FrozenCLIP("synseg-tiny", None, (1,), init_seed=7)  # the float32 the harness runs
    dense = DenseCLIP(single, "sclip")
    exact = DenseCLIP(copy.deepcopy(single).double(), "sclip").double()
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 255, (56, 88, 3), dtype=np.uint8))
    cfg = InferConfig(
        mode="slide", short_side=56, long_side=0, window=32, stride=24, average="score"
    )
    names = [["grass"], ["sky"], ["a car"]]
    seg = Segmenter(dense, names, ["a photo of a {}."], cfg)
    got = seg.name_probs(img, (50, 70))
    x = torch.from_numpy(np.asarray(img).astype(np.float64) / 255).permute(2, 0, 1)[None]
    text = exact.encode_classes([n[0] for n in names], ["a photo of a {}."]).double()
    H, W, win, stride = 56, 88, 32, 24
    preds = torch.zeros(1, 3, H, W, dtype=torch.float64)
    count = torch.zeros(1, 1, H, W, dtype=torch.float64)
    for hi in range(max(H - win + stride - 1, 0) // stride + 1):
        for wi in range(max(W - win + stride - 1, 0) // stride + 1):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + win, H), min(x1 + win, W)
            y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
            preds += F.pad(exact.scores(x[:, :, y1:y2, x1:x2], text), (x1, W - x2, y1, H - y2))
            count[:, :, y1:y2, x1:x2] += 1
    logits = F.interpolate(preds / count, size=(50, 70), mode="bilinear", align_corners=False)
    want = torch.softmax(40.0 * logits[0], dim=0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert torch.allclose(got.sum(0), torch.ones(50, 70, dtype=got.dtype), atol=1e-5)


def peer_interpolate_pos_encoding(pos: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """SCLIP's, NACLIP's and ClearCLIP's ``interpolate_pos_encoding`` for an image of h x w
    pixels (their ``w, h`` arguments are the image's last two sizes, in that order)."""
    n = pos.shape[0] - 1
    if (h // patch) * (w // patch) == n and h == w:
        return pos
    g = int(math.sqrt(n))
    h0, w0 = h // patch + 0.1, w // patch + 0.1
    grid = F.interpolate(
        pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2),
        scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)),
        mode="bicubic",
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert grid.shape[-2:] == (int(h0), int(w0))
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])


@pytest.mark.parametrize("size", [(40, 56), (72, 24), (48, 48), (64, 64)])
def test_training_free_position_embeddings_are_resized_as_the_peers_do(backbone, size):
    """On every grid but the trained one the source coordinates of the scale-factor rule
    differ from a resize to the grid's size; the training-free methods take the peers'."""
    pos = backbone.model.visual.positional_embedding.double()
    h, w = size[0] // 8, size[1] // 8
    got = backbone._position_embedding(h, w, "scale")
    torch.testing.assert_close(
        got, peer_interpolate_pos_encoding(pos, *size, 8), rtol=0, atol=1e-12
    )
    if (h, w) != (8, 8):
        assert (backbone._position_embedding(h, w, "size") - got).abs().max() > 1e-6
    # and DenseCLIP reads the tower with it
    dense = DenseCLIP(backbone, "clearclip").double()
    images = torch.rand(
        1, 3, *size, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    x = (images - dense.mean) / dense.std
    stream, _ = backbone.before_last_block(x, resize="scale")
    visual = backbone.model.visual
    from trainer.methods.training_free import last_block

    want = F.normalize(
        backbone.project(last_block(visual.transformer.resblocks[-1], stream, "clearclip", (h, w)))[
            :, 1:
        ],
        dim=-1,
    )
    torch.testing.assert_close(dense.patch_tokens(images)[0], want, rtol=0, atol=1e-12)


def clearclip_padsize(h: int, w: int, patch: int) -> tuple[int, int, int, int]:
    """ClearCLIP's ``compute_padsize``: (left, right, top, bottom)."""
    left, right, top, bottom = 0, 0, 0, 0
    if w % patch:
        lr = patch - (w % patch)
        left, right = lr // 2, lr - lr // 2
    if h % patch:
        tb = patch - (h % patch)
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


def _direct_scores(exact, x01: torch.Tensor, text: torch.Tensor, pad, method: str):
    """A peer's forward_feature on one (padded) normalised crop, logits cut back to it."""
    from trainer.methods.training_free import last_block

    x = (x01 - exact.mean) / exact.std
    if any(pad):
        x = F.pad(x, pad)
    stream, grid = exact.backbone.before_last_block(x, resize="scale")
    blocks = exact.backbone.model.visual.transformer.resblocks
    tokens = F.normalize(
        exact.backbone.project(last_block(blocks[-1], stream, method, grid))[:, 1:], dim=-1
    )
    cos = (tokens @ text.T).transpose(1, 2).reshape(1, text.shape[0], *grid)
    cos = F.interpolate(cos, size=x.shape[-2:], mode="bilinear", align_corners=False)
    left, _, top, _ = pad
    return cos[:, :, top : top + x01.shape[-2], left : left + x01.shape[-1]]


@pytest.mark.parametrize("method, mode", [("clearclip", "slide"), ("naclip", "whole")])
def test_grids_that_are_not_patch_multiples_are_met_as_the_peers_meet_them(method, mode):
    """ClearCLIP zero-pads a window of 44 x 60 (patch 8) around its centre and cuts the logits
    back; NACLIP's whole-image path feeds 44 x 60 as it is (the convolution floors the grid
    to 5 x 7) and stretches the logits over the image."""
    import copy

    import numpy as np
    from PIL import Image

    from trainer.eval.infer import InferConfig, Segmenter

    single = FrozenCLIP("synseg-tiny", None, (1,), init_seed=7)
    dense = DenseCLIP(single, method)
    exact = DenseCLIP(copy.deepcopy(single).double(), method).double()
    img = Image.fromarray(np.random.default_rng(6).integers(0, 255, (44, 60, 3), dtype=np.uint8))
    cfg = InferConfig(mode=mode, short_side=44, long_side=0, window=64, stride=32, average="score")
    names = [["grass"], ["sky"], ["a car"]]
    got = Segmenter(dense, names, ["a photo of a {}."], cfg).name_probs(img, (44, 60))
    x = torch.from_numpy(np.asarray(img).astype(np.float64) / 255).permute(2, 0, 1)[None]
    text = exact.encode_classes([n[0] for n in names], ["a photo of a {}."]).double()
    pad = clearclip_padsize(44, 60, 8) if method == "clearclip" else (0, 0, 0, 0)
    assert (method == "clearclip") == any(pad)
    want = torch.softmax(exact.scale * _direct_scores(exact, x, text, pad, method)[0], dim=0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
