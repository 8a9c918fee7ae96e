"""The world demo's rows and their statistics: which runs make a row, per-seed scores, their
mean and spread, and when two rows differ. The chain (``demo``) and the report (``report``)
both read them; neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

ABLATIONS = {
    "no L_align": ["loss.align=0"],
    "no L_cont": ["loss.cont=0"],
    "no L_back": ["loss.back=0"],
    "no L_sep": ["loss.sep=0"],
}
PAPER_SGD = "SGD lr 1e-5 (paper)"
# The paper's optimiser, and each switch beyond the paper on its own.
SWEEP = {
    PAPER_SGD: ["optim.name=sgd", "optim.lr=1e-5", "optim.momentum=0.9"],
    "projector on visual features": ["model.projector_input=visual"],
    "straight-through clip": ["loss.straight_through=true"],
    "absent negatives (K=2)": ["data.absent=2", "loss.neg=1"],
}
SEED = 42  # the first seed of a trained row (the paper's); the others follow it
INIT = "CLIPSeg-style init"  # the mask-supervised stage, over the seeds
MCCL_START = "CLIPSeg-style init, seed 42 (MCCL's start)"  # the decoder every MCCL run starts from
UNTRAINED = "untrained decoder"
# The CLIPSeg-style stage with each physically-guided loss (shared/seeds/003) on its own. The
# structure head is 32 channels wide on the world's 4x4 patch grid (the paper: 256).
PHYSICAL = {
    "+ L_sac (weighted patch alignment)": ["loss.patch_align=1"],
    "+ L_p (Canny edges)": ["loss.structure=1", "loss.structure_dim=32"],
    "+ L_p (mask edges)": [
        "loss.structure=1",
        "loss.structure_dim=32",
        "loss.structure_target=mask-edges",
    ],
}
VILSEG_CLIP_START = "ViL-Seg untrained (in-world CLIP, random clustering head)"
VILSEG_RANDOM_START = "ViL-Seg untrained (random towers)"
OVSEG_CLIP_START = "OVSegmentor untrained (in-world CLIP, random groups)"


@dataclass(frozen=True)
class TrainedRow:
    """A row of the table trained over the seeds: which method, with which settings, compared
    with which start."""

    name: str
    method: str
    settings: tuple[str, ...]  # every setting of its runs but the seed and the folder
    start: str
    folder: str
    differs: tuple[str, ...] = ()  # what sets it apart, for the report


def split_scores(per_class: dict[str, float | None], unseen: set[str]) -> dict[str, float]:
    """mIoU over the seen classes, the unseen ones and all, and the harmonic mean of the first
    two (the zero-shot convention); a class with no pixels in the split counts in none."""

    def mean(names):
        vals = [per_class[n] for n in names if per_class[n] is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    seen = mean([c for c in per_class if c not in unseen])
    uns = mean([c for c in per_class if c in unseen])
    hm = 2 * seen * uns / (seen + uns) if seen + uns > 0 else 0.0
    return {"seen": seen, "unseen": uns, "all": mean(list(per_class)), "hm": hm}


def summarise(name: str, per_seed: list[dict]) -> dict:
    """A table row: the per-seed scores, their mean, and their spread (the sample standard
    deviation over seeds; 0 for one run)."""
    keys = ("seen", "unseen", "all", "hm")
    n = len(per_seed)
    mean = {k: sum(r[k] for r in per_seed) / n for k in keys}
    spread = {
        k: (sum((r[k] - mean[k]) ** 2 for r in per_seed) / (n - 1)) ** 0.5 if n > 1 else 0.0
        for k in keys
    }
    return {
        "model": name,
        "seeds": [r["seed"] for r in per_seed],
        "per_seed": per_seed,
        "mean": mean,
        "spread": spread,
    }


TIE_FLOOR = 0.005  # half a point of mIoU: below it, no difference is read into 100 val images


def verdict(a: dict, b: dict, key: str) -> str:
    """How row ``b`` compares with row ``a`` on ``key``: a gain or a loss only when the means
    differ by more than twice the larger spread (and by more than half a point), else a tie."""
    delta = b["mean"][key] - a["mean"][key]
    band = max(2 * max(a["spread"][key], b["spread"][key]), TIE_FLOOR)
    if abs(delta) <= band:
        return "tie"
    return "gain" if delta > 0 else "loss"
