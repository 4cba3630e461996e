"""Pipeline validation: every mistake is one line naming the key, exit status 2, before any work."""

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.spec import load_pipeline, parse_pipeline
from tests.helpers import REPO, cli_env, twostage, write_yaml

GOOD = {
    "name": "t",
    "steps": {
        "data": {"stage": "ingest", "source": {"kind": "embedded"}, "image_size": 32},
        "stats": {"stage": "image_stats", "inputs": {"images": "data"}},
    },
}


def _with(path: str, value):
    import copy

    raw = copy.deepcopy(GOOD)
    node = raw
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


_DELETE = object()

BAD = [
    # (description, change, the key the message must name)
    ("unknown top-level key", ("colour", "red"), "colour: unknown key"),
    ("unknown stage key", ("steps.data.image_sise", 32), "steps.data.image_sise: unknown key"),
    (
        "unknown nested key",
        ("steps.data.source.knd", "mnist"),
        "steps.data.source.knd: unknown key",
    ),
    ("wrong type", ("steps.data.image_size", "big"), "steps.data.image_size: expected an integer"),
    ("bool for int", ("steps.data.image_size", True), "steps.data.image_size: expected an integer"),
    ("bad literal", ("steps.data.source.kind", "cifar"), "steps.data.source.kind: must be one of"),
    ("impossible value", ("steps.data.val_fraction", 1.5), "steps.data.val_fraction: must be in"),
    ("path missing", ("steps.data.source", {"kind": "mnist"}), "steps.data.source.path: required"),
    ("missing input", ("steps.stats.inputs", {}), "steps.stats.inputs.images: required input"),
    (
        "unknown input step",
        ("steps.stats.inputs", {"images": "dat"}),
        "refers to unknown step 'dat'",
    ),
    (
        "unknown input slot",
        ("steps.stats.inputs", {"images": "data", "x": "data"}),
        "steps.stats.inputs.x: unknown input",
    ),
    (
        "wrong input kind",
        ("steps.data2", {"stage": "image_stats", "inputs": {"images": "stats"}}),
        "steps.data2.inputs.images: step 'stats' is of stage image_stats, expected ingest",
    ),
    ("unknown stage", ("steps.stats.stage", "trane"), "steps.stats.stage: unknown stage 'trane'"),
    ("missing stage", ("steps.stats.stage", _DELETE), "steps.stats.stage: required key"),
    (
        "resources type",
        ("steps.stats.resources", {"num_gpus": "one"}),
        "steps.stats.resources.num_gpus: expected a number",
    ),
    ("retries", ("steps.stats.max_retries", -1), "steps.stats.max_retries"),
    (
        "negative gpus",
        ("steps.stats.resources", {"num_gpus": -1}),
        "steps.stats.resources.num_gpus: cannot be negative, got -1",
    ),
    ("ray cpus", ("ray", {"num_cpus": 0}), "ray.num_cpus: must be positive, got 0"),
    ("missing name", ("name", _DELETE), "name: required key is missing"),
]


@pytest.mark.parametrize("what,change,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(what, change, expected):
    with pytest.raises(ConfigError) as info:
        parse_pipeline(_with(*change))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_cycle_is_reported():
    raw = {
        "name": "t",
        "steps": {
            "a": {"stage": "tests.plugin_stages.sleepy", "inputs": {"after": "b"}},
            "b": {"stage": "tests.plugin_stages.sleepy", "inputs": {"after": "a"}},
        },
    }
    with pytest.raises(ConfigError, match=r"cycle (a -> b -> a|b -> a -> b)"):
        parse_pipeline(raw)


@pytest.mark.parametrize(
    "body,expected",
    [
        (
            "name: t\nsteps:\n  data: {stage: ingest, imag_size: 32}\n",
            "steps.data.imag_size: unknown key",
        ),
        (
            "name: t\nsteps:\n  data: {stage: ingest, image_size: x}\n",
            "steps.data.image_size: expected an integer",
        ),
        (
            "name: t\nsteps:\n  s: {stage: image_stats, inputs: {images: nope}}\n",
            "refers to unknown step 'nope'",
        ),
        (
            "name: t\nsteps:\n  s: {stage: image_stats}\n",
            "steps.s.inputs.images: required input is missing",
        ),
        (
            "name: t\nsteps:\n  a: {stage: tests.plugin_stages.sleepy, inputs: {after: a}}\n",
            "cycle a -> a",
        ),
        ("name: t\nsteps: [1, 2\n", "not valid YAML"),
        (b"name: t\xff\n", "bad.yaml: cannot be read ('utf-8' codec can't decode byte 0xff"),
    ],
    ids=[
        "unknown key",
        "wrong type",
        "missing input",
        "missing required input",
        "cycle",
        "yaml",
        "not utf-8",
    ],
)
def test_cli_exits_2_with_one_line(tmp_path, body, expected):
    if isinstance(body, bytes):
        config = tmp_path / "bad.yaml"
        config.write_bytes(body)
    else:
        config = write_yaml(tmp_path / "bad.yaml", body)
    proc = twostage("run", config, "--json", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert not (tmp_path / "artifacts").exists()  # nothing ran


def test_set_override_is_validated_too(tmp_path):
    proc = twostage(
        "run", REPO / "configs/smoke.yaml", "--set", "steps.data.image_size=-3", cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "steps.data.image_size: must be between 4 and 4096" in proc.stderr
    proc = twostage(
        "run", REPO / "configs/smoke.yaml", "--set", "steps.data.source.kind.x=1", cwd=tmp_path
    )
    assert proc.returncode == 2 and "steps.data.source.kind is not a mapping" in proc.stderr


def test_unreachable_ray_cluster_is_one_line(tmp_path):
    config = write_yaml(
        tmp_path / "p.yaml",
        "name: t\nray: {address: auto}\nsteps:\n  data: {stage: ingest, source: {kind: embedded}}\n",
    )
    env = {k: v for k, v in cli_env().items() if k != "RAY_ADDRESS"}
    proc = twostage("run", config, cwd=tmp_path, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twostage: ray: cannot start or reach auto: ")
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            "steps.prior_top.level=tpo",
            "steps.prior_top.level: the code shards have levels bottom, top, not 'tpo'",
        ),
        (
            "steps.prior_top.model.patch=[3, 3]",
            "steps.prior_top.model.patch: [3, 3] does not divide the top level's 4x4 code grid",
        ),
        (
            "steps.data.image_size=64",
            "steps.vqvae.model.image_size is 32 but the images are 64x64; set the ingest step's "
            "image_size: 32 (pads 28 -> 32) or model.image_size: 64",
        ),
        (
            "steps.vqvae.model.in_channels=3",
            "steps.vqvae.model.in_channels is 3 but the images have 1 channel(s); set "
            "model.in_channels: 1 or the ingest step's channels",
        ),
        (
            "steps.vqvae.train.workers=0",
            None,  # in process on a local store: fine
        ),
        (
            "store=s3://bucket/runs?endpoint_override=127.0.0.1:9000",
            "steps.vqvae.train.workers: 0 trains in process with checkpoints in a local "
            "directory, but the store is s3://bucket/runs; use workers >= 1 (Ray Train)",
        ),
    ],
)
def test_stage_options_are_checked_against_their_inputs_and_store_before_any_work(
    override, expected
):
    overrides = [override]
    if override.startswith("store="):  # with the demo's in-process training
        overrides = ["steps.vqvae.train.workers=0", override]
    if expected is None:
        load_pipeline(REPO / "configs/mnist_vqvae2.yaml", overrides)
        return
    with pytest.raises(ConfigError) as info:
        load_pipeline(REPO / "configs/mnist_vqvae2.yaml", overrides)
    assert str(info.value) == expected


def test_set_override_naming_no_step_is_refused():
    with pytest.raises(ConfigError) as info:
        load_pipeline(REPO / "configs/smoke.yaml", ["steps.dta.image_size=28"])
    assert str(info.value) == "--set steps.dta.image_size: no step 'dta' (steps: data, stats)"


def test_exponent_without_a_point_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; people write it anyway
    body = (
        "name: t\nsteps:\n  data: {stage: ingest, source: {kind: embedded}, image_size: 32,"
        " val_fraction: 1e-1}\n"
    )
    path = write_yaml(tmp_path / "p.yaml", body)
    assert load_pipeline(path).steps["data"].config.val_fraction == 0.1
    overridden = load_pipeline(path, ["steps.data.val_fraction=2e-1"])
    assert overridden.steps["data"].config.val_fraction == 0.2
    with pytest.raises(ConfigError, match=r"steps.data.seed: expected an integer, got float"):
        load_pipeline(REPO / "configs/smoke.yaml", ["steps.data.seed=1e3"])


def test_set_override_changes_the_key():
    base = load_pipeline(REPO / "configs/smoke.yaml")
    changed = load_pipeline(REPO / "configs/smoke.yaml", ["steps.data.image_size=28"])
    assert changed.steps["data"].config.image_size == 28
    assert changed.steps["data"].key != base.steps["data"].key
    # downstream keys follow their inputs
    assert changed.steps["stats"].key != base.steps["stats"].key


def test_keys_ignore_defaults_written_out_and_resources():
    plain = parse_pipeline(GOOD)
    explicit = parse_pipeline(_with("steps.data.seed", 0))
    placed = parse_pipeline(_with("steps.stats.resources", {"num_cpus": 2}))
    assert plain.steps["data"].key == explicit.steps["data"].key
    assert plain.steps["stats"].key == placed.steps["stats"].key
    assert parse_pipeline(_with("steps.data.seed", 1)).steps["data"].key != plain.steps["data"].key


def test_run_options_do_not_change_keys_but_settings_do():
    base = load_pipeline(REPO / "configs/mnist_vqvae2.yaml")
    placed = load_pipeline(
        REPO / "configs/mnist_vqvae2.yaml",
        [
            "steps.codes.actors=2",
            "steps.codes.cpus_per_actor=1",
            "steps.vqvae.train.cpus_per_worker=2",
            "steps.prior_bottom.train.cpus_per_worker=1",
        ],
    )
    assert placed.steps["codes"].config.actors == 2  # the run uses them
    assert {n: s.key for n, s in placed.steps.items()} == {n: s.key for n, s in base.steps.items()}
    changed = load_pipeline(REPO / "configs/mnist_vqvae2.yaml", ["steps.codes.batch_size=64"])
    assert changed.steps["codes"].key != base.steps["codes"].key


def test_source_files_are_fingerprinted(tmp_path):
    import os

    import numpy as np

    from tests.helpers import write_idx

    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    raw = {
        "name": "t",
        "steps": {"d": {"stage": "ingest", "source": {"kind": "mnist", "path": str(tmp_path)}}},
    }
    first = parse_pipeline(raw).steps["d"].key
    assert parse_pipeline(raw).steps["d"].key == first
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.ones(3, np.uint8))
    os.utime(tmp_path / "train-labels-idx1-ubyte", ns=(1, 1))
    assert parse_pipeline(raw).steps["d"].key != first


DEMO = REPO / "configs/mnist_vqvae2.yaml"


def _on_demo_steps(path: Path) -> dict:
    """A shipped pipeline with its stored inputs (the demo's artifacts, by key) wired to the
    demo's own steps instead, to validate it without the demo's store (tests/test_two_stage.py
    runs stored inputs for real)."""
    demo = load_pipeline(DEMO)
    by_ref = {f"{s.stage}/{s.key[:12]}": name for name, s in demo.steps.items()}
    raw = yaml.safe_load(path.read_text())
    for body in list(raw["steps"].values()):
        for slot, ref in (body.get("inputs") or {}).items():
            refs = ref if isinstance(ref, list) else [ref]
            if any("/" in r and r not in by_ref for r in refs):
                raise AssertionError(f"{path.name}: {ref} is not one of the demo's artifacts")
            wired = [by_ref.get(r, r) for r in refs]
            body["inputs"] = {**body["inputs"], slot: wired if isinstance(ref, list) else wired[0]}
            if wired != refs:  # the demo's steps join the file (none of its names clash)
                raw["steps"] = {**demo.raw["steps"], **raw["steps"]}
    return raw


def test_every_shipped_config_validates():
    configs = sorted(Path(REPO / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if "sweep" in yaml.safe_load(path.read_text()):
            continue  # a sweep file: below
        pipeline = parse_pipeline(_on_demo_steps(path))
        assert pipeline.steps, path


def test_prior_tune_searches_depth_width_and_lr_with_asha_on_the_demo_shards():
    import itertools

    from pipeline.tune import SPACE_KINDS

    demo = load_pipeline(DEMO)
    raw = yaml.safe_load((REPO / "configs/prior_tune.yaml").read_text())
    sweep = raw["sweep"]
    assert sweep["step"]["inputs"] == {"codes": f"encode/{demo.steps['codes'].key[:12]}"}
    assert {"model.layers", "model.hidden_size", "train.lr"} <= set(sweep["space"])
    assert sweep["scheduler"]["kind"] == "asha"
    grids = {k: v["grid"] for k, v in sweep["space"].items()}
    assert all(next(iter(v)) in SPACE_KINDS for v in sweep["space"].values())
    for point in itertools.product(*grids.values()):  # every trial is a valid step of the demo
        body = json.loads(json.dumps(sweep["step"]))
        for dotted, value in zip(grids, point, strict=True):
            section, option = dotted.split(".")
            body.setdefault(section, {})[option] = value
        body["inputs"] = {"codes": "codes"}
        parse_pipeline({**demo.raw, "steps": {**demo.raw["steps"], "trial": body}})


def test_prior_sweep_trains_priors_on_the_demo_shards_by_key():
    """The sweep names the demo's code shards by key: after `make demo` it trains only priors,
    and a prior there keys as it would wired to the demo's own encode step."""
    demo = load_pipeline(DEMO)
    raw = yaml.safe_load((REPO / "configs/prior_sweep.yaml").read_text())
    assert {s["stage"] for s in raw["steps"].values()} == {"train_prior"}
    assert {s["inputs"]["codes"] for s in raw["steps"].values()} == {
        f"encode/{demo.steps['codes'].key[:12]}"
    }
    sweep = parse_pipeline(_on_demo_steps(REPO / "configs/prior_sweep.yaml"))
    priors = [s for s in sweep.steps.values() if s.stage == "train_prior"]
    assert len(priors) >= 3 and all(p.inputs["codes"] == "codes" for p in priors)


@pytest.mark.parametrize(
    "body,expected",
    [
        ("name: t\nsteps:\n  a: {stage: ''}\n", "steps.a.stage: stage '' is neither"),
        ("name: t\nsteps:\n  a: {stage: .x}\n", "steps.a.stage: stage '.x' is neither"),
        (
            "name: t\nsteps:\n  a: {stage: ingest, resources: {custom: {CPU: 1}}}\n",
            "steps.a.resources.custom: CPU: use num_cpus, num_gpus or memory_gb",
        ),
        (
            "name: t\nsteps:\n  a: {stage: ingest, resources: {custom: {gpu_like: -1}}}\n",
            "steps.a.resources.custom: gpu_like: expected an amount >= 0",
        ),
        ("name: t\nname: u\nsteps:\n  a: {stage: ingest}\n", "bad.yaml:2: not valid YAML: dup"),
        (
            "name: t\nsteps:\n  a: {stage: ingest}\n  a: {stage: ingest, limit: 5}\n",
            "bad.yaml:4: not valid YAML: duplicate key 'a'",
        ),
        ("name: a/b\nsteps:\n  a: {stage: ingest}\n", "name: 'a/b': a pipeline name starts"),
        ("name: ..\nsteps:\n  a: {stage: ingest}\n", "name: '..': a pipeline name starts"),
        (
            "name: t\nsteps:\n  d: {stage: ingest}\n"
            "  a: {stage: train_autoencoder, inputs: {images: d}, train: {val_images: -1}}\n",
            "steps.a.train.val_images: cannot be negative",
        ),
        (
            "name: t\nsteps:\n  d: {stage: ingest}\n"
            "  a: {stage: train_prior, inputs: {codes: d}, train: {warmup_steps: -5}}\n",
            "steps.a.train.warmup_steps: cannot be negative",
        ),
    ],
)
def test_bad_input_is_one_config_error(tmp_path, body, expected):
    config = write_yaml(tmp_path / "bad.yaml", body)
    with pytest.raises(ConfigError) as info:
        load_pipeline(config)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_plugin_stages_can_be_limited_to_an_allow_list(monkeypatch):
    raw = {"name": "t", "steps": {"a": {"stage": "tests.plugin_stages.sleepy"}}}
    parse_pipeline(raw)  # allowed by default: pipeline files are code
    monkeypatch.setenv("TWOSTAGE_PLUGIN_STAGES", "")
    with pytest.raises(ConfigError, match="allows the built-in stages only"):
        parse_pipeline(raw)
    monkeypatch.setenv("TWOSTAGE_PLUGIN_STAGES", "mylab, tests.plugin_stages")
    parse_pipeline(raw)
    monkeypatch.setenv("TWOSTAGE_PLUGIN_STAGES", "tests.plugin")  # a prefix of names, not text
    with pytest.raises(ConfigError, match="allows tests.plugin$"):
        parse_pipeline(raw)
    monkeypatch.setenv("TWOSTAGE_PLUGIN_STAGES", "")
    parse_pipeline({"name": "t", "steps": {"a": {"stage": "ingest"}}})  # built-ins always


def _parquet_sources(tmp_path: Path) -> dict[str, Path]:
    """Folders of image-table files that do not form one table: class names that differ,
    schema versions that differ, an id in two files."""
    import numpy as np

    from stages.formats.images import ImageTable, ImageTableMeta, ImageTableWriter

    def write(folder: Path, name: str, ids, **meta) -> None:
        n = len(ids)
        table = ImageTable(
            ImageTableMeta(8, 8, 1, **meta),
            np.asarray(ids, np.int64),
            np.zeros(n, np.int64),
            np.array(["train"] * n, dtype=object),
            np.zeros((n, 8, 8, 1), np.uint8),
        )
        (folder / "tmp").mkdir(exist_ok=True)
        writer = ImageTableWriter(folder / "tmp", table.meta)
        writer.write(table)
        (written,) = writer.close()
        (folder / "tmp" / written).rename(folder / name)

    sources = {}
    for case, second in (
        ("classes", {"class_names": ["a", "c"]}),
        ("version", {"class_names": ["a", "b"], "schema_version": 99}),
        ("ids", {"class_names": ["a", "b"]}),
    ):
        folder = tmp_path / case
        folder.mkdir()
        write(folder, "x1.parquet", [1, 2, 3], class_names=["a", "b"])
        write(folder, "x2.parquet", [3, 4] if case == "ids" else [4, 5], **second)
        sources[case] = folder
    return sources


@pytest.mark.parametrize(
    "case,expected",
    [
        ("classes", "class_names ['a', 'c'] differs from ['a', 'b']"),
        ("version", "schema_version 99 differs from 1"),
        ("ids", "1 id(s) appear in more than one row (e.g. 3)"),
    ],
)
def test_a_parquet_source_that_is_not_one_table_is_refused_before_any_work(
    tmp_path, case, expected
):
    folder = _parquet_sources(tmp_path)[case]
    raw = {
        "name": "t",
        "steps": {"d": {"stage": "ingest", "source": {"kind": "parquet", "path": str(folder)}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_pipeline(raw)
    assert str(info.value).startswith("steps.d.source.path: ") and expected in str(info.value)
