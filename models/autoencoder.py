"""Plain (undercomplete) autoencoder: ``x -> z = f(x) -> g(z)``.

Shapes: images ``b c h w`` in [0, 1]; codes ``b d`` with ``d = latent_dim``. Encoder and
decoder are `models.conv.ConvEncoder` / `ConvDecoder`; the code is the encoder's linear output.

Loss: ``recon`` = ``-log p(x | g(f(x)))`` summed over pixels, averaged over the batch
(`models.losses.reconstruction`: Bernoulli cross-entropy with logits, or unit-variance Gaussian,
i.e. half the squared error plus a constant); ``loss`` = ``recon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from models.conv import ConvDecoder, ConvEncoder, check_image_size
from models.io import load_model, save_model
from models.losses import LIKELIHOODS, reconstruction, to_image


@dataclass(frozen=True)
class AutoencoderConfig:
    """Autoencoder hyper-parameters.

    Args:
        family: Always ``autoencoder``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Code width ``d``.
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs means).
    """

    family: Literal["autoencoder"] = "autoencoder"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"

    def __post_init__(self):
        if self.family != "autoencoder":
            raise ValueError(f"family: must be 'autoencoder', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")


class Autoencoder(nn.Module):
    """Deterministic autoencoder. See the module docstring for shapes and the loss."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(c.in_channels, c.image_size, c.channels, c.latent_dim)
        self.decoder = ConvDecoder(c.latent_dim, c.in_channels, c.image_size, c.channels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Reconstructs `x` and returns the loss terms.

        Args:
            x: Images ``b c h w`` in [0, 1].
            labels: Ignored (the model is unconditional).

        Returns:
            dict with ``loss`` (= ``recon``), ``recon`` (batch mean of the per-example
            reconstruction NLL), ``recon_logits`` (decoder output ``b c h w``) and ``z``
            (code ``b d``).
        """
        z = self.encoder(x)
        logits = self.decoder(z)
        recon = reconstruction(logits, x, self.config.likelihood).mean()
        return {"loss": recon, "recon": recon, "recon_logits": logits, "z": z}

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Code ``b d`` of images ``b c h w`` (`labels` ignored)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``b c h w`` in [0, 1] from codes ``b d`` (`labels` ignored)."""
        return to_image(self.decoder(z), self.config.likelihood)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> Autoencoder:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, AutoencoderConfig, directory, map_location)
