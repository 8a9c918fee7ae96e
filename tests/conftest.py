"""Shared fixtures: one small synthetic world, served on loopback and run through every stage.

The chain is built once per test session in a temporary folder; tests that change files work
on their own copies.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from pipeline.download import DownloadConfig, run_download  # noqa: E402
from pipeline.filter import FilterConfig, run_filter  # noqa: E402
from pipeline.nouns import NounsConfig, run_extract_nouns  # noqa: E402
from pipeline.pack import PackConfig, run_pack  # noqa: E402
from pipeline.serve import free_port, serving  # noqa: E402
from pipeline.world import WorldConfig, run_world  # noqa: E402

WORLD_COUNT = 160
PER_SHARD = 40


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "world"
    run_world(
        WorldConfig(
            output=out,
            count=WORLD_COUNT,
            val_count=12,
            ref_count=12,
            size=64,
            port=free_port(),
            dead_fraction=0.08,
            broken_fraction=0.03,
        )
    )
    return out


@pytest.fixture(scope="session")
def served(world) -> str:
    """The world on a loopback port (its URL list rewritten to that port)."""
    from pipeline.world import load_world

    with serving(world, load_world(world)["port"]) as base:
        yield base


@pytest.fixture(scope="session")
def raw(world, served, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chain") / "raw"
    run_download(
        DownloadConfig(
            url_list=world / "cc12m.tsv",
            output=out,
            samples_per_shard=PER_SHARD,
            threads=64,  # the default, so a server that queues too few connections loses URLs
            timeout=3,
            image_size=64,
        )
    )
    return out


@pytest.fixture(scope="session")
def nouns(raw) -> Path:
    out = raw.parent / "nouns"
    run_extract_nouns(NounsConfig(raw=raw, output=out))
    return out


@pytest.fixture(scope="session")
def labels(nouns) -> Path:
    out = nouns.parent / "labels"
    run_filter(FilterConfig(nouns=nouns, output=out))
    return out


@pytest.fixture(scope="session")
def shards(raw, labels) -> Path:
    out = raw.parent / "shards"
    run_pack(PackConfig(raw=raw, labels=labels, output=out, image_size=48, max_count=25))
    return out


@pytest.fixture(scope="session")
def tiny_run(shards, tmp_path_factory) -> Path:
    """Two steps of the tiny SynSeg preset on the world's shards: a run folder to load,
    score and export."""
    from trainer.train.config import resolve
    from trainer.train.loop import run_train

    out = tmp_path_factory.mktemp("tinyrun") / "run"
    overrides = [f"data.shards={shards}", f"run.output={out}", "optim.max_steps=2"]
    run_train(resolve("tiny", overrides=[*overrides, "data.batch_size=8"]))
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
