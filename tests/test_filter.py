import random
import shutil
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.filter import FilterConfig, Matcher, filter_table, read_terms, run_filter
from synseg.errors import UserError


def table(rows):
    return pa.table(
        {
            "uid": [f"u{i}" for i in range(len(rows))],
            "key": [f"{i:05d}" for i in range(len(rows))],
            "phrases": pa.array(rows, pa.list_(pa.string())),
        }
    )


def test_substring_is_the_papers_rule():
    m = Matcher({"side": "g", "view": "g"}, "substring")
    assert m.first_terms(["sidewalk", "seaside", "side", "view", "review", "dog", ""]) == [
        "side",
        "side",
        "side",
        "view",
        "view",
        None,
        None,
    ]


def test_word_matching_needs_whole_words():
    m = Matcher({"side": "g", "top view": "g"}, "word")
    assert m.first_terms(
        ["sidewalk", "seaside", "left side", "side", "top view", "top viewer", "laptop view"]
    ) == [
        None,
        None,
        "side",
        "side",
        "top view",
        None,
        None,
    ]


def test_matcher_agrees_with_a_double_loop():
    rng = random.Random(0)
    words = [
        "".join(rng.choices(string.ascii_lowercase[:6], k=rng.randint(2, 4))) for _ in range(60)
    ]
    terms = sorted(set(words[:30]))
    phrases = [" ".join(rng.choices(words, k=rng.randint(1, 3))) for _ in range(2000)]
    m = Matcher(dict.fromkeys(terms, "t"))
    fast = m.first_terms(phrases)
    slow = [any(t in p for t in terms) for p in phrases]
    assert [f is not None for f in fast] == slow
    assert all(f is None or f in p for f, p in zip(fast, phrases, strict=True))
    w = Matcher(dict.fromkeys(terms, "t"), "word")
    slow_word = [any(t in p.split() for t in terms) for p in phrases]  # single-word terms
    assert [f is not None for f in w.first_terms(phrases)] == slow_word


def test_read_terms_comments_blank_lines_case(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# header\n\nFront   # a direction\nunit\nfront\n  \n")
    assert read_terms(f) == ["front", "unit"]
    f.write_text("# only comments\n\n")
    with pytest.raises(UserError, match="holds no terms"):
        read_terms(f)


def test_filter_table_records_every_decision(tmp_path):
    (tmp_path / "a.txt").write_text("view\n")
    (tmp_path / "b.txt").write_text("photo\n")
    rows = [
        ["dog", "top view", "park"],
        ["stock photo", "view"],
        ["cat", "sofa", "lamp", "rug"],
        ["bird"],
    ]
    cfg = FilterConfig(
        exclude=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], max_labels=3, min_labels=1
    )
    from pipeline.filter import load_matcher

    matcher, _ = load_matcher(cfg.exclude, cfg.match)
    out = filter_table(table(rows), matcher, cfg, allow=None).to_pylist()
    assert out[0]["labels"] == ["dog", "park"]
    assert out[0]["dropped"] == [
        {"phrase": "top view", "reason": "exclude", "term": "view", "list": "a"}
    ]
    assert out[1]["labels"] == [] and not out[1]["kept"] and out[1]["reason"] == "no_label"
    assert [d["list"] for d in out[1]["dropped"]] == ["b", "a"]
    assert out[2]["labels"] == ["cat", "sofa", "lamp"]
    assert out[2]["dropped"] == [
        {"phrase": "rug", "reason": "max_labels", "term": None, "list": None}
    ]
    assert out[3]["kept"]
    cfg2 = FilterConfig(exclude=cfg.exclude, min_labels=2)
    out2 = filter_table(table(rows), matcher, cfg2, allow={"cat"}).to_pylist()
    assert [r["reason"] for r in out2] == ["no_frequent_entity", "no_label", None, "too_few_labels"]


def test_stage_on_the_chain(nouns, labels):
    for path in sorted(nouns.glob("*.parquet")):
        n = pq.read_table(path).to_pylist()
        lab = pq.read_table(labels / path.name).to_pylist()
        assert [r["uid"] for r in n] == [r["uid"] for r in lab]
        for a, b in zip(n, lab, strict=True):
            # every phrase ends up either as a label or as a recorded drop, in order
            kept_or_dropped = b["labels"] + [d["phrase"] for d in b["dropped"]]
            assert sorted(kept_or_dropped) == sorted(a["phrases"])
            assert b["kept"] == bool(b["labels"])
    all_labels = {
        x
        for p in labels.glob("*.parquet")
        for ls in pq.read_table(p)["labels"].to_pylist()
        for x in ls
    }
    assert {"ball", "kite", "tree", "grass"} <= all_labels
    assert not all_labels & {"stock photo", "view", "background", "inches", "pair"}


def test_top_k_keeps_images_with_frequent_entities(nouns, tmp_path):
    stats = run_filter(FilterConfig(nouns=nouns, output=tmp_path / "l", top_k=3))
    allow = set(__import__("json").loads((tmp_path / "l" / "_allow.json").read_text()))
    assert len(allow) == 3
    for p in (tmp_path / "l").glob("*.parquet"):
        for r in pq.read_table(p).to_pylist():
            assert r["kept"] == bool(allow & set(r["labels"]))
    assert 0 < stats.images_kept < stats.images


def test_rerun_skips_and_other_settings_need_overwrite(nouns, labels, tmp_path):
    out = tmp_path / "labels"
    shutil.copytree(labels, out)
    stats = run_filter(FilterConfig(nouns=nouns, output=out))
    assert stats.written == 0 and stats.skipped == stats.shards
    with pytest.raises(UserError, match="other settings"):
        run_filter(FilterConfig(nouns=nouns, output=out, match="word"))
    assert (
        run_filter(FilterConfig(nouns=nouns, output=out, match="word", overwrite=True)).written
        == stats.shards
    )


def test_an_edited_list_makes_the_labels_again_and_another_list_is_refused(nouns, tmp_path):
    """A list's contents are an input (a new release of generic.txt remakes the labels, and
    pack after them); its name is a setting (another list needs --overwrite)."""
    mine = tmp_path / "mine.txt"
    mine.write_text("kite\n")
    out = tmp_path / "labels"
    first = run_filter(FilterConfig(nouns=nouns, output=out, exclude=[str(mine)]))
    assert first.written == first.shards
    assert run_filter(FilterConfig(nouns=nouns, output=out, exclude=[str(mine)])).written == 0
    mine.write_text("kite\nball\n")
    again = run_filter(FilterConfig(nouns=nouns, output=out, exclude=[str(mine)]))
    assert again.written == again.shards
    labels = [
        label
        for f in sorted(out.glob("[0-9]*.parquet"))
        for row in pq.read_table(f, columns=["labels"])["labels"].to_pylist()
        for label in row
    ]
    assert labels and not any("ball" in x or "kite" in x for x in labels)
    with pytest.raises(UserError, match="other settings"):
        run_filter(FilterConfig(nouns=nouns, output=out, exclude=["generic"]))


def test_bad_inputs(nouns, tmp_path):
    with pytest.raises(UserError, match="not found"):
        run_filter(FilterConfig(nouns=nouns, output=tmp_path / "l", exclude=["no-such-list"]))
    with pytest.raises(UserError, match="run `synseg-data extract-nouns` first"):
        run_filter(FilterConfig(nouns=tmp_path / "missing", output=tmp_path / "l"))
    with pytest.raises(UserError, match="--match"):
        FilterConfig(match="fuzzy")
    with pytest.raises(UserError, match="allow-list"):
        run_filter(FilterConfig(nouns=nouns, output=tmp_path / "l", allow=tmp_path / "none.txt"))


def test_the_recorded_term_is_the_first_that_ends_and_the_first_list_wins(tmp_path):
    (tmp_path / "a.txt").write_text("view\nphoto\n")
    (tmp_path / "b.txt").write_text("stock\nphoto\n")
    nouns = tmp_path / "nouns"
    nouns.mkdir()
    pq.write_table(
        table([["stock photo view"], ["photo view", "dog"], ["top view"]]), nouns / "00000.parquet"
    )
    expected = {  # phrase -> (term, list): the term whose match ends first in the phrase
        "stock photo view": "stock",
        "photo view": "photo",
        "top view": "view",
    }
    for order, photo_list in (
        ([tmp_path / "a.txt", tmp_path / "b.txt"], "a"),
        ([tmp_path / "b.txt", tmp_path / "a.txt"], "b"),
    ):
        out = tmp_path / f"out-{photo_list}"
        run_filter(FilterConfig(exclude=[str(p) for p in order], nouns=nouns, output=out))
        rows = pq.read_table(out / "00000.parquet").to_pylist()
        got = {d["phrase"]: (d["term"], d["list"]) for r in rows for d in r["dropped"]}
        lists = {"stock": "b", "view": "a", "photo": photo_list}  # a term in both: first given
        assert got == {p: (t, lists[t]) for p, t in expected.items()}
        assert [r["labels"] for r in rows] == [[], ["dog"], []]


def test_top_k_is_the_k_most_frequent_labels_after_exclusion(tmp_path):
    # Counts before exclusion: photo 6 (excluded), dog 4, tree 3, cat 3, car 2.
    (tmp_path / "x.txt").write_text("photo\n")
    rows = (
        [["photo", "dog"]] * 3
        + [["photo", "dog", "tree"]]
        + [["photo", "cat"]] * 2
        + [["tree"], ["tree", "car"], ["cat"], ["car"]]
    )
    nouns = tmp_path / "nouns"
    nouns.mkdir()
    pq.write_table(table(rows[:5]), nouns / "00000.parquet")
    t2 = table(rows[5:])
    t2 = t2.set_column(0, "uid", pa.array([f"v{i}" for i in range(len(rows) - 5)]))
    pq.write_table(t2, nouns / "00001.parquet")
    out = tmp_path / "labels"
    run_filter(FilterConfig(exclude=[str(tmp_path / "x.txt")], nouns=nouns, output=out, top_k=2))
    # dog 4, then cat and tree tie at 3: ties go by name, so cat. 'photo' never counts.
    assert __import__("json").loads((out / "_allow.json").read_text()) == ["cat", "dog"]
    kept = [r["kept"] for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert kept == [True] * 4 + [True] * 2 + [False, False, True, False]


def test_labels_recorded_the_older_way_are_made_again_not_refused(nouns, labels, tmp_path):
    """Labels written when each list's SHA-1 was a setting: the same lists and rules are made
    again (a checkout that updates, then runs make demo, goes on); other rules stay refused."""
    from synseg.fsutil import read_parquet, read_settings, write_parquet

    out = tmp_path / "labels"
    shutil.copytree(labels, out)
    for f in sorted(out.glob("[0-9]*.parquet")):
        now = read_settings(f)
        older = {k: v for k, v in now.items() if k != "allow"}
        older["lists"] = [{"list": n, "sha1": "78111f14c709"} for n in now["lists"]]
        older["allow_sha1"] = None
        write_parquet(f, read_parquet(f), older, read_settings(f, b"synseg_inputs"))
    again = run_filter(FilterConfig(nouns=nouns, output=out))
    assert again.written == again.shards
    assert run_filter(FilterConfig(nouns=nouns, output=out)).written == 0
    older["match"] = "word"
    first = sorted(out.glob("[0-9]*.parquet"))[0]
    write_parquet(first, read_parquet(first), older, read_settings(first, b"synseg_inputs"))
    with pytest.raises(UserError, match="other settings"):
        run_filter(FilterConfig(nouns=nouns, output=out))
