"""Images per second of eval-style inference, against running the model once per class prompt;
then of the whole eval path (resize, windows, probabilities) per method and protocol.

Eval runs the frozen backbone once per crop and the decoder over all (crop, class) pairs at
once. The baseline, measured in the same run on the same images, is the straightforward use of
a CLIPSeg-style model: one full forward pass (backbone included) per class prompt. Both must
give the same logits. On a GPU the ViT-B-16 figures are set beside the paper's 71 FPS (14 ms
per image, RTX 4090).

The second part runs ``Segmenter`` (what ``synseg-train eval`` runs per image) on VOC-sized
pictures (500 x 375) for every method (ViL-Seg on towers of the same architecture) under both
protocols, against SynSeg under the ``tcl``
protocol in the same run. On the CPU it uses the tiny model with the geometry the world uses
(the protocols scaled to its 64-px input); on a GPU, ViT-B-16 at the protocols' own sizes, in
bf16, set beside the paper's 71 FPS.

    python benchmarks/infer.py [--images 8] [--classes 21]
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.methods.synseg.model import ModelConfig, SynSeg

PAPER_FPS = 71.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    name: str,
    cfg: ModelConfig,
    size: int,
    n_images: int,
    n_classes: int,
    device: torch.device,
    bf16: bool,
    paper: bool,
) -> None:
    torch.manual_seed(0)
    model = SynSeg(cfg).to(device).eval()
    images = torch.rand(n_images, 3, size, size, device=device)
    classes = torch.randn(n_classes, model.backbone.embed_dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def batched() -> torch.Tensor:
        with autocast:
            return torch.cat([model.segment(images[i : i + 1], classes) for i in range(n_images)])

    def per_prompt() -> torch.Tensor:
        with autocast:
            return torch.cat(
                [
                    torch.cat(
                        [
                            model.segment(images[i : i + 1], classes[c : c + 1])
                            for c in range(n_classes)
                        ],
                        1,
                    )
                    for i in range(n_images)
                ]
            )

    def rate(fn) -> tuple[float, torch.Tensor]:
        out = fn()  # warm up
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        return n_images / (time.perf_counter() - t), out

    base, ref = rate(per_prompt)
    fast, got = rate(batched)
    torch.testing.assert_close(
        got.float(), ref.float(), rtol=2e-2 if bf16 else 1e-4, atol=2e-2 if bf16 else 1e-4
    )
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{name}: {size} px, {n_classes} classes, {n_images} images, {device.type}{' bf16' if bf16 else ''}, "
        f"{params:.1f}M params"
    )
    print(f"  baseline: one forward pass per class  {base:8.2f} images/s")
    print(
        f"  eval: one backbone pass per image     {fast:8.2f} images/s  {fast / base:.2f}x  "
        f"({1000 / fast:.1f} ms/image)"
    )
    if paper:
        print(
            f"  paper (RTX 4090): {PAPER_FPS:.0f} images/s, 14 ms/image; this GPU: {fast / PAPER_FPS:.2f}x that"
        )


def protocols(
    name: str, cfg: ModelConfig, world: bool, n_images: int, n_classes: int, device, bf16: bool
) -> None:
    from PIL import Image

    from trainer import methods
    from trainer.eval.evaluate import EvalConfig
    from trainer.eval.infer import Segmenter
    from trainer.eval.protocols import PROTOCOLS
    from trainer.methods.training_free import TRAINING_FREE
    from trainer.methods.vilseg.model import ModelConfig as ViLSegConfig
    from trainer.methods.vilseg.model import ViLSeg
    from trainer.train.config import resolve

    torch.manual_seed(0)
    model = SynSeg(cfg).to(device).eval()
    vilseg_arch = cfg.arch.replace("-quickgelu", "")
    vilseg = ViLSeg(ViLSegConfig(arch=vilseg_arch, pretrained=None)).to(device).eval()
    vilseg_cfg = resolve("tiny", method="vilseg")  # its tau sets the softmax temperature
    g = torch.Generator().manual_seed(1)
    images = [
        Image.fromarray((torch.rand(375, 500, 3, generator=g) * 255).byte().numpy())
        for _ in range(n_images)
    ]
    classes = [[f"class {i}"] for i in range(n_classes)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    size = model.backbone.train_size
    print(f"{name}: whole eval path, {n_images} images of 500 x 375, {n_classes} classes")
    base = None
    for protocol in PROTOCOLS:
        for method in ("synseg", "vilseg", *TRAINING_FREE):
            ev = EvalConfig(
                dataset="world" if world else "voc20",
                data_root=".",
                method=method,
                protocol=protocol,
            )
            infer = ev.inference(size)
            templates = PROTOCOLS[protocol].templates
            from trainer.eval.infer import read_templates

            if method == "vilseg":
                scorer = methods.scorer(method, vilseg, vilseg_cfg, infer)
            else:
                scorer = methods.scorer(method, model, None, infer)
            seg = Segmenter(scorer, classes, read_templates(templates)[:1], infer)
            with autocast:
                seg.predict(images[0], (375, 500))  # warm up
                sync(device)
                t = time.perf_counter()
                for img in images:
                    seg.predict(img, (375, 500))
                sync(device)
            rate = n_images / (time.perf_counter() - t)
            base = base or rate
            line = (
                f"  {protocol:5s} {method:9s} short {infer.short_side} window {infer.window}/"
                f"{infer.stride}: {rate:8.2f} images/s  {rate / base:.2f}x synseg-tcl"
            )
            if not world and method == "synseg" and protocol == "tcl":
                line += f"  (paper: {PAPER_FPS:.0f} images/s, RTX 4090)"
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--classes", type=int, default=21, help="class prompts (VOC has 21)")
    args = ap.parse_args()
    tiny = ModelConfig(arch="synseg-tiny", pretrained=None, taps=(1, 2, 3), ffn_dim=256)
    measure("tiny preset", tiny, 64, args.images, args.classes, torch.device("cpu"), False, False)
    protocols("tiny preset", tiny, True, args.images, args.classes, torch.device("cpu"), False)
    if torch.cuda.is_available():
        vit = ModelConfig(arch="ViT-B-16-quickgelu", pretrained=None, taps=(3, 6, 9))
        for size in (224, 448):
            measure(
                f"ViT-B-16 at {size}",
                vit,
                size,
                args.images,
                args.classes,
                torch.device("cuda"),
                True,
                True,
            )
        protocols("ViT-B-16", vit, False, args.images, args.classes, torch.device("cuda"), True)
    else:
        print("ViT-B-16 at 224 and 448, and per protocol: skipped (no CUDA device)")


if __name__ == "__main__":
    main()
