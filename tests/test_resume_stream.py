"""Resuming the training stream from a saved position: the same batches as an uninterrupted
stream, without reading the epoch up to that point again."""

import json
import shutil

import pytest
import torch
from test_train import losses, tiny, weights

import trainer.train.data as data
from trainer.train.data import ShardStream, find_shards, read_shard
from trainer.train.loop import run_train


def stream(shards, buffer=10):
    return ShardStream(find_shards(shards), 48, 4, 2, seed=5, shuffle_buffer=buffer)


def same(a, b):
    return torch.equal(a["images"], b["images"]) and a["labels"] == b["labels"]


@pytest.fixture
def counted(monkeypatch):
    """How many samples the stream reads from tar files."""
    seen = [0]

    def counting(path, first=0, bad=None):
        for item in read_shard(path, first, bad):
            seen[0] += 1
            yield item

    monkeypatch.setattr(data, "read_shard", counting)
    return seen


def test_read_shard_passes_over_earlier_samples_by_their_headers(shards):
    url = find_shards(shards).urls[0]
    every = list(read_shard(url))
    assert [i for i, _ in every] == list(range(len(every))) and len(every) > 5
    assert all(set(s) == {"jpg", "json"} for _, s in every)
    later = list(read_shard(url, 5))
    assert [i for i, _ in later] == list(range(5, len(every)))
    assert all(a == b for (_, a), (_, b) in zip(later, every[5:], strict=True))


@pytest.mark.parametrize("buffer", [1, 10, 1000])
def test_a_resumed_stream_gives_the_same_batches(shards, counted, buffer):
    """Cut points in the first pass, in the buffer's final drain (buffer 1000 > the data) and
    in later cycles over the shards; each resumed stream continues exactly."""
    it = iter(stream(shards, buffer))
    straight = [next(it) for _ in range(100)]  # 400 samples: more than two passes over 160
    for cut in (1, 7, 25, 38, 41, 77):
        counted[0] = 0
        resumed = stream(shards, buffer)
        resumed.set_epoch(0, {"offset": 0, "workers": {"0": straight[cut - 1]["state"]}})
        again = iter(resumed)
        first = next(again)
        read = counted[0]
        assert same(first, straight[cut])
        assert all(same(next(again), straight[cut + 1 + j]) for j in range(12))
        # The resume read the buffered samples and one batch's worth past them, not the
        # cut * 4 samples before: bounded by the buffer, not by how far the stream had got.
        if buffer < 160:
            assert read <= buffer + 4 + 25, (cut, read)


def test_a_resume_refuses_other_shards(shards, tmp_path):
    it = iter(stream(shards))
    state = dict([next(it) for _ in range(3)][-1]["state"])
    state["shards"] = "0" * 16
    resumed = stream(shards)
    resumed.set_epoch(0, {"offset": 0, "workers": {"0": state}})
    with pytest.raises(data.UserError, match="shards differ from those the checkpoint"):
        next(iter(resumed))


def test_resume_with_two_loader_workers_is_exact(shards, tmp_path):
    """Two DataLoader worker processes, a checkpoint after an odd number of batches (so the
    next batch comes from the second worker): a resumed run equals an uninterrupted one, from
    the saved positions and, for checkpoints without them, by replaying the epoch."""
    extra = ("data.workers=2", "data.shuffle_buffer=8", "run.save_every=3", "model.dropout=0.2")
    run_train(tiny(shards, tmp_path / "straight", "optim.max_steps=8", *extra))
    run_train(tiny(shards, tmp_path / "split", "optim.max_steps=3", *extra))
    saved = json.loads((tmp_path / "split/checkpoints/step-0000003/stream.json").read_text())
    assert saved["batches"] == 3 and set(saved["ranks"][0]) == {"0", "1"}
    shutil.copytree(tmp_path / "split", tmp_path / "replay")
    shutil.copytree(tmp_path / "split", tmp_path / "fewer")
    (tmp_path / "replay/checkpoints/step-0000003/stream.json").unlink()
    for name in ("split", "replay"):
        resumed = run_train(tiny(shards, tmp_path / name, "optim.max_steps=8", *extra), resume=True)
        assert resumed.start_step == 3 and resumed.steps == 8
        assert resumed.replayed == (3 if name == "replay" else 0)
        assert [r["loss"] for r in losses(tmp_path / name)] == [
            r["loss"] for r in losses(tmp_path / "straight")
        ], name
        for k, v in weights(tmp_path / "straight", 8).items():
            assert torch.equal(weights(tmp_path / name, 8)[k], v), (name, k)
    # another worker count (another machine): resumed by replaying the epoch, and said so
    other = [e for e in extra if not e.startswith("data.workers")]
    fewer = run_train(
        tiny(shards, tmp_path / "fewer", "optim.max_steps=8", "data.workers=0", *other),
        resume=True,
    )
    assert fewer.start_step == 3 and fewer.steps == 8 and fewer.replayed == 3
