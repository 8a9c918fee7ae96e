import functools
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.download import (
    DownloadConfig,
    done_shards,
    read_status,
    read_url_list,
    run_download,
)
from pipeline.serve import _QuietHandler, free_port, make_server
from pipeline.world import load_world, write_url_list
from synseg.errors import UserError
from synseg.shards import uid_of


def successes(raw: Path) -> list[str]:
    return [r["uid"] for r in read_status(raw).to_pylist() if r["status"] == "success"]


def test_download_against_loopback(world, raw):
    kinds = load_world(world)["url_kinds"]
    stats_ok = kinds.count("ok")
    got = successes(raw)
    assert len(got) == len(set(got)) == stats_ok
    rows = read_status(raw).to_pylist()
    assert len(rows) == len(kinds)
    by_uid = {r["uid"]: r for r in rows}
    urls = [line.split("\t")[0] for line in (world / "cc12m.tsv").read_text().splitlines()]
    for url, kind in zip(urls, kinds, strict=True):
        row = by_uid[hashlib.sha1(url.encode()).hexdigest()[:16]]
        assert (row["status"] == "success") == (kind == "ok"), (url, kind, row)
        if kind == "missing":
            assert "404" in row["error_message"]
        if kind == "refused":
            assert "refused" in row["error_message"].lower()
    # the uid and the caption travel with every sample
    table = pq.read_table(done_shards(raw)[0])
    assert {"uid", "caption", "status", "key"} <= set(table.column_names)


def test_served_world_queues_a_64_thread_burst(world):
    """64 connections opened before the server accepts any all complete their handshake at once:
    a listen backlog of 5 leaves the rest waiting on SYN retries, which a download times out."""
    import socket

    server = make_server(world, free_port())  # listening, not yet accepting
    socks = []
    try:
        for _ in range(64):
            s = socket.socket()
            s.settimeout(0.5)
            s.connect(server.server_address)  # raises TimeoutError past the backlog
            socks.append(s)
        assert len(socks) == 64
    finally:
        for s in socks:
            s.close()
        server.server_close()


def test_served_world_is_quiet_on_closed_connections(world, capsys):
    server = make_server(world, free_port())
    try:
        for error in (BrokenPipeError(), ConnectionResetError()):
            try:
                raise error
            except ConnectionError:
                server.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == ""
        try:
            raise ValueError("a real fault")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert "a real fault" in capsys.readouterr().err
    finally:
        server.server_close()


def test_url_list_parsing(tmp_path):
    f = tmp_path / "list.tsv"
    f.write_bytes(
        b"url\tcaption\n"
        b"http://a.example/1.jpg\tA dog\n"
        b"http://a.example/1.jpg\tthe same URL again\n"
        b"http://a.example/2.jpg\t\n"
        b"http://a.example/3.jpg\tcaf\xe9 latin-1\n"
        b"not a row\n"
        b"http://a.example/4.jpg\t" + b"x" * 3000 + b"\n"
    )
    table, stats = read_url_list(f, max_caption_chars=1000)
    assert table.column_names == ["url", "caption", "uid"]
    assert table["url"].to_pylist() == [f"http://a.example/{i}.jpg" for i in (1, 2, 3, 4)]
    assert table["uid"].to_pylist()[0] == uid_of("http://a.example/1.jpg")
    assert (
        stats.duplicates,
        stats.empty_captions,
        stats.not_utf8,
        stats.bad_rows,
        stats.truncated_captions,
    ) == (1, 1, 1, 1, 1)
    assert table["caption"].to_pylist()[2].startswith("caf\ufffd")
    assert len(table["caption"].to_pylist()[3]) == 1000


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "holds no rows"),
        (b"http://a/1.jpg\tcap\textra\n", "expected 2 tab-separated columns"),
        (b"id,url,caption\n1,http://a/1.jpg,cap\n", "expected 2 tab-separated columns"),
        (b"\n\n", "holds no rows"),
    ],
)
def test_bad_url_lists(tmp_path, content, message):
    f = tmp_path / "list.tsv"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_url_list(f, 1000)


def test_download_refuses_a_foreign_output_and_a_missing_list(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_download(DownloadConfig(url_list=tmp_path / "nope.tsv", output=tmp_path / "raw"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.pdf").write_text("x")
    f = tmp_path / "l.tsv"
    f.write_text("http://127.0.0.1:9/a.jpg\ta\n")
    with pytest.raises(UserError, match="not a download"):
        run_download(DownloadConfig(url_list=f, output=tmp_path / "busy"))
    with pytest.raises(UserError, match="--distributor"):
        DownloadConfig(url_list=f, distributor="slurm")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        with pytest.raises(UserError, match="needs the ray package"):
            DownloadConfig(url_list=f, distributor="ray")


class _SlowHandler(_QuietHandler):
    def do_GET(self):
        time.sleep(0.03)
        super().do_GET()


@pytest.fixture()
def slow_world(world, tmp_path):
    """The world served slowly enough to interrupt a download in the middle."""
    port = free_port()
    handler = functools.partial(_SlowHandler, directory=str(world / "http"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url_list = tmp_path / "list.tsv"
    base = f"http://127.0.0.1:{port}"
    url_list.write_text(
        "".join(
            f"{base}/train/{i:06d}.jpg\tcaption {i}\n"
            for i, k in enumerate(load_world(world)["url_kinds"])
            if k == "ok"
        )
    )
    yield url_list
    server.shutdown()
    server.server_close()


def test_killed_download_resumes_with_every_sample_once(slow_world, tmp_path):
    out = tmp_path / "raw"
    n_rows = len(slow_world.read_text().splitlines())
    code = (
        "from pathlib import Path; from pipeline.download import DownloadConfig, run_download; "
        f"run_download(DownloadConfig(url_list=Path({str(slow_world)!r}), output=Path({str(out)!r}), "
        "samples_per_shard=20, threads=2, timeout=5, image_size=64))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_stats.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a clean stop
    proc.wait()
    finished_before = len(list(out.glob("*_stats.json")))
    expected_shards = -(-n_rows // 20)
    assert 0 < finished_before < expected_shards, "the kill should land in the middle of the run"

    stats = run_download(
        DownloadConfig(
            url_list=slow_world,
            output=out,
            samples_per_shard=20,
            threads=4,
            timeout=5,
            image_size=64,
        )
    )
    assert stats.shards == expected_shards
    got = successes(out)
    assert len(got) == len(set(got)) == n_rows
    assert stats.success == n_rows and stats.failed == 0


def test_retry_failed_fetches_only_the_failures(world, tmp_path):
    # Serve a copy of the world in which some images are missing at first.
    import shutil

    from pipeline.serve import serving

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    kinds = load_world(copy)["url_kinds"]
    hidden = [i for i, k in enumerate(kinds) if k == "ok"][:7]
    for i in hidden:
        (copy / "http/train" / f"{i:06d}.jpg").rename(copy / f"hidden-{i}.jpg")
    port = free_port()
    write_url_list(copy, port)
    out = tmp_path / "raw"
    cfg = dict(
        url_list=copy / "cc12m.tsv",
        output=out,
        samples_per_shard=50,
        threads=8,
        timeout=3,
        image_size=64,
    )
    with serving(copy, port):
        first = run_download(DownloadConfig(**cfg))
        assert first.success == kinds.count("ok") - len(hidden)
        shards_before = {p.name for p in done_shards(out)}
        for i in hidden:
            (copy / f"hidden-{i}.jpg").rename(copy / "http/train" / f"{i:06d}.jpg")
        retry = run_download(DownloadConfig(**cfg, retry_failed=True))
    dead = sum(k != "ok" for k in kinds)
    assert retry.attempted == len(hidden) + dead  # only rows that never succeeded
    assert retry.success == kinds.count("ok") and retry.failed == dead
    new = {p.name for p in done_shards(out)} - shards_before
    assert new and min(new) > max(shards_before), "retries go to new shards; finished ones stay"
    got = successes(out)
    assert len(got) == len(set(got)) == kinds.count("ok")

    # The status report counts uids by their best outcome, not rows: a uid that failed first
    # and succeeded on retry is one success, and a dead URL tried twice is one failure.
    from pipeline.inspection import InspectConfig, run_inspect

    res = run_inspect(InspectConfig(report="download-status", raw=out, limit=50))
    by_status: dict[str, int] = {}
    for status, _, n in res.rows:
        by_status[status] = by_status.get(status, 0) + n
    assert res.columns == ["status", "error", "uids"]
    assert by_status == {"success": kinds.count("ok"), "failed": dead}


def test_retry_needs_a_finished_download(world, tmp_path):
    with pytest.raises(UserError, match="not finished"):
        run_download(
            DownloadConfig(
                url_list=world / "cc12m.tsv",
                output=tmp_path / "raw",
                samples_per_shard=50,
                retry_failed=True,
            )
        )
