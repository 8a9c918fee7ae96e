"""Captions per second of extract-nouns against spaCy's full pipeline called per caption.

Both sides parse the same captions in the same process and must give the same phrases.
The baseline is what a first script does: ``nlp = spacy.load(...)`` (all components) and
``nlp(caption)`` per caption. extract-nouns loads only what noun chunks need and batches with
``nlp.pipe``, optionally in worker processes that return only the phrases.

    python benchmarks/nouns.py [--captions 2000] [--processes 1 2]
"""

from __future__ import annotations

import argparse
import time

from pipeline.nouns import DEFAULT_MODEL, Extractor, clean_caption, phrases_of, resolve_model
from pipeline.world import render


def captions(n: int) -> list[str]:
    return [clean_caption(render(7, "train", i, 32).caption) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=2000)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256)
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


if __name__ == "__main__":
    main()
