"""The partner images of the cross-image mask consistency, as ``synseg-data pair`` recorded
them beside the shards (``synseg.shards.PARTNERS``): each image's entities, up to N images
that share one of them, and where each image lies in its shard (so a partner is read by a seek,
not by streaming its shard). A step draws one partner per image from its list with the step's
own random generator, so a run and its resume see the same pairs."""

from __future__ import annotations

import io
import random
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from synseg.errors import UserError
from synseg.fsutil import read_parquet
from synseg.shards import PARTNER_COLUMNS, PARTNERS
from trainer.train.data import square_tensor


class PartnerTable:
    def __init__(self, shards: str | Path) -> None:
        self.folder = Path(shards)
        path = self.folder / PARTNERS
        if not path.exists():
            raise UserError(
                f"{path} does not exist: OVSegmentor reads each image's entities and partners "
                f"from it; run `synseg-data pair --shards {self.folder}` first"
            )
        t = read_parquet(path, list(PARTNER_COLUMNS)).to_pydict()
        self.row = {u: i for i, u in enumerate(t["uid"])}
        self.t = t

    def _at(self, uid: str) -> int:
        if uid not in self.row:
            raise UserError(
                f"image {uid} is not in {self.folder / PARTNERS}: the shards were packed again "
                "since; run `synseg-data pair` again"
            )
        return self.row[uid]

    def entities(self, uid: str) -> list[str]:
        return list(self.t["entities"][self._at(uid)])

    def draw(self, uid: str, rng: random.Random) -> tuple[str, str] | None:
        """(partner uid, shared entity) drawn from ``uid``'s list, or None if it has none."""
        i = self._at(uid)
        partners = self.t["partners"][i]
        if not partners:
            return None
        j = rng.randrange(len(partners))
        return partners[j], self.t["shared"][i][j]

    def image(self, uid: str, size: int) -> torch.Tensor:
        """(3, size, size) uint8: the image as the shard holds it, resized as the stream does."""
        i = self._at(uid)
        with open(self.folder / self.t["shard"][i], "rb") as f:
            f.seek(self.t["offset"][i])
            data = f.read(self.t["size"][i])
        return square_tensor(Image.open(io.BytesIO(data)).convert("RGB"), size)


def table(shards: str | Path) -> PartnerTable:
    """The folder's table, read once while the file stays the same."""
    path = Path(shards) / PARTNERS
    return _table(str(shards), path.stat().st_mtime_ns if path.exists() else 0)


@lru_cache(maxsize=2)
def _table(shards: str, _mtime: int) -> PartnerTable:
    return PartnerTable(shards)
