"""The README's main command: the whole chain on the synthetic world, offline, with a report.

1. data: world -> served on loopback -> download -> extract-nouns -> filter -> pack
2. in-world CLIP pretraining of the tiny backbone on the captions (open_clip's ClipLoss)
3. a CLIPSeg-style decoder: SynSeg's model trained with masks on the world's ``ref`` split
   (``synseg-train run --supervision masks --dataset world-ref``), alone and with each of the
   physically-guided losses, over the seeds; the seed-42 decoder saved in CLIPSeg's layout
4. SynSeg's MCCL training from that decoder, on the packed shards (captions only); ViL-Seg on
   the same shards' captions, from the in-world CLIP and from scratch; OVSegmentor on them with
   the partners ``pair`` drew, from the in-world CLIP
5. eval on the world's held-out masks (``tcl`` protocol), as mIoU on the seen classes (those
   ``ref`` has masks of), the unseen ones, all, and their harmonic mean: untrained decoder,
   CLIPSeg-style and its physically-guided variants, MCCL and the loss ablation of the paper's Table 2, the paper's SGD, each
   switch beyond the paper, ViL-Seg and its untrained starts (every trained row over ``seeds``
   seeds), and the training-free methods
6. a report folder: Markdown with the table and every setting, loss curves, overlays and
   activation maps, the label histogram

Every stage is cached: a rerun with the same settings reuses what is done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.world import WorldConfig
from trainer.world.report import write_report
from trainer.world.rows import (
    ABLATIONS,
    INIT,
    MCCL_START,
    OVSEG_CLIP_START,
    PAPER_SGD,
    PHYSICAL,
    SEED,
    SWEEP,
    UNTRAINED,
    VILSEG_CLIP_START,
    VILSEG_RANDOM_START,
    TrainedRow,
    split_scores,
    summarise,
)


def decoder_movement(run: str, init: str) -> dict:
    """How far training moved the decoder from its CLIPSeg-style start: ||w - w0|| / ||w0||
    over every decoder tensor, and the steps it took."""
    from trainer.model.decoder import read_state_dict
    from trainer.train.checkpoint import find

    ckpt = find(run)
    trained = read_state_dict(ckpt / "model.safetensors")
    start = read_state_dict(Path(init))
    num = sum(
        float((trained[f"decoder.{k}"].double() - v.double()).pow(2).sum())
        for k, v in start.items()
    )
    den = sum(float(v.double().pow(2).sum()) for v in start.values())
    return {"relative": (num / den) ** 0.5, "steps": int(ckpt.name.split("-")[-1])}


@dataclass
class WorldDemoConfig:
    count: int = WorldConfig.count  # train images of the world (captions only)
    val_count: int = WorldConfig.val_count  # held-out images with masks (the evaluation)
    ref_count: int = WorldConfig.ref_count  # images with masks for the CLIPSeg-style stage
    port: int = WorldConfig.port  # loopback port the world is served on
    runs: str = "runs/world"  # models and training runs
    report: str = "reports/world"  # the report folder
    pretrain_steps: int = 250  # in-world CLIP pretraining steps
    init_steps: int = 250  # CLIPSeg-style decoder steps (mask supervision on ref)
    init_lr: float = 1e-3  # its learning rate (AdamW, weight decay 1e-4, batch_size)
    physical: bool = True  # rows of that stage with each physically-guided loss
    mccl_steps: int = 150  # MCCL (and ViL-Seg) training steps
    mccl_lr: float = 1e-4  # their learning rate
    batch_size: int = 16  # their batch size
    workers: int = 1  # data loader workers of every run (decoding overlaps the step)
    seeds: int = 3  # MCCL seeds per row (42, 43, ...)
    ablations: bool = True  # the Table 2 ablation (one MCCL row per left-out term)
    sweep: bool = True  # the paper's SGD and each switch beyond the paper
    vilseg: bool = True  # ViL-Seg rows: from the in-world CLIP (at mccl_lr) and from scratch
    ovsegmentor: bool = True  # an OVSegmentor row: from the in-world CLIP (at mccl_lr)
    baselines: bool = True  # the training-free methods on the in-world CLIP
    device: str = "auto"  # auto, cpu or cuda
    processes: int = 2  # spaCy workers of the data chain
    overrides: list[str] = field(default_factory=list)  # extra setting for the MCCL runs


@dataclass
class DemoResult:
    table: list[dict]  # one row per evaluated model
    seconds: float
    report: str


def _run_cached(name: str, cfg, on_stage) -> str:
    """Train unless the run folder already holds this exact run, finished."""
    from trainer.train.checkpoint import find, read_config
    from trainer.train.loop import run_train

    run = Path(cfg.run.output)
    start = getattr(cfg.model, "decoder_init", None)
    if (run / "checkpoints" / "latest").exists():
        ckpt = find(run)
        saved = read_config(ckpt)["config"]
        # a start file written after the run (a new CLIPSeg-style init) makes it again
        stale = (
            start
            and Path(start).stat().st_mtime_ns > (ckpt / "model.safetensors").stat().st_mtime_ns
        )
        if saved == json.loads(json.dumps(cfg.to_dict())) and not stale:
            on_stage(name, "reused")
            return str(run)
        import shutil

        shutil.rmtree(run)  # settings changed: this run is redone
    t = time.time()
    stats = run_train(cfg)
    on_stage(name, f"{stats.steps} steps, loss {stats.loss['total']:.3f}, {time.time() - t:.0f} s")
    return str(run)


def run_world_demo(
    cfg: WorldDemoConfig, on_stage: Callable[[str, str], None] = lambda n, s: None
) -> DemoResult:
    t0 = time.time()
    data, pre = _starts(cfg, on_stage)
    starts = init_rows(cfg, pre.output, str(data.world))
    trained = _train(cfg, starts, on_stage)
    init = export_init(trained[INIT][SEED], Path(cfg.runs) / "clipseg-world.pth", on_stage)
    rows = trained_rows(cfg, pre.output, init.output, str(data.shards))
    trained |= _train(cfg, rows, on_stage)
    rows = starts + rows
    table = _score(cfg, data, pre.output, init.output, rows, trained, on_stage)
    first = {r.name: trained[r.name][SEED] for r in rows}
    movement = {
        name: decoder_movement(first[name], init.output)
        for name in ("MCCL (SynSeg)", f"MCCL, {PAPER_SGD}")
        if name in first
    }
    write_report(
        Path(cfg.report),
        table,
        cfg=asdict(cfg),
        data=data,
        pretrain=pre,
        init=init,
        runs=trained,
        seconds=time.time() - t0,
        variants={r.name: list(r.differs) for r in rows if r.differs},
        movement=movement,
    )
    return DemoResult(table, time.time() - t0, str(cfg.report))


def _starts(cfg: WorldDemoConfig, on_stage):
    """The data chain and the in-world CLIP (each reused when done)."""
    from pipeline.demo import DemoConfig, run_demo
    from pipeline.world import CLASSES
    from trainer.world.pretrain import PretrainConfig, run_pretrain

    runs = Path(cfg.runs)
    data = DemoConfig(
        count=cfg.count,
        val_count=cfg.val_count,
        ref_count=cfg.ref_count,
        port=cfg.port,
        processes=cfg.processes,
        image_size=64,
    )
    run_demo(data, on_stage=lambda name, stats: on_stage(f"data: {name}", _short(stats)))
    pre = run_pretrain(
        PretrainConfig(
            shards=str(data.shards), output=str(runs / "clip-tiny.pt"), steps=cfg.pretrain_steps
        ),
        list(CLASSES),
    )
    on_stage(
        "in-world CLIP pretraining",
        f"prompt cosine {pre.prompt_cosine_before:.2f} -> "
        f"{pre.prompt_cosine_after:.2f}"
        + (" (reused)" if pre.reused else f", {pre.seconds:.0f} s"),
    )
    return data, pre


# The tiny SynSeg model every SynSeg row of the demo trains (the in-world CLIP's backbone).
def _model_settings(clip: str) -> list[str]:
    return [f"model.pretrained={clip}", "model.normalise=clip"]


def init_rows(cfg: WorldDemoConfig, clip: str, world: str) -> list[TrainedRow]:
    """The CLIPSeg-style stage: SynSeg's decoder trained with masks on the ref split (every
    seen class a prompt, per-class BCE, as CLIPSeg), alone and with each physically-guided
    loss."""
    settings = (
        "data.supervision=masks",
        "data.dataset=world-ref",
        f"data.root={world}",
        *_model_settings(clip),
        f"data.batch_size={cfg.batch_size}",
        "optim.name=adamw",
        f"optim.lr={cfg.init_lr}",
        "optim.weight_decay=1e-4",
        "optim.grad_clip=0",
        "optim.epochs=0",
        f"optim.max_steps={cfg.init_steps}",
        f"run.device={cfg.device}",
        "run.log_every=5",
        f"data.workers={cfg.workers}",
    )
    rows = [TrainedRow(INIT, "synseg", settings, UNTRAINED, "clipseg-init")]
    if cfg.physical:
        rows += [
            TrainedRow(
                f"{INIT} {name}",
                "synseg",
                (*settings, *extra),
                INIT,
                f"clipseg-init-{_slug(name)}",
                tuple(extra),
            )
            for name, extra in PHYSICAL.items()
        ]
    return rows


def _same_weights(path: Path, weights: dict) -> bool:
    import torch

    if not path.exists():
        return False
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file is written again
        return False
    return old.keys() == weights.keys() and all(torch.equal(old[k], weights[k]) for k in old)


@dataclass
class InitStats:
    """The CLIPSeg-style decoder the MCCL rows start from: its run and its CLIPSeg-layout file."""

    run: str
    output: str
    steps: int
    images: int
    loss_first: float
    loss_last: float


def export_init(run: str, output: Path, on_stage) -> InitStats:
    """The decoder of a mask-supervised SynSeg run, written in CLIPSeg's layout (what
    ``model.decoder_init`` and ``--decoder-init`` read, as they read CLIPSeg's release)."""
    import torch

    from synseg.fsutil import atomic_path
    from trainer.model.decoder import read_state_dict
    from trainer.train.checkpoint import find, read_config

    ckpt = find(run)
    weights = read_state_dict(ckpt / "model.safetensors")
    decoder = {k[len("decoder.") :]: v for k, v in weights.items() if k.startswith("decoder.")}
    output.parent.mkdir(parents=True, exist_ok=True)
    if not _same_weights(output, decoder):  # rewritten only when it changed: runs from it stay
        with atomic_path(output) as tmp:
            torch.save(decoder, tmp)
    logged = [
        json.loads(line)
        for line in (Path(run) / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    cfg = read_config(ckpt)["config"]
    from trainer.train.masks import MaskSet

    images = len(MaskSet(cfg["data"]["dataset"], cfg["data"]["root"], cfg["data"]["image_size"]))
    stats = InitStats(
        run,
        str(output),
        int(ckpt.name.split("-")[-1]),
        images,
        logged[0]["loss"]["seg"],
        logged[-1]["loss"]["seg"],
    )
    on_stage("CLIPSeg-style decoder", f"BCE {stats.loss_first:.3f} -> {stats.loss_last:.3f}")
    return stats


def trained_rows(cfg: WorldDemoConfig, clip: str, init: str, shards: str) -> list[TrainedRow]:
    """Every trained row: MCCL from the CLIPSeg-style decoder (the paper's losses, the loss
    ablation, the paper's SGD, each switch), then ViL-Seg from the in-world CLIP and from
    scratch, each with the settings all its seeds share."""
    shared = [
        f"data.shards={shards}",
        f"optim.max_steps={cfg.mccl_steps}",
        f"data.batch_size={cfg.batch_size}",
        f"run.device={cfg.device}",
        "run.log_every=5",
        f"data.workers={cfg.workers}",  # decoding overlaps the step: ~10% faster on two cores
    ]
    mccl = [
        *_model_settings(clip),
        f"model.decoder_init={init}",
        *shared,
        f"optim.lr={cfg.mccl_lr}",
        *cfg.overrides,
    ]
    variants = {**(ABLATIONS if cfg.ablations else {}), **(SWEEP if cfg.sweep else {})}
    rows = [TrainedRow("MCCL (SynSeg)", "synseg", tuple(mccl), MCCL_START, "mccl")]
    rows += [
        TrainedRow(
            f"MCCL, {name}",
            "synseg",
            (*mccl, *extra),
            MCCL_START,
            f"mccl-{_slug(name)}",
            tuple(extra),
        )
        for name, extra in variants.items()
    ]
    if cfg.vilseg:
        from trainer.train.config import resolve

        paper_lr = resolve("tiny", method="vilseg").optim.lr  # the paper's 5e-4 in the preset
        rows += [
            TrainedRow(
                "ViL-Seg from the in-world CLIP",
                "vilseg",
                (f"model.pretrained={clip}", *shared, f"optim.lr={cfg.mccl_lr}"),
                VILSEG_CLIP_START,
                "vilseg-clip",
                (
                    "--method vilseg",
                    "model.pretrained=<the in-world CLIP>",
                    f"optim.lr={cfg.mccl_lr}",
                ),
            ),
            TrainedRow(
                "ViL-Seg from scratch (the paper's start)",
                "vilseg",
                tuple(shared),  # the preset's own lr
                VILSEG_RANDOM_START,
                "vilseg-scratch",
                (
                    "--method vilseg",
                    "model.pretrained=null",
                    f"optim.lr={paper_lr:g} (the preset's)",
                ),
            ),
        ]
    if cfg.ovsegmentor:
        rows.append(
            TrainedRow(
                "OVSegmentor from the in-world CLIP",
                "ovsegmentor",
                (f"model.pretrained={clip}", *shared, f"optim.lr={cfg.mccl_lr}"),
                OVSEG_CLIP_START,
                "ovsegmentor-clip",
                (
                    "--method ovsegmentor",
                    "model.pretrained=<the in-world CLIP>",
                    f"optim.lr={cfg.mccl_lr}",
                ),
            )
        )
    return rows


def _train(cfg: WorldDemoConfig, rows: list[TrainedRow], on_stage) -> dict[str, dict[int, str]]:
    """row name -> seed -> run folder, each run trained unless it is there, finished."""
    from trainer.train.config import resolve

    seeds = [SEED + i for i in range(cfg.seeds)]
    trained: dict[str, dict[int, str]] = {}
    for row in rows:
        trained[row.name] = {}
        label = row.name.removeprefix("MCCL, ")
        for seed in seeds:
            out = Path(cfg.runs) / row.folder / f"seed-{seed}"
            overrides = [*row.settings, f"run.seed={seed}", f"run.output={out}"]
            run_cfg = resolve("tiny", overrides=overrides, method=row.method)
            trained[row.name][seed] = _run_cached(f"{label}, seed {seed}", run_cfg, on_stage)
    return trained


def _score(cfg, data, clip: str, init: str, rows, trained, on_stage) -> list[dict]:
    """The table: every row scored on the world's val masks, mean and spread over seeds."""
    from pipeline.world import load_world
    from trainer import methods
    from trainer.eval.evaluate import EvalConfig, run_eval

    evals = Path(cfg.report) / "eval"
    unseen = set(load_world(data.world).get("unseen", ()))
    table: list[dict] = []

    def score(name: str, runs_by_seed: dict, start: str | None = None, **kw) -> None:
        per_seed = []
        for seed, extra in runs_by_seed.items():
            res = run_eval(
                EvalConfig(
                    dataset="world",
                    data_root=str(data.world),
                    device=cfg.device,
                    output=str(evals / _slug(name) / f"seed-{seed}"),
                    **kw,
                    **extra,
                )
            )
            per_class = {k: v["IoU"] for k, v in res.per_class.items()}
            per_seed.append(
                {"seed": seed, **split_scores(per_class, unseen), "per_class": per_class}
            )
        table.append({**summarise(name, per_seed), "start": start})
        m = table[-1]["mean"]
        on_stage(
            f"eval: {name}",
            f"unseen {100 * m['unseen']:.1f}, seen {100 * m['seen']:.1f}, all {100 * m['all']:.1f}",
        )

    backbone = tuple(_model_settings(clip))
    score(UNTRAINED, {None: {}}, overrides=backbone)
    untrained = {  # the starts, each scored before the first row trained from it
        MCCL_START: {"decoder_init": init, "overrides": backbone},
        VILSEG_CLIP_START: {"method": "vilseg", "overrides": (f"model.pretrained={clip}",)},
        VILSEG_RANDOM_START: {"method": "vilseg"},
        OVSEG_CLIP_START: {"method": "ovsegmentor", "overrides": (f"model.pretrained={clip}",)},
    }
    for row in rows:
        if row.start in untrained:
            score(row.start, {None: {}}, **untrained.pop(row.start))
        runs = {seed: {"checkpoint": run} for seed, run in trained[row.name].items()}
        score(row.name, runs, start=row.start)
    if cfg.baselines:
        for method in methods.names("training-free"):
            score(f"{method} (training-free)", {None: {}}, method=method, overrides=backbone)
    return table


def _short(stats) -> str:
    fields = {
        k: v
        for k, v in asdict(stats).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return ", ".join(f"{k} {v}" for k, v in list(fields.items())[:4])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
