"""The contract between ``synseg-data pack``, which writes a shards folder, and the trainer,
which reads it; written once, here.

- ``train-RRRRR-PPP.tar``: WebDataset shards (``shard_name``); a sample is ``<uid>.jpg`` (the
  image, resized for training) and ``<uid>.json``, an object with ``SAMPLE_KEYS``: ``labels``
  (the filter's noun phrases, a list of strings), ``caption``, ``uid``, ``key`` (img2dataset's).
- ``uid``: the first 16 hex digits of the SHA-1 of the image's URL (``uid_of``), so the same
  row keeps its id across downloads; a member name must match ``SAFE_UID``.
- ``vocabulary.parquet`` (``VOCABULARY``): every label phrase of the shards, sorted, with the
  number of images that carry it (columns ``phrase``, ``images``).
- ``partners.parquet`` (``PARTNERS``, written by ``synseg-data pair`` after ``pack``, for
  methods that pair images by a shared entity): a row per sample with ``PARTNER_COLUMNS``:
  its ``uid``, the ``shard`` that holds it and its image member's ``offset`` and ``size`` in
  bytes, its ``entities``, and up to N ``partners`` (uids) with the entity each ``shared``.
- ``sizes.json`` (``SIZES``): every shard's name and sample count; written last, it marks the
  folder complete (``read_sizes`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from synseg.errors import UserError

SIZES = "sizes.json"
VOCABULARY = "vocabulary.parquet"
PARTNERS = "partners.parquet"
PARTNER_COLUMNS = ("uid", "shard", "offset", "size", "entities", "partners", "shared")
SAMPLE_KEYS = ("labels", "caption", "uid", "key")
# A uid becomes a tar member name (<uid>.jpg): no separators, no dots (WebDataset splits the
# key from the extension at the first dot), nothing a shell or a file system treats specially.
SAFE_UID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def uid_of(url: str) -> str:
    """A stable id for a row: the first 16 hex digits of the SHA-1 of its URL."""
    return hashlib.sha1(url.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def shard_name(raw_shard: str, part: int) -> str:
    """The training shard of raw shard ``raw_shard``'s part ``part``."""
    return f"train-{raw_shard}-{part:03d}.tar"


def shard_pattern(raw_shard: str) -> str:
    """A glob of every training shard of raw shard ``raw_shard``."""
    return f"train-{raw_shard}-*.tar"


def sample_json(labels: list[str], caption: str, uid: str, key: str) -> bytes:
    """A sample's ``.json``."""
    return json.dumps(dict(zip(SAMPLE_KEYS, (labels, caption, uid, key), strict=True))).encode()


def read_sizes(folder: Path) -> dict[str, int]:
    """``sizes.json`` of a shards folder: shard name -> sample count; one line if it is absent
    or not such a mapping."""
    path = Path(folder) / SIZES
    if not path.exists():
        raise UserError(f"{folder} has no {SIZES}: not a folder written by `synseg-data pack`")
    try:
        counts = json.loads(path.read_text())
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and n >= 0 for n in counts.values()
        ):
            raise ValueError("not a mapping of shard names to sample counts")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read: {e}") from None
    return counts
