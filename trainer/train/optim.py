"""The optimizer of a run and its learning rate at each step.

The rate is a function of the step alone (linear warm-up over ``optim.warmup`` steps, then
constant or a cosine towards 0 at the last step), set before every step: a resumed run needs
no scheduler state to continue on the same curve.
"""

from __future__ import annotations

import math

import torch


def build_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """``cfg``: the ``optim`` settings group."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total: int, cfg) -> float:
    """The learning rate of step ``step`` (1-based) of ``total``, as open_clip's ``cosine_lr``
    computes it (0-based ``s = step - 1``): ``lr (s + 1) / warmup`` while ``s < warmup``, then
    ``lr`` (constant) or ``lr (1 + cos(pi e / es)) / 2`` with ``e = s - warmup``,
    ``es = total - warmup`` (cosine)."""
    s = step - 1
    if s < cfg.warmup:
        return cfg.lr * (s + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        e, es = s - cfg.warmup, max(1, total - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * e / es)) * cfg.lr
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
