"""Atomic writes and the small records that let a stage skip finished work on a rerun."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or an exception leaves no partial file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(path: Path, table: pa.Table, settings: dict[str, Any] | None = None) -> None:
    """Write ``table`` atomically, with the stage's settings stored in the file's metadata."""
    if settings is not None:
        meta = dict(table.schema.metadata or {})
        meta[b"synseg"] = json.dumps(settings, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_settings(path: Path) -> dict[str, Any] | None:
    """The settings a stage stored in a Parquet file it wrote, or None."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"synseg")
    return json.loads(raw) if raw else None


def check_done(path: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """True if ``path`` was already written with these settings, so the work can be skipped.

    An output made with other settings is an error unless ``overwrite`` is set: mixing shards
    made under two configurations would silently corrupt a dataset.
    """
    if not path.exists():
        return False
    if overwrite:
        return False
    previous = read_settings(path)
    if previous != settings:
        raise UserError(
            f"{path} was written with other settings ({describe_diff(previous, settings)}); "
            "pass --overwrite to redo it or choose another output folder"
        )
    return True


def describe_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "no settings recorded"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "none"


def read_record(artifact: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The stats recorded beside ``artifact`` (in ``<artifact>.json``) if both exist and it was
    made with ``config``; else None. Configs compare as JSON (a tuple equals its list)."""
    record = artifact.with_suffix(".json")
    if not (artifact.exists() and record.exists()):
        return None
    saved = json.loads(record.read_text())
    if saved.get("config") != json.loads(json.dumps(config)):
        return None
    return saved["stats"]


def write_record(artifact: Path, config: dict[str, Any], stats: dict[str, Any]) -> None:
    """Record the config and stats that made ``artifact``, for ``read_record``."""
    write_json(artifact.with_suffix(".json"), {"config": config, "stats": stats})


def ensure_output_dir(path: Path, marker_glob: str, what: str) -> None:
    """Create ``path``, refusing a non-empty folder that holds nothing this stage wrote."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder")
    if path.exists():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if entries and not any(path.glob(marker_glob)):
            raise UserError(
                f"{what} {path} already holds other files ({entries[0].name}, ...); "
                "choose an empty or new folder"
            )
    path.mkdir(parents=True, exist_ok=True)
