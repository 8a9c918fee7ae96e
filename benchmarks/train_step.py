"""Images per second of the trainer's own training step, against the frozen backbone alone.

The baseline is the frozen backbone's forward pass on the same batch, in the same run: a step
can never be faster than it, and the ratio says what the trainable part (decoder over every
(image, label) slot, FSS, losses, backward, optimizer, label lookup, the host-to-device copy
of the batch) adds on top. The step measured is ``trainer.train.loop._Step``, the code a run
executes, with its settings varied: precision, channels-last, ``torch.compile``. One more row
reads the loss terms after every step (``.item()``), as a loop that logs every step does, to
show what a host-device synchronisation per step costs.

The backbone's FLOPs per image are counted by ``torch.utils.flop_counter`` on one forward
pass; with a known GPU the model FLOPs utilisation (MFU) is that count times images/s over the
GPU's dense bf16 peak.

    python benchmarks/train_step.py              # tiny preset on CPU; ViT-B/16 too if CUDA is there
    python benchmarks/train_step.py --steps 20 --labels 4 --batch 128

ViT-B/16 runs with random weights (the speed does not depend on them): no download needed.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.methods.synseg.model import SynSeg
from trainer.train.config import resolve
from trainer.train.data import Vocabulary
from trainer.train.distributed import Ranks
from trainer.train.loop import _Step, _wrap
from trainer.train.textcache import LabelCache

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class _Phrases(Vocabulary):
    def __init__(self, n: int) -> None:
        self.phrases = [f"thing number {i}" for i in range(n)]
        self.position = {p: i for i, p in enumerate(self.phrases)}


def measure(name: str, preset: str, overrides: list[str], args, device: torch.device) -> None:
    base_cfg = resolve(preset, overrides=[*overrides, f"data.batch_size={args.batch}"])
    batch, size = base_cfg.data.batch_size, base_cfg.data.image_size
    torch.manual_seed(0)
    model = SynSeg(base_cfg.model).to(device).train()
    vocab = _Phrases(args.vocabulary)
    cache = LabelCache(model.backbone, base_cfg.data.template)
    t = time.perf_counter()
    cache.ensure(vocab.phrases, base_cfg.run.encode_batch)
    sync(device)
    encode_rate = len(vocab.phrases) / (time.perf_counter() - t)
    rng = random.Random(0)
    images = torch.rand(batch, 3, size, size)
    if device.type == "cuda":
        images = images.pin_memory()
    labels = [rng.sample(vocab.phrases, args.labels) for _ in range(batch)]
    data = {"images": images, "labels": labels, "bad": 0}
    bf16 = device.type == "cuda"
    mean, std = model.mean.to(device), model.std.to(device)
    on_device = images.to(device)

    def backbone_only() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.backbone.visual_taps((on_device - mean) / std)

    def rate(fn, warmup: int) -> float:
        for _ in range(warmup):
            fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        return batch * args.steps / (time.perf_counter() - t)

    with FlopCounterMode(display=False) as counter:
        backbone_only()
    flops = counter.get_total_flops() / batch  # per image
    base = rate(backbone_only, 2)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    trainable = sum(p.numel() for p in model.trainable_parameters()) / 1e6
    print(
        f"{name}: {size} px, batch {batch}, {args.labels} labels/image, {device.type}, "
        f"{params:.1f}M params ({trainable:.2f}M trainable), backbone {flops / 1e9:.2f} GFLOP/image"
    )
    print(f"  label phrases encoded before training: {encode_rate:9.1f} phrases/s")
    top = peak(device)

    def line(what: str, images_per_s: float) -> None:
        mfu = f"   backbone MFU {flops * images_per_s / top:6.1%}" if top else ""
        ratio = "" if images_per_s == base else f"   {images_per_s / base:.2f}x the baseline"
        print(f"  {what:<40} {images_per_s:9.1f} images/s{ratio}{mfu}")

    line("baseline: frozen backbone forward", base)
    variants = [("training step, fp32", ["run.precision=fp32"], False)]
    if device.type == "cuda":
        variants = [
            ("training step, fp32", ["run.precision=fp32"], False),
            ("training step, bf16", ["run.precision=bf16"], False),
            ("training step, bf16, sync every step", ["run.precision=bf16"], True),
            (
                "training step, bf16, channels-last",
                ["run.precision=bf16", "run.channels_last=true"],
                False,
            ),
            ("training step, bf16, compiled", ["run.precision=bf16", "run.compile=true"], False),
        ]
    elif args.compile:
        variants.append(("training step, fp32, compiled", ["run.compile=true"], False))
    for what, extra, sync_each in variants:
        cfg = resolve(preset, overrides=[*overrides, f"data.batch_size={args.batch}", *extra])
        torch.manual_seed(0)
        m = SynSeg(cfg.model).to(device).train()
        if cfg.run.channels_last:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(m.trainable_parameters(), lr=1e-5, momentum=0.9)
        env = Ranks()
        step = _Step(cfg, m, _wrap(m, cfg, env, device), opt, 10**9, cache, vocab, env, device)
        count = [0]

        def one(step=step, sync_each=sync_each, count=count) -> None:
            count[0] += 1
            terms = step(data, count[0])
            if sync_each:
                _ = {k: v.item() for k, v in terms.items()}

        try:
            line(what, rate(one, 5 if cfg.run.compile else 2))
        except Exception as e:  # a compiler missing on this machine: say so, go on
            print(f"  {what:<40} failed: {str(e).splitlines()[0][:100]}")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--labels", type=int, default=4, help="label phrases per image")
    ap.add_argument("--batch", type=int, default=0, help="images per step (0: 16 tiny, 128 GPU)")
    ap.add_argument("--vocabulary", type=int, default=4096, help="phrases in the label table")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on the CPU")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's note on random weights
    batch = args.batch
    args.batch = batch or 16
    measure("tiny preset", "tiny", ["model.dropout=0.0"], args, torch.device("cpu"))
    if torch.cuda.is_available():
        args.batch = batch or 128
        measure(
            "ViT-B/16 (paper preset)",
            "paper",
            ["model.pretrained=null", "data.image_size=224"],
            args,
            torch.device("cuda"),
        )
    else:
        print("ViT-B/16 at 224 px, batch 128: skipped (no CUDA device)")


if __name__ == "__main__":
    main()
