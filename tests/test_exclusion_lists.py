"""The shipped lists must not remove the classes the model is evaluated on."""

from pathlib import Path

import pytest
from test_datasets import BENCHMARK_SIZES

from pipeline.filter import Matcher, read_terms, resolve_list
from pipeline.world import SYNONYMS

CLASSNAMES = Path(__file__).parents[1] / "trainer" / "eval" / "classnames"


def class_names():
    names = set()
    for f in sorted(CLASSNAMES.glob("*.txt")):
        for line in f.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                names.update(n.strip() for n in line.split(","))
    return sorted(names - {"background"})


def test_classname_files_have_the_benchmark_sizes():
    sizes = {
        f.stem: sum(1 for x in f.read_text().splitlines() if x and not x.startswith("#"))
        for f in CLASSNAMES.glob("*.txt")
    }
    assert sizes == BENCHMARK_SIZES


@pytest.mark.parametrize("name", ["generic"])
def test_no_benchmark_or_world_class_is_excluded(name):
    terms = read_terms(resolve_list(name))
    names = class_names() + [s for syn in SYNONYMS.values() for s in syn]
    hits = Matcher(dict.fromkeys(terms, name)).first_terms(names)
    assert {n: t for n, t in zip(names, hits, strict=True) if t} == {}


def test_generic_list_catches_the_papers_examples():
    terms = read_terms(resolve_list("generic"))
    m = Matcher(dict.fromkeys(terms, "generic"))
    examples = [
        "southwest",
        "pair",
        "front",
        "reflection",
        "background",
        "stock photo",
        "copy space",
        "inches",
    ]
    assert all(m.first_terms(examples))


def test_whole_phrase_terms_drop_only_the_bare_phrase():
    m = Matcher({"=side": "g", "=up": "g", "view": "g"})
    phrases = ["side", "sidewalk", "left side", "up", "cup", "side view", "top"]
    assert m.first_terms(phrases) == ["=side", None, None, "=up", None, "view", None]
    word = Matcher({"=side": "g"}, match="word")
    assert word.first_terms(["side", "side table"]) == ["=side", None]
    assert Matcher({"=up": "g"}).first_terms(["up", "pick up"]) == ["=up", None]


def test_the_worlds_caption_noise_leaves_no_label(labels):
    """What the generic list keeps of the world's captions (real spaCy, the world's noise
    prefixes and suffixes) are its class names, alone or after a colour, and CC12M's person
    placeholder: no direction, view, unit or the bare nouns they leave ("side", "part")."""
    from pipeline.world import COLOURS
    from synseg.fsutil import read_parquet

    kept = {
        label
        for f in sorted(labels.glob("[0-9]*.parquet"))
        for row in read_parquet(f, ["labels"])["labels"].to_pylist()
        for label in row
    }
    names = {s for syn in SYNONYMS.values() for s in syn}

    def a_class(label: str) -> bool:
        words = label.split()
        return label in names or (words[0] in COLOURS and " ".join(words[1:]) in names)

    assert len(kept) > 20
    assert sorted(x for x in kept if not a_class(x) and x != "person") == []
