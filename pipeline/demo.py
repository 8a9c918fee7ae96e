"""The whole data pipeline on the synthetic world, offline, with the same stages a user runs.

world -> serve on 127.0.0.1 -> download -> extract-nouns -> filter --exclude generic -> pack
-> pair (each image's partners sharing one of OVSegmentor's entities), into the default paths
(data/world, data/raw, manifests/nouns, manifests/labels, data/shards), so every command of the README works on the result. A rerun reuses whatever is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.download import DownloadConfig, run_download
from pipeline.filter import FilterConfig, run_filter
from pipeline.nouns import NounsConfig, run_extract_nouns
from pipeline.pack import PackConfig, run_pack
from pipeline.pairs import PairConfig, run_pair
from pipeline.serve import serving
from pipeline.world import WorldConfig, load_world, run_world


@dataclass
class DemoConfig:
    world: Path = Path("data/world")  # the world's folder
    raw: Path = Path("data/raw")  # img2dataset shards
    nouns: Path = Path("manifests/nouns")  # noun manifests
    labels: Path = Path("manifests/labels")  # labels manifests
    shards: Path = Path("data/shards")  # training shards
    count: int = WorldConfig.count  # train images of the world (captions only)
    val_count: int = WorldConfig.val_count  # held-out images with masks
    ref_count: int = WorldConfig.ref_count  # images with masks for the CLIPSeg-style stage
    size: int = WorldConfig.size  # world image side
    image_size: int = 64  # training resolution of the packed shards
    seed: int = WorldConfig.seed  # the world's random seed
    port: int = WorldConfig.port  # loopback port of the world's URL list
    processes: int = 2  # spaCy workers


@dataclass
class DemoStats:
    stages: dict[str, Any] = field(default_factory=dict)


def run_demo(cfg: DemoConfig, on_stage: Callable[[str, Any], None] | None = None) -> DemoStats:
    """Run every stage in order; ``on_stage(name, stats)`` is called after each."""
    out = DemoStats()

    def done(name: str, stats: Any) -> None:
        out.stages[name] = stats
        if on_stage:
            on_stage(name, stats)

    done(
        "world",
        run_world(
            WorldConfig(
                output=cfg.world,
                count=cfg.count,
                val_count=cfg.val_count,
                ref_count=cfg.ref_count,
                size=cfg.size,
                seed=cfg.seed,
                port=cfg.port,
                replace=True,  # the demo's own world: made again when its settings change
            )
        ),
    )
    with serving(cfg.world, load_world(cfg.world)["port"]):
        # The command line's download settings, so a later `synseg-data download` resumes it;
        # fewer threads and a longer timeout than its defaults, because the server shares this
        # machine: on two loaded cores, 64 threads and 10 s let a few dozen requests time out,
        # and which ones did would change the world's data, hence every figure downstream.
        done(
            "download",
            run_download(
                DownloadConfig(
                    url_list=cfg.world / "cc12m.tsv", output=cfg.raw, threads=16, timeout=30
                )
            ),
        )
    done(
        "extract-nouns",
        run_extract_nouns(NounsConfig(raw=cfg.raw, output=cfg.nouns, processes=cfg.processes)),
    )
    done(
        "filter", run_filter(FilterConfig(nouns=cfg.nouns, output=cfg.labels, exclude=["generic"]))
    )
    done(
        "pack",
        run_pack(
            PackConfig(raw=cfg.raw, labels=cfg.labels, output=cfg.shards, image_size=cfg.image_size)
        ),
    )
    done("pair", run_pair(PairConfig(shards=cfg.shards, processes=cfg.processes)))
    return out
