"""inspect: DuckDB over every manifest the pipeline wrote.

Views (each only if its files exist):
  raw     every row of every finished img2dataset shard (uid, key, url, caption, status, error_message,
          ..., filename: the shard's Parquet file)
  nouns   uid, key, caption, phrases                      (manifests/nouns)
  labels  uid, key, labels, dropped, kept, reason         (manifests/labels)
  shards  shard, samples                                  (data/shards/sizes.json)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.download import done_shards
from synseg.errors import UserError
from synseg.shards import SIZES, read_sizes

REPORTS = {
    "top-labels": (
        "The most frequent training labels (kept images only)",
        """SELECT label, count(*) AS images
           FROM (SELECT unnest(labels) AS label FROM labels WHERE kept)
           GROUP BY label ORDER BY images DESC, label LIMIT {limit}""",
    ),
    "labels-per-image": (
        "How many labels images have, and which were left out",
        """SELECT len(labels) AS labels, count(*) FILTER (WHERE kept) AS kept_images,
                  count(*) FILTER (WHERE NOT kept) AS left_out, any_value(reason) AS why_left_out
           FROM labels GROUP BY 1 ORDER BY 1""",
    ),
    "drops-by-term": (
        "What each exclusion term dropped (phrases, distinct phrases, examples)",
        """SELECT d.list AS list, d.term AS term, count(*) AS phrases,
                  count(DISTINCT d.phrase) AS distinct_phrases,
                  array_to_string(list_sort(list_distinct(list(d.phrase)))[1:4], ', ') AS examples
           FROM (SELECT unnest(dropped) AS d FROM labels)
           WHERE d.reason = 'exclude'
           GROUP BY ALL ORDER BY phrases DESC, term LIMIT {limit}""",
    ),
    "download-status": (
        "Download outcomes per uid: successes and each failure reason (a uid retried with "
        "--retry-failed counts once, by its best outcome)",
        """SELECT CASE WHEN ok THEN 'success' ELSE 'failed' END AS status, error,
                  count(*) AS uids
           FROM (SELECT uid, bool_or(status = 'success') AS ok,
                        CASE WHEN bool_or(status = 'success') THEN ''
                             ELSE coalesce(regexp_replace(arg_max(error_message, filename),
                                                          'https?://\\S+', '<url>', 'g'), '')
                        END AS error
                 FROM raw GROUP BY uid)
           GROUP BY ALL ORDER BY uids DESC, error LIMIT {limit}""",
    ),
}


@dataclass
class InspectConfig:
    sql: str | None = None  # SQL over the views raw, nouns, labels, shards
    report: str | None = None  # top-labels, labels-per-image, drops-by-term or download-status
    raw: Path = Path("data/raw")  # img2dataset shards
    nouns: Path = Path("manifests/nouns")  # noun manifests
    labels: Path = Path("manifests/labels")  # labels manifests
    shards: Path = Path("data/shards")  # training shards (sizes.json)
    limit: int = 20  # rows of a report

    def __post_init__(self) -> None:
        if (self.sql is None) == (self.report is None):
            raise UserError(f"give either a SQL query or --report NAME ({', '.join(REPORTS)})")
        if self.report is not None and self.report not in REPORTS:
            raise UserError(f"unknown report {self.report!r}; choose from {', '.join(REPORTS)}")


@dataclass
class QueryResult:
    title: str
    columns: list[str]
    rows: list[tuple]


def connect(cfg: InspectConfig) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with a view per manifest found; also returns the view names."""
    con = duckdb.connect()
    views = []

    def parquet_view(name: str, files: list[Path], extra: str = "") -> None:
        if files:
            listed = ", ".join("'" + f.as_posix().replace("'", "''") + "'" for f in files)
            try:
                con.execute(
                    f"CREATE VIEW {name} AS SELECT * FROM "
                    f"read_parquet([{listed}], union_by_name = true{extra})"
                )
            except duckdb.Error as e:
                first = str(e).strip().splitlines()[0]
                raise UserError(f"cannot open the {name} manifests: {first}") from None
            views.append(name)

    raw = Path(cfg.raw)
    parquet_view("raw", done_shards(raw) if raw.is_dir() else [], ", filename = true")
    parquet_view("nouns", sorted(Path(cfg.nouns).glob("[0-9]*.parquet")))
    parquet_view("labels", sorted(Path(cfg.labels).glob("[0-9]*.parquet")))
    if (Path(cfg.shards) / SIZES).exists():
        counts = read_sizes(Path(cfg.shards))
        table = pa.table({"shard": list(counts), "samples": list(counts.values())})
        con.register("_shards", table)
        con.execute("CREATE VIEW shards AS SELECT * FROM _shards")
        views.append("shards")
    return con, views


def run_inspect(cfg: InspectConfig) -> QueryResult:
    con, views = connect(cfg)
    if not views:
        raise UserError(
            "no manifests found (looked in "
            f"{cfg.raw}, {cfg.nouns}, {cfg.labels}, {cfg.shards}); run the pipeline first"
        )
    if cfg.report:
        title, sql = REPORTS[cfg.report]
        sql = sql.format(limit=int(cfg.limit))
    else:
        title, sql = cfg.sql, cfg.sql
    try:
        cur = con.execute(sql)
        rows = cur.fetchall()
    except duckdb.IOException as e:  # a damaged file is read only when queried
        first = str(e).strip().splitlines()[0]
        raise UserError(f"a manifest cannot be read: {first}") from None
    except duckdb.Error as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"query failed: {first} (views: {', '.join(views)})") from None
    columns = [d[0] for d in cur.description] if cur.description else []
    return QueryResult(title=title, columns=columns, rows=rows)
