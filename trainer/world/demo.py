"""The README's main command: the whole chain on the synthetic world, offline, with a report.

1. data: world -> served on loopback -> download -> extract-nouns -> filter -> pack
2. in-world CLIP pretraining of the tiny backbone on the captions (open_clip's ClipLoss)
3. a CLIPSeg-style decoder on the world's ``ref`` split (masks), saved in CLIPSeg's layout
4. SynSeg's MCCL training from that decoder, on the packed shards (captions only)
5. eval on the world's held-out masks: untrained decoder, CLIPSeg-style, MCCL, and the loss
   ablation of the paper's Table 2
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

ABLATIONS = {
    "no L_align": ["loss.align=0"],
    "no L_cont": ["loss.cont=0"],
    "no L_back": ["loss.back=0"],
    "no L_sep": ["loss.sep=0"],
}
# What else was tried when MCCL moves mIoU: learning rate, the paper's optimiser, label cap and
# the three switches beyond the paper.
SWEEP = {
    "lr 1e-3": ["optim.lr=1e-3"],
    "SGD lr 1e-5 (paper)": ["optim.name=sgd", "optim.lr=1e-5", "optim.momentum=0.9"],
    "label cap 2": ["data.max_labels=2"],
    "projector on visual features": ["model.projector_input=visual"],
    "visual projector + straight-through": [
        "model.projector_input=visual",
        "loss.straight_through=true",
    ],
    "absent negatives (K=2)": ["data.absent=2", "loss.neg=1"],
}


@dataclass
class WorldDemoConfig:
    count: int = 2000  # train images of the world (captions only)
    val_count: int = 200  # held-out images with masks (the evaluation)
    ref_count: int = 600  # images with masks for the CLIPSeg-style stage
    port: int = 8642
    runs: str = "runs/world"  # models and training runs
    report: str = "reports/world"  # the report folder
    pretrain_steps: int = 300
    init_steps: int = 300
    mccl_steps: int = 150
    mccl_lr: float = 1e-4
    batch_size: int = 16
    ablations: bool = True  # the Table 2 ablation (one MCCL run per left-out term)
    sweep: bool = True  # the other settings tried (learning rate, optimiser, label cap, switches)
    sweep: bool = True  # the other settings tried (learning rate, optimiser, label cap, switches)
    device: str = "auto"
    processes: int = 2
    overrides: list[str] = field(default_factory=list)  # extra settings for the MCCL runs


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
    if (run / "checkpoints" / "latest").exists():
        saved = read_config(find(run))["config"]
        if saved == json.loads(json.dumps(cfg.to_dict())):
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
    from pipeline.demo import DemoConfig, run_demo
    from pipeline.world import CLASSES
    from trainer.eval.evaluate import EvalConfig, run_eval
    from trainer.train.config import resolve
    from trainer.world.clipseg_init import ClipSegInitConfig, run_clipseg_init
    from trainer.world.pretrain import PretrainConfig, run_pretrain

    t0 = time.time()
    runs, report = Path(cfg.runs), Path(cfg.report)
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
    backbone = [f"model.pretrained={pre.output}", "model.normalise=clip"]
    model_fields = {
        "arch": "synseg-tiny",
        "pretrained": pre.output,
        "taps": [1, 2, 3],
        "ffn_dim": 256,
        "dropout": 0.0,
        "normalise": "clip",
    }
    init = run_clipseg_init(
        ClipSegInitConfig(
            world=str(data.world),
            output=str(runs / "clipseg-world.pth"),
            model=model_fields,
            steps=cfg.init_steps,
        )
    )
    on_stage(
        "CLIPSeg-style decoder",
        f"BCE {init.loss_first:.3f} -> {init.loss_last:.3f}"
        + (" (reused)" if init.reused else f", {init.seconds:.0f} s"),
    )

    common = [
        *backbone,
        f"model.decoder_init={init.output}",
        f"data.shards={data.shards}",
        f"optim.max_steps={cfg.mccl_steps}",
        f"optim.lr={cfg.mccl_lr}",
        f"data.batch_size={cfg.batch_size}",
        f"run.device={cfg.device}",
        "run.log_every=5",
        *cfg.overrides,
    ]
    trained = {
        "MCCL (SynSeg)": _run_cached(
            "MCCL", resolve("tiny", overrides=[*common, f"run.output={runs / 'mccl'}"]), on_stage
        )
    }
    variants = {**(ABLATIONS if cfg.ablations else {}), **(SWEEP if cfg.sweep else {})}
    for name, settings in variants.items():
        out = runs / f"mccl-{_slug(name)}"
        overrides = [*common, *settings, f"run.output={out}"]
        trained[f"MCCL, {name}"] = _run_cached(name, resolve("tiny", overrides=overrides), on_stage)

    evals = report / "eval"
    rows = []

    def score(name: str, **kw) -> None:
        res = run_eval(
            EvalConfig(
                dataset="world",
                data_root=str(data.world),
                device=cfg.device,
                output=str(evals / _slug(name)),
                **kw,
            )
        )
        rows.append(
            {
                "model": name,
                "mIoU": res.mIoU,
                "mAcc": res.mAcc,
                "aAcc": res.aAcc,
                "per_class": {k: v["IoU"] for k, v in res.per_class.items()},
            }
        )
        on_stage(f"eval: {name}", f"mIoU {100 * res.mIoU:.1f}")

    score("untrained decoder", overrides=tuple(backbone))
    score("CLIPSeg-style init", decoder_init=init.output, overrides=tuple(backbone))
    for name, run in trained.items():
        score(name, checkpoint=run)

    from trainer.world.report import write_report

    write_report(
        report,
        rows,
        cfg=asdict(cfg),
        data=data,
        pretrain=pre,
        init=init,
        runs=trained,
        seconds=time.time() - t0,
        variants=variants,
    )
    return DemoResult(rows, time.time() - t0, str(report))


def _short(stats) -> str:
    fields = {
        k: v
        for k, v in asdict(stats).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return ", ".join(f"{k} {v}" for k, v in list(fields.items())[:4])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
