"""Where a stage's per-shard jobs run: in local processes, or as Ray Data actors on a cluster.

Both run the same job object (a picklable callable that processes one shard: reads it, writes
its output atomically with its done record, returns a small summary), so a cluster run and a
local run write byte-identical files, and a rerun after a failure skips what is done.

    for result in run_jobs(job, shards, Distribution("ray", workers=32)):
        ...

On Ray, the job is pickled once into the actors' constructor arguments; each actor builds
what it needs (a spaCy pipeline, say) once, in ``job.setup()`` if the job has one, and then
takes shards one at a time (``map_batches`` with batch size 1), so memory is bounded by a
shard. Results come back to the driver in input order.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from synseg.cores import available_cores, parallel_map
from synseg.errors import UserError

T = TypeVar("T")
R = TypeVar("R")

DISTRIBUTORS = ("local", "ray")


@dataclass
class Distribution:
    distributor: str = "local"  # local (processes on this machine) or ray
    workers: int = 1  # local processes, or Ray actors
    ray_address: str = ""  # a running cluster ("auto", "ray://host:10001"); empty: start one here
    cpus_per_worker: float = 1.0  # CPUs Ray reserves for each actor

    def check(self) -> None:
        if self.distributor not in DISTRIBUTORS:
            raise UserError(f"--distributor must be one of {', '.join(DISTRIBUTORS)}")
        if self.cpus_per_worker <= 0:
            raise UserError("--cpus-per-worker must be positive")
        if self.distributor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise UserError(
                    "--distributor ray needs Ray Data (pip install 'ray[data]')"
                ) from None


def distribution(cfg) -> Distribution:
    """The checked Distribution of a stage's config (its ``distributor``, ``processes``,
    ``ray_address`` and ``cpus_per_worker``)."""
    dist = Distribution(cfg.distributor, cfg.processes, cfg.ray_address, cfg.cpus_per_worker)
    dist.check()
    return dist


ANSWER_TIMEOUT = 5.0  # seconds a cluster's address gets to accept a connection


def check_answers(address: str) -> None:
    """One line if ``host:port`` (or ``ray://host:port``) does not accept a TCP connection
    within ``ANSWER_TIMEOUT``: Ray itself retries such an address for minutes. ``auto`` (the
    address Ray finds on this machine) is left to Ray."""
    import socket

    if address in ("", "auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--ray-address {address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT).close()
    except OSError as e:
        raise UserError(
            f"Ray at {address} does not answer ({e.strerror or e}); is the cluster up "
            "(`ray start --head`), and is this its address?"
        ) from None


def connect_ray(address: str = "") -> None:
    """Join the cluster at ``address`` (checked to answer first), or start a local Ray on this
    machine's cores; a Ray already initialised in this process (a test's, a notebook's) is
    used as it is."""
    import ray

    check_answers(address)
    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=available_cores(), include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot start or reach Ray ({address or 'local'}): {first}") from None


class _Actor:
    """What Ray Data instantiates once per actor: the unpickled job, set up once."""

    def __init__(self, job: bytes) -> None:
        self.job = pickle.loads(job)
        if hasattr(self.job, "setup"):
            self.job.setup()

    def __call__(self, batch: dict) -> dict:
        results = []
        for item in batch["item"]:
            try:
                results.append(pickle.dumps(self.job(pickle.loads(item))))
            except UserError as e:  # the stage's own one-line error, sent back as a result
                results.append(pickle.dumps(_Failed(str(e))))
        return {"result": results}


@dataclass
class _Failed:
    message: str


def run_jobs(job: Callable[[T], R], items: Sequence[T], dist: Distribution) -> Iterator[R]:
    """``job(item)`` for every item, results in input order."""
    if dist.distributor == "local" or not items:
        yield from parallel_map(job, items, dist.workers)
        return
    import ray.data

    connect_ray(dist.ray_address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the stage's own bar on the driver says it
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [{"item": pickle.dumps(x)} for x in items]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _Actor,
        fn_constructor_args=(pickle.dumps(job),),
        batch_size=1,
        concurrency=max(1, min(dist.workers, len(items))),
        num_cpus=dist.cpus_per_worker,
    )
    for row in ds.iter_rows():
        result = pickle.loads(row["result"])
        if isinstance(result, _Failed):
            raise UserError(result.message)
        yield result
