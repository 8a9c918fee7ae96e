"""The run's log: ``metrics.jsonl`` (and TensorBoard events) on the main process."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import UserError
from pipeline.fsutil import atomic_path


class MetricsLog:
    """One JSON line per logged step; a resumed run drops the lines past its step first."""

    def __init__(self, run: Path, start_step: int, main: bool, tensorboard: bool) -> None:
        self.file = self.tb = None
        if not main:
            return
        path = run / "metrics.jsonl"
        if path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step
            ]
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
