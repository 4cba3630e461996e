"""Convolutional encoder and decoder shared by the classic autoencoder families.

Shapes: images ``b c H W`` (``H = W = image_size``, a power of two >= 8); vectors ``b f``.

`ConvEncoder` halves the resolution with 4x4 stride-2 convolutions (each followed by ReLU) down to
a 4x4 map, doubling the channels at each step (``channels``, ``2 * channels``, ...), then flattens
and maps linearly to ``out_features``. `ConvDecoder` mirrors it: a linear layer and ReLU to a 4x4
map, then 4x4 stride-2 transposed convolutions (ReLU between them) up to ``image_size``. With
``hidden > 0`` both put two fully connected layers of that width (each with ReLU) between the
4x4 map and the vector, as in the β-VAE architecture of Burgess et al. 2017 (Appendix A.1:
256): a single linear layer can only turn a latent into features that grow monotonically with
it, which makes a latent that slides a sprite across the image hard to learn. The
decoder has no final activation: it returns logits (Bernoulli likelihood) or means (Gaussian).
Neither block has normalization layers, so every example is processed independently (the
contractive penalty's per-example Jacobian relies on this).
"""

from __future__ import annotations

import math

import torch
from einops.layers.torch import Rearrange
from torch import nn


def check_image_size(image_size: int) -> None:
    """Raises ValueError unless `image_size` is a power of two >= 8 (the blocks stop at 4x4).

    Args:
        image_size: Image height and width.
    """
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(
            f"image_size: must be a power of two >= 8 (stride-2 convolutions down to 4x4), got "
            f"{image_size}; pad 28 -> 32 at ingest or use image_size 32 or 64"
        )


def _levels(image_size: int) -> int:
    """Number of stride-2 steps between `image_size` and 4."""
    return int(math.log2(image_size // 4))


def _mlp(in_features: int, hidden: int) -> list[nn.Module]:
    """Two ``Linear -> ReLU`` layers of width `hidden` (none when `hidden` is 0)."""
    if hidden < 0:
        raise ValueError(f"hidden: must be >= 0, got {hidden}")
    if hidden == 0:
        return []
    return [nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]


class ConvEncoder(nn.Module):
    """Image ``b c H W`` -> vector ``b out_features`` (stride-2 convs to 4x4, flatten, linear).

    Args:
        in_channels: Image channels.
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the first convolution; doubled after each one.
        out_features: Output width.
        hidden: Width of two fully connected ReLU layers before the output (0: none).
    """

    def __init__(
        self, in_channels: int, image_size: int, channels: int, out_features: int, hidden: int = 0
    ):
        super().__init__()
        check_image_size(image_size)
        layers, c = [], in_channels
        for i in range(_levels(image_size)):
            out = channels * 2**i
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.ReLU()]
            c = out
        layers += [Rearrange("b c h w -> b (c h w)"), *_mlp(c * 4 * 4, hidden)]
        layers.append(nn.Linear(hidden or c * 4 * 4, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Vector ``b latent_dim`` -> image-shaped output ``b out_channels H W`` (no activation).

    Args:
        latent_dim: Input width.
        out_channels: Image channels.
        image_size: Image height and width (a power of two >= 8).
        channels: Channels of the last hidden feature map (the encoder's first); the 4x4 map has
            ``channels * 2**(levels - 1)``.
        hidden: Width of two fully connected ReLU layers after the input (0: none).
    """

    def __init__(
        self, latent_dim: int, out_channels: int, image_size: int, channels: int, hidden: int = 0
    ):
        super().__init__()
        check_image_size(image_size)
        n = _levels(image_size)
        c = channels * 2 ** (n - 1)
        layers = [
            *_mlp(latent_dim, hidden),
            nn.Linear(hidden or latent_dim, c * 4 * 4),
            nn.ReLU(),
            Rearrange("b (c h w) -> b c h w", h=4, w=4),
        ]
        for i in range(n):
            last = i == n - 1
            out = out_channels if last else c // 2
            layers.append(nn.ConvTranspose2d(c, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            c = out
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
