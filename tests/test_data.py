import io
import json
import shutil
import tarfile

import pytest
import torch

from synseg.errors import UserError
from trainer.model.backbone import FrozenCLIP
from trainer.train.data import ShardStream, find_shards
from trainer.train.textcache import LabelCache


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_batches_and_label_cap(shards):
    s = ShardStream(
        find_shards(shards), image_size=64, batch_size=6, max_labels=2, seed=1, shuffle_buffer=20
    )
    batches = take(s, 3)
    for b in batches:
        assert (
            b["images"].shape == (6, 3, 64, 64)
            and b["images"].min() >= 0
            and b["images"].max() <= 1
        )
        assert all(1 <= len(ls) <= 2 for ls in b["labels"])
    again = take(ShardStream(find_shards(shards), 64, 6, 2, seed=1, shuffle_buffer=20), 3)
    assert [b["labels"] for b in batches] == [
        b["labels"] for b in again
    ]  # a pure function of the seed
    other = take(ShardStream(find_shards(shards), 64, 6, 2, seed=2, shuffle_buffer=20), 3)
    assert [b["labels"] for b in other] != [b["labels"] for b in batches]


def test_ranks_read_disjoint_shards(shards):
    found = find_shards(shards)
    a = ShardStream(found, 64, 4, 8, seed=0, shuffle_buffer=1, rank=0, world=2)
    b = ShardStream(found, 64, 4, 8, seed=0, shuffle_buffer=1, rank=1, world=2)
    assert set(a._my_shards(0, 0, 1)).isdisjoint(b._my_shards(0, 0, 1))
    assert sorted(a._my_shards(0, 0, 1) + b._my_shards(0, 0, 1)) == sorted(found.urls)


def test_bad_samples_are_skipped_and_counted(shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    first = sorted(copy.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(first, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 0 and m.name.endswith(".jpg"):
                data = b"not a jpeg"
            if i == 3 and m.name.endswith(".json"):
                data = json.dumps({"labels": []}).encode()  # no label: unusable
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    sizes = json.loads((copy / "sizes.json").read_text())
    (copy / "sizes.json").write_text(json.dumps({first.name: sizes[first.name]}))
    n = sizes[first.name]
    s = ShardStream(find_shards(copy), 64, n - 2, 8, seed=0, shuffle_buffer=1)
    batch = take(s, 1)[0]
    assert batch["bad"] == 2 and len(batch["labels"]) == n - 2
    with pytest.raises(UserError, match="fewer usable samples than one batch"):
        take(ShardStream(find_shards(copy), 64, n, 8, seed=0, shuffle_buffer=1), 1)


def test_label_cache_encodes_each_phrase_once(tmp_path):
    bb = FrozenCLIP("synseg-tiny", None, (1, 2, 3))
    cache = LabelCache(bb, "a photo of a {}.", tmp_path)
    a = cache.embed(["dog", "cat", "dog"])
    b = cache.embed(["cat", "bird"])
    assert cache.encoded == 3 and torch.equal(a[1], b[0]) and torch.equal(a[0], a[2])
    torch.testing.assert_close(a[0], bb.encode_text(["a photo of a dog."])[0])
    cache.save()
    again = LabelCache(bb, "a photo of a {}.", tmp_path)
    assert (
        torch.equal(again.embed(["bird", "dog"]), torch.stack([b[1], a[0]])) and again.encoded == 0
    )
    assert LabelCache(bb, "{}", tmp_path).index == {}  # another template: another cache
    other = FrozenCLIP("synseg-tiny", None, (1, 2, 3), init_seed=1)  # other weights: another id
    assert LabelCache(other, "a photo of a {}.", tmp_path).id != cache.id


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_encoding_stopped_midway_goes_on_from_what_it_saved(tmp_path, stop):
    """Ctrl-C saves what is encoded; a crash or a kill (no handler runs) loses only what came
    after the last periodic save. Run again, the cache equals an uninterrupted encoding's."""
    bb = FrozenCLIP("synseg-tiny", None, (1, 2, 3))
    phrases = [f"thing {i}" for i in range(10)]
    real, calls = bb.encode_text, []

    def failing(texts):
        calls.append(len(texts))
        if len(calls) == 4:
            raise stop()
        return real(texts)

    bb.encode_text = failing
    cache = LabelCache(bb, "a photo of a {}.", tmp_path / "c")
    # periodic saves after every batch of 2 for a crash; none for Ctrl-C, which saves itself
    every = 1e-9 if stop is RuntimeError else 0.0
    with pytest.raises(stop):
        cache.ensure(phrases, batch=2, save_every=every)
    bb.encode_text = real
    again = LabelCache(bb, "a photo of a {}.", tmp_path / "c")
    assert list(again.index) == phrases[:6]  # three batches encoded before the fourth failed
    assert again.ensure(phrases, batch=2) == 4
    whole = LabelCache(bb, "a photo of a {}.", tmp_path / "w")
    whole.ensure(phrases, batch=2)
    assert list(again.index) == list(whole.index)
    assert torch.equal(again.embed(phrases), whole.embed(phrases))


def test_absent_negatives_are_never_the_images_own_labels(tmp_path):
    """k distinct phrases per image from the vocabulary, none of them that image's labels
    (another image's may be), each phrase of the rest drawn in the long run."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.train.data import Vocabulary

    phrases = [f"p{i}" for i in range(8)]
    pq.write_table(
        pa.table({"phrase": phrases, "images": [1] * 8}), tmp_path / "vocabulary.parquet"
    )
    vocab = Vocabulary(tmp_path)
    labels = [["p0", "p1", "p2", "p3", "p4"], ["p5", "unknown phrase"]]
    rng, seen = random.Random(0), set()
    for _ in range(200):
        picks = vocab.absent(labels, 3, rng)
        first, second = picks[:3], picks[3:]
        assert len(set(first)) == 3 and set(first) <= {"p5", "p6", "p7"}
        assert len(set(second)) == 3 and "p5" not in second
        seen.update(second)
    assert seen == set(phrases) - {"p5"}
    assert vocab.absent([phrases[:6]], 3, rng) is None  # only two phrases left to draw


def test_the_device_table_follows_new_phrases(tmp_path):
    """A phrase encoded after the table went to the device is in the device's table too."""
    bb = FrozenCLIP("synseg-tiny", None, (1, 2, 3))
    cache = LabelCache(bb, "a photo of a {}.", tmp_path)
    cache.ensure(["dog", "cat"])
    before = cache.table_on(torch.device("cpu"))
    rows = cache.indices(["bird", "dog"])  # bird is new
    table = cache.table_on(torch.device("cpu"))
    assert table.shape[0] == before.shape[0] + 1 == len(cache.index)
    torch.testing.assert_close(table[rows[0]], bb.encode_text(["a photo of a bird."])[0])
