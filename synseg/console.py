"""The command lines' shared parts: consoles, the one-line error handler, progress bars and
summary tables. Both ``synseg-data`` and ``synseg-train`` use them; nothing else lives here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from synseg.errors import UserError

out = Console()
err = Console(stderr=True)


def _say(e: UserError) -> None:
    """A user's mistake as one red line on stderr."""
    err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)


def handle_errors(fn: Callable) -> Callable:
    """Turn a UserError into one red line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _say(e)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as e:
            hint = getattr(e, "hint", "run the same command again to go on")
            err.print(f"[yellow]interrupted[/yellow]: finished work is kept; {hint}")
            raise typer.Exit(130) from None

    return wrapper


def run_app(app: Callable[[], Any]) -> None:
    """Run a Typer app as a console script: a UserError raised outside a command (while
    torchrun starts it, say) is one line too, and a Ctrl-C that lands between the command's
    end and the interpreter's exit leaves the exit code alone (the work is done)."""
    import signal

    try:
        app()
    except UserError as e:
        _say(e)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # outside a command (while the options are parsed)
        err.print("[yellow]interrupted[/yellow]: run the same command again")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class _RateColumn(ProgressColumn):
    """Items per second, from Rich's own moving estimate."""

    def render(self, task) -> str:
        return f"{task.speed:.1f}/s" if task.speed else ""


@contextlib.contextmanager
def progress(description: str, unit: str = "") -> Iterator[tuple[Callable, Callable, Callable]]:
    """Yield (set_total, advance, set_done) callbacks driving one Rich progress bar."""
    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        _RateColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task(description, total=None)
        try:
            yield (
                lambda total: bar.update(task, total=total),
                lambda n=1: bar.advance(task, n),
                lambda done: bar.update(task, completed=done),
            )
        except BaseException:
            bar.update(task, visible=False)  # the error line says enough
            raise


def summary(title: str, stats: Any, seconds: float | None = None) -> None:
    """Print a stats dataclass as a two-column table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="cyan")
    table.add_column("value", justify="right")

    def add(name: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                add(f"{name}.{f.name}", getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"{name}: {k}", str(v))
            if not value:
                table.add_row(name, "-")
        else:
            table.add_row(name, str(value))

    for f in dataclasses.fields(stats):
        add(f.name, getattr(stats, f.name))
    if seconds is not None:
        table.add_row("seconds", f"{seconds:.1f}")
    out.print(table)


def print_result(res: Any) -> None:
    """A query result (title, columns, rows) as a Rich table."""
    table = Table(title=res.title, title_justify="left")
    for c in res.columns:
        table.add_column(c)
    for r in res.rows:
        table.add_row(*("" if v is None else str(v) for v in r))
    out.print(table)
