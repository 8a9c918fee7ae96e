"""The per-shard stages on a local Ray (2 CPUs): the same files as the local run, byte for byte,
and a Ray run that fails mid-way completes on a rerun with every sample once."""

import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from pipeline.errors import UserError
from pipeline.filter import FilterConfig, run_filter
from pipeline.nouns import NounsConfig, run_extract_nouns
from pipeline.pack import PackConfig, run_pack

RAY = {"distributor": "ray", "processes": 2}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    yield
    ray.shutdown()


def same_files(a: Path, b: Path, pattern: str) -> list[str]:
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def test_each_stage_on_ray_writes_what_the_local_run_writes(raw, nouns, labels, shards, tmp_path):
    n = run_extract_nouns(NounsConfig(raw=raw, output=tmp_path / "nouns", **RAY))
    assert n.written == len(same_files(nouns, tmp_path / "nouns", "*.parquet")) > 1
    assert n.captions == sum(pq.read_metadata(p).num_rows for p in nouns.glob("*.parquet"))
    f = run_filter(FilterConfig(nouns=tmp_path / "nouns", output=tmp_path / "labels", **RAY))
    assert f.written == len(same_files(labels, tmp_path / "labels", "*.parquet"))
    p = run_pack(
        PackConfig(
            raw=raw,
            labels=tmp_path / "labels",
            output=tmp_path / "shards",
            image_size=48,
            max_count=25,
            **RAY,
        )
    )
    assert p.packed == p.raw_shards and p.samples == sum(
        pq.read_metadata(x).num_rows for x in labels.glob("*.parquet")
    ) - sum(
        1 for x in labels.glob("*.parquet") for k in pq.read_table(x)["kept"].to_pylist() if not k
    )
    same_files(shards, tmp_path / "shards", "train-*.tar")
    same_files(shards, tmp_path / "shards", "*.json")
    same_files(shards, tmp_path / "shards", "vocabulary.parquet")
    # A rerun on Ray finds everything done.
    again = run_extract_nouns(NounsConfig(raw=raw, output=tmp_path / "nouns", **RAY))
    assert again.skipped == again.shards and again.written == 0


def test_a_failed_ray_run_completes_on_a_rerun(raw, nouns, tmp_path):
    """A shard that cannot be read (a damaged file on shared storage) fails its actor's job
    with the stage's own one-line error, after other shards were written; once the file is
    back, the rerun writes only what is missing, and every caption is there once."""
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    victim = copy / "00002.parquet"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    out = tmp_path / "nouns"
    with pytest.raises(UserError, match="00002.parquet"):
        run_extract_nouns(NounsConfig(raw=copy, output=out, **RAY))
    written = sorted(p.name for p in out.glob("*.parquet"))
    assert "00002.parquet" not in written and not list(out.glob(".*.tmp"))
    victim.write_bytes(good)
    stats = run_extract_nouns(NounsConfig(raw=copy, output=out, **RAY))
    assert stats.skipped == len(written) and stats.written == stats.shards - len(written)
    same_files(nouns, out, "*.parquet")
    uids = [u for p in sorted(out.glob("*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()]
    assert len(uids) == len(set(uids))


def test_bad_distributor_is_one_line(raw, tmp_path):
    with pytest.raises(UserError, match="--distributor must be one of local, ray"):
        run_extract_nouns(NounsConfig(raw=raw, output=tmp_path / "n", distributor="spark"))
    shutil.rmtree(tmp_path / "n", ignore_errors=True)
