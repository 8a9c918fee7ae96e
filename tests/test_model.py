import copy
import math

import numpy as np
import pytest
import torch

from synseg.errors import UserError
from trainer.methods.synseg.losses import LossConfig, MCCLoss
from trainer.methods.synseg.model import ModelConfig, SynSeg
from trainer.model.backbone import FrozenCLIP

TINY = dict(arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=128)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return FrozenCLIP("synseg-tiny", None, (1, 2, 3))


def test_taps_equal_open_clips_own_intermediates(backbone):
    backbone = copy.deepcopy(backbone).double()  # float64: a tolerance that means something
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ours = backbone.visual_taps(x)
    ref = backbone.model.visual.forward_intermediates(
        x, indices=[1, 2, 3], output_fmt="NLC", output_extra_tokens=True, intermediates_only=True
    )
    for mine, patches, cls in zip(
        ours, ref["image_intermediates"], ref["image_intermediates_prefix"], strict=True
    ):
        torch.testing.assert_close(mine, torch.cat([cls, patches], dim=1), rtol=0, atol=1e-9)


def test_other_input_sizes_resize_position_embeddings(backbone):
    taps = backbone.visual_taps(torch.randn(1, 3, 128, 96))
    assert taps[0].shape == (1, 1 + 16 * 12, 64)
    # at the training size the embeddings are used as they are
    pos = backbone._position_embedding(8, 8)
    assert pos is backbone.model.visual.positional_embedding


def test_training_forward_and_gradients_reach_only_trainables(backbone):
    torch.manual_seed(0)
    model = SynSeg(ModelConfig(**TINY, projector_input="visual"), backbone)
    images = torch.rand(2, 3, 64, 64)
    text = torch.randn(2, 3, 64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = model.forward_train(images, text, absent_text=torch.randn(2, 2, 64))
    assert (
        out.logits.shape == (2, 3, 64, 64)
        and out.f.shape == (2, 3, 64)
        and out.absent_maps.shape == (2, 2, 64)
    )
    loss = MCCLoss(LossConfig(neg=1.0))(out.f, out.fbar, text, mask, out.absent_maps)["total"]
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert set(model.trainable_state_dict()) == {
        k for k in model.state_dict() if not k.startswith("backbone.")
    }


def test_segment_matches_the_training_path(backbone):
    torch.manual_seed(0)
    model = SynSeg(ModelConfig(**TINY), backbone).eval()
    images, classes = torch.rand(2, 3, 64, 64), torch.randn(5, 64)
    logits = model.segment(images, classes, chunk=3)  # chunks that split an image's classes
    assert logits.shape == (2, 5, 64, 64)
    with torch.no_grad():
        ref = model.forward_train(images, classes[None].expand(2, 5, 64)).logits
    torch.testing.assert_close(logits, ref)


def test_bad_configs():
    with pytest.raises(UserError, match="projector_input"):
        ModelConfig(projector_input="text")
    with pytest.raises(UserError, match="unknown architecture"):
        FrozenCLIP("ViT-Z-99", None, (1,))
    with pytest.raises(UserError, match="taps"):
        FrozenCLIP("synseg-tiny", None, (1, 7))
    with pytest.raises(UserError, match="cannot (load|download)"):
        FrozenCLIP("synseg-tiny", "openai", (1, 2))


def test_local_checkpoint_file(backbone, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = FrozenCLIP("synseg-tiny", str(path), (1, 2, 3))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.visual_taps(x)[-1], backbone.visual_taps(x)[-1])
    with pytest.raises(UserError, match="does not exist"):
        FrozenCLIP("synseg-tiny", str(tmp_path / "missing.pt"), (1, 2, 3))


def test_film_mlp_variant(backbone):
    model = SynSeg(ModelConfig(**TINY, film_hidden=32), backbone)
    assert isinstance(model.decoder.film_mul, torch.nn.Sequential)
    out = model.forward_train(torch.rand(1, 3, 64, 64), torch.randn(1, 2, 64))
    assert out.f.shape == (1, 2, 64)


@pytest.mark.gpu
def test_bf16_training_step_on_gpu(backbone):
    model = SynSeg(ModelConfig(**TINY)).cuda()
    images, text = torch.rand(2, 3, 64, 64, device="cuda"), torch.randn(2, 2, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, text)
    loss = MCCLoss(LossConfig())(
        out.f.float(), out.fbar.float(), text, torch.ones(2, 2, dtype=torch.bool, device="cuda")
    )
    loss["total"].backward()
    assert torch.isfinite(loss["total"]) and out.logits.dtype == torch.bfloat16


def test_random_backbone_is_rebuilt_identically_from_its_seed():
    # checkpoints hold only the trainable part: a random frozen backbone must come back the same
    torch.manual_seed(123)
    a = FrozenCLIP("synseg-tiny", None, (1, 2, 3), init_seed=0)
    torch.manual_seed(456)
    b = FrozenCLIP("synseg-tiny", None, (1, 2, 3), init_seed=0)
    c = FrozenCLIP("synseg-tiny", None, (1, 2, 3), init_seed=1)
    for (k, va), vb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(va, vb), k
    assert not all(
        torch.equal(x, y)
        for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values(), strict=True)
    )


def _cubic_1d(a: np.ndarray, out: int, axis: int) -> np.ndarray:
    """Bicubic resampling along one axis as torch does it (Keys' kernel with A = -0.75,
    align_corners=False, source positions unclamped, samples clamped at the border)."""
    A, n = -0.75, a.shape[axis]

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    rows = []
    for d in range(out):
        src = n / out * (d + 0.5) - 0.5
        i = math.floor(src)
        t = src - i
        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        idx = [min(max(i + k, 0), n - 1) for k in (-1, 0, 1, 2)]
        rows.append(sum(w * np.take(a, j, axis=axis) for w, j in zip(weights, idx, strict=True)))
    return np.stack(rows, axis=axis)


def test_position_embeddings_resize_like_a_direct_bicubic_on_a_non_square_grid(backbone):
    bb = copy.deepcopy(backbone).double()
    pos = bb.model.visual.positional_embedding  # (1 + 8*8, W)
    with torch.no_grad():
        pos.copy_(
            torch.randn(pos.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        )
    g, width = 8, pos.shape[1]
    grid = pos[1:].detach().numpy().reshape(g, g, width)  # (rows, cols, W)
    want = _cubic_1d(_cubic_1d(grid, 6, axis=0), 11, axis=1).reshape(6 * 11, width)
    got = bb._position_embedding(6, 11).detach()
    torch.testing.assert_close(got[0], pos[0].detach(), rtol=0, atol=0)  # CLS kept as it is
    np.testing.assert_allclose(got[1:].numpy(), want, rtol=0, atol=1e-12)

    # The taps of a 48 x 88 image (a 6 x 11 patch grid) use exactly that embedding, rows first.
    x = torch.rand(1, 3, 48, 88, dtype=torch.float64)
    v = bb.model.visual
    tokens = v.conv1(x).flatten(2).transpose(1, 2)  # (1, 66, W), row-major patches
    cls = v.class_embedding.view(1, 1, -1)
    z = torch.cat([cls, tokens], dim=1) + torch.cat([pos[:1], torch.from_numpy(want)], dim=0)
    z = v.ln_pre(z)
    for i, block in enumerate(v.transformer.resblocks[:4]):
        z = block(z)
        if i == 1:
            first_tap = z
    with torch.no_grad():
        torch.testing.assert_close(bb.visual_taps(x)[0], first_tap.detach(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("projector_input", ["visual", "conditioned"])
def test_synergy_vectors_equal_a_direct_computation(backbone, projector_input):
    """Non-square images, random (non-unit) maps: which tokens the projector reads, how maps
    are pooled to the patch grid and how they weigh the features, checked against loops."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, projector_input=projector_input, dropout=0.0)
    model = SynSeg(cfg, copy.deepcopy(backbone)).double().eval()
    B, N, h, w, p = 2, 3, 8, 6, 8
    images = torch.rand(B, 3, h * p, w * p, dtype=torch.float64)
    text = torch.randn(B, N, model.backbone.embed_dim, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_train(images, text)
        taps = model.backbone.visual_taps((images - model.mean) / model.std)
        deepest = model.decoder.reduces[0](taps[-1])  # (B, 1 + h*w, r), CLS first
        f_want = torch.zeros(B, N, text.shape[-1], dtype=torch.float64)
        fbar_want = torch.zeros_like(f_want)
        for b in range(B):
            for n in range(N):
                t = text[b, n]
                tokens = deepest[b]
                if projector_input == "conditioned":
                    tokens = model.decoder.film_mul(t) * tokens + model.decoder.film_add(t)
                grid = torch.zeros(tokens.shape[-1], h, w, dtype=torch.float64)
                for k in range(h * w):  # patch k is row k // w, column k % w
                    grid[:, k // w, k % w] = tokens[1 + k]
                feats = model.projector(grid[None])[0]  # (d, h, w)
                prob = torch.sigmoid(out.logits[b, n])  # (h*p, w*p)
                num, den, num_bg, den_bg = 0, 0, 0, 0
                for i in range(h):
                    for j in range(w):
                        m = prob[i * p : (i + 1) * p, j * p : (j + 1) * p].mean()
                        num, den = num + m * feats[:, i, j], den + m
                        num_bg, den_bg = num_bg + (1 - m) * feats[:, i, j], den_bg + (1 - m)
                f_want[b, n] = num / (den + 1e-6)
                fbar_want[b, n] = num_bg / (den_bg + 1e-6)
    torch.testing.assert_close(out.f, f_want, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.fbar, fbar_want, rtol=0, atol=1e-9)
