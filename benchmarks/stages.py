"""Throughput and peak memory of extract-nouns, filter and pack: local with 1 and 2 processes,
Ray with 1 and 2 workers, on the same data; ratios against the 1-process local run.

The data are raw shards in img2dataset's layout, rendered from the synthetic world (its
CC12M-style captions, 64 px images): 50,000 captions by default, in shards of 5,000. Each run is
a fresh process (``synseg-data`` as a user runs it, Ray started by the command), and its peak
memory is the largest sum of resident memory over that process and all its descendants (the
Ray runs include Ray's own processes), sampled every 0.1 s from /proc. Extract-nouns also runs
on a tenth of the data, to show that its memory follows a shard, not the dataset.

The projection divides a dataset's captions by the measured 1-process rate times the cores,
assuming the scaling measured here from 1 to 2 workers holds further (it says how far it did).

    python benchmarks/stages.py                       # about 10 minutes on 2 cores
    python benchmarks/stages.py --captions 20000 --pack-images 4000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CC12M, LAION = 12_423_374, 400_000_000


def make_raw(folder: Path, captions: int, per_shard: int, images: int) -> None:
    """img2dataset's layout: NNNNN.parquet (+ _stats.json) and NNNNN.tar, with the images of
    the first ``images`` samples (0: captions only, all extract-nouns and filter read)."""
    import tarfile

    from pipeline.world import render
    from synseg.shards import uid_of

    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, captions, per_shard)):
        rows = []
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, captions)):
                sample = render(0, "train", i, 64)
                key, url = f"{i:09d}", f"http://127.0.0.1/train/{i:06d}.jpg"
                rows.append({"uid": uid_of(url), "caption": sample.caption, "url": url, "key": key})
                if i >= images:
                    continue
                buf = io.BytesIO()
                sample.image.save(buf, "JPEG", quality=90)
                meta = json.dumps({"uid": rows[-1]["uid"], "caption": sample.caption}).encode()
                for name, data in (
                    (f"{key}.jpg", buf.getvalue()),
                    (f"{key}.txt", sample.caption.encode()),
                    (f"{key}.json", meta),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        table = pa.Table.from_pylist(rows)
        table = table.append_column("status", pa.array(["success"] * len(rows), pa.string()))
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run(args: list[str]) -> tuple[float, int]:
    """(seconds, peak bytes) of one synseg-data command."""
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.1)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:1])} failed: {err.decode()[-1500:]}")
    return time.perf_counter() - t, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=50_000)
    ap.add_argument("--per-shard", type=int, default=5_000)
    ap.add_argument("--pack-images", type=int, default=10_000, help="images in the raw tars")
    ap.add_argument("--machines", type=int, nargs="*", default=[1, 8, 64])
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_raw(tmp / "raw", a.captions, a.per_shard, 0)
        small = tmp / "raw-small"
        make_raw(small, a.captions // 10, a.per_shard // 10, 0)
        # pack's input: raw shards with images, and their labels (made once, not timed)
        packed = tmp / "raw-pack"
        make_raw(packed, a.pack_images, max(1, a.pack_images // 4), a.pack_images)
        run(["extract-nouns", "--raw", str(packed), "--output", str(tmp / "pack-nouns")])
        run(["filter", "--nouns", str(tmp / "pack-nouns"), "--output", str(tmp / "pack-labels")])
        print(
            f"data: {a.captions} captions in {-(-a.captions // a.per_shard)} shards, "
            f"and {a.pack_images} images in 4 shards for pack ({time.perf_counter() - t:.0f} s to make)"
        )
        runs = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
        units = {"extract-nouns": a.captions, "filter": a.captions, "pack": a.pack_images}
        rates: dict[tuple[str, str, int], float] = {}
        for stage, count in units.items():
            print(f"{stage} ({count} {'images' if stage == 'pack' else 'captions'}):")
            for distributor, workers in runs:
                out = tmp / f"{stage}-{distributor}-{workers}"
                common = ["--processes", str(workers), "--distributor", distributor]
                if stage == "extract-nouns":
                    args = [stage, "--raw", str(tmp / "raw"), "--output", str(out)]
                elif stage == "filter":
                    args = [
                        stage,
                        "--nouns",
                        str(tmp / "extract-nouns-local-1"),
                        "--output",
                        str(out),
                    ]
                else:
                    args = [
                        stage,
                        "--raw",
                        str(packed),
                        "--labels",
                        str(tmp / "pack-labels"),
                    ]
                    args += ["--output", str(out), "--image-size", "48"]
                seconds, peak = run([*args, *common])
                rate = count / seconds
                rates[(stage, distributor, workers)] = rate
                base = rates[(stage, "local", 1)]
                what = (
                    f"{distributor}, {workers} {'process' if distributor == 'local' else 'worker'}"
                )
                print(
                    f"  {what + ('es' if distributor == 'local' and workers > 1 else 's' if workers > 1 else ''):<20}"
                    f" {rate:9.1f}/s  {rate / base:5.2f}x   peak memory {peak / 2**20:7.0f} MiB"
                )
        seconds, peak_small = run(
            [
                "extract-nouns",
                "--raw",
                str(small),
                "--output",
                str(tmp / "small"),
                "--processes",
                "1",
            ]
        )
        _, peak_full = run(
            [
                "extract-nouns",
                "--raw",
                str(tmp / "raw"),
                "--output",
                str(tmp / "again"),
                "--processes",
                "1",
                "--overwrite",
            ]
        )
        print(
            f"extract-nouns peak memory, 1 process: {a.captions // 10} captions "
            f"{peak_small / 2**20:.0f} MiB, {a.captions} captions {peak_full / 2**20:.0f} MiB "
            f"({peak_full / peak_small:.2f}x for 10x the data)"
        )
        per_core = rates[("extract-nouns", "local", 1)]
        scaling = rates[("extract-nouns", "ray", 2)] / rates[("extract-nouns", "ray", 1)]
        print(
            f"projection for extract-nouns at {per_core:.0f} captions/s per core "
            f"(Ray 2 workers / 1 worker here: {scaling:.2f}x), 16 cores a machine:"
        )
        for name, n in (("CC12M", CC12M), ("400M captions", LAION)):
            times = ", ".join(
                f"{m} machine{'s' if m > 1 else ''} {duration(n / (per_core * 16 * m))}"
                for m in a.machines
            )
            print(f"  {name:<14} {times}")


if __name__ == "__main__":
    main()
