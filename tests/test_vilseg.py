"""ViL-Seg: each loss against a direct float64 implementation of its formula, the views, the
cluster-to-class inference on a hand-built feature map, and a short run that resumes
bit-identically and is scored by eval from its checkpoint alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from synseg.errors import UserError
from trainer.methods.vilseg.losses import (
    LossConfig,
    Objective,
    cluster_loss,
    cross_loss,
    joint,
    mutual_information,
    vision_loss,
)
from trainer.methods.vilseg.model import ClusterScorer, ViLSegOutput
from trainer.methods.vilseg.views import crop_boxes, jitter_flip, local_crops, resample, unflip
from trainer.train.config import resolve
from trainer.train.loop import run_train

D = torch.float64


def onehot_maps(labels: torch.Tensor, C: int) -> torch.Tensor:
    """(B, h, w) cluster indices -> (B, C, h, w) one-hot assignments."""
    return torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).to(D)


def direct_mi(q: torch.Tensor, qv: torch.Tensor) -> float:
    """I(J) written out with loops: J the mean of q_i q'_i^T over pixels, symmetrised,
    normalised; the sum over entries with J > 0 of J log(J / (J_c J_c'))."""
    B, C, h, w = q.shape
    J = [[0.0] * C for _ in range(C)]
    for b in range(B):
        for y in range(h):
            for x in range(w):
                for c in range(C):
                    for d in range(C):
                        J[c][d] += float(q[b, c, y, x] * qv[b, d, y, x])
    J = [[(J[c][d] + J[d][c]) / 2 for d in range(C)] for c in range(C)]
    total = sum(map(sum, J))
    J = [[v / total for v in row] for row in J]
    row = [sum(J[c]) for c in range(C)]
    col = [sum(J[c][d] for c in range(C)) for d in range(C)]
    return sum(
        J[c][d] * math.log(J[c][d] / (row[c] * col[d]))
        for c in range(C)
        for d in range(C)
        if J[c][d] > 0
    )


def test_mutual_information_equals_its_closed_forms():
    C = 4
    labels = torch.arange(24).view(2, 3, 4) % C  # every cluster used equally
    q = onehot_maps(labels, C)
    # The view agrees everywhere: J = diag(1/C), I = ln C.
    assert mutual_information(joint(q, q)).item() == pytest.approx(math.log(C), abs=1e-12)
    # A view that says nothing: uniform assignments everywhere, J = 1/C^2, I = 0.
    uniform = torch.full_like(q, 1 / C)
    assert mutual_information(joint(q, uniform)).item() == pytest.approx(0.0, abs=1e-12)
    # Every pixel in cluster 0, its view in cluster 1: before symmetrising J = [[0, 1], [0, 0]]
    # (I = 0); symmetrised J = [[0, .5], [.5, 0]] with marginals (.5, .5): I = ln 2.
    zeros, ones = torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long)
    j = joint(onehot_maps(zeros, 2), onehot_maps(ones, 2))
    torch.testing.assert_close(j, torch.tensor([[0, 0.5], [0.5, 0]], dtype=D))
    assert mutual_information(j).item() == pytest.approx(math.log(2), abs=1e-12)
    assert cluster_loss(q, q).item() == pytest.approx(-math.log(C), abs=1e-12)


def test_cluster_loss_equals_a_direct_implementation_on_soft_assignments():
    g = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(2, 5, 3, 4, generator=g, dtype=D) * 2, 1)
    qv = torch.softmax(torch.randn(2, 5, 3, 4, generator=g, dtype=D) * 2, 1)
    assert cluster_loss(q, qv).item() == pytest.approx(-direct_mi(q, qv), abs=1e-12)
    assert cluster_loss(q, qv).item() != pytest.approx(cluster_loss(q, q).item(), abs=1e-3)


def _output(**kw) -> ViLSegOutput:
    B = kw.get("clusters").shape[0] if "clusters" in kw else 2
    base = {
        "image": torch.eye(B, 4, dtype=D),
        "text": torch.eye(B, 4, dtype=D),
        "global_logits": torch.zeros(B, 3, dtype=D),
        "local_logits": torch.zeros(B * 2, 3, dtype=D),
    }
    return ViLSegOutput(**{**base, **kw})


def test_the_flipped_views_assignments_are_flipped_back_before_pairing():
    # Assignments that change along the width: a flipped view's map is the mirror image.
    labels = torch.tensor([[[0, 1, 2, 3], [3, 2, 1, 0]], [[0, 0, 1, 1], [2, 2, 3, 3]]])
    q = onehot_maps(labels, 4)
    view = q.clone()
    view[0] = view[0].flip(-1)  # image 0's view was flipped, image 1's was not
    flipped = torch.tensor([True, False])
    obj = Objective(LossConfig())
    got = obj(_output(clusters=q, clusters_view=view), flipped)["cluster"].item()
    assert got == pytest.approx(-direct_mi(q, q), abs=1e-12)  # perfect agreement once undone
    wrong = obj(_output(clusters=q, clusters_view=view), torch.tensor([False, False]))["cluster"]
    assert wrong.item() > got + 0.1  # pairing the mirror image pixel by pixel agrees less
    torch.testing.assert_close(unflip(view, flipped), q)


def test_vision_loss_equals_its_formula():
    g = torch.Generator().manual_seed(0)
    B, k, K = 3, 2, 5
    glob = torch.randn(B, K, generator=g, dtype=D)
    loc = torch.randn(B, k, K, generator=g, dtype=D)
    for temp, target_temp in ((1.0, 1.0), (0.1, 0.04)):
        want = 0.0
        for b in range(B):
            p = [math.exp(v / target_temp) for v in glob[b].tolist()]
            p = [v / sum(p) for v in p]
            for j in range(k):
                e = [math.exp(v / temp) for v in loc[b, j].tolist()]
                logq = [math.log(v / sum(e)) for v in e]
                want -= sum(pi * lq for pi, lq in zip(p, logq, strict=True))
        want /= B * k
        got = vision_loss(glob, loc, temp, target_temp).item()
        assert got == pytest.approx(want, abs=1e-12)
    # The global view is a target: no gradient reaches it unless asked.
    glob.requires_grad_(True)
    loc.requires_grad_(True)
    vision_loss(glob, loc, 1.0, 1.0, stop_grad=True).backward()
    assert glob.grad is None and loc.grad.abs().sum() > 0
    vision_loss(glob, loc, 1.0, 1.0, stop_grad=False).backward()
    assert glob.grad.abs().sum() > 0


def test_cross_loss_equals_image_to_text_infonce():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 6, generator=g, dtype=D) * torch.tensor([1, 2, 3, 4], dtype=D)[:, None]
    t = torch.randn(4, 6, generator=g, dtype=D)
    tau = 0.07

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def direction(x, y):
        total = 0.0
        for m in range(4):
            logits = [cos(x[m], y[n]) / tau for n in range(4)]
            total -= logits[m] - math.log(sum(math.exp(z) for z in logits))
        return total / 4

    assert cross_loss(v, t, tau).item() == pytest.approx(direction(v, t), abs=1e-10)
    both = (direction(v, t) + direction(t, v)) / 2
    assert cross_loss(v, t, tau, symmetric=True).item() == pytest.approx(both, abs=1e-10)
    assert abs(direction(v, t) - direction(t, v)) > 1e-3  # the inputs tell the two apart


def test_crop_boxes_lie_in_the_image_with_the_areas_asked():
    boxes = crop_boxes(500, (0.05, 0.4), torch.Generator().manual_seed(0))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 1 + 1e-12).all() and (y0 + h <= 1 + 1e-12).all()
    area = w * h
    assert (area <= 0.4 + 1e-9).all() and area.min() < 0.06 and area.max() > 0.35
    again = crop_boxes(500, (0.05, 0.4), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)  # the generator decides everything


def test_a_box_on_whole_pixels_resamples_to_those_pixels():
    img = torch.rand(1, 3, 8, 8, dtype=D)
    box = torch.tensor([[0.25, 0.5, 0.5, 0.5]], dtype=D)  # x 2..5, y 4..7
    torch.testing.assert_close(resample(img, box, 4)[0], img[0, :, 4:8, 2:6], rtol=0, atol=1e-12)
    # At twice the size, output pixel j's centre lies at input position x0 + (j + 0.5) w / 8
    # (in pixels, centres at k + 0.5): bilinear between its two neighbours, written out, the
    # border pixel repeated past the edge.
    up = resample(img, box, 8)[0]

    def at(pos: float) -> list[tuple[int, float]]:
        c = min(max(pos - 0.5, 0.0), 7.0)
        k = min(math.floor(c), 6)
        return [(k, 1 - (c - k)), (k + 1, c - k)]

    for i in range(8):
        for j in range(8):
            want = sum(
                wy * wx * img[0, :, y, x]
                for y, wy in at(4 + (i + 0.5) * 4 / 8)
                for x, wx in at(2 + (j + 0.5) * 4 / 8)
            )
            torch.testing.assert_close(up[:, i, j], want, rtol=0, atol=1e-12)
    crops = local_crops(img.expand(2, -1, -1, -1), 3, 4, (0.05, 0.4), torch.Generator())
    assert crops.shape == (6, 3, 4, 4)


def test_the_clustering_view_is_a_colour_change_per_channel_then_a_flip():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(6, 3, 4, 8, generator=g, dtype=D) * 0.6 + 0.2
    same, flipped = jitter_flip(img, 0.0, 0.0, 0.0, g)
    assert torch.equal(same, img) and not flipped.any()
    mirrored, flipped = jitter_flip(img, 0.0, 0.0, 1.0, g)
    assert torch.equal(mirrored, img.flip(-1)) and flipped.all()
    views, flipped = jitter_flip(img, 0.4, 0.1, 0.5, g)
    assert 0 < flipped.sum() < 6
    back = unflip(views, flipped)
    for i in range(6):
        for c in range(3):  # back = a x + b on every pixel the clip did not touch
            x, v = img[i, c].flatten(), back[i, c].flatten()
            keep = (v > 0) & (v < 1)
            a = ((x[keep] - x[keep].mean()) * (v[keep] - v[keep].mean())).sum() / (
                (x[keep] - x[keep].mean()) ** 2
            ).sum()
            b = v[keep].mean() - a * x[keep].mean()
            assert 0.6 - 1e-9 <= a <= 1.4 + 1e-9 and -0.1 - 1e-9 <= b <= 0.1 + 1e-9
            torch.testing.assert_close(a * x[keep] + b, v[keep], rtol=0, atol=1e-6)


class _Towers:
    """Text embeddings: cat, dog and sky are the three axes (scaled: the scorer normalises)."""

    names = ("cat", "dog", "sky")

    def tokenize(self, texts):
        return torch.tensor([self.names.index(t.split()[-1]) for t in texts])

    def text_embedding(self, tokens):
        return torch.eye(3, dtype=D)[tokens] * 2


class _HandBuilt(torch.nn.Module):
    """A ViL-Seg model whose patch embeddings and clusters are given: a 2 x 3 grid, d = 3.

    cluster 0: patches [2, 0, 0], [4, 0, 0], [3, 0, 0]  region [3, 0, 0]      -> cat
    cluster 1: patches [0, 2, 0], [0, 2, 0], [0, 0, 1]  region [0, 4/3, 1/3]  -> dog, also for
               the patch whose own embedding is sky's: a cluster takes one class
    cluster 2: empty
    """

    patch_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.towers = _Towers()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1, dtype=D))
        self.register_buffer("std", torch.ones(1, 3, 1, 1, dtype=D))
        self.patches = torch.tensor(
            [[2, 0, 0], [0, 2, 0], [4, 0, 0], [0, 2, 0], [0, 0, 1], [3, 0, 0.0]], dtype=D
        )
        self.assign = torch.tensor([0, 1, 0, 1, 1, 0])

    def tokens(self, crops):
        n = crops.shape[0]
        tok = torch.cat([torch.zeros(1, 3, dtype=D), self.patches])[None].expand(n, -1, -1)
        return tok, (2, 3)

    def cluster_probs(self, patches, grid):
        n = patches.shape[0]
        q = torch.full((n, 3, 6), 0.05, dtype=D)
        q[:, self.assign, torch.arange(6)] = 0.9  # each patch's cluster, soft
        return q.view(n, 3, *grid)


def test_each_cluster_takes_the_class_of_its_region_feature():
    model = _HandBuilt()
    scorer = ClusterScorer(model, logit_scale=10.0)
    text = scorer.encode_classes(["cat", "dog", "sky"], ["a photo of a {}"])
    torch.testing.assert_close(text, torch.eye(3, dtype=D))
    grid = scorer.region_scores(torch.zeros(1, 3, 8, 12, dtype=D), text)  # (1, 3, 2, 3)
    dog_region = torch.tensor([0, 4 / 3, 1 / 3], dtype=D)
    dog_region = dog_region / dog_region.norm()
    want = torch.zeros(3, 6, dtype=D)
    for p, c in enumerate(model.assign.tolist()):
        want[:, p] = torch.tensor([1.0, 0, 0], dtype=D) if c == 0 else dog_region
    torch.testing.assert_close(grid[0].flatten(1), want, rtol=0, atol=1e-12)
    labels = grid[0].argmax(0).flatten().tolist()
    assert labels == [0, 1, 0, 1, 1, 0]  # the sky-like patch is dog, with its cluster
    probs = scorer.probabilities(grid, 1)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 2, 3, dtype=D))
    full = scorer.scores(torch.zeros(2, 3, 8, 12, dtype=D), text)
    assert full.shape == (2, 3, 8, 12) and torch.isfinite(full).all()


def tiny_vilseg(shards, out, *extra):
    return resolve(
        "vilseg-tiny",
        overrides=[f"data.shards={shards}", f"run.output={out}", "data.batch_size=8", *extra],
    )


def losses(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vilseg_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("vilseg") / "run"
    stats = run_train(tiny_vilseg(shards, out, "optim.max_steps=6", "run.save_every=3"))
    return out, stats


def test_a_vilseg_run_trains_every_weight_and_records_its_method(vilseg_run):
    out, stats = vilseg_run
    assert stats.steps == 6 and stats.phrases_encoded == 0
    assert not (out / "text_cache").exists()  # no frozen text tower: no label table
    saved = json.loads((out / "checkpoints/step-0000006/config.json").read_text())
    assert saved["config"]["method"] == "vilseg" and saved["model"]["clusters"] == 25
    weights = load_file(str(out / "checkpoints/step-0000006/model.safetensors"))
    assert any(k.startswith("towers.model.visual.") for k in weights)
    assert any(k.startswith("towers.model.transformer.") for k in weights)  # the text tower
    assert {"cluster_head.weight", "projection.weight"} <= set(weights)
    start = load_file(str(out / "checkpoints/step-0000003/model.safetensors"))
    for key in ("cluster_head.weight", "projection.weight", "towers.model.visual.conv1.weight"):
        assert not torch.equal(start[key], weights[key]), f"{key} did not train"
    log = losses(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    for r in log:
        t = r["loss"]
        assert set(t) == {"vision", "cross", "cluster", "total"}
        assert t["total"] == pytest.approx(t["vision"] + t["cross"] + t["cluster"], abs=1e-5)
        assert -math.log(25) - 1e-6 <= t["cluster"] <= 1e-6  # -I(J), I in [0, ln C]


def test_a_vilseg_run_resumes_bit_identically(vilseg_run, shards, tmp_path):
    out, _ = vilseg_run
    run_train(tiny_vilseg(shards, tmp_path, "optim.max_steps=3", "run.save_every=3"))
    resumed = run_train(
        tiny_vilseg(shards, tmp_path, "optim.max_steps=6", "run.save_every=3"), resume=True
    )
    assert resumed.start_step == 3 and resumed.steps == 6
    a = load_file(str(out / "checkpoints/step-0000006/model.safetensors"))
    b = load_file(str(tmp_path / "checkpoints/step-0000006/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in losses(tmp_path)] == [r["loss"] for r in losses(out)]


def test_eval_and_segment_take_the_method_from_the_run(vilseg_run, world, tmp_path):
    from trainer.cli import app

    out, _ = vilseg_run
    runner = CliRunner()
    res = runner.invoke(
        app, ["eval", "--dataset", "world", "--data-root", str(world), "--checkpoint", str(out)]
    )
    assert res.exit_code == 0, res.output
    record = json.loads((out / "checkpoints/step-0000006/eval-world.json").read_text())
    assert record["settings"]["method"] == "vilseg" and 0 <= record["mIoU"] <= 1
    assert "world, vilseg, tcl" in " ".join(res.output.split())
    bad = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "world",
            "--data-root",
            str(world),
            "--checkpoint",
            str(out),
            "--method",
            "synseg",
        ],
    )
    assert bad.exit_code == 1 and "is a vilseg run; --method synseg cannot score it" in bad.stderr
    bad = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "world",
            "--data-root",
            str(world),
            "--checkpoint",
            str(out),
            "--method",
            "naclip",
        ],
    )
    assert bad.exit_code == 1 and "a vilseg model has none" in bad.stderr
    image = next((world / "VOC2012" / "JPEGImages").glob("val_*.jpg"))
    seg = runner.invoke(
        app,
        [
            "segment",
            str(image),
            "--classes",
            "grass,ball",
            "--checkpoint",
            str(out),
            "--output",
            str(tmp_path / "pics"),
        ],
    )
    assert seg.exit_code == 0, seg.output
    assert len(list((tmp_path / "pics").glob("*.png"))) == 3


def test_vilseg_settings_refused_in_one_line():
    with pytest.raises(UserError, match="data.absent draws negative labels"):
        resolve("vilseg-tiny", overrides=["data.absent=2"])
    with pytest.raises(UserError, match="data.batch_size must be at least 2"):
        resolve("vilseg-tiny", overrides=["data.batch_size=1"])
    with pytest.raises(UserError, match="local_scale must be"):
        resolve("vilseg-tiny", overrides=["loss.local_scale=[0.5, 0.2]"])
    with pytest.raises(UserError, match="cluster_kernel must be odd"):
        resolve("vilseg-tiny", overrides=["model.cluster_kernel=2"])
    cfg = resolve("vilseg-tiny", overrides=["loss.vision=0", "loss.local_crops=0"])
    assert cfg.loss.local_crops == 0


def test_the_towers_tokens_are_open_clips_embeddings():
    """At the native size, the class token of ``image_tokens`` is open_clip's image embedding
    and ``text_embedding`` its text embedding (float64); at another size the tower still runs
    (position embeddings resized) and gradients reach both towers."""
    from trainer.model.backbone import CLIPTowers

    towers = CLIPTowers("synseg-tiny", None, init_seed=3).double()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g, dtype=D)
    tok, grid = towers.image_tokens(images)
    assert grid == (8, 8) and tok.shape == (2, 65, 64)
    torch.testing.assert_close(tok[:, 0], towers.model.encode_image(images), rtol=0, atol=1e-12)
    ids = towers.tokenize(["a photo of a kite.", "grass"])
    torch.testing.assert_close(
        towers.text_embedding(ids), towers.model.encode_text(ids), rtol=0, atol=1e-12
    )
    small, grid = towers.image_tokens(torch.rand(1, 3, 32, 32, dtype=D))
    assert grid == (4, 4) and small.shape == (1, 17, 64)
    (small.sum() + towers.text_embedding(ids).sum()).backward()
    assert towers.model.visual.conv1.weight.grad.abs().sum() > 0
    assert towers.model.token_embedding.weight.grad.abs().sum() > 0


def test_the_paper_preset_holds_the_papers_values():
    from trainer.model.backbone import open_clip

    paper = json.loads((Path(__file__).parent / "fixtures/vilseg_paper_settings.json").read_text())
    cfg = resolve("vilseg-paper")
    assert cfg.model.arch.replace("-", "") == paper["arch"].replace("/", "").replace("-", "")
    assert open_clip().get_model_config(cfg.model.arch)["embed_dim"] == paper["embedding_dim"]
    assert (cfg.model.clusters, cfg.loss.local_crops) == (paper["clusters"], paper["local_crops"])
    assert cfg.model.projection_dim == paper["projection_dim"]
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (paper["lr"], paper["weight_decay"])
    assert cfg.optim.warmup == paper["warmup"] and cfg.optim.name == "adamw"  # ref [29]: AdamW
    assert [cfg.loss.vision, cfg.loss.cross, cfg.loss.cluster] == paper["loss_weights"]
    assert cfg.data.batch_size * 8 == paper["batch_size_total"]  # per process, on 8 GPUs
    assert cfg.model.pretrained is None  # trained from scratch on CC12M


def test_one_step_gives_every_trainable_weight_a_gradient(shards):
    """DDP refuses a parameter that gets no gradient: every trainable one must get one."""
    from trainer import methods
    from trainer.methods.base import StepContext
    from trainer.train.data import ShardStream, find_shards

    cfg = resolve("vilseg-tiny", overrides=[f"data.shards={shards}", "data.batch_size=4"])
    m = methods.trained("vilseg")
    model = m.build(cfg.model).train()
    stream = ShardStream(find_shards(shards), 64, 4, 4, 0, 10)
    batch = next(iter(stream))
    ctx = StepContext(cfg, torch.device("cpu"), 1, 7, __import__("random").Random(7))
    inputs = m.inputs(batch["images"], batch, ctx)
    m.objective(cfg.loss)(model(**inputs.model), **inputs.loss)["total"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert not model.towers.model.logit_scale.requires_grad  # CLIP's own, unused here


@pytest.mark.slow
def test_two_process_torchrun_trains_vilseg_and_resumes(shards, tmp_path):
    import os
    import subprocess
    import sys

    def torchrun(out, steps, *extra):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "trainer.cli",
            "run",
            "--method",
            "vilseg",
            "--preset",
            "tiny",
            "--shards",
            str(shards),
            "--output",
            str(out),
            "--steps",
            str(steps),
            "--set",
            "data.batch_size=4",
            "--set",
            "run.save_every=2",
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]

    torchrun(tmp_path / "whole", 4)
    torchrun(tmp_path / "split", 2)
    torchrun(tmp_path / "split", 4, "--resume")
    a = load_file(str(tmp_path / "whole/checkpoints/step-0000004/model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoints/step-0000004/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [r["loss"] for r in whole] == [r["loss"] for r in split] and len(whole) == 4
