"""Denoising autoencoder (Vincent et al. 2008, "Extracting and Composing Robust Features with
Denoising Autoencoders").

Shapes: images ``b c h w`` in [0, 1]; codes ``b d``. In training mode the input is corrupted,
``x~ ~ q(x~ | x)``, encoded and decoded, and the reconstruction is scored against the CLEAN `x`
(Sec. 2.3); in eval mode nothing is corrupted. Corruptions (`DenoisingConfig.noise`), counted
over all ``c h w`` input values of each example:

- ``masking`` (the paper's q_D): exactly ``round(noise_level * c*h*w)`` values, chosen uniformly
  at random per example, are set to 0.
- ``gaussian``: additive isotropic noise with std ``noise_level``, then clamped to [0, 1].
- ``salt_and_pepper``: exactly ``round(noise_level * c*h*w)`` values per example are set to 0 or
  1 with equal probability.

Loss: ``recon`` = ``-log p(x | g(f(x~)))`` summed over pixels, averaged over the batch
(`models.losses.reconstruction`); ``loss`` = ``recon``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from models.conv import ConvDecoder, ConvEncoder, check_image_size
from models.io import load_model, save_model
from models.losses import LIKELIHOODS, reconstruction, to_image

NOISES = ("masking", "gaussian", "salt_and_pepper")


@dataclass(frozen=True)
class DenoisingConfig:
    """Denoising autoencoder hyper-parameters.

    Args:
        family: Always ``denoising``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Code width ``d``.
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs means).
        noise: Corruption: ``masking`` (paper), ``gaussian`` or ``salt_and_pepper``.
        noise_level: Fraction of values destroyed (masking, salt_and_pepper; in [0, 1]) or the
            noise std (gaussian; >= 0). 0.25 is within the paper's range (0 to 0.5).
    """

    family: Literal["denoising"] = "denoising"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    noise: Literal["masking", "gaussian", "salt_and_pepper"] = "masking"
    noise_level: float = 0.25

    def __post_init__(self):
        if self.family != "denoising":
            raise ValueError(f"family: must be 'denoising', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise: must be one of {NOISES}, got {self.noise!r}")
        if self.noise == "gaussian" and self.noise_level < 0:
            raise ValueError(f"noise_level: the gaussian std must be >= 0, got {self.noise_level}")
        if self.noise != "gaussian" and not 0.0 <= self.noise_level <= 1.0:
            raise ValueError(
                f"noise_level: the fraction of {self.noise} values must be in [0, 1], "
                f"got {self.noise_level}"
            )


def _choose(x: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """Boolean mask ``b n`` with exactly `count` True entries per row, uniformly at random."""
    scores = torch.rand(x.shape, generator=generator, device=x.device)
    chosen = scores.argsort(dim=1)[:, :count]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, chosen, True)


class DenoisingAutoencoder(nn.Module):
    """Denoising autoencoder. See the module docstring for shapes, corruptions and the loss."""

    def __init__(self, config: DenoisingConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(c.in_channels, c.image_size, c.channels, c.latent_dim)
        self.decoder = ConvDecoder(c.latent_dim, c.in_channels, c.image_size, c.channels)

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A corrupted copy ``x~`` of `x` (which is left unchanged), whatever the mode.

        Args:
            x: Images ``b c h w`` in [0, 1].
            generator: Random source on `x`'s device (None: the global one).

        Returns:
            ``b c h w``, same dtype as `x`.
        """
        c = self.config
        if c.noise == "gaussian":
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            return (x + c.noise_level * noise).clamp(0.0, 1.0)
        flat = rearrange(x, "b c h w -> b (c h w)")
        chosen = _choose(flat, round(c.noise_level * flat.shape[1]), generator)
        if c.noise == "masking":
            value = torch.zeros_like(flat)
        else:  # salt_and_pepper
            coin = torch.rand(flat.shape, generator=generator, device=x.device)
            value = (coin < 0.5).to(flat.dtype)
        out = torch.where(chosen, value, flat)
        return rearrange(out, "b (c h w) -> b c h w", c=x.shape[1], h=x.shape[2])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Reconstructs clean `x` from a corrupted copy (training mode) or from `x` (eval mode).

        Args:
            x: Clean images ``b c h w`` in [0, 1].
            labels: Ignored (the model is unconditional).

        Returns:
            dict with ``loss`` (= ``recon``), ``recon`` (batch mean of the per-example NLL of the
            clean `x`), ``recon_logits`` (decoder output ``b c h w``) and ``z`` (code ``b d``).
        """
        x_in = self.corrupt(x) if self.training else x
        z = self.encoder(x_in)
        logits = self.decoder(z)
        recon = reconstruction(logits, x, self.config.likelihood).mean()
        return {"loss": recon, "recon": recon, "recon_logits": logits, "z": z}

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Code ``b d`` of uncorrupted images ``b c h w`` (`labels` ignored)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``b c h w`` in [0, 1] from codes ``b d`` (`labels` ignored)."""
        return to_image(self.decoder(z), self.config.likelihood)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> DenoisingAutoencoder:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, DenoisingConfig, directory, map_location)
