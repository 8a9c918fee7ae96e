"""A shortened run of the README's main command: small world, few steps, every stage."""

import json

from pipeline.serve import free_port
from trainer.world.demo import ABLATIONS, WorldDemoConfig, run_world_demo
from trainer.world.report import mccl_verdict


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
        device="cpu",
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
        "in-world CLIP pretraining",
        "CLIPSeg-style decoder",
        "MCCL",
        *ABLATIONS,
        "eval: untrained decoder",
        "eval: CLIPSeg-style init",
        "eval: MCCL (SynSeg)",
    ):
        assert stage in stages, stage
    models = [r["model"] for r in result.table]
    assert models[:3] == ["untrained decoder", "CLIPSeg-style init", "MCCL (SynSeg)"]
    assert len(models) == 3 + len(ABLATIONS)
    report = tmp_path / "reports" / "world"
    for name in ("report.md", "results.json", "loss_curves.png", "label_histogram.png"):
        assert (report / name).is_file(), name
    text = (report / "report.md").read_text()
    assert "| CLIPSeg-style init |" in text and "## IoU per class" in text and "| grass |" in text
    # The sentence states what the table shows, whichever way it went.
    by = {r["model"]: r["mIoU"] for r in result.table}
    delta = 100 * (by["MCCL (SynSeg)"] - by["CLIPSeg-style init"])
    assert f"MCCL training {mccl_verdict(delta)} over" in text
    assert mccl_verdict(0.04) == "left mIoU unchanged (within 0.05 points)"
    assert mccl_verdict(1.26) == "raised mIoU by 1.3 points"
    assert mccl_verdict(-0.3) == "lowered mIoU by 0.3 points"
    for r in result.table:  # every row of the table is in the report with its figure
        assert f"| {r['model']} | {100 * r['mIoU']:.1f} |" in text
    overlays = sorted(p.name for p in (report / "pictures").rglob("*_overlay.png"))
    assert len(overlays) == 6  # 3 val images x (CLIPSeg-style, MCCL)
    saved = json.loads((report / "results.json").read_text())
    assert saved["settings"]["mccl_steps"] == 2 and len(saved["table"]) == len(models)
    # a rerun reuses every stage
    again = []
    run_world_demo(cfg, on_stage=lambda name, what: again.append(what))
    assert sum("reused" in w for w in again) >= 3 + len(ABLATIONS)
