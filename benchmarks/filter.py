"""Phrases per second of the filter's matcher against a plain double loop over the same terms.

The baseline is Algorithm 2 written directly: for each phrase, ``any(term in phrase for term
in terms)``. The filter runs one Aho-Corasick automaton over a shard's phrases joined together.
Both must drop exactly the same phrases.

    python benchmarks/filter.py [--phrases 200000] [--extra-terms 200] [--drop-share 0.25]
"""

from __future__ import annotations

import argparse
import random
import time

from pipeline.filter import Matcher, read_terms, resolve_list
from pipeline.world import SYNONYMS

VISUAL = [s for syn in SYNONYMS.values() for s in syn] + [
    "dog",
    "cat",
    "bicycle",
    "street",
    "building",
    "bus",
    "woman",
    "man",
    "child",
    "table",
    "chair",
    "mountain",
    "river",
    "bridge",
    "flower",
    "garden",
    "kitchen",
    "window",
    "door",
    "road",
    "sky",
    "cloud",
    "boat",
    "horse",
    "bird",
    "cake",
    "plate",
    "shoes",
    "dress",
    "wall",
    "lamp",
    "sofa",
]


def make_phrases(n: int, terms: list[str], rng: random.Random, drop_share: float) -> list[str]:
    """Phrases of 1-3 words, each word an exclusion term with a probability that makes about
    ``drop_share`` of the phrases droppable (CC12M's captions keep most of their phrases)."""
    lengths = [1, 1, 1, 2, 2, 3]
    q = drop_share / (sum(lengths) / len(lengths))
    out = []
    for _ in range(n):
        words = [
            rng.choice(terms) if rng.random() < q else rng.choice(VISUAL)
            for _ in range(rng.choice(lengths))
        ]
        out.append(" ".join(words))
    return out


def double_loop(phrases: list[str], terms: list[str]) -> list[bool]:
    return [any(t in p for t in terms) for p in phrases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phrases", type=int, default=200_000)
    ap.add_argument(
        "--extra-terms", type=int, default=200, help="random extra terms beside generic.txt"
    )
    ap.add_argument(
        "--drop-share", type=float, default=0.25, help="share of phrases that hold a term"
    )
    args = ap.parse_args()

    rng = random.Random(0)
    terms = read_terms(resolve_list("generic"))
    letters = "abcdefghijklmnopqrstuvwxyz"
    terms += ["".join(rng.choices(letters, k=rng.randint(6, 9))) for _ in range(args.extra_terms)]
    phrases = make_phrases(args.phrases, terms, rng, args.drop_share)
    print(f"phrases: {len(phrases)}  terms: {len(terms)} (generic.txt + {args.extra_terms} random)")

    t = time.perf_counter()
    expected = double_loop(phrases, terms)
    base = len(phrases) / (time.perf_counter() - t)
    print(f"{'baseline: double loop (term in phrase)':44s} {base:12.0f} phrases/s  1.00x")

    for mode in ("substring", "word"):
        matcher = Matcher(dict.fromkeys(terms, "generic"), mode)
        t = time.perf_counter()
        hits = matcher.first_terms(phrases)
        rate = len(phrases) / (time.perf_counter() - t)
        if mode == "substring":
            assert [h is not None for h in hits] == expected, (
                "the matcher must drop what the loop drops"
            )
        print(f"{'filter: Aho-Corasick, ' + mode:44s} {rate:12.0f} phrases/s  {rate / base:.2f}x")
    print(f"dropped: {sum(expected)} of {len(phrases)} phrases")


if __name__ == "__main__":
    main()
