"""OVSegmentor (shared/seeds/001; Xu et al., "Learning Open-vocabulary Semantic Segmentation
Models From Natural Language Supervision", CVPR 2023), trained on the same shards as SynSeg.

``model`` (the grouping ViT, the binding module, CLIP's text tower, the projections, the
entity-completion decoder, the momentum model; ``GroupScorer``, its inference), ``losses``
(L_contrast, L_entity, L_mask, the lambda schedule), ``text`` (the caption's three readings),
``partners`` (the partner images ``synseg-data pair`` recorded) and ``presets/`` (``paper``:
the paper's recipe with the public code's values beside it; ``tiny``: the four-layer CLIP built
in code).

A step reads each image's entities and draws its partner from ``partners.parquet`` with the
step's own generator, so a resumed run sees the pairs the uninterrupted one saw; the momentum
model is updated after every optimizer step (``after_step``) and saved with the checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from trainer.methods.base import Dense, StepContext, StepInputs, TrainedMethod
from trainer.methods.ovsegmentor.losses import LossConfig, Objective, mask_weight_at
from trainer.methods.ovsegmentor.model import GroupScorer, ModelConfig, OVSegmentor
from trainer.methods.ovsegmentor.partners import table
from trainer.methods.ovsegmentor.text import codec, entity_sentence


@lru_cache(maxsize=4)
def _templates(name: str) -> tuple[str, ...]:
    """A templates file, read once (not at every step)."""
    from trainer.eval.infer import read_templates

    return tuple(read_templates(name))


def inputs(images: torch.Tensor, batch: dict, ctx: StepContext) -> StepInputs:
    cfg, c = ctx.cfg, ctx.cfg.loss
    text = codec(cfg.model)
    pairs = table(cfg.data.shards)
    uids = batch["uids"]
    entities = [pairs.entities(u) for u in uids]
    model = {"images": images, "captions": text.tokenize(batch["captions"]).to(ctx.device)}
    if c.entity_weight:
        templates = _templates(c.entity_templates)
        ids, masked = text.masked(batch["captions"], entities)
        sentences = [entity_sentence(e, ctx.rng.choice(templates)) for e in entities]
        model |= {
            "masked_captions": ids.to(ctx.device),
            "masked_positions": masked.to(ctx.device),
            "entity_sentences": text.tokenize(sentences).to(ctx.device),
            "entity_rows": torch.tensor([bool(e) for e in entities], device=ctx.device),
        }
    lam = mask_weight_at(ctx.epoch, c)
    if lam:
        size = images.shape[-1]
        drawn = [pairs.draw(u, ctx.rng) for u in uids]
        partner_images = torch.stack(
            [
                pairs.image(d[0], size) if d else torch.zeros(3, size, size, dtype=torch.uint8)
                for d in drawn
            ]
        )
        template = _templates("single")[0]
        shared = text.tokenize([template.format(d[1] if d else "") for d in drawn])
        model |= {
            "partners": (partner_images.float() / 255).to(ctx.device, images.dtype),
            "shared": shared.to(ctx.device),
            "partner_rows": torch.tensor([d is not None for d in drawn], device=ctx.device),
            "ratio": c.group_ratio,
            "delta": c.delta,
            "binarise": c.mask_binarise,
        }
    return StepInputs(model=model, loss={"mask_weight": lam})


def after_step(model: OVSegmentor, cfg) -> None:
    model.ema_update(cfg.loss.momentum)


def check(cfg) -> list[str]:
    problems = []
    if cfg.data.absent:
        problems.append("data.absent draws negative labels, which OVSegmentor does not read")
    if cfg.data.batch_size < 2:
        problems.append("OVSegmentor contrasts the images of a batch: data.batch_size >= 2")
    if cfg.model.image_init == "dino" and not cfg.model.dino_checkpoint:
        problems.append(
            "model.image_init=dino loads model.dino_checkpoint (a DINO ViT file): give one, or "
            "model.image_init=clip or random"
        )
    return problems


def scorer(model: OVSegmentor, train_cfg, infer) -> GroupScorer:
    """Weighted cosines, their softmax at the eval's --logit-scale or the run's learnt one."""
    return GroupScorer(model, infer.logit_scale)


def class_text(model: OVSegmentor, names: list[str], ctx: StepContext) -> torch.Tensor:
    """(C, d) the classes' prompts through the text tower (which trains: with gradients)."""
    template = ctx.cfg.data.template
    tokens = codec(ctx.cfg.model).tokenize([template.format(n) for n in names])
    return model.text_embedding(tokens.to(ctx.device))


DENSE = Dense(
    text=class_text,
    forward=lambda model, images, text: model.dense_train(images, text),
    widths=lambda model: ([model.image_encoder.width], model.cfg.output_dim),
    probabilities="softmax",  # the class scores' softmax, as its inference reads them
)


METHOD = TrainedMethod(
    name="ovsegmentor",
    model_config=ModelConfig,
    loss_config=LossConfig,
    build=OVSegmentor,
    objective=Objective,
    inputs=inputs,
    scorer=scorer,
    presets=Path(__file__).parent / "presets",
    check=check,
    after_step=after_step,
    dense=DENSE,
)
