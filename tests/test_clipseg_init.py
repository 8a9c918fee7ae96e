import torch

from pipeline.world import UNSEEN
from trainer.methods.synseg.model import ModelConfig, SynSeg
from trainer.model.decoder import load_decoder_state
from trainer.world.clipseg_init import ClipSegInitConfig, load_split, run_clipseg_init

TINY = dict(
    arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=64, dropout=0.0, normalise="clip"
)


def test_ref_split_is_read_with_masks(world):
    images, labels, classes = load_split(world, "ref", 32)
    assert images.shape == (12, 3, 32, 32) and labels.shape == (12, 32, 32)
    assert classes[0] == "grass" and len(classes) == 20
    seen = {i for i, c in enumerate(classes) if c not in UNSEEN}
    assert set(labels.unique().tolist()) <= seen | {255}  # ref never shows an unseen class


def test_clipseg_style_stage_learns_and_saves_clipseg_layout(world, tmp_path):
    cfg = ClipSegInitConfig(
        world=str(world),
        output=str(tmp_path / "dec.pth"),
        model=TINY,
        steps=25,
        batch_size=4,
        image_size=64,
        lr=3e-3,
    )
    stats = run_clipseg_init(cfg)
    assert stats.loss_last < stats.loss_first and stats.images == 12
    weights = torch.load(tmp_path / "dec.pth", weights_only=True)
    assert (
        "film_mul.weight" in weights
        and "reduces.0.weight" in weights
        and "trans_conv.weight" in weights
    )
    fresh = SynSeg(ModelConfig(**TINY))
    assert load_decoder_state(fresh.decoder, weights) == "clipseg"  # loads like CLIPSeg's release
    assert run_clipseg_init(cfg).reused

    # What was saved is the trained decoder: on the whole ref split, every class a prompt, its
    # masks fit the ground truth better than the decoder it started from (computed here, from
    # the file, not from the stage's own log).
    def split_bce(model) -> float:
        images, labels, classes = load_split(world, "ref", 64)
        text = model.backbone.encode_text([cfg.template.format(c) for c in classes])
        with torch.no_grad():
            logits = model.eval().forward_train(images, text[None].expand(len(images), -1, -1))
        target = (labels[:, None] == torch.arange(len(classes))[None, :, None, None]).double()
        valid = (labels != 255)[:, None].expand_as(target).double()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.logits.double(), target, reduction="none"
        )
        return float((bce * valid).sum() / valid.sum())

    torch.manual_seed(cfg.seed)
    start = SynSeg(ModelConfig(**TINY))  # the stage's starting point (same seed)
    changed = [k for k, v in start.decoder.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(changed) == len(weights) - sum("num_batches" in k for k in weights)
    before = split_bce(start)
    load_decoder_state(start.decoder, weights)
    after = split_bce(start)
    assert after < 0.8 * before, (before, after)
