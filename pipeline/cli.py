"""The ``twostage`` command line.

    twostage run CONFIG [--set a.b=v ...] [--store URI] [--json] [-q | -v]
    twostage tune SWEEP [--set a.b=v ...] [--store URI] [--json] [-q | -v]
    twostage ls [STAGE] [--metrics] [--input STAGE/KEY] [--json] [--store URI]
    twostage compare KEY... [--json] [--store URI]
    twostage show KEY [--store URI]
    twostage verify KEY... | --all [--store URI]
    twostage stages [STAGE]

Exit status: 0 success, 1 a stage failed or an artifact is corrupt, 2 a bad config or argument,
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from pipeline.config import ConfigError
from pipeline.store import Store, StoreError

DEFAULT_STORE = "artifacts"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"twostage: config error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"twostage: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a runs directory that cannot be written, a full disk, ...
        print(f"twostage: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "twostage: interrupted; committed artifacts and checkpoints are kept, rerun to go on",
            file=sys.stderr,
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twostage", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline file (finished stages are reused)")
    run.add_argument("config", help="pipeline YAML file")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. steps.data.image_size=32 (repeatable)",
    )
    run.add_argument("--store", help="artifact store path or URI (overrides the file's store)")
    run.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    loud = run.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="print each step's outcome only")
    loud.add_argument("-v", "--verbose", action="store_true", help="print debug lines too")
    run.set_defaults(func=_cmd_run)

    tune = sub.add_parser(
        "tune", help="run a sweep file on Ray Tune (a rerun resumes it); commit the best trials"
    )
    tune.add_argument("config", help="sweep YAML file")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    tune.add_argument("--store", help="artifact store path or URI (overrides the file's store)")
    tune.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    loud = tune.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true")
    loud.add_argument("-v", "--verbose", action="store_true")
    tune.set_defaults(func=_cmd_tune)

    store_help = f"artifact store path or URI (default: $TWOSTAGE_STORE or {DEFAULT_STORE})"
    ls = sub.add_parser("ls", help="list committed artifacts")
    ls.add_argument("stage", nargs="?", help="only this stage type")
    ls.add_argument("--store", help=store_help)
    ls.add_argument("--json", action="store_true")
    ls.add_argument(
        "--metrics",
        action="store_true",
        help="one table: the options that differ and the final figures, best first",
    )
    ls.add_argument(
        "--input", metavar="STAGE/KEY", help="only artifacts made from this input (key prefix ok)"
    )
    ls.set_defaults(func=_cmd_ls)

    compare = sub.add_parser(
        "compare", help="compare artifacts: the options that differ and the final figures"
    )
    compare.add_argument("keys", nargs="+", help="keys or unique key prefixes")
    compare.add_argument("--store", help=store_help)
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(func=_cmd_compare)

    show = sub.add_parser("show", help="print an artifact's manifest")
    show.add_argument("key", help="key or unique key prefix (stage/key also accepted)")
    show.add_argument("--store", help=store_help)
    show.set_defaults(func=_cmd_show)

    verify = sub.add_parser("verify", help="check every file of artifacts against their manifests")
    verify.add_argument("keys", nargs="*", help="keys or unique key prefixes")
    verify.add_argument("--all", action="store_true", help="verify every artifact in the store")
    verify.add_argument("--store", help=store_help)
    verify.set_defaults(func=_cmd_verify)

    gc = sub.add_parser(
        "gc", help="remove what no committed artifact or running step owns (staging, scratch)"
    )
    gc.add_argument("--dry-run", action="store_true", help="list only; remove nothing")
    gc.add_argument(
        "--older-than",
        default="7d",
        help="leave what was written more recently (7d, 12h, 30m, 90s; default 7d); the scratch "
        "of a committed key goes at any age",
    )
    gc.add_argument("--store", help=store_help)
    gc.set_defaults(func=_cmd_gc)

    stages = sub.add_parser("stages", help="print every stage's inputs and options (markdown)")
    stages.add_argument("stage", nargs="?", help="only this stage (type or module path)")
    stages.set_defaults(func=_cmd_stages)
    return parser


def _cmd_stages(args) -> int:
    from pipeline.options import render_stage, render_stages

    if args.stage is None:
        sys.stdout.write(render_stages())
        return 0
    try:
        sys.stdout.write(render_stage(args.stage))
    except ImportError as e:
        raise ConfigError(str(e)) from None
    return 0


def _store(args) -> Store:
    return Store(args.store or os.environ.get("TWOSTAGE_STORE") or DEFAULT_STORE)


def _existing_store(args) -> Store:
    """The store named by the arguments; a path with nothing there is an error, not empty."""
    store = _store(args)
    if not store.exists():
        raise StoreError(f"{store.uri}: no artifact store there (nothing at that path)")
    return store


def _cmd_run(args) -> int:
    from pipeline.runner import run_pipeline
    from pipeline.spec import load_pipeline

    pipeline = load_pipeline(args.config, args.overrides, args.store)
    return _run(args, lambda verbosity: run_pipeline(pipeline, verbosity), _print_run)


def _cmd_tune(args) -> int:
    from pipeline.tune import load_sweep, run_sweep

    sweep = load_sweep(args.config, args.overrides, args.store)
    return _run(
        args,
        lambda verbosity: run_sweep(sweep, verbosity),
        lambda result: _print_sweep(result, sweep.metric),
    )


def _run(args, work, show) -> int:
    """Runs `work(verbosity)` (a run or a sweep) as ``-q``/``-v`` and ``--json`` ask; prints its
    summary as JSON or through `show`. Exit status 0 when it succeeded, else 1."""
    from pipeline.runner import RayStartError

    verbosity = -1 if args.quiet else 1 if args.verbose else 0
    try:
        if args.json:
            with _stdout_to_stderr() as stdout:
                result = work(verbosity)
                stdout.write(json.dumps(result.summary(), indent=2, default=str) + "\n")
        else:
            result = work(verbosity)
            show(result)
    except RayStartError as e:
        print(f"twostage: {e}", file=sys.stderr)
        return 1
    return 0 if result.ok else 1


def _print_sweep(result, metric: str) -> None:
    steps = sum(t["steps"] for t in result.trials)
    print(
        f"sweep {result.run_id}: {len(result.trials)} trials, {steps} steps, "
        f"{result.seconds:.1f}s; best first by {metric}"
    )
    for t in result.trials:
        values = " ".join(f"{k}={v}" for k, v in t["values"].items())
        score = "-" if t["metric"] is None else f"{t['metric']:.4f}"
        mark = f"  committed {t['key'][:12]}" if t.get("committed") else ""
        print(f"  {t['trial']}  {t['status']:<8} {t['steps']:>6} steps  {score:>8}  {values}{mark}")
    print(f"run directory: {result.run_dir}")


def _print_run(result) -> None:
    print(f"run {result.run_id}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.1f}s")
    for s in result.steps:
        line = f"  {s.name:<16} {s.stage:<18} {s.status:<8} {s.key[:12]}  {s.seconds:7.1f}s"
        print(line + (f"  {s.error}" if s.error else ""))
    print(f"run directory: {result.run_dir}")


@contextlib.contextmanager
def _stdout_to_stderr():
    """Sends everything written to stdout (Ray's log forwarding included) to stderr.

    Yields a file object on the real stdout, so ``--json`` output stays one clean JSON object.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(saved, "w", closefd=False)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield real
    finally:
        sys.stdout.flush()
        real.flush()
        os.dup2(saved, 1)
        real.close()
        os.close(saved)


def _size(artifact) -> int:
    return sum(f["size"] for f in artifact.files.values())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _cmd_ls(args) -> int:
    unreadable: list[str] = []
    store = _existing_store(args)
    artifacts = store.list(args.stage, problems=unreadable)
    if unreadable:
        print(
            f"twostage: left out {len(unreadable)} artifact(s) with an unreadable manifest "
            "(twostage verify --all names them)",
            file=sys.stderr,
        )
    if args.input:
        source = store.find(args.input)
        artifacts = [a for a in artifacts if _made_from(a, source.key)]
    if args.metrics:
        return _print_comparison(artifacts, args.json)
    if args.json:
        rows = [
            {
                "stage": a.stage,
                "key": a.key,
                "created": a.manifest.get("created"),
                "bytes": _size(a),
                "inputs": a.manifest.get("inputs", {}),
            }
            for a in artifacts
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not artifacts:
        print("no artifacts")
        return 0
    print(f"{'STAGE':<18} {'KEY':<12}  {'CREATED':<20} {'SIZE':>9}  INPUTS")
    for a in artifacts:
        stages = a.manifest.get("input_stages", {})
        inputs = ", ".join(
            f"{slot}={','.join(_ref(s, k) for s, k in _pairs(stages.get(slot), ref))}"
            for slot, ref in sorted(a.manifest.get("inputs", {}).items())
        )
        print(
            f"{a.stage:<18} {a.key[:12]}  {a.manifest.get('created', ''):<20} "
            f"{_human(_size(a)):>9}  {inputs or '-'}"
        )
    return 0


def _pairs(stages, keys) -> list[tuple[str | None, str]]:
    keys = keys if isinstance(keys, list) else [keys]
    stages = stages if isinstance(stages, list) else [stages] * len(keys)
    return list(zip(stages, keys, strict=True))


def _ref(stage: str | None, key: str) -> str:
    return f"{stage}/{key[:12]}" if stage else key[:12]


def _made_from(artifact, key: str) -> bool:
    for ref in artifact.manifest.get("inputs", {}).values():
        if key in (ref if isinstance(ref, list) else [ref]):
            return True
    return False


def _cmd_compare(args) -> int:
    store = _existing_store(args)
    return _print_comparison([store.find(k) for k in args.keys], args.json)


def _print_comparison(artifacts: list, as_json: bool) -> int:
    from pipeline import compare

    records = compare.rows(artifacts)
    if as_json:
        ranked, score = compare.rank(records)
        print(
            json.dumps(
                {"score": score, "differing": compare.differing(records), "rows": ranked},
                indent=2,
                default=str,
            )
        )
    else:
        print(compare.table(records))
    return 0


def _cmd_show(args) -> int:
    artifact = _store(args).find(args.key)
    print(json.dumps({"uri": artifact.uri, **artifact.manifest}, indent=2))
    return 0


def _cmd_gc(args) -> int:
    from pipeline import gc

    try:
        older_than = gc.parse_duration(args.older_than)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store = _existing_store(args)
    garbage, kept = gc.find(store, older_than)
    for item in garbage:
        age = f"{item.age_s / 86400:.1f}d" if item.age_s != float("inf") else "-"
        print(f"{item.kind:8} {_human(item.bytes):>9} {age:>7}  {item.path}  ({item.why})")
    for path, why in kept:
        print(f"kept     {path}  ({why})")
    total = _human(sum(item.bytes for item in garbage))
    if args.dry_run:
        print(f"would remove {len(garbage)} item(s), {total} (--dry-run)")
        return 0
    gc.remove(store, garbage)
    print(f"removed {len(garbage)} item(s), {total}")
    return 0


def _cmd_verify(args) -> int:
    store = _existing_store(args)
    if args.all == bool(args.keys):
        print("twostage verify: give KEY... or --all", file=sys.stderr)
        return 2
    unreadable: list[str] = []
    artifacts = store.list(problems=unreadable) if args.all else [store.find(k) for k in args.keys]
    for problem in unreadable:
        print(f"CORRUPT {problem}")
    bad = len(unreadable)
    for artifact in artifacts:
        problems = artifact.verify()
        name = f"{artifact.stage}/{artifact.key[:12]}"
        if problems:
            bad += 1
            for p in problems:
                print(f"CORRUPT {name}: {p}")
        else:
            print(f"ok      {name}: {len(artifact.files)} files, {_human(_size(artifact))}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
