import pyarrow.parquet as pq
import pytest

from pipeline.inspection import InspectConfig, run_inspect
from pipeline.world import load_world
from synseg.errors import UserError


@pytest.fixture()
def paths(raw, nouns, labels, shards):
    return dict(raw=raw, nouns=nouns, labels=labels, shards=shards)


def q(paths, sql):
    return run_inspect(InspectConfig(sql=sql, **paths)).rows


def test_views_hold_every_manifest(paths, world):
    kinds = load_world(world)["url_kinds"]
    assert q(paths, "SELECT count(*) FROM raw") == [(len(kinds),)]
    assert q(paths, "SELECT count(*) FROM raw WHERE status = 'success'") == [(kinds.count("ok"),)]
    assert q(paths, "SELECT count(*) FROM nouns") == [(kinds.count("ok"),)]
    kept = sum(
        pq.read_table(p)["kept"].to_pylist().count(True) for p in paths["labels"].glob("*.parquet")
    )
    assert q(paths, "SELECT sum(samples) FROM shards") == [(kept,)]
    # a join across stages: every packed label came from a phrase of the same image
    assert q(
        paths,
        """SELECT count(*) FROM labels l JOIN nouns n USING (uid)
                       WHERE NOT list_has_all(n.phrases, l.labels)""",
    ) == [(0,)]


def test_reports(paths, world):
    top = run_inspect(InspectConfig(report="top-labels", limit=3, **paths))
    assert top.columns == ["label", "images"] and len(top.rows) == 3
    counts = [r[1] for r in top.rows]
    assert counts == sorted(counts, reverse=True)
    everything = q(
        paths,
        "SELECT unnest(labels) AS l, count(*) c FROM labels WHERE kept GROUP BY l ORDER BY c DESC, l LIMIT 3",
    )
    assert top.rows == everything

    drops = run_inspect(InspectConfig(report="drops-by-term", **paths))
    terms = {r[1]: r for r in drops.rows}
    assert "view" in terms and "view" in terms["view"][4]

    status = run_inspect(InspectConfig(report="download-status", **paths))
    kinds = load_world(world)["url_kinds"]
    by = {(r[0], r[1]): r[2] for r in status.rows}
    assert by[("success", "")] == kinds.count("ok")
    assert sum(v for (s, e), v in by.items() if "404" in e) == kinds.count("missing")

    per_image = run_inspect(InspectConfig(report="labels-per-image", **paths))
    assert sum(r[1] + r[2] for r in per_image.rows) == kinds.count("ok")


def test_errors(paths, tmp_path):
    with pytest.raises(UserError, match="query failed.*views: raw, nouns, labels, shards"):
        run_inspect(InspectConfig(sql="SELECT * FROM nothing", **paths))
    with pytest.raises(UserError, match="unknown report"):
        InspectConfig(report="everything")
    with pytest.raises(UserError, match="either"):
        InspectConfig()
    with pytest.raises(UserError, match="no manifests"):
        run_inspect(
            InspectConfig(
                sql="SELECT 1", raw=tmp_path, nouns=tmp_path, labels=tmp_path, shards=tmp_path
            )
        )
