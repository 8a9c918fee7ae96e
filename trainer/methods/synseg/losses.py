"""Feature Synergy Structure and the Multi-Category Contrastive Learning losses.

For an image with categories c = 1..N, S_c is the sigmoid activation map of c pooled to the
patch grid (HW,), P the projected features (HW, d). Foreground and background synergy vectors
are mass-normalised weighted means:

    f_c = S_c P / sum(S_c)          fbar_c = (1 - S_c) P / sum(1 - S_c)

With sim the cosine similarity clipped to [0.005, 0.995]:

    L_align = -1/N   sum_c      log sim(f_c, t_c)
    L_cont  = -1/N   sum_c      log(1 - sim(f_c, fbar_c))
    L_back  = -1/N^2 sum_{j!=k} log sim(fbar_j, fbar_k)
    L_sep   = -1/N^2 sum_{j!=k} log(1 - sim(f_j, f_k))

The paper's pair sums include j = k; those terms are constants (sim = 1, clipped to 0.995)
with no gradient, so they are left out; the 1/N^2 normalisation is kept. Everything is batched:
(B, N) with a mask, since images have different N. Losses are averaged over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.train.physical import AuxiliaryLosses

LOSS_TERMS = ("align", "cont", "back", "sep", "neg")


def synergy(
    maps: torch.Tensor, feats: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background synergy vectors.

    maps: (B, N, HW) activations in [0, 1]; feats: (B, N, HW, d) or (B, HW, d) (shared by N).
    Returns f, fbar: (B, N, d).
    """
    fg_w = maps / (maps.sum(-1, keepdim=True) + eps)  # (B, N, HW)
    bg = 1 - maps
    bg_w = bg / (bg.sum(-1, keepdim=True) + eps)
    if feats.dim() == 3:  # one feature map per image
        return fg_w @ feats, bg_w @ feats
    return (fg_w.unsqueeze(-2) @ feats).squeeze(-2), (bg_w.unsqueeze(-2) @ feats).squeeze(-2)


@dataclass(frozen=True)
class LossConfig(AuxiliaryLosses):
    align: float = 1.0  # lambda_1; 0 switches the term off (Table 2 ablation)
    cont: float = 1.0  # lambda_2
    back: float = 10.0  # lambda_3
    sep: float = 1.0  # lambda_4
    neg: float = 0.0  # weight of the absent-category term (not in the paper)
    clip_min: float = 0.005
    clip_max: float = 0.995
    straight_through: bool = False  # clamp the value, pass the gradient (not in the paper)


class MCCLoss(nn.Module):
    """The four MCCL terms (and the optional absent-category term), returned by name."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def _sim(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = F.cosine_similarity(a, b, dim=-1, eps=1e-8)
        clipped = s.clamp(self.cfg.clip_min, self.cfg.clip_max)
        if self.cfg.straight_through:
            # The hard clamp has zero gradient outside its range: at a random start, where
            # foreground and background features are nearly equal (sim > 0.995), L_cont
            # cannot move. Forward the clamped value, backward the identity.
            return s + (clipped - s).detach()
        return clipped

    def forward(
        self,
        f: torch.Tensor,
        fbar: torch.Tensor,
        text: torch.Tensor,
        mask: torch.Tensor,
        absent_maps: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """f, fbar, text: (B, N, d); mask: (B, N) bool, True for real categories.

        absent_maps: optional (B, K, HW) maps of categories not in the image (for ``neg``).
        Returns each term (averaged over images that have categories) and ``total``.
        """
        m = mask.float()  # (B, N)
        n = m.sum(1)  # (B,)
        has = n > 0
        n_safe = n.clamp(min=1)
        pair = m[:, :, None] * m[:, None, :]  # (B, N, N)
        pair = pair * (1 - torch.eye(m.shape[1], device=m.device))  # j != k

        def mean_over_images(per_image: torch.Tensor) -> torch.Tensor:
            return per_image[has].mean() if has.any() else per_image.sum() * 0

        terms: dict[str, torch.Tensor] = {}
        s_align = self._sim(f, text)  # (B, N)
        terms["align"] = mean_over_images(-(torch.log(s_align) * m).sum(1) / n_safe)
        s_cont = self._sim(f, fbar)
        terms["cont"] = mean_over_images(-(torch.log(1 - s_cont) * m).sum(1) / n_safe)
        s_back = self._sim(fbar[:, :, None], fbar[:, None, :])  # (B, N, N)
        terms["back"] = mean_over_images(-(torch.log(s_back) * pair).sum((1, 2)) / n_safe**2)
        s_sep = self._sim(f[:, :, None], f[:, None, :])
        terms["sep"] = mean_over_images(-(torch.log(1 - s_sep) * pair).sum((1, 2)) / n_safe**2)
        if absent_maps is not None and absent_maps.numel():
            # An absent category's map should stay dark: -log(1 - mean activation).
            dark = absent_maps.mean(-1).clamp(max=self.cfg.clip_max)
            terms["neg"] = -torch.log(1 - dark).mean()
        else:
            terms["neg"] = f.sum() * 0
        terms["total"] = sum(getattr(self.cfg, k) * terms[k] for k in LOSS_TERMS)
        return terms
