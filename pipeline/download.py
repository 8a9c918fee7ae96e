"""download: a typed wrapper over ``img2dataset.download`` for CC12M-style URL lists.

What it adds to img2dataset:
- reads CC12M's header-less ``url<TAB>caption`` file as published (a header line is accepted
  too), checks it, drops duplicate URLs, and gives each row a stable ``uid`` (a hash of its URL)
  that img2dataset stores in every shard (``save_additional_columns``) and later stages carry;
- resumes: img2dataset's incremental mode skips shards whose ``_stats.json`` exists;
- ``retry_failed``: fetches again only the rows that never succeeded, into new shards
  (img2dataset's ``extend`` mode), so no finished shard is rewritten;
- a summary of successes and failure reasons read back from the shards' Parquet files;
- an honest user agent: img2dataset's token (``img2dataset``) is sent, so a site's
  ``X-Robots-Tag: img2dataset: noai`` (or ``noimageai``, ``noindex``, ``noimageindex``) is
  honoured and the row fails with that reason;
- an interrupted download (Ctrl-C) exits non-zero: img2dataset's own handler would exit 0.

Our own bookkeeping lives in ``<output>/_synseg/`` (img2dataset treats every top-level
``*.json`` as a shard's stats, so nothing of ours may sit there).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synseg.errors import UserError
from synseg.fsutil import atomic_path, describe_diff, file_digest, read_parquet, write_json
from synseg.shards import uid_of

DISTRIBUTORS = ("local", "multiprocessing", "pyspark", "ray")  # local: multiprocessing
META = "_synseg"
INPUT_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("uid", pa.string())])


@dataclass
class DownloadConfig:
    url_list: Path  # CC12M-style file: url<TAB>caption per line, header optional
    output: Path = Path("data/raw")  # img2dataset webdataset shards land here
    image_size: int = 384  # img2dataset resizes so the image fits this size
    resize_mode: str = "keep_ratio"  # img2dataset's: no, keep_ratio, center_crop or border
    samples_per_shard: int = 10000  # rows per shard
    processes: int = 1  # img2dataset processes_count
    threads: int = 64  # img2dataset thread_count (per process)
    distributor: str = "multiprocessing"  # img2dataset's: multiprocessing (local), pyspark, ray
    ray_address: str = ""  # with ray: the cluster to join (empty: start a local Ray)
    timeout: int = 10  # seconds per request
    retries: int = 0  # img2dataset's retries per URL
    retry_failed: bool = False  # fetch again only the rows that never succeeded
    max_caption_chars: int = 1000  # longer captions are cut (and counted)
    user_agent_token: str = "img2dataset"  # named in the user agent; X-Robots-Tag honoured for it
    verbose: bool = False  # show img2dataset's own output instead of sending it to a log file

    def __post_init__(self) -> None:
        self.url_list, self.output = Path(self.url_list), Path(self.output)
        if self.distributor == "local":
            self.distributor = "multiprocessing"
        problems = []
        if self.distributor not in DISTRIBUTORS:
            problems.append(f"--distributor must be one of {', '.join(DISTRIBUTORS)}")
        if self.samples_per_shard < 1 or self.processes < 1 or self.threads < 1:
            problems.append("--samples-per-shard, --processes and --threads must be at least 1")
        if self.resize_mode not in (
            "no",
            "keep_ratio",
            "keep_ratio_largest",
            "center_crop",
            "border",
        ):
            problems.append(f"unknown --resize-mode {self.resize_mode!r}")
        needs = {"pyspark": "pyspark", "ray": "ray"}.get(self.distributor)
        if needs and importlib.util.find_spec(needs) is None:
            problems.append(
                f"--distributor {self.distributor} needs the {needs} package (pip install {needs})"
            )
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class InputStats:
    rows: int = 0
    header: bool = False  # the first line was a header (url<TAB>caption or another name)
    duplicates: int = 0
    bad_rows: int = 0
    not_utf8: int = 0
    empty_captions: int = 0
    truncated_captions: int = 0


@dataclass
class DownloadStats:
    input: InputStats
    shards: int = 0
    attempted: int = 0  # rows img2dataset tried in this run's input (all runs: see success/failed)
    success: int = 0  # unique uids downloaded, over every shard
    failed: int = 0  # unique uids that never succeeded
    failure_reasons: dict[str, int] = field(default_factory=dict)
    log: str = ""


# --------------------------------------------------------------------------- the URL list


def read_url_list(path: Path, max_caption_chars: int) -> tuple[pa.Table, InputStats]:
    """Read a CC12M-style TSV into (url, caption, uid), checking it on the way."""
    if not path.exists():
        raise UserError(f"URL list {path} does not exist")
    if path.is_dir():
        raise UserError(f"URL list {path} is a folder, not a file")
    stats = InputStats()
    urls, captions, uids, seen = [], [], [], set()
    first = True
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as spreadsheet exports write
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                bad_encoding = False
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                bad_encoding = True
            cols = line.split("\t")
            is_url = re.match(r"https?://\S+$", cols[0].strip()) is not None
            if first and len(cols) == 2 and not is_url and "://" not in cols[0]:
                first = False
                stats.header = True
                continue  # a header line (url<TAB>caption, or other column names)
            if len(cols) != 2 or not is_url:
                if first:
                    problem = (
                        f"expected 2 tab-separated columns (url, caption), found {len(cols)}"
                        if len(cols) != 2
                        else "the first column is not an http(s) URL"
                    )
                    raise UserError(f"{path} line {lineno}: {problem}: {line[:60]!r}")
                stats.bad_rows += 1
                continue
            first = False
            url, caption = cols[0].strip(), cols[1].strip()
            if url in seen:
                stats.duplicates += 1
                continue
            seen.add(url)
            stats.not_utf8 += bad_encoding
            if not caption:
                stats.empty_captions += 1
            elif len(caption) > max_caption_chars:
                caption = caption[:max_caption_chars]
                stats.truncated_captions += 1
            urls.append(url)
            captions.append(caption)
            uids.append(uid_of(url))
    stats.rows = len(urls)
    if stats.rows == 0:
        raise UserError(f"URL list {path} holds no rows")
    if stats.bad_rows > stats.rows:
        raise UserError(
            f"{path}: {stats.bad_rows} of {stats.rows + stats.bad_rows} lines are not url<TAB>caption"
        )
    table = pa.table({"url": urls, "caption": captions, "uid": uids}, schema=INPUT_SCHEMA)
    return table, stats


# --------------------------------------------------------------------------- shards on disk


def done_shards(raw: Path) -> list[Path]:
    """The Parquet files of shards img2dataset finished (their ``_stats.json`` exists)."""
    return sorted(
        p
        for p in raw.glob("[0-9]*.parquet")
        if (raw / f"{p.name.split('.')[0]}_stats.json").exists()
    )


def read_status(raw: Path) -> pa.Table:
    """uid, key, status and error of every row of every finished shard."""
    tables = []
    for p in done_shards(raw):
        t = read_parquet(p, ["uid", "key", "status", "error_message"])
        tables.append(t.append_column("shard", pa.array([p.stem] * t.num_rows, pa.string())))
    if not tables:
        return pa.table({"uid": [], "key": [], "status": [], "error_message": [], "shard": []})
    return pa.concat_tables(tables)


def _reason(message: str | None) -> str:
    """Group failure messages: strip URLs and numbers that differ from row to row."""
    if not message:
        return "unknown"
    msg = re.sub(r"https?://\S+", "<url>", message)
    msg = re.sub(r"\[Errno \d+\]", "", msg)
    msg = re.sub(r"\s+", " ", msg)
    return msg.strip()[:80]


def succeeded(status: list[dict]) -> set[str]:
    """uids with a successful row in any shard (a retry may succeed where the first try failed)."""
    return {r["uid"] for r in status if r["status"] == "success"}


def summarize(raw: Path) -> tuple[int, int, dict[str, int]]:
    """(unique successes, unique uids that never succeeded, failure reasons of the latter)."""
    status = read_status(raw).to_pylist()
    ok = succeeded(status)
    last_error: dict[str, str] = {}
    for r in status:
        if r["uid"] not in ok:
            last_error[r["uid"]] = _reason(r["error_message"])
    return len(ok), len(last_error), dict(Counter(last_error.values()).most_common())


# --------------------------------------------------------------------------- running img2dataset


@contextlib.contextmanager
def _output_to(log: Path | None) -> Iterator[None]:
    """Send this process's and its children's stdout/stderr to ``log``: at the fd level, and
    as Python's sys.stdout/sys.stderr too (which an embedding program may have replaced)."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    with log.open("ab") as f, log.open("a", buffering=1) as text:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = text
        try:
            yield
        finally:
            text.flush()
            sys.stdout, sys.stderr = saved_streams
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _count_done(raw: Path) -> int:
    return len(list(raw.glob("[0-9]*_stats.json")))


def _img2dataset(cfg: DownloadConfig, input_file: Path, mode: str, on_tick=None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from img2dataset import download

    log = None if cfg.verbose else cfg.output / META / "img2dataset.log"
    stop = threading.Event()
    ticker = None
    if on_tick is not None:

        def tick() -> None:
            while not stop.wait(0.5):
                on_tick(_count_done(cfg.output))

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    previous_handler = signal.getsignal(signal.SIGINT)
    if cfg.distributor == "ray":
        from pipeline.distribute import connect_ray

        connect_ray(cfg.ray_address)  # img2dataset's ray distributor expects a connected Ray
    try:
        with _output_to(log):
            download(
                url_list=str(input_file),
                input_format="parquet",
                url_col="url",
                caption_col="caption",
                save_additional_columns=["uid"],
                output_format="webdataset",
                output_folder=str(cfg.output),
                image_size=cfg.image_size,
                resize_mode=cfg.resize_mode,
                resize_only_if_bigger=True,
                processes_count=cfg.processes,
                thread_count=cfg.threads,
                number_sample_per_shard=cfg.samples_per_shard,
                distributor=cfg.distributor,
                timeout=cfg.timeout,
                retries=cfg.retries,
                incremental_mode=mode,
                enable_wandb=False,
                extract_exif=False,
                compute_hash=None,
                user_agent_token=cfg.user_agent_token or None,
            )
    except SystemExit as e:
        # img2dataset's SIGINT handler cleans its temporary folder, then calls sys.exit(0):
        # a Ctrl-C would look like success to `download && extract-nouns`.
        raise KeyboardInterrupt from e
    finally:
        signal.signal(signal.SIGINT, previous_handler)  # img2dataset's handler outlives it
        stop.set()
        if ticker is not None:
            ticker.join()
            on_tick(_count_done(cfg.output))


def run_download(cfg: DownloadConfig, on_start=None, on_tick=None) -> DownloadStats:
    """Download ``cfg.url_list`` into webdataset shards; resume or retry as asked.

    ``on_start(total_shards)`` and ``on_tick(done_shards)`` report progress to a caller.
    """
    out, meta = cfg.output, cfg.output / META
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not meta.exists():
        raise UserError(
            f"output {out} already holds files that are not a download; choose another folder"
        )
    meta.mkdir(parents=True, exist_ok=True)

    digest = file_digest(cfg.url_list) if cfg.url_list.is_file() else None
    table, input_stats = read_url_list(cfg.url_list, cfg.max_caption_chars)
    input_file = meta / "input.parquet"
    record = meta / "download.json"
    settings = {
        "url_list_sha1": digest,
        "samples_per_shard": cfg.samples_per_shard,
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
    }
    if record.exists():
        previous = json.loads(record.read_text())
        if previous != settings:
            raise UserError(
                f"{out} holds a download of another URL list or with other settings "
                f"({describe_diff(previous, settings)}); choose another --output"
            )
    else:
        write_json(record, settings)
    with atomic_path(input_file) as tmp:
        pq.write_table(table, tmp)
    n_input_shards = -(-table.num_rows // cfg.samples_per_shard)

    if cfg.retry_failed:
        finished = {int(p.stem) for p in done_shards(out)}
        missing = sorted(set(range(n_input_shards)) - finished)
        if missing:
            raise UserError(
                f"the download is not finished ({len(missing)} shard(s) left, first {missing[0]:05d}); "
                "run it again without --retry-failed first"
            )
        ok = succeeded(read_status(out).to_pylist())
        retry = table.filter(pc.invert(pc.is_in(table["uid"], pa.array(sorted(ok), pa.string()))))
        attempted = retry.num_rows
        if attempted:
            retry_file = meta / "retry.parquet"
            with atomic_path(retry_file) as tmp:
                pq.write_table(retry, tmp)
            if on_start:
                on_start(_count_done(out) + -(-attempted // cfg.samples_per_shard))
            _img2dataset(cfg, retry_file, "extend", on_tick)
    else:
        attempted = table.num_rows
        if on_start:
            on_start(n_input_shards)
        _img2dataset(cfg, input_file, "incremental", on_tick)
        left = n_input_shards - len([p for p in done_shards(out) if int(p.stem) < n_input_shards])
        if left:
            raise UserError(
                f"img2dataset stopped with {left} of {n_input_shards} shard(s) unfinished "
                f"(see {meta / 'img2dataset.log'}); run the same command again to go on"
            )

    success, failed, reasons = summarize(out)
    return DownloadStats(
        input=input_stats,
        shards=len(done_shards(out)),
        attempted=attempted,
        success=success,
        failed=failed,
        failure_reasons=reasons,
        log=str(meta / "img2dataset.log") if not cfg.verbose else "",
    )
