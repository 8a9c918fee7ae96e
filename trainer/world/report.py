"""The world demo's report: a Markdown page with the table and settings, and its pictures."""

from __future__ import annotations

import json
from pathlib import Path

from synseg.fsutil import atomic_path, write_json
from trainer.world.rows import INIT, MCCL_START, PAPER_SGD, verdict


def pm(row: dict, key: str) -> str:
    """A row's mean in %, with ± its spread over seeds when it has several."""
    mean = _pct(row["mean"][key])
    return mean if len(row["seeds"]) < 2 else f"{mean} ± {100 * row['spread'][key]:.1f}"


def finding(rows: list[dict], movement: dict) -> str:
    """What the experiment found, in words, whichever way it went: MCCL against its start on
    the unseen classes, and which setting (if any) makes a difference beyond the seeds' spread."""

    by = {r["model"]: r for r in rows}
    init, mccl = by.get(MCCL_START) or by.get(INIT), by.get("MCCL (SynSeg)")
    if not (init and mccl):
        return ""
    d = 100 * (mccl["mean"]["unseen"] - init["mean"]["unseen"])
    v = verdict(init, mccl, "unseen")
    words = {"tie": "does not change", "gain": "raises", "loss": "lowers"}[v]
    n = len(mccl["seeds"])
    text = (
        f"With the paper's losses and AdamW, MCCL {words} unseen-class mIoU over its CLIPSeg-style "
        f"start: {pm(init, 'unseen')} -> {pm(mccl, 'unseen')} ({d:+.1f} points, mean ± "
        f"spread over {n} seeds; a difference within twice the spread, or under half a point, "
        "is called a tie). "
        f"Seen classes: {pm(init, 'seen')} -> {pm(mccl, 'seen')}; harmonic mean "
        f"{pm(init, 'hm')} -> {pm(mccl, 'hm')}."
    )
    others = [r for r in rows if r["model"].startswith("MCCL, ")]
    gains = [r for r in others if verdict(init, r, "unseen") == "gain"]
    if gains:
        best = max(gains, key=lambda r: r["mean"]["unseen"])
        text += (
            " Beyond the spread, unseen mIoU rises with: "
            + ", ".join(
                f"{r['model'][len('MCCL, ') :]} ({pm(r, 'unseen')})"
                for r in sorted(gains, key=lambda r: -r["mean"]["unseen"])
            )
            + f"; the largest, {best['model'][len('MCCL, ') :]}, by "
            f"{100 * (best['mean']['unseen'] - init['mean']['unseen']):+.1f} points."
        )
    else:
        text += " No other setting tried raises unseen mIoU beyond the spread either."
    physical = [r for r in rows if r["model"].startswith(f"{INIT} + ")]
    if physical and INIT in by:
        init = by[INIT]
        text += (
            " Under mask supervision, against the CLIPSeg-style decoder's own "
            f"{pm(init, 'unseen')} on the unseen classes: "
            + "; ".join(
                f"{r['model'][len(INIT) + 3 :]} {pm(r, 'unseen')} ({verdict(init, r, 'unseen')})"
                for r in physical
            )
            + "."
        )
    free = [r for r in rows if r["model"].endswith("(training-free)")]
    if free:
        best = max(free, key=lambda r: r["mean"]["unseen"])
        text += (
            f" On the same in-world CLIP, the training-free {best['model'].split()[0]} scores "
            f"{_pct(best['mean']['unseen'])} on the unseen classes and {_pct(best['mean']['seen'])} "
            "on the seen ones."
        )
    text += vilseg_finding(by)
    sgd, adam = movement.get(f"MCCL, {PAPER_SGD}"), movement.get("MCCL (SynSeg)")
    if sgd and adam and sgd["relative"] > 0:
        need = adam["steps"] * adam["relative"] / sgd["relative"]
        text += (
            f" The paper's SGD (lr 1e-5) moved the decoder by {100 * sgd['relative']:.3f}% of its "
            f"weights' norm in {sgd['steps']} steps, AdamW by {100 * adam['relative']:.2f}%: at "
            f"its rate SGD would need about {need:,.0f} steps to move as far (an extrapolation)."
        )
    return text


CAPTION_ROWS = (
    "ViL-Seg from the in-world CLIP",
    "ViL-Seg from scratch (the paper's start)",
    "OVSegmentor from the in-world CLIP",
)


def vilseg_finding(by: dict[str, dict]) -> str:
    """The caption-trained rows (ViL-Seg, OVSegmentor) against their untrained starts, in
    words, whichever way they went."""

    text = ""
    for name in CAPTION_ROWS:
        row = by.get(name)
        start = by.get(row.get("start") or "") if row else None
        if not (row and start):
            continue
        words = {"tie": "does not change", "gain": "raises", "loss": "lowers"}
        text += (
            f" {name}, trained on the same shards' captions, "
            f"{words[verdict(start, row, 'unseen')]} unseen-class mIoU over its untrained start: "
            f"{_pct(start['mean']['unseen'])} -> {pm(row, 'unseen')} (seen "
            f"{_pct(start['mean']['seen'])} -> {pm(row, 'seen')})."
        )
    return text


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def seeds_text(rows: list[dict]) -> str:
    seeded = [r for r in rows if len(r["seeds"]) > 1]
    return ", ".join(str(s) for s in seeded[0]["seeds"]) if seeded else "(one run each)"


def class_mean(row: dict, cls: str) -> float | None:
    vals = [p["per_class"][cls] for p in row["per_seed"] if p["per_class"][cls] is not None]
    return sum(vals) / len(vals) if vals else None


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

    from pipeline.inspection import InspectConfig, run_inspect

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
    from trainer import methods
    from trainer.eval.evaluate import build_model, resolve_device
    from trainer.eval.infer import InferConfig, Segmenter
    from trainer.eval.visualize import safe_name, write_pictures

    voc = Path(world) / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:n]
    made = []
    for name, how in models.items():
        model, train_cfg, _, method = build_model(
            how.get("checkpoint"),
            "tiny",
            how.get("decoder_init"),
            resolve_device("cpu"),
            0,
            tuple(how.get("overrides", ())),
            how.get("method"),
        )
        size = train_cfg.data.image_size
        infer = InferConfig(mode="whole", short_side=size, window=size, stride=size // 2)
        seg = Segmenter(
            methods.scorer(method, model, train_cfg, infer),
            [[c] for c in CLASSES],
            [train_cfg.data.template],
            infer,
        )
        folder = out / safe_name(name.lower())
        for i in ids:
            img = Image.open(voc / "JPEGImages" / f"{i}.jpg").convert("RGB")
            _, act = seg.predict(img, (img.height, img.width))
            paths = write_pictures(img, act.cpu().numpy(), list(CLASSES), 0.5, folder, i)
            made.append((name, i, paths[0]))
    return made


def write_report(
    report: Path,
    rows: list[dict],
    cfg: dict,
    data,
    pretrain,
    init,
    runs: dict[str, dict],
    seconds: float,
    variants: dict[str, list[str]] | None = None,
    movement: dict | None = None,
) -> Path:
    """``runs``: row name -> seed -> run folder; ``rows``: what ``trainer.world.demo`` scored."""
    from pipeline.world import load_world

    report.mkdir(parents=True, exist_ok=True)
    first = {k: next(iter(v.values())) for k, v in runs.items()}  # curves, pictures: one seed
    top, pics = _figures(report, first, data, pretrain, init)
    unseen = set(load_world(Path(data.world)).get("unseen", ()))
    classes = list(rows[0]["per_seed"][0]["per_class"])
    found = finding(rows, movement or {})
    write_json(
        report / "results.json",
        {
            "finding": found,
            "unseen": [c for c in classes if c in unseen],
            "seen": [c for c in classes if c not in unseen],
            "table": rows,
            "decoder_movement": movement or {},
            "settings": cfg,
            "seconds": seconds,
        },
    )
    lines = [
        *_introduction(cfg, classes, unseen, seconds, found),
        *_table(rows, variants or {}),
        *_per_class(rows, classes, unseen),
        *_stages(pretrain, init, runs),
        *_pictures_section(report, top, pics),
        *["## Settings", "", "```json", json.dumps(cfg, indent=2), "```", ""],
    ]
    out = report / "report.md"
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines))
    return out


def _figures(report: Path, first: dict[str, str], data, pretrain, init):
    """The loss curves, the label histogram and the overlays: (top labels, pictures)."""
    main_runs = {
        k: v for k, v in first.items() if k == "MCCL (SynSeg)" or k.startswith("MCCL, no L_")
    }
    loss_curves(main_runs, report / "loss_curves.png")
    top = label_histogram(Path(data.labels), report / "label_histogram.png")
    backbone = [f"model.pretrained={pretrain.output}", "model.normalise=clip"]
    shown = {"CLIPSeg-style init": {"decoder_init": init.output, "overrides": backbone}}
    for name in ("MCCL (SynSeg)", "ViL-Seg from the in-world CLIP"):
        if name in first:
            shown[name] = {"checkpoint": first[name]}
    return top, pictures(Path(data.world), shown, report / "pictures")


def _introduction(cfg: dict, classes: list[str], unseen: set[str], seconds: float, found: str):
    seen_names = ", ".join(c for c in classes if c not in unseen)
    unseen_names = ", ".join(c for c in classes if c in unseen)
    return [
        "# SynSeg, ViL-Seg and OVSegmentor on the synthetic world",
        "",
        f"Every stage runs offline: the world ({cfg['count']} captioned train images, {cfg['val_count']} held-out "
        f"val images with masks, {cfg['ref_count']} ref images with masks), the data pipeline, in-world CLIP "
        "pretraining, the CLIPSeg-style decoder, MCCL, ViL-Seg and OVSegmentor training and evaluation. This run took "
        f"{seconds / 60:.1f} minutes (stages finished by an earlier run with the same settings are reused).",
        "",
        "The CLIPSeg-style decoder is SynSeg's model trained with masks (`synseg-train run "
        "--supervision masks --dataset world-ref`), alone and with each physically-guided loss "
        "(the weighted patch alignment L_sac, the structure head's L_p against Canny edges or "
        "mask edges), on the `ref` split, which shows only the "
        f"seen classes ({seen_names}) and is drawn in another "
        "style (flat colours, outlines, smaller objects); the unseen classes "
        f"({unseen_names}) appear only in the captions MCCL, "
        "ViL-Seg and OVSegmentor train on and in the val images they are scored on. ViL-Seg trains both "
        "CLIP towers on the captions alone (no masks, no noun phrases): from the in-world CLIP, "
        "and from random weights as its paper does. OVSegmentor trains a grouping image encoder "
        "(started from the in-world CLIP's image tower) and the text tower on the captions, the "
        "entities of OVSegmentor's list found in their labels, and partner images sharing one.",
        "",
        "## What the experiment found",
        "",
        found,
        "",
    ]


def _table(rows: list[dict], variants: dict[str, list[str]]) -> list[str]:
    """The mIoU table, what sets each trained row apart, and the per-seed scores."""
    by = {r["model"]: r for r in rows}
    lines = [
        "## mIoU on the world's held-out masks",
        "",
        "mIoU (%) over the unseen classes, the seen ones, all, and the harmonic mean of unseen and "
        "seen; trained rows are mean ± spread (sample standard deviation) over seeds "
        f"{seeds_text(rows)}. The last column compares a trained row's unseen mIoU with its "
        "start: the untrained decoder for the CLIPSeg-style init, the init for its "
        "physically-guided variants, the init's seed-42 decoder (every MCCL run's start) for "
        "MCCL, the untrained model for ViL-Seg and OVSegmentor.",
        "",
        "| model | unseen | seen | all | harmonic mean | unseen vs start |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = "-"
        start = by.get(r.get("start") or "")
        if start:
            d = 100 * (r["mean"]["unseen"] - start["mean"]["unseen"])
            versus = f"{d:+.1f} ({verdict(start, r, 'unseen')})"
        lines.append(
            f"| {r['model']} | {pm(r, 'unseen')} | {pm(r, 'seen')} | {pm(r, 'all')} | {pm(r, 'hm')} | {versus} |"
        )
    lines += ["", "What sets each trained row apart:", ""]
    for name, settings in variants.items():
        lines.append(f"- {name}: " + ", ".join(f"`{x}`" for x in settings))
    lines += ["", "Per seed (unseen / seen / all):", ""]
    for r in rows:
        if len(r["per_seed"]) > 1:
            scores = (
                f"seed {p['seed']}: {_pct(p['unseen'])} / {_pct(p['seen'])} / {_pct(p['all'])}"
                for p in r["per_seed"]
            )
            lines.append(f"- {r['model']}: " + "; ".join(scores))
    return [*lines, ""]


def _per_class(rows: list[dict], classes: list[str], unseen: set[str]) -> list[str]:
    lines = [
        "## IoU per class",
        "",
        "Mean over seeds; unseen classes in italics.",
        "",
        "| class | " + " | ".join(r["model"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for c in classes:
        name = f"*{c}*" if c in unseen else c
        lines.append(f"| {name} | " + " | ".join(_pct(class_mean(r, c)) for r in rows) + " |")
    return [*lines, ""]


def _stages(pretrain, init, runs: dict[str, dict]) -> list[str]:
    return [
        "## Stages",
        "",
        f"- In-world CLIP pretraining: {pretrain.steps} steps; mean cosine similarity between the class prompts "
        f"{pretrain.prompt_cosine_before:.2f} before, {pretrain.prompt_cosine_after:.2f} after "
        f"(contrastive loss {pretrain.loss_first:.2f} -> {pretrain.loss_last:.2f}). Checkpoint `{pretrain.output}`.",
        f"- CLIPSeg-style decoder: {init.steps} steps of mask supervision, binary cross-entropy on "
        f"{init.images} ref images (every seen class a prompt; absent classes have empty "
        f"targets), seed 42's loss {init.loss_first:.3f} -> {init.loss_last:.3f} (run "
        f"`{init.run}`). Its decoder in CLIPSeg's layout, where MCCL starts: `{init.output}`.",
        *[
            f"- {name}: run folders " + ", ".join(f"`{run}`" for run in by_seed.values())
            for name, by_seed in runs.items()
        ],
        "",
    ]


def _pictures_section(report: Path, top: list[tuple], pics) -> list[str]:
    lines = [
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
    return lines
