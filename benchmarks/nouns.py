"""Captions per second of extract-nouns against spaCy's full pipeline called per caption.

Both sides parse the same captions in the same process and must give the same phrases.
The baseline is what a first script does: ``nlp = spacy.load(...)`` (all components) and
``nlp(caption)`` per caption, its load included. extract-nouns loads only what noun chunks need
and batches with ``nlp.pipe``, in worker processes (returning only the phrases) when the input
pays for starting them. Two measures: the Extractor alone (warmed up, per process count), and
the whole command (``run_extract_nouns`` over raw shards of ``--shard-sizes`` captions, model
loads and worker start-up included) against the baseline on the same captions.

    python benchmarks/nouns.py [--captions 2000] [--processes 1 2] [--shard-sizes 1500 50000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.nouns import DEFAULT_MODEL, Extractor, clean_caption, phrases_of, resolve_model
from pipeline.world import render


def captions(n: int) -> list[str]:
    return [clean_caption(render(7, "train", i, 32).caption) for i in range(n)]


def raw_shard(folder: Path, texts: list[str]) -> None:
    """One finished img2dataset shard (its Parquet and _stats.json) holding ``texts``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    pq.write_table(
        pa.table(
            {
                "uid": [f"{i:016x}" for i in range(n)],
                "key": [f"00000{i:04d}" for i in range(n)],
                "caption": texts,
                "status": ["success"] * n,
                "error_message": [None] * n,
            }
        ),
        folder / "00000.parquet",
    )
    (folder / "00000_stats.json").write_text(json.dumps({"count": n}))


def whole_command(sizes: list[int]) -> None:
    """The command end to end against the per-caption loop (its model load included)."""
    import spacy

    from pipeline.nouns import NounsConfig, run_extract_nouns
    from synseg.cores import default_processes

    for n in sizes:
        texts = captions(n)
        t = time.perf_counter()
        full = spacy.load(resolve_model(DEFAULT_MODEL))
        expected = [phrases_of(full(c)) for c in texts]
        base = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            raw, out = Path(tmp) / "raw", Path(tmp) / "nouns"
            raw.mkdir()
            raw_shard(raw, texts)
            t = time.perf_counter()
            stats = run_extract_nouns(NounsConfig(raw=raw, output=out))
            ours = time.perf_counter() - t
            import pyarrow.parquet as pq

            got = pq.read_table(out / "00000.parquet")["phrases"].to_pylist()
        assert got == expected and stats.captions == n
        print(
            f"whole command, {n:6d} captions ({default_processes(0)} processes allowed): "
            f"baseline {base:6.1f} s, extract-nouns {ours:6.1f} s  {base / ours:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-sizes", type=int, nargs="*", default=[1500, 50000])
    args = ap.parse_args()

    import spacy

    texts = captions(args.captions)
    full = spacy.load(resolve_model(DEFAULT_MODEL))
    t = time.perf_counter()
    expected = [phrases_of(full(c)) for c in texts]
    base = len(texts) / (time.perf_counter() - t)
    print(f"captions: {len(texts)}  model: {DEFAULT_MODEL}  full pipeline: {full.pipe_names}")
    print(f"{'baseline: nlp(text) per caption, full pipeline':58s} {base:8.0f} captions/s  1.00x")

    for p in args.processes:
        with Extractor(DEFAULT_MODEL, p, args.batch_size) as extractor:
            extractor(
                texts[: 2 * args.batch_size * p]
            )  # warm up: start the workers, load the model
            t = time.perf_counter()
            got = extractor(texts)
            rate = len(texts) / (time.perf_counter() - t)
        assert got == expected, "extract-nouns must give the same phrases as the baseline"
        label = f"extract-nouns: {'+'.join(extractor.nlp.pipe_names)}, {p} process(es)"
        print(f"{label:58s} {rate:8.0f} captions/s  {rate / base:.2f}x")
    whole_command(args.shard_sizes)


if __name__ == "__main__":
    main()
