"""One process or many (torchrun): the ranks, the device, CPU threads, and the check that
every rank holds the same weights before the main rank saves them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from synseg.cores import available_cores
from synseg.errors import UserError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_wanted: str) -> tuple[Ranks, torch.device]:
    """The ranks torchrun gave this process (one process: rank 0 of 1) and its device; joins
    the process group when there are several."""
    env = Ranks(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )
    if device_wanted == "auto":
        device = torch.device(f"cuda:{env.local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_wanted)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("run.device is cuda but no CUDA device is available")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(env))
    if env.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return env, device


def cpu_threads(env: Ranks) -> int:
    """Threads for this process's CPU math: the cores it may use shared among the processes
    torchrun started on this machine. torch's default (every core in every process) makes
    processes and data workers fight over the cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world))
    return max(1, available_cores() // max(1, local))


def check_ranks_agree(params: list[torch.Tensor], env: Ranks, step: int) -> None:
    """Every rank must hold the same weights (DDP averages the gradients): compare a checksum
    of the trainable weights before the main rank saves them for all."""
    if env.world == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in params]).sum()
    sums = [torch.zeros_like(total) for _ in range(env.world)]
    dist.all_gather(sums, total)
    if any(not torch.isclose(s, sums[0], rtol=1e-9, atol=1e-9) for s in sums):
        raise RuntimeError(
            f"ranks hold different weights at step {step} "
            f"({', '.join(f'{s.item():.9g}' for s in sums)}): gradients are not synchronised"
        )
