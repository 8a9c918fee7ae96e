"""The training loop: MCCL on packed shards, one process or many (torchrun, DDP).

Only the FiLM layers, the decoder and the FSS projector train; the CLIP towers stay frozen.
A run folder holds ``config.json`` (the resolved settings), ``metrics.jsonl`` and
``checkpoints/``. ``resume=True`` continues from the latest checkpoint at the next step, with
the same data order and the same random draws as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cores import available_cores
from pipeline.errors import UserError
from pipeline.fsutil import atomic_path, clean_stale, write_json
from trainer import checkpoint
from trainer.config import TrainConfig, from_dict
from trainer.data import ShardStream, find_shards, loader
from trainer.losses import MCCLoss
from trainer.model import SynSeg
from trainer.textcache import LabelCache


@dataclass
class TrainStats:
    start_step: int = 0
    steps: int = 0  # the last step reached
    total_steps: int = 0
    images: int = 0  # images trained on in this run (all ranks)
    bad_samples: int = 0
    loss: dict = field(default_factory=dict)  # the last step's terms
    checkpoint: str = ""
    images_per_second: float = 0.0


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_wanted: str) -> tuple[_Dist, torch.device]:
    env = _Dist(
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


def cpu_threads(env: _Dist) -> int:
    """Threads for this process's CPU math: the cores it may use shared among the processes
    torchrun started on this machine. torch's default (every core in every process) makes
    processes and data workers fight over the cores."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", env.world))
    return max(1, available_cores() // max(1, local))


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 101) % (2**31)


def _batch_text(
    labels: list[list[str]], cache: LabelCache, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded label embeddings (B, N, d) and their mask (B, N)."""
    n = max(len(ls) for ls in labels)
    emb = torch.zeros(len(labels), n, cache.backbone.embed_dim)
    mask = torch.zeros(len(labels), n, dtype=torch.bool)
    flat = [p for ls in labels for p in ls]
    vectors = cache.embed(flat)
    i = 0
    for b, ls in enumerate(labels):
        emb[b, : len(ls)] = vectors[i : i + len(ls)]
        mask[b, : len(ls)] = True
        i += len(ls)
    return emb.to(device), mask.to(device)


def _absent_text(
    labels, cache: LabelCache, k: int, rng: random.Random, device
) -> torch.Tensor | None:
    """k embeddings per image of phrases seen in training but not among the image's labels."""
    if not k:
        return None
    vocab = list(cache.index)
    picks = []
    for ls in labels:
        own = set(ls)
        pool = [p for p in vocab if p not in own]
        if len(pool) < k:
            return None  # too early in the run to have enough other phrases
        picks.append(rng.sample(pool, k))
    return cache.embed([p for ps in picks for p in ps]).view(len(labels), k, -1).to(device)


def _compatible(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run must train the same model on the same data with the same recipe."""
    now = cfg.to_dict()
    diffs = []
    for group in ("model", "loss", "data", "optim"):
        for key, value in now[group].items():
            if group == "optim" and key in ("max_steps", "epochs"):
                continue  # a resumed run may go further
            old = saved.get(group, {}).get(key)
            if isinstance(value, tuple):
                value = list(value)
            if old != value:
                diffs.append(f"{group}.{key}: {old!r} -> {value!r}")
    if diffs:
        raise UserError(
            f"cannot resume: the checkpoint was trained with other settings ({'; '.join(diffs[:4])})"
        )


def run_train(
    cfg: TrainConfig,
    resume: bool = False,
    on_step: Callable[[int, int, dict, float], None] | None = None,
) -> TrainStats:
    env, device = _setup_distributed(cfg.run.device)
    run = Path(cfg.run.output)
    shards = find_shards(cfg.data.shards)
    ckpt_dir = None
    if resume:
        ckpt_dir = checkpoint.find(run)
        _compatible(checkpoint.read_config(ckpt_dir)["config"], cfg)
    elif (run / "checkpoints" / "latest").exists():
        raise UserError(
            f"{run} already holds a run; pass --resume to continue it or choose another run.output"
        )

    torch.manual_seed(cfg.run.seed)
    model = SynSeg(cfg.model).to(device)
    params = model.trainable_parameters()
    if cfg.optim.name == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.optim.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
    else:
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    start_step = start_epoch = 0
    if ckpt_dir is not None:
        checkpoint.load_weights(model, ckpt_dir)
        start_step, start_epoch = checkpoint.load_optimizer(opt, ckpt_dir)
    net = model
    if env.world > 1:
        # Convolution weights with a size-1 dimension (the 1x1 projector conv, the final
        # transposed conv) get gradients whose strides differ from DDP's bucket views only
        # along that dimension: the same memory layout, but DDP warns on every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    cache = LabelCache(
        model.backbone,
        cfg.data.template,
        Path(cfg.run.text_cache or run / "text_cache") if env.main else None,
    )
    loss_fn = MCCLoss(cfg.loss)
    per_step = cfg.data.batch_size * env.world
    steps_per_epoch = max(1, shards.samples // per_step)
    total = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps) if cfg.optim.epochs else cfg.optim.max_steps
    use_bf16 = cfg.run.precision == "bf16" or (
        cfg.run.precision == "auto" and device.type == "cuda"
    )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if use_bf16
        else contextlib.nullcontext
    )

    stats = TrainStats(start_step=start_step, steps=start_step, total_steps=total)
    if start_step >= total:
        # Already there (a resume of a finished run): train nothing, log nothing, and say so.
        stats.checkpoint = str(ckpt_dir)
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        return stats
    if env.main:
        run.mkdir(parents=True, exist_ok=True)
        for folder in (run, run / "checkpoints"):
            clean_stale(folder)  # temporaries of a run that was killed
        write_json(run / "config.json", cfg.to_dict())
    metrics = _Metrics(run, start_step, env.main, cfg.run.tensorboard)
    stream = ShardStream(
        shards,
        cfg.data.image_size,
        cfg.data.batch_size,
        cfg.data.max_labels,
        cfg.run.seed,
        cfg.data.shuffle_buffer,
        env.rank,
        env.world,
    )
    model.train()
    t0, seen = time.time(), 0
    step = start_step
    try:
        for epoch in range(start_epoch, -(-total // steps_per_epoch)):
            stream.set_epoch(epoch)
            batches = iter(loader(stream, cfg.data.workers))
            for i in range(steps_per_epoch):
                batch = next(batches)
                if epoch * steps_per_epoch + i < start_step:
                    continue  # trained on before the resume: replay the stream, skip the batch
                step = epoch * steps_per_epoch + i + 1
                torch.manual_seed(_step_seed(cfg.run.seed, step, env.rank))  # dropout draws
                rng = random.Random(_step_seed(cfg.run.seed, step, env.rank))
                images = batch["images"].to(device, non_blocking=True)
                text, mask = _batch_text(batch["labels"], cache, device)
                absent = _absent_text(batch["labels"], cache, cfg.data.absent, rng, device)
                with autocast():
                    out = net(images, text, absent)
                terms = loss_fn(
                    out.f.float(),
                    out.fbar.float(),
                    text,
                    mask,
                    None if out.absent_maps is None else out.absent_maps.float(),
                )
                loss = terms["total"]
                if not torch.isfinite(loss):
                    raise UserError(
                        f"the loss is {loss.item()} at step {step} "
                        f"({', '.join(f'{k} {v.item():.3g}' for k, v in terms.items())}); "
                        "lower optim.lr or check the data"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                opt.step()
                seen += images.shape[0] * env.world
                stats.bad_samples += batch["bad"]
                values = {k: round(v.item(), 6) for k, v in terms.items()}
                rate = seen / max(time.time() - t0, 1e-9)
                stats.loss, stats.steps, stats.images, stats.images_per_second = (
                    values,
                    step,
                    seen,
                    rate,
                )
                if step % cfg.run.log_every == 0 or step == total:
                    metrics.write(
                        {
                            "step": step,
                            "epoch": epoch,
                            "loss": values,
                            "lr": opt.param_groups[0]["lr"],
                            "images_per_second": round(rate, 2),
                            "bad_samples": stats.bad_samples,
                        }
                    )
                if on_step and env.main:
                    on_step(step, total, values, rate)
                if step == total or (cfg.run.save_every and step % cfg.run.save_every == 0):
                    stats.checkpoint = _save(run, step, model, opt, epoch, cfg, cache, env)
                if step >= total:
                    break
            if step >= total:
                break
    finally:
        metrics.close()
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if stats.steps == start_step and ckpt_dir is not None:
        stats.checkpoint = str(ckpt_dir)
    return stats


def _check_ranks_agree(model, env: _Dist, step: int) -> None:
    """Every rank must hold the same weights (DDP averages the gradients): compare a checksum
    of the trainable weights before the main rank saves them for all."""
    if env.world == 1:
        return
    total = torch.stack([p.detach().double().sum() for p in model.trainable_parameters()]).sum()
    sums = [torch.zeros_like(total) for _ in range(env.world)]
    dist.all_gather(sums, total)
    if any(not torch.isclose(s, sums[0], rtol=1e-9, atol=1e-9) for s in sums):
        raise RuntimeError(
            f"ranks hold different weights at step {step} "
            f"({', '.join(f'{s.item():.9g}' for s in sums)}): gradients are not synchronised"
        )


def _save(run, step, model, opt, epoch, cfg, cache, env) -> str:
    path = ""
    _check_ranks_agree(model, env, step)
    if env.main:
        cache.save()
        path = str(
            checkpoint.save(
                run,
                step,
                model,
                opt,
                epoch,
                cfg.to_dict(),
                {
                    "model": model.describe(),
                    "label_cache": cache.identity(),
                    "torch": torch.__version__,
                },
            )
        )
    if env.world > 1:
        dist.barrier()
    return path


class _Metrics:
    """metrics.jsonl (and TensorBoard) on the main process; a resume drops lines past its step."""

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
            self.tb.add_scalar("images_per_second", record["images_per_second"], record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def load_model(path: str | Path, device: str = "cpu") -> tuple[SynSeg, TrainConfig]:
    """A trained model from a run folder or checkpoint folder, for evaluation or inference."""
    ckpt = checkpoint.find(path)
    cfg = from_dict(checkpoint.read_config(ckpt)["config"])
    model = SynSeg(cfg.model)
    checkpoint.load_weights(model, ckpt)
    return model.to(device).eval(), cfg
