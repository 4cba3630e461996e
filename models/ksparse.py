"""k-sparse autoencoder (Makhzani & Frey 2013, "k-Sparse Autoencoders").

Shapes: images ``b c h w`` in [0, 1]; codes ``b d``. The bottleneck is linear, ``a = f(x)``;
the code keeps the ``k`` largest entries of each example's ``a`` and zeroes the rest,
``z = a * mask`` (Sec. 2, steps 1-2: the support is ``supp_k(a)``). Because the mask is a
constant multiplier, gradients reach only the kept units (Sec. 2, step 3: back-propagate through
the k largest hidden units only).

Loss: ``recon`` = ``-log p(x | g(z))`` summed over pixels, averaged over the batch
(`models.losses.reconstruction`); ``loss`` = ``recon``. The paper's alpha*k encoding at test
time and its k schedule are not implemented: `encode` uses the same ``k``.
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
class KSparseConfig:
    """k-sparse autoencoder hyper-parameters.

    Args:
        family: Always ``ksparse``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Code width ``d``.
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs means).
        k: Units kept per example, in [1, latent_dim].
    """

    family: Literal["ksparse"] = "ksparse"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    k: int = 10

    def __post_init__(self):
        if self.family != "ksparse":
            raise ValueError(f"family: must be 'ksparse', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if not 1 <= self.k <= self.latent_dim:
            raise ValueError(
                f"k: must be in [1, latent_dim={self.latent_dim}], got {self.k}; "
                "lower k or raise latent_dim"
            )


class KSparseAutoencoder(nn.Module):
    """Autoencoder keeping the top-k code units per example (see the module docstring)."""

    def __init__(self, config: KSparseConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(c.in_channels, c.image_size, c.channels, c.latent_dim)
        self.decoder = ConvDecoder(c.latent_dim, c.in_channels, c.image_size, c.channels)

    def sparsify(self, a: torch.Tensor) -> torch.Tensor:
        """Keeps the `k` largest entries of each row of `a` (``b d``), zeroes the rest."""
        kept = a.topk(self.config.k, dim=1).indices
        mask = torch.zeros_like(a).scatter_(1, kept, 1.0)
        return a * mask

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Reconstructs `x` and returns the loss terms.

        Args:
            x: Images ``b c h w`` in [0, 1].
            labels: Ignored (the model is unconditional).

        Returns:
            dict with ``loss`` (= ``recon``), ``recon``, ``recon_logits`` (decoder output
            ``b c h w``) and ``z`` (k-sparse code ``b d``).
        """
        z = self.sparsify(self.encoder(x))
        logits = self.decoder(z)
        recon = reconstruction(logits, x, self.config.likelihood).mean()
        return {"loss": recon, "recon": recon, "recon_logits": logits, "z": z}

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """k-sparse code ``b d`` of images ``b c h w`` (`labels` ignored)."""
        return self.sparsify(self.encoder(x))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``b c h w`` in [0, 1] from codes ``b d`` (`labels` ignored)."""
        return to_image(self.decoder(z), self.config.likelihood)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> KSparseAutoencoder:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, KSparseConfig, directory, map_location)
