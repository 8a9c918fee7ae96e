"""Label text embeddings, computed once per phrase and backbone.

The text tower is frozen, so a phrase's embedding never changes during training. Before the
first step the trainer encodes every phrase of the shards' vocabulary (``ensure``, or ahead of
time with ``synseg-train encode-labels``); a step then only looks rows up in a table that
lives on the training device. A phrase missing from the vocabulary is encoded the first time
it is seen. The cache is saved as
``<folder>/<backbone id>.safetensors`` (embeddings) and ``.json`` (phrases, template), where the
backbone id hashes the architecture and the text tower's weights: another backbone never
reads this cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from synseg.fsutil import atomic_path, clean_stale


def backbone_id(backbone) -> str:
    """A hash of the text tower's weights (and the architecture's shapes)."""
    h = hashlib.sha1()
    for name, t in sorted(backbone.model.state_dict().items()):
        if name.startswith("visual."):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().float().flatten()
        h.update(
            flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes()
        )  # a sample of values
    return h.hexdigest()[:16]


class LabelCache:
    def __init__(self, backbone, template: str, folder: Path | None = None) -> None:
        self.backbone, self.template = backbone, template
        self.id = backbone_id(backbone)
        self.folder = Path(folder) if folder else None
        self.index: dict[str, int] = {}
        self.table = torch.zeros(0, backbone.embed_dim)
        self.encoded = 0  # phrases this process encoded (the rest came from disk)
        self._device_table: torch.Tensor | None = None
        if self.folder is not None:
            self._load()

    @property
    def path(self) -> Path:
        return self.folder / f"{self.id}.safetensors"

    def _load(self) -> None:
        meta = self.path.with_suffix(".json")
        if self.path.exists() and meta.exists():
            from safetensors.torch import load_file

            info = json.loads(meta.read_text())
            if info.get("template") == self.template:
                self.table = load_file(str(self.path))["embeddings"]
                self.index = {p: i for i, p in enumerate(info["phrases"])}

    def save(self) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        clean_stale(self.folder)  # what a process killed while saving left behind
        with atomic_path(self.path) as tmp:
            save_file({"embeddings": self.table.contiguous()}, str(tmp))
        phrases = sorted(self.index, key=self.index.get)
        with atomic_path(self.path.with_suffix(".json")) as tmp:
            tmp.write_text(
                json.dumps({"backbone": self.id, "template": self.template, "phrases": phrases})
            )

    def identity(self) -> dict:
        return {
            "backbone": self.id,
            "template": self.template,
            "phrases": len(self.index),
            "file": str(self.path) if self.folder else None,
        }

    def ensure(
        self,
        phrases: list[str],
        batch: int = 1024,
        on_start: Callable[[int], None] | None = None,
        on_advance: Callable[[int], None] | None = None,
        save_every: float = 0.0,
    ) -> int:
        """Encode every phrase not in the cache yet, ``batch`` at a time; returns how many.
        With a folder and ``save_every`` (seconds), what is encoded is saved that often and
        on Ctrl-C, so a killed or interrupted encoding goes on from there when run again."""
        new = [p for p in dict.fromkeys(phrases) if p not in self.index]
        if on_start:
            on_start(len(new))
        done, parts, last = 0, [], time.monotonic()
        try:
            with torch.no_grad():
                for i in range(0, len(new), batch):
                    chunk = new[i : i + batch]
                    parts.append(
                        self.backbone.encode_text([self.template.format(p) for p in chunk]).cpu()
                    )
                    if on_advance:
                        on_advance(len(chunk))
                    if save_every and self.folder and time.monotonic() - last >= save_every:
                        done = self._add(new, done, parts)
                        self.save()
                        last = time.monotonic()
        except KeyboardInterrupt:
            if self.folder is not None and parts:  # (what came before is saved already)
                self._add(new, done, parts)
                self.save()
            raise
        self._add(new, done, parts)
        return len(new)

    def _add(self, new: list[str], done: int, parts: list[torch.Tensor]) -> int:
        """Append the encoded ``parts`` (the phrases ``new[done:]`` in order) to the table and
        empty the list; returns how many of ``new`` are in the table now."""
        if not parts:
            return done
        rows = torch.cat(parts)
        start = len(self.index)
        self.index.update({p: start + i for i, p in enumerate(new[done : done + len(rows)])})
        self.table = torch.cat([self.table, rows])
        self.encoded += len(rows)
        self._device_table = None
        parts.clear()
        return done + len(rows)

    def indices(self, phrases: list[str]) -> torch.Tensor:
        """Rows of ``phrases`` in the table (phrases never seen are encoded first)."""
        self.ensure(phrases)
        return torch.tensor([self.index[p] for p in phrases], dtype=torch.long)

    def table_on(self, device: torch.device) -> torch.Tensor:
        """The table on ``device``, copied once (again only after new phrases were added)."""
        if self._device_table is None or self._device_table.device != device:
            self._device_table = self.table.to(device)
        return self._device_table

    def embed(self, phrases: list[str]) -> torch.Tensor:
        """(len(phrases), d) embeddings; only phrases never seen are encoded."""
        rows = self.indices(phrases)  # first: it may grow the table
        return self.table[rows]
