"""Mask supervision (``data.supervision=masks``): a dataset's train split, read by eval's own
readers (``trainer.eval.datasets``), as batches of images and label maps, and the mask loss.

Each image is resized to ``data.image_size`` square (bicubic; its labels nearest), as the
world's CLIPSeg-style stage always did. An epoch is one pass over a permutation of the split
drawn from the run's seed and the epoch; each rank takes every ``world``-th image of it and
the batches of one rank are consecutive runs of ``data.batch_size``. A batch is named by its
index alone, so a resumed run reads exactly the batches an uninterrupted one would, whatever
the number of data workers. Every class of the dataset is a prompt at every step, by its first
name in ``data.template``; pixels labelled 255 are ignored.

The mask loss follows how the method turns scores into probabilities (``Dense.probabilities``):
per-class binary cross-entropy for sigmoid scores (CLIPSeg's loss, absent classes with empty
targets) and cross-entropy over the classes for softmax scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from synseg.errors import UserError
from trainer.train.data import square_tensor
from trainer.train.physical import IGNORE


class MaskSet(torch.utils.data.Dataset):
    """The train split of ``dataset`` under ``root``: (3, S, S) uint8 images, (S, S) int64 labels."""

    def __init__(self, dataset: str, root: str, size: int) -> None:
        from trainer.eval.datasets import open_dataset

        if not dataset or not root:
            raise UserError(
                "mask supervision reads a dataset's masks: give --dataset and --data-root "
                "(data.dataset, data.root)"
            )
        self.data = open_dataset(dataset, root, split="train")
        self.size = size
        self.names = [synonyms[0] for synonyms in self.data.classes]

    def __len__(self) -> int:
        return len(self.data.samples)

    def __getitem__(self, i: int):
        try:
            image, label = self.data.load(self.data.samples[i])
        except UserError:
            return None  # counted as a bad sample, as the shard stream counts them
        s = self.size
        lab = Image.fromarray(label.astype(np.uint8)).resize((s, s), Image.NEAREST)
        return square_tensor(image, s), torch.from_numpy(np.asarray(lab, dtype=np.int64).copy())


def epoch_batches(
    n: int, batch: int, seed: int, epoch: int, rank: int, world: int
) -> list[list[int]]:
    """The image indices of each batch of one rank in one epoch."""
    steps = n // (batch * world)
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919) % (2**63))
    mine = torch.randperm(n, generator=g).tolist()[rank::world]
    return [mine[k * batch : (k + 1) * batch] for k in range(steps)]


def _collate(items: list) -> dict:
    good = [it for it in items if it is not None]
    if not good:
        raise UserError("every image of a batch failed to load; check the dataset's files")
    return {
        "images": torch.stack([g[0] for g in good]).float() / 255,
        "masks": torch.stack([g[1] for g in good]),
        "bad": len(items) - len(good),
    }


def loader(data: MaskSet, batches: list[list[int]], workers: int, pin: bool):
    return torch.utils.data.DataLoader(
        data,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
    )


def mask_loss(logits: torch.Tensor, labels: torch.Tensor, probabilities: str) -> torch.Tensor:
    """logits (B, C, H, W) of C classes, labels (B, H, W) in 0..C-1 or 255 (ignored)."""
    logits = logits.float()
    if probabilities == "softmax":
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)
    valid = labels != IGNORE
    values = torch.arange(logits.shape[1], device=labels.device)
    target = (labels[:, None] == values[None, :, None, None]).to(logits.dtype)
    weight = valid[:, None].expand_as(target).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum() / weight.sum().clamp_min(1)
