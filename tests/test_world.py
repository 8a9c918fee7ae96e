import json

import numpy as np
import pytest
from PIL import Image

from pipeline.world import (
    BACKGROUNDS,
    CLASSES,
    IGNORE,
    SYNONYMS,
    UNSEEN,
    WorldConfig,
    render,
    run_world,
)
from synseg.errors import UserError


def test_render_is_deterministic_and_masks_cover_objects():
    a, b = render(3, "val", 7, 64), render(3, "val", 7, 64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert render(3, "val", 8, 64).caption != a.caption or not np.array_equal(
        render(3, "val", 8, 64).mask, a.mask
    )
    # every visible object is big enough to learn at patch size 16 on a 224 image
    for i in range(40):
        s = render(0, "train", i, 64)
        objs = [c for c in s.present if c not in BACKGROUNDS]
        assert objs, "every image holds at least one object"
        for c in objs:
            assert (s.mask == CLASSES.index(c)).mean() > 0.01
        assert set(np.unique(s.mask)) <= set(range(len(CLASSES))) | {IGNORE}


def test_ref_shows_only_seen_classes_in_another_style():
    val = [render(0, "val", i, 64) for i in range(60)]
    ref = [render(0, "ref", i, 64) for i in range(60)]
    assert not {c for s in ref for c in s.present} & set(UNSEEN)
    assert set(UNSEEN) <= {c for s in val for c in s.present}  # val shows them

    # another style: flat, posterised backgrounds (few distinct colours) against textures
    def colours(s):
        return len(np.unique(np.asarray(s.image).reshape(-1, 3), axis=0))

    assert np.median([colours(s) for s in ref]) * 4 < np.median([colours(s) for s in val])
    assert len(CLASSES) == 20 and len(UNSEEN) == 6


def test_captions_carry_the_noise_the_filter_is_for():
    caps = [render(0, "train", i, 32).caption for i in range(300)]
    text = " ".join(caps).lower()
    for noise in ("<person>", "stock photo", "view", "inches", "background", "southwest"):
        assert noise in text, noise
    # captions name (by a class name or a synonym) nearly every object in the picture
    named = total = 0
    for i in range(200):
        s = render(0, "train", i, 64)
        for c in s.present[1:]:
            total += 1
            named += any(name in s.caption.lower() for name in SYNONYMS[c])
    assert named / total > 0.8


def test_world_layout(world):
    meta = json.loads((world / "world.json").read_text())
    assert (world / "classes.txt").read_text().split() == list(CLASSES)
    lines = (world / "cc12m.tsv").read_text().splitlines()
    assert len(lines) == meta["identity"]["count"]
    assert all(
        len(line.split("\t")) == 2 and line.startswith("http://127.0.0.1:") for line in lines
    )
    voc = world / "VOC2012"
    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(ids) == 12
    mask = Image.open(voc / "SegmentationClass" / f"{ids[0]}.png")
    assert mask.mode == "P"  # indexed PNG like VOC's
    assert Image.open(voc / "JPEGImages" / f"{ids[0]}.jpg").size == mask.size
    kinds = meta["url_kinds"]
    assert {"missing", "refused", "broken", "ok"} <= set(kinds)
    for i, k in enumerate(kinds):
        assert (world / "http/train" / f"{i:06d}.jpg").exists() == (k in ("ok", "broken"))


def test_world_reuse_and_refusals(tmp_path):
    cfg = WorldConfig(output=tmp_path / "w", count=5, val_count=1, ref_count=1, size=32)
    assert not run_world(cfg).reused
    assert run_world(cfg).reused
    with pytest.raises(UserError, match="other settings"):
        run_world(WorldConfig(output=tmp_path / "w", count=6, val_count=1, ref_count=1, size=32))
    # the demo owns its world: with replace, other settings make it again
    redone = run_world(
        WorldConfig(output=tmp_path / "w", count=6, val_count=1, ref_count=1, size=32, replace=True)
    )
    assert not redone.reused and redone.train == 6
    assert len(json.loads((tmp_path / "w" / "captions.json").read_text())) == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds"):  # never a folder it did not make
        run_world(WorldConfig(output=tmp_path / "other", count=5, replace=True))
    with pytest.raises(UserError, match="already holds"):
        run_world(WorldConfig(output=tmp_path / "other", count=5))
    with pytest.raises(UserError, match="--count"):
        WorldConfig(count=0)


def test_command_line_world_sizes_are_the_worlds_own_defaults():
    """`synseg-data world` after `make demo` must find the demo's world, not refuse it."""
    import inspect

    from pipeline import cli as data_cli
    from pipeline.demo import DemoConfig
    from trainer import cli as train_cli
    from trainer.world.demo import WorldDemoConfig

    world = inspect.signature(data_cli.world).parameters
    for name in ("count", "val_count", "ref_count"):
        assert world[name].default == getattr(WorldConfig, name), name
        assert (
            getattr(DemoConfig, name)
            == getattr(WorldDemoConfig, name)
            == getattr(WorldConfig, name)
        )
    for command in (data_cli.demo, train_cli.demo):
        assert inspect.signature(command).parameters["count"].default == WorldConfig.count
