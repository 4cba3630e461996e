"""Sweeps on Ray Tune: one training step over a search space, with early stopping, and the best
trials committed as ordinary artifacts.

A sweep file (``twostage tune SWEEP.yaml``)::

    name: prior_tune
    store: artifacts
    ray: {address: null}
    sweep:
      step:                      # one step, as in a pipeline file; inputs name stored artifacts
        stage: train_prior
        inputs: {codes: encode/c348a29bfc3a}
        level: top
        train: {steps: 600, checkpoint_every: 50, cpus_per_worker: 1}
      space:                     # dotted option -> {grid | choice: [...]} or {uniform | loguniform: [lo, hi]}
        model.layers: {grid: [2, 4]}
        train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      scheduler: {kind: asha, grace_steps: 100, reduction_factor: 3}
      top_k: 2

Each trial is the step with the trial's values set, so its key is the key of that plain step.
It trains in its Tune trial's own process (``train.workers: 0``, ``train.cpus_per_worker``
threads; with ``train.device: cuda`` the trial asks Ray for a GPU) with its checkpoints in
the step's own scratch location, and reports the figures of each checkpoint to Tune. ASHA
(``scheduler.kind: asha``) stops the trials that trail at each rung of steps; ``none`` runs
every trial to ``train.steps``. At most ``max_concurrent_trials`` run at once (default: the
cluster's CPUs over ``train.cpus_per_worker``).

Rerunning a sweep file after an interruption restores the Tune experiment (its state lives in
``<runs_dir>/tune/<name>-<digest of the sweep>``): finished trials are kept, unfinished ones
start again and resume from their last checkpoint. (ASHA's rungs start empty after a restore:
a trial that was running goes on past its next rung unchallenged; later trials are judged
against the ones that report after the restore.) When the trials are done, the runner
commits the `top_k` trials that trained every step, best first by ``metric`` (default: the
stage's ``SCORE``): it runs their plain steps, which find the finished checkpoints and store
them, so a later pipeline naming one of those configurations finds it ``cached``. The sweep's
``runs/<run_id>/`` holds ``sweep.json`` (every trial: values, steps trained, figures, curve,
committed key) and ``report.html`` (the trials ranked, their curves).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import tracking
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.spec import (
    RayOptions,
    Step,
    apply_override,
    is_stored,
    parse_pipeline,
    read_yaml,
    set_option,
)
from pipeline.store import Store, redact

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
GRID = "grid_point"  # Tune's name for a trial's point of the grid


@dataclass(frozen=True)
class SchedulerOptions:
    """Early stopping.

    Args:
        kind: ``asha`` (asynchronous successive halving on the metric) or ``none``.
        grace_steps: Steps every trial trains before ASHA may stop it (None: the step's
            ``train.checkpoint_every``, its first report).
        reduction_factor: ASHA keeps the best 1/reduction_factor of the trials at each rung.
    """

    kind: Literal["asha", "none"] = "asha"
    grace_steps: int | None = None
    reduction_factor: float = 3.0

    def __post_init__(self):
        if self.grace_steps is not None and self.grace_steps < 1:
            raise ConfigError(f"grace_steps: must be positive, got {self.grace_steps}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class SweepOptions:
    """What to search.

    Args:
        step: The step to sweep, as in a pipeline file; its inputs name stored artifacts.
        space: Dotted option -> ``{grid: [...]}`` (every value), ``{choice: [...]}`` (one drawn
            per sample), ``{uniform: [lo, hi]}`` or ``{loguniform: [lo, hi]}``. Two draws of
            one point are one step: they share its checkpoints (keep choices wider than samples).
        metric: The figure that ranks the trials (None: the stage's ``SCORE``).
        mode: ``min`` or ``max`` (None: the stage's).
        scheduler: Early stopping.
        samples: Draws of the options that are drawn (choice, uniform, loguniform), for each
            point of the grid.
        seed: Seed of the order the grid's points run in.
        max_concurrent_trials: Trials at once (None: as many as the cluster's CPUs hold).
        top_k: The best trials that trained every step, committed as artifacts.
    """

    step: dict[str, Any]
    space: dict[str, dict[str, Any]]
    metric: str | None = None
    mode: Literal["min", "max"] | None = None
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    samples: int = 1
    seed: int = 0
    max_concurrent_trials: int | None = None
    top_k: int = 1

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"samples: must be positive, got {self.samples}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: cannot be negative, got {self.top_k}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(
                f"max_concurrent_trials: must be positive, got {self.max_concurrent_trials}"
            )


@dataclass(frozen=True)
class _SweepFile:
    name: str
    sweep: SweepOptions
    store: str = "artifacts"
    runs_dir: str = "runs"
    ray: RayOptions = field(default_factory=RayOptions)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the file, the stage's module and the ranking."""

    name: str
    store: str
    runs_dir: str
    ray: RayOptions
    options: SweepOptions
    base: Step  # the step at the first value of every option (validated)
    metric: str
    mode: str
    raw: dict


def load_sweep(path: str | Path, overrides: list[str] = (), store: str | None = None) -> Sweep:
    """Reads, overrides and validates a sweep file; `ConfigError` names the first problem."""
    raw = read_yaml(path, "sweep file", "name and sweep (step, space)")
    if "sweep" not in raw:
        raise ConfigError(f"{path}: expected a mapping with name and sweep (step, space)")
    for item in overrides:
        apply_override(raw, item)
    if store is not None:
        raw["store"] = store
    return parse_sweep(raw)


def parse_sweep(raw: dict) -> Sweep:
    """Validates a raw sweep mapping (see `load_sweep`)."""
    top = from_dict(_SweepFile, raw, "")
    options = top.sweep
    body = dict(options.step)
    for slot, ref in (body.get("inputs") or {}).items():
        for r in ref if isinstance(ref, list) else [ref]:
            if not isinstance(r, str) or not is_stored(r):
                raise ConfigError(
                    f"sweep.step.inputs.{slot}: {r!r}: a sweep runs one step; name stored "
                    "artifacts as STAGE/KEY (twostage ls)"
                )
    train = body.get("train") or {}
    if train.get("workers", 0) != 0:
        raise ConfigError(
            "sweep.step.train.workers: trials train in their own process (workers: 0); give "
            "each trial CPUs with train.cpus_per_worker and a GPU with train.device: cuda"
        )
    body["train"] = {**train, "workers": 0}
    if not options.space:
        raise ConfigError("sweep.space: name at least one option to search")
    for name, spec in options.space.items():
        _check_space(name, spec)
    if options.samples > 1 and all("grid" in spec for spec in options.space.values()):
        raise ConfigError(
            "sweep.samples: every option is a grid, so each sample would train the same steps "
            "again; search train.seed too (e.g. train.seed: {grid: [0, 1]}) or set samples: 1"
        )
    points = [_first(spec) for spec in options.space.values()]
    base = _trial_step(top, body, dict(zip(options.space, points, strict=True)), "sweep.step")
    if not hasattr(getattr(base.config, "train", None), "checkpoint_every"):
        raise ConfigError(f"sweep.step.stage: {base.stage} is not a training stage")
    for name, spec in options.space.items():  # every listed value on its own, before any work
        for value in spec.get("grid", spec.get("choice", [])):
            _trial_step(top, body, {name: value}, f"sweep.space.{name}: {value!r}")
    score = getattr(base.module, "SCORE", None)
    metric = options.metric or (score[0] if score else None)
    mode = options.mode or (score[1] if score and score[0] == metric else None)
    if metric is None or mode is None:
        raise ConfigError(f"sweep.metric, sweep.mode: {base.stage} has no SCORE; name them")
    train_config = base.config.train
    grace = options.scheduler.grace_steps or train_config.checkpoint_every
    if options.scheduler.kind == "asha" and grace > train_config.steps:
        raise ConfigError(
            f"sweep.scheduler.grace_steps: {grace} is more than train.steps {train_config.steps}"
        )
    return Sweep(
        top.name,
        top.store,
        top.runs_dir,
        top.ray,
        SweepOptions(**{**options.__dict__, "step": body}),
        base,
        metric,
        mode,
        raw,
    )


def _check_space(name: str, spec: Any) -> None:
    where = f"sweep.space.{name}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise ConfigError(
            f"{where}: expected one of {', '.join(f'{{{k}: ...}}' for k in SPACE_KINDS)}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list")
    if kind in ("uniform", "loguniform"):
        ok = len(values) == 2 and all(isinstance(v, int | float) for v in values)
        if not ok or values[0] >= values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError(
                f"{where}.{kind}: expected [low, high] with 0 {'<' if kind == 'loguniform' else '<='} low < high"
            )


def _first(spec: dict) -> Any:
    kind, values = next(iter(spec.items()))
    return values[0]


def _with_values(body: dict, values: dict) -> dict:
    """The step body with each dotted option of `values` set."""
    out = json.loads(json.dumps(body))
    for dotted, value in values.items():
        set_option(out, dotted, value, f"sweep.space.{dotted}")
    return out


def _trial_step(top, body: dict, values: dict, where: str, verify: bool = True) -> Step:
    """The plain step a trial with `values` is (validated and keyed)."""
    raw = {"name": top.name, "store": top.store, "steps": {"trial": _with_values(body, values)}}
    try:
        return parse_pipeline(raw, verify_stored=verify).steps["trial"]
    except ConfigError as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('steps.trial.')}") from None


# ----- running -------------------------------------------------------------------------------


@dataclass
class SweepResult:
    run_id: str
    run_dir: Path
    trials: list[dict]
    committed: list[dict]
    seconds: float

    @property
    def ok(self) -> bool:
        return any(t["status"] != "failed" for t in self.trials)

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": "ok" if self.ok else "failed",
            "seconds": round(self.seconds, 3),
            "trials": self.trials,
            "committed": self.committed,
        }


def run_sweep(sweep: Sweep, verbosity: int = 0) -> SweepResult:
    """Runs (or, after an interruption, resumes) the sweep's Tune experiment, commits the
    `top_k` finished trials and writes ``sweep.json`` and ``report.html``."""
    from pipeline import runner

    start = time.time()
    store = Store(sweep.store)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{sweep.name}-{secrets.token_hex(3)}"
    run_dir = Path(sweep.runs_dir).expanduser().resolve() / run_id
    experiments = Path(sweep.runs_dir).expanduser().resolve() / "tune"
    with runner.ray_instance(sweep.ray):
        grid = _fit(sweep, store, experiments, verbosity)
        trials = _trials(sweep, grid)
        committed = _commit_best(sweep, trials, verbosity)
    result = SweepResult(run_id, run_dir, trials, committed, time.time() - start)
    _write(sweep, store, result)
    return result


def experiment_name(sweep: Sweep) -> str:
    """The Tune experiment's directory name: the sweep's name and a digest of what it
    searches, so an edited sweep starts afresh and an unchanged one resumes."""
    what = {
        k: sweep.raw["sweep"].get(k)
        for k in ("step", "space", "scheduler", "samples", "seed", "metric", "mode")
    }
    what["store"] = Store(sweep.store).spec
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return f"{sweep.name}-{digest[:10]}"


def _fit(sweep: Sweep, store: Store, experiments: Path, verbosity: int):
    import ray
    from ray import tune

    options, train = sweep.options, sweep.base.config.train
    # A trial reserves next to no CPU (Tune refuses none), like a pipeline step that trains in
    # process: the Ray Data tasks that read its data need the CPUs, and a trial holding them
    # would wait on its own reads. max_concurrent_trials keeps the trials to what the CPUs hold.
    trial_cpus = train.cpus_per_worker or 1
    resources = {"CPU": 0.01, "GPU": 1 if train.device == "cuda" else 0}
    concurrent = options.max_concurrent_trials or max(
        1, int(ray.cluster_resources().get("CPU", 1) // trial_cpus)
    )
    spec = {
        "name": sweep.name,
        "store": store.spec,
        "body": options.step,
        "cwd": os.getcwd(),
        "tracking": None,
    }
    trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec), resources)
    # the experiment's state (which trials finished, ASHA's rungs) on disk every few seconds:
    # an interrupted sweep loses little of it (Tune's default waits longer on long sweeps)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    path = experiments / experiment_name(sweep)
    if tune.Tuner.can_restore(str(path)):
        print(f"[twostage] sweep {sweep.name}: resuming {path}", flush=True)
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        scheduler = None
        if options.scheduler.kind == "asha":
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="step",
                max_t=train.steps,
                grace_period=options.scheduler.grace_steps or train.checkpoint_every,
                reduction_factor=options.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(options),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                scheduler=scheduler,
                num_samples=options.samples,
                max_concurrent_trials=concurrent,
                # a trial is a plain function: the next one reuses its process (torch and
                # transformers imported once per process, not per trial)
                reuse_actors=True,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=path.name,
                storage_path=str(experiments),
                failure_config=tune.FailureConfig(max_failures=2),
                verbose=1 if verbosity >= 0 else 0,
            ),
        )
    return tuner.fit()


def _param_space(options: SweepOptions) -> dict:
    """Tune's search space: the grid's points as one grid search (``GRID``), in a seeded
    random order, and each drawn option on its own. Early stopping judges each trial against
    those that reported before it, so the order matters: a grid written in ascending order
    (learning rates, widths) would start with the weakest trials and let every later one
    through."""
    from ray import tune

    grid = {k: v["grid"] for k, v in options.space.items() if "grid" in v}
    space = {k: _domain(v) for k, v in options.space.items() if "grid" not in v}
    if grid:
        points = [dict(zip(grid, p, strict=True)) for p in itertools.product(*grid.values())]
        random.Random(options.seed).shuffle(points)
        space[GRID] = tune.grid_search(points)
    return space


def _values(config: dict) -> dict:
    """A trial's option values from its Tune config (`_param_space`)."""
    return {**{k: v for k, v in config.items() if k != GRID}, **config.get(GRID, {})}


def _domain(spec: dict):
    from ray import tune

    kind, values = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(values)
    if kind == "uniform":
        return tune.uniform(*values)
    return tune.loguniform(*values)


def _trial(config: dict, spec: dict) -> None:
    """One trial (Tune's function trainable): the plain step with the trial's values, trained
    in this process, each checkpoint's figures reported to Tune."""
    from pipeline.stage import load

    values = _values(config)
    os.chdir(spec["cwd"])  # relative data paths mean what they mean to the driver
    top = _SweepFile(spec["name"], SweepOptions(step={}, space={}), store=spec["store"])
    step = _trial_step(top, spec["body"], values, "trial", verify=False)
    store = Store(spec["store"])
    opened = {}
    for slot, ref in step.inputs.items():
        refs = ref if isinstance(ref, list) else [ref]
        artifacts = [store.open(*r.split("/", 1)) for r in refs]
        opened[slot] = artifacts if isinstance(ref, list) else artifacts[0]
    tracking.reporter = _TuneReporter(step.key)
    try:
        with tempfile.TemporaryDirectory(prefix="twostage-trial-") as out:
            load(step.stage).run(
                step.config, opened, Path(out), store.scratch_uri(step.stage, step.key)
            )
    finally:
        tracking.reporter = None


class _TuneReporter:
    """What the training skeleton's tracker hook calls in a trial: each checkpoint's figures
    (and its step, ASHA's clock) go to Tune."""

    last_step = 0

    def __init__(self, key: str):
        self.key = key

    def rows(self, history: list[dict], metrics: dict | None = None) -> None:
        from ray import tune

        if not metrics:
            return
        figures = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        curve = [r for r in history if r.get("step", 0) > self.last_step]
        self.last_step = int(metrics["step"])
        tune.report(
            {**figures, "step": int(metrics["step"]), "key": self.key, "rows": json.dumps(curve)}
        )

    def close(self) -> None:
        pass


def _trials(sweep: Sweep, grid) -> list[dict]:
    """Every trial of the result grid: values, status, steps trained, figures, curve."""
    steps = sweep.base.config.train.steps
    top = _SweepFile(sweep.name, sweep.options, store=sweep.store)
    trials = []
    for index, result in enumerate(grid):
        values = {k: v for k, v in _values(result.config or {}).items() if k in sweep.options.space}
        frame = result.metrics_dataframe
        reports = [] if frame is None else frame.to_dict("records")
        last = dict(result.metrics or {})
        trained = int(last.get("step", 0) or 0)
        key = (
            last.get("key")
            or _trial_step(top, sweep.options.step, values, "trial", verify=False).key
        )
        status = "failed" if result.error else "finished" if trained >= steps else "stopped"
        curve = []
        for report in reports:
            try:
                curve += json.loads(report.get("rows") or "[]")
            except ValueError:
                pass
        trials.append(
            {
                "trial": f"trial_{index:03d}",
                "values": values,
                "status": status,
                "steps": trained,
                "key": key,
                "metric": last.get(sweep.metric),
                "figures": {k: v for k, v in last.items() if k in _FIGURES or k == sweep.metric},
                "checkpoints": [
                    {"step": int(r["step"]), sweep.metric: r.get(sweep.metric)}
                    for r in reports
                    if "step" in r
                ],
                "curve": curve,
                "error": str(result.error).strip().splitlines()[-1] if result.error else None,
            }
        )
    sign = 1 if sweep.mode == "min" else -1

    def rank(trial: dict):
        value = trial["metric"]
        done = trial["status"] == "finished"
        usable = isinstance(value, int | float) and math.isfinite(value)
        return (not done, not usable, sign * value if usable else 0.0)

    return sorted(trials, key=rank)


_FIGURES = (
    "step",
    "val_bits_per_code",
    "val_nll",
    "train_bits_per_code",
    "tokens_per_s",
    "val_loss",
    "val_mse",
    "val_accuracy",
    "resumed_from_step",
)


def _commit_best(sweep: Sweep, trials: list[dict], verbosity: int) -> list[dict]:
    """Stores the `top_k` finished trials as the artifacts of their plain steps."""
    from pipeline.runner import run_pipeline

    best = [t for t in trials if t["status"] == "finished" and t["metric"] is not None]
    best = best[: sweep.options.top_k]
    if not best:
        return []
    steps = {t["trial"]: _with_values(sweep.options.step, t["values"]) for t in best}
    raw = {
        "name": sweep.name,
        "store": sweep.store,
        "runs_dir": sweep.runs_dir,
        "ray": to_dict(sweep.ray),
        "steps": steps,
    }
    result = run_pipeline(parse_pipeline(raw), verbosity)
    out = []
    for step in result.steps:
        trial = next(t for t in best if t["trial"] == step.name)
        trial["committed"] = step.status != "failed"
        out.append(
            {
                "trial": step.name,
                "status": step.status,
                "key": step.key,
                "uri": step.uri,
                "error": step.error,
            }
        )
    return out


def _write(sweep: Sweep, store: Store, result: SweepResult) -> None:
    from pipeline.report import write_sweep_report

    result.run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "run_id": result.run_id,
        "sweep": sweep.name,
        "experiment": experiment_name(sweep),
        "store": store.uri,
        "metric": sweep.metric,
        "mode": sweep.mode,
        "seconds": round(result.seconds, 3),
        "steps_trained": sum(t["steps"] for t in result.trials),
        "config": {**sweep.raw, "store": redact(sweep.store)},  # no credentials of its URI
        "trials": result.trials,
        "committed": result.committed,
        "host": socket.gethostname(),
    }
    (result.run_dir / "sweep.json").write_text(json.dumps(record, indent=2, default=str))
    write_sweep_report(result.run_dir / "report.html", record)


def grid_size(sweep: Sweep) -> int:
    """Trials the sweep runs: the grid's points times the samples."""
    sizes = [len(s["grid"]) for s in sweep.options.space.values() if "grid" in s]
    return math.prod(sizes) * sweep.options.samples if sizes else sweep.options.samples
