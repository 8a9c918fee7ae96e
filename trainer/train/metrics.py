"""The run's log on the main process: ``metrics.jsonl``, and where ``run.report_to`` says,
TensorBoard events (``<run>/tensorboard``) and a Weights & Biases run (offline unless
``WANDB_MODE`` says otherwise; its files in ``<run>/wandb``). A record is a training step's
(``loss``, ``lr``, throughput) or a validation's (``val``: mIoU, mAcc, aAcc)."""

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

    def __init__(
        self,
        run: Path,
        start_step: int,
        main: bool,
        report_to: list[str] = (),
        settings: dict | None = None,
    ) -> None:
        self.file = self.tb = self.wandb = None
        if not main:
            return
        path = run / "metrics.jsonl"
        if path.exists():
            kept = [line for step, line in _records(path) if step <= start_step]
            with atomic_path(path) as tmp:  # a kill here must not lose the kept lines
                tmp.write_text("".join(f"{line}\n" for line in kept))
        self.file = path.open("a")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "run.report_to=tensorboard needs the tensorboard package "
                    "(pip install tensorboard)"
                ) from None
            self.tb = SummaryWriter(str(run / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in report_to:
            self.wandb = _wandb_run(run, start_step, settings or {})

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        scalars = {f"loss/{k}": v for k, v in record.get("loss", {}).items()}
        scalars |= {f"val/{k}": v for k, v in record.get("val", {}).items() if _number(v)}
        scalars |= {k: record[k] for k in ("lr", "images_per_second") if k in record}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _wandb_run(run: Path, start_step: int, settings: dict):
    """A Weights & Biases run for this run folder (resumed under the same id)."""
    import hashlib
    import os

    try:
        import wandb
    except ImportError:
        raise UserError("run.report_to=wandb needs the wandb package (pip install wandb)") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode == "disabled":
        return None
    try:
        return wandb.init(
            project=os.environ.get("WANDB_PROJECT", "synseg"),
            name=run.name,
            id=f"{run.name}-{hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:8]}",
            dir=str(run),
            config=settings,
            mode=mode,
            resume="allow" if start_step else None,
        )
    except Exception as e:  # wandb's own errors: no login online, a bad mode
        raise UserError(f"run.report_to=wandb: {str(e).splitlines()[0]}") from None
