"""Runs a validated pipeline: cached steps are reused, the rest run as Ray tasks.

The runner is a thin layer on Ray Core (Ray Workflows is gone in Ray 2.60): every step whose
artifact is not committed yet becomes one Ray task with the resources the step asks for and
``max_retries`` for system failures (a killed worker, a lost node). Application errors are not
retried; they fail the step with its message in one line (the traceback goes to
``<step>.traceback.txt`` in the run directory), and the steps that depend on it are not run.
Independent steps run in parallel. When every step is cached Ray is not even started.

Each run writes ``<runs_dir>/<run_id>/run.json`` (config, keys, versions, timings),
``metrics.json`` and ``report.html`` (`pipeline.report`), and copies the PNG files of the run's
artifacts next to them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import cluster
from pipeline.config import to_dict
from pipeline.report import write_report
from pipeline.spec import Pipeline, Step, input_keys
from pipeline.store import Store, redact
from pipeline.tracking import ENV as tracking_env
from pipeline.tracking import Tracker

__version__ = "0.1.0"
HEARTBEAT_SECONDS = 30.0


@dataclass
class StepResult:
    name: str
    stage: str
    status: str  # ran | cached | resumed | failed
    key: str
    uri: str
    seconds: float = 0.0
    error: str | None = None
    node: str | None = None
    metrics: dict = field(default_factory=dict)
    traceback: str | None = None  # of a failed step, written to the run directory

    def summary(self) -> dict:
        out = {
            "name": self.name,
            "stage": self.stage,
            "status": self.status,
            "key": self.key,
            "seconds": round(self.seconds, 3),
            "uri": self.uri,
        }
        if self.error:
            out["error"] = self.error
        if self.node:
            out["node"] = self.node
        return out


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    steps: list[StepResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(s.status != "failed" for s in self.steps)

    @property
    def refs(self) -> dict[str, str]:
        """Step name -> its artifact as ``stage/key`` (what stored inputs and ``show`` take)."""
        return {s.name: f"{s.stage}/{s.key}" for s in self.steps}

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": "ok" if self.ok else "failed",
            "seconds": round(self.seconds, 3),
            "stages": [s.summary() for s in self.steps],
        }


# -1 quiet (step outcomes only), 0 normal (+ the steps' own progress lines), 1 verbose (+ debug)
_verbosity = 0


def _say(message: str, progress: bool = False) -> None:
    """Prints a runner line; `progress` lines (heartbeats, waits) only when not quiet."""
    if progress and _verbosity < 0:
        return
    print(f"[twostage] {message}", file=sys.stderr, flush=True)


def run_pipeline(pipeline: Pipeline, verbosity: int = 0) -> RunResult:
    """Runs every step of `pipeline` that is not cached; returns the per-step results.

    Args:
        pipeline: The validated pipeline.
        verbosity: -1 prints each step's outcome only; 0 also the steps' progress lines (from
            every Ray worker, once each); 1 also debug lines.
    """
    global _verbosity
    _verbosity = verbosity
    start = time.time()
    store = Store(pipeline.store)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{pipeline.name}-{secrets.token_hex(3)}"
    run_dir = Path(pipeline.runs_dir).expanduser().resolve() / run_id
    results: dict[str, StepResult] = {}
    todo = []
    for name, step in pipeline.steps.items():
        if store.get(step.stage, step.key) is not None:
            results[name] = StepResult(
                name, step.stage, "cached", step.key, store.uri_of(step.stage, step.key)
            )
            _say(f"{name} ({step.stage}) cached {step.key[:12]}")
        else:
            todo.append(name)
    tracking = str(run_dir / "tensorboard") if pipeline.tracking == "tensorboard" else None
    if todo:
        results.update(_run_on_ray(pipeline, store, todo, results, tracking))
    ordered = [results[name] for name in pipeline.steps]
    result = RunResult(run_id, run_dir, ordered, time.time() - start)
    metrics = _write_run_dir(pipeline, store, result)
    if tracking:
        _track_run(pipeline, result, metrics, tracking)
    return result


# Ray Train gives up on starting its workers after 60 s and retries with a long traceback each
# time; in a pipeline a training step often waits for another step's CPUs or GPUs (two priors
# on a small node), so let it wait quietly (6 h) unless the user set the variable.
# Ray Train's controller polls its workers every 2 s by default, and a training step waits on
# several polls as it starts and ends (4-5 s of a 25 s step on a 2-core host); polls every
# 0.5 s cost little and give that time back to every training step.
_RAY_ENV = {
    name: os.environ.get(name, default)
    for name, default in (
        ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "21600"),
        ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    )
}


class RayStartError(RuntimeError):
    """Ray could not be started or reached (the message names the address)."""


def _run_on_ray(
    pipeline: Pipeline, store: Store, todo: list[str], done: dict, tracking: str | None
) -> dict:
    import ray

    with ray_instance(pipeline.ray) as fixed:
        return _schedule(ray, pipeline, store, todo, done, fixed, tracking)


@contextlib.contextmanager
def ray_instance(options):
    """Ray for a run (`pipeline.spec.RayOptions`): the instance this process is connected to,
    the one at ``options.address`` or ``$RAY_ADDRESS``, or a new local one that is shut down
    afterwards. Yields whether no node will join it (a local instance started here).

    Raises:
        RayStartError: no cluster at the address, or bad options.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    joins = options.address or os.environ.get("RAY_ADDRESS")
    env = {**_RAY_ENV, "TWOSTAGE_VERBOSITY": str(_verbosity)}
    # the dashboard serves the state API, which Ray Train uses to clean up after a dead
    # controller (without it Ray Train warns every second)
    kwargs: dict[str, Any] = {
        "include_dashboard": True,
        "logging_level": logging.INFO if _verbosity > 0 else logging.WARNING,
        "log_to_driver": _verbosity >= 0,
    }
    if options.address:
        kwargs["address"] = options.address
    elif not joins:
        # a new instance of our own: plain ray.init() would join a `ray start` cluster it
        # finds on this machine instead
        kwargs["address"] = "local"
        if options.num_cpus:
            kwargs["num_cpus"] = options.num_cpus
    if joins:
        kwargs["runtime_env"] = {"env_vars": env}
    # A local instance's workers inherit the environment of the raylet started here instead:
    # with a job runtime_env, no step or task could use the workers Ray starts with the
    # instance (one per CPU), and each would wait for a new one (a second or more on 2 cores).
    saved = {name: os.environ.get(name) for name in env}
    try:
        if not joins:
            os.environ.update(env)
        ray.init(**kwargs)
    except (ConnectionError, ValueError) as e:  # no cluster at the address, bad options
        where = kwargs.get("address") or os.environ.get("RAY_ADDRESS") or "a local instance"
        raise RayStartError(f"ray: cannot start or reach {where}: {e}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        yield not joins
    finally:
        ray.shutdown()


def _schedule(
    ray,
    pipeline: Pipeline,
    store: Store,
    todo: list[str],
    done: dict,
    fixed: bool,
    tracking: str | None,
) -> dict:
    """Submits each step once its inputs are committed; `fixed`: the Ray instance was started
    here, so no node will join it (a step asking for more than it has fails at once);
    `tracking`: the run's TensorBoard directory (each step logs into ``<it>/<step>``)."""
    execute = ray.remote(_execute_step)
    node_types = [] if fixed else cluster.node_types()
    waiting: dict[str, float] = {}  # step -> when it started waiting for a node that holds it
    results: dict[str, StepResult] = {}
    pending = list(todo)
    inflight: dict[Any, tuple[str, float]] = {}
    by_key: dict[str, str] = {}  # two steps with one key run once
    cwd = os.getcwd()

    def finished(name: str) -> StepResult | None:
        return results.get(name) or done.get(name)

    def not_run(name: str, error: str) -> None:
        step = pipeline.steps[name]
        uri = store.uri_of(step.stage, step.key)
        results[name] = StepResult(name, step.stage, "failed", step.key, uri, error=error)

    while pending or inflight:
        for name in list(pending):
            step = pipeline.steps[name]
            deps = [finished(d) for d in step.deps()]
            failed = [
                d
                for d, r in zip(step.deps(), deps, strict=True)
                if r is not None and r.status == "failed"
            ]
            if failed:
                pending.remove(name)
                not_run(name, f"not run: input step {failed[0]!r} failed")
                _say(f"{name} ({step.stage}) skipped: input {failed[0]} failed")
                continue
            if any(r is None for r in deps) or step.key in by_key:
                continue
            options = _task_options(step)
            unplaceable = _unplaceable(
                step, options, fixed, node_types, waiting, pipeline.ray.infeasible_timeout_s
            )
            if unplaceable == "wait":
                continue
            pending.remove(name)
            if unplaceable:
                not_run(name, unplaceable)
                _say(f"{name} ({step.stage}) FAILED: {unplaceable}")
                continue
            by_key[step.key] = name
            ref = execute.options(**options).remote(
                name,
                step.stage,
                to_dict(step.config),
                input_keys(step, pipeline),
                store.spec,
                step.key,
                cwd,
                f"{tracking}/{name}" if tracking else None,
            )
            inflight[ref] = (name, time.time())
            _say(f"{name} ({step.stage}) started {step.key[:12]}")
        if not inflight:
            if pending:  # steps wait for a node that can hold them
                time.sleep(1.0)
            continue
        wait = HEARTBEAT_SECONDS if not waiting else min(HEARTBEAT_SECONDS, 5.0)
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=wait)
        if not ready:
            running = ", ".join(f"{n} {time.time() - t0:.0f}s" for n, t0 in inflight.values())
            _say(f"running: {running}", progress=True)
            continue
        ref = ready[0]
        name, t0 = inflight.pop(ref)
        step = pipeline.steps[name]
        uri = store.uri_of(step.stage, step.key)
        try:
            outcome = ray.get(ref)
        except Exception as e:  # worker died more often than max_retries, node lost, ...
            outcome = {"status": "failed", "error": error_line(e)}
        result = StepResult(
            name,
            step.stage,
            outcome["status"],
            step.key,
            uri,
            seconds=outcome.get("seconds", time.time() - t0),
            error=outcome.get("error"),
            node=outcome.get("node"),
            metrics=outcome.get("metrics", {}),
            traceback=outcome.get("traceback"),
        )
        results[name] = result
        del by_key[step.key]
        for other in list(pending):
            if pipeline.steps[other].key == step.key and result.status != "failed":
                pending.remove(other)
                results[other] = StepResult(other, step.stage, "cached", step.key, uri)
        if result.status == "failed":
            _say(f"{name} ({step.stage}) FAILED: {result.error}")
        else:
            _say(f"{name} ({step.stage}) {result.status} in {result.seconds:.1f}s")
    return results


def _task_options(step: Step) -> dict:
    res = step.resources
    num_cpus = res.num_cpus
    if num_cpus is None:
        num_cpus = getattr(step.module, "DEFAULT_NUM_CPUS", 1)
    options = {
        "num_cpus": num_cpus,
        "num_gpus": res.num_gpus,
        "max_retries": step.max_retries,
        "retry_exceptions": False,
        "name": f"twostage:{step.name}",
    }
    if res.memory_gb:
        options["memory"] = int(res.memory_gb * 2**30)
    if res.custom:
        options["resources"] = dict(res.custom)
    return options


def _unplaceable(
    step: Step,
    options: dict,
    fixed: bool,
    node_types: list[dict],
    waiting: dict[str, float],
    timeout: float,
) -> str:
    """Whether every request of a step (its task, then the workers it starts itself) fits on
    some node: ``""`` when it does, ``"wait"`` while a node that holds it may still come, else
    the one-line error to fail the step with.

    Ray waits without end for what no node can hold. So a Ray instance started here (no node
    joins it) fails such a step at once; a cluster whose autoscaler has a node type that holds
    it lets Ray wait; otherwise the step waits ``ray.infeasible_timeout_s`` for such a node to
    join (a ``ray start`` by hand), then fails.
    """
    requests = [("resources: asks for {}", _task_bundle(options))]
    workers = getattr(step.module, "worker_requests", None)
    for bundle in workers(step.config) if workers else []:
        requests.append(("its workers ask for {} each", {k: v for k, v in bundle.items() if v}))
    nodes = cluster.alive_nodes()
    for what, bundle in requests:
        if any(cluster.fits(bundle, node) for node in nodes):
            continue
        need = what.format(cluster.describe(bundle))
        offer = cluster.describe_nodes(nodes)
        if fixed:
            return f"{need}, more than any node of this Ray instance has ({offer})"
        if any(cluster.type_fits(bundle, t) for t in node_types):
            _say(f"{step.name} ({step.stage}) {need}: waits for the autoscaler to add a node")
            return ""
        if step.name not in waiting:
            waiting[step.name] = time.time()
            _say(
                f"{step.name} ({step.stage}) {need}, more than any node has ({offer}); waits "
                f"up to {timeout:g} s for a node that can (ray.infeasible_timeout_s)"
            )
        if time.time() - waiting[step.name] > timeout:
            return (
                f"{need}, more than any node has ({offer}), and no node that can "
                f"joined within ray.infeasible_timeout_s ({timeout:g} s)"
            )
        return "wait"
    waiting.pop(step.name, None)
    return ""


def _task_bundle(options: dict) -> dict[str, float]:
    """The resources a step's task asks for, by Ray's resource names."""
    bundle = {
        "CPU": options["num_cpus"],
        "GPU": options["num_gpus"],
        **options.get("resources", {}),
    }
    if options.get("memory"):
        bundle["memory"] = options["memory"]
    return {k: v for k, v in bundle.items() if v}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.+)")


_FULL_DISK = (
    " (the disk is full: free space and rerun; the step goes on from its last checkpoint, "
    "or for ingest from the parts it finished)"
)


def error_line(e: BaseException) -> str:
    """``Type: message`` in one line. For an error raised inside Ray (a Ray Data function, a
    remote task) it is the first exception line of the remote traceback Ray puts in the text:
    the error the user's input caused, not Ray's wrapper around it. A full disk says what to
    do about it."""
    text = _ANSI.sub("", str(e)).strip()
    line = None
    if type(e).__module__.startswith("ray"):
        for candidate in text.splitlines():
            match = _EXCEPTION_LINE.fullmatch(candidate.strip())
            if match and not candidate.strip().startswith("ray."):
                line = f"{match.group(1)}: {match.group(2)}"
                break
    if line is None:
        lines = [line for line in text.splitlines() if line.strip()]
        line = f"{type(e).__name__}: {lines[-1].strip() if lines else repr(e)}"
    if f"[Errno {errno.ENOSPC}]" in line:
        line += _FULL_DISK
    return line


def _execute_step(
    name: str,
    stage: str,
    config: dict,
    inputs: dict,
    store_uri: str,
    key: str,
    cwd: str,
    tracking: str | None = None,
) -> dict:
    """Runs one step inside a Ray worker: open inputs, run the stage, commit its output.
    `tracking`: the step's TensorBoard directory (`pipeline.tracking`), or None."""
    from pipeline.config import from_dict
    from pipeline.stage import load

    level = logging.DEBUG if os.environ.get("TWOSTAGE_VERBOSITY") == "1" else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative data paths mean the same as on the driver (same machine)
    node = _node_id()
    start = time.time()
    os.environ.pop(tracking_env, None)  # a worker process runs many steps
    if tracking:
        os.environ[tracking_env] = tracking
    try:
        store = Store(store_uri)
        if store.get(stage, key) is not None:  # another run committed it meanwhile
            return {"status": "cached", "seconds": time.time() - start, "node": node}
        module = load(stage)
        typed = from_dict(module.Config, config, f"steps.{name}")
        opened = {
            slot: [store.open(*ref) for ref in refs]
            if isinstance(refs, list)
            else store.open(*refs)
            for slot, refs in inputs.items()
        }
        scratch = store.scratch_uri(stage, key)
        # the lock tells `twostage gc` that this key's staging and scratch are in use
        with store.step_lock(stage, key), store.staging(stage, key) as out:
            metrics = module.run(typed, opened, out, scratch) or {}
            seconds = time.time() - start
            # a training stage's checkpoint, or an image folder's stored parts (ingest)
            resumed = metrics.get("resumed_from_step") or metrics.get("resumed_parts")
            status = "resumed" if resumed else "ran"
            manifest = {
                "config": config,
                "inputs": {
                    slot: ([r[1] for r in refs] if isinstance(refs, list) else refs[1])
                    for slot, refs in inputs.items()
                },
                "input_stages": {
                    slot: ([r[0] for r in refs] if isinstance(refs, list) else refs[0])
                    for slot, refs in inputs.items()
                },
                "metrics": metrics,
                "seconds": round(seconds, 3),
                "versions": _versions(module),
                "host": socket.gethostname(),
                "node": node,
            }
            store.commit(stage, key, out, manifest)
        store.remove_scratch(stage, key)
        return {"status": status, "seconds": seconds, "node": node, "metrics": metrics}
    except Exception as e:  # one line for the user; the traceback goes to the run directory
        return {
            "status": "failed",
            "error": error_line(e),
            "traceback": traceback.format_exc(),
            "seconds": time.time() - start,
            "node": node,
        }
    finally:
        os.environ.pop(tracking_env, None)


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _versions(module=None) -> dict:
    versions = {"twostage": __version__, "python": platform.python_version()}
    if module is not None:
        versions["stage"] = module.VERSION
    for name in ("ray", "torch", "pyarrow", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            versions[name] = getattr(mod, "__version__", "?")
    return versions


def _track_run(pipeline: Pipeline, result: RunResult, metrics: dict, logdir: str) -> None:
    """The run's results in TensorBoard: every step's final figures, the file and the keys."""
    tracker = Tracker(f"{logdir}/_run")
    for name, values in metrics.items():  # final figures: a flat dict, or under "final"
        tracker.scalars(name, values.get("final", values) if isinstance(values, dict) else {})
    keys = "\n".join(f"| {s.name} | {s.stage} | {s.status} | {s.key} |" for s in result.steps)
    tracker.text("artifacts", f"| step | stage | status | key |\n|---|---|---|---|\n{keys}")
    shown = {**pipeline.raw, "store": redact(pipeline.store)}  # no credentials of its URI
    config = yaml.safe_dump(shown, sort_keys=False)
    tracker.text("pipeline", "\n".join("    " + line for line in config.splitlines()))
    tracker.close()


def _write_run_dir(pipeline: Pipeline, store: Store, result: RunResult) -> dict:
    """Writes ``run.json``, ``metrics.json``, the pictures and ``report.html``; returns the
    metrics of every step with an artifact."""
    run_dir = result.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics, histories, images, copied = {}, {}, {}, set()
    for step_result in result.steps:
        if step_result.status == "failed":
            if step_result.traceback:
                path = run_dir / f"{step_result.name}.traceback.txt"
                path.write_text(step_result.traceback)
                _say(f"{step_result.name} ({step_result.stage}): traceback in {path}")
            continue
        artifact = store.get(step_result.stage, step_result.key)
        if artifact is None:
            continue
        metrics[step_result.name] = artifact.metrics
        for name in sorted(artifact.files):
            if not name.endswith(".png") or "/" in name:
                continue
            target = name if name not in copied else f"{step_result.name}_{name}"
            copied.add(name)
            shutil.copyfile(artifact.local_path(name), run_dir / target)
            images.setdefault(step_result.name, []).append(run_dir / target)
        if "metrics.json" in artifact.files:
            try:
                history = json.loads(artifact.read_bytes("metrics.json")).get("history")
            except (ValueError, AttributeError):
                history = None
            if isinstance(history, list) and history:
                histories[step_result.name] = history
    record = {
        "run_id": result.run_id,
        "pipeline": pipeline.name,
        "store": store.uri,
        "status": "ok" if result.ok else "failed",
        "seconds": round(result.seconds, 3),
        "config": {**pipeline.raw, "store": redact(pipeline.store)},  # no credentials
        "steps": {
            s.name: {
                **s.summary(),
                "config": to_dict(pipeline.steps[s.name].config),
                "inputs": pipeline.steps[s.name].inputs,
            }
            for s in result.steps
        },
        "versions": _versions(),
        "host": socket.gethostname(),
    }
    (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_report(run_dir / "report.html", record, metrics, histories, images)
    return metrics
