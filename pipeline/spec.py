"""Pipeline files: loading, ``--set`` overrides, validation and artifact keys.

A pipeline file is YAML::

    name: smoke
    store: artifacts                 # local path or URI (s3://bucket/prefix)
    ray: {address: null}             # null: start Ray locally (or join RAY_ADDRESS); "auto": join
    tracking: none                   # tensorboard: curves in runs/<run_id>/tensorboard
    steps:
      data:  {stage: ingest, source: {kind: embedded}, image_size: 32}
      stats: {stage: image_stats, inputs: {images: data}, resources: {num_cpus: 1}}

Every step names its ``stage`` type; ``inputs`` wires the stage's input slots to other steps,
or to artifacts already committed to the store, named as ``twostage ls`` prints them
(``codes: encode/3f2a9c41``: stage type / a unique key prefix); ``resources`` and
``max_retries`` say how the runner places it; every other key is the stage's own config (its
``Config`` dataclass). `load_pipeline` checks all of it before any work starts and raises
`ConfigError` naming the first bad key. A stored input is checked like a step's: it exists,
is of a stage type the slot takes, its files verify, and the stage's own checks
(``check_upstream``) see it as a step with the config and inputs its manifest records; the
reading step's key depends on its key exactly as on a step's, so a pipeline that names a
stored artifact shares keys (and cached results) with one that recomputes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, from_dict, key_dict
from pipeline.stage import load as load_stage
from pipeline.store import Artifact, Store, StoreError, artifact_key, check_in_process

STEP_KEYS = ("stage", "inputs", "resources", "max_retries")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``1e-3`` is a number as in YAML 1.2 (1.1 wants ``1.0e-3``),
    and a key given twice in one mapping (two steps of one name) is an error, not the last
    one silently winning."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str | int | float | bool) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


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
        for name, amount in self.custom.items():
            if name in ("CPU", "GPU", "memory"):
                raise ConfigError(
                    f"custom: {name}: use num_cpus, num_gpus or memory_gb for it, not custom"
                )
            if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
                raise ConfigError(f"custom: {name}: expected an amount >= 0, got {amount!r}")


@dataclass(frozen=True)
class _Top:
    name: str
    steps: dict[str, Any]
    store: str = "artifacts"
    runs_dir: str = "runs"
    ray: RayOptions = field(default_factory=RayOptions)
    tracking: Literal["none", "tensorboard"] = "none"


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
    artifact: Artifact | None = None  # a stored input seen as a step: its committed artifact

    def refs(self) -> list[str]:
        """Every input: step names and stored references (``stage/key``)."""
        names = []
        for ref in self.inputs.values():
            names.extend(ref if isinstance(ref, list) else [ref])
        return names

    def deps(self) -> list[str]:
        """The steps of the pipeline this step waits for (stored inputs are there already)."""
        return [r for r in self.refs() if not is_stored(r)]


def is_stored(ref: str) -> bool:
    """Whether an input names a stored artifact (``stage/key``) rather than a step."""
    return "/" in ref


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline: steps in dependency order, each with its artifact key."""

    name: str
    store: str
    runs_dir: str
    ray: RayOptions
    steps: dict[str, Step]
    raw: dict
    tracking: str = "none"


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
    raw = read_yaml(path, "pipeline file", "name and steps")
    for item in overrides:
        apply_override(raw, item)
    if store is not None:
        raw["store"] = store
    return parse_pipeline(raw)


def read_yaml(path: str | Path, what: str, holds: str) -> dict:
    """The mapping in a YAML file; `ConfigError` naming the file when it is missing, unreadable,
    not YAML or not a mapping (of `holds`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        if mark is not None and problem:
            raise ConfigError(f"{path}:{mark.line + 1}: not valid YAML: {problem}") from None
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with {holds}")
    return raw


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
    set_option(raw, dotted.strip(), value, f"--set {dotted}")


def set_option(raw: dict, dotted: str, value: Any, where: str) -> None:
    """Sets the dotted option ``a.b.c`` of a raw mapping in place (mappings made as needed)."""
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_pipeline(raw: dict, verify_stored: bool = True) -> Pipeline:
    """Validates a raw pipeline mapping (see `load_pipeline`); `verify_stored`: check every
    file of the stored inputs (off where this process's caller has just done so)."""
    top = from_dict(_Top, raw, "")
    if not isinstance(top.name, str) or not _NAME.match(top.name):  # it names run directories
        raise ConfigError(
            f"name: {top.name!r}: a pipeline name starts with a letter and uses letters, "
            "digits, _ or -"
        )
    if not isinstance(top.steps, dict) or not top.steps:
        raise ConfigError("steps: must be a non-empty mapping of step name -> step")
    steps = {name: _parse_step(name, body) for name, body in top.steps.items()}
    order = _topological_order(steps)
    stored = _StoredSteps(top.store, verify_stored)
    steps = {name: _resolve_stored(step, stored) for name, step in steps.items()}
    keyed: dict[str, Step] = _Graph(stored)
    for name in order:
        _check_wiring(steps[name], keyed)
        keyed[name] = _with_key(steps[name], keyed)
    for name in order:
        _check_upstream(keyed[name], keyed)
        _check_store(keyed[name], top.store)
    return Pipeline(top.name, top.store, top.runs_dir, top.ray, dict(keyed), raw, top.tracking)


class _StoredSteps:
    """Committed artifacts of the pipeline's store seen as steps (`Step.artifact` set), opened on
    first use: the stored inputs a pipeline names and, for the stages' checks, their own inputs."""

    def __init__(self, store: str, verify: bool = True):
        self.uri, self.verify = store, verify
        self._store: Store | None = None
        self._steps: dict[str, Step] = {}
        self._found: dict[str, str] = {}  # reference as written -> full stage/key

    def find(self, ref: str) -> str:
        """The full ``stage/key`` of a stored reference (stage and unique key prefix)."""
        if ref in self._found:
            return self._found[ref]
        stage, prefix = ref.split("/", 1)
        if not stage or not prefix or "/" in prefix:
            raise ConfigError(
                f"{ref}: expected a step name or a stored artifact as STAGE/KEY (twostage ls)"
            )
        try:
            artifact = self._opened().find(ref)
        except StoreError as e:
            raise ConfigError(f"{ref}: {e}") from None
        name = f"{artifact.stage}/{artifact.key}"
        if name not in self._steps:
            self._steps[name] = self._as_step(artifact, verify=self.verify)
        self._found[ref] = name
        return name

    def get(self, name: str) -> Step:
        if name not in self._steps:  # an input of a stored artifact (checks read its config)
            stage, key = name.split("/", 1)
            try:
                artifact = self._opened().get(stage, key)
            except StoreError as e:
                raise ConfigError(f"{name}: {e}") from None
            if artifact is None:
                raise ConfigError(f"{name}: not in {self.uri} (an input of a stored artifact)")
            self._steps[name] = self._as_step(artifact, verify=False)
        return self._steps[name]

    def _opened(self) -> Store:
        if self._store is None:
            self._store = Store(self.uri)
            if not self._store.exists():
                raise ConfigError(
                    f"store: {self.uri} does not exist (stored inputs name its artifacts)"
                )
        return self._store

    def _as_step(self, artifact: Artifact, verify: bool) -> Step:
        name = f"{artifact.stage}/{artifact.key}"
        if verify:
            problems = artifact.verify()
            if problems:
                raise ConfigError(
                    f"{name[: len(artifact.stage) + 13]}: does not verify: {problems[0]}"
                )
        try:
            module = load_stage(artifact.stage)
            config = from_dict(module.Config, artifact.config, name)
        except (ImportError, ConfigError) as e:
            raise ConfigError(f"{name}: its recorded config cannot be read here ({e})") from None
        stages = artifact.manifest.get("input_stages", {})
        inputs = {}
        for slot, keys in artifact.manifest.get("inputs", {}).items():
            kinds = stages.get(slot)
            if isinstance(keys, list):
                kinds = kinds if isinstance(kinds, list) else [kinds] * len(keys)
                inputs[slot] = [f"{k}/{key}" for k, key in zip(kinds, keys, strict=True)]
            else:
                inputs[slot] = f"{kinds}/{keys}"
        return Step(
            name, artifact.stage, module, config, inputs, Resources(), 0, artifact.key, artifact
        )


class _Graph(dict):
    """The keyed steps of a pipeline, which also answers ``stage/key`` names with stored
    artifacts seen as steps, so the stages' checks walk stored inputs as they walk steps."""

    def __init__(self, stored: _StoredSteps):
        super().__init__()
        self.stored = stored

    def __missing__(self, name: str) -> Step:
        if is_stored(name):
            return self.stored.get(name)
        raise KeyError(name)


def _resolve_stored(step: Step, stored: _StoredSteps) -> Step:
    """`step` with each stored input named by its full ``stage/key``."""
    inputs = {}
    for slot, ref in step.inputs.items():
        where = f"steps.{step.name}.inputs.{slot}"
        try:
            if isinstance(ref, list):
                inputs[slot] = [stored.find(r) if is_stored(r) else r for r in ref]
            else:
                inputs[slot] = stored.find(ref) if is_stored(ref) else ref
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    return replace(step, inputs=inputs)


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
            raise ConfigError(
                f"{where}.inputs.{slot}: expected a step name, a stored STAGE/KEY or a list of them"
            )
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
                what = (
                    f"stored artifact {name[: len(other.stage) + 13]}"
                    if is_stored(name)
                    else f"step {name!r}"
                )
                raise ConfigError(
                    f"{where}.{slot}: {what} is of stage {other.stage}, "
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
                if name not in steps and not is_stored(name):
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
    return replace(step, key=key)


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

    def pair(ref: str) -> tuple[str, str]:
        if is_stored(ref):
            stage, key = ref.split("/", 1)
            return stage, key
        return pipeline.steps[ref].stage, pipeline.steps[ref].key

    return {
        slot: [pair(r) for r in ref] if isinstance(ref, list) else pair(ref)
        for slot, ref in step.inputs.items()
    }
