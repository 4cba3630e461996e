"""Comparing committed artifacts: one table of their config differences and final figures.

``twostage ls STAGE --metrics [--input STAGE/KEY]`` and ``twostage compare KEY...`` print it:
one row per artifact, best first by the stage's score where it declares one (a stage module's
``SCORE = (metric, "min" | "max")``, e.g. train_prior's ``val_bits_per_code``), then the
options whose values differ between the rows (dotted, as in a pipeline file), then the stage's
``COMPARE`` figures (or every numeric final figure the rows share). ``--json`` gives every
option and figure of every row.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.stage import load as load_stage

MAX_FIGURES = 8  # columns of figures when a stage names none


def rows(artifacts: list) -> list[dict]:
    """One record per artifact: ``ref`` (stage/key prefix), ``stage``, ``key``, ``inputs``,
    ``config`` (flattened dotted options), ``metrics`` (final figures), ``created``."""
    out = []
    for a in artifacts:
        out.append(
            {
                "ref": f"{a.stage}/{a.key[:12]}",
                "stage": a.stage,
                "key": a.key,
                "created": a.manifest.get("created"),
                "inputs": a.manifest.get("inputs", {}),
                "config": flatten(a.config),
                "metrics": a.metrics,
            }
        )
    return out


def rank(records: list[dict]) -> tuple[list[dict], str | None]:
    """The records best first by the stage's ``SCORE`` (those without it last), and its name;
    unchanged (oldest first) when the stages differ or declare none."""
    score = _declared(records, "SCORE")
    if score is None:
        return records, None
    metric, mode = score
    sign = 1 if mode == "min" else -1

    def order(record: dict):
        value = record["metrics"].get(metric)
        if not _number(value):
            return (1, 0.0)
        return (0, sign * value)

    return sorted(records, key=order), metric


def differing(records: list[dict]) -> list[str]:
    """The dotted options whose values are not the same in every record."""
    names = sorted({k for r in records for k in r["config"]})
    return [n for n in names if len({repr(r["config"].get(n)) for r in records}) > 1]


def figures(records: list[dict], score: str | None) -> list[str]:
    """The figure columns: the score, then the stage's ``COMPARE`` list, or every numeric
    final figure all records share (at most `MAX_FIGURES`)."""
    named = _declared(records, "COMPARE")
    if named is None:
        shared = set.intersection(
            *({k for k, v in r["metrics"].items() if _number(v)} for r in records)
        )
        named = sorted(shared)[:MAX_FIGURES]
    columns = [score] if score else []
    return columns + [m for m in named if m != score]


def table(records: list[dict]) -> str:
    """The comparison as aligned text, best first."""
    if not records:
        return "no artifacts"
    records, score = rank(records)
    options = differing(records) if len(records) > 1 else []
    metrics = figures(records, score)
    head = ["ARTIFACT", *options, *metrics]
    body = [
        [
            r["ref"],
            *(_cell(r["config"].get(o)) for o in options),
            *(_cell(r["metrics"].get(m)) for m in metrics),
        ]
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [head, *body]
    ]
    if score:
        lines.append(f"(best first by {score})")
    return "\n".join(lines)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if not isinstance(config, dict):
        return {prefix: config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def _declared(records: list[dict], name: str):
    stages = {r["stage"] for r in records}
    if len(stages) != 1:
        return None
    try:
        return getattr(load_stage(stages.pop()), name, None)
    except ImportError:
        return None


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)
