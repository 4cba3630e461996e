"""Every autoencoder family by name: its config class and its model class.

``family`` is the field every model config carries (``vqvae2``, ``vae``, ...); the
train-autoencoder stage maps ``model: {family: ...}`` onto the matching config with
`pipeline.config.from_dict`, builds the model with `build` and loads artifacts with `load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.contractive import ContractiveAutoencoder, ContractiveConfig
from models.cvae import ConditionalVAE, ConditionalVAEConfig
from models.denoising import DenoisingAutoencoder, DenoisingConfig
from models.ksparse import KSparseAutoencoder, KSparseConfig
from models.sparse import SparseAutoencoder, SparseConfig
from models.vae import VAE, VAEConfig
from models.vqvae2 import VQVAE2, VQVAE2Config

# family name -> (config class, model class)
FAMILIES = {
    "vqvae2": (VQVAE2Config, VQVAE2),
    "autoencoder": (AutoencoderConfig, Autoencoder),
    "denoising": (DenoisingConfig, DenoisingAutoencoder),
    "sparse": (SparseConfig, SparseAutoencoder),
    "ksparse": (KSparseConfig, KSparseAutoencoder),
    "contractive": (ContractiveConfig, ContractiveAutoencoder),
    "vae": (VAEConfig, VAE),
    "beta_vae": (VAEConfig, VAE),
    "cvae": (ConditionalVAEConfig, ConditionalVAE),
}

ModelConfig = Union[  # noqa: UP007 (a runtime union for the config loader)
    VQVAE2Config,
    AutoencoderConfig,
    DenoisingConfig,
    SparseConfig,
    KSparseConfig,
    ContractiveConfig,
    VAEConfig,
    ConditionalVAEConfig,
]


def build(config):
    """A freshly initialised model for `config` (any family's config)."""
    return FAMILIES[config.family][1](config)


def load(directory: Path, map_location: str = "cpu"):
    """Loads the model in `directory` (``config.json`` + ``model.safetensors``), any family."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {directory} a model directory?")
    family = json.loads(path.read_text()).get("family", "vqvae2")
    if family not in FAMILIES:
        raise ValueError(f"{path}: unknown model family {family!r}")
    return FAMILIES[family][1].load(Path(directory), map_location)


def is_quantized(model) -> bool:
    """Whether the model has discrete codes (``encode_indices`` / ``decode_indices``)."""
    return isinstance(model, VQVAE2)


def vqvae2_config(raw: dict, where: str) -> VQVAE2Config:
    """The VQ-VAE-2 config in a model's ``config.json``; a clear error for the other families."""
    family = raw.get("family", "vqvae2")
    if family != "vqvae2":
        raise ValueError(
            f"{where} is a {family!r} autoencoder; encoding to codes and sampling from priors "
            "need discrete codes (model.family: vqvae2)"
        )
    return VQVAE2Config(**raw)
