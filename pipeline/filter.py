"""filter: Algorithm 2 of the SynSeg paper, plus the options a dataset builder needs.

A phrase is dropped if any term of the exclusion lists occurs in it: as a substring (the
paper's rule, the default) or as whole words (``match="word"``). Matching uses one
Aho-Corasick automaton over all terms, run once over a whole shard's phrases joined by
newlines, so the cost grows with the text, not with text x terms.

Every decision is kept for audit: each labels manifest row has the kept labels, the dropped
phrases with the term (and list) that dropped them, and whether the image was kept at all
(too few labels, or none of the frequent entities of an allow-list: OVSegmentor's CC4M rule).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import ahocorasick
import pyarrow as pa

from pipeline.distribute import distribution, run_jobs
from synseg.cores import default_processes
from synseg.errors import UserError
from synseg.fsutil import (
    check_done,
    file_digest,
    output_dir,
    read_parquet,
    read_settings,
    write_json,
    write_parquet,
)

MATCH_MODES = ("substring", "word")
DROPPED = pa.struct(
    [("phrase", pa.string()), ("reason", pa.string()), ("term", pa.string()), ("list", pa.string())]
)
SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("dropped", pa.list_(DROPPED)),
        ("kept", pa.bool_()),  # False: the image is left out of training
        ("reason", pa.string()),  # why an image was left out (null when kept)
    ]
)
POOL_MIN_BYTES = 64 << 20  # noun manifests below this size are filtered in this process
LISTS_DIR = Path(__file__).resolve().parent.parent / "exclusion_lists"


@dataclass
class FilterConfig:
    exclude: list[str] = field(
        default_factory=lambda: ["generic"]
    )  # exclusion lists: files or names in exclusion_lists/
    nouns: Path = Path("manifests/nouns")  # noun manifests (extract-nouns)
    output: Path = Path("manifests/labels")  # folder for the labels manifests
    match: str = "substring"  # substring (paper) or word
    min_labels: int = 1  # images with fewer labels are left out
    max_labels: int = 0  # keep at most this many labels per image, first-seen order (0: no cap)
    top_k: int = 0  # keep only images with a label among the K most frequent (0: off)
    allow: Path | None = None  # keep only images with a label in this file (one entity a line)
    processes: int = 0  # shards filtered in parallel (0: one per core, at most 8)
    overwrite: bool = False  # redo shards made with other settings
    distributor: str = "local"  # local processes or ray (Ray Data actors)
    ray_address: str = ""  # Ray cluster to join (empty: start a local Ray)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per actor

    def __post_init__(self) -> None:
        self.nouns, self.output = Path(self.nouns), Path(self.output)
        problems = []
        if self.match not in MATCH_MODES:
            problems.append(f"--match must be one of {', '.join(MATCH_MODES)}, not {self.match!r}")
        if min(self.min_labels, self.max_labels, self.top_k, self.processes) < 0:
            problems.append(
                "--min-labels, --max-labels, --top-k and --processes must not be negative"
            )
        if self.max_labels and self.min_labels > self.max_labels:
            problems.append("--min-labels is larger than --max-labels")
        if self.top_k and self.allow:
            problems.append("give --top-k or --allow, not both")
        if problems:
            raise UserError("; ".join(problems))
        self.processes = default_processes(self.processes)


@dataclass
class FilterStats:
    shards: int = 0
    skipped: int = 0
    written: int = 0
    images: int = 0
    images_kept: int = 0
    images_left_out: dict[str, int] = field(default_factory=dict)
    phrases: int = 0
    labels: int = 0
    dropped_by_term: dict[str, int] = field(default_factory=dict)  # the 20 most frequent


# --------------------------------------------------------------------------- lists


def resolve_list(name: str) -> Path:
    """A path as given, else NAME or NAME.txt in ./exclusion_lists or the shipped folder."""
    given = Path(name)
    if given.is_file():
        return given
    for folder in (Path("exclusion_lists"), LISTS_DIR):
        for candidate in (folder / name, folder / f"{name}.txt"):
            if candidate.is_file():
                return candidate
    raise UserError(
        f"exclusion list {name!r} not found (looked for a file and in exclusion_lists/)"
    )


def read_terms(path: Path) -> list[str]:
    """Terms of a list file: one a line, '#' comments, blank lines ignored, lower-cased."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"exclusion list {path} is not UTF-8 text") from None
    terms = []
    for line in text.splitlines():
        term = line.split("#", 1)[0].strip().lower()
        if term and term not in terms:
            terms.append(term)
    if not terms:
        raise UserError(f"exclusion list {path} holds no terms")
    return terms


WHOLE = "="  # a term written "=side" drops the phrase "side" only


class Matcher:
    """Finds, for each phrase, the first exclusion term it contains.

    A term written ``=word`` matches only a phrase that is exactly ``word``: the noun words
    that are noise alone ("side" of "on the left side", "part", "up" of "close-up") but would
    remove class names as substrings ("sidewalk", "cup")."""

    def __init__(self, terms: dict[str, str], match: str = "substring") -> None:
        """``terms`` maps each term to the name of the list it came from."""
        self.terms, self.word = terms, match == "word"
        self.whole = {t[len(WHOLE) :]: t for t in terms if t.startswith(WHOLE)}
        self.automaton = ahocorasick.Automaton()
        for term in terms:
            if not term.startswith(WHOLE):
                self.automaton.add_word(term, term)
        self.automaton.make_automaton()

    def first_terms(self, phrases: list[str]) -> list[str | None]:
        """The first term (by end position) found in each phrase, or None; a whole-phrase
        term first."""
        hits: list[str | None] = [self.whole.get(p) for p in phrases]
        if not phrases or not len(self.automaton):
            return hits
        # One pass over all phrases joined by '\n': terms never hold a newline, so a match
        # never spans two phrases, and '\n' is a word boundary for whole-word matching.
        text = "\n".join(phrases)
        starts, pos = [], 0
        for p in phrases:
            starts.append(pos)
            pos += len(p) + 1
        for end, term in self.automaton.iter(text):
            begin = end - len(term) + 1
            i = bisect.bisect_right(starts, begin) - 1
            if hits[i] is not None:
                continue
            if self.word and not (_boundary(text, begin - 1) and _boundary(text, end + 1)):
                continue
            hits[i] = term
        return hits


def _boundary(text: str, i: int) -> bool:
    return i < 0 or i >= len(text) or not text[i].isalnum()


def load_matcher(names: Iterable[str], match: str) -> tuple[Matcher, dict]:
    terms: dict[str, str] = {}
    identity = []
    for name in names:
        path = resolve_list(name)
        listed = read_terms(path)
        for term in listed:
            terms.setdefault(term, path.stem)
        identity.append(
            {"list": path.stem, "sha1": hashlib.sha1("\n".join(listed).encode()).hexdigest()[:12]}
        )
    if not terms:
        raise UserError("no exclusion list given (--exclude)")
    return Matcher(terms, match), {"lists": identity}


# --------------------------------------------------------------------------- the stage


def _nouns_shards(nouns: Path) -> list[Path]:
    if not nouns.is_dir():
        raise UserError(
            f"nouns folder {nouns} does not exist; run `synseg-data extract-nouns` first"
        )
    shards = sorted(nouns.glob("[0-9]*.parquet"))
    if not shards:
        raise UserError(f"no noun manifests (NNNNN.parquet) in {nouns}")
    return shards


def _apply_exclusion(
    matcher: Matcher, phrases: list[list[str]]
) -> tuple[list[list[str]], list[list[dict]]]:
    flat = [p for ps in phrases for p in ps]
    hits = matcher.first_terms(flat)
    labels, dropped, i = [], [], 0
    for ps in phrases:
        keep, gone = [], []
        for p in ps:
            term = hits[i]
            i += 1
            if term is None:
                keep.append(p)
            else:
                gone.append(
                    {"phrase": p, "reason": "exclude", "term": term, "list": matcher.terms[term]}
                )
        labels.append(keep)
        dropped.append(gone)
    return labels, dropped


def frequent_entities(shards: list[Path], matcher: Matcher, k: int) -> list[str]:
    """The K most frequent labels left after exclusion, over every shard (ties by name)."""
    counts: Counter[str] = Counter()
    for shard in shards:
        phrases = read_parquet(shard, ["phrases"])["phrases"].to_pylist()
        labels, _ = _apply_exclusion(matcher, phrases)
        for ls in labels:
            counts.update(ls)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def filter_table(
    table: pa.Table, matcher: Matcher, cfg: FilterConfig, allow: set[str] | None
) -> pa.Table:
    """Labels manifest rows for one noun manifest table."""
    labels, dropped = _apply_exclusion(matcher, table["phrases"].to_pylist())
    kept, reasons = [], []
    for ls, gone in zip(labels, dropped, strict=True):
        if cfg.max_labels and len(ls) > cfg.max_labels:
            gone.extend(
                {"phrase": p, "reason": "max_labels", "term": None, "list": None}
                for p in ls[cfg.max_labels :]
            )
            del ls[cfg.max_labels :]
        reason = None
        if len(ls) < cfg.min_labels:
            reason = "no_label" if not ls else "too_few_labels"
        elif allow is not None and not allow.intersection(ls):
            reason = "no_frequent_entity"
        kept.append(reason is None)
        reasons.append(reason)
    return pa.table(
        {
            "uid": table["uid"],
            "key": table["key"],
            "labels": pa.array(labels, pa.list_(pa.string())),
            "dropped": pa.array(dropped, pa.list_(DROPPED)),
            "kept": pa.array(kept, pa.bool_()),
            "reason": pa.array(reasons, pa.string()),
        },
        schema=SCHEMA,
    )


def run_filter(
    cfg: FilterConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> FilterStats:
    shards = _nouns_shards(cfg.nouns)
    matcher, identity = load_matcher(cfg.exclude, cfg.match)
    allow: set[str] | None = None
    if cfg.top_k:
        allow = set(frequent_entities(shards, matcher, cfg.top_k))
    elif cfg.allow:
        if not Path(cfg.allow).is_file():
            raise UserError(f"allow-list {cfg.allow} does not exist")
        allow = set(read_terms(Path(cfg.allow)))
    # The lists' names and the rules are settings (another one is refused without
    # --overwrite); the lists' contents and the allow-list are inputs, as the noun manifests
    # are: an edited list (a new release of generic.txt) makes the labels again.
    settings = {
        "lists": [entry["list"] for entry in identity["lists"]],
        "match": cfg.match,
        "min_labels": cfg.min_labels,
        "max_labels": cfg.max_labels,
        "top_k": cfg.top_k,
        "allow": bool(cfg.allow),
    }
    terms = {
        **identity,
        "allow_sha1": hashlib.sha1("\n".join(sorted(allow)).encode()).hexdigest()[:12]
        if allow
        else None,
    }
    with output_dir(cfg.output, "*.parquet"):
        if allow is not None:
            write_json(cfg.output / "_allow.json", sorted(allow))
        return _filter_all(cfg, shards, matcher, allow, settings, terms, on_start, on_advance)


class FilterShard:
    """Filter one noun manifest (a picklable job, so shards can be filtered in parallel).

    Returns (whether it was written, the output columns the summary needs).
    """

    def __init__(
        self,
        cfg: FilterConfig,
        matcher: Matcher,
        allow: set[str] | None,
        settings: dict,
        terms: dict,
    ) -> None:
        self.cfg, self.matcher, self.allow, self.settings = cfg, matcher, allow, settings
        self.terms = terms

    def __call__(self, shard: Path) -> tuple[bool, pa.Table]:
        cfg, target = self.cfg, self.cfg.output / shard.name
        if target.exists() and _older_record(read_settings(target)) == self.settings:
            target.unlink()  # the same lists and rules, recorded the older way: made again
        # A noun manifest made again (a re-download, another model), or an edited exclusion
        # or allow-list, makes its labels stale.
        inputs = {"nouns_sha1": file_digest(shard), **self.terms}
        if check_done(target, self.settings, cfg.overwrite, inputs):
            return False, read_parquet(target, ["labels", "dropped", "kept", "reason"])
        table = read_parquet(shard, ["uid", "key", "phrases"])
        out = filter_table(table, self.matcher, cfg, self.allow)
        write_parquet(target, out, self.settings, inputs)
        return True, out.select(["labels", "dropped", "kept", "reason"])


def _older_record(settings: dict | None) -> dict | None:
    """Settings recorded before the lists' contents were inputs (each list with its SHA-1,
    an ``allow_sha1``), in today's form; None for any other record."""
    lists = (settings or {}).get("lists")
    if not lists or not all(isinstance(x, dict) for x in lists) or "allow_sha1" not in settings:
        return None
    older = {k: v for k, v in settings.items() if k != "allow_sha1"}
    older["lists"] = [x.get("list") for x in lists]
    older["allow"] = bool(settings["allow_sha1"]) and not settings.get("top_k")
    return older


def _filter_all(
    cfg: FilterConfig,
    shards: list[Path],
    matcher: Matcher,
    allow: set[str] | None,
    settings: dict,
    terms: dict,
    on_start: Callable[[int], None] | None,
    on_advance: Callable[[int], None] | None,
) -> FilterStats:
    stats = FilterStats(shards=len(shards))
    left_out: Counter[str] = Counter()
    by_term: Counter[str] = Counter()
    if on_start:
        on_start(len(shards))
    job = FilterShard(cfg, matcher, allow, settings, terms)
    # Matching is fast (millions of phrases/s): worker processes pay off only on large inputs,
    # where reading and writing Parquet dominates; small ones run here.
    dist = distribution(cfg)
    if dist.distributor == "local" and sum(p.stat().st_size for p in shards) <= POOL_MIN_BYTES:
        dist.workers = 1
    for written, out in run_jobs(job, shards, dist):
        stats.written += written
        stats.skipped += not written
        stats.images += out.num_rows
        stats.images_kept += sum(out["kept"].to_pylist())
        left_out.update(r for r in out["reason"].to_pylist() if r)
        stats.labels += sum(len(ls) for ls in out["labels"].to_pylist())
        for gone in out["dropped"].to_pylist():
            stats.phrases += len(gone)
            by_term.update(d["term"] for d in gone if d["term"])
        if on_advance:
            on_advance(1)
    stats.phrases += stats.labels
    stats.images_left_out = dict(left_out.most_common())
    stats.dropped_by_term = dict(by_term.most_common(20))
    return stats
