"""synseg-data: the command line over the pipeline's ``run_<stage>`` functions.

Commands only translate options into a config and print the returned stats; every decision
lives in the stage modules. A ``UserError`` becomes one red line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from pipeline.demo import DemoConfig
from pipeline.download import DownloadConfig
from pipeline.filter import FilterConfig
from pipeline.inspection import InspectConfig
from pipeline.nouns import NounsConfig
from pipeline.pack import PackConfig
from pipeline.pairs import PairConfig
from pipeline.world import WorldConfig
from synseg.console import err, handle_errors, out, print_result, progress, run_app, summary
from synseg.errors import UserError
from synseg.options import field_docs, options_of, settings_of

app = typer.Typer(
    help="SynSeg data pipeline: CC12M-style URL list -> noun-phrase labels -> WebDataset shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# --------------------------------------------------------------------------- commands


@app.command()
@handle_errors
@options_of(WorldConfig)
def world(**settings) -> None:
    """Generate the offline synthetic world: images, CC12M-style captions, VOC-layout masks."""
    from pipeline.world import run_world

    cfg = WorldConfig(**settings_of(WorldConfig, settings))
    t = time.time()
    stats = run_world(cfg)
    summary("world", stats, time.time() - t)
    out.print(
        f"URL list: {cfg.output / 'cc12m.tsv'}  (serve it with: synseg-data serve --world {cfg.output})"
    )


@app.command()
@handle_errors
def serve(
    world: Annotated[Path, typer.Option(help="A folder made by `synseg-data world`")] = Path(
        "data/world"
    ),
    port: Annotated[
        int | None, typer.Option(help="Port (default: the one in the world's URL list)")
    ] = None,
) -> None:
    """Serve a synthetic world's images on 127.0.0.1 until interrupted."""
    from pipeline.serve import make_server
    from pipeline.world import load_world

    meta = load_world(world)
    port = meta["port"] if port is None else port
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, not {port}")
    if port != meta["port"]:
        # The URLs hold the port, and every uid is a hash of its URL: serving elsewhere would
        # need a new URL list, hence new uids, hence a new download. Say so instead of doing it.
        raise UserError(
            f"the URL list of {world} points at port {meta['port']}; serve it there, or point "
            f"it at port {port} with `synseg-data world --output {world} --port {port}` "
            "(new URLs, so new uids: download into a new --output)"
        )
    server = make_server(world, port)
    err.print(f"serving {world / 'http'} on http://127.0.0.1:{port} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
@handle_errors
@options_of(DownloadConfig, extra_help={"ray_address": "(e.g. auto or ray://head:10001)"})
def download(**settings) -> None:
    """Download images with img2dataset; rerun to resume, --retry-failed to re-fetch failures."""
    from pipeline.download import run_download

    cfg = DownloadConfig(**settings_of(DownloadConfig, settings))
    t = time.time()
    if cfg.verbose:
        stats = run_download(cfg)
    else:
        with progress("downloading", "shards") as (total, _, done):
            stats = run_download(cfg, on_start=total, on_tick=done)
    summary("download", stats, time.time() - t)


@app.command("extract-nouns")
@handle_errors
@options_of(NounsConfig)
def extract_nouns(**settings) -> None:
    """Algorithm 1: noun phrases of every caption (spaCy noun chunks, NOUN tokens)."""
    from pipeline.nouns import run_extract_nouns

    cfg = NounsConfig(**settings_of(NounsConfig, settings))
    t = time.time()
    with progress("parsing captions", "captions") as (total, advance, _):
        stats = run_extract_nouns(cfg, on_start=total, on_advance=advance)
    summary("extract-nouns", stats, time.time() - t)


@app.command("filter")
@handle_errors
@options_of(FilterConfig, extra_help={"exclude": "(repeatable)"})
def filter_(**settings) -> None:
    """Algorithm 2: drop phrases that contain an exclusion term; record what was dropped."""
    from pipeline.filter import run_filter

    cfg = FilterConfig(**settings_of(FilterConfig, settings))
    t = time.time()
    with progress("filtering", "shards") as (total, advance, _):
        stats = run_filter(cfg, on_start=total, on_advance=advance)
    summary("filter", stats, time.time() - t)


@app.command()
@handle_errors
@options_of(PackConfig)
def pack(**settings) -> None:
    """Join images and labels into WebDataset training shards (jpg + json) and sizes.json."""
    from pipeline.pack import run_pack

    cfg = PackConfig(**settings_of(PackConfig, settings))
    t = time.time()
    with progress("packing", "raw shards") as (total, advance, _):
        stats = run_pack(cfg, on_start=total, on_advance=advance)
    summary("pack", stats, time.time() - t)


@app.command()
@handle_errors
@options_of(PairConfig)
def pair(**settings) -> None:
    """Pair each packed image with images that share an entity (partners.parquet)."""
    from pipeline.pairs import run_pair

    cfg = PairConfig(**settings_of(PairConfig, settings))
    t = time.time()
    with progress("pairing", "shards") as (total, advance, _):
        stats = run_pair(cfg, on_start=total, on_advance=advance)
    summary("pair", stats, time.time() - t)


@app.command()
@handle_errors
@options_of(InspectConfig)
def inspect(
    sql: Annotated[str | None, typer.Argument(help=field_docs(InspectConfig)["sql"])] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    **settings,
) -> None:
    """Query the manifests with DuckDB, or print a named report."""
    from pipeline.inspection import run_inspect

    if fmt not in ("table", "csv", "json"):
        raise UserError("--format must be table, csv or json")
    res = run_inspect(InspectConfig(sql=sql, **settings_of(InspectConfig, settings)))
    if fmt == "json":
        print(
            json.dumps(
                [dict(zip(res.columns, r, strict=True)) for r in res.rows], default=str, indent=1
            )
        )
    elif fmt == "csv":
        import csv
        import sys

        w = csv.writer(sys.stdout)
        w.writerow(res.columns)
        w.writerows(res.rows)
    else:
        print_result(res)


@app.command()
@handle_errors
@options_of(DemoConfig)
def demo(**settings) -> None:
    """Run every stage on the synthetic world (offline) into the default paths."""
    from pipeline.demo import run_demo
    from pipeline.inspection import run_inspect

    cfg = DemoConfig(**settings_of(DemoConfig, settings))
    t = time.time()
    run_demo(cfg, on_stage=lambda name, stats: summary(name, stats))
    for report in ("top-labels", "drops-by-term"):
        res = run_inspect(
            InspectConfig(
                report=report,
                raw=cfg.raw,
                nouns=cfg.nouns,
                labels=cfg.labels,
                shards=cfg.shards,
                limit=10,
            )
        )
        print_result(res)
    out.print(
        f"done in {time.time() - t:.0f} s; training shards in {cfg.shards}, manifests in "
        f"{cfg.nouns.parent}/"
    )


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
