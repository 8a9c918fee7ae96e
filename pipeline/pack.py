"""pack: raw shards + labels manifests -> WebDataset training shards.

Each raw shard is packed on its own (a picklable job, so shards run in parallel) into
``train-RRRRR-PPP.tar`` (RRRRR the raw shard, PPP a part bounded by a sample count and its
size on disk). A sample is ``<uid>.jpg`` (resized for training) and ``<uid>.json`` with
``{"labels", "caption", "uid", "key"}``. Parts are written in a temporary folder and renamed
into place; ``_pack/RRRRR.json`` then marks the raw shard done, so a rerun skips it. The marker
records the SHA-1 of the raw and labels Parquet files it was made from: a shard downloaded or
filtered again is packed again, and the phrases the shard's images carry. At the end,
``vocabulary.parquet`` lists every label phrase of the training shards with its image count
(the trainer's set of negatives and the phrases ``synseg-train encode-labels`` encodes), then
``sizes.json`` maps every training shard to its sample count and marks the folder complete (the
folder's contract with the trainer is ``synseg.shards``).

Images that cannot be decoded are skipped and counted, never fatal. A raw tar that lacks
samples its Parquet says were downloaded (a truncated file) is not packed: the run ends with
one line naming it, since packing what is left would lose those samples silently. A uid that
could not be a safe tar member name (a path, dots) is skipped and counted.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image

from pipeline.distribute import distribution, run_jobs
from pipeline.download import done_shards
from synseg.cores import default_processes
from synseg.errors import UserError
from synseg.fsutil import (
    TMP_SUFFIX,
    clean_stale,
    file_digest,
    output_dir,
    read_parquet,
    write_json,
    write_parquet,
)
from synseg.shards import (
    SAFE_UID,
    SIZES,
    VOCABULARY,
    sample_json,
    shard_name,
    shard_pattern,
)

RESIZE_MODES = ("center_crop", "shorter_side", "stretch")


@dataclass
class PackConfig:
    raw: Path = Path("data/raw")  # img2dataset shards
    labels: Path = Path("manifests/labels")  # labels manifests (filter)
    output: Path = Path("data/shards")  # folder for the training shards
    image_size: int = 224  # training resolution
    resize: str = "center_crop"  # center_crop (square), shorter_side (keep ratio) or stretch
    quality: int = 90  # JPEG quality of the packed images
    max_count: int = 1000  # samples per training shard at most
    max_bytes: int = 500_000_000  # bytes per training shard at most
    processes: int = 0  # raw shards packed in parallel (0: one per core, at most 8)
    overwrite: bool = False  # repack shards made with other settings
    distributor: str = "local"  # local processes or ray (Ray Data actors)
    ray_address: str = ""  # Ray cluster to join (empty: start a local Ray)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per actor

    def __post_init__(self) -> None:
        self.raw, self.labels, self.output = Path(self.raw), Path(self.labels), Path(self.output)
        problems = []
        if self.resize not in RESIZE_MODES:
            problems.append(f"--resize must be one of {', '.join(RESIZE_MODES)}")
        if self.image_size < 8:
            problems.append("--image-size must be at least 8")
        if self.max_count < 1 or self.max_bytes < 1:
            problems.append("--max-count and --max-bytes must be at least 1")
        if self.processes < 0:
            problems.append("--processes must not be negative")
        if not 1 <= self.quality <= 100:
            problems.append("--quality must be in 1..100")
        if problems:
            raise UserError("; ".join(problems))
        self.processes = default_processes(self.processes)

    def settings(self) -> dict:
        return {
            k: v
            for k, v in asdict(self).items()
            if k in ("image_size", "resize", "quality", "max_count", "max_bytes")
        }


@dataclass
class ShardResult:
    raw_shard: str
    parts: dict[str, int] = field(default_factory=dict)  # training shard -> samples
    written: int = 0
    corrupt: int = 0  # images that could not be decoded
    left_out: int = 0  # samples the filter left out (or with no labels row)
    bad_uid: int = 0  # uids that are not safe tar member names
    missing: int = 0  # downloaded samples (per the raw Parquet) absent from the raw tar
    settings: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # SHA-1 of the raw and labels Parquet files
    phrases: dict[str, int] = field(default_factory=dict)  # label phrase -> images written


@dataclass
class PackStats:
    raw_shards: int = 0
    skipped: int = 0
    packed: int = 0
    samples: int = 0  # samples in all training shards
    written: int = 0  # samples written in this run
    corrupt: int = 0
    left_out: int = 0
    bad_uid: int = 0
    shards: int = 0


def prepare_image(data: bytes, size: int, mode: str) -> Image.Image:
    """Decode and resize one image; raises on anything that is not a readable image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    w, h = img.size
    if mode == "stretch":
        return img.resize((size, size), Image.BICUBIC)
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    if mode == "shorter_side":
        return img
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _read_raw_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """Every readable sample of a raw tar; a truncated or damaged tail ends the reading (the
    caller compares what was read with what the shard's Parquet says was downloaded)."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        pass
    return samples


def _tar_bytes(sizes: list[int]) -> int:
    """On-disk size of a tar holding files of these sizes: a 512-byte header per file, data
    padded to 512, two empty blocks at the end, all rounded up to tar's 10240-byte record."""
    body = sum(512 + -(-n // 512) * 512 for n in sizes) + 1024
    return -(-body // 10240) * 10240


class _Parts:
    """Writes a raw shard's samples into its training shards (``shard_name``: part 000, 001,
    ...), each bounded by a sample count and its real size.

    (webdataset's ShardWriter bounds payload bytes only; with small images the tar headers and
    padding make a file several times larger than asked.)
    """

    def __init__(self, folder: Path, raw_shard: str, max_count: int, max_bytes: int) -> None:
        self.folder, self.raw_shard = folder, raw_shard
        self.max_count, self.max_bytes = max_count, max_bytes
        self.counts: dict[str, int] = {}
        self.writer = None
        self.sizes: list[int] = []

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        import webdataset as wds

        new = [len(v) for v in fields.values()]
        full = self.writer is not None and (
            self.counts[self.name] >= self.max_count
            or _tar_bytes(self.sizes + new) > self.max_bytes
        )
        if self.writer is None or full:
            self.close()
            self.name = shard_name(self.raw_shard, len(self.counts))
            # An integer mtime keeps tarfile from adding a PAX header to every member (a float
            # mtime costs 1 KiB a file) and makes the shards reproducible byte for byte.
            self.writer = wds.TarWriter(str(self.folder / self.name), mtime=0)
            self.counts[self.name] = 0
            self.sizes = []
        self.writer.write({"__key__": key, **fields})
        self.sizes += new
        self.counts[self.name] += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> _Parts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PackShard:
    """Pack one raw shard (a picklable job, so raw shards can be packed in parallel)."""

    def __init__(self, cfg: PackConfig) -> None:
        self.cfg = cfg

    def __call__(self, todo: tuple[Path, dict[str, str]]) -> ShardResult:
        """``todo``: the raw shard's Parquet file and its ``shard_inputs``."""
        raw_parquet, inputs = todo
        cfg, sid = self.cfg, raw_parquet.stem
        labels_file = cfg.labels / f"{sid}.parquet"
        result = ShardResult(raw_shard=sid, settings=cfg.settings(), inputs=inputs)
        labels = {
            r["key"]: r
            for r in read_parquet(labels_file, ["uid", "key", "labels", "kept"]).to_pylist()
            if r["kept"]
        }
        samples = _read_raw_tar(cfg.raw / f"{sid}.tar")
        status = read_parquet(raw_parquet, ["key", "status"]).to_pylist()
        result.missing = sum(
            r["status"] == "success" and "jpg" not in samples.get(r["key"], {}) for r in status
        )
        if result.missing:  # not packed, not marked done: run_pack names it
            for stale in cfg.output.glob(shard_pattern(sid)):
                stale.unlink()  # parts of an earlier packing of this shard's older download
            (cfg.output / "_pack" / f"{sid}.json").unlink(missing_ok=True)
            return result
        tmp = cfg.output / f".pack-{sid}{TMP_SUFFIX}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with _Parts(tmp, sid, cfg.max_count, cfg.max_bytes) as sink:
            for key in sorted(samples):
                sample = samples[key]
                row = labels.get(key)
                if row is None or "jpg" not in sample:
                    result.left_out += 1
                    continue
                if not isinstance(row["uid"], str) or not SAFE_UID.fullmatch(row["uid"]):
                    result.bad_uid += 1
                    continue
                try:
                    img = prepare_image(sample["jpg"], cfg.image_size, cfg.resize)
                except Exception:  # any decoder error: PIL raises many kinds
                    result.corrupt += 1
                    continue
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=cfg.quality)
                caption = sample.get("txt", b"").decode("utf-8", "replace")
                meta = sample_json(row["labels"], caption, row["uid"], key)
                sink.write(row["uid"], {"jpg": buf.getvalue(), "json": meta})
                result.written += 1
                for phrase in set(row["labels"]):
                    result.phrases[phrase] = result.phrases.get(phrase, 0) + 1
        # Parts of an earlier, interrupted or overwritten packing of this raw shard go first.
        for stale in cfg.output.glob(shard_pattern(sid)):
            stale.unlink()
        for name, n in sink.counts.items():
            (tmp / name).replace(cfg.output / name)
            result.parts[name] = n
        shutil.rmtree(tmp, ignore_errors=True)
        write_json(cfg.output / "_pack" / f"{sid}.json", asdict(result))
        return result


def shard_inputs(raw_parquet: Path, labels_parquet: Path) -> dict[str, str]:
    """The identity of what a raw shard's training shards are made from."""
    return {"raw_sha1": file_digest(raw_parquet), "labels_sha1": file_digest(labels_parquet)}


def _marker(cfg: PackConfig, sid: str) -> dict | None:
    path = cfg.output / "_pack" / f"{sid}.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None  # unreadable: the shard is packed again


def run_pack(
    cfg: PackConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> PackStats:
    if not cfg.raw.is_dir():
        raise UserError(f"raw folder {cfg.raw} does not exist; run `synseg-data download` first")
    if not cfg.labels.is_dir():
        raise UserError(
            f"labels folder {cfg.labels} does not exist; run `synseg-data filter` first"
        )
    raw = [p for p in done_shards(cfg.raw) if (cfg.raw / f"{p.stem}.tar").exists()]
    if not raw:
        raise UserError(f"no finished shards in {cfg.raw}")
    missing = [p.stem for p in raw if not (cfg.labels / f"{p.stem}.parquet").exists()]
    if missing:
        raise UserError(
            f"{len(missing)} raw shard(s) have no labels manifest in {cfg.labels} (first {missing[0]}); "
            "run `synseg-data filter` first"
        )
    # _pack/ is made first, so a folder holding it is ours even when a first run was killed
    # before sizes.json was written.
    with output_dir(cfg.output, "_pack"):
        (cfg.output / "_pack").mkdir(exist_ok=True)
        clean_stale(cfg.output / "_pack")
        return _pack_all(cfg, raw, on_start, on_advance)


def _pack_all(
    cfg: PackConfig,
    raw: list[Path],
    on_start: Callable[[int], None] | None,
    on_advance: Callable[[int], None] | None,
) -> PackStats:
    stats = PackStats(raw_shards=len(raw))
    todo = []
    for p in raw:
        marker = _marker(cfg, p.stem)
        inputs = shard_inputs(p, cfg.labels / p.name)
        if marker is None or cfg.overwrite or "phrases" not in marker:
            todo.append((p, inputs))  # new, forced, or packed before markers held phrases
        elif marker.get("inputs") != inputs:
            todo.append((p, inputs))  # downloaded or filtered again since it was packed
        elif marker["settings"] != cfg.settings():
            raise UserError(
                f"{cfg.output} was packed with other settings ({marker['settings']}); "
                "pass --overwrite or choose another --output"
            )
        else:
            stats.skipped += 1
    if on_start:
        on_start(len(todo))
    results = []
    for r in run_jobs(PackShard(cfg), todo, distribution(cfg)):
        results.append(r)
        if on_advance:
            on_advance(1)
    incomplete = sorted((r for r in results if r.missing), key=lambda r: r.raw_shard)
    for r in results:
        if r.missing:
            continue
        stats.packed += 1
        stats.written += r.written
        stats.corrupt += r.corrupt
        stats.left_out += r.left_out
        stats.bad_uid += r.bad_uid

    sizes: dict[str, int] = {}
    phrases: dict[str, int] = {}
    for p in raw:
        marker = _marker(cfg, p.stem)
        if marker is not None and not marker.get("missing"):
            sizes.update(marker["parts"])
            for phrase, n in marker["phrases"].items():
                phrases[phrase] = phrases.get(phrase, 0) + n
    vocab = sorted(phrases)
    table = pa.table({"phrase": vocab, "images": [phrases[v] for v in vocab]})
    write_parquet(cfg.output / VOCABULARY, table)  # before sizes.json, which marks the end
    write_json(cfg.output / SIZES, dict(sorted(sizes.items())))
    stats.shards = len(sizes)
    stats.samples = sum(sizes.values())
    if incomplete:
        first = incomplete[0]
        raise UserError(
            f"{len(incomplete)} raw shard(s) lack samples their Parquet lists as downloaded "
            f"({first.raw_shard}.tar: {first.missing} missing), so they were not packed; "
            f"download them again (remove {cfg.raw / (first.raw_shard + '_stats.json')} and "
            "rerun `synseg-data download`), then rerun pack"
        )
    return stats
