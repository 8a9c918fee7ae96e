"""How an entity is found in a text, written once for ``synseg-data pair`` (in labels) and
OVSegmentor's caption masking (in captions): as a whole word or hyphenated compound, in any
case, the longest entity first where two overlap."""

from __future__ import annotations

import re


def entity_pattern(entities: list[str]) -> re.Pattern | None:
    """A pattern of every entity (None for none)."""
    if not entities:
        return None
    words = sorted(set(entities), key=lambda e: (-len(e), e))
    alternatives = "|".join(re.escape(e) for e in words)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)
