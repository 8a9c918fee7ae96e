"""The method registry: SynSeg through it equals SynSeg before it, bit for bit; the loop and
eval name no method; settings, presets, schedules and resumes as the registry defines them."""

from __future__ import annotations

import ast
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from synseg.errors import UserError
from trainer import methods
from trainer.methods.synseg.losses import MCCLoss
from trainer.methods.synseg.model import SynSeg
from trainer.train.config import from_dict, resolve
from trainer.train.data import ShardStream, Vocabulary, find_shards, loader
from trainer.train.loop import run_train
from trainer.train.textcache import LabelCache

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (
    "data.batch_size=8",
    "model.dropout=0.1",  # dropout draws from the step's seed
    "data.absent=2",  # absent negatives draw from the step's random.Random
    "loss.neg=1",
    "model.projector_input=visual",
    "optim.max_steps=6",
)


def legacy_synseg(cfg) -> tuple[list[dict], dict]:
    """The training loop as it was before methods were plug-ins, written out for one process
    (what ``trainer.train.loop`` did up to the registry): the losses of every step (rounded as
    metrics.jsonl rounds them) and the final trainable weights."""
    torch.manual_seed(cfg.run.seed)
    model = SynSeg(cfg.model)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    vocab = Vocabulary(cfg.data.shards)
    cache = LabelCache(model.backbone, cfg.data.template)
    cache.ensure(vocab.phrases, cfg.run.encode_batch)
    loss_fn = MCCLoss(cfg.loss)
    shards = find_shards(cfg.data.shards)
    stream = ShardStream(
        shards,
        cfg.data.image_size,
        cfg.data.batch_size,
        cfg.data.max_labels,
        cfg.run.seed,
        cfg.data.shuffle_buffer,
    )
    stream.set_epoch(0)
    batches = iter(loader(stream, cfg.data.workers))
    model.train()
    log = []
    for step in range(1, cfg.optim.max_steps + 1):
        batch = next(batches)
        seed = (cfg.run.seed * 1_000_003 + step * 9_176) % (2**31)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        labels = batch["labels"]
        n = max(len(ls) for ls in labels)
        rows = torch.zeros(len(labels), n, dtype=torch.long)
        mask = torch.zeros(len(labels), n, dtype=torch.bool)
        flat = cache.indices([p for ls in labels for p in ls])
        i = 0
        for b, ls in enumerate(labels):
            rows[b, : len(ls)] = flat[i : i + len(ls)]
            mask[b, : len(ls)] = True
            i += len(ls)
        text = cache.table[rows] * mask[..., None]
        picks = vocab.absent(labels, cfg.data.absent, rng)
        absent = cache.table[cache.indices(picks)].view(len(labels), cfg.data.absent, -1)
        out = model(batch["images"], text, absent)
        terms = loss_fn(out.f.float(), out.fbar.float(), text, mask, out.absent_maps.float())
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        log.append({k: round(v.item(), 6) for k, v in terms.items()})
    return log, model.trainable_state_dict()


def test_synseg_through_the_registry_equals_the_loop_before_it(shards, tmp_path):
    cfg = resolve("tiny", overrides=[f"data.shards={shards}", f"run.output={tmp_path}", *SETTINGS])
    run_train(cfg)
    want_log, want_weights = legacy_synseg(cfg)
    got = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert got == want_log
    weights = load_file(str(tmp_path / "checkpoints/step-0000006/model.safetensors"))
    assert weights.keys() == want_weights.keys()
    assert all(torch.equal(weights[k], want_weights[k]) for k in weights)
    assert any(r["neg"] > 0 for r in got)  # the absent negatives took part


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_loop_eval_and_demo_import_no_method_package():
    """They reach methods through the registry (``trainer.methods``) and its contract only."""
    packages = {f"trainer.methods.{m.module.split('.')[2]}" for m in methods.REGISTRY.values()}
    assert {
        "trainer.methods.synseg",
        "trainer.methods.vilseg",
        "trainer.methods.ovsegmentor",
    } <= packages
    files = [
        *(ROOT / "trainer/train").glob("*.py"),
        *(ROOT / "trainer/eval").glob("*.py"),
        ROOT / "trainer/world/demo.py",
        ROOT / "trainer/world/report.py",
        ROOT / "trainer/world/rows.py",
        ROOT / "trainer/cli.py",
    ]
    for path in files:
        for name in _imports(path):
            assert not any(name == p or name.startswith(p + ".") for p in packages), (path, name)


def test_every_trained_method_gives_the_whole_contract():
    assert methods.names("trained") == ["synseg", "vilseg", "ovsegmentor"]
    for name in methods.names("trained"):
        m = methods.trained(name)
        assert m.name == name and m.preset_names() == ["paper", "tiny"]
        cfg = resolve("tiny", method=name)
        assert cfg.method == name and isinstance(cfg.model, m.model_config)
        assert isinstance(cfg.loss, m.loss_config)
    assert methods.trained("clipseg") is methods.trained("synseg")  # its model is SynSeg's
    with pytest.raises(UserError, match="training-free"):
        methods.trained("sclip")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        methods.info("nope")


def test_methods_and_presets_commands_list_what_exists(monkeypatch):
    from synseg.console import out
    from trainer.cli import app

    monkeypatch.setattr(out, "width", 400)  # one table row a line
    runner = CliRunner()
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    lines = [x for x in res.output.splitlines() if x.startswith("│")]
    assert [x.split("│")[1].strip() for x in lines] == list(methods.REGISTRY)
    for line, m in zip(lines, methods.REGISTRY.values(), strict=True):
        assert line.split("│")[2].strip() == m.kind
    res = runner.invoke(app, ["presets"])
    assert res.exit_code == 0
    shown = [x.split("│")[1].strip() for x in res.output.splitlines() if x.startswith("│")]
    assert [s for s in shown if s] == [
        "synseg-paper", "synseg-tiny", "vilseg-paper", "vilseg-tiny",
        "ovsegmentor-paper", "ovsegmentor-tiny",
    ]  # fmt: skip


def test_method_and_preset_are_chosen_once(tmp_path):
    assert resolve("vilseg-paper").method == "vilseg"
    assert resolve("paper").method == "synseg"
    assert resolve("paper", method="vilseg").optim.warmup == 4000
    with pytest.raises(UserError, match="the method is given twice, differently"):
        resolve("vilseg-tiny", method="synseg")
    with pytest.raises(UserError, match="the method is given twice, differently"):
        resolve("tiny", overrides=["method=vilseg"], method="synseg")
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"method": "vilseg", "model": {"clusters": 7}}))
    assert resolve("tiny", files=[f]).model.clusters == 7
    with pytest.raises(UserError, match="clipseg is a weights method"):
        resolve("tiny", method="clipseg")
    with pytest.raises(UserError, match="unknown field model.clusters"):
        resolve("tiny", overrides=["model.clusters=3"])  # a ViL-Seg setting on SynSeg


@pytest.mark.parametrize("spelling", ["nan", "NaN", "inf", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused_in_every_spelling(spelling):
    for field in ("optim.lr", "optim.grad_clip", "loss.back"):
        with pytest.raises(UserError, match=f"{field} must be a finite number"):
            resolve("tiny", overrides=[f"{field}={spelling}"])


def test_values_are_checked_against_their_annotations():
    with pytest.raises(UserError, match="model.pretrained must be text, not 123"):
        resolve("tiny", overrides=["model.pretrained=123"])
    with pytest.raises(UserError, match="model.taps must be a list, not 'abc'"):
        resolve("tiny", overrides=["model.taps=abc"])
    with pytest.raises(UserError, match="optim.lr must be a number, not 'fast'"):
        resolve("tiny", overrides=["optim.lr=fast"])
    with pytest.raises(UserError, match=r"model.taps\[1\] must be a whole number"):
        resolve("tiny", overrides=["model.taps=[1, 2.5]"])
    with pytest.raises(UserError, match="run.compile must be true or false"):
        resolve("tiny", overrides=["run.compile=1"])
    # several problems, one line
    with pytest.raises(UserError, match="data.workers must be .*; optim.lr must be a number"):
        resolve("tiny", overrides=["optim.lr=fast", "data.workers=x"])
    # typed values from options are taken as they are: an output folder named by digits
    assert resolve("tiny", values={"run.output": "2024"}).run.output == "2024"
    assert resolve("tiny", overrides=["model.pretrained=null"]).model.pretrained is None


def test_a_checkpoint_config_written_before_methods_existed_is_synsegs():
    old = resolve("tiny").to_dict()
    del old["method"]
    assert from_dict(old).method == "synseg" and from_dict(old) == resolve("tiny")


def test_resume_refuses_another_method(shards, tmp_path):
    run_train(
        resolve(
            "tiny",
            overrides=[f"data.shards={shards}", f"run.output={tmp_path}", "optim.max_steps=1"],
        )
    )
    with pytest.raises(UserError, match="other settings .*method: 'synseg' -> 'vilseg'"):
        run_train(
            resolve(
                "vilseg-tiny",
                overrides=[f"data.shards={shards}", f"run.output={tmp_path}", "optim.max_steps=2"],
            ),
            resume=True,
        )


def test_encode_labels_refuses_a_method_without_label_embeddings(shards, tmp_path):
    from trainer.train.loop import encode_labels

    cfg = resolve("vilseg-tiny", overrides=[f"data.shards={shards}", f"run.output={tmp_path}"])
    with pytest.raises(UserError, match="vilseg embeds no labels"):
        encode_labels(cfg)


def test_schedules_equal_open_clips_own():
    """open_clip's training code (open_clip_train.scheduler) sets the rate before each step
    from the 0-based step; the trainer's step s + 1 must get the same rate."""
    from open_clip_train.scheduler import const_lr, cosine_lr

    from trainer.train.optim import lr_at

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1)
    total, warmup, base = 50, 7, 3e-4
    for schedule, theirs in (("cosine", cosine_lr), ("constant", const_lr)):
        cfg = resolve(
            "tiny",
            overrides=[f"optim.lr={base}", f"optim.warmup={warmup}", f"optim.schedule={schedule}"],
        ).optim
        adjust = theirs(opt, base, warmup, total)
        for s in range(total):
            assert lr_at(s + 1, total, cfg) == pytest.approx(adjust(s), rel=1e-12, abs=0)
    cfg = resolve("tiny", overrides=["optim.lr=0.1"]).optim
    assert {lr_at(s, 10, cfg) for s in range(1, 11)} == {0.1}  # the default: constant, no warm-up


def test_a_run_logs_the_rate_of_its_schedule(shards, tmp_path):
    extra = ["optim.max_steps=6", "optim.warmup=2", "optim.schedule=cosine", "optim.lr=1e-3"]
    cfg = resolve("tiny", overrides=[f"data.shards={shards}", f"run.output={tmp_path}", *extra])
    run_train(cfg)
    log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    want = [5e-4, 1e-3] + [0.5 * (1 + math.cos(math.pi * e / 4)) * 1e-3 for e in range(4)]
    assert [r["lr"] for r in log] == pytest.approx(want, rel=1e-12)
    with pytest.raises(UserError, match="optim.schedule must be one of constant, cosine"):
        resolve("tiny", overrides=["optim.schedule=linear"])
