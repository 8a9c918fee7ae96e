"""ViL-Seg (shared/seeds/004; Liu et al., "Open-world Semantic Segmentation via Contrasting
and Clustering Vision-Language Embedding", ECCV 2022), trained on the same shards as SynSeg.

Both towers train from the captions (not the noun-phrase labels): ``model`` (the towers, the
clustering head Phi_c, the projection Phi_a; ``ClusterScorer``, its inference), ``losses``
(L_vision, L_cross, L_cluster), ``views`` (local crops, the colour-changed flipped view) and
``presets/`` (``paper``: the paper's recipe, with what it leaves open chosen and said; ``tiny``:
the four-layer CLIP built in code).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from trainer.methods.base import StepContext, StepInputs, TrainedMethod
from trainer.methods.vilseg.losses import LossConfig, Objective
from trainer.methods.vilseg.model import ClusterScorer, ModelConfig, ViLSeg
from trainer.methods.vilseg.views import jitter_flip, local_crops


@lru_cache(maxsize=4)
def _tokenizer(arch: str):
    from trainer.model.backbone import open_clip

    return open_clip().get_tokenizer(arch)


def caption_tokens(captions: list[str], arch: str) -> torch.Tensor:
    """Token ids (B, L) of the captions; CC12M's ``<PERSON>`` read as "person"."""
    return _tokenizer(arch)([c.replace("<PERSON>", "person") for c in captions])


def inputs(images: torch.Tensor, batch: dict, ctx: StepContext) -> StepInputs:
    c = ctx.cfg.loss
    g = torch.Generator().manual_seed(ctx.seed)
    local = None
    if c.local_crops:
        local = local_crops(images, c.local_crops, c.local_size, c.local_scale, g)
    view, flipped = jitter_flip(images, c.jitter_mul, c.jitter_add, c.flip, g)
    tokens = caption_tokens(batch["captions"], ctx.cfg.model.arch).to(ctx.device)
    return StepInputs(
        model={"images": images, "view": view, "local": local, "captions": tokens},
        loss={"flipped": flipped},
    )


def check(cfg) -> list[str]:
    problems = []
    if cfg.data.absent:
        problems.append("data.absent draws negative labels, which ViL-Seg does not read")
    if cfg.data.batch_size < 2:
        problems.append(
            "ViL-Seg contrasts the images of a batch: data.batch_size must be at least 2"
        )
    return problems


def scorer(model: ViLSeg, train_cfg, infer) -> ClusterScorer:
    """Cosines scaled by the eval's --logit-scale, else by 1/tau of the run's L_cross."""
    return ClusterScorer(model, infer.logit_scale or 1 / train_cfg.loss.temperature)


METHOD = TrainedMethod(
    name="vilseg",
    model_config=ModelConfig,
    loss_config=LossConfig,
    build=ViLSeg,
    objective=Objective,
    inputs=inputs,
    scorer=scorer,
    presets=Path(__file__).parent / "presets",
    check=check,
)
