"""Seconds from ``--resume`` to the first new training step, at 10% and at 90% of an epoch.

A resumed run starts each data worker at the position saved with the checkpoint: it reads the
samples that were in the shuffle buffer again and seeks into one shard. The baseline, in the
same run, is the same resume from a checkpoint without that position (as older checkpoints
are), which replays the epoch up to the checkpoint and decodes every image it skips. With the
saved position the two resume points should take the same time; replaying grows with the
point in the epoch.

    python benchmarks/resume.py                  # 4,000 samples in 40 shards, tiny preset
    python benchmarks/resume.py --samples 20000 --workers 2

The shards are synthetic (random 64 px JPEGs with labels), written by webdataset's TarWriter
into a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import webdataset as wds
from PIL import Image

from synseg.fsutil import write_parquet
from synseg.shards import VOCABULARY
from trainer.train.config import resolve
from trainer.train.loop import run_train


def make_shards(folder: Path, samples: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    words = [f"thing {i}" for i in range(200)]
    sizes, phrases = {}, {}
    for s in range(0, samples, per_shard):
        name = f"train-{s // per_shard:05d}-000.tar"
        n = min(per_shard, samples - s)
        with wds.TarWriter(str(folder / name), mtime=0) as tar:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
                labels = sorted({words[j] for j in rng.integers(0, len(words), 3)})
                for p in labels:
                    phrases[p] = phrases.get(p, 0) + 1
                meta = {"labels": labels, "caption": " and ".join(labels)}
                tar.write(
                    {"__key__": f"s{s + i:07d}", "jpg": buf.getvalue(), "json": json.dumps(meta)}
                )
        sizes[name] = n
    vocab = sorted(phrases)
    write_parquet(
        folder / VOCABULARY, pa.table({"phrase": vocab, "images": [phrases[p] for p in vocab]})
    )
    (folder / "sizes.json").write_text(json.dumps(sizes))


def seconds_to_first_step(cfg) -> float:
    t0 = time.perf_counter()
    first: list[float] = []

    def on_step(step, total, loss, rate) -> None:
        if not first:
            first.append(time.perf_counter() - t0)

    run_train(cfg, resume=True, on_step=on_step)
    return first[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--per-shard", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--buffer", type=int, default=200, help="shuffle buffer")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    batch = 16
    epoch = args.samples // batch
    points = {"10%": epoch // 10, "90%": epoch * 9 // 10}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "shards").mkdir()
        make_shards(tmp / "shards", args.samples, args.per_shard)

        def cfg(out: Path, steps: int, save_every: int):
            return resolve(
                "tiny",
                overrides=[
                    f"data.shards={tmp / 'shards'}",
                    f"run.output={out}",
                    f"data.batch_size={batch}",
                    f"data.workers={args.workers}",
                    f"data.shuffle_buffer={args.buffer}",
                    f"optim.max_steps={steps}",
                    f"run.save_every={save_every}",
                    "run.log_every=1000",
                ],
            )

        t = time.perf_counter()
        run_train(cfg(tmp / "full", points["90%"], points["10%"]))
        print(
            f"{args.samples} samples in {args.samples // args.per_shard} shards, batch {batch}, "
            f"{epoch} steps per epoch, {args.workers} workers, shuffle buffer {args.buffer} "
            f"(training to 90%: {time.perf_counter() - t:.0f} s)"
        )
        results = {}
        for label, step in points.items():
            for how in ("saved position", "replay (baseline)"):
                run = tmp / f"{label}-{how.split()[0]}"
                shutil.copytree(tmp / "full", run, ignore=shutil.ignore_patterns("text_cache"))
                (run / "checkpoints/latest").write_text(f"step-{step:07d}\n")
                for later in (run / "checkpoints").glob("step-*"):
                    if int(later.name.split("-")[1]) > step:
                        shutil.rmtree(later)
                if how.startswith("replay"):
                    (run / "checkpoints" / f"step-{step:07d}" / "stream.json").unlink()
                c = cfg(run, step + 1, 0)
                c.run.text_cache = str(tmp / "full" / "text_cache")
                results[(label, how)] = seconds_to_first_step(c)
        for how in ("saved position", "replay (baseline)"):
            a, b = results[("10%", how)], results[("90%", how)]
            print(
                f"  {how:<18} resume at 10%: {a:6.2f} s   at 90%: {b:6.2f} s   90%/10%: {b / a:.2f}x"
            )
        saved, replay = results[("90%", "saved position")], results[("90%", "replay (baseline)")]
        print(f"  at 90%, the saved position takes {saved / replay:.2f}x the replay's time")


if __name__ == "__main__":
    main()
