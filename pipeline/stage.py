"""The stage contract and the registry. A stage is a module with this shape (see `Stage`):

- ``VERSION``: a string; bump it when the stage's outputs change for the same config;
- ``Config``: a frozen dataclass holding every option with its default;
- ``INPUTS``: input slot -> `Input` (which stage types it accepts, one or many artifacts);
- ``run(config, inputs, out, scratch) -> dict``: reads its input artifacts, writes files into
  the local directory ``out`` and returns JSON-able metrics. ``scratch`` is a path or URI unique
  to the artifact key where the stage may keep resumable state (checkpoints); it survives a
  failed or interrupted run and is removed once the artifact is committed. A stage that resumed
  returns ``resumed_from_step`` in its metrics. It knows nothing of Ray scheduling; the
  pipeline places it on resources and commits ``out`` to the artifact store.
- optionally ``DEFAULT_NUM_CPUS``: CPUs its Ray task reserves when the step does not say (a
  stage that starts its own Ray Train workers coordinates only and reserves 0).
- optionally ``worker_requests(config) -> list[dict]``: the resources each of the Ray workers
  the stage starts itself asks for (Ray Train workers, Ray Data actors), where its config says;
  the runner checks them against the nodes before it submits the step (`pipeline.cluster`).
- optionally ``fingerprint(config) -> str | None``: a cheap summary of external data the stage
  reads (file sizes and times), folded into the artifact key so changed source files are not
  served from cache.
- optionally ``RETIRED_OPTIONS``: options the stage no longer has, at the values they always
  had (a nested mapping like its config's), folded into its artifact keys so that artifacts
  stored before the options went stay cached.
- optionally ``check_upstream(config, step, steps) -> None``: checks the stage's options
  against the validated steps it reads from, before anything runs (raise ValueError whose
  message starts with the option's name, e.g. a prior's level against its autoencoder).

Built-in stages are the modules of the ``stages`` package, named by type (``ingest`` is
``stages/ingest.py``): the file list is the registry. A user's own stage is named by its module
path (``mypackage.my_stage``), importable on every Ray node; ``$TWOSTAGE_PLUGIN_STAGES``
limits which (`ALLOW_ENV`). The pipeline reaches stages only
through `load`, by name; nothing in ``pipeline/`` imports a stage module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

STAGES_PACKAGE = "stages"
# Plugin stages are code: naming a module in a pipeline file runs it. Where pipeline files come
# from people you do not trust with your shell, set this to the module prefixes allowed
# (comma-separated, e.g. "mylab.stages,other_pkg"); empty allows the built-in stages only.
ALLOW_ENV = "TWOSTAGE_PLUGIN_STAGES"
_MODULE_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")


def builtin() -> list[str]:
    """The built-in stage types: the module files of the ``stages`` package (its subpackages
    hold what the stages share), found without importing any of them."""
    spec = importlib.util.find_spec(STAGES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return []
    return sorted(
        path.stem
        for location in spec.submodule_search_locations
        for path in Path(location).glob("*.py")
        if path.stem != "__init__"
    )


@dataclass(frozen=True)
class Input:
    """An input slot of a stage.

    Args:
        kinds: Stage types whose artifacts the slot accepts (empty: any).
        many: The slot takes a list of artifacts.
        required: The pipeline must wire this slot.
    """

    kinds: tuple[str, ...] = ()
    many: bool = False
    required: bool = True


class Stage(Protocol):
    VERSION: str
    INPUTS: dict[str, Input]
    Config: type

    def run(self, config: Any, inputs: dict[str, Any], out: Path, scratch: str) -> dict: ...


def load(stage: str) -> ModuleType:
    """Imports a stage module by built-in type name or module path.

    Raises:
        ImportError: with a message naming the stage.
    """
    if not isinstance(stage, str) or not _MODULE_PATH.match(stage):
        raise ImportError(
            f"stage {stage!r} is neither a built-in stage type nor a module path "
            "(like mypackage.my_stage)"
        )
    known = builtin()
    module_name = f"{STAGES_PACKAGE}.{stage}" if stage in known else stage
    allowed = os.environ.get(ALLOW_ENV)
    if stage not in known and allowed is not None:
        prefixes = [p.strip() for p in allowed.split(",") if p.strip()]
        if not any(stage == p or stage.startswith(p + ".") for p in prefixes):
            raise ImportError(
                f"plugin stage {stage!r} is not allowed: ${ALLOW_ENV} allows "
                + (", ".join(prefixes) if prefixes else "the built-in stages only")
            )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        names = ", ".join(known)
        raise ImportError(f"unknown stage {stage!r} (built-in: {names}; or a module path)") from e
    missing = [a for a in ("VERSION", "Config", "INPUTS", "run") if not hasattr(module, a)]
    if missing:
        raise ImportError(f"stage module {module_name!r} lacks {', '.join(missing)}")
    return module
