"""How many processes a stage uses by default: one per core this process may run on."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_DEFAULT_PROCESSES = 8  # past this a default would surprise on a shared machine


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_processes(requested: int) -> int:
    """``requested`` if set (> 0), else one process per available core, at most 8."""
    return requested if requested > 0 else min(available_cores(), MAX_DEFAULT_PROCESSES)


def worker_ignores_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group, but only the parent should
    handle it (it stops the pool and prints one line), not every worker with a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parallel_map(job: Callable[[T], R], items: Sequence[T], processes: int) -> Iterator[R]:
    """``job(item)`` for every item, in order: in spawned worker processes (Ctrl-C left to
    the parent, which stops them) when there are several processes and items, else here."""
    if processes > 1 and len(items) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(processes, len(items)), initializer=worker_ignores_sigint) as pool:
            yield from pool.imap(job, items)
    else:
        yield from map(job, items)
