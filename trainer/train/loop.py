"""The training loop: any trained method (``trainer.methods``) on packed shards' captions, or
on a dataset's masks (``data.supervision=masks``, ``trainer.train.masks``), one process or
many (torchrun, DDP).

What trains, what the step feeds the model and what it minimises are the method's under
caption supervision; under mask supervision the step feeds the method's dense forward
(``Dense``) every class of the dataset and minimises the mask loss. Either way the
physically-guided losses (``trainer.train.physical``) are added when their settings say so,
their heads trained and saved with the model (``Trainee``). The loop owns the rest: the shard
stream or the mask batches, the label-embedding table for methods that read one, the
optimizer and its schedule, DDP, metrics, checkpoints. A run folder holds ``config.json`` (the
resolved settings), ``metrics.jsonl`` and ``checkpoints/``. ``resume=True`` continues from the
latest checkpoint at the next step, with the same data order and the same random draws as an
uninterrupted run.

    _plan (data, length, checkpoint) -> _build (model, optimizer, resumed state)
    -> _label_table (vocabulary encoded) -> _Step -> _loop (epochs, logging, checkpoints)
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from synseg.errors import UserError
from synseg.fsutil import clean_stale, write_json
from synseg.shards import VOCABULARY
from trainer import methods
from trainer.methods.base import StepContext, StepInputs
from trainer.train import checkpoint, distributed
from trainer.train.config import TrainConfig, reporters
from trainer.train.data import ShardSet, ShardStream, Vocabulary, find_shards, loader
from trainer.train.distributed import Ranks
from trainer.train.masks import MaskSet, epoch_batches, mask_loss
from trainer.train.masks import loader as mask_loader
from trainer.train.metrics import MetricsLog
from trainer.train.optim import build_optimizer, lr_at, set_lr
from trainer.train.physical import Trainee, with_auxiliary
from trainer.train.textcache import LabelCache


@dataclass
class TrainStats:
    start_step: int = 0
    steps: int = 0  # the last step reached
    total_steps: int = 0
    images: int = 0  # images trained on in this run (all ranks)
    bad_samples: int = 0
    phrases_encoded: int = 0  # label phrases this run encoded (the rest were in the cache)
    loss: dict = field(default_factory=dict)  # the last step's terms
    checkpoint: str = ""
    images_per_second: float = 0.0
    # Batches of the epoch read again on resume: the checkpoint has no stream position for
    # this number of processes and data workers, so the epoch restarts and skips them (the
    # rest of it is not the uninterrupted run's).
    replayed: int = 0
    val: dict = field(default_factory=dict)  # the last validation (run.val_every)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 101) % (2**31)


def _compatible(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run must train the same model on the same data with the same recipe."""
    now = cfg.to_dict()
    diffs = []
    if saved.get("method", "synseg") != cfg.method:
        diffs.append(f"method: {saved.get('method', 'synseg')!r} -> {cfg.method!r}")
    defaults = TrainConfig(method=cfg.method).to_dict()
    for group in ("model", "loss", "data", "optim"):
        for key, value in now[group].items():
            if group == "optim" and key in ("max_steps", "epochs"):
                continue  # a resumed run may go further
            if group == "data" and key == "workers":
                continue  # another machine's cores: the epoch is replayed (TrainStats.replayed)
            # a setting newer than the checkpoint held its default then
            old = saved.get(group, {}).get(key, defaults[group][key])
            if isinstance(value, tuple):
                value = list(value)
            if old != value:
                diffs.append(f"{group}.{key}: {old!r} -> {value!r}")
    if diffs:
        raise UserError(
            f"cannot resume: the checkpoint was trained with other settings ({'; '.join(diffs[:4])})"
        )


@dataclass
class _Plan:
    """What a run will do: its data, its length and where it starts."""

    shards: ShardSet | None  # caption supervision
    masks: MaskSet | None  # mask supervision
    steps_per_epoch: int
    total: int
    checkpoint: Path | None = None  # the one resumed from
    start_step: int = 0
    start_epoch: int = 0
    stream: dict | None = None  # the data stream's position saved with that checkpoint


def _plan(cfg: TrainConfig, resume: bool, env: Ranks) -> _Plan:
    run = Path(cfg.run.output)
    shards = masks = None
    if cfg.data.supervision == "masks":
        masks = MaskSet(cfg.data.dataset, cfg.data.root, cfg.data.image_size)
        samples = len(masks)
    else:
        shards = find_shards(cfg.data.shards)
        samples = shards.samples
    ckpt = None
    if resume:
        ckpt = checkpoint.find(run)
        _compatible(checkpoint.read_config(ckpt)["config"], cfg)
    elif (run / "checkpoints" / "latest").exists():
        raise UserError(
            f"{run} already holds a run; pass --resume to continue it or choose another run.output"
        )
    if samples < cfg.data.batch_size * env.world:
        raise UserError(
            f"the data hold {samples} images, fewer than one batch on every process "
            f"({cfg.data.batch_size} x {env.world}); lower data.batch_size"
        )
    steps_per_epoch = samples // (cfg.data.batch_size * env.world)
    total = cfg.optim.epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps) if cfg.optim.epochs else cfg.optim.max_steps
    return _Plan(shards, masks, steps_per_epoch, total, ckpt)


def _build(cfg: TrainConfig, plan: _Plan, device: torch.device):
    """The model (with the auxiliary heads its losses need, a ``Trainee``) and its optimizer,
    at the checkpoint's state when resuming."""
    torch.manual_seed(cfg.run.seed)
    method = methods.trained(cfg.method)
    model = Trainee(method.build(cfg.model), method.dense, cfg.loss, plan.masks is not None)
    model = model.to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.trainable_parameters(), cfg.optim)
    if plan.checkpoint is not None:
        checkpoint.load_weights(model, plan.checkpoint)
        plan.start_step, plan.start_epoch = checkpoint.load_optimizer(opt, plan.checkpoint)
        plan.stream = checkpoint.load_stream(plan.checkpoint)
    return model, opt


def _wrap(model, cfg: TrainConfig, env: Ranks, device: torch.device):
    """What the step calls: the model, under DDP with several processes, compiled if asked."""
    net = model
    if env.world > 1:
        # Convolution weights with a size-1 dimension (the 1x1 projector conv, the final
        # transposed conv) get gradients whose strides differ from DDP's bucket views only
        # along that dimension: the same memory layout, but DDP warns on every step.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.run.compile:
        net = torch.compile(net)
    return net


def _label_table(
    cfg: TrainConfig, model, phrases: list[str], env: Ranks, on_start=None, on_encode=None
) -> LabelCache | None:
    """The label embeddings of ``phrases`` (the whole vocabulary, or a mask dataset's class
    names), for a method whose labels a frozen text tower embeds (None for the others): the
    main process encodes what the cache on disk lacks and saves it; the other processes then
    read it."""
    if not methods.trained(cfg.method).label_embeddings:
        return None
    folder = Path(cfg.run.text_cache or Path(cfg.run.output) / "text_cache")
    cache = None
    if env.main:
        cache = LabelCache(model.backbone, cfg.data.template, folder)
        every = cfg.run.encode_save_every
        if cache.ensure(phrases, cfg.run.encode_batch, on_start, on_encode, every):
            cache.save()
    if env.world > 1:
        dist.barrier()
    if not env.main:
        cache = LabelCache(model.backbone, cfg.data.template, folder)
        cache.folder = None  # read only: the main process owns the file
    return cache


def _stream_start(plan: _Plan, cfg: TrainConfig, env: Ranks) -> tuple[int, int, dict | None]:
    """(epoch, batch within it, the workers' saved positions) where training goes on."""
    epoch, taken = plan.start_epoch, plan.start_step - plan.start_epoch * plan.steps_per_epoch
    saved = plan.stream
    if taken >= plan.steps_per_epoch:
        return epoch + 1, 0, None
    if taken == 0:
        return epoch, 0, None
    usable = (
        saved is not None
        and saved.get("epoch") == epoch
        and saved.get("batches") == taken
        and saved.get("world") == env.world
        and saved.get("workers") == cfg.data.workers
    )
    if not usable:
        return epoch, taken, None  # an older checkpoint: replay the epoch up to here
    workers = max(1, cfg.data.workers)
    return epoch, taken, {"offset": taken % workers, "workers": saved["ranks"][env.rank]}


class _Step:
    """One optimisation step with no host-device synchronisation: the loss terms stay on the
    device, and a non-finite loss is remembered there (its step) until the next log line."""

    def __init__(self, cfg, model, net, opt, total, cache, vocab, env, device, names) -> None:
        self.cfg, self.model, self.net, self.opt, self.total = cfg, model, net, opt, total
        self.cache, self.vocab, self.env, self.device = cache, vocab, env, device
        self.names = names  # mask supervision: the dataset's class names (else None)
        self.method = methods.trained(cfg.method)
        self.params = model.trainable_parameters()
        self.loss_fn = None if names else self.method.objective(cfg.loss).to(device)
        use_bf16 = cfg.run.precision == "bf16" or (
            cfg.run.precision == "auto" and device.type == "cuda"
        )
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if use_bf16
            else contextlib.nullcontext
        )
        self.nonfinite_at = torch.zeros((), dtype=torch.long, device=device)

    def __call__(self, batch: dict, step: int, epoch: int = 0) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        seed = _step_seed(cfg.run.seed, step, self.env.rank)
        torch.manual_seed(seed)  # dropout draws
        rng = random.Random(seed)
        images = batch["images"].to(self.device, non_blocking=True)
        if cfg.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        ctx = StepContext(cfg, self.device, step, seed, rng, epoch, self.cache, self.vocab)
        labels = None
        if self.names:
            labels = batch["masks"].to(self.device, non_blocking=True)
            text = self.method.dense.text(self.model.model, self.names, ctx)
            inputs = StepInputs(model={"images": images, "text": text})
        else:
            inputs = self.method.inputs(images, batch, ctx)
        set_lr(self.opt, lr_at(step, self.total, cfg.optim))
        with self.autocast():
            out, aux = self.net(**inputs.model)
        if self.names:
            seg = mask_loss(out.logits, labels, self.method.dense.probabilities)
            terms = {"total": cfg.loss.seg * seg, "seg": seg}
        else:
            terms = self.loss_fn(out, **inputs.loss)
        terms = with_auxiliary(terms, aux, cfg.loss, batch["images"], labels)
        loss = terms["total"]
        first_bad = (self.nonfinite_at == 0) & ~torch.isfinite(loss)
        self.nonfinite_at = torch.where(first_bad, step, self.nonfinite_at)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.opt.step()
        if self.method.after_step is not None:
            with torch.no_grad():
                self.method.after_step(self.model.model, cfg)
        return {k: v.detach() for k, v in terms.items()}

    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Raise if any step so far had a non-finite loss (one synchronisation)."""
        at = int(self.nonfinite_at)
        if at:
            raise UserError(
                f"the loss is not finite from step {at} on (now "
                f"{', '.join(f'{k} {v.item():.3g}' for k, v in terms.items())}); "
                "lower optim.lr or check the data"
            )


@dataclass
class EncodeStats:
    phrases: int = 0  # in the shards' vocabulary
    encoded: int = 0  # by this call (the rest were in the cache already)
    cache: str = ""
    phrases_per_second: float = 0.0


def encode_labels(
    cfg: TrainConfig,
    on_start: Callable[[int], None] | None = None,
    on_encode: Callable[[int], None] | None = None,
) -> EncodeStats:
    """Encode every phrase of the shards' vocabulary into the run's label cache (the file a
    run with these settings reads), so training starts without encoding anything."""
    if not methods.trained(cfg.method).label_embeddings:
        raise UserError(
            f"{cfg.method} embeds no labels with a frozen text tower: there is nothing to encode "
            "ahead of its runs"
        )
    _, device = distributed.setup(cfg.run.device)
    find_shards(cfg.data.shards)
    vocab = Vocabulary(cfg.data.shards)
    if not vocab.phrases:
        raise UserError(
            f"{Path(cfg.data.shards) / VOCABULARY} does not exist; "
            "run `synseg-data pack` again to write it"
        )
    torch.manual_seed(cfg.run.seed)
    model = methods.trained(cfg.method).build(cfg.model).to(device)
    t0 = time.time()
    cache = _label_table(cfg, model, vocab.phrases, Ranks(), on_start, on_encode)
    rate = cache.encoded / max(time.time() - t0, 1e-9)
    return EncodeStats(len(vocab.phrases), cache.encoded, str(cache.path), round(rate, 1))


def run_train(
    cfg: TrainConfig,
    resume: bool = False,
    on_step: Callable[[int, int, dict | None, float], None] | None = None,
    on_encode: Callable[[int], None] | None = None,
    on_encode_start: Callable[[int], None] | None = None,
) -> TrainStats:
    """Train (or resume) a run. ``on_step(step, total, loss, images/s)`` is called every step on
    the main process, with the loss terms on logged steps only (None between them: reading
    them would wait for the device); ``on_encode(n)`` as vocabulary phrases are encoded."""
    env, device = distributed.setup(cfg.run.device)
    try:
        plan = _plan(cfg, resume, env)
        model, opt = _build(cfg, plan, device)
        stats = TrainStats(
            start_step=plan.start_step, steps=plan.start_step, total_steps=plan.total
        )
        if plan.start_step >= plan.total:
            # Already there (a resume of a finished run): train nothing, log nothing, and say so.
            stats.checkpoint = str(plan.checkpoint)
            return stats
        run = Path(cfg.run.output)
        if env.main:
            run.mkdir(parents=True, exist_ok=True)
            for folder in (run, run / "checkpoints"):
                clean_stale(folder)  # temporaries of a run that was killed
            write_json(run / "config.json", cfg.to_dict())
        masks = plan.masks is not None
        vocab = Vocabulary(cfg.data.shards) if not masks else None
        if not masks and cfg.data.absent and not vocab.phrases:
            raise UserError(
                f"data.absent draws negatives from {Path(cfg.data.shards) / VOCABULARY}, which "
                "does not exist; run `synseg-data pack` again to write it"
            )
        if cfg.run.val_every:  # one line now, not at the first validation
            from trainer.eval.datasets import open_dataset

            open_dataset(cfg.run.val_dataset, cfg.run.val_root, limit=cfg.run.val_limit)
        names = plan.masks.names if masks else None
        phrases = names if masks else vocab.phrases
        cache = _label_table(cfg, model.model, phrases, env, on_encode_start, on_encode)
        stats.phrases_encoded = cache.encoded if cache is not None else 0
        net = _wrap(model, cfg, env, device)
        step_fn = _Step(cfg, model, net, opt, plan.total, cache, vocab, env, device, names)
        _loop(cfg, plan, model, opt, step_fn, stats, env, on_step)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if stats.steps == plan.start_step and plan.checkpoint is not None:
        stats.checkpoint = str(plan.checkpoint)
    return stats


def _read(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The loss terms as numbers: one transfer from the device for all of them."""
    numbers = torch.stack(list(terms.values())).tolist()
    return {k: round(v, 6) for k, v in zip(terms, numbers, strict=True)}


def _shard_batches(cfg, plan: _Plan, env, pin: bool, stats: TrainStats):
    """(epoch, batch index, batch, stream position) from the shard stream, from where the plan
    starts: the saved position of each worker when it fits, else the epoch replayed."""
    stream = ShardStream(
        plan.shards,
        cfg.data.image_size,
        cfg.data.batch_size,
        cfg.data.max_labels,
        cfg.run.seed,
        cfg.data.shuffle_buffer,
        env.rank,
        env.world,
    )
    spe, total = plan.steps_per_epoch, plan.total
    first_epoch, first_batch, resume_at = _stream_start(plan, cfg, env)
    stream.set_epoch(first_epoch)
    stream.check_resume(resume_at, max(1, cfg.data.workers))
    for epoch in range(first_epoch, -(-total // spe)):
        start = first_batch if epoch == first_epoch else 0
        positions = dict(resume_at["workers"]) if resume_at and epoch == first_epoch else {}
        stream.set_epoch(epoch, resume_at if epoch == first_epoch else None)
        batches = iter(loader(stream, cfg.data.workers, pin))
        if resume_at is None and epoch == first_epoch:
            stats.replayed = start
            for _ in range(start):
                next(batches)  # no saved position: replay the stream up to the resume
        for i in range(start, spe):
            batch = next(batches)
            positions[str(batch["worker"])] = batch["state"]
            yield epoch, i, batch, {"epoch": epoch, "batches": i + 1, "positions": positions}


def _mask_batches(cfg, plan: _Plan, env, pin: bool):
    """(epoch, batch index, batch, None) of the mask dataset: a batch is named by its index in
    the epoch's permutation, so a resumed run needs no stream position."""
    spe, total = plan.steps_per_epoch, plan.total
    first_epoch, first_batch, _ = _stream_start(plan, cfg, env)
    for epoch in range(first_epoch, -(-total // spe)):
        start = first_batch if epoch == first_epoch else 0
        plan_e = epoch_batches(
            len(plan.masks), cfg.data.batch_size, cfg.run.seed, epoch, env.rank, env.world
        )
        batches = mask_loader(plan.masks, plan_e[start:], cfg.data.workers, pin)
        for i, batch in enumerate(batches, start):
            yield epoch, i, batch, None


def _loop(cfg, plan: _Plan, model, opt, step_fn: _Step, stats: TrainStats, env, on_step) -> None:
    """Epochs of batches, from where the plan starts to its last step."""
    run = Path(cfg.run.output)
    metrics = MetricsLog(run, plan.start_step, env.main, reporters(cfg.run), cfg.to_dict())
    pin = step_fn.device.type == "cuda"
    spe, total = plan.steps_per_epoch, plan.total
    if plan.masks is not None:
        batches = _mask_batches(cfg, plan, env, pin)
    else:
        batches = _shard_batches(cfg, plan, env, pin, stats)
    model.train()
    t0, seen, step = time.time(), 0, plan.start_step
    try:
        for epoch, i, batch, where in batches:
            step = epoch * spe + i + 1
            terms = step_fn(batch, step, epoch)
            seen += batch["images"].shape[0] * env.world
            stats.bad_samples += batch["bad"]
            rate = seen / max(time.time() - t0, 1e-9)
            stats.steps, stats.images, stats.images_per_second = step, seen, rate
            save = step == total or (cfg.run.save_every and step % cfg.run.save_every == 0)
            values = None
            if step % cfg.run.log_every == 0 or save:
                step_fn.check_finite(terms)
                values = _read(terms)
                stats.loss = values
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
            _validate(cfg, model.model, step, metrics, stats, env)
            if save:
                stats.checkpoint = _save(
                    run, step, model, opt, epoch, cfg, step_fn.cache, env, where
                )
            if step >= total:
                return
    finally:
        metrics.close()


def _validate(cfg, model, step: int, metrics: MetricsLog, stats: TrainStats, env) -> None:
    """Every ``run.val_every`` steps, the main process scores the model as it is on
    ``run.val_dataset`` (eval's protocol and metric) and logs it; the others wait at their
    next step."""
    if not (cfg.run.val_every and step % cfg.run.val_every == 0 and env.main):
        return
    from trainer.eval.evaluate import validate

    model.eval()
    try:
        run = cfg.run
        scores = validate(
            model, cfg, run.val_dataset, run.val_root, run.val_limit, run.val_protocol
        )
    finally:
        model.train()
    stats.val = {"step": step, "dataset": cfg.run.val_dataset, **scores}
    metrics.write({"step": step, "val": stats.val})


def _save(run, step, model, opt, epoch, cfg, cache, env, where: dict | None) -> str:
    """A checkpoint of the main process, with every rank's stream positions in it (none for
    mask batches, which their index names)."""
    path = ""
    distributed.check_ranks_agree(model.trainable_parameters(), env, step)
    checkpoint.refuse_non_finite(model, step)
    stream = None
    if where is not None:
        mine = where["positions"]
        ranks = [mine]
        if env.world > 1:
            ranks = [None] * env.world
            dist.all_gather_object(ranks, mine)
        stream = {
            "epoch": where["epoch"],
            "batches": where["batches"],
            "world": env.world,
            "workers": cfg.data.workers,
            "ranks": ranks,
        }
    if env.main:
        extra = {"model": model.describe()}
        if cache is not None:
            cache.save()
            extra["label_cache"] = cache.identity()
        extra["torch"] = torch.__version__
        path = str(checkpoint.save(run, step, model, opt, epoch, cfg.to_dict(), extra, stream))
    if env.world > 1:
        dist.barrier()
    return path
