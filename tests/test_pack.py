import io
import json
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.pack import PackConfig, run_pack
from synseg.errors import UserError


def read_back(folder):
    urls = [str(p) for p in sorted(folder.glob("train-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def kept_labels(labels):
    return {
        r["uid"]: r["labels"]
        for p in labels.glob("*.parquet")
        for r in pq.read_table(p).to_pylist()
        if r["kept"]
    }


def test_round_trip_with_webdataset(raw, labels, shards):
    samples = read_back(shards)
    expected = kept_labels(labels)
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for s in samples:
        assert s["json"]["labels"] == expected[s["__key__"]]
        assert s["json"]["uid"] == s["__key__"] and s["json"]["caption"]
        assert s["jpg"].size == (48, 48)
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sum(sizes.values()) == len(samples)
    for name, n in sizes.items():
        assert n <= 25
        with tarfile.open(shards / name) as tar:
            assert sum(m.name.endswith(".json") for m in tar) == n


def test_corrupt_images_are_skipped_and_counted(raw, labels, tmp_path):
    raw2 = tmp_path / "raw"
    shutil.copytree(raw, raw2)
    src = raw2 / "00000.tar"
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    broken = jpgs[0]
    with tarfile.open(src, "w") as tar:
        for m, data in members:
            if m.name == broken:
                data = data[:40]  # a truncated JPEG
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    stats = run_pack(PackConfig(raw=raw2, labels=labels, output=tmp_path / "shards", image_size=32))
    assert stats.corrupt == 1
    assert stats.samples == len(kept_labels(labels)) - 1


def test_byte_bound_and_rerun(raw, labels, tmp_path):
    out = tmp_path / "shards"
    first = run_pack(
        PackConfig(raw=raw, labels=labels, output=out, image_size=64, max_bytes=30_000)
    )
    by_count = run_pack(PackConfig(raw=raw, labels=labels, output=tmp_path / "s2", image_size=64))
    assert first.shards > by_count.shards
    for tar in out.glob("train-*.tar"):
        assert tar.stat().st_size <= 30_000
    again = run_pack(
        PackConfig(raw=raw, labels=labels, output=out, image_size=64, max_bytes=30_000)
    )
    assert (
        again.packed == 0 and again.skipped == again.raw_shards and again.samples == first.samples
    )
    with pytest.raises(UserError, match="other settings"):
        run_pack(PackConfig(raw=raw, labels=labels, output=out, image_size=32))
    redo = run_pack(PackConfig(raw=raw, labels=labels, output=out, image_size=32, overwrite=True))
    assert redo.samples == first.samples
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == first.samples
    assert len(read_back(out)) == first.samples  # no stale parts from the first packing


def test_bad_inputs(raw, labels, tmp_path):
    with pytest.raises(UserError, match="labels folder"):
        run_pack(PackConfig(raw=raw, labels=tmp_path / "nope", output=tmp_path / "s"))
    partial = tmp_path / "labels"
    shutil.copytree(labels, partial)
    (partial / "00001.parquet").unlink()
    with pytest.raises(UserError, match="no labels manifest.*00001"):
        run_pack(PackConfig(raw=raw, labels=partial, output=tmp_path / "s"))
    with pytest.raises(UserError, match="--resize"):
        PackConfig(resize="squash")


def _raw_sources(raw):
    """key -> (uid, caption, decoded source image) from the raw shards themselves."""
    from PIL import Image

    uids = {
        r["key"]: r["uid"]
        for p in raw.glob("[0-9]*.parquet")
        for r in pq.read_table(p, columns=["key", "uid"]).to_pylist()
    }
    out = {}
    for t in raw.glob("[0-9]*.tar"):
        with tarfile.open(t) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in files.items():
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                img = Image.open(io.BytesIO(data)).convert("RGB")
                out[key] = (uids[key], files[f"{key}.txt"].decode(), img)
    return out


def test_every_sample_carries_its_own_image_caption_and_labels(raw, labels, shards):
    import numpy as np
    from PIL import Image, ImageOps

    sources = _raw_sources(raw)
    by_key = {r["key"]: r for p in labels.glob("*.parquet") for r in pq.read_table(p).to_pylist()}
    samples = read_back(shards)
    keys = sorted(sources)
    rng = np.random.default_rng(0)
    for s in samples:
        meta = s["json"]
        uid, caption, src = sources[meta["key"]]
        assert meta["uid"] == uid == s["__key__"]
        assert meta["caption"] == caption
        assert meta["labels"] == by_key[meta["key"]]["labels"]
        got = np.asarray(s["jpg"], dtype=np.float64)
        want = np.asarray(ImageOps.fit(src, (48, 48), Image.BICUBIC), dtype=np.float64)
        own = np.abs(got - want).mean()
        assert own < 6, "the packed image is its source, resized (JPEG noise only)"
        for other in rng.choice(keys, 8, replace=False):
            if other != meta["key"]:
                alt = np.asarray(ImageOps.fit(sources[other][2], (48, 48), Image.BICUBIC), float)
                assert np.abs(got - alt).mean() > own, f"{meta['key']} looks like {other}"


def test_vocabulary_counts_the_phrases_of_the_packed_images(raw, labels, shards, tmp_path):
    """vocabulary.parquet is tied to the shards: each phrase with the number of packed images
    that carry it, in sorted order; images left out of the shards do not count."""
    counts: dict[str, int] = {}
    for s in read_back(shards):
        for phrase in set(s["json"]["labels"]):
            counts[phrase] = counts.get(phrase, 0) + 1
    vocab = pq.read_table(shards / "vocabulary.parquet").to_pylist()
    assert [r["phrase"] for r in vocab] == sorted(counts)
    assert {r["phrase"]: r["images"] for r in vocab} == counts
    # A shard packed by a version whose markers lack phrases is packed again, not trusted.
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    marker = sorted((copy / "_pack").glob("*.json"))[0]
    old = json.loads(marker.read_text())
    del old["phrases"]
    marker.write_text(json.dumps(old))
    (copy / "vocabulary.parquet").unlink()
    stats = run_pack(PackConfig(raw=raw, labels=labels, output=copy, image_size=48, max_count=25))
    assert stats.packed == 1 and stats.skipped == stats.raw_shards - 1
    assert pq.read_table(copy / "vocabulary.parquet").to_pylist() == vocab
