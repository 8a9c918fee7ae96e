"""The layout's promises: what each part imports, what a wheel ships, one version, short
functions, no module named after the standard library's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("synseg", "pipeline", "trainer")


def _pipeline_modules(imports: str) -> list[str]:
    code = f"import sys, {imports}\nprint(' '.join(m for m in sys.modules if m.startswith('pipeline')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return sorted(out.stdout.split())


def test_the_trainer_imports_no_stage_of_the_pipeline():
    """The trainer reaches what it shares with the pipeline through ``synseg``; only the
    world demo, which runs the data chain, imports the pipeline's world, and nothing imports
    the pipeline's command line."""
    core = "trainer, trainer.api, trainer.eval.evaluate, trainer.train.loop, trainer.train.data"
    assert _pipeline_modules(core) == []
    assert _pipeline_modules("trainer.cli") == ["pipeline", "pipeline.world"]


def test_import_trainer_is_light():
    code = "import sys, trainer\nprint('torch' in sys.modules, 'typer' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_every_data_file_of_the_packages_is_declared_package_data():
    """A wheel ships only what ``[tool.setuptools.package-data]`` names: every file under the
    packages that is not Python must match one of its globs."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    tracked = subprocess.run(
        ["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    data = [f for f in tracked if not f.endswith(".py")]
    assert any("classnames/sclip" in f for f in data)
    for f in data:
        ok = False
        for pkg, globs in declared.items():
            folder = pkg.replace(".", "/") + "/"
            if f.startswith(folder):
                rel = PurePosixPath(f[len(folder) :])
                # setuptools' globs: a * does not cross a folder
                ok |= any(
                    len(rel.parts) == len(PurePosixPath(g).parts) and rel.match(g) for g in globs
                )
        assert ok, f"{f} is in no package-data glob"


def test_the_version_is_written_once():
    import importlib.metadata

    import synseg

    assert importlib.metadata.version("synseg") == synseg.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert synseg.__version__ not in pyproject


def test_no_module_shadows_the_standard_library():
    """Run from inside a package folder (``python pipeline/cli.py``), a module named like the
    standard library's (inspect, types, ...) would replace it."""
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            assert path.stem not in sys.stdlib_module_names, path


def test_no_function_in_the_trainer_is_over_80_lines():
    long = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines})")
    assert not long


# The commands whose options are their settings dataclass's fields.
SETTINGS_COMMANDS = {
    "synseg-data": [
        "world",
        "download",
        "extract-nouns",
        "filter",
        "pack",
        "pair",
        "inspect",
        "demo",
    ],  # fmt: skip
    "synseg-train": ["eval", "prepare", "export", "demo"],
}


@pytest.mark.parametrize("cli", sorted(SETTINGS_COMMANDS))
def test_every_option_is_its_settings_field(cli):
    """Each command's options are made from its dataclass: every field is an option (or the
    command's argument) with the field's default, its comment as the help."""
    import dataclasses
    import inspect as pyinspect

    import typer

    from synseg.options import field_default, field_docs

    module = pytest.importorskip("pipeline.cli" if cli == "synseg-data" else "trainer.cli")
    group = typer.main.get_command(module.app)
    for name in SETTINGS_COMMANDS[cli]:
        command = group.commands[name]
        cls = pyinspect.unwrap(command.callback).__settings__
        params = {p.name: p for p in command.params}
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in params, (name, f.name)
            p = params[f.name]
            default = field_default(f)
            if default is pyinspect.Parameter.empty:
                assert p.required, (name, f.name)
                continue
            given = p.default
            if isinstance(default, (tuple, list)):
                given, default = list(given or []), list(default)
            assert given == default or str(given) == str(default), (name, f.name, given, default)
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no comment to be its help"
            if getattr(p, "help", None) is not None:
                assert p.help.startswith(docs[f.name]), (name, f.name)
