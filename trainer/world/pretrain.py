"""In-world CLIP pretraining: the tiny open_clip model learns the world from its captions.

A randomly initialised text tower gives every class prompt nearly the same embedding, and
then no segmentation training can tell classes apart. Here both towers of the tiny model train
briefly with open_clip's own contrastive loss (``ClipLoss``) on the packed shards' (image,
caption) pairs. The result is an ordinary open_clip checkpoint file: the trainer loads it as
``model.pretrained=<file>``, as it would load any local CLIP weights.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from synseg.fsutil import atomic_path, read_record, write_record
from trainer.model.backbone import NORMALISE, open_clip
from trainer.train.data import ShardStream, find_shards


@dataclass
class PretrainConfig:
    shards: str = "data/shards"
    output: str = "runs/world/clip-tiny.pt"  # the open_clip checkpoint written
    arch: str = "synseg-tiny"
    init_seed: int = 0
    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    image_size: int = 64
    seed: int = 0


@dataclass
class PretrainStats:
    steps: int
    loss_first: float
    loss_last: float
    prompt_cosine_before: float  # mean pairwise cosine of the class prompts' embeddings
    prompt_cosine_after: float
    seconds: float
    output: str
    reused: bool = False


def prompt_cosine(
    model, tokenizer, classes: list[str], template: str = "a photo of a {}."
) -> float:
    """Mean pairwise cosine similarity of the classes' prompt embeddings (1: indistinguishable)."""
    with torch.no_grad():
        e = model.encode_text(tokenizer([template.format(c) for c in classes]), normalize=True)
    sim = e @ e.T
    n = len(classes)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def run_pretrain(
    cfg: PretrainConfig,
    classes: list[str],
    on_step: Callable[[int, int, float], None] | None = None,
) -> PretrainStats:
    out = Path(cfg.output)
    done = read_record(out, asdict(cfg))
    if done is not None:
        return PretrainStats(**done, reused=True)
    oc = open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)  # the same random start as the trainer's random backbone
        model = oc.create_model(cfg.arch, pretrained=None)
    tokenizer = oc.get_tokenizer(cfg.arch)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISE["clip"])
    before = prompt_cosine(model.eval(), tokenizer, classes)
    model.train()
    loss_fn = oc.loss.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1
    )
    stream = ShardStream(
        find_shards(cfg.shards),
        cfg.image_size,
        cfg.batch_size,
        max_labels=64,
        seed=cfg.seed,
        shuffle_buffer=1000,
    )
    t0 = time.time()
    first = last = float("nan")
    torch.manual_seed(cfg.seed)
    for step, batch in enumerate(itertools.islice(iter(stream), cfg.steps), 1):
        images = (batch["images"] - mean) / std
        tokens = tokenizer([c.replace("<PERSON>", "person") for c in batch["captions"]])
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # at most 100, as open_clip's training does
        last = loss.item()
        first = last if step == 1 else first
        if on_step:
            on_step(step, cfg.steps, last)
    model.eval()
    stats = PretrainStats(
        steps=cfg.steps,
        loss_first=first,
        loss_last=last,
        prompt_cosine_before=before,
        prompt_cosine_after=prompt_cosine(model, tokenizer, classes),
        seconds=time.time() - t0,
        output=str(out),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(model.state_dict(), tmp)
    write_record(out, asdict(cfg), {k: v for k, v in asdict(stats).items() if k != "reused"})
    return stats
