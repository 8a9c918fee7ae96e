"""The decoder against CLIPSeg's reference implementation in transformers, and its loaders."""

import pytest
import torch

from synseg.errors import UserError
from trainer.model.compat import ensure_torchvision  # noqa: E402
from trainer.model.decoder import CLIPSegDecoder, DecoderConfig, guess_config, load_decoder_state

ensure_torchvision()
transformers = pytest.importorskip("transformers")


def tiny_hf(refined: bool):
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    cfg = CLIPSegConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=40,
        extract_layers=[1, 2, 3],
        use_complex_transposed_convolution=refined,
    )
    cfg._attn_implementation = "sdpa"  # the attention path transformers uses by default
    torch.manual_seed(0)
    return CLIPSegForImageSegmentation(cfg).eval().double(), cfg


@pytest.mark.parametrize("refined", [False, True])
def test_same_logits_as_transformers(refined):
    # float64 on both sides: the two implementations order their sums differently, and in
    # float32 that noise (~1e-5) depends on the CPU and the library versions.
    hf, cfg = tiny_hf(refined)
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        want = hf(pixel_values=pixels, input_ids=ids).logits  # (2, 32, 32)
        vision = hf.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        taps = [vision.hidden_states[i + 1] for i in cfg.extract_layers]
        cond = hf.clip.get_text_features(input_ids=ids)
        cond = getattr(cond, "pooler_output", cond)

    ours = CLIPSegDecoder(
        DecoderConfig(
            width=32,
            cond_dim=24,
            depth=3,
            reduce_dim=16,
            heads=2,
            ffn_dim=40,
            patch_size=8,
            refined=refined,
        )
    ).eval()
    assert load_decoder_state(ours, hf.state_dict()) == "huggingface"
    ours.double()
    with torch.no_grad():
        # transformers returns the transposed convolution's output as it is: with patch 8 the
        # refined stack upsamples 4x, to 16 px. (CLIPSeg itself then resizes to the input.)
        got, _ = ours(
            ours.reduce_taps(taps), cond, None, grid=(4, 4), out_size=tuple(want.shape[-2:])
        )
        full, _ = ours(ours.reduce_taps(taps), cond, None, grid=(4, 4), out_size=(32, 32))
    assert want.shape[-1] == (32 if not refined else 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    resized = torch.nn.functional.interpolate(
        want[:, None], size=(32, 32), mode="bilinear", align_corners=False
    )[:, 0]
    torch.testing.assert_close(full, resized, rtol=0, atol=1e-9)


def test_clipseg_layout_round_trip_and_config_guess():
    cfg = DecoderConfig(
        width=48,
        cond_dim=24,
        depth=3,
        reduce_dim=16,
        heads=2,
        ffn_dim=40,
        patch_size=8,
        refined=True,
    )
    src = CLIPSegDecoder(cfg)
    sd = {**src.state_dict(), "reduce.weight": torch.zeros(16, 48), "reduce.bias": torch.zeros(16)}
    guessed = guess_config(sd, patch_size=8)
    assert {k: guessed[k] for k in guessed} == {k: getattr(cfg, k) for k in guessed}
    dst = CLIPSegDecoder(cfg)
    assert load_decoder_state(dst, sd) == "clipseg"  # CLIPSeg's unused reduce.* is ignored
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_mismatched_weights_are_one_clear_error():
    sd = CLIPSegDecoder(
        DecoderConfig(width=48, cond_dim=24, reduce_dim=16, heads=2, ffn_dim=40, patch_size=8)
    ).state_dict()
    other = CLIPSegDecoder(
        DecoderConfig(width=64, cond_dim=24, reduce_dim=16, heads=2, ffn_dim=40, patch_size=8)
    )
    with pytest.raises(UserError, match="do not fit this decoder.*reduces.0.weight"):
        load_decoder_state(other, sd)
    with pytest.raises(UserError, match="unrecognised decoder weights"):
        load_decoder_state(other, {"foo": torch.zeros(1)})
