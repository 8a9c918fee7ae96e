"""Class files are tied to the label ids they index: each line must name the class that
MMSegmentation 0.27's dataset class reads at that label value (``tests/fixtures/
mmseg_0.27_classes.json``, copied from the CLASSES tuples of its PyPI wheel). A file in another
order scores a perfect model near chance."""

import json
import re
from pathlib import Path

import pytest

from trainer.eval.datasets import CLASSNAMES, read_classnames

REFERENCE = json.loads((Path(__file__).parent / "fixtures/mmseg_0.27_classes.json").read_text())
# Words MMSegmentation's COCO-Stuff names carry to tell stuff from things ("door-stuff"),
# or to name a catch-all ("building-other"); the class files use the plain readable name.
QUALIFIERS = {"other", "stuff", "merged"}


def words(name: str) -> frozenset[str]:
    return frozenset(w for w in re.split(r"[^a-z]+", name.lower()) if w) - QUALIFIERS


def same_class(reference: str, synonyms: list[str]) -> bool:
    joined = re.sub(r"[^a-z]", "", reference.lower())
    return any(
        re.sub(r"[^a-z]", "", s.lower()) == joined or words(s) == words(reference) for s in synonyms
    )


@pytest.mark.parametrize("name", ["voc", "voc20", "context", "context60", "stuff", "city", "ade"])
def test_class_file_follows_the_label_order_of_mmsegmentation(name):
    ours = read_classnames(CLASSNAMES / f"{name}.txt")
    # VOC20 is VOC's label order without background (label 0 ignored, 1..20 -> 0..19).
    reference = REFERENCE["voc"][1:] if name == "voc20" else REFERENCE[name]
    assert len(ours) == len(reference)
    wrong = [
        (i, r, s)
        for i, (r, s) in enumerate(zip(reference, ours, strict=True))
        if not same_class(r, s)
    ]
    assert not wrong, f"{name}.txt: label id, expected class, line found: {wrong[:5]}"


def test_the_check_catches_a_file_in_another_order():
    ours = read_classnames(CLASSNAMES / "context.txt")
    swapped = [ours[1], ours[0], *ours[2:]]
    assert not all(same_class(r, s) for r, s in zip(REFERENCE["context"], swapped, strict=True))
