"""The run's log: ``metrics.jsonl`` (and TensorBoard events) on the main process."""

from __future__ import annotations

import json
from pathlib import Path

from synseg.errors import UserError
from synseg.fsutil import atomic_path


def _records(path: Path) -> list[tuple[int, str]]:
    """(step, line) of the log's lines; a last line cut short by a kill is dropped, any other
    that is not a record is refused in one line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if n == len(lines) - 1:  # the line being written when the run was killed
                continue
            raise UserError(
                f"{path}, line {n + 1}, is not a metrics record: {line[:60]!r}"
            ) from None
        out.append((record["step"], line))
    return out


class MetricsLog:
    """One JSON line per logged step; a resumed run drops the lines past its step first."""

    def __init__(self, run: Path, start_step: int, main: bool, tensorboard: bool) -> None:
        self.file = self.tb = None
        if not main:
            return
        path = run / "metrics.jsonl"
        if path.exists():
            kept = [line for step, line in _records(path) if step <= start_step]
            with atomic_path(path) as tmp:  # a kill here must not lose the kept lines
                tmp.write_text("".join(f"{line}\n" for line in kept))
        self.file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "run.tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from None
            self.tb = SummaryWriter(str(run / "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record["loss"].items():
                self.tb.add_scalar(f"loss/{k}", v, record["step"])
            self.tb.add_scalar("lr", record["lr"], record["step"])
            self.tb.add_scalar("images_per_second", record["images_per_second"], record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
