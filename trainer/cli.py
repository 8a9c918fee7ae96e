"""synseg-train: the command line over the trainer.

synseg-train run --preset tiny --set optim.lr=3e-4 --set data.batch_size=32
synseg-train run --method vilseg --preset tiny                    # another trained method
synseg-train run --supervision masks --dataset stuff --data-root data/coco_stuff164k
synseg-train encode-labels --preset paper --shards data/shards   # optional: before a run
torchrun --nproc_per_node 8 -m trainer.cli run --preset paper     # several GPUs
synseg-train methods                                              # what can be trained and scored
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from synseg.console import err, handle_errors, run_app, summary
from synseg.errors import Interrupted, UserError
from synseg.options import field_docs, options_of, settings_of
from trainer.eval.evaluate import EvalConfig
from trainer.eval.prepare import PrepareConfig
from trainer.export import ExportConfig
from trainer.methods import names as method_names
from trainer.world.demo import WorldDemoConfig

HELP = "Train open-vocabulary segmentation methods on packed shards and score them zero-shot."

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options that eval and segment share.
CheckpointOpt = Annotated[
    str | None, typer.Option(help="Run or checkpoint folder (none: an untrained model)")
]
PresetOpt = Annotated[str, typer.Option(help="Untrained model's settings when no --checkpoint")]
DecoderInitOpt = Annotated[
    str | None, typer.Option(help="Untrained model's decoder weights (CLIPSeg/HF)")
]
TemplatesOpt = Annotated[str, typer.Option(help="Prompt templates: single, clip7 or a file")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda")]
METHOD_CHOICES = (
    f"({', '.join(method_names('weights'))}: --decoder-init's weights; training-free, on the same "
    f"frozen CLIP: {', '.join(method_names('training-free'))})"
)
MethodOpt = Annotated[
    str | None,
    typer.Option(
        help="What scores (`synseg-train methods`): default the checkpoint's own method (synseg "
        f"without one) {METHOD_CHOICES}"
    ),
]
SetOpt = Annotated[
    list[str], typer.Option("--set", help="Untrained model's setting, e.g. model.normalise=clip")
]


# Options that run and encode-labels share: how the settings are made.
RunPresetOpt = Annotated[
    str,
    typer.Option(help="Settings to start from: the method's paper or tiny, or METHOD-NAME"),
]
RunMethodOpt = Annotated[
    str | None,
    typer.Option(help=f"Trained method: {', '.join(method_names('trained'))} (default synseg)"),
]
ConfigFilesOpt = Annotated[
    list[Path], typer.Option(help="JSON file of settings (repeatable; later wins)")
]
RunSetOpt = Annotated[
    list[str], typer.Option("--set", help="One setting, e.g. optim.lr=1e-4 (repeatable)")
]


def _setting_help(dotted: str) -> str:
    """A run setting's doc (its field's comment) and its dotted name, as an option's help."""
    from trainer.train.config import DataConfig, OptimConfig, RunConfig

    group, name = dotted.split(".")
    cls = {"data": DataConfig, "optim": OptimConfig, "run": RunConfig}[group]
    return f"{field_docs(cls)[name]} ({dotted})"


ShardsOpt = Annotated[str | None, typer.Option(help=_setting_help("data.shards"))]
SupervisionOpt = Annotated[str | None, typer.Option(help=_setting_help("data.supervision"))]
MaskDatasetOpt = Annotated[str | None, typer.Option(help=_setting_help("data.dataset"))]
MaskRootOpt = Annotated[str | None, typer.Option(help=_setting_help("data.root"))]
RunOutputOpt = Annotated[str | None, typer.Option(help=_setting_help("run.output"))]
RunDeviceOpt = Annotated[str | None, typer.Option(help=_setting_help("run.device"))]


def _settings(preset: str, config: list[Path], set_: list[str], method: str | None, **fields):
    """The resolved settings: the method's preset, config files, --set, then the named options
    (``data__shards="x"`` for data.shards), each only when given."""
    from trainer.train.config import resolve

    values = {k.replace("__", "."): v for k, v in fields.items() if v is not None}
    return resolve(preset, config, list(set_), method=method, values=values)


@app.callback()
def _group() -> None:
    """Train open-vocabulary segmentation methods on packed shards and score them zero-shot."""


@app.command()
@handle_errors
def run(
    preset: RunPresetOpt = "paper",
    method: RunMethodOpt = None,
    config: ConfigFilesOpt = [],  # noqa: B006
    set_: RunSetOpt = [],  # noqa: B006
    shards: ShardsOpt = None,
    supervision: SupervisionOpt = None,
    dataset: MaskDatasetOpt = None,
    data_root: MaskRootOpt = None,
    output: RunOutputOpt = None,
    steps: Annotated[int | None, typer.Option(help=_setting_help("optim.max_steps"))] = None,
    device: RunDeviceOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the run in --output from its latest checkpoint"),
    ] = False,
) -> None:
    """Train a method (SynSeg's MCCL by default) on the packed shards' captions, or on a
    dataset's masks (--supervision masks --dataset stuff --data-root DIR)."""

    cfg = _settings(
        preset,
        config,
        set_,
        method,
        data__shards=shards,
        data__supervision=supervision,
        data__dataset=dataset,
        data__root=data_root,
        run__output=output,
        optim__max_steps=steps,
        run__device=device,
    )
    main = int(os.environ.get("RANK", 0)) == 0
    t = time.time()
    stats = _train_with_progress(cfg, resume, main)
    if main:
        if stats.replayed:
            err.print(
                f"note: the checkpoint's data stream position is for another number of "
                f"processes or data workers (or it has none): the epoch was read again up to "
                f"batch {stats.replayed}, so the rest of it differs from an uninterrupted run's"
            )
        if stats.steps == stats.start_step:
            err.print(
                f"nothing to train: the run is at step {stats.start_step} of "
                f"{stats.total_steps}; raise --steps to go further"
            )
        summary("train", stats, time.time() - t)


def _train_with_progress(cfg, resume: bool, main: bool):
    """run_train with a progress bar on the main process; Ctrl-C says how to go on."""
    from trainer.train.loop import run_train

    columns = [
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=err, disable=not main) as bar:
        task = bar.add_task("train", total=None, info="")

        shown = {"loss": ""}

        def on_step(step: int, total: int, loss: dict | None, rate: float) -> None:
            if loss is not None:  # logged steps only: reading the loss waits for the device
                shown["loss"] = " ".join(f"{k} {v:.3f}" for k, v in loss.items() if k != "neg" or v)
            info = f"{shown['loss']} | {rate:.1f} img/s"
            bar.update(task, completed=step, total=total, info=info, description="training")

        encoding = {"done": 0, "total": 0}

        def on_encode_start(n: int) -> None:
            encoding["total"] = n

        def on_encode(n: int) -> None:
            encoding["done"] += n
            info = f"label phrases encoded {encoding['done']}/{encoding['total']}"
            bar.update(task, info=info)

        try:
            return run_train(
                cfg,
                resume=resume,
                on_step=on_step,
                on_encode=on_encode,
                on_encode_start=on_encode_start,
            )
        except KeyboardInterrupt:
            bar.update(task, visible=False)
            if resume or not (Path(cfg.run.output) / "checkpoints" / "latest").exists():
                raise  # the same command again goes on (or starts again: nothing was saved)
            raise Interrupted("run the same command with --resume to go on") from None
        except BaseException:
            bar.update(task, visible=False)  # the error line says enough
            raise


@app.command("encode-labels")
@handle_errors
def encode_labels(
    preset: RunPresetOpt = "paper",
    method: RunMethodOpt = None,
    config: ConfigFilesOpt = [],  # noqa: B006
    set_: RunSetOpt = [],  # noqa: B006
    shards: ShardsOpt = None,
    output: RunOutputOpt = None,
    device: RunDeviceOpt = None,
) -> None:
    """Encode every label phrase of the shards once, into the cache the run will read."""
    from synseg.console import progress
    from trainer.train.loop import encode_labels as encode

    cfg = _settings(
        preset, config, set_, method, data__shards=shards, run__output=output, run__device=device
    )
    t = time.time()
    with progress("encoding label phrases", "phrases") as (total, advance, _):
        stats = encode(cfg, on_start=total, on_encode=advance)
    summary("encode-labels", stats, time.time() - t)


@app.command("eval")
@handle_errors
@options_of(
    EvalConfig,
    flags={"overrides": ("--set",)},
    extra_help={"method": METHOD_CHOICES, "subset": "(JSON {dataset: [names]} or one a line)"},
)
def eval_(**settings) -> None:
    """Zero-shot mIoU on a benchmark's validation split (MMSegmentation's metric)."""
    from rich.table import Table

    from synseg.console import out, progress
    from trainer.eval.evaluate import run_eval

    cfg = EvalConfig(**settings_of(EvalConfig, settings))
    dataset, protocol = cfg.dataset, cfg.protocol
    with progress(f"evaluating {dataset}", "images") as (total, advance, _):
        res = run_eval(cfg, on_start=total, on_advance=advance)
    table = Table(
        title=f"{dataset}, {res.method}, {protocol} protocol, per class (%)", title_justify="left"
    )
    for col in ("class", "IoU", "Acc"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, v in res.per_class.items():
        table.add_row(name, *("-" if v[k] is None else f"{100 * v[k]:.1f}" for k in ("IoU", "Acc")))
    out.print(table)
    out.print(
        f"{dataset}: mIoU {100 * res.mIoU:.1f}  mAcc {100 * res.mAcc:.1f}  aAcc {100 * res.aAcc:.1f}  "
        f"({res.images} images, {res.images_per_second:.1f} images/s)"
    )
    if res.subset:
        n = len(res.subset["classes"])
        out.print(
            f"{Path(res.subset['name']).stem} ({res.subset['mode']}, {n} "
            f"class{'es' if n != 1 else ''}): mIoU {100 * res.subset['mIoU']:.1f}  pixel "
            f"accuracy {100 * res.subset['pixel_accuracy']:.1f}"
        )
    out.print(f"written: {', '.join(res.files)}")


@app.command()
@handle_errors
@options_of(PrepareConfig)
def prepare(
    dataset: Annotated[str, typer.Argument(help=field_docs(PrepareConfig)["dataset"])],
    **settings,
) -> None:
    """Convert a benchmark's validation split (or --split train) into the layout eval reads."""
    from synseg.console import progress
    from trainer.eval.prepare import run_prepare

    cfg = PrepareConfig(dataset=dataset, **settings_of(PrepareConfig, settings))
    t = time.time()
    with progress(f"preparing {dataset}", "images") as (total, advance, _):
        stats = run_prepare(cfg, on_start=total, on_advance=advance)
    summary(f"prepare {dataset}", stats, time.time() - t)


@app.command()
@handle_errors
def segment(
    images: Annotated[list[Path], typer.Argument(help="Image files")],
    classes: Annotated[str, typer.Option(help='Class names, comma-separated: "cat,dog,grass"')],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = "tiny",
    decoder_init: DecoderInitOpt = None,
    set_: SetOpt = [],  # noqa: B006
    output: Annotated[Path, typer.Option(help="Folder for the pictures")] = Path("segments"),
    threshold: Annotated[
        float, typer.Option(help="Activation a pixel needs to be shown as a class")
    ] = 0.5,
    templates: TemplatesOpt = "single",
    method: MethodOpt = None,
    short_side: Annotated[
        int, typer.Option(help="Resize short side to this (0: the model's training size)")
    ] = 0,
    mode: Annotated[str, typer.Option(help="slide or whole")] = "whole",
    device: DeviceOpt = "auto",
) -> None:
    """Write an overlay with a legend and one activation map per class for each image."""
    from PIL import Image

    from synseg.console import out
    from trainer import methods
    from trainer.eval.evaluate import build_model, check_weights, resolve_device
    from trainer.eval.infer import InferConfig, Segmenter, read_templates
    from trainer.eval.visualize import picture_names, safe_name, write_pictures

    if method is not None:
        check_weights(method, checkpoint, decoder_init)
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise UserError("--classes needs at least one class name")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--classes names {', '.join(map(repr, twice))} more than once")
    if not 0 <= threshold <= 1:
        raise UserError("--threshold must be in [0, 1]")
    loaded = []
    for path in images:
        try:
            loaded.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
    model, train_cfg, _, method = build_model(
        checkpoint, preset, decoder_init, resolve_device(device), 0, tuple(set_), method
    )
    short = short_side or train_cfg.data.image_size
    infer = InferConfig(
        mode=mode, short_side=short, long_side=0, window=short, stride=max(1, short // 2)
    )
    scorer = methods.scorer(method, model, train_cfg, infer)
    seg = Segmenter(scorer, [[n] for n in names], read_templates(templates), infer)
    for name, part in zip(names, picture_names(names), strict=True):
        if part != safe_name(name):  # numbered apart from another class's (or the overlay's)
            out.print(f"class {name!r}: its maps are named <image>_{part}.png")
    for path, img, stem in zip(images, loaded, picture_stems(images), strict=True):
        _, act = seg.predict(img, (img.height, img.width))
        written = write_pictures(img, act.cpu().numpy(), names, threshold, output, stem)
        out.print(f"{path}: {', '.join(str(p) for p in written)}")


def picture_stems(images: list[Path]) -> list[str]:
    """A distinct file stem per image: its own, or, where two images share a name
    (a/x.jpg, b/x.jpg), the folders above it joined in until the names differ."""
    paths = [Path(p).resolve() for p in images]
    stems = [p.stem for p in paths]
    depth = 0
    while len(set(stems)) < len(stems):
        depth += 1
        counts = {s: stems.count(s) for s in stems}
        longer = [
            "_".join([*p.parent.parts[-depth:], p.stem]).lstrip("/_") if counts[s] > 1 else s
            for p, s in zip(paths, stems, strict=True)
        ]
        if longer == stems:  # the same file twice: no folder tells them apart
            stems = [p.stem for p in paths]
            break
        stems = longer
    seen: dict[str, int] = {}
    for i, s in enumerate(stems):  # the same file given twice: number the repeats
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            stems[i] = f"{s}-{seen[s]}"
    return stems


@app.command()
@handle_errors
@options_of(ExportConfig)
def export(**settings) -> None:
    """Write a trained run as a checkpoint other code loads (transformers' from_pretrained)."""
    from synseg.console import out
    from trainer.export import run_export

    stats = run_export(ExportConfig(**settings_of(ExportConfig, settings)))
    out.print(f"{stats.method} from {stats.checkpoint}: {stats.tensors} tensors in {stats.output}")
    if stats.pushed_to:
        out.print(f"pushed to {stats.pushed_to}")


@app.command("methods")
@handle_errors
def methods_() -> None:
    """List the methods: trained ones (run), released weights and training-free ones (eval)."""
    from rich.table import Table

    from synseg.console import out
    from trainer.methods import REGISTRY

    table = Table(title="methods", title_justify="left")
    for col in ("method", "kind", "what it is"):
        table.add_column(col)
    for m in REGISTRY.values():
        table.add_row(m.name, m.kind, m.summary)
    out.print(table)


@app.command()
@handle_errors
def presets() -> None:
    """List the presets of every trained method (--preset METHOD-NAME, or NAME with --method)."""
    from rich.table import Table

    from synseg.console import out
    from trainer import methods

    table = Table(title="presets", title_justify="left")
    for col in ("preset", "method", "what it is"):
        table.add_column(col)
    for name in methods.names("trained"):
        m = methods.trained(name)
        for p in m.preset_names():
            about = json.loads((m.presets / f"{p}.json").read_text()).get("_about", "")
            table.add_row(f"{name}-{p}", name, about)
    out.print(table)


@app.command()
@handle_errors
@options_of(WorldDemoConfig, flags={"overrides": ("--set",)})
def demo(**settings) -> None:
    """The whole chain on the synthetic world, offline, ending with a report."""
    from rich.table import Table

    from synseg.console import out
    from trainer.world.demo import run_world_demo
    from trainer.world.report import pm

    cfg = WorldDemoConfig(**settings_of(WorldDemoConfig, settings))
    result = run_world_demo(
        cfg, on_stage=lambda name, what: err.print(f"[green]done[/green] {name}: {what}")
    )
    table = Table(
        title="mIoU on the world's held-out masks (%), mean ± spread over seeds",
        title_justify="left",
    )
    for col in ("model", "unseen", "seen", "all", "harmonic"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result.table:
        table.add_row(r["model"], *(pm(r, k) for k in ("unseen", "seen", "all", "hm")))
    out.print(table)
    out.print(f"report: {result.report}/report.md ({result.seconds / 60:.1f} minutes)")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
