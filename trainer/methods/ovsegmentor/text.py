"""OVSegmentor's three readings of a caption (the paper's section 3.1.2), as token ids of
CLIP's tokenizer: the caption; the caption with every entity masked (``mask_entities``: the
entity's tokens marked, the text encoder puts its [MASK] embedding there); the prompted-entity
sentence (``entity_sentence``: a template filled with "e1 and e2 and e3")."""

from __future__ import annotations

from functools import lru_cache

import torch

from synseg.entities import entity_pattern


@lru_cache(maxsize=4)
def tokenizer(arch: str):
    from trainer.model.backbone import open_clip

    return open_clip().get_tokenizer(arch)


def clean(caption: str) -> str:
    """CC12M's ``<PERSON>`` read as "person"."""
    return caption.replace("<PERSON>", "person")


def tokenize(texts: list[str], arch: str) -> torch.Tensor:
    return tokenizer(arch)([clean(t) for t in texts])


def mask_entities(caption: str, entities: list[str], arch: str) -> tuple[list[int], list[bool]]:
    """The caption's token ids, [SOT] and [EOT] included and cut to the tokenizer's context
    length as it cuts (the last id kept an [EOT]), and which of them belong to a word of
    ``entities`` (whole words, any case): every occurrence of every entity is masked."""
    tok = tokenizer(arch)
    text = clean(caption)
    ids, masked = [tok.sot_token_id], [False]
    pattern, at = entity_pattern(entities), 0
    for m in pattern.finditer(text) if pattern else ():
        before = tok.encode(text[at : m.start()])
        ids += before
        masked += [False] * len(before)
        word = tok.encode(m.group(0))
        ids += word
        masked += [True] * len(word)
        at = m.end()
    rest = tok.encode(text[at:])
    ids += rest + [tok.eot_token_id]
    masked += [False] * (len(rest) + 1)
    n = tok.context_length
    if len(ids) > n:
        ids, masked = ids[:n], masked[:n]
        ids[-1], masked[-1] = tok.eot_token_id, False
    return ids, masked


def masked_batch(
    captions: list[str], entities: list[list[str]], arch: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), masked (B, L) bool) of the captions with their entities masked, zero-padded
    to the context length as open_clip pads."""
    n = tokenizer(arch).context_length
    ids = torch.zeros(len(captions), n, dtype=torch.long)
    masked = torch.zeros(len(captions), n, dtype=torch.bool)
    for i, (c, e) in enumerate(zip(captions, entities, strict=True)):
        row, flags = mask_entities(c, e, arch)
        ids[i, : len(row)] = torch.tensor(row)
        masked[i, : len(flags)] = torch.tensor(flags)
    return ids, masked


def entity_sentence(entities: list[str], template: str) -> str:
    """The prompted-entity sentence: "a photo of a {}." with "cat and dog" for {}."""
    return template.format(" and ".join(entities))
