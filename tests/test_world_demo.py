"""A shortened run of the README's main command: small world, few steps, every stage."""

import json

import pytest

from pipeline.serve import free_port
from pipeline.world import SEEN, UNSEEN
from trainer.methods.training_free import TRAINING_FREE
from trainer.world.demo import WorldDemoConfig, run_world_demo
from trainer.world.rows import (
    ABLATIONS,
    INIT,
    MCCL_START,
    OVSEG_CLIP_START,
    PHYSICAL,
    VILSEG_CLIP_START,
    VILSEG_RANDOM_START,
    split_scores,
    summarise,
    verdict,
)

VILSEG_ROWS = ("ViL-Seg from the in-world CLIP", "ViL-Seg from scratch (the paper's start)")
OVSEG_ROW = "OVSegmentor from the in-world CLIP"
INIT_ROWS = (INIT, *(f"{INIT} {name}" for name in PHYSICAL))


def test_shortened_demo_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo uses the README's default paths
    cfg = WorldDemoConfig(
        count=80,
        val_count=6,
        ref_count=12,
        port=free_port(),
        pretrain_steps=3,
        init_steps=3,
        mccl_steps=2,
        batch_size=8,
        sweep=False,
        seeds=2,
        device="cpu",
        workers=0,  # no loader process per run: the test stays quick
        processes=1,
    )
    stages = []
    result = run_world_demo(cfg, on_stage=lambda name, what: stages.append(name))
    for stage in (
        "data: world",
        "data: download",
        "data: extract-nouns",
        "data: filter",
        "data: pack",
        "data: pair",
        "in-world CLIP pretraining",
        *(f"{r}, seed {s}" for r in INIT_ROWS for s in (42, 43)),
        "CLIPSeg-style decoder",
        "MCCL (SynSeg), seed 42",
        "MCCL (SynSeg), seed 43",
        *(f"{a}, seed 42" for a in ABLATIONS),
        *(f"{v}, seed {s}" for v in (*VILSEG_ROWS, OVSEG_ROW) for s in (42, 43)),
        "eval: untrained decoder",
        *(f"eval: {r}" for r in INIT_ROWS),
        "eval: MCCL (SynSeg)",
        f"eval: {VILSEG_CLIP_START}",
        f"eval: {VILSEG_RANDOM_START}",
        *(f"eval: {v}" for v in VILSEG_ROWS),
        f"eval: {OVSEG_CLIP_START}",
        f"eval: {OVSEG_ROW}",
    ):
        assert stage in stages, stage
    models = [r["model"] for r in result.table]
    first = ["untrained decoder", *INIT_ROWS, MCCL_START, "MCCL (SynSeg)"]
    assert models[: len(first)] == first
    i = models.index(VILSEG_ROWS[0])
    assert models[i - 1 : i + 3] == [
        VILSEG_CLIP_START,
        VILSEG_ROWS[0],
        VILSEG_RANDOM_START,
        VILSEG_ROWS[1],
    ]
    assert models[i + 3 : i + 5] == [OVSEG_CLIP_START, OVSEG_ROW]
    assert len(models) == 3 + len(INIT_ROWS) + len(ABLATIONS) + 6 + len(TRAINING_FREE)
    starts = {r["model"]: r["start"] for r in result.table}
    assert starts["MCCL (SynSeg)"] == MCCL_START and starts[VILSEG_ROWS[0]] == VILSEG_CLIP_START
    assert starts[VILSEG_ROWS[1]] == VILSEG_RANDOM_START and starts[INIT] == "untrained decoder"
    assert all(starts[r] == INIT for r in INIT_ROWS[1:])
    assert starts[OVSEG_ROW] == OVSEG_CLIP_START
    # MCCL's start, scored from the decoder file the demo wrote in CLIPSeg's layout, is the
    # init's seed-42 run, scored from its checkpoint
    by = {r["model"]: r for r in result.table}
    assert by[INIT]["per_seed"][0]["seed"] == 42
    assert by[MCCL_START]["per_seed"][0]["per_class"] == by[INIT]["per_seed"][0]["per_class"]
    report = tmp_path / "reports" / "world"
    for name in ("report.md", "results.json", "loss_curves.png", "label_histogram.png"):
        assert (report / name).is_file(), name
    saved = json.loads((report / "results.json").read_text())
    assert saved["settings"]["mccl_steps"] == 2 and len(saved["table"]) == len(models)
    assert saved["unseen"] == list(UNSEEN) and saved["seen"] == list(SEEN)
    for row in saved["table"]:
        for key in ("seen", "unseen", "all", "hm"):
            assert key in row["mean"] and key in row["spread"]
        seeds = [p["seed"] for p in row["per_seed"]]
        trained = row["model"].startswith("MCCL") or row["model"] in (
            *VILSEG_ROWS,
            OVSEG_ROW,
            *INIT_ROWS,
        )
        assert seeds == ([42, 43] if trained else [None])
        for p in row["per_seed"]:
            s, u = p["seen"], p["unseen"]
            if s == s and u == u and s + u > 0:  # the harmonic mean of the two
                assert abs(p["hm"] - 2 * s * u / (s + u)) < 1e-12
    # The seen/unseen split is honoured: no unseen class has a pixel in any ref mask.
    import numpy as np
    from PIL import Image

    voc = tmp_path / "data" / "world" / "VOC2012"
    classes = (tmp_path / "data" / "world" / "classes.txt").read_text().split()
    unseen_ids = {classes.index(c) for c in UNSEEN}
    for i in (voc / "ImageSets/Segmentation/ref.txt").read_text().split():
        values = set(np.unique(np.asarray(Image.open(voc / "SegmentationClass" / f"{i}.png"))))
        assert not values & unseen_ids, i
    text = (report / "report.md").read_text()
    assert "## What the experiment found" in text and saved["finding"] in text
    assert "| CLIPSeg-style init |" in text and "## IoU per class" in text and "| *fish* |" in text
    for r in saved["table"]:  # every row of the table is in the report
        assert f"| {r['model']} |" in text
    overlays = sorted(p.name for p in (report / "pictures").rglob("*_overlay.png"))
    assert len(overlays) == 9  # 3 val images x (CLIPSeg-style, MCCL, ViL-Seg from the CLIP)
    assert (
        "ViL-Seg from the in-world CLIP, trained on the same shards' captions" in saved["finding"]
    )
    vil = next(x for x in text.splitlines() if x.startswith(f"| {VILSEG_ROWS[0]} |"))
    assert vil.rstrip(" |").endswith(("(tie)", "(gain)", "(loss)"))  # compared with its start
    # a rerun reuses every stage
    again = []
    run_world_demo(cfg, on_stage=lambda name, what: again.append(what))
    # CLIP, and every run: the mask-supervised inits, MCCL and its ablations, the two ViL-Seg
    # rows and OVSegmentor's, 2 seeds each
    runs = len(INIT_ROWS) + 1 + len(ABLATIONS) + 3
    assert sum("reused" in w for w in again) == 1 + 2 * runs
    # a CLIPSeg-style init written after the MCCL runs (a new one) makes them again
    import os
    from dataclasses import replace

    init = tmp_path / "runs" / "world" / "clipseg-world.pth"
    later = init.stat().st_mtime_ns + 10**9
    os.utime(init, ns=(later, later))
    third = []
    small = replace(cfg, ablations=False, vilseg=False, ovsegmentor=False, baselines=False)
    run_world_demo(small, on_stage=lambda name, what: third.append((name, what)))
    said = dict(third)
    assert all(said[f"{r}, seed 42"] == "reused" for r in INIT_ROWS)
    assert said["MCCL (SynSeg), seed 42"] != "reused" and "steps" in said["MCCL (SynSeg), seed 42"]


def row(*unseen):
    """A table row whose seeds score these unseen mIoUs (and 0.5 everywhere else)."""
    return summarise(
        "r",
        [
            {"seed": i, "seen": 0.5, "unseen": u, "all": 0.5, "hm": 0.5}
            for i, u in enumerate(unseen)
        ],
    )


def test_a_difference_inside_the_spread_is_a_tie():
    start = row(0.30)
    assert verdict(start, row(0.31, 0.33, 0.29), "unseen") == "tie"  # spread 0.02, delta 0.01
    assert verdict(start, row(0.40, 0.41, 0.39), "unseen") == "gain"
    assert verdict(start, row(0.20, 0.21, 0.19), "unseen") == "loss"
    assert verdict(start, row(0.31), "unseen") == "gain"  # one run each: no spread to hide in
    assert verdict(start, row(0.303), "unseen") == "tie"  # under half a point
    assert verdict(start, row(0.30), "unseen") == "tie"


def test_the_tie_band_is_twice_the_larger_spread():
    """Spread 0.02 on both sides of the band: a difference of 0.03 (between one and two
    spreads) is a tie, one of 0.055 (between two and three) a gain."""

    start = row(0.30)
    assert row(0.33, 0.35, 0.31)["spread"]["unseen"] == pytest.approx(0.02)
    assert verdict(start, row(0.33, 0.35, 0.31), "unseen") == "tie"
    assert verdict(start, row(0.355, 0.375, 0.335), "unseen") == "gain"
    assert verdict(row(0.33, 0.35, 0.31), start, "unseen") == "tie"  # the larger spread counts
    assert verdict(start, row(0.245, 0.265, 0.225), "unseen") == "loss"


def test_the_split_scores_of_a_hand_made_result():
    per_class = {"grass": 0.8, "snow": 0.2, "kite": 0.6, "fish": None, "lava": 0.4}
    got = split_scores(per_class, {"snow", "fish", "lava"})
    assert got["seen"] == pytest.approx(0.7)  # grass, kite
    assert got["unseen"] == pytest.approx(0.3)  # snow, lava; fish has no pixels
    assert got["all"] == pytest.approx(0.5)
    assert got["hm"] == pytest.approx(2 * 0.7 * 0.3 / 1.0)
