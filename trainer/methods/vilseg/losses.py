"""ViL-Seg's three objectives (Liu et al., ECCV 2022, section 3; Eq. 1: weights 1, 1, 1).

L_vision (Eq. 2), multi-crop self-distillation: the global view's projection
``P_g = softmax(Phi_a(e_v(x)) / T_g)`` is the target of each local view's
``P_l = softmax(Phi_a(e_v(x_l)) / T_l)``, by cross-entropy ``H(P_g, P_l) = -sum_k P_g log P_l``,
averaged over the local views and the batch. Phi_a: a linear map to 2048 dimensions.

L_cross (Eqs. 3-4), image-to-text InfoNCE over the batch with cosine similarity:
``-1/b sum_m log( exp(cos(v_m, t_m) / tau) / sum_n exp(cos(v_m, t_n) / tau) )``.

L_cluster (Eqs. 5-8), minus the mutual information of the cluster assignments of an image and
of its transformed view (flip undone), as IIC computes it: ``J = mean_i q_i q'_i^T`` over every
patch of every image (C x C), symmetrised ``(J + J^T) / 2``, normalised to sum 1, and
``I(J) = sum_cc' J_cc' (ln J_cc' - ln J_c - ln J_c')`` with J and its marginals floored at
``eps``. (The paper's Eq. 7 divides by BHWD; D cannot belong there, and the normalisation to
sum 1 makes the factor irrelevant.)

The paper leaves open the temperatures of L_vision (its Eq. 2 is a plain softmax: 1 and 1;
DINO, whose multi-crop it uses, takes 0.04 for the target and 0.1 for the views), whether the
target's gradient is stopped (self-distillation: stopped here, a setting), and tau (0.07,
CLIP's initial value, fixed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from synseg.errors import UserError
from trainer.methods.base import full_precision
from trainer.methods.vilseg.views import unflip
from trainer.train.physical import AuxiliaryLosses

LOSS_TERMS = ("vision", "cross", "cluster")


@dataclass(frozen=True)
class LossConfig(AuxiliaryLosses):
    vision: float = 1.0  # weight of L_vision (0 switches it off: the paper's Table 2 ablation)
    cross: float = 1.0  # weight of L_cross
    cluster: float = 1.0  # weight of L_cluster
    temperature: float = 0.07  # tau of L_cross (the paper gives no value; CLIP's initial one)
    symmetric: bool = False  # also text-to-image, as CLIP (the paper: image-to-text only)
    vision_temp: float = 1.0  # softmax temperature of the local views (the paper: none)
    vision_target_temp: float = 1.0  # ... of the global view (DINO: 0.04 with 0.1 above)
    vision_stop_grad: bool = True  # the global view is a target only (the paper does not say)
    local_crops: int = 6  # local views per image (the paper: 6)
    local_size: int = 96  # their side in pixels (the paper: "low resolution"; DINO: 96)
    local_scale: tuple[float, float] = (0.05, 0.4)  # their area, fraction of the image (DINO)
    jitter_mul: float = 0.4  # clustering view: colour x [1 - a, 1 + a] per channel
    jitter_add: float = (
        0.1  # ... plus [-b, b] per channel (the paper: "additive and multiplicative")
    )
    flip: float = 0.5  # ... flipped horizontally with this probability
    eps: float = sys.float_info.epsilon  # IIC's floor on J and its marginals

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if not self.temperature > 0 or not self.vision_temp > 0 or not self.vision_target_temp > 0:
            problems.append("temperature, vision_temp and vision_target_temp must be positive")
        if self.local_crops < (1 if self.vision else 0):
            problems.append("local_crops must be at least 1 while vision is on (0 without it)")
        if not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            problems.append("local_scale must be (low, high) with 0 < low <= high <= 1")
        if not 0 <= self.flip <= 1 or self.jitter_mul < 0 or self.jitter_add < 0:
            problems.append("flip must be in [0, 1]; jitter_mul and jitter_add not negative")
        if problems:
            raise UserError("; ".join(problems))


def vision_loss(
    global_logits: torch.Tensor,
    local_logits: torch.Tensor,
    temp: float = 1.0,
    target_temp: float = 1.0,
    stop_grad: bool = True,
) -> torch.Tensor:
    """L_vision: global_logits (B, K') = Phi_a of the global views; local_logits (B, k, K') of
    the k local views of each image."""
    target = torch.softmax(global_logits / target_temp, -1)  # (B, K')
    if stop_grad:
        target = target.detach()
    log_p = torch.log_softmax(local_logits / temp, -1)  # (B, k, K')
    return -(target[:, None] * log_p).sum(-1).mean()


def cross_loss(
    image: torch.Tensor, text: torch.Tensor, tau: float, symmetric: bool = False
) -> torch.Tensor:
    """L_cross: image (b, d), text (b, d) embeddings of paired images and captions."""
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T / tau  # (b, b)
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    return loss


def joint(q: torch.Tensor, q_view: torch.Tensor) -> torch.Tensor:
    """IIC's joint distribution J (C, C) of two soft assignments (B, C, h, w), pixel by pixel."""
    C = q.shape[1]
    a = q.permute(0, 2, 3, 1).reshape(-1, C)  # (B h w, C)
    b = q_view.permute(0, 2, 3, 1).reshape(-1, C)
    j = a.T @ b  # (C, C): sum over pixels of q_i q'_i^T
    j = (j + j.T) / 2
    return j / j.sum()


def mutual_information(j: torch.Tensor, eps: float = sys.float_info.epsilon) -> torch.Tensor:
    """I(J) of a joint distribution (C, C) that sums to 1, its entries and marginals floored."""
    pi = j.sum(1, keepdim=True).clamp(min=eps)  # (C, 1)
    pj = j.sum(0, keepdim=True).clamp(min=eps)  # (1, C)
    jc = j.clamp(min=eps)
    return (j * (torch.log(jc) - torch.log(pi) - torch.log(pj))).sum()


def cluster_loss(
    q: torch.Tensor, q_view: torch.Tensor, eps: float = sys.float_info.epsilon
) -> torch.Tensor:
    """L_cluster = -I(J): q (B, C, h, w) of the images, q_view of their views, flip undone."""
    return -mutual_information(joint(q, q_view), eps)


class Objective(nn.Module):
    """The three terms by name and their weighted sum, in float32 at least, whatever precision
    the forward ran in."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out, flipped: torch.Tensor) -> dict[str, torch.Tensor]:
        """``out``: the model's ViLSegOutput; ``flipped`` (B,) which clustering views were
        flipped (their assignments are flipped back before they are paired)."""
        c = self.cfg
        B = out.global_logits.shape[0]
        if out.local_logits is None:  # no local views (vision switched off)
            vision = out.global_logits.sum() * 0
        else:
            local = full_precision(out.local_logits).view(B, -1, out.local_logits.shape[-1])
            vision = vision_loss(
                full_precision(out.global_logits),
                local,
                c.vision_temp,
                c.vision_target_temp,
                c.vision_stop_grad,
            )
        view = unflip(full_precision(out.clusters_view), flipped)
        terms = {
            "vision": vision,
            "cross": cross_loss(
                full_precision(out.image), full_precision(out.text), c.temperature, c.symmetric
            ),
            "cluster": cluster_loss(full_precision(out.clusters), view, c.eps),
        }
        terms["total"] = sum(getattr(c, k) * terms[k] for k in LOSS_TERMS)
        return terms
