"""Training data: WebDataset shards from ``synseg-data pack``, as a readable list of steps.

    shard list -> shuffle shards (seed, epoch) -> split by node -> split by worker
    -> tar samples -> shuffle samples -> decode + check (bad samples dropped, counted)
    -> batch

Each rank reads its share of the shards and loops over it until the epoch's fixed number of
batches is reached, so every rank takes the same number of steps (no DDP hang on uneven
shards). The stream is a pure function of (seed, epoch, rank, worker). Every batch carries the
stream's position after it: the shard and sample to read next, the shuffle buffer (as sample
positions) and the random state. A checkpoint stores the latest position of each worker, and a
resumed run starts each worker there: it reads the buffered samples again and seeks into one
shard, whatever the point in the epoch, and continues exactly as an uninterrupted run.

Shards are read with ``tarfile`` by random access (``read_shard``) rather than streamed, so a
resume can pass over the start of a shard by its headers alone.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synseg.errors import UserError
from synseg.fsutil import read_parquet
from synseg.shards import VOCABULARY, read_sizes


@dataclass
class ShardSet:
    urls: list[str]
    samples: int
    sizes: dict[str, int] | None = None  # samples of each shard, by url (from sizes.json)


def square_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """A decoded RGB image as the stream gives it: (3, size, size) uint8, resized (bicubic) if
    it is not that size."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def find_shards(folder: str | Path) -> ShardSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"shards folder {folder} does not exist; run `synseg-data pack` first")
    counts = read_sizes(folder)
    # Every shard sizes.json counts must be there: the epoch's length and the stream's
    # positions come from those counts, so a lost shard would silently shorten every epoch.
    lost = sorted(name for name, n in counts.items() if n > 0 and not (folder / name).is_file())
    if lost:
        raise UserError(
            f"{folder} lacks {len(lost)} of the shards its sizes.json counts ({', '.join(lost[:3])}"
            f"{', ...' if len(lost) > 3 else ''}); pack again or restore them"
        )
    sizes_by_url = {str(folder / name): n for name, n in counts.items() if n > 0}
    if not sizes_by_url:
        raise UserError(f"{folder} holds no training samples")
    return ShardSet(urls=list(sizes_by_url), samples=sum(counts.values()), sizes=sizes_by_url)


def valid_labels(labels: object) -> bool:
    """A sample's labels: a non-empty list of non-blank strings."""
    return (
        isinstance(labels, list)
        and len(labels) > 0
        and all(isinstance(x, str) and x.strip() for x in labels)
    )


_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's sample key and suffix
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped


def read_shard(
    path: str, first: int = 0, bad: list[int] | None = None
) -> Iterator[tuple[int, dict]]:
    """The samples of one WebDataset tar as (index, {suffix: bytes}), from sample ``first`` on.

    Members are grouped into samples by key as webdataset does. Earlier samples are passed over
    by their tar headers alone, without reading their bytes, so starting deep inside a shard
    costs a seek per member, not a decode. A damaged tar ends the shard and counts one bad
    sample in ``bad[0]``.
    """
    index, key, sample = -1, None, None
    try:
        with tarfile.open(path, "r:") as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # headers are used once; do not keep them
                match = _KEY.match(info.name)
                if not info.isreg() or not match or _META.match(info.name):
                    continue
                prefix, suffix = match.group(1), match.group(2).lower()
                if prefix != key:
                    if sample is not None and index >= first:
                        yield index, sample
                    index, key, sample = index + 1, prefix, {}
                if index < first:
                    continue
                if suffix in sample:  # a duplicate member: webdataset skips it too
                    if bad is not None:
                        bad[0] += 1
                    continue
                sample[suffix] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError):
        if bad is not None:
            bad[0] += 1
        return
    if sample is not None and index >= first:
        yield index, sample


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class _Cursor:
    """Where one (rank, worker) stream stands between two batches: the cycle over its shards,
    the next sample to read (shard, index), the shuffle buffer (by sample position) and the
    random state. Saved with a checkpoint, it restarts the stream exactly there."""

    def __init__(self, cycle: int = 0) -> None:
        self.cycle, self.shard, self.sample = cycle, 0, 0
        self.buffer: list[tuple[tuple[int, int], dict]] = []
        self.draining = False

    def snapshot(self, rng: random.Random, shards_id: str) -> dict:
        version, internal, gauss = rng.getstate()
        return {
            "cycle": self.cycle,
            "next": [self.shard, self.sample],
            "buffer": [list(k) for k, _ in self.buffer],
            "draining": self.draining,
            "rng": [version, list(internal), gauss],
            "shards": shards_id,
        }


class ShardStream(torch.utils.data.IterableDataset):
    """Batches: images (B, 3, S, S) in [0, 1], labels list[list[str]], captions, the samples'
    uids, bad count, and
    the stream's position after the batch (``worker``, ``state``) for an O(1) resume."""

    def __init__(
        self,
        shards: ShardSet,
        image_size: int,
        batch_size: int,
        max_labels: int,
        seed: int,
        shuffle_buffer: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.shards, self.size, self.batch = shards, image_size, batch_size
        self.max_labels, self.seed, self.buffer = max_labels, seed, shuffle_buffer
        self.rank, self.world = rank, world
        self.epoch = 0
        self.resume: dict | None = None

    def set_epoch(self, epoch: int, resume: dict | None = None) -> None:
        """Start ``epoch``; ``resume`` = {"offset": batches taken mod workers, "workers": {worker:
        state}} continues it where a checkpoint left it instead of from its start."""
        self.epoch, self.resume = epoch, resume

    # ---------------------------------------------------------------- steps

    def _my_shards(self, cycle: int, worker: int, workers: int) -> list[str]:
        urls = list(self.shards.urls)
        random.Random(f"{self.seed}/{self.epoch}/{cycle}").shuffle(urls)  # same order on every rank
        if len(urls) >= self.world:
            urls = urls[self.rank :: self.world]  # split by node
        else:  # fewer shards than ranks: every rank reads all, in its own order
            random.Random(f"{self.seed}/{self.epoch}/{cycle}/{self.rank}").shuffle(urls)
        return urls[worker::workers] if len(urls) >= workers else urls  # split by worker

    def check_resume(self, resume: dict | None, workers: int) -> None:
        """One line, before any worker starts, for saved positions that do not fit these
        shards (a damaged or hand-edited ``stream.json``): a shard or sample past the end."""
        if not resume or self.shards.sizes is None:
            return
        for worker, state in resume["workers"].items():
            urls = self._my_shards(state["cycle"], int(worker), workers)
            size = [self.shards.sizes.get(u, 0) for u in urls]
            si, idx = state["next"]
            fits = si == len(urls) and idx == 0 or si < len(urls) and idx <= size[si]
            fits = fits and all(s < len(urls) and 0 <= i < size[s] for s, i in state["buffer"])
            if not fits:
                raise UserError(
                    f"the checkpoint's stream.json puts worker {worker} past the end of its "
                    "shards; delete that file to replay the epoch instead"
                )

    def _read(self, urls: list[str], cur: _Cursor, bad: list[int]) -> Iterator[tuple]:
        for si in range(cur.shard, len(urls)):
            first = cur.sample if si == cur.shard else 0
            cur.shard, cur.sample = si, first
            for idx, sample in read_shard(urls[si], first, bad):
                cur.sample = idx + 1
                yield (si, idx), sample
        cur.shard, cur.sample = len(urls), 0

    def _shuffled(self, reader: Iterator[tuple], cur: _Cursor, rng: random.Random) -> Iterator:
        buf = cur.buffer
        if not cur.draining:
            for item in reader:
                buf.append(item)
                if len(buf) >= self.buffer:
                    yield buf.pop(rng.randrange(len(buf)))
            rng.shuffle(buf)
            cur.draining = True
        while buf:
            yield buf.pop(0)

    def _restore(self, state: dict, urls: list[str], shards_id: str, rng: random.Random) -> _Cursor:
        if state["shards"] != shards_id:
            raise UserError(
                "the shards differ from those the checkpoint was reading; "
                "resume with the same data.shards folder"
            )
        cur = _Cursor(state["cycle"])
        cur.shard, cur.sample = state["next"]
        cur.draining = state["draining"]
        version, internal, gauss = state["rng"]
        rng.setstate((version, tuple(internal), gauss))
        wanted: dict[int, set[int]] = {}
        for si, idx in state["buffer"]:
            wanted.setdefault(si, set()).add(idx)
        found: dict[tuple[int, int], dict] = {}
        for si, idxs in wanted.items():
            for idx, sample in read_shard(urls[si], min(idxs)):
                if idx in idxs:
                    found[(si, idx)] = sample
                if idx >= max(idxs):
                    break
        keys = [tuple(k) for k in state["buffer"]]
        if any(k not in found for k in keys):
            raise UserError("a shard no longer holds the samples the checkpoint had buffered")
        cur.buffer = [(k, found[k]) for k in keys]
        return cur

    def _decode(
        self, sample: dict, rng: random.Random
    ) -> tuple[torch.Tensor, list[str], str, str] | None:
        try:
            meta = json.loads(sample["json"])
            labels, caption = meta["labels"], meta.get("caption", "")
            uid = str(meta.get("uid", sample.get("__key__", "")))
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        except Exception:  # a corrupt image or json: skip it, the batch counts it
            return None
        if not valid_labels(labels):
            return None  # a string ("tree" would train on t, r, e), numbers, nulls, blanks
        if not isinstance(caption, str):
            caption = ""
        if len(labels) > self.max_labels:
            labels = rng.sample(labels, self.max_labels)
        return square_tensor(img, self.size), labels, caption, uid

    def __iter__(self) -> Iterator[dict]:
        wid, workers = _worker()
        resume = self.resume or {"offset": 0, "workers": {}}
        # After a resume the loader's worker 0 must produce the batch the next worker in line
        # would have: workers take their role (shards, random draws) from the offset.
        worker = (wid + resume["offset"]) % workers
        state = resume["workers"].get(str(worker))
        for cycle in itertools.count(state["cycle"] if state else 0):
            rng = random.Random(f"{self.seed}/{self.epoch}/{cycle}/{self.rank}/{worker}")
            urls = self._my_shards(cycle, worker, workers)
            shards_id = hashlib.sha1("\n".join(Path(u).name for u in urls).encode()).hexdigest()[
                :16
            ]
            bad = [0]
            produced = state is not None  # a resumed cycle has produced batches already
            cur = self._restore(state, urls, shards_id, rng) if state else _Cursor(cycle)
            state = None
            images, labels, captions, uids = [], [], [], []
            for _key, s in self._shuffled(self._read(urls, cur, bad), cur, rng):
                item = self._decode(s, rng)
                if item is None:
                    bad[0] += 1
                    continue
                images.append(item[0])
                labels.append(item[1])
                captions.append(item[2])
                uids.append(item[3])
                if len(images) == self.batch:
                    produced = True
                    yield {
                        "images": torch.stack(images).float() / 255,
                        "labels": labels,
                        "captions": captions,
                        "uids": uids,
                        "bad": bad[0],
                        "worker": worker,
                        "state": cur.snapshot(rng, shards_id),
                    }
                    images, labels, captions, uids, bad[0] = [], [], [], [], 0
            if not produced and cycle > 0:
                raise UserError(
                    f"shards of rank {self.rank} hold fewer usable samples than one batch "
                    f"({self.batch}); lower data.batch_size"
                )


def loader(
    stream: ShardStream, workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


class Vocabulary:
    """The shards' label phrases (``vocabulary.parquet`` from ``synseg-data pack``): what the
    trainer encodes before the first step and where absent-category negatives come from."""

    def __init__(self, shards_folder: str | Path) -> None:
        path = Path(shards_folder) / VOCABULARY
        self.phrases: list[str] = (
            read_parquet(path, ["phrase"]).column("phrase").to_pylist() if path.exists() else []
        )
        self.position = {p: i for i, p in enumerate(self.phrases)}

    def absent(self, labels: list[list[str]], k: int, rng: random.Random) -> list[str] | None:
        """k phrases per image drawn from the vocabulary, none of them the image's own labels
        (None if the vocabulary is too small for that)."""
        picks: list[str] = []
        n = len(self.phrases)
        for ls in labels:
            own = {self.position[p] for p in ls if p in self.position}
            if n - len(own) < k:
                return None
            chosen: list[int] = []
            while len(chosen) < k:
                j = rng.randrange(n)
                if j not in own and j not in chosen:
                    chosen.append(j)
            picks += [self.phrases[j] for j in chosen]
        return picks
