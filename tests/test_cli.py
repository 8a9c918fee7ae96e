"""The command line: thin commands, one clear line for each user mistake, exit code 1."""

import json
import subprocess
import sys

import pytest
from cli_checks import one_error_line
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "does not exist"),
        (b"", "holds no rows"),
        (b"a\tb\tc\n", "expected 2 tab-separated columns"),
    ],
)
def test_download_bad_url_lists(tmp_path, content, needle):
    f = tmp_path / "urls.tsv"
    if content is not None:
        f.write_bytes(content)
    one_error_line(run("download", "--url-list", f, "--output", tmp_path / "raw"), needle)


def test_stage_errors(tmp_path, nouns, raw, labels):
    one_error_line(
        run("extract-nouns", "--raw", tmp_path / "none", "--output", tmp_path / "n"),
        "run `synseg-data download` first",
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.md").write_text("mine")
    one_error_line(
        run("extract-nouns", "--raw", raw, "--output", busy), "already holds other files"
    )
    one_error_line(
        run("filter", "--nouns", nouns, "--output", tmp_path / "l", "--exclude", "nope"),
        "exclusion list 'nope' not found",
    )
    one_error_line(
        run("filter", "--nouns", nouns, "--output", tmp_path / "l", "--match", "fuzzy"), "--match"
    )
    one_error_line(run("pack", "--raw", raw, "--labels", tmp_path / "none"), "labels folder")
    one_error_line(run("inspect", "SELECT * FROM nowhere", "--labels", labels), "query failed")
    one_error_line(run("inspect", "--report", "bogus"), "unknown report")
    one_error_line(run("serve", "--world", tmp_path), "not a synthetic world")


def test_inspect_prints_a_report(raw, nouns, labels, shards):
    paths = ["--raw", raw, "--nouns", nouns, "--labels", labels, "--shards", shards]
    result = run("inspect", "--report", "top-labels", "--limit", "4", *paths)
    assert result.exit_code == 0, result.output
    assert "most frequent" in result.stdout
    rows = json.loads(
        run(
            "inspect",
            "SELECT label, images FROM (SELECT unnest(labels) AS label, count(*) AS images "
            "FROM labels WHERE kept GROUP BY 1) ORDER BY images DESC, label LIMIT 4",
            "--format",
            "json",
            *paths,
        ).stdout
    )
    assert len(rows) == 4
    for r in rows:
        assert r["label"] in result.stdout


def test_filter_summary_and_rerun(nouns, tmp_path):
    args = [
        "filter",
        "--nouns",
        nouns,
        "--output",
        tmp_path / "l",
        "--exclude",
        "generic",
        "--max-labels",
        "2",
    ]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "dropped_by_term: view" in first.stdout
    again = run(*args)
    assert again.exit_code == 0
    skipped = [line for line in again.stdout.splitlines() if "skipped" in line][0]
    assert str(len(list(nouns.glob("*.parquet")))) in skipped


def test_every_command_has_help():
    for cmd in ("world", "serve", "download", "extract-nouns", "filter", "pack", "pair", "inspect"):
        result = run(cmd, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_trainer_command_line_does_not_import_the_data_command_line():
    """The two command lines share synseg.console; synseg-train never loads synseg-data's."""
    code = "import sys, trainer.cli; print('pipeline.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
