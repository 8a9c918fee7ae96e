"""The per-shard stages on a local Ray (2 CPUs): the same files as the local run, byte for byte,
and a Ray run that fails mid-way completes on a rerun with every sample once."""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.filter import FilterConfig, run_filter
from pipeline.nouns import NounsConfig, run_extract_nouns
from pipeline.pack import PackConfig, run_pack
from synseg.errors import UserError

RAY = {"distributor": "ray", "processes": 2}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    yield
    ray.shutdown()


def test_pair_on_ray_draws_the_local_pairs(shards, tmp_path):
    from pipeline.pairs import PairConfig, run_pair
    from synseg.shards import PARTNERS

    local, on_ray = tmp_path / "local", tmp_path / "ray"
    for folder in (local, on_ray):
        shutil.copytree(shards, folder)
        (folder / PARTNERS).unlink(missing_ok=True)
    run_pair(PairConfig(shards=local, processes=1))
    stats = run_pair(PairConfig(shards=on_ray, **RAY))
    assert stats.with_partner > 50
    assert pq.read_table(on_ray / PARTNERS).equals(pq.read_table(local / PARTNERS))


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


def _processes_marked(mark: str) -> list[int]:
    """Processes (Ray's own included) whose environment carries ``mark``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if mark.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def big_raw(raw: Path, out: Path, copies: int) -> Path:
    """A raw folder of ``copies`` shards, each the fixture's rows repeated under new keys and
    uids: enough work per shard that a kill lands between shards."""
    out.mkdir()
    rows = [r for p in sorted(raw.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    for s in range(copies):
        table = [
            {**r, "uid": f"{r['uid']}{s:02d}{i:04d}", "key": f"{s:05d}{i:04d}"}
            for i, r in enumerate(rows * 6)
        ]
        pq.write_table(pa.Table.from_pylist(table), out / f"{s:05d}.parquet")
        (out / f"{s:05d}_stats.json").write_text("{}")
    return out


def test_a_killed_ray_command_completes_on_a_rerun(raw, tmp_path):
    """`synseg-data extract-nouns --distributor ray`, starting its own Ray, SIGKILLed with its
    process group once some shards are written; the processes Ray started are killed too (as a
    lost head node would lose them). The same command again writes only the missing shards,
    the result equals an uninterrupted local run, every caption is there once, no temporary."""
    big = big_raw(raw, tmp_path / "raw", 8)
    out, expected = tmp_path / "nouns", tmp_path / "expected"
    run_extract_nouns(NounsConfig(raw=big, output=expected, processes=1))
    mark = f"SYNSEG_RAY_KILL_TEST={uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]),
        mark.split("=")[0]: mark.split("=")[1],
    }
    cmd = [sys.executable, "-m", "pipeline.cli", "extract-nouns", "--raw", str(big)]
    cmd += ["--output", str(out), "--distributor", "ray", "--processes", "2"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not list(out.glob("[0-9]*.parquet")) and proc.poll() is None:
            assert time.time() < deadline, "no shard was written"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        for pid in _processes_marked(mark):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    done_at_kill = sorted(p.name for p in out.glob("[0-9]*.parquet"))
    assert 0 < len(done_at_kill) < 8, done_at_kill
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for pid in _processes_marked(mark):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list(out.glob(".*.tmp"))
    same_files(expected, out, "*.parquet")
    uids = [u for p in sorted(out.glob("*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()]
    statuses = [x for p in big.glob("*.parquet") for x in pq.read_table(p)["status"].to_pylist()]
    assert len(uids) == len(set(uids)) == statuses.count("success")


def test_download_on_ray_fetches_what_the_local_download_fetched(world, served, raw, tmp_path):
    """`download --distributor ray`: img2dataset's own Ray distributor, on the Ray this process
    already runs; the same rows succeed as in the local download, each once."""
    from pipeline.download import DownloadConfig, read_status, run_download

    out = tmp_path / "raw"
    stats = run_download(
        DownloadConfig(
            url_list=world / "cc12m.tsv",
            output=out,
            samples_per_shard=40,
            threads=8,
            timeout=3,
            image_size=64,
            distributor="ray",
        )
    )
    assert stats.success > 0

    def ok(folder):
        rows = read_status(folder).to_pylist()
        return sorted(r["uid"] for r in rows if r["status"] == "success")

    assert ok(out) == ok(raw) and len(ok(out)) == len(set(ok(out)))


class _SlowFirst:
    """A job whose early items take longest, so Ray finishes them last."""

    def __call__(self, item: int) -> tuple[int, int]:
        time.sleep(0.3 if item < 2 else 0.0)
        return item, os.getpid()


def test_ray_results_come_back_in_input_order():
    from pipeline.distribute import Distribution, run_jobs
    from tests.test_ray import _SlowFirst as Job  # a name Ray's workers can import

    items = list(range(8))
    results = list(run_jobs(Job(), items, Distribution("ray", workers=2)))
    assert [r[0] for r in results] == items
    assert len({pid for _, pid in results}) == 2, "two actors shared the work"
