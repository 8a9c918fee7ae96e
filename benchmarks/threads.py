"""Images per second of the tiny training step on the CPU by torch threads per process, with one
process and with several at once (DDP ranks on one machine, or training beside another stage).

The baseline is torch's default in the same run: every process uses a thread per core. The
trainer's choice, `trainer.train.distributed.cpu_threads`, is the cores divided among the processes.

    python benchmarks/threads.py              # 1 and 2 processes, 10 steps each
    python benchmarks/threads.py --procs 1 2 4 --steps 20
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _rate(threads: int, steps: int, start, out) -> None:
    import logging

    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's note on the random tiny model
    from trainer.methods.synseg.losses import LossConfig, MCCLoss
    from trainer.methods.synseg.model import ModelConfig, SynSeg

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=256)
    model = SynSeg(cfg).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    loss_fn = MCCLoss(LossConfig())
    batch, labels = 16, 4
    images = torch.rand(batch, 3, 64, 64)
    text = torch.randn(batch, labels, model.backbone.embed_dim)
    mask = torch.ones(batch, labels, dtype=torch.bool)

    def step() -> None:
        out_ = model(images, text)
        loss = loss_fn(out_.f, out_.fbar, text, mask)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm up
    start.wait()  # every process times the same stretch of wall clock
    t = time.perf_counter()
    for _ in range(steps):
        step()
    out.put(batch * steps / (time.perf_counter() - t))


def measure(procs: int, threads: int, steps: int) -> float:
    """Images/s of ``procs`` processes training at once, summed."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_rate, args=(threads, steps, start, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    total = sum(out.get() for _ in workers)
    for w in workers:
        w.join()
    return total


def main() -> None:
    from synseg.cores import available_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cores = available_cores()
    print(f"{cores} cores; tiny preset, 64 px, batch 16, 4 labels/image; images/s summed")
    for procs in args.procs:
        chosen = max(1, cores // procs)
        base = measure(procs, cores, args.steps)
        print(f"{procs} process(es): torch default ({cores} threads each)  {base:8.1f}  1.00x")
        for threads in sorted({1, chosen} - {cores}):
            r = measure(procs, threads, args.steps)
            mark = "  <- the trainer's choice" if threads == chosen else ""
            print(
                f"{procs} process(es): {threads} thread(s) each{'':14s}{r:8.1f}  {r / base:.2f}x{mark}"
            )
        if chosen == cores:
            print(f"{procs} process(es): the trainer's choice is torch's default here")


if __name__ == "__main__":
    main()
