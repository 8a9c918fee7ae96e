"""OVSegmentor's objective (the paper's section 3.2):

    L_total = L_contrast + w_e L_entity + lambda(epoch) L_mask

- L_contrast (Eq. 7): symmetric InfoNCE between z^I (the mean group token) and z^T (the
  caption), at the learnable logit scale (its temperature starts at 0.07, the scale is capped
  at 100, as the public code does; the paper omits the temperature from its equations);
- L_entity (Eq. 9): the same between z^M (the masked caption completed by the groups) and z^E
  (the prompted-entity sentence), over the images that have an entity;
- L_mask (Eq. 12): for an image and its partner, the K' = rK groups of each most similar to the
  shared entity; the image's masks under its partner's groups matched (Hungarian, cost
  -cos, Eq. 11) to its masks under its own groups from the momentum model, binarised at delta,
  and scored by the Dice loss D(m, m^) = 1 - (2|m m^| + s) / (|m| + |m^| + s) summed over the
  K' pairs; half the sum of both directions (``mask_symmetric``; the code's default scores the
  partner's direction only), averaged over the images that have a partner;
- lambda: 0 before epoch ``mask_start_epoch`` (the paper: the first 30), ``mask_weight`` (0.1)
  from it on.

The paper prints Eqs. 7 and 9 as the ratio alone; the loss minimised is its negative log, as in
the public code. Code values that differ are settings: delta (code 0.6), the binarisation
(``mask_binarise``: the code thresholds at delta times each mask's maximum), the Dice smoothing
(code 1), the direction(s) scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from synseg.errors import UserError
from trainer.methods.base import full_precision
from trainer.train.physical import AuxiliaryLosses

BINARISE = ("absolute", "relative")


@dataclass(frozen=True)
class LossConfig(AuxiliaryLosses):
    entity_weight: float = 1.0  # w_e of L_entity (the paper: 1; 0: no entity completion)
    mask_weight: float = 0.1  # lambda of L_mask once it is on (the paper: 0.1)
    mask_start_epoch: int = 30  # the first epoch (0-based) with L_mask on (the paper: 30)
    group_ratio: float = 0.5  # r: the share of groups taken for the shared entity (0.5)
    delta: float = 0.65  # the targets' binarisation threshold (the paper: 0.65; code: 0.6)
    mask_binarise: str = "absolute"  # absolute (m >= delta) or relative (m >= delta max m, code)
    dice_smooth: float = 0.0  # s in the Dice loss (the paper: 0; the code: 1)
    mask_symmetric: bool = True  # both images' directions (the paper's Eq. 12); False: one
    momentum: float = 0.99  # the momentum model's EMA coefficient (the paper: 0.99)
    entity_templates: str = "single"  # the prompted-entity sentence's templates (one drawn a step)

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if min(self.entity_weight, self.mask_weight, self.dice_smooth) < 0:
            problems.append("entity_weight, mask_weight and dice_smooth must not be negative")
        if self.mask_start_epoch < 0:
            problems.append("mask_start_epoch must not be negative")
        if not 0 < self.group_ratio <= 1:
            problems.append("group_ratio must be in (0, 1]")
        if not 0 < self.delta < 1:
            problems.append("delta must be in (0, 1)")
        if self.mask_binarise not in BINARISE:
            problems.append(f"mask_binarise must be one of {', '.join(BINARISE)}")
        if not 0 <= self.momentum < 1:
            problems.append("momentum must be in [0, 1)")
        if problems:
            raise UserError("; ".join(problems))


def mask_weight_at(epoch: int, cfg: LossConfig) -> float:
    """lambda of an epoch (0-based): 0 before ``mask_start_epoch``, ``mask_weight`` from it."""
    return cfg.mask_weight if epoch >= cfg.mask_start_epoch else 0.0


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of paired normalised embeddings a, b (n, d) at ``scale``."""
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def dice(target: torch.Tensor, pred: torch.Tensor, smooth: float) -> torch.Tensor:
    """D(m, m^) over the last axis: 1 - (2 sum m m^ + s) / (sum m + sum m^ + s)."""
    num = 2 * (target * pred).sum(-1) + smooth
    den = target.sum(-1) + pred.sum(-1) + smooth
    return 1 - num / den.clamp(min=1e-12)


def hungarian(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Eq. 11 for masks (n, K', L): for each row the permutation p (n, K') with p[k] the
    predicted mask matched to target k, minimising sum_k -cos(m_k, m^_p(k))."""
    cost = -(F.normalize(target, dim=-1) @ F.normalize(pred, dim=-1).transpose(1, 2))
    cost = cost.detach().double().cpu().numpy()
    perms = [linear_sum_assignment(c)[1] for c in cost]
    return torch.as_tensor(np.stack(perms), dtype=torch.long, device=pred.device)


def mask_consistency(
    pred: torch.Tensor,
    target: torch.Tensor,
    rows: torch.Tensor,
    smooth: float,
    symmetric: bool,
    soft: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_mask: pred, target (2B, L, K'), rows [0, B) the images, [B, 2B) their partners;
    ``rows`` (B,) which images have a partner; ``soft``: the targets before binarisation, the
    masks matched (the binarised targets if None)."""
    B = rows.shape[0]
    p, t = pred.transpose(1, 2), target.transpose(1, 2)  # (2B, K', L)
    perm = hungarian(t if soft is None else soft.transpose(1, 2), p)
    matched = torch.gather(p, 1, perm[..., None].expand(-1, -1, p.shape[-1]))
    per = dice(t, matched, smooth).sum(-1)  # (2B,)
    per = (per[:B] + per[B:]) / 2 if symmetric else per[B:]
    w = rows.to(per.dtype)
    return (per * w).sum() / w.sum().clamp(min=1)


class Objective(nn.Module):
    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out, mask_weight: float = 0.0) -> dict[str, torch.Tensor]:
        c = self.cfg
        scale = full_precision(out.logit_scale)
        terms = {"contrast": info_nce(full_precision(out.image), full_precision(out.text), scale)}
        zero = terms["contrast"] * 0
        entity = zero
        if out.masked is not None:
            keep = out.entity_rows
            if int(keep.sum()) >= 2:
                entity = info_nce(
                    full_precision(out.masked[keep]), full_precision(out.entity[keep]), scale
                )
        terms["entity"] = entity
        mask = zero
        if out.mask_pred is not None and bool(out.mask_rows.any()):
            mask = mask_consistency(
                full_precision(out.mask_pred),
                full_precision(out.mask_target),
                out.mask_rows,
                c.dice_smooth,
                c.mask_symmetric,
                None if out.mask_soft is None else full_precision(out.mask_soft),
            )
        terms["mask"] = mask
        terms["total"] = terms["contrast"] + c.entity_weight * entity + mask_weight * mask
        return terms
