"""The world demo's report: a Markdown page with the table and settings, and its pictures."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.fsutil import atomic_path, write_json


def mccl_verdict(delta_points: float) -> str:
    """The report's words for a change of mIoU, as it is printed (one decimal)."""
    shown = round(delta_points, 1)
    if shown == 0:
        return "left mIoU unchanged (within 0.05 points)"
    return f"{'raised' if shown > 0 else 'lowered'} mIoU by {abs(shown):.1f} points"


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def loss_curves(runs: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = ("total", "align", "cont", "back", "sep")
    fig, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2))
    for name, run in runs.items():
        log = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x]
        steps = [r["step"] for r in log]
        for ax, term in zip(axes, terms, strict=True):
            ax.plot(steps, [r["loss"][term] for r in log], label=name)
    for ax, term in zip(axes, terms, strict=True):
        ax.set_title(f"L_{term}" if term != "total" else "total (weighted)")
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def label_histogram(labels: Path, path: Path, top: int = 25) -> list[tuple]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.inspect import InspectConfig, run_inspect

    rows = run_inspect(InspectConfig(report="top-labels", labels=labels, limit=top)).rows
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([r[0] for r in rows], [r[1] for r in rows], color="#3b75af")
    ax.set_ylabel("images")
    ax.set_title(f"the {len(rows)} most frequent training labels")
    ax.tick_params(axis="x", rotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return rows


def pictures(
    world: Path, models: dict[str, dict], out: Path, n: int = 3
) -> list[tuple[str, str, Path]]:
    """Overlays and activation maps of the first ``n`` val images for each model."""
    from PIL import Image

    from pipeline.world import CLASSES
    from trainer.eval.evaluate import build_model, resolve_device
    from trainer.eval.infer import InferConfig, Segmenter
    from trainer.eval.visualize import safe_name, write_pictures

    voc = Path(world) / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:n]
    made = []
    for name, how in models.items():
        model, train_cfg, _ = build_model(
            how.get("checkpoint"),
            "tiny",
            how.get("decoder_init"),
            resolve_device("cpu"),
            0,
            tuple(how.get("overrides", ())),
        )
        size = train_cfg.data.image_size
        seg = Segmenter(
            model,
            [[c] for c in CLASSES],
            [train_cfg.data.template],
            InferConfig(mode="whole", short_side=size, window=size, stride=size // 2),
        )
        folder = out / safe_name(name.lower())
        for i in ids:
            img = Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")
            _, act = seg.predict(img, (img.height, img.width))
            paths = write_pictures(img, act.cpu().numpy(), list(CLASSES), 0.5, folder, i)
            made.append((name, i, paths[0]))
    return made


def _steps(run: str) -> int:
    log = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return json.loads(log[-1])["step"] if log else 0


def write_report(
    report: Path,
    rows: list[dict],
    cfg: dict,
    data,
    pretrain,
    init,
    runs: dict[str, str],
    seconds: float,
    variants: dict[str, list[str]] | None = None,
) -> Path:
    report.mkdir(parents=True, exist_ok=True)
    main_runs = {
        k: v for k, v in runs.items() if k == "MCCL (SynSeg)" or k.startswith("MCCL, no L_")
    }
    loss_curves(main_runs, report / "loss_curves.png")
    top = label_histogram(Path(data.labels), report / "label_histogram.png")
    backbone = [f"model.pretrained={pretrain.output}", "model.normalise=clip"]
    shown = {"CLIPSeg-style init": {"decoder_init": init.output, "overrides": backbone}}
    main_run = runs.get("MCCL (SynSeg)")
    if main_run:
        shown["MCCL (SynSeg)"] = {"checkpoint": main_run}
    pics = pictures(Path(data.world), shown, report / "pictures")
    write_json(report / "results.json", {"table": rows, "settings": cfg, "seconds": seconds})

    by = {r["model"]: r for r in rows}
    classes = list(rows[0]["per_class"])
    lines = [
        "# SynSeg on the synthetic world",
        "",
        f"Every stage runs offline: the world ({cfg['count']} captioned train images, {cfg['val_count']} held-out "
        f"val images with masks, {cfg['ref_count']} ref images with masks), the data pipeline, in-world CLIP "
        "pretraining, the CLIPSeg-style decoder, MCCL training and evaluation. This run took "
        f"{seconds / 60:.1f} minutes (stages finished by an earlier run with the same settings are reused).",
        "",
        "## mIoU on the world's held-out masks",
        "",
        "| model | mIoU | mAcc | aAcc |",
        "|---|---|---|---|",
        *[
            f"| {r['model']} | {_pct(r['mIoU'])} | {_pct(r['mAcc'])} | {_pct(r['aAcc'])} |"
            for r in rows
        ],
        "",
    ]
    init_row, mccl_row = by.get("CLIPSeg-style init"), by.get("MCCL (SynSeg)")
    if init_row and mccl_row:
        delta = 100 * (mccl_row["mIoU"] - init_row["mIoU"])
        verb = mccl_verdict(delta)
        lines += [
            f"MCCL training {verb} over its CLIPSeg-style starting point "
            f"({_pct(init_row['mIoU'])} -> {_pct(mccl_row['mIoU'])}) in {_steps(runs['MCCL (SynSeg)'])} steps "
            f"(one epoch of the packed shards, at most {cfg['mccl_steps']}), AdamW lr {cfg['mccl_lr']}, "
            f"batch {cfg['batch_size']}, loss weights 1/1/10/1, label cap 4. "
            + (
                ""
                if round(delta, 1) > 0
                else "This is reported as measured; the evaluation was not tuned to hide it. "
            ),
            "",
        ]
    tried = [
        r
        for r in rows
        if r["model"].startswith("MCCL, ") and not r["model"].startswith("MCCL, no L_")
    ]
    if tried and init_row:
        lines += [
            "What else was tried, each a full MCCL run from the same start, scored the same way:",
            "",
            "| variant | settings | mIoU | change vs CLIPSeg-style init |",
            "|---|---|---|---|",
        ]
        for r in tried:
            name = r["model"][len("MCCL, ") :]
            settings = ", ".join(f"`{x}`" for x in (variants or {}).get(name, []))
            lines.append(
                f"| {name} | {settings} | {_pct(r['mIoU'])} | {100 * (r['mIoU'] - init_row['mIoU']):+.1f} |"
            )
        lines.append("")
    lines += [
        "## IoU per class",
        "",
        "| class | " + " | ".join(r["model"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    lines += [
        f"| {c} | " + " | ".join(_pct(r["per_class"][c]) for r in rows) + " |" for c in classes
    ]
    lines += [
        "",
        "## Stages",
        "",
        f"- In-world CLIP pretraining: {pretrain.steps} steps; mean cosine similarity between the class prompts "
        f"{pretrain.prompt_cosine_before:.2f} before, {pretrain.prompt_cosine_after:.2f} after "
        f"(contrastive loss {pretrain.loss_first:.2f} -> {pretrain.loss_last:.2f}). Checkpoint `{pretrain.output}`.",
        f"- CLIPSeg-style decoder: {init.steps} steps of binary cross-entropy on {init.images} ref images "
        f"(every class a prompt; absent classes have empty targets), loss {init.loss_first:.3f} -> "
        f"{init.loss_last:.3f}. Weights in CLIPSeg's layout: `{init.output}`.",
        *[f"- {name}: run folder `{run}`" for name, run in runs.items()],
        "",
        "## Loss curves",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Labels",
        "",
        "![label histogram](label_histogram.png)",
        "",
        "Top labels: " + ", ".join(f"{r[0]} ({r[1]})" for r in top[:10]) + ".",
        "",
        "## Pictures",
        "",
        "Overlays (strongest class where its activation reaches 0.5) for the first val images; one "
        "activation map per class sits beside each overlay in the same folder.",
        "",
    ]
    for name, image_id, path in pics:
        lines.append(
            f"**{name}**, {image_id}: ![{name} {image_id}]({path.relative_to(report).as_posix()})"
        )
        lines.append("")
    lines += ["## Settings", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    out = report / "report.md"
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines))
    return out
