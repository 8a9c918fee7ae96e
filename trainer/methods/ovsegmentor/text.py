"""OVSegmentor's three readings of a caption (the paper's section 3.1.2), as token ids of the
text encoder's tokenizer: the caption; the caption with every entity masked (``masked``: the
entity's tokens marked, the text encoder puts its [MASK] embedding there); the prompted-entity
sentence (``entity_sentence``: a template filled with "e1 and e2 and e3").

Two tokenizers: CLIP's (``ClipText``, the default text tower's; its [EOT] is the largest id)
and a BERT tokenizer from transformers (``BertText``, the paper's; [CLS] ... [SEP], its own
[MASK] id at the entity's word pieces, the [SEP] taken as the [EOT]). ``codec(model_cfg)``
gives the one a model reads."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from synseg.entities import entity_pattern
from synseg.errors import UserError

BERT_LENGTH = 77  # the BERT captions' length, as CLIP's context (the public code: 77)


@lru_cache(maxsize=4)
def tokenizer(arch: str):
    from trainer.model.backbone import open_clip

    return open_clip().get_tokenizer(arch)


def clean(caption: str) -> str:
    """CC12M's ``<PERSON>`` read as "person"."""
    return caption.replace("<PERSON>", "person")


def _masked_ids(
    text: str,
    entities: list[str],
    encode: Callable[[str], list[int]],
    first: int,
    last: int,
    length: int,
    mask_id: int | None = None,
) -> tuple[list[int], list[bool]]:
    """[first] + the text's ids + [last], cut to ``length`` with ``last`` kept at the end, and
    which ids belong to an entity (whole words, any case; every occurrence); ``mask_id``, if
    given, replaces those ids."""
    ids, masked = [first], [False]
    pattern, at = entity_pattern(entities), 0
    for m in pattern.finditer(text) if pattern else ():
        before = encode(text[at : m.start()])
        ids += before
        masked += [False] * len(before)
        word = encode(m.group(0))
        ids += [mask_id] * len(word) if mask_id is not None else word
        masked += [True] * len(word)
        at = m.end()
    rest = encode(text[at:])
    ids += rest + [last]
    masked += [False] * (len(rest) + 1)
    if len(ids) > length:
        ids, masked = ids[:length], masked[:length]
        ids[-1], masked[-1] = last, False
    return ids, masked


def _pad(rows: list[tuple[list[int], list[bool]]], length: int, pad: int):
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    masked = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (row, flags) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        masked[i, : len(flags)] = torch.tensor(flags)
    return ids, masked


def from_transformers(kind: str, name: str, what: str):
    """transformers' ``kind`` (AutoModel, AutoTokenizer) from ``name`` (a Hugging Face name or a
    local folder); one line if transformers or the files are missing."""
    from trainer.model.compat import ensure_torchvision

    ensure_torchvision()  # transformers' models import torchvision when it is there
    try:
        import transformers
    except ImportError:
        raise UserError(
            "model.text_encoder=bert needs transformers (pip install transformers)"
        ) from None
    try:
        return getattr(transformers, kind).from_pretrained(name)
    except OSError as e:
        raise UserError(f"cannot load {what} {name!r}: {str(e).splitlines()[0]}") from None


class _Codec:
    """What both tokenizers share: a batch of masked captions, padded with ``pad``."""

    length: int
    pad: int

    def mask_entities(self, caption: str, entities: list[str]) -> tuple[list[int], list[bool]]:
        raise NotImplementedError

    def masked(self, captions: list[str], entities: list[list[str]]):
        """(ids (B, L), masked (B, L) bool) of the captions with their entities masked."""
        rows = [self.mask_entities(c, e) for c, e in zip(captions, entities, strict=True)]
        return _pad(rows, self.length, self.pad)


class ClipText(_Codec):
    def __init__(self, arch: str) -> None:
        self.tok = tokenizer(arch)
        self.length = self.tok.context_length
        self.pad = 0  # open_clip pads with zeros

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tok([clean(t) for t in texts])

    def mask_entities(self, caption: str, entities: list[str]) -> tuple[list[int], list[bool]]:
        t = self.tok
        return _masked_ids(
            clean(caption), entities, t.encode, t.sot_token_id, t.eot_token_id, self.length
        )


class BertText(_Codec):
    def __init__(self, name: str) -> None:
        self.tok = from_transformers("AutoTokenizer", name, "the BERT tokenizer")
        self.pad = self.tok.pad_token_id
        self.length = BERT_LENGTH

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = self.tok(
            [clean(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.length,
            return_tensors="pt",
        )
        return out["input_ids"]

    def mask_entities(self, caption: str, entities: list[str]) -> tuple[list[int], list[bool]]:
        t = self.tok

        def encode(s: str) -> list[int]:
            return t.encode(s, add_special_tokens=False) if s.strip() else []

        return _masked_ids(
            clean(caption), entities, encode, t.cls_token_id, t.sep_token_id, self.length,
            mask_id=t.mask_token_id,
        )  # fmt: skip


@lru_cache(maxsize=4)
def _codec(kind: str, name: str):
    return BertText(name) if kind == "bert" else ClipText(name)


def codec(model_cfg) -> ClipText | BertText:
    """The tokenizer of the model's text encoder."""
    if model_cfg.text_encoder == "bert":
        return _codec("bert", model_cfg.bert)
    return _codec("clip", model_cfg.arch)


def tokenize(texts: list[str], arch: str) -> torch.Tensor:
    """CLIP's token ids of texts."""
    return _codec("clip", arch).tokenize(texts)


def mask_entities(caption: str, entities: list[str], arch: str) -> tuple[list[int], list[bool]]:
    """CLIP's token ids of the caption, and which belong to an entity."""
    return _codec("clip", arch).mask_entities(caption, entities)


def entity_sentence(entities: list[str], template: str) -> str:
    """The prompted-entity sentence: "a photo of a {}." with "cat and dog" for {}."""
    return template.format(" and ".join(entities))
