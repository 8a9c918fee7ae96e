"""pair: for each packed image, the images that share one of its entities (OVSegmentor's
cross-image mask consistency reads them).

An image's entities are the terms of an entity list (``--entities``: a file, one term a line;
the default is OVSegmentor's 100 frequent entities, ``pipeline/lists/ovsegmentor.txt``) that
occur as whole words, in any case, in its labels: the labels manifests' noun phrases the shards
carry, so no caption is parsed again. Each image then gets ``--partners`` draws (OVSegmentor's
code: 10): one of its entities, then another image that has it, both drawn with a generator
seeded by ``--seed`` and the image's uid, from lists sorted by uid. The pairs are therefore the
same on every rerun, whatever the number of processes or the distributor.

Reading the shards (each shard's image offsets and labels) is a per-shard job that runs in
local processes or as Ray Data actors (``--distributor ray``); the pairing itself is one pass on
the driver. The output, ``partners.parquet`` in the shards folder (``synseg.shards.PARTNERS``),
is written atomically with its settings and the ``sizes.json`` it was made from: a rerun with
the same settings on the same shards does nothing, a repacked folder is paired again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.distribute import distribution, run_jobs
from synseg.cores import default_processes
from synseg.entities import entity_pattern
from synseg.errors import UserError
from synseg.fsutil import check_done, file_digest, write_parquet
from synseg.shards import PARTNER_COLUMNS, PARTNERS, SIZES, read_sizes

LISTS = Path(__file__).parent / "lists"
OVSEGMENTOR_ENTITIES = LISTS / "ovsegmentor.txt"


@dataclass
class PairConfig:
    shards: Path = Path("data/shards")  # a folder written by pack
    entities: Path = OVSEGMENTOR_ENTITIES  # the entity list (one term a line)
    partners: int = 10  # partner draws per image (OVSegmentor's code: 10)
    seed: int = 0  # seed of the draws
    processes: int = 0  # shards read in parallel (0: one per core, at most 8)
    overwrite: bool = False  # pair again a folder paired with other settings
    distributor: str = "local"  # local processes or ray (Ray Data actors)
    ray_address: str = ""  # Ray cluster to join (empty: start a local Ray)
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per actor

    def __post_init__(self) -> None:
        self.shards, self.entities = Path(self.shards), Path(self.entities)
        problems = []
        if self.partners < 1:
            problems.append("--partners must be at least 1")
        if self.processes < 0:
            problems.append("--processes must not be negative")
        if problems:
            raise UserError("; ".join(problems))
        self.processes = default_processes(self.processes)


@dataclass
class PairStats:
    images: int = 0
    with_entity: int = 0  # images with at least one entity
    with_partner: int = 0  # images with at least one partner
    entities: dict[str, int] = field(default_factory=dict)  # entity -> images
    skipped: bool = False  # already paired with these settings
    output: str = ""


def read_entities(path: Path) -> list[str]:
    """An entity list: one term a line, ``#`` comments and blank lines skipped, lower-cased,
    first spelling kept."""
    if not path.is_file():
        raise UserError(f"entity list {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"entity list {path} is not UTF-8 text") from None
    terms = [x.strip().lower() for x in lines if x.strip() and not x.lstrip().startswith("#")]
    if not terms:
        raise UserError(f"entity list {path} holds no terms")
    return list(dict.fromkeys(terms))


def entities_in(labels: list[str], matcher: re.Pattern) -> list[str]:
    """The entities occurring as whole words in any of the labels, sorted."""
    found = {m.group(0).lower() for label in labels for m in matcher.finditer(label)}
    return sorted(found)


class ScanShard:
    """One training shard: (uid, offset, size, entities) of each sample's image."""

    def __init__(self, folder: Path, entities: list[str]) -> None:
        self.folder, self.entities = folder, entities

    def __call__(self, shard: str) -> list[tuple[str, str, int, int, list[str]]]:
        matcher = entity_pattern(self.entities)
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, list[str]] = {}
        try:
            with tarfile.open(self.folder / shard) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext == "jpg":
                        images[key] = (m.offset_data, m.size)
                    elif ext == "json":
                        meta = json.loads(tar.extractfile(m).read())
                        labels[key] = meta.get("labels") or []
        except (OSError, tarfile.TarError, ValueError) as e:
            raise UserError(f"cannot read {self.folder / shard}: {e}") from None
        return [
            (uid, shard, *images[uid], entities_in(labels.get(uid, []), matcher))
            for uid in sorted(images)
        ]


def draw_partners(
    rows: list[tuple[str, list[str]]], draws: int, seed: int
) -> dict[str, tuple[list[str], list[str]]]:
    """uid -> (partners, the entity each shares): ``draws`` draws of an entity of the image and
    of another image that has it."""
    having: dict[str, list[str]] = {}
    for uid, ents in sorted(rows):
        for e in ents:
            having.setdefault(e, []).append(uid)
    out = {}
    for uid, ents in rows:
        partners, shared = [], []
        rng = random.Random(f"{seed}/{uid}")
        for _ in range(draws if ents else 0):
            e = rng.choice(ents)
            others = having[e]
            if len(others) < 2:
                continue  # no other image has it
            j = rng.randrange(len(others) - 1)
            own = others.index(uid)
            partners.append(others[j + (j >= own)])  # any but itself
            shared.append(e)
        out[uid] = (partners, shared)
    return out


def run_pair(
    cfg: PairConfig,
    on_start: Callable[[int], None] | None = None,
    on_advance: Callable[[int], None] | None = None,
) -> PairStats:
    shards = sorted(read_sizes(cfg.shards))
    entities = read_entities(cfg.entities)
    out = cfg.shards / PARTNERS
    settings = {
        "partners": cfg.partners,
        "seed": cfg.seed,
        "entities_sha1": hashlib.sha1("\n".join(entities).encode()).hexdigest()[:12],
    }
    inputs = {"sizes": file_digest(cfg.shards / SIZES)}
    stats = PairStats(output=str(out))
    if check_done(out, settings, cfg.overwrite, inputs):
        stats.skipped = True
        return stats
    if on_start:
        on_start(len(shards))
    scanned = []
    for rows in run_jobs(ScanShard(cfg.shards, entities), shards, distribution(cfg)):
        scanned.extend(rows)
        if on_advance:
            on_advance(1)
    scanned.sort()
    pairs = draw_partners([(r[0], r[4]) for r in scanned], cfg.partners, cfg.seed)
    rows = [(*r, *pairs[r[0]]) for r in scanned]  # one row of PARTNER_COLUMNS per image
    types = (pa.string(), pa.string(), pa.int64(), pa.int64(), *[pa.list_(pa.string())] * 3)
    table = pa.table(
        {
            name: pa.array([r[i] for r in rows], kind)
            for i, (name, kind) in enumerate(zip(PARTNER_COLUMNS, types, strict=True))
        }
    )
    write_parquet(out, table, settings, inputs)
    stats.images = len(rows)
    stats.with_entity = sum(1 for r in rows if r[4])
    stats.with_partner = sum(1 for r in rows if r[5])
    counts = Counter(e for r in rows for e in r[4])
    stats.entities = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return stats
