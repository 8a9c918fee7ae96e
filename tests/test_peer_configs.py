"""The protocol presets and the training-free methods' constants, tied to the peers' own files.

``tests/fixtures/peer_configs.json`` is extracted by ``tests/fixtures/extract_peer_configs.py``
from TCL's ``configs/*.yml`` and ``segmentation/configs``, and from SCLIP's, NACLIP's and
ClearCLIP's ``configs/cfg_*.py`` and segmentors (commits in the file). Every value of the
``tcl`` and ``sclip`` presets is compared with it; where the common ``sclip`` protocol differs
from SCLIP's per-dataset configs on purpose, the difference is listed in ``SCLIP_DIFFERS``, and
the test checks that each listed difference is real (so the list cannot go stale).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.eval.datasets import SPECS
from trainer.eval.infer import InferConfig, read_templates
from trainer.eval.protocols import PROTOCOLS, geometry
from trainer.methods.training_free import LOGIT_SCALE, NACLIP_STD

PEERS = json.loads((Path(__file__).parent / "fixtures/peer_configs.json").read_text())
TCL, SCLIP = PEERS["tcl"], PEERS["sclip"]

# Where the common sclip protocol is not SCLIP's own config for that dataset, on purpose (it is
# one protocol for every method): (dataset, setting) -> SCLIP's value.
SCLIP_DIFFERS = {
    ("stuff", "short_side"): 448,  # cfg_coco_stuff164k.py; the common protocol keeps 336
    ("voc", "logit_scale"): 65,  # cfg_voc21.py; the methods keep their own 40
    ("voc", "area_thd"): 0.1,  # cfg_voc21.py; no area threshold in the common protocol
    ("context60", "logit_scale"): 50,
    ("object", "logit_scale"): 50,
}


def test_the_fixture_covers_every_benchmark():
    benchmarks = set(SPECS) - {"world", "world-ref"}
    assert set(TCL["datasets"]) == benchmarks
    for peer in ("sclip", "naclip", "clearclip"):
        assert set(PEERS[peer]["datasets"]) == benchmarks, peer
        for name, d in PEERS[peer]["datasets"].items():
            assert len(d["class_names"]) == SPECS[name].num_classes, (peer, name)


@pytest.mark.parametrize("dataset", sorted(TCL["datasets"]))
def test_tcl_preset_is_tcls_configs(dataset):
    want = TCL["datasets"][dataset]
    p = PROTOCOLS["tcl"]
    assert geometry(p, dataset, 224) == (
        want["short_side"],
        want["long_side"],
        want["window"],
        want["stride"],
    )
    assert want["mode"] == "slide" == InferConfig().mode


def test_tcl_preset_is_tcls_evaluation():
    p = PROTOCOLS["tcl"]
    assert TCL["evaluate_pamr"]["pamr"] and not TCL["evaluate_without_pamr"]["pamr"]
    assert p.bg_threshold == TCL["evaluate_without_pamr"]["bg_thresh"] == 0.5
    assert p.bg_threshold_pamr == TCL["evaluate_pamr"]["bg_thresh"] == 0.4
    assert TCL["evaluate_pamr"]["template"] == TCL["evaluate_without_pamr"]["template"] == "custom"
    assert read_templates(p.templates) == TCL["templates"]["custom"]
    assert list(p.pamr_dilations) == TCL["pamr"]["dilations"]
    assert InferConfig().pamr_iters == TCL["pamr"]["iterations"]
    assert p.average == "prob" and not p.synonyms


def _sclip_value(dataset: str, key: str):
    """SCLIP's value of ``key`` for ``dataset``: its config's, else its segmentor's default."""
    d = SCLIP["datasets"][dataset]
    if key in ("short_side", "long_side"):
        return d[key]
    return d["model"].get(key, SCLIP["defaults"][key])


def _sclip_preset_value(dataset: str, key: str):
    p = PROTOCOLS["sclip"]
    short, long, window, stride = geometry(p, dataset, 224)
    background = SPECS[dataset].background
    return {
        "short_side": short,
        "long_side": long,
        "slide_crop": window,
        "slide_stride": stride,
        "prob_thd": p.bg_threshold if background else 0.0,
        "logit_scale": LOGIT_SCALE["sclip"],
        "area_thd": None,
        "pamr_stride": list(p.pamr_dilations),
    }[key]


SCLIP_KEYS = (
    "short_side",
    "long_side",
    "slide_crop",
    "slide_stride",
    "prob_thd",
    "logit_scale",
    "area_thd",
    "pamr_stride",
)


@pytest.mark.parametrize("dataset", sorted(SCLIP["datasets"]))
def test_sclip_preset_is_sclips_configs_but_for_the_listed_differences(dataset):
    for key in SCLIP_KEYS:
        theirs, ours = _sclip_value(dataset, key), _sclip_preset_value(dataset, key)
        if (dataset, key) in SCLIP_DIFFERS:
            assert theirs == SCLIP_DIFFERS[(dataset, key)] and theirs != ours, (dataset, key)
        else:
            assert ours == theirs, (dataset, key, ours, theirs)


def test_sclip_preset_prompts_and_averaging():
    p = PROTOCOLS["sclip"]
    assert read_templates(p.templates) == SCLIP["templates"]  # CLIP's 80, in SCLIP's order
    assert p.average == "score" and p.pamr_on == "image"


def test_training_free_temperatures_are_their_authors():
    for method in ("sclip", "naclip", "clearclip"):
        assert LOGIT_SCALE[method] == PEERS[method]["defaults"]["logit_scale"], method
    assert PEERS["naclip"]["defaults"]["gaussian_std"] == NACLIP_STD
    assert PEERS["naclip"]["defaults"]["arch"] == "reduced"
    assert PEERS["clearclip"]["base_model"]["ignore_residual"] is True


def test_pamr_is_applied_where_the_peers_apply_it():
    """TCL passes PAMR into ``encode_decode``, which MMSegmentation's slide inference calls
    once per window; SCLIP applies it after its window loop, NACLIP in ``predict``, on the
    averaged map of the whole image."""
    assert TCL["pamr_applied"] == {"function": "encode_decode", "after_window_loop": False}
    assert PROTOCOLS["tcl"].pamr_on == "window"
    assert SCLIP["pamr_applied"] == {"function": "forward_slide", "after_window_loop": True}
    assert PEERS["naclip"]["pamr_applied"]["function"] == "predict"
    assert PROTOCOLS["sclip"].pamr_on == "image"
    assert list(PROTOCOLS["sclip"].pamr_dilations) == PEERS["naclip"]["defaults"]["pamr_stride"]


@pytest.mark.parametrize("pamr", [False, True])
def test_eval_passes_the_presets_values_on(pamr):
    """What ``eval`` runs (EvalConfig.inference) carries the peers' values, with and without
    PAMR: its dilations, where it is applied, the background threshold, prompts' averaging."""
    from trainer.eval.evaluate import EvalConfig

    tcl = EvalConfig("voc", ".", protocol="tcl", pamr=pamr).inference(224)
    assert list(tcl.pamr_dilations) == TCL["pamr"]["dilations"]
    assert tcl.pamr == ("window" if pamr else "off")
    evaluate = TCL["evaluate_pamr" if pamr else "evaluate_without_pamr"]
    assert tcl.bg_threshold == evaluate["bg_thresh"] and tcl.average == "prob"
    assert (tcl.short_side, tcl.window, tcl.stride) == (448, 448, 224)
    sclip = EvalConfig("voc", ".", protocol="sclip", pamr=pamr).inference(224)
    assert list(sclip.pamr_dilations) == SCLIP["defaults"]["pamr_stride"]
    assert sclip.pamr == ("image" if pamr else "off")
    assert sclip.bg_threshold == SCLIP["datasets"]["voc"]["model"]["prob_thd"]
    assert sclip.average == "score" and sclip.synonyms
    assert (sclip.short_side, sclip.window, sclip.stride) == (
        SCLIP["datasets"]["voc"]["short_side"],
        SCLIP["defaults"]["slide_crop"],
        SCLIP["defaults"]["slide_stride"],
    )
    city = EvalConfig("city", ".", protocol="sclip", pamr=pamr).inference(224)
    assert city.short_side == SCLIP["datasets"]["city"]["short_side"]


MMSEG = json.loads((Path(__file__).parent / "fixtures/mmseg_0.27_classes.json").read_text())
CLASSNAMES = Path(__file__).parents[1] / "trainer/eval/classnames"


@pytest.mark.parametrize("dataset", sorted(TCL["datasets"]))
def test_tcl_prompts_the_raw_class_names_tcl_prompts(dataset):
    """MMSegmentation 0.27's CLASSES, or TCL's own datasets' (VOC-20, COCO-Object): one raw
    name a class ("diningtable", "building-other")."""
    from trainer.eval.datasets import read_classnames

    want = TCL["classes"].get(dataset) or MMSEG[dataset]
    # stripped: MMSegmentation's ADE20K holds 'bed ' and SCLIP's files trailing blanks, which
    # CLIP's tokenizer drops (it cleans whitespace before the byte-pair encoding)
    assert read_classnames(CLASSNAMES / "tcl" / f"{dataset}.txt") == [[n.strip()] for n in want]


@pytest.mark.parametrize("dataset", sorted(SCLIP["datasets"]))
def test_sclip_prompts_sclips_own_class_files(dataset):
    from trainer.eval.datasets import read_classnames

    want = [
        [n.strip() for n in line.split(", ")] for line in SCLIP["datasets"][dataset]["class_names"]
    ]
    assert read_classnames(CLASSNAMES / "sclip" / f"{dataset}.txt") == want


def test_sclip_labels_follow_sclips_rule_with_its_background_names(world, tmp_path):
    """SCLIP's predict: a softmax over every query (background's line-0 names too), each class
    its best query, the argmax, then background wherever that best is below prob_thd."""
    import numpy as np
    import torch
    from PIL import Image

    from tests.test_subsets import fake_voc
    from trainer import methods
    from trainer.eval.datasets import open_dataset
    from trainer.eval.evaluate import EvalConfig, build_model, prompted_names, resolve_device
    from trainer.eval.infer import Segmenter

    root = fake_voc(tmp_path / "voc")
    shots = sorted((world / "VOC2012/JPEGImages").glob("val_*.jpg"))[:4]
    for shot, i in zip(
        shots, (root / "ImageSets/Segmentation/val.txt").read_text().split(), strict=True
    ):
        Image.open(shot).resize((64, 64)).save(root / f"JPEGImages/{i}.jpg")
    cfg = EvalConfig("voc", str(root), method="sclip", protocol="sclip", mode="whole")
    data = open_dataset("voc", root)
    prompts, path = prompted_names(cfg, data, cfg.protocol_of("sclip"))
    assert path == CLASSNAMES / "sclip/voc.txt" and len(prompts[0]) == 26
    model, train_cfg, _, method = build_model(None, "tiny", None, resolve_device("cpu"))
    infer = EvalConfig("voc", str(root), method="sclip", protocol="sclip", mode="whole").inference(
        model.native_size
    )
    scorer = methods.scorer("sclip", model, train_cfg, infer)
    seg = Segmenter(scorer, prompts, ["a photo of a {}."], infer, True, True)
    query_class = [c for c, names in enumerate(prompts) for _ in names]  # get_cls_idx
    for sample in data.samples[:2]:
        img, label = data.load(sample)
        got, _ = seg.predict(img, label.shape)
        probs = seg.name_probs(img, label.shape).double()  # (queries, H, W), softmax over all
        per_class = torch.stack(
            [probs[[q for q, c in enumerate(query_class) if c == k]].amax(0) for k in range(21)]
        )
        want = per_class.argmax(0)
        want[per_class.amax(0) < SCLIP["datasets"]["voc"]["model"]["prob_thd"]] = 0
        assert np.array_equal(got, want.numpy())
    # eval runs it so, and says so in the result
    from trainer.eval.evaluate import run_eval

    res = run_eval(
        EvalConfig("voc", str(root), method="sclip", protocol="sclip", output=str(tmp_path / "r"))
    )
    settings = json.loads(Path(res.files[0]).read_text())["settings"]
    assert settings["prompt_background"] is True
    assert settings["names_file"].endswith("classnames/sclip/voc.txt")
    # --names project: this project's names, background a threshold only
    project = EvalConfig("voc", str(root), protocol="sclip", names="project")
    assert prompted_names(project, data, project.protocol_of("sclip")) == (data.classes, None)
