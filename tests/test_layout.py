"""The layout the design describes: stages/ holds only stages, imports run one way."""

import ast
import importlib
from pathlib import Path

from pipeline import stage as registry

REPO = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_stage_files_are_the_registry_and_each_is_a_stage():
    files = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")
    assert files == registry.builtin()
    assert "train_prior" in files and "ingest_sequences" in files
    for name in files:
        module = importlib.import_module(f"stages.{name}")
        for attribute in ("VERSION", "Config", "INPUTS", "run"):
            assert hasattr(module, attribute), f"stages/{name}.py lacks {attribute}"
        assert registry.load(name) is module


def test_pipeline_and_models_never_import_stages():
    for folder in ("pipeline", "models"):
        for path in (REPO / folder).rglob("*.py"):
            bad = [m for m in _imports(path) if m == "stages" or m.startswith("stages.")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_models_import_nothing_of_the_project():
    project = ("pipeline", "stages", "bench", "scripts", "tests")
    for path in (REPO / "models").rglob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] in project]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_no_stage_imports_another_stage():
    stage_modules = {f"stages.{name}" for name in registry.builtin()}
    for path in (REPO / "stages").rglob("*.py"):
        own = f"stages.{path.stem}" if path.parent.name == "stages" else None
        bad = sorted(m for m in _imports(path) if m in stage_modules and m != own)
        assert not bad, f"{path.relative_to(REPO)} imports the stage(s) {bad}"


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    import stages\n    from stages.formats import codes\n")
    assert {"stages", "stages.formats", "stages.formats.codes"} <= _imports(path)
