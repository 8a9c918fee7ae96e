"""Hugging Face's ``CLIPSegForImageSegmentation`` layout, written from this toolkit's parts: an
open_clip CLIP (``CLIPTowers``) and CLIPSeg's decoder (``CLIPSegDecoder``).

The inverse of ``trainer.model.decoder.from_huggingface``: parameter names follow
transformers' CLIP (``clip.vision_model.encoder.layers.N.self_attn.q_proj``, ...), the
in-projection of each attention split into q, k and v, the projections transposed into linear
weights. ``config.json`` is a ``CLIPSegConfig``; ``preprocessor_config.json`` a
``ViTImageProcessor`` with the normalisation the model was trained with; the tokenizer files
(``vocab.json``, ``merges.txt``) are open_clip's byte-pair vocabulary, CLIP's own, so
``CLIPSegProcessor.from_pretrained`` reads the folder as it reads CIDAS's checkpoints.

What that layout cannot hold is refused in one line: FiLM with a hidden layer (CLIPSeg's FiLM
is one linear map), an image tower with an attention pool or without a class token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from synseg.errors import UserError
from trainer.model.decoder import HF_BLOCK_PARTS

# open_clip's block parts -> transformers' CLIP encoder layer parts
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def _blocks(resblocks, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, block in enumerate(resblocks):
        sd = block.state_dict()
        dst = f"{prefix}.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"attn.in_proj_{kind}"].chunk(3)
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[dst + f"self_attn.{name}_proj.{kind}"] = t
            for src, name in _BLOCK.items():
                out[dst + f"{name}.{kind}"] = sd[f"{src}.{kind}"]
    return out


def _act(resblocks) -> str:
    name = type(resblocks[0].mlp.gelu).__name__
    if name not in ("QuickGELU", "GELU"):
        raise UserError(f"a CLIP whose blocks use {name} has no Hugging Face CLIP layout")
    return "quick_gelu" if name == "QuickGELU" else "gelu"


def clip_state_dict(model) -> dict[str, torch.Tensor]:
    """An open_clip ``CLIP`` model's weights under ``CLIPSegModel``'s names (``clip.*``)."""
    v, sd = model.visual, {}
    if getattr(v, "attn_pool", None) is not None or getattr(v, "pool_type", "tok") != "tok":
        raise UserError("an image tower without a class token has no CLIPSeg layout")
    sd["clip.vision_model.embeddings.class_embedding"] = v.class_embedding
    sd["clip.vision_model.embeddings.patch_embedding.weight"] = v.conv1.weight
    sd["clip.vision_model.embeddings.position_embedding.weight"] = v.positional_embedding
    for hf, ours in (("pre_layrnorm", v.ln_pre), ("post_layernorm", v.ln_post)):
        sd[f"clip.vision_model.{hf}.weight"], sd[f"clip.vision_model.{hf}.bias"] = (
            ours.weight,
            ours.bias,
        )
    sd.update(_blocks(v.transformer.resblocks, "clip.vision_model"))
    sd["clip.visual_projection.weight"] = v.proj.T
    sd["clip.text_model.embeddings.token_embedding.weight"] = model.token_embedding.weight
    sd["clip.text_model.embeddings.position_embedding.weight"] = model.positional_embedding
    sd.update(_blocks(model.transformer.resblocks, "clip.text_model"))
    sd["clip.text_model.final_layer_norm.weight"] = model.ln_final.weight
    sd["clip.text_model.final_layer_norm.bias"] = model.ln_final.bias
    proj = model.text_projection
    sd["clip.text_projection.weight"] = proj.T if isinstance(proj, torch.Tensor) else proj.weight
    sd["clip.logit_scale"] = model.logit_scale.reshape(())
    return sd


def decoder_state_dict(decoder) -> dict[str, torch.Tensor]:
    """CLIPSeg's decoder under ``CLIPSegDecoder``'s names (``decoder.*``)."""
    if decoder.cfg.film_hidden:
        raise UserError(
            "FiLM with a hidden layer (model.film_hidden) has no CLIPSeg layout: "
            "CLIPSeg's FiLM is one linear map"
        )
    sd, out = decoder.state_dict(), {}
    for k, t in sd.items():
        if k.startswith(("film_mul.", "film_add.", "reduces.")):
            out[f"decoder.{k}"] = t
        elif k.startswith("trans_conv."):
            out[f"decoder.transposed_convolution.{k.split('.', 1)[1]}"] = t
    for i in range(len(decoder.blocks)):
        src, dst = f"blocks.{i}.", f"decoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[src + f"self_attn.in_proj_{kind}"].chunk(3)
            for name, t in (("q", q), ("k", k), ("v", v)):
                out[dst + f"self_attn.{name}_proj.{kind}"] = t
            for ours, theirs in HF_BLOCK_PARTS.items():
                out[dst + f"{theirs}.{kind}"] = sd[src + f"{ours}.{kind}"]
    return out


def clipseg_config(model, decoder, taps: tuple[int, ...]) -> dict:
    """``CLIPSegConfig`` of an open_clip model and a decoder reading blocks ``taps``."""
    v, dc = model.visual, decoder.cfg
    vis_blocks, txt_blocks = v.transformer.resblocks, model.transformer.resblocks
    image_size = v.image_size[0] if isinstance(v.image_size, tuple) else v.image_size
    if decoder.blocks[0].norm1.eps != v.ln_pre.eps:  # CLIPSeg's decoder takes the tower's
        raise UserError(
            "a decoder whose layer norms differ from the image tower's has no CLIPSeg layout"
        )
    return {
        "architectures": ["CLIPSegForImageSegmentation"],
        "model_type": "clipseg",
        "projection_dim": dc.cond_dim,
        "extract_layers": list(taps),
        "reduce_dim": dc.reduce_dim,
        "decoder_num_attention_heads": dc.heads,
        "decoder_attention_dropout": 0.0,
        "decoder_hidden_act": "relu",  # nn.TransformerEncoderLayer's, as CLIPSeg trains it
        "decoder_intermediate_size": dc.ffn_dim,
        "conditional_layer": 0,
        "use_complex_transposed_convolution": dc.refined,
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "text_config": {
            "vocab_size": model.token_embedding.num_embeddings,
            "hidden_size": model.token_embedding.embedding_dim,
            "intermediate_size": txt_blocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(txt_blocks),
            "num_attention_heads": txt_blocks[0].attn.num_heads,
            "max_position_embeddings": model.positional_embedding.shape[0],
            "hidden_act": _act(txt_blocks),
            "layer_norm_eps": model.ln_final.eps,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 0,
        },
        "vision_config": {
            "hidden_size": v.transformer.width,
            "intermediate_size": vis_blocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(vis_blocks),
            "num_attention_heads": vis_blocks[0].attn.num_heads,
            "image_size": image_size,
            "patch_size": v.conv1.kernel_size[0],
            "hidden_act": _act(vis_blocks),
            "layer_norm_eps": v.ln_pre.eps,
            "num_channels": 3,
        },
        "torch_dtype": "float32",
    }


def image_processor_config(size: int, mean, std) -> dict:
    """A ``ViTImageProcessor``: resize to ``size`` (bilinear), rescale to [0, 1], normalise."""
    return {
        "image_processor_type": "ViTImageProcessor",
        "processor_class": "CLIPSegProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,  # PIL's bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def write_tokenizer(folder: Path, context_length: int) -> list[str]:
    """CLIP's byte-pair vocabulary as ``CLIPTokenizer`` files (open_clip's, which is CLIP's)."""
    from trainer.model.backbone import open_clip

    open_clip()  # open_clip imported the way this toolkit imports it
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    # CLIP's vocabulary names its two special tokens <|startoftext|> and <|endoftext|>
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(t, t): i for t, i in tok.encoder.items()}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": context_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",  # after the first one, padding is not read
                "do_lower_case": True,
            }
        ),
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return list(files)
