"""Pipeline stages. A stage is a module with this shape (see `Stage`):

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
- optionally ``fingerprint(config) -> str | None``: a cheap summary of external data the stage
  reads (file sizes and times), folded into the artifact key so changed source files are not
  served from cache.
- optionally ``check_upstream(config, step, steps) -> None``: checks the stage's options
  against the validated steps it reads from, before anything runs (raise ValueError whose
  message starts with the option's name, e.g. a prior's level against its autoencoder).

Built-in stages are named by type (``ingest``); a user's own stage by its module path
(``mypackage.my_stage``), importable on every Ray node.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

BUILTIN = {
    "ingest": "stages.ingest",
    "image_stats": "stages.image_stats",
    "train_autoencoder": "stages.train_autoencoder",
    "encode": "stages.encode",
    "train_prior": "stages.train_prior",
    "sample": "stages.sample",
    "train_classifier": "stages.train_classifier",
    "evaluate": "stages.evaluate",
    "analyze_latents": "stages.analyze_latents",
    "train_sequence": "stages.train_sequence",
    "rollout": "stages.rollout",
}


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
    module_name = BUILTIN.get(stage, stage)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        known = ", ".join(sorted(BUILTIN))
        raise ImportError(f"unknown stage {stage!r} (built-in: {known}; or a module path)") from e
    missing = [a for a in ("VERSION", "Config", "INPUTS", "run") if not hasattr(module, a)]
    if missing:
        raise ImportError(f"stage module {module_name!r} lacks {', '.join(missing)}")
    return module
