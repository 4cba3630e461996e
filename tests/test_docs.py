"""docs/stages.md is the stages' own description of their options, so it cannot drift."""

import dataclasses
import typing
from pathlib import Path

from pipeline.options import UNDOCUMENTED, render_stages, stage_options
from pipeline.stage import builtin, load

REPO = Path(__file__).resolve().parent.parent


def test_stages_page_is_generated_from_the_configs():
    page = (REPO / "docs" / "stages.md").read_text()
    assert page == render_stages(), (
        "docs/stages.md is out of date: run `twostage stages > docs/stages.md`"
    )


def _leaf_fields(cls, prefix="", family=False):
    """(key, field, whether it belongs to one of several families) of every option of a config
    dataclass, by walking its fields."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.", family)
        elif options:
            for option in options:
                yield from _leaf_fields(option, f"{prefix}{f.name}.", True)
        else:
            yield f"{prefix}{f.name}", f, family


def test_every_option_of_every_stage_is_on_the_page_with_its_default_and_a_description():
    page = (REPO / "docs" / "stages.md").read_text()
    for name in builtin():
        config = load(name).Config
        section = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        rows = {line.split("`")[1]: line for line in section.splitlines() if line.startswith("| `")}
        for key, field, family in _leaf_fields(config):
            assert key in rows, f"{name}: option {key} is not in docs/stages.md"
            default = field.default
            if family:  # one row per family: the defaults differ
                continue
            if isinstance(default, bool):
                assert f"| `{str(default).lower()}` |" in rows[key], (name, key)
            elif isinstance(default, int | float | str):
                assert f"| `{default}` |" in rows[key], (name, key, rows[key])
        documented = [o for _, options in stage_options(config) for o in options]
        assert all(o.doc != UNDOCUMENTED for o in documented), [
            f"{name}: {o.key}" for o in documented if o.doc == UNDOCUMENTED
        ]


def test_stages_command_prints_one_stage(capsys):
    from pipeline.cli import main

    assert main(["stages", "train_prior"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## train_prior") and "| `train.shuffle_buffer` |" in out
    assert "| `model.hidden_size` | int | `256` |" in out
    assert main(["stages", "no_such_stage"]) == 2
