"""The layout the design describes: stages/ holds only stages, imports run one way."""

import ast
import importlib
import re
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


def test_readme_is_short_and_its_figures_link_to_dated_results():
    readme = (REPO / "README.md").read_text()
    assert len(readme) <= 10_000, f"README.md has {len(readme)} characters, more than 10,000"
    results = (REPO / "docs" / "results.md").read_text()
    anchors = {
        "-".join(
            "".join(c for c in line[3:].strip().lower() if c.isalnum() or c in " -").split(" ")
        )
        for line in results.splitlines()
        if line.startswith("## ")
    }
    table = readme.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    links = re.findall(r"\]\(docs/results\.md#([\w-]+)\)", table)
    assert len(rows) > 1 and links
    for row in rows[1:]:  # below the header: each row's figure links to an entry
        assert "](docs/results.md#" in row, row
    missing = sorted(set(links) - anchors)
    assert not missing, f"README links to results.md entries that do not exist: {missing}"
