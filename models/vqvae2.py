"""Hierarchical VQ-VAE (VQ-VAE-2, Razavi et al. 2019, "Generating Diverse High-Fidelity Images").

Shapes: images ``b c H W`` in [-1, 1]; level ``i`` has a ``b h_i w_i`` code grid with
``h_i = H / (bottom_stride * 2**i)``. Level 0 is the bottom (finest, local detail), the last level
the top (global structure). With ``levels=1`` this is the original VQ-VAE.

Encoding runs bottom-up then top-down: encoder features are computed from the image to the top;
the top is quantized first; each lower level is quantized from its own features concatenated
with a decoding of the level above, so lower codes are conditioned on the upper ones (Sec. 3.1).
The image decoder sees the bottom codes and every upper level's codes upsampled by transposed
convolutions. With two levels the layer shapes equal the most-used public implementation, so
the throughput figures in ``bench/`` compare like with like.

Loss (Eq. 2 of van den Oord et al. 2017, summed over levels): ``recon`` = mean squared error,
``commitment`` weighted by ``commitment_cost`` (beta), ``codebook`` for gradient-trained
codebooks (zero with EMA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.io import load_model, save_model
from models.layers import ResBlock
from models.quantize import VectorQuantizer


class ConfigError(ValueError):
    """Invalid model configuration (the message names the field and the fix)."""


@dataclass(frozen=True)
class VQVAE2Config:
    """VQ-VAE-2 hyper-parameters (defaults: the 32px configuration of the reference figures).

    Args:
        family: Always ``vqvae2``.
        image_size: Input height and width; must be divisible by ``bottom_stride * 2**(levels-1)``.
        in_channels: Image channels (1 grey, 3 RGB).
        levels: Code levels: 1 (VQ-VAE), 2 (VQ-VAE-2) or 3.
        channels: Hidden channels of encoders and decoders.
        res_blocks: Residual blocks per encoder / decoder.
        res_channels: Hidden channels of each residual block.
        embed_dim: Code vector dimension.
        codebook_size: Codes per level.
        bottom_stride: Downsampling from image to the bottom grid (a power of 2, at least 2).
        commitment_cost: beta of the commitment term (0.25 in the paper).
        codebook_update: ``ema`` (paper default) or ``gradient``.
        decay: EMA decay (0.99).
        dead_code_steps: Restart codes unused for this many steps (0: never).
    """

    family: Literal["vqvae2"] = "vqvae2"
    image_size: int = 32
    in_channels: int = 3
    levels: int = 2
    channels: int = 128
    res_blocks: int = 2
    res_channels: int = 32
    embed_dim: int = 64
    codebook_size: int = 512
    bottom_stride: int = 4
    commitment_cost: float = 0.25
    codebook_update: Literal["ema", "gradient"] = "ema"
    decay: float = 0.99
    dead_code_steps: int = 100

    def __post_init__(self):
        if self.levels not in (1, 2, 3):
            raise ConfigError(f"levels: must be 1, 2 or 3, got {self.levels}")
        if self.bottom_stride < 2 or self.bottom_stride & (self.bottom_stride - 1):
            raise ConfigError(f"bottom_stride: must be a power of 2 >= 2, got {self.bottom_stride}")
        factor = self.bottom_stride * 2 ** (self.levels - 1)
        if self.image_size % factor or self.image_size < factor:
            ok = [s for s in (16, 28, 32, 64, 128, 256) if s % factor == 0]
            raise ConfigError(
                f"image_size: {self.image_size} is not divisible by bottom_stride * 2**(levels-1)"
                f" = {factor}, so the latent grids would not be whole; use image_size in {ok} "
                "(ingest can pad 28 -> 32) or change bottom_stride / levels"
            )
        if self.in_channels < 1:
            raise ConfigError(f"in_channels: must be positive, got {self.in_channels}")
        if self.channels < 2 or self.channels % 2:
            raise ConfigError(f"channels: must be an even number >= 2, got {self.channels}")
        if not 2 <= self.codebook_size <= 65536:
            raise ConfigError(
                f"codebook_size: must be in [2, 65536] (codes are stored as uint16), "
                f"got {self.codebook_size}"
            )
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"decay: must be in (0, 1), got {self.decay}")
        if self.commitment_cost < 0:
            raise ConfigError(f"commitment_cost: must be >= 0, got {self.commitment_cost}")

    @property
    def level_names(self) -> list[str]:
        """Bottom to top: ``bottom``, (``middle``,) ``top``; ``codes`` when there is one level."""
        return {1: ["codes"], 2: ["bottom", "top"], 3: ["bottom", "middle", "top"]}[self.levels]

    def grid_shapes(self) -> dict[str, tuple[int, int]]:
        """Code grid (h, w) per level name."""
        return {
            name: (self.image_size // (self.bottom_stride * 2**i),) * 2
            for i, name in enumerate(self.level_names)
        }


PRESETS = {
    # MNIST / CIFAR-10 (pad MNIST 28 -> 32): 8x8 bottom + 4x4 top codes
    "32px": VQVAE2Config(),
    # 64px (e.g. CelebA 64): 16x16 bottom + 8x8 top
    "64px": VQVAE2Config(image_size=64),
    # ImageNet / FFHQ 256 as in the paper: 64x64 bottom + 32x32 top
    "256px": VQVAE2Config(image_size=256, channels=128, res_blocks=2, res_channels=64),
}


def preset(name: str, **changes) -> VQVAE2Config:
    """A preset configuration, optionally changed (``preset("32px", in_channels=1)``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)


def _encoder(in_ch: int, ch: int, res_blocks: int, res_ch: int, stride: int) -> nn.Sequential:
    """Downsamples by `stride` (4x4 stride-2 convs), then 3x3 conv, residual blocks, ReLU."""
    n = int(math.log2(stride))
    layers, c = [], in_ch
    for i in range(n):
        out = ch if (i == n - 1 and n > 1) else ch // 2
        layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        c = out
    layers.append(nn.Conv2d(c, ch, 3, padding=1))
    layers += [ResBlock(ch, res_ch) for _ in range(res_blocks)]
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _decoder(in_ch: int, out_ch: int, ch: int, res_blocks: int, res_ch: int, stride: int):
    """3x3 conv, residual blocks, ReLU, then upsamples by `stride` (4x4 stride-2 transposed)."""
    n = int(math.log2(stride))
    layers = [nn.Conv2d(in_ch, ch, 3, padding=1)]
    layers += [ResBlock(ch, res_ch) for _ in range(res_blocks)]
    layers.append(nn.ReLU(inplace=True))
    c = ch
    for i in range(n):
        last = i == n - 1
        out = out_ch if last else ch // 2
        layers.append(nn.ConvTranspose2d(c, out, 4, stride=2, padding=1))
        if not last:
            layers.append(nn.ReLU(inplace=True))
        c = out
    return nn.Sequential(*layers)


def _upsampler(dim: int, factor: int) -> nn.Module:
    layers = [
        nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1) for _ in range(int(math.log2(factor)))
    ]
    return nn.Sequential(*layers)


class VQVAE2(nn.Module):
    """Hierarchical VQ-VAE. See the module docstring for the structure and shapes."""

    def __init__(self, config: VQVAE2Config):
        super().__init__()
        self.config = c = config
        n = c.levels
        self.encoders = nn.ModuleList(
            [_encoder(c.in_channels, c.channels, c.res_blocks, c.res_channels, c.bottom_stride)]
            + [
                _encoder(c.channels, c.channels, c.res_blocks, c.res_channels, 2)
                for _ in range(n - 1)
            ]
        )
        # level i quantizes conv1x1(features_i [+ decoding of level i+1])
        self.pre_quantize = nn.ModuleList(
            [
                nn.Conv2d(c.channels + (c.embed_dim if i < n - 1 else 0), c.embed_dim, 1)
                for i in range(n)
            ]
        )
        self.quantizers = nn.ModuleList(
            [
                VectorQuantizer(
                    c.codebook_size,
                    c.embed_dim,
                    c.commitment_cost,
                    c.codebook_update,
                    c.decay,
                    dead_code_steps=c.dead_code_steps,
                )
                for _ in range(n)
            ]
        )
        # level i >= 1: decodes [q_i, conditioning from above] to level i-1's resolution
        self.level_decoders = nn.ModuleList(
            [nn.Identity()]
            + [
                _decoder(
                    c.embed_dim * (1 if i == n - 1 else 2),
                    c.embed_dim,
                    c.channels,
                    c.res_blocks,
                    c.res_channels,
                    2,
                )
                for i in range(1, n)
            ]
        )
        self.upsamplers = nn.ModuleList(
            [nn.Identity()] + [_upsampler(c.embed_dim, 2**i) for i in range(1, n)]
        )
        self.decoder = _decoder(
            c.embed_dim * n,
            c.in_channels,
            c.channels,
            c.res_blocks,
            c.res_channels,
            c.bottom_stride,
        )

    def _quantize_all(self, x: torch.Tensor):
        features = [self.encoders[0](x)]
        for encoder in self.encoders[1:]:
            features.append(encoder(features[-1]))
        outputs, conditioning = [None] * len(features), None
        for i in reversed(range(len(features))):
            h = features[i] if conditioning is None else torch.cat([features[i], conditioning], 1)
            outputs[i] = self.quantizers[i](self.pre_quantize[i](h))
            if i > 0:
                q = outputs[i].quantized.to(h.dtype)
                inp = q if conditioning is None else torch.cat([q, conditioning], 1)
                conditioning = self.level_decoders[i](inp)
        return outputs

    def decode_quantized(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        """Image from per-level code vectors (bottom first), ``b c H W``."""
        dtype = next(self.decoder.parameters()).dtype
        parts = [quantized[0].to(dtype)] + [
            up(q.to(dtype)) for up, q in zip(self.upsamplers[1:], quantized[1:], strict=True)
        ]
        return self.decoder(torch.cat(parts, 1))

    def forward(self, x: torch.Tensor) -> dict:
        """Reconstructs `x` and returns the named loss terms.

        Returns:
            dict with ``x_hat``, ``loss`` (weighted sum), ``recon``, ``commitment``, ``codebook``
            (both summed over levels), and per-level ``perplexity/<level>``, ``usage/<level>``,
            ``restarts/<level>``.
        """
        outputs = self._quantize_all(x)
        x_hat = self.decode_quantized([o.quantized for o in outputs])
        recon = F.mse_loss(x_hat.float(), x.float())
        commitment = sum(o.commitment for o in outputs)
        codebook = sum(o.codebook for o in outputs)
        loss = recon + self.config.commitment_cost * commitment + codebook
        result = {
            "x_hat": x_hat,
            "loss": loss,
            "recon": recon,
            "commitment": commitment,
            "codebook": codebook,
        }
        for name, o in zip(self.config.level_names, outputs, strict=True):
            result[f"perplexity/{name}"] = o.perplexity
            result[f"usage/{name}"] = o.usage
            result[f"restarts/{name}"] = o.restarts
        return result

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Code indices per level name, each ``b h w`` int64."""
        outputs = self._quantize_all(x)
        return {name: o.indices for name, o in zip(self.config.level_names, outputs, strict=True)}

    @torch.no_grad()
    def decode_indices(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image ``b c H W`` from code indices per level name (as `encode_indices` returns)."""
        missing = [n for n in self.config.level_names if n not in codes]
        if missing:
            raise KeyError(f"decode_indices: missing levels {missing}")
        quantized = [
            q.lookup(codes[n])
            for q, n in zip(self.quantizers, self.config.level_names, strict=True)
        ]
        return self.decode_quantized(quantized)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (weights and buffers)."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> VQVAE2:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, VQVAE2Config, directory, map_location)
