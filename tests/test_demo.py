import json

from pipeline.demo import DemoConfig, run_demo
from pipeline.serve import free_port


def test_demo_runs_every_stage_and_reruns_for_free(tmp_path):
    cfg = DemoConfig(
        world=tmp_path / "world",
        raw=tmp_path / "raw",
        nouns=tmp_path / "nouns",
        labels=tmp_path / "labels",
        shards=tmp_path / "shards",
        count=60,
        val_count=4,
        ref_count=4,
        size=48,
        image_size=32,
        port=free_port(),
        processes=1,
    )
    seen = []
    first = run_demo(cfg, on_stage=lambda name, stats: seen.append(name))
    assert seen == ["world", "download", "extract-nouns", "filter", "pack", "pair"]
    sizes = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == first.stages["pack"].samples > 50
    again = run_demo(cfg)
    assert again.stages["world"].reused
    assert again.stages["extract-nouns"].written == 0 and again.stages["filter"].written == 0
    assert (
        again.stages["pack"].packed == 0
        and again.stages["pack"].samples == first.stages["pack"].samples
    )
