"""Contractive autoencoder (Rifai et al. 2011, "Contractive Auto-Encoders: Explicit Invariance
During Feature Extraction").

Shapes: images ``b c h w`` in [0, 1]; codes ``b d``. The code is ``h(x) = sigmoid(f(x))`` (the
paper's sigmoid encoder, Sec. 2.1) and the decoder reconstructs from it.

Loss (Eq. 7): ``recon`` = ``-log p(x | g(h(x)))`` summed over pixels, averaged over the batch
(`models.losses.reconstruction`); ``contractive`` = ``||J_h(x)||_F^2 = sum_{j, i} (dh_j / dx_i)^2``
per example (Eq. 5), averaged over the batch; ``loss`` = ``recon + weight * contractive``.

The Jacobian is exact: ``d`` batched vector-Jacobian products, one per code unit, with the unit
vector ``e_j`` as the cotangent of every example at once (``torch.autograd.grad`` with
``is_grads_batched=True``). The conv blocks have no normalization, so examples do not interact and
row ``j`` of each example's Jacobian comes out of the same product. With ``create_graph`` the
penalty is differentiable with respect to the weights (double backward), so it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from einops import reduce, repeat
from torch import nn

from models.conv import ConvDecoder, ConvEncoder, check_image_size
from models.io import load_model, save_model
from models.losses import LIKELIHOODS, reconstruction, to_image


@dataclass(frozen=True)
class ContractiveConfig:
    """Contractive autoencoder hyper-parameters.

    Args:
        family: Always ``contractive``.
        in_channels: Image channels (1 grey, 3 RGB).
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        latent_dim: Number of sigmoid code units ``d`` (the penalty costs ``d`` backward passes).
        likelihood: ``bernoulli`` (decoder outputs logits) or ``gaussian`` (decoder outputs means).
        weight: lambda of Eq. 7, the weight of the contractive penalty (>= 0).
        penalty_examples: Compute the penalty on the first this-many examples of each batch
            only (None: all). The training batches are random draws, so this is an unbiased
            estimate of the batch mean of the exact per-example penalty, at a fraction of the
            cost (the penalty costs ``latent_dim`` backward passes per example: about 60x a
            plain autoencoder step for a conv encoder with 32 code units).
    """

    family: Literal["contractive"] = "contractive"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    latent_dim: int = 32
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"
    weight: float = 1e-2
    penalty_examples: int | None = None

    def __post_init__(self):
        if self.family != "contractive":
            raise ValueError(f"family: must be 'contractive', got {self.family!r}")
        check_image_size(self.image_size)
        if self.in_channels < 1:
            raise ValueError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 1:
            raise ValueError(f"channels: must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim: must be positive, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood: must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.weight < 0:
            raise ValueError(f"weight: must be >= 0, got {self.weight}")
        if self.penalty_examples is not None and self.penalty_examples < 1:
            raise ValueError(f"penalty_examples: positive or null, got {self.penalty_examples}")


class ContractiveAutoencoder(nn.Module):
    """Autoencoder with the exact Jacobian penalty of Rifai et al. (see the module docstring)."""

    def __init__(self, config: ContractiveConfig):
        super().__init__()
        self.config = c = config
        self.encoder = ConvEncoder(c.in_channels, c.image_size, c.channels, c.latent_dim)
        self.decoder = ConvDecoder(c.latent_dim, c.in_channels, c.image_size, c.channels)

    def code_and_penalty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code ``h(x)`` and the squared Frobenius norm of its Jacobian, per example.

        Runs with gradients enabled even under ``torch.no_grad()`` (the Jacobian needs them);
        the penalty's graph is kept only when gradients were enabled by the caller. Not usable
        under ``torch.inference_mode()``, which cannot be lifted.

        Args:
            x: Images ``b c h w``.

        Returns:
            ``(h, penalty)``: ``b d`` and ``b`` (fp32).
        """
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if x.requires_grad else x.detach().requires_grad_()
            h = torch.sigmoid(self.encoder(x_in))
            basis = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
            basis = repeat(basis, "d e -> d b e", b=h.shape[0])
            (jac,) = torch.autograd.grad(
                h, x_in, grad_outputs=basis, is_grads_batched=True, create_graph=create_graph
            )
        penalty = reduce(jac.float().pow(2), "d b c hh ww -> b", "sum")
        if not create_graph:
            h = h.detach()
        return h, penalty

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Reconstructs `x` and returns the loss terms.

        Args:
            x: Images ``b c h w`` in [0, 1].
            labels: Ignored (the model is unconditional).

        Returns:
            dict with ``loss`` (``recon + weight * contractive``), ``recon``, ``contractive``
            (mean of the per-example squared Frobenius norm over the batch, or over its first
            ``penalty_examples``), ``recon_logits`` (decoder
            output ``b c h w``) and ``z`` (code ``b d`` in (0, 1)).
        """
        k = self.config.penalty_examples
        if k is None or k >= len(x):
            z, penalty = self.code_and_penalty(x)
        else:
            _, penalty = self.code_and_penalty(x[:k])
            z = torch.sigmoid(self.encoder(x))
        logits = self.decoder(z)
        recon = reconstruction(logits, x, self.config.likelihood).mean()
        contractive = penalty.mean()
        return {
            "loss": recon + self.config.weight * contractive,
            "recon": recon,
            "contractive": contractive,
            "recon_logits": logits,
            "z": z,
        }

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Code ``h(x)`` ``b d`` in (0, 1) of images ``b c h w`` (`labels` ignored)."""
        return torch.sigmoid(self.encoder(x))

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images ``b c h w`` in [0, 1] from codes ``b d`` (`labels` ignored)."""
        return to_image(self.decoder(z), self.config.likelihood)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> ContractiveAutoencoder:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, ContractiveConfig, directory, map_location)
