"""``synseg-train export --format hf``: a trained run as Hugging Face's
``CLIPSegForImageSegmentation``, loaded by transformers and equal to the toolkit's model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synseg.errors import UserError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    from trainer.export import ExportConfig, run_export

    out = tmp_path_factory.mktemp("hf") / "synseg-tiny-hf"
    stats = run_export(ExportConfig(str(run), str(out)))
    assert stats.method == "synseg" and Path(stats.output) == out
    return out


def test_the_export_loads_in_transformers_and_gives_the_runs_logits(run, exported):
    """In float64: the decoder's logits for an image and a prompt embedding, the prompt's
    embedding from the text tower, and the tokenizer's ids, each the toolkit's."""
    from transformers import CLIPSegForImageSegmentation

    from trainer.train.checkpoint import load_model

    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [
            "README.md",
            "config.json",
            "merges.txt",
            "model.safetensors",
            "preprocessor_config.json",
            "tokenizer_config.json",
            "vocab.json",
        ]
    )
    hf = CLIPSegForImageSegmentation.from_pretrained(exported).double().eval()
    model, cfg = load_model(run)
    model = model.double()
    size = model.backbone.train_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).double()
    ids = model.backbone.tokenize(["a photo of a cat.", "grass"])
    text = model.backbone.text_embedding(ids)  # (2, d), float64
    with torch.no_grad():
        ours = model.segment(images, text)  # (2 images, 2 prompts, H, W)
        pixels = (images - model.mean) / model.std
        for p in range(2):  # transformers pairs image i with prompt i
            got = hf(pixel_values=pixels, conditional_embeddings=text[[p, p]]).logits
            torch.testing.assert_close(got, ours[:, p], rtol=0, atol=1e-9)
        features = hf.clip.get_text_features(input_ids=ids)
        if not isinstance(features, torch.Tensor):  # transformers 5 returns an output object
            features = features.pooler_output
        torch.testing.assert_close(features, text, rtol=0, atol=1e-9)
        image = hf.clip.get_image_features(pixel_values=pixels)
        if not isinstance(image, torch.Tensor):
            image = image.pooler_output
        torch.testing.assert_close(
            image, model.backbone.model.encode_image(pixels), rtol=0, atol=1e-9
        )
    config = json.loads((exported / "config.json").read_text())
    assert config["extract_layers"] == list(cfg.model.taps)


@pytest.mark.parametrize("refined", [False, True])
def test_the_decoders_layout_is_the_inverse_of_the_loader(refined):
    """Written in transformers' names and read back by the loader of Hugging Face weights:
    every tensor where it was (CLIPSeg's refined upsampling too, whose output transformers
    sizes by patch // 4 twice, as the toolkit does)."""
    from trainer.model.decoder import CLIPSegDecoder, DecoderConfig, from_huggingface
    from trainer.model.hf import decoder_state_dict

    torch.manual_seed(0)
    dec = CLIPSegDecoder(DecoderConfig(width=64, cond_dim=32, refined=refined, patch_size=16))
    back = from_huggingface(decoder_state_dict(dec))
    own = dec.state_dict()
    assert sorted(back) == sorted(own)
    assert all(torch.equal(back[k], own[k]) for k in own)


def test_the_exported_processor_prepares_images_and_prompts_as_the_run_does(run, exported):
    from transformers import CLIPSegProcessor

    from trainer.model.backbone import NORMALISE
    from trainer.train.checkpoint import load_model

    model, _ = load_model(run)
    proc = CLIPSegProcessor.from_pretrained(exported)
    mean, std = NORMALISE[model.normalisation]
    assert proc.image_processor.image_mean == pytest.approx(list(mean))
    assert proc.image_processor.image_std == pytest.approx(list(std))
    assert proc.image_processor.size == {"height": 64, "width": 64}
    texts = ["a photo of a cat.", "sea water", "a red car on the road"]
    ids = model.backbone.tokenize(texts)
    enc = proc.tokenizer(texts)
    for row, theirs in zip(ids.tolist(), enc.input_ids, strict=True):
        assert row[: len(theirs)] == theirs  # the same tokens, before open_clip's padding


def test_what_the_layout_cannot_hold_is_refused(run, exported, tmp_path):
    from trainer import methods
    from trainer.export import ExportConfig, run_export
    from trainer.model.decoder import CLIPSegDecoder, DecoderConfig
    from trainer.model.hf import decoder_state_dict

    with pytest.raises(UserError, match="FiLM with a hidden layer"):
        decoder_state_dict(CLIPSegDecoder(DecoderConfig(width=64, cond_dim=64, film_hidden=8)))
    assert methods.trained("vilseg").export_hf is None  # run_export refuses it in one line
    with pytest.raises(UserError, match="exists: export writes a new folder"):
        run_export(ExportConfig(str(run), str(exported)))
    with pytest.raises(UserError, match="--format must be one of hf"):
        ExportConfig(str(run), str(tmp_path / "x"), format="onnx")
    assert not (tmp_path / "x").exists()


def test_push_to_hub_without_the_hub_says_so_in_one_line(run, tmp_path):
    """Offline, the hub client refuses; the export itself is kept."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "pushed"
    args = ["export", "--checkpoint", str(run), "--output", str(out)]
    res = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args, "--push-to-hub", "someone/synseg-tiny"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 1
    # (open_clip warns that the tiny model has no pretrained weights; then one line)
    errors = [line for line in res.stderr.splitlines() if not line.startswith("WARNING")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot push to someone/synseg-tiny")
    assert (out / "model.safetensors").is_file()
