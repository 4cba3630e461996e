"""Every stage's options, read from its ``Config`` dataclass: what ``docs/stages.md`` shows.

The page is generated (`render_stages`), and a test compares it with the file, so the options a
user reads are the options the code takes: names, types and defaults from the dataclass fields,
descriptions from the ``Args:`` section of each config class's docstring (inherited fields
from the class that declares them). Stages are reached by registry name only (`pipeline.stage`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from pipeline.stage import builtin, load

UNDOCUMENTED = "(undocumented)"


@dataclass(frozen=True)
class Option:
    """One option of a stage: its dotted key, type, default and description."""

    key: str
    type: str
    default: str
    doc: str
    in_key: bool = True


def stage_options(config_cls: type, prefix: str = "") -> list[tuple[str, list[Option]]]:
    """The options of a config dataclass as sections: ``(title, options)``, the first titled
    ``""``. A field holding a union of model configs told apart by ``family`` adds one section
    per family."""
    own: list[Option] = []
    sections: list[tuple[str, list[Option]]] = []
    docs = _field_docs(config_cls)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        families = _families(tp)
        if dataclasses.is_dataclass(tp):
            nested = stage_options(tp, f"{key}.")
            own.extend(nested[0][1])
            sections.extend(nested[1:])
        elif families:
            for name, cls in families:
                for title, options in stage_options(cls, f"{key}."):
                    heading = f"{key}, family {name}" + (f": {title}" if title else "")
                    sections.append((heading, options))
        else:
            in_key = f.metadata.get("in_key", True)
            own.append(Option(key, _type(tp), _default(f), docs.get(f.name, UNDOCUMENTED), in_key))
    return [("", own), *sections]


def render_stages() -> str:
    """The markdown of ``docs/stages.md``: every built-in stage, its inputs and options."""
    lines = [
        "# Stages",
        "",
        "Every built-in stage with its inputs and options: generated from the stages' `Config`",
        "dataclasses by `twostage stages` (a test keeps this page equal to its output). A step",
        "of a pipeline file sets options by these dotted keys (`train: {steps: 500}` sets",
        "`train.steps`). Options marked *run* say how to run, not what to compute: they are",
        "left out of the artifact key, so changing them reuses what is stored.",
        "",
    ]
    for name in builtin():
        lines += _render_stage(name)
    return "\n".join(lines).rstrip() + "\n"


def render_stage(name: str) -> str:
    """The markdown section of one stage (built-in or a module path)."""
    return "\n".join(_render_stage(name)).rstrip() + "\n"


def _render_stage(name: str) -> list[str]:
    module = load(name)
    summary = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"## {name}", "", summary, "", f"Version {module.VERSION}."]
    if module.INPUTS:
        lines += ["", "| input | takes | |", "| --- | --- | --- |"]
        for slot, spec in module.INPUTS.items():
            kinds = " or ".join(f"`{k}`" for k in spec.kinds) or "any stage"
            many = "a list of " if spec.many else ""
            lines.append(f"| `{slot}` | {many}{kinds} | {'' if spec.required else 'optional'} |")
    for title, options in stage_options(module.Config):
        if not options:
            continue
        lines += ["", f"### {title}" if title else "### options", ""]
        lines += ["| option | type | default | |", "| --- | --- | --- | --- |"]
        for o in options:
            run = " *run*" if not o.in_key else ""
            doc = o.doc.replace("|", "\\|")
            lines.append(f"| `{o.key}`{run} | {o.type} | `{o.default}` | {doc} |")
    return lines + [""]


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> description from the ``Args:`` sections of `cls` and its bases (the
    class that declares a field documents it; a subclass may document it again)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(_args_section(klass.__dict__.get("__doc__") or ""))
    return docs


def _args_section(doc: str) -> dict[str, str]:
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Args:") + 1
    except StopIteration:
        return {}
    entries: dict[str, list[str]] = {}
    indent, current = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        match = re.match(r"(\w+(?:, \w+)*): (.*)", line.strip())
        if depth == indent and match:
            current = match.group(1).split(", ")
            for name in current:
                entries[name] = [match.group(2)]
        elif current:
            for name in current:
                entries[name].append(line.strip())
    return {name: " ".join(words) for name, words in entries.items()}


def _families(tp: Any) -> list[tuple[str, type]]:
    """For a union of config dataclasses with a ``family`` field: (family name, class) pairs."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return []
    found = []
    for option in typing.get_args(tp):
        if not dataclasses.is_dataclass(option):
            return []
        family = typing.get_type_hints(option).get("family")
        found += [(name, option) for name in typing.get_args(family)]
    return found


def _type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type(args[0])} to {_type(args[1])}" if args else "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)
