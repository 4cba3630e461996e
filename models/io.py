"""Saving and loading models as ``config.json`` + ``model.safetensors`` (no pickle)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

MODEL_FILES = ("config.json", "model.safetensors")  # what a saved model directory holds


def save_model(model: nn.Module, config, directory: Path) -> None:
    """Writes `config` (a dataclass) as ``config.json`` and all weights and buffers."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(asdict(config), indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors")


def load_model(model_cls: type, config_cls: type, directory: Path, map_location: str = "cpu"):
    """Rebuilds ``model_cls(config_cls(**config.json))`` and loads its weights.

    Raises:
        FileNotFoundError: naming the missing file.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in MODEL_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory}: missing {name} (not a saved {model_cls.__name__})"
            )
    model = model_cls(config_cls(**json.loads((directory / "config.json").read_text())))
    model.load_state_dict(load_file(directory / "model.safetensors", device=map_location))
    return model.to(map_location)
