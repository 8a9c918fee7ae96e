"""A CLIPSeg-style decoder trained on the world, standing in for CLIPSeg's released weights.

SynSeg starts its decoder from CLIPSeg, which was trained with dense masks (PhraseCut). The
world plays that part with its ``ref`` split (images with masks, kept apart from the train
and val splits, drawn in another style, showing only the seen classes): for each image every
seen class is a prompt, the present ones with their mask as target and the absent ones with an
empty target (the unseen classes are never prompted: CLIPSeg never met their phrases), and the decoder (FiLM included) learns with
binary cross-entropy on the frozen backbone, as CLIPSeg did. Pixels labelled 255 are ignored.
The result is saved in CLIPSeg's own key layout and loaded the way real CLIPSeg weights are
(``model.decoder_init``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.world import load_world
from synseg.errors import UserError
from synseg.fsutil import atomic_path, read_record, write_record
from trainer.methods.synseg.model import ModelConfig, SynSeg


@dataclass
class ClipSegInitConfig:
    world: str = "data/world"
    output: str = "runs/world/clipseg-world.pth"  # decoder weights in CLIPSeg's layout
    model: dict | None = None  # ModelConfig fields (backbone, decoder sizes, normalisation)
    image_size: int = 64
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    template: str = "a photo of a {}."
    seed: int = 0


@dataclass
class ClipSegInitStats:
    steps: int
    loss_first: float
    loss_last: float
    images: int
    seconds: float
    output: str
    reused: bool = False


def load_split(world: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (N, 3, S, S) in [0, 1], labels (N, S, S) int64 and class names of a world split."""
    voc = Path(world) / "VOC2012"
    ids_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not ids_file.exists():
        raise UserError(
            f"{world} has no {split} split ({ids_file}); make it with `synseg-data world`"
        )
    ids = ids_file.read_text().split()
    if not ids:
        raise UserError(f"the {split} split of {world} is empty; give the world a --ref-count")
    images, labels = [], []
    for i in ids:
        img = (
            Image.open(voc / "JPEGImages" / f"{i}.jpg")
            .convert("RGB")
            .resize((size, size), Image.BICUBIC)
        )
        lab = Image.open(voc / "SegmentationClass" / f"{i}.png").resize((size, size), Image.NEAREST)
        images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        labels.append(torch.from_numpy(np.asarray(lab, dtype=np.int64).copy()))
    classes = (Path(world) / "classes.txt").read_text().split("\n")
    return torch.stack(images).float() / 255, torch.stack(labels), [c for c in classes if c]


def run_clipseg_init(
    cfg: ClipSegInitConfig, on_step: Callable[[int, int, float], None] | None = None
) -> ClipSegInitStats:
    out = Path(cfg.output)
    done = read_record(out, asdict(cfg))
    if done is not None:
        return ClipSegInitStats(**done, reused=True)
    images, labels, classes = load_split(Path(cfg.world), "ref", cfg.image_size)
    unseen = set(load_world(Path(cfg.world)).get("unseen", ()))
    seen = [i for i, c in enumerate(classes) if c not in unseen]  # label values it may learn
    torch.manual_seed(cfg.seed)
    model = SynSeg(ModelConfig(**(cfg.model or {})))
    text = model.backbone.encode_text([cfg.template.format(classes[i]) for i in seen])  # (C, d)
    C = len(seen)
    values = torch.tensor(seen)
    params = [p for n, p in model.named_parameters() if n.startswith("decoder.")]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0, first, last = time.time(), float("nan"), float("nan")
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x, y = images[idx], labels[idx]  # (B, 3, S, S), (B, S, S)
        B = x.shape[0]
        out_t = model.forward_train(x, text[None].expand(B, C, -1))  # every seen class a prompt
        target = (y[:, None] == values[None, :, None, None]).float()  # (B, C, S, S)
        valid = (y != 255)[:, None].expand_as(target).float()
        loss = (
            F.binary_cross_entropy_with_logits(out_t.logits, target, reduction="none") * valid
        ).sum() / valid.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if step == 1 else first
        if on_step:
            on_step(step, cfg.steps, last)
    stats = ClipSegInitStats(cfg.steps, first, last, len(images), time.time() - t0, str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.detach().clone() for k, v in model.decoder.state_dict().items()
    }  # CLIPSeg's key names
    with atomic_path(out) as tmp:
        torch.save(weights, tmp)
    write_record(out, asdict(cfg), {k: v for k, v in asdict(stats).items() if k != "reused"})
    return stats
