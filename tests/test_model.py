import copy

import pytest
import torch

from pipeline.errors import UserError
from trainer.backbone import FrozenCLIP
from trainer.losses import LossConfig, MCCLoss
from trainer.model import ModelConfig, SynSeg

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
