"""Atomic writes and the small records that let a stage skip finished work on a rerun."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synseg.errors import UserError


def file_mode() -> int:
    """The mode a plain open() would give a new file under the current umask."""
    try:  # Linux states it without changing it (os.umask can only be read by setting it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


TMP_SUFFIX = ".tmp"  # every temporary name starts with "." and ends with this


@contextlib.contextmanager
def atomic_path(path: Path, keep_mode: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or an exception leaves no partial file under the final name; a temporary file
    left by a killed process is removed by ``clean_stale`` on the next run. The file gets the
    mode the umask gives (writers such as safetensors make theirs 0600, and shared storage
    should stay readable), unless ``keep_mode``: a hard link, whose mode is its source's.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not keep_mode:
            os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def clean_stale(folder: Path) -> None:
    """Remove temporaries (``.*.tmp`` files and folders) a killed run left in ``folder``.

    One run per output folder at a time is assumed.
    """
    if not folder.is_dir():
        return
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def output_dir(path: Path, marker_glob: str) -> Iterator[Path]:
    """A stage's output folder for the block: refused if it holds files but nothing matching
    ``marker_glob`` (so not this stage's), created if missing, cleared of the temporaries a
    killed run left; if the block fails and a folder it created is still empty, removed again,
    so a refused or failed first run leaves nothing behind."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} is a file, not a folder")
    if path.exists():
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if entries and not any(path.glob(marker_glob)):
            raise UserError(
                f"output {path} already holds other files ({entries[0].name}, ...); "
                "choose an empty or new folder"
            )
    existed = path.exists()
    path.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    try:
        yield path
    except BaseException:
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


def file_digest(path: Path) -> str:
    """SHA-1 of a file's bytes: the identity of a stage's input, recorded in its output."""
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file, turning a damaged or foreign file into one clear line."""
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable Parquet file ({first})") from None
    return table


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(
    path: Path,
    table: pa.Table,
    settings: dict[str, Any] | None = None,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Write ``table`` atomically, with the stage's settings and the identity of the inputs it
    was made from stored in the file's metadata."""
    meta = dict(table.schema.metadata or {})
    if settings is not None:
        meta[b"synseg"] = json.dumps(settings, sort_keys=True).encode()
    if inputs is not None:
        meta[b"synseg_inputs"] = json.dumps(inputs, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_settings(path: Path, key: bytes = b"synseg") -> dict[str, Any] | None:
    """The settings (or, with ``key=b"synseg_inputs"``, the input identity) a stage stored in a
    Parquet file it wrote, or None."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return None  # a damaged output: treated like one made with unknown settings
    raw = meta.get(key)
    return json.loads(raw) if raw else None


def check_done(
    path: Path, settings: dict[str, Any], overwrite: bool, inputs: dict[str, Any] | None = None
) -> bool:
    """True if ``path`` was already written with these settings from these inputs, so the work
    can be skipped.

    An output made with other settings is an error unless ``overwrite`` is set: mixing shards
    made under two configurations would silently corrupt a dataset. An output made with the
    same settings from inputs that have changed since (an upstream stage was redone) is stale:
    False, so it is made again.
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
    # Same settings: done, unless it was made from inputs that have changed since.
    return inputs is None or read_settings(path, b"synseg_inputs") == inputs


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
