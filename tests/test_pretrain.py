import torch

from pipeline.world import CLASSES
from trainer.model.backbone import FrozenCLIP
from trainer.world.pretrain import PretrainConfig, run_pretrain


def test_pretraining_writes_an_open_clip_checkpoint_the_trainer_loads(shards, tmp_path):
    cfg = PretrainConfig(
        shards=str(shards), output=str(tmp_path / "clip.pt"), steps=6, batch_size=8, lr=1e-3
    )
    stats = run_pretrain(cfg, list(CLASSES))
    assert stats.steps == 6 and not stats.reused
    assert torch.isfinite(torch.tensor([stats.loss_first, stats.loss_last])).all()
    assert (
        -1 <= stats.prompt_cosine_after <= 1
        and stats.prompt_cosine_after != stats.prompt_cosine_before
    )
    backbone = FrozenCLIP("synseg-tiny", str(tmp_path / "clip.pt"), (1, 2, 3))
    saved = torch.load(tmp_path / "clip.pt", weights_only=True)
    assert torch.equal(backbone.model.state_dict()["text_projection"], saved["text_projection"])
    again = run_pretrain(cfg, list(CLASSES))
    assert again.reused and again.prompt_cosine_after == stats.prompt_cosine_after
