"""SynSeg (shared/seeds/000): a frozen CLIP, CLIPSeg's decoder with FiLM, the Feature Synergy
Structure projector and the four MCCL losses, trained on the noun phrases of captions.

``model`` (``SynSeg``, ``ModelConfig``), ``losses`` (FSS and MCCL, ``LossConfig``) and
``presets/`` (``paper``: the paper's recipe; ``tiny``: a four-layer CLIP built in code). Its
labels are embedded by the frozen text tower, once per phrase (``label_embeddings``). The same
model with CLIPSeg's released decoder and no training is the ``clipseg`` method.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainer.methods.base import Dense, StepContext, StepInputs, TrainedMethod
from trainer.methods.synseg.losses import LossConfig, MCCLoss
from trainer.methods.synseg.model import DecoderScorer, ModelConfig, SynSeg


def label_table(labels: list[list[str]], ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded label embeddings (B, N, d) and their mask (B, N), gathered on the device from
    the label-embedding table."""
    cache, device = ctx.labels, ctx.device
    n = max(len(ls) for ls in labels)
    rows = torch.zeros(len(labels), n, dtype=torch.long)
    mask = torch.zeros(len(labels), n, dtype=torch.bool)
    flat = cache.indices([p for ls in labels for p in ls])
    i = 0
    for b, ls in enumerate(labels):
        rows[b, : len(ls)] = flat[i : i + len(ls)]
        mask[b, : len(ls)] = True
        i += len(ls)
    mask = mask.to(device, non_blocking=True)
    table = cache.table_on(device)
    text = table[rows.to(device, non_blocking=True)] * mask[..., None]
    return text, mask


def absent_table(labels: list[list[str]], ctx: StepContext) -> torch.Tensor | None:
    """(B, K, d) embeddings of K vocabulary phrases absent from each image (``data.absent``)."""
    k = ctx.cfg.data.absent
    picks = ctx.vocabulary.absent(labels, k, ctx.rng) if k else None
    if picks is None:
        return None
    rows = ctx.labels.indices(picks).to(ctx.device, non_blocking=True)
    return ctx.labels.table_on(ctx.device)[rows].view(len(labels), k, -1)


def inputs(images: torch.Tensor, batch: dict, ctx: StepContext) -> StepInputs:
    text, mask = label_table(batch["labels"], ctx)
    absent = absent_table(batch["labels"], ctx)
    return StepInputs(
        model={"images": images, "text": text, "absent_text": absent},
        loss={"text": text, "mask": mask},
    )


class Objective(nn.Module):
    """MCCL on the model's synergy vectors, in float32 whatever precision the forward ran in."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.mccl = MCCLoss(cfg)

    def forward(self, out, text: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        absent = None if out.absent_maps is None else out.absent_maps.float()
        return self.mccl(out.f.float(), out.fbar.float(), text, mask, absent)


def export_hf(model, cfg) -> tuple[dict, dict, dict, int]:
    """SynSeg as Hugging Face's ``CLIPSegForImageSegmentation``: its frozen CLIP and its
    decoder (the FSS projector trains the decoder and is not part of inference)."""
    from trainer.model import hf
    from trainer.model.backbone import NORMALISE

    clip = model.backbone.model
    state = {**hf.clip_state_dict(clip), **hf.decoder_state_dict(model.decoder)}
    config = hf.clipseg_config(clip, model.decoder, cfg.model.taps)
    mean, std = NORMALISE[model.normalisation]
    processor = hf.image_processor_config(model.backbone.train_size, mean, std)
    return state, config, processor, int(clip.positional_embedding.shape[0])


def class_text(model, names: list[str], ctx: StepContext) -> torch.Tensor:
    """(C, d) the classes' embeddings from the label-embedding table (the frozen text tower
    encoded them once, as the loop does for any label_embeddings method)."""
    rows = ctx.labels.indices(names).to(ctx.device, non_blocking=True)
    return ctx.labels.table_on(ctx.device)[rows]


DENSE = Dense(
    text=class_text,
    forward=lambda model, images, text: model.dense_train(images, text),
    widths=lambda model: ([model.cfg.reduce_dim] * len(model.cfg.taps), model.backbone.embed_dim),
    probabilities="sigmoid",  # the decoder's logits, one binary map per prompt, as CLIPSeg
)


def check(cfg) -> list[str]:
    if cfg.data.absent and not cfg.loss.neg:
        return ["data.absent samples negatives for loss.neg, which is 0"]
    return []


METHOD = TrainedMethod(
    name="synseg",
    model_config=ModelConfig,
    loss_config=LossConfig,
    build=SynSeg,
    objective=Objective,
    inputs=inputs,
    scorer=lambda model, train_cfg, infer: DecoderScorer(model, infer.chunk),
    presets=Path(__file__).parent / "presets",
    label_embeddings=True,
    check=check,
    export_hf=export_hf,
    dense=DENSE,
)
