"""Images per second of a SynSeg training step, and the share of it spent in the frozen backbone.

The baseline is the frozen backbone's forward pass alone on the same batch, in the same run:
a step can never be faster than it, and the ratio says how much the trainable part (decoder
over every (image, label) slot, FSS, losses, backward, optimizer) adds on top.

    python benchmarks/train_step.py                 # tiny preset on CPU; ViT-B-16 too if CUDA is there
    python benchmarks/train_step.py --steps 20 --labels 4

ViT-B-16 runs with random weights (the speed does not depend on them): no download needed.
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.model.losses import LossConfig, MCCLoss
from trainer.model.synseg import ModelConfig, SynSeg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    name: str,
    model_cfg: ModelConfig,
    size: int,
    batch: int,
    labels: int,
    steps: int,
    device: torch.device,
    bf16: bool,
) -> None:
    torch.manual_seed(0)
    model = SynSeg(model_cfg).to(device).train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-5, momentum=0.9)
    loss_fn = MCCLoss(LossConfig())
    d = model.backbone.embed_dim
    images = torch.rand(batch, 3, size, size, device=device)
    text = torch.randn(batch, labels, d, device=device)
    mask = torch.ones(batch, labels, dtype=torch.bool, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def backbone_only() -> None:
        with torch.no_grad(), autocast:
            model.backbone.visual_taps((images - model.mean) / model.std)

    def step() -> None:
        with autocast:
            out = model(images, text)
        loss = loss_fn(out.f.float(), out.fbar.float(), text, mask)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def rate(fn) -> float:
        for _ in range(2):  # warm up
            fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        return batch * steps / (time.perf_counter() - t)

    base = rate(backbone_only)
    full = rate(step)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    trainable = sum(p.numel() for p in model.trainable_parameters()) / 1e6
    print(
        f"{name}: {size} px, batch {batch}, {labels} labels/image, {device.type}{' bf16' if bf16 else ''}, "
        f"{params:.1f}M params ({trainable:.2f}M trainable)"
    )
    print(f"  baseline: frozen backbone forward   {base:9.1f} images/s")
    print(
        f"  training step                       {full:9.1f} images/s   {full / base:.2f}x the baseline"
    )
    print(f"  share of the step in the backbone   {full / base:9.1%}")
    if device.type == "cuda":
        print(
            f"  peak GPU memory                     {torch.cuda.max_memory_allocated() / 2**30:9.2f} GiB"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--labels",
        type=int,
        default=4,
        help="label slots per image (the paper's images have a few)",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tiny = ModelConfig(
        arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=256, dropout=0.0
    )
    measure("tiny preset", tiny, 64, 16, args.labels, args.steps, torch.device("cpu"), bf16=False)
    if torch.cuda.is_available():
        vit = ModelConfig(arch="ViT-B-16-quickgelu", pretrained=None, taps=(3, 6, 9))
        measure(
            "ViT-B-16 (paper preset)",
            vit,
            224,
            128,
            args.labels,
            args.steps,
            torch.device("cuda"),
            bf16=True,
        )
    else:
        print("ViT-B-16 at 224, batch 128: skipped (no CUDA device)")


if __name__ == "__main__":
    main()
