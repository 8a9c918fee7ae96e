"""Command-line options derived from the settings dataclasses, so that each setting's default and
its help are written once: on its dataclass field, the help as the comment after it.

    @app.command()
    @handle_errors
    @options_of(EvalConfig, flags={"overrides": ("--set",)})
    def eval_(**settings) -> None:
        cfg = EvalConfig(**settings)

``options_of`` adds one Typer option per field (but those the command declares itself or
skips) to the command's signature: the field's type (a tuple becomes a repeatable option), its
default, its comment as the help. Typer reads the signature as it reads a written one.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from collections.abc import Callable
from functools import cache
from typing import Annotated, Any

import typer


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: the comment after it on its line, read from the class's source (and
    its dataclass bases')."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        comments = {
            tok.start[0]: tok.string.lstrip("#").strip()
            for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT
        }
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = comments.get(node.end_lineno)
                if text:
                    docs[node.target.id] = text
    return docs


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty  # a required option


def _cli_type(hint: Any) -> Any:
    """The annotation Typer is given: tuples become lists (a repeatable option)."""
    if typing.get_origin(hint) is tuple:
        return list[typing.get_args(hint)[0]]
    return hint


def options_of(
    cls: type,
    skip: tuple[str, ...] = (),
    flags: dict[str, tuple[str, ...]] | None = None,
    extra_help: dict[str, str] | None = None,
) -> Callable:
    """Decorator adding ``cls``'s fields as options of a Typer command (see the module doc).
    ``flags``: a field's option names when not ``--field-name``; ``extra_help``: text added
    after a field's doc (choices known only at run time)."""

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        added = []
        for f in dataclasses.fields(cls):
            if f.name in skip or f.name in sig.parameters:
                continue
            doc = " ".join(x for x in (docs.get(f.name), (extra_help or {}).get(f.name)) if x)
            default = field_default(f)
            if isinstance(default, tuple):
                default = list(default)
            option = typer.Option(*(flags or {}).get(f.name, ()), help=doc or None)
            added.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=Annotated[_cli_type(hints[f.name]), option],
                )
            )
        # Typer wants options without defaults (required) before the others.
        params = [*own, *sorted(added, key=lambda p: p.default is not p.empty)]
        fn.__signature__ = sig.replace(parameters=params)
        fn.__settings__ = cls  # what the options are made from
        return fn

    return wrap


def settings_of(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``cls`` among a command's ``values`` (lists back to tuples
    where the field is a tuple)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            out[f.name] = tuple(v) if typing.get_origin(hints[f.name]) is tuple else v
    return out
