"""Sparse autoencoder with a KL sparsity penalty (Ng, "Sparse autoencoder", CS294A lecture notes).

Shapes: images ``b c h w`` in [0, 1]; codes ``b d``. The code is ``h = sigmoid(f(x))``, so each
unit's activation lies in (0, 1).

Loss (the notes' sparse cost J_sparse): ``recon`` = ``-log p(x | g(h))`` summed over pixels,
averaged over the batch (`models.losses.reconstruction`); ``sparsity`` =
``sum_j KL(rho || rho_hat_j) = sum_j rho log(rho / rho_hat_j) + (1 - rho) log((1 - rho) / (1 -
rho_hat_j))`` with ``rho_hat_j`` the mean activation of unit ``j`` over the batch (computed in
fp32); ``loss`` = ``recon + beta * sparsity``. Weight decay, the notes' third term, is left to the
optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from einops import reduce
from torch import nn

from models.conv import ConvDecoder, ConvEncoder, check_image_size
from models.io import load_model, save_model
from models.losses import LIKELIHOODS, reconstruction, to_image


@dataclass(frozen=True)
class SparseConfig:
    """Sparse autoencoder hyper-parameters.

    Args:
        family: Always ``sparse``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Number of sigmoid code units ``d``.
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs means).
        rho: Target mean activation per unit, in (0, 1) (0.05 in the notes).
        beta: Weight of the sparsity term (>= 0).
    """

    family: Literal["sparse"] = "sparse"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    rho: float = 0.05
    beta: float = 1.0

    def __post_init__(self):
        if self.family != "sparse":
            raise ValueError(f"family: must be 'sparse', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not 0.0 < self.rho < 1.0:
            raise ValueError(f"rho: the target activation must be in (0, 1), got {self.rho}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0, got {self.beta}")


class SparseAutoencoder(nn.Module):
    """Autoencoder with sigmoid code units and a KL sparsity penalty (see the module docstring)."""

    def __init__(self, config: SparseConfig):
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
            dict with ``loss`` (``recon + beta * sparsity``), ``recon``, ``sparsity`` (summed
            over units), ``recon_logits`` (decoder output ``b c h w``) and ``z`` (activations
            ``b d`` in (0, 1)).
        """
        c = self.config
        z = torch.sigmoid(self.encoder(x))
        logits = self.decoder(z)
        recon = reconstruction(logits, x, c.likelihood).mean()
        rho_hat = reduce(z.float(), "b d -> d", "mean").clamp(1e-6, 1 - 1e-6)
        active = c.rho * torch.log(c.rho / rho_hat)
        inactive = (1 - c.rho) * torch.log((1 - c.rho) / (1 - rho_hat))
        sparsity = (active + inactive).sum()
        return {
            "loss": recon + c.beta * sparsity,
            "recon": recon,
            "sparsity": sparsity,
            "recon_logits": logits,
            "z": z,
        }

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Activations ``b d`` in (0, 1) of images ``b c h w`` (`labels` ignored)."""
        return torch.sigmoid(self.encoder(x))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``b c h w`` in [0, 1] from activations ``b d`` (`labels` ignored)."""
        return to_image(self.decoder(z), self.config.likelihood)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> SparseAutoencoder:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, SparseConfig, directory, map_location)
