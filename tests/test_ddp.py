"""Distributed training on the CPU: each rank reads its own shards, and gradients are averaged
over the ranks."""

from __future__ import annotations

import json
import tarfile

import torch
import torch.multiprocessing as mp

from trainer.train.data import ShardStream, find_shards


def _captions_in(urls: list[str]) -> list[str]:
    out = []
    for u in urls:
        with tarfile.open(u) as tar:
            out += [
                json.loads(tar.extractfile(m).read())["caption"]
                for m in tar
                if m.name.endswith(".json")
            ]
    return out


def test_each_rank_reads_its_own_shards(shards):
    sset = find_shards(shards)
    assert len(sset.urls) >= 4
    per_rank = []
    for rank in (0, 1):
        s = ShardStream(sset, 48, 1, 8, seed=3, shuffle_buffer=1, rank=rank, world=2)
        mine = s._my_shards(0, 0, 1)
        per_rank.append(set(mine))
        want = _captions_in(mine)
        got = [c for _, b in zip(range(len(want)), s, strict=False) for c in b["captions"]]
        assert sorted(got) == sorted(want), "one pass reads exactly this rank's shards"
    assert per_rank[0].isdisjoint(per_rank[1]), "no shard read by both ranks"
    assert per_rank[0] | per_rank[1] == set(sset.urls), "every shard read by a rank"
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_ddp_averages_gradients_over_ranks(tmp_path):
    from _ddp_worker import batch, one_step

    from trainer.methods.synseg.losses import LossConfig, MCCLoss
    from trainer.methods.synseg.model import ModelConfig, SynSeg

    mp.spawn(one_step, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # The same model on each rank's batch alone, in this process: DDP's gradient is the mean.
    torch.manual_seed(0)
    cfg = ModelConfig(arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=64, dropout=0.0)
    model = SynSeg(cfg).double()
    alone = []
    for rank in (0, 1):
        model.zero_grad()
        images, text = batch(rank, model.backbone.embed_dim)
        out = model(images, text)
        MCCLoss(LossConfig())(out.f, out.fbar, text, torch.ones(2, 2, dtype=torch.bool))[
            "total"
        ].backward()
        alone.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert got[0].keys() == alone[0].keys() and len(alone[0]) > 10
    differ = 0
    for name in alone[0]:
        want = (alone[0][name] + alone[1][name]) / 2
        torch.testing.assert_close(got[0][name], want, rtol=0, atol=1e-9)
        torch.testing.assert_close(got[1][name], got[0][name], rtol=0, atol=0)
        differ += not torch.allclose(alone[0][name], alone[1][name])
    assert differ > 10, "the two ranks' own gradients differ, so averaging is tested"
