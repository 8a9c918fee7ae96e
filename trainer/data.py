"""Training data: WebDataset shards from ``synseg-data pack``, as a readable list of steps.

    shard list -> shuffle shards (seed, epoch) -> split by node -> split by worker
    -> tar samples -> shuffle samples -> decode + check (bad samples dropped, counted)
    -> batch

Each rank reads its share of the shards and loops over it until the epoch's fixed number of
batches is reached, so every rank takes the same number of steps (no DDP hang on uneven
shards). The stream is a pure function of (seed, epoch, rank, worker): a resumed run replays
it and skips the batches already trained on.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import UserError


@dataclass
class ShardSet:
    urls: list[str]
    samples: int


def find_shards(folder: str | Path) -> ShardSet:
    folder = Path(folder)
    sizes = folder / "sizes.json"
    if not folder.is_dir():
        raise UserError(f"shards folder {folder} does not exist; run `synseg-data pack` first")
    if not sizes.exists():
        raise UserError(f"{folder} has no sizes.json: not a folder written by `synseg-data pack`")
    counts = json.loads(sizes.read_text())
    urls = [str(folder / name) for name, n in counts.items() if n > 0 and (folder / name).exists()]
    if not urls:
        raise UserError(f"{folder} holds no training samples")
    return ShardSet(urls=urls, samples=sum(counts.values()))


def valid_labels(labels: object) -> bool:
    """A sample's labels: a non-empty list of non-blank strings."""
    return (
        isinstance(labels, list)
        and len(labels) > 0
        and all(isinstance(x, str) and x.strip() for x in labels)
    )


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class ShardStream(torch.utils.data.IterableDataset):
    """Batches: images (B, 3, S, S) in [0, 1], labels list[list[str]], captions, bad count."""

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # ---------------------------------------------------------------- steps

    def _my_shards(self, cycle: int) -> list[str]:
        urls = list(self.shards.urls)
        random.Random(f"{self.seed}/{self.epoch}/{cycle}").shuffle(urls)  # same order on every rank
        if len(urls) >= self.world:
            urls = urls[self.rank :: self.world]  # split by node
        else:  # fewer shards than ranks: every rank reads all, in its own order
            random.Random(f"{self.seed}/{self.epoch}/{cycle}/{self.rank}").shuffle(urls)
        worker, workers = _worker()
        return urls[worker::workers] if len(urls) >= workers else urls  # split by worker

    def _samples(self, urls: list[str], bad: list[int]) -> Iterator[dict]:
        import webdataset as wds

        def skip(exn: Exception) -> bool:
            bad[0] += 1
            return True  # go on with the next sample

        yield from wds.tarfile_to_samples(handler=skip)([{"url": u} for u in urls])

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buf: list[dict] = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def _decode(
        self, sample: dict, rng: random.Random
    ) -> tuple[torch.Tensor, list[str], str] | None:
        try:
            meta = json.loads(sample["json"])
            labels, caption = meta["labels"], meta.get("caption", "")
            img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        except Exception:  # a corrupt image or json: skip it, the batch counts it
            return None
        if not valid_labels(labels):
            return None  # a string ("tree" would train on t, r, e), numbers, nulls, blanks
        if not isinstance(caption, str):
            caption = ""
        if len(labels) > self.max_labels:
            labels = rng.sample(labels, self.max_labels)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)
        return x, labels, caption

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        for cycle in itertools.count():  # loop over this rank's share until the caller stops
            rng = random.Random(f"{self.seed}/{self.epoch}/{cycle}/{self.rank}/{worker}")
            bad = [0]
            images, labels, captions = [], [], []
            produced = False
            for s in self._shuffled(self._samples(self._my_shards(cycle), bad), rng):
                item = self._decode(s, rng)
                if item is None:
                    bad[0] += 1
                    continue
                images.append(item[0])
                labels.append(item[1])
                captions.append(item[2])
                if len(images) == self.batch:
                    produced = True
                    yield {
                        "images": torch.stack(images).float() / 255,
                        "labels": labels,
                        "captions": captions,
                        "bad": bad[0],
                    }
                    images, labels, captions, bad[0] = [], [], [], 0
            if not produced and cycle > 0:
                raise UserError(
                    f"shards of rank {self.rank} hold fewer usable samples than one batch "
                    f"({self.batch}); lower data.batch_size"
                )


def loader(stream: ShardStream, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
