"""Pipeline files: loading, ``--set`` overrides, validation and artifact keys.

A pipeline file is YAML::

    name: smoke
    store: artifacts                 # local path or URI (s3://bucket/prefix)
    ray: {address: null}             # null: start Ray locally (or join RAY_ADDRESS); "auto": join
    steps:
      data:  {stage: ingest, source: {kind: embedded}, image_size: 32}
      stats: {stage: image_stats, inputs: {images: data}, resources: {num_cpus: 1}}

Every step names its ``stage`` type; ``inputs`` wires the stage's input slots to other steps;
``resources`` and ``max_retries`` say how the runner places it; every other key is the stage's
own config (its ``Config`` dataclass). `load_pipeline` checks all of it before any work starts
and raises `ConfigError` naming the first bad key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from pipeline.config import ConfigError, from_dict, key_dict
from pipeline.stage import load as load_stage
from pipeline.store import artifact_key, check_in_process

STEP_KEYS = ("stage", "inputs", "resources", "max_retries")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a number as in YAML 1.2 (1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray.

    Args:
        address: None starts Ray on this machine (or joins ``RAY_ADDRESS`` when set);
            ``auto`` joins the cluster this machine belongs to; ``ray://host:10001`` a remote one.
        num_cpus: CPUs to give a Ray instance started here (None: all).
        infeasible_timeout_s: On a cluster, how long a step whose request no node can hold
            (and no node type of the autoscaler could) waits for such a node to join before it
            fails, in seconds.
    """

    address: str | None = None
    num_cpus: int | None = None
    infeasible_timeout_s: float = 300.0

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus: must be positive, got {self.num_cpus}")
        if self.infeasible_timeout_s < 0:
            raise ConfigError(
                f"infeasible_timeout_s: cannot be negative, got {self.infeasible_timeout_s}"
            )


@dataclass(frozen=True)
class Resources:
    """Ray resources one step's task asks for.

    Args:
        num_cpus: CPU cores (None: the stage's ``DEFAULT_NUM_CPUS``, else 1).
        num_gpus: GPUs (fractions allowed).
        memory_gb: Memory to reserve, in GiB (None: no reservation).
        custom: Custom Ray resources, e.g. ``{node_type_gpu: 1}``.
    """

    num_cpus: float | None = None
    num_gpus: float = 0.0
    memory_gb: float | None = None
    custom: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("num_cpus", "num_gpus", "memory_gb"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name}: cannot be negative, got {getattr(self, name)}")


@dataclass(frozen=True)
class _Top:
    name: str
    steps: dict[str, Any]
    store: str = "artifacts"
    runs_dir: str = "runs"
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass(frozen=True)
class Step:
    """One validated step: its stage module, typed config, wiring and key."""

    name: str
    stage: str
    module: ModuleType
    config: Any
    inputs: dict[str, str | list[str]]
    resources: Resources
    max_retries: int
    key: str = ""

    def deps(self) -> list[str]:
        names = []
        for ref in self.inputs.values():
            names.extend(ref if isinstance(ref, list) else [ref])
        return names


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: steps in dependency order, each with its artifact key."""

    name: str
    store: str
    runs_dir: str
    ray: RayOptions
    steps: dict[str, Step]
    raw: dict


def load_pipeline(
    path: str | Path, overrides: list[str] = (), store: str | None = None
) -> Pipeline:
    """Reads, overrides, validates and keys a pipeline file.

    Args:
        path: The YAML file.
        overrides: ``a.b.c=value`` strings (value parsed as YAML) applied before validation.
        store: Replaces the file's ``store``.

    Raises:
        ConfigError: one message naming the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such pipeline file")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name and steps")
    for item in overrides:
        apply_override(raw, item)
    if store is not None:
        raw["store"] = store
    return parse_pipeline(raw)


def apply_override(raw: dict, item: str) -> None:
    """Applies one ``a.b.c=value`` override to the raw mapping in place."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. steps.data.image_size=32")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    steps = raw.get("steps")
    if parts[0] == "steps" and len(parts) > 2 and isinstance(steps, dict) and parts[1] not in steps:
        names = ", ".join(map(str, steps))
        raise ConfigError(f"--set {dotted}: no step {parts[1]!r} (steps: {names})")
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {dotted}: {where} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_pipeline(raw: dict) -> Pipeline:
    """Validates a raw pipeline mapping (see `load_pipeline`)."""
    top = from_dict(_Top, raw, "")
    if not isinstance(top.steps, dict) or not top.steps:
        raise ConfigError("steps: must be a non-empty mapping of step name -> step")
    steps = {name: _parse_step(name, body) for name, body in top.steps.items()}
    order = _topological_order(steps)
    for name in order:
        _check_wiring(steps[name], steps)
        _check_upstream(steps[name], steps)
        _check_store(steps[name], top.store)
    keyed = {}
    for name in order:
        step = steps[name]
        keyed[name] = _with_key(step, keyed)
    return Pipeline(top.name, top.store, top.runs_dir, top.ray, keyed, raw)


def _parse_step(name: Any, body: Any) -> Step:
    where = f"steps.{name}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}: step names start with a letter and use letters, digits, _ or -"
        )
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: expected a mapping with at least 'stage'")
    if "stage" not in body:
        raise ConfigError(f"{where}.stage: required key is missing")
    stage = body["stage"]
    if not isinstance(stage, str):
        raise ConfigError(f"{where}.stage: expected a string, got {stage!r}")
    try:
        module = load_stage(stage)
    except ImportError as e:
        raise ConfigError(f"{where}.stage: {e}") from None
    inputs = body.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise ConfigError(f"{where}.inputs: expected a mapping of input slot -> step name")
    for slot, ref in inputs.items():
        ok = isinstance(ref, str) or (
            isinstance(ref, list) and all(isinstance(r, str) for r in ref)
        )
        if not ok:
            raise ConfigError(f"{where}.inputs.{slot}: expected a step name or a list of them")
    resources = from_dict(Resources, body.get("resources"), f"{where}.resources")
    max_retries = body.get("max_retries", 3)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(
            f"{where}.max_retries: expected a non-negative integer, got {max_retries!r}"
        )
    own = {k: v for k, v in body.items() if k not in STEP_KEYS}
    config = from_dict(module.Config, own, where)
    return Step(name, stage, module, config, dict(inputs), resources, max_retries)


def _check_wiring(step: Step, steps: dict[str, Step]) -> None:
    where = f"steps.{step.name}.inputs"
    slots = step.module.INPUTS
    for slot, ref in step.inputs.items():
        if slot not in slots:
            takes = ", ".join(sorted(slots)) or "no inputs"
            raise ConfigError(f"{where}.{slot}: unknown input (stage {step.stage} takes: {takes})")
        spec = slots[slot]
        if isinstance(ref, list) and not spec.many:
            raise ConfigError(f"{where}.{slot}: takes one step, got a list")
        for name in ref if isinstance(ref, list) else [ref]:
            other = steps[name]
            if spec.kinds and other.stage not in spec.kinds:
                raise ConfigError(
                    f"{where}.{slot}: step {name!r} is a {other.stage} stage, "
                    f"expected {' or '.join(spec.kinds)}"
                )
    for slot, spec in slots.items():
        if spec.required and slot not in step.inputs:
            raise ConfigError(f"{where}.{slot}: required input is missing")


def _check_upstream(step: Step, steps: dict[str, Step]) -> None:
    """The stage's own checks against the steps it reads from, when it has them
    (``check_upstream(config, step, steps)``; e.g. a prior's level against its autoencoder)."""
    check = getattr(step.module, "check_upstream", None)
    if check is None:
        return
    try:
        check(step.config, step, steps)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"steps.{step.name}.{e}") from None


def _check_store(step: Step, store: str) -> None:
    """A step that trains in process (``train.workers: 0``) keeps its checkpoints in a local
    directory, so it cannot run against an object store."""
    workers = getattr(getattr(step.config, "train", None), "workers", None)
    if workers is None:
        return
    try:
        check_in_process(workers, "the store", store)
    except ValueError as e:
        raise ConfigError(f"steps.{step.name}.{e}") from None


def _topological_order(steps: dict[str, Step]) -> list[str]:
    for step in steps.values():
        for slot, ref in step.inputs.items():
            for name in ref if isinstance(ref, list) else [ref]:
                if name not in steps:
                    raise ConfigError(
                        f"steps.{step.name}.inputs.{slot}: refers to unknown step {name!r}"
                    )
    order, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise ConfigError(f"steps.{name}.inputs: cycle {' -> '.join(cycle)}")
        state[name] = "visiting"
        for dep in steps[name].deps():
            visit(dep, path + [name])
        state[name] = "done"
        order.append(name)

    for name in steps:
        visit(name, [])
    return order


def _with_key(step: Step, keyed: dict[str, Step]) -> Step:
    input_keys: dict[str, Any] = {}
    for slot, ref in sorted(step.inputs.items()):
        input_keys[slot] = [keyed[r].key for r in ref] if isinstance(ref, list) else keyed[ref].key
    config = _merged(getattr(step.module, "RETIRED_OPTIONS", {}), key_dict(step.config))
    fingerprint = getattr(step.module, "fingerprint", None)
    if fingerprint is not None:
        summary = fingerprint(step.config)
        if summary is not None:
            config = {**config, "_source_fingerprint": summary}
    key = artifact_key(step.stage, step.module.VERSION, config, input_keys)
    return Step(
        step.name,
        step.stage,
        step.module,
        step.config,
        step.inputs,
        step.resources,
        step.max_retries,
        key,
    )


def _merged(base: dict, over: dict) -> dict:
    """`over` on top of `base`, mappings merged key by key (a stage's ``RETIRED_OPTIONS``: options
    it no longer has, at the values they always had, kept in its keys so stored artifacts stay
    cached)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def input_keys(step: Step, pipeline: Pipeline) -> dict[str, Any]:
    """Input slot -> (stage type, key) or a list of them, for the runner to pass to workers."""
    wired = {}
    for slot, ref in step.inputs.items():
        if isinstance(ref, list):
            wired[slot] = [(pipeline.steps[r].stage, pipeline.steps[r].key) for r in ref]
        else:
            wired[slot] = (pipeline.steps[ref].stage, pipeline.steps[ref].key)
    return wired
