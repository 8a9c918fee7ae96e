"""``--protocol native``: the training-free methods scored with their authors' own configs.

Every value of ``trainer.methods.training_free.native_config`` is tied to the peers' files
(``tests/fixtures/peer_configs.json``, extracted by ``tests/fixtures/extract_peer_configs.py``).
Then the native path of ``eval`` (``scoring``: the protocol, the prompted names, the
segmenter) is compared, label for label, with a direct float64 transcription of each peer's
segmentor: SCLIP's ``clip_segmentor.py``, NACLIP's ``naclip.py``, ClearCLIP's
``clearclip_segmentor.py`` (their ``forward_slide``, whole-image ``forward_feature``, PAMR and
``postprocess_result``), on the tiny open_clip model, on VOC-21, Context-60, COCO-Stuff and
Cityscapes, with an image of the benchmark's shape and a very thin one (420 x 44).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synseg.errors import UserError
from tests.test_methods import clearclip_padsize  # ClearCLIP's compute_padsize
from trainer.eval.datasets import CLASSNAMES, SPECS, open_dataset, read_classnames
from trainer.eval.evaluate import EvalConfig, result_stem, scoring
from trainer.eval.infer import InferConfig, read_templates, rescale_size, resize_bilinear
from trainer.eval.pamr import pamr
from trainer.eval.protocols import PROTOCOLS, get_protocol
from trainer.methods.training_free import (
    NATIVE_BASE,
    NATIVE_CONFIG_FILES,
    NATIVE_REPOSITORIES,
    DenseCLIP,
    last_block,
    native_config,
)

PEERS = json.loads((Path(__file__).parent / "fixtures/peer_configs.json").read_text())
NATIVE = ("sclip", "naclip", "clearclip")
BENCHMARKS = sorted(set(SPECS) - {"world", "world-ref"})


def peer_value(peer: str, dataset: str, key: str):
    """The peer's value of ``key`` for ``dataset``: its config's, else its segmentor's default."""
    d = PEERS[peer]["datasets"][dataset]
    if key in ("short_side", "long_side"):
        return d[key]
    return d["model"].get(key, PEERS[peer]["defaults"].get(key))


def peer_class_names(peer: str, dataset: str) -> list[list[str]]:
    """The peer's class file as its ``get_cls_idx`` splits it (CLIP's tokenizer drops the
    blanks around a name)."""
    sep = PEERS[peer]["name_separator"]
    lines = PEERS[peer]["datasets"][dataset]["class_names"]
    return [[n.strip() for n in line.split(sep)] for line in lines]


# ----------------------------------------------------------------------------- the values


@pytest.mark.parametrize("peer", NATIVE)
@pytest.mark.parametrize("dataset", BENCHMARKS)
def test_native_values_are_the_peers_configs(peer, dataset):
    n = native_config(peer, dataset)
    assert n.short_side == peer_value(peer, dataset, "short_side")
    assert n.long_side == peer_value(peer, dataset, "long_side")
    assert n.window == peer_value(peer, dataset, "slide_crop")
    assert n.stride == peer_value(peer, dataset, "slide_stride")
    assert n.logit_scale == peer_value(peer, dataset, "logit_scale")
    assert n.prob_thd == peer_value(peer, dataset, "prob_thd")
    assert n.area_thd == (peer_value(peer, dataset, "area_thd") or 0.0)
    steps = peer_value(peer, dataset, "pamr_steps")
    assert n.pamr == bool(steps)
    assert (PEERS[peer]["pamr_applied"] is not None) == ("pamr_steps" in PEERS[peer]["defaults"])
    if steps is not None:
        assert list(n.pamr_dilations) == peer_value(peer, dataset, "pamr_stride")
        assert steps in (0, InferConfig().pamr_iters)  # NACLIP's 10 steps are PAMR's default
    # prompts: the peer's class file, each query through its 80 templates
    assert read_classnames(CLASSNAMES / n.names / f"{dataset}.txt") == peer_class_names(
        peer, dataset
    )
    assert PEERS[peer]["prompts_with"] == "openai_imagenet_template"
    assert read_templates(n.templates) == PEERS[peer]["templates"]
    # where the values come from
    repo, commit = NATIVE_REPOSITORIES[peer].split("@")
    assert PEERS[peer]["commit"].startswith(commit) and repo.lower() in PEERS["_source"].lower()
    assert PEERS[peer]["datasets"][dataset]["config"] == f"configs/{NATIVE_CONFIG_FILES[dataset]}"
    assert n.source == f"{NATIVE_REPOSITORIES[peer]} configs/{NATIVE_CONFIG_FILES[dataset]}"


def test_every_peer_config_is_read():
    assert set(NATIVE_BASE) == set(NATIVE)
    assert set(NATIVE_CONFIG_FILES) == set(BENCHMARKS)
    for peer in NATIVE:
        assert set(PEERS[peer]["datasets"]) == set(BENCHMARKS), peer


@pytest.mark.parametrize("peer", NATIVE)
@pytest.mark.parametrize("dataset", BENCHMARKS)
@pytest.mark.parametrize("pamr", [None, False, True])
def test_eval_runs_the_native_values(peer, dataset, pamr):
    """What ``eval --protocol native`` hands the segmenter: the native config, whatever the
    model's size, with the options a user gives still winning."""
    n = native_config(peer, dataset)
    cfg = EvalConfig(dataset, ".", method=peer, protocol="native", pamr=pamr)
    infer = cfg.inference(64, peer)
    assert (infer.short_side, infer.long_side) == (n.short_side, n.long_side)
    assert infer.mode == ("slide" if n.window else "whole")
    if n.window:
        assert (infer.window, infer.stride) == (n.window, n.stride)
    assert infer.logit_scale == n.logit_scale and infer.area_threshold == n.area_thd
    assert infer.bg_threshold == n.prob_thd and infer.average == "score" and infer.synonyms
    on = n.pamr if pamr is None else pamr
    assert infer.pamr == ("image" if on else "off")
    assert tuple(infer.pamr_dilations) == n.pamr_dilations
    p = cfg.protocol_of(peer)
    assert p.prompt_background and p.names == n.names and p.source == n.source
    given = EvalConfig(
        dataset, ".", method=peer, protocol="native", logit_scale=7, window=96, mode="slide"
    ).inference(64, peer)
    assert (given.logit_scale, given.window, given.mode) == (7, 96, "slide")


def test_trained_methods_take_the_protocol_their_paper_reports():
    assert get_protocol("native", "synseg", "voc").short_side == PROTOCOLS["tcl"].short_side
    assert get_protocol("native", "synseg", "world").window == PROTOCOLS["tcl"].window
    assert EvalConfig("voc", ".", protocol="native", method="synseg").inference(224, "synseg") == (
        EvalConfig("voc", ".", protocol="tcl", method="synseg").inference(224, "synseg")
    )


@pytest.mark.parametrize(
    ("method", "dataset", "message"),
    [
        ("maskclip", "voc", "maskclip's published figures come from its own harness"),
        ("vilseg", "voc", "vilseg's paper does not give the protocol"),
        ("sclip", "world", "world has none: use --protocol sclip or tcl"),
    ],
)
def test_what_has_no_native_config_is_refused_in_one_line(method, dataset, message):
    with pytest.raises(UserError, match=message):
        EvalConfig(dataset, ".", method=method, protocol="native")


def test_native_result_names_say_native_and_pamr():
    cfg = EvalConfig("voc", ".", method="naclip", protocol="native")
    assert (
        result_stem(cfg, "naclip", False, cfg.uses_pamr("naclip")) == "eval-voc-naclip-native-pamr"
    )
    off = EvalConfig("voc", ".", method="naclip", protocol="native", pamr=False)
    assert result_stem(off, "naclip", False, off.uses_pamr("naclip")) == "eval-voc-naclip-native"


# ----------------------------------------------------------------------------- the peers' path

PEER_MEAN = torch.tensor([122.771, 116.746, 104.094], dtype=torch.float64).view(1, 3, 1, 1)
PEER_STD = torch.tensor([68.501, 66.632, 70.323], dtype=torch.float64).view(1, 3, 1, 1)


def forward_feature(exact: DenseCLIP, peer: str, img: torch.Tensor, text: torch.Tensor):
    """The peers' ``forward_feature`` of a normalised image (1, 3, H, W): patch features of
    the rewritten last block, normalised, cosines with the queries, bilinear to (H, W)."""
    stream, grid = exact.backbone.before_last_block(img, resize="scale")
    block = exact.backbone.model.visual.transformer.resblocks[-1]
    feats = exact.backbone.project(last_block(block, stream, peer, grid))[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ text.T
    p = exact.patch_size
    w, h = img[0].shape[-2] // p, img[0].shape[-1] // p
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], w, h)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear")


def forward_slide(exact, peer, img, text, stride: int, crop: int):
    """The peers' ``forward_slide`` (ClearCLIP's pads a crop that is not a patch multiple)."""
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = img.new_zeros((1, text.shape[0], h_img, w_img))
    count_mat = img.new_zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            H, W = crop_img.shape[2:]
            pad = clearclip_padsize(H, W, exact.patch_size) if peer == "clearclip" else (0,) * 4
            if any(pad):
                crop_img = F.pad(crop_img, pad)
            logit = forward_feature(exact, peer, crop_img, text)
            if any(pad):
                logit = logit[:, :, pad[2] : pad[2] + H, pad[0] : pad[0] + W]
            # the peers add F.pad(logit, (x1, W - x2, y1, H - y2)): the same sum, in place
            preds[:, :, y1:y2, x1:x2] += logit
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def postprocess(logits, query_idx: list[int], scale: float, prob_thd: float, area_thd):
    """The peers' ``postprocess_result`` of (queries, H, W) logits: class probabilities
    (each class its best query) and the label map."""
    seg = (logits * scale).softmax(0)
    num_cls, num_queries = max(query_idx) + 1, len(query_idx)
    if num_cls != num_queries:
        cls_index = F.one_hot(torch.tensor(query_idx)).T.view(num_cls, num_queries, 1, 1)
        seg = (seg.unsqueeze(0) * cls_index).max(1)[0]
    return seg, sclip_labels(seg, prob_thd, area_thd)


def sclip_labels(seg: torch.Tensor, prob_thd: float, area_thd) -> torch.Tensor:
    """The end of SCLIP's ``postprocess_result``: its area_thd where it is set, then the
    argmax, background under prob_thd."""
    num_cls = seg.shape[0]
    if area_thd is not None:
        seg = seg.clone()
        predictions = F.one_hot(seg.argmax(0), num_cls).to(seg.dtype)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg.dtype)
        seg[1:] *= area_pred.transpose(0, -1)
    pred = seg.argmax(0, keepdim=True)
    pred[seg.max(0, keepdim=True)[0] < prob_thd] = 0
    return pred[0]


def peer_predict(peer, dataset, exact, text, query_idx, image: Image.Image):
    """One image through the peer's predict for its config of ``dataset``, in float64."""
    value = lambda key: peer_value(peer, dataset, key)  # noqa: E731
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    w, h = rescale_size(image.width, image.height, value("short_side"), value("long_side"))
    x = torch.from_numpy(resize_bilinear(arr, w, h).astype(np.float64)).permute(2, 0, 1)[None]
    inputs = (x - PEER_MEAN) / PEER_STD  # SegDataPreProcessor on the resized image
    ori = (image.height, image.width)
    if value("slide_crop") > 0:
        logits = forward_slide(
            exact, peer, inputs, text, value("slide_stride"), value("slide_crop")
        )
    else:  # NACLIP's whole image: forward_feature at the resized size
        logits = forward_feature(exact, peer, inputs, text)
    logits = F.interpolate(logits, size=ori, mode="bilinear", align_corners=False)
    if value("pamr_steps"):  # NACLIP's predict (SCLIP's forward_slide, where it is on)
        img = F.interpolate(inputs, size=ori, mode="bilinear", align_corners=False)
        logits = pamr(img, logits, value("pamr_steps"), tuple(value("pamr_stride")))
    area = value("area_thd")
    return postprocess(logits[0], query_idx, value("logit_scale"), value("prob_thd"), area)


def fake_benchmark(dataset: str, root: Path, images: list[Image.Image]) -> Path:
    """``images`` in the dataset's layout, each with an all-zero label map of its size."""
    voc_like = {
        "voc": ("SegmentationClass", "Segmentation"),
        "context60": ("SegmentationClassContext", "SegmentationContext"),
    }
    for k, img in enumerate(images):
        label = Image.fromarray(np.zeros((img.height, img.width), np.uint8))
        if dataset in voc_like:
            pairs = [("JPEGImages", f"{k:06d}.jpg"), (voc_like[dataset][0], f"{k:06d}.png")]
        elif dataset == "stuff":
            pairs = [
                ("images/val2017", f"{k:012d}.jpg"),
                ("annotations/val2017", f"{k:012d}_labelTrainIds.png"),
            ]
        else:  # city
            pairs = [
                ("leftImg8bit/val/bonn", f"bonn_{k:06d}_leftImg8bit.png"),
                ("gtFine/val/bonn", f"bonn_{k:06d}_gtFine_labelTrainIds.png"),
            ]
        for (folder, name), picture in zip(pairs, (img, label), strict=True):
            (root / folder).mkdir(parents=True, exist_ok=True)
            picture.save(root / folder / name, quality=95)
    if dataset in voc_like:
        lists = root / "ImageSets" / voc_like[dataset][1]
        lists.mkdir(parents=True, exist_ok=True)
        (lists / "val.txt").write_text("".join(f"{k:06d}\n" for k in range(len(images))))
    return root


SHAPES = {"voc": (50, 37), "context60": (50, 37), "stuff": (64, 48), "city": (64, 32)}


@pytest.fixture(scope="module")
def pictures(world) -> list[Image.Image]:
    return [
        Image.open(p).convert("RGB")
        for p in sorted((world / "VOC2012/JPEGImages").glob("val_*.jpg"))[:2]
    ]


@pytest.mark.parametrize("peer", NATIVE)
@pytest.mark.parametrize("dataset", sorted(SHAPES))
def test_native_labels_equal_the_peers_segmentor(peer, dataset, pictures, tmp_path):
    images = [pictures[0].resize(SHAPES[dataset])]
    if dataset != "stuff":  # thinner than the windows (171 classes make stuff's maps slow)
        images.append(pictures[1].resize((420, 44)))
    root = fake_benchmark(dataset, tmp_path / dataset, images)
    # fewer templates keep the test short; the native templates are tied to the peers above
    cfg = EvalConfig(dataset, str(root), method=peer, protocol="native", templates="clip7")
    data = open_dataset(dataset, root)
    sc = scoring(cfg, data, None, torch.device("cpu"))
    seg = sc.segmenter
    classes = peer_class_names(peer, dataset)
    query_idx = [c for c, names in enumerate(classes) for _ in names]  # get_cls_idx
    assert seg.names == [n for names in classes for n in names]  # every query, in its order
    exact = DenseCLIP(copy.deepcopy(seg.scorer.backbone).double(), peer).double()
    text = seg.text.double()  # the text side is tied to the peers in test_methods.py
    agree = total = 0
    seen = set()
    for sample in data.samples:
        image, label = data.load(sample)
        got, _ = seg.predict(image, label.shape)
        probs, want = peer_predict(peer, dataset, exact, text, query_idx, image)
        assert got.shape == want.shape == label.shape
        top2 = probs.topk(2, dim=0).values
        clear = (top2[0] - top2[1]) > 1e-4  # not a tie between two classes...
        if SPECS[dataset].background:  # ...nor at the background threshold
            clear &= (top2[0] - peer_value(peer, dataset, "prob_thd")).abs() > 1e-4
        clear = clear.numpy()
        assert clear.mean() > 0.9
        assert np.array_equal(got[clear], want.numpy()[clear])
        agree += int((got == want.numpy()).sum())
        total += got.size
        seen |= set(np.unique(got).tolist())
    assert agree / total > 0.99 and len(seen) > 1


def test_the_area_threshold_drops_small_classes_as_sclip_does():
    """SCLIP's area_thd on class probabilities made by hand: 12 pixels go to classes other
    than background; class 2 holds 2 of them (17%), classes 3 and 4 one each (8%). At 0.1,
    3 and 4 are dropped: class 4's pixel goes to its next best class (1), class 3's to
    background (its next best is under prob_thd)."""
    from trainer.eval.infer import Segmenter

    act = torch.full((5, 4, 4), 0.05, dtype=torch.float64)
    act[0, 0, :] = 0.9  # row 0: background
    act[1, 1:, :] = 0.8  # rows 1-3: class 1 ...
    act[2, 1, :2] = 0.85  # ... but 2 pixels of class 2,
    act[3, 3, 3], act[1, 3, 3] = 0.95, 0.2  # 1 of class 3, its next best under prob_thd,
    act[4, 2, 0] = 0.95  # and 1 of class 4, its next best class 1
    seg = Segmenter.__new__(Segmenter)  # its rules alone, without a model
    seg.background = seg.prompt_background = True
    for area in (0.0, 0.1, 0.15, 0.2):  # at 0.15 class 2 stays: 2 > 0.15 * 12, not * 16
        seg.cfg = InferConfig(bg_threshold=0.3, area_threshold=area)
        labels = seg._labels(seg._drop_small_classes(act) if area else act)
        assert torch.equal(labels, sclip_labels(act, 0.3, area or None)), area
    assert labels[2, 0] == 1 and labels[3, 3] == 0 and (labels[1, :2] == 1).all()  # at 0.2
    for area in (0.1, 0.15):
        seg.cfg = InferConfig(bg_threshold=0.3, area_threshold=area)
        labels = seg._labels(seg._drop_small_classes(act))
        assert labels[2, 0] == 1 and labels[3, 3] == 0 and (labels[1, :2] == 2).all()
    # with a constant background channel (tcl): SCLIP's rule on that channel and the classes
    seg.prompt_background = False
    constant = torch.cat([torch.full_like(act[:1], 0.3), act[1:]])
    for area in (0.1, 0.15, 0.2):
        seg.cfg = InferConfig(bg_threshold=0.3, area_threshold=area)
        labels = seg._labels(seg._drop_small_classes(act[1:]))
        assert torch.equal(labels, sclip_labels(constant, 0.0, area)), area


def test_eval_native_on_the_command_line(world, tmp_path):
    """``synseg-train eval --protocol native``: SCLIP's VOC config runs and is recorded, the
    result named for it; NACLIP's PAMR is on unless --no-pamr; what has no native config is
    refused in one line."""
    from typer.testing import CliRunner

    from tests.test_subsets import fake_voc
    from trainer.cli import app

    root = fake_voc(tmp_path / "voc")
    ids = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    shots = sorted((world / "VOC2012/JPEGImages").glob("val_*.jpg"))
    for shot, i in zip(shots, ids, strict=False):
        Image.open(shot).resize((64, 64)).save(root / f"JPEGImages/{i}.jpg")
    out = tmp_path / "results"

    def run(*extra: str):
        args = ["eval", "--dataset", "voc", "--data-root", str(root), "--protocol", "native"]
        args += ["--templates", "single", "--limit", "1", "--output", str(out), "--device", "cpu"]
        return CliRunner().invoke(app, [*args, *extra])

    res = run("--method", "sclip")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "eval-voc-sclip-native-first1.json").read_text())["settings"]
    assert s["protocol"] == "native"
    assert s["protocol_source"] == "wangf3014/SCLIP@b56bd30 configs/cfg_voc21.py"
    inf = s["inference"]
    assert (inf["short_side"], inf["window"], inf["stride"], inf["mode"]) == (
        336,
        224,
        112,
        "slide",
    )
    assert (inf["logit_scale"], inf["bg_threshold"], inf["area_threshold"]) == (65.0, 0.1, 0.1)
    assert s["logit_scale_used"] == 65.0 and s["names_file"].endswith("classnames/sclip/voc.txt")
    assert s["prompt_background"] is True and inf["pamr"] == "off"
    res = run("--method", "naclip")
    assert res.exit_code == 0, res.output
    inf = json.loads((out / "eval-voc-naclip-native-pamr-first1.json").read_text())["settings"]
    assert (inf["inference"]["mode"], inf["inference"]["pamr"]) == ("whole", "image")
    res = run("--method", "naclip", "--no-pamr")
    assert res.exit_code == 0, res.output
    inf = json.loads((out / "eval-voc-naclip-native-first1.json").read_text())["settings"]
    assert inf["inference"]["pamr"] == "off"
    res = run("--method", "maskclip")
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1
    assert "maskclip's published figures come from its own harness" in res.output
