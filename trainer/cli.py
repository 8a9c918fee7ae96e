"""synseg-train: the command line over the trainer.

synseg-train run --preset tiny --set optim.lr=3e-4 --set data.batch_size=32
torchrun --nproc_per_node 8 -m trainer.cli run --preset paper     # several GPUs
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli import err, handle_errors, summary
from pipeline.errors import UserError

app = typer.Typer(
    help="SynSeg trainer: MCCL training on packed shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """SynSeg trainer: MCCL training on packed shards."""


@app.command()
@handle_errors
def run(
    preset: Annotated[str, typer.Option(help="Settings to start from: paper or tiny")] = "paper",
    config: Annotated[
        list[Path], typer.Option(help="JSON file of settings (repeatable; later wins)")
    ] = [],  # noqa: B006
    set_: Annotated[
        list[str], typer.Option("--set", help="One setting, e.g. optim.lr=1e-4 (repeatable)")
    ] = [],  # noqa: B006
    shards: Annotated[str | None, typer.Option(help="Shards folder (data.shards)")] = None,
    output: Annotated[str | None, typer.Option(help="Run folder (run.output)")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps (optim.max_steps)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda (run.device)")] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --output from its latest checkpoint"),
    ] = False,
) -> None:
    """Train SynSeg with Multi-Category Contrastive Learning."""
    from trainer.config import resolve
    from trainer.train import run_train

    overrides = list(set_)
    for key, value in (
        ("data.shards", shards),
        ("run.output", output),
        ("optim.max_steps", steps),
        ("run.device", device),
    ):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = resolve(preset, config, overrides)
    main = int(os.environ.get("RANK", 0)) == 0
    t = time.time()
    columns = [
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err, disable=not main) as bar:
        task = bar.add_task("train", total=None, info="")

        def on_step(step: int, total: int, loss: dict, rate: float) -> None:
            info = (
                " ".join(f"{k} {v:.3f}" for k, v in loss.items() if k != "neg" or v)
                + f" | {rate:.1f} img/s"
            )
            bar.update(task, completed=step, total=total, info=info)

        try:
            stats = run_train(cfg, resume=resume, on_step=on_step)
        except BaseException:
            bar.update(task, visible=False)  # the error line says enough
            raise
    if main:
        summary("train", stats, time.time() - t)


def main() -> None:
    try:
        app()
    except UserError as e:  # raised outside a command (e.g. while torchrun starts us)
        err.print(f"[red]error:[/red] {e}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
