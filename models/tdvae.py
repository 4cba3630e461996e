"""Temporal-difference VAE (Gregor et al., ICLR 2019, "Temporal Difference Variational
Auto-Encoder").

Shapes: sequences ``b t c h w`` in [0, 1]; beliefs ``b t e``; latents ``b d`` per layer, ``b (L
d)`` for all ``L`` layers together (top layer first).

Parts (Sec. 3 and Appendix D of the paper):

- frame encoder: the shared conv blocks (`models.conv`), one feature vector per frame;
- belief network ``b_t = LSTM(b_{t-1}, enc(x_t))``: an aggregate of the frames seen so far;
  with ``frame_skip`` the belief is ``[LSTM state, enc(x_t)]``, still a function of the
  frames 0..t only, so the current frame's content (the digit's shape) reaches p_B and p_S
  without passing through the LSTM's gates (see `TDVAEConfig`);
- belief distribution ``p_B(z_t | b_t)``, top layer first, each lower layer also seeing the
  layers above it (``layers: 2`` is the paper's two-layer model);
- transition ``p_T(z_t2 | z_t1, Δ)``: conditioned on the jump size ``Δ = t2 - t1`` (one-hot), as
  a residual on the previous latent (the mean is ``z_t1 + f(z_t1, Δ)``);
- smoothing ``q = p_S(z_t1 | z_t2, b_t1, b_t2)``: inference of the earlier state given the later
  one;
- decoder ``p_D(x_t | z_t)``: Bernoulli logits.

Objective (the paper's Eq. 6 / 8 for one pair ``t1 < t2``), with ``z_t2 ~ p_B(z | b_t2)`` and
``z_t1 ~ q(z_t1 | z_t2, b_t1, b_t2)``, both reparameterized:

    -J = -log p_D(x_t2 | z_t2)                                   (``recon``)
         + KL(q(z_t1 | ...) || p_B(z_t1 | b_t1))                 (``kl``, exact)
         + log p_B(z_t2 | b_t2) - log p_T(z_t2 | z_t1, Δ)         (``belief_t2``, ``transition``)

The smoothing-versus-belief term of ``log q - log p_B`` at t1 is a KL between two diagonal
Gaussians and is computed in closed form, layer by layer (each layer's two distributions see the
same sampled upper layers); the t2 terms have no closed form and use the sample. Every sequence
of the batch draws its own ``Δ`` uniformly from ``1..max_jump`` and its own ``t1`` uniformly from
the positions that leave room for the jump (the public ports draw one pair per batch; DESIGN,
"Known pitfalls"). Terms are summed over pixels / latent dimensions and averaged over the batch;
log-densities and the KL are in fp32; log-variances are clamped.

Prediction (`TDVAE.predict`, `TDVAE.rollout`): from the belief at the last observed frame draw
``z ~ p_B``, then apply ``p_T`` with a chosen jump, as often as needed, and decode.

Pre-training (`FrameVAE`): a plain VAE on single frames built on the TD-VAE's own encoder and
decoder (plus a linear head to ``q(z | x)``), trained before the TD-VAE objective so the
convolutions already draw digits. Trained from scratch, the TD-VAE's frame path learns far more
slowly than the same blocks in a plain VAE, and its predictions stay blurred.
The train-sequence stage then re-initializes the decoder's input layer, so the latent layout is
the TD-VAE's own (`stages.train_sequence.PretrainConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.conv import ConvDecoder, ConvEncoder, check_image_size
from models.io import load_model, save_model
from models.losses import gaussian_kl, gaussian_kl_between, gaussian_log_prob, reconstruction

LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0


@dataclass(frozen=True)
class TDVAEConfig:
    """TD-VAE hyper-parameters.

    Args:
        family: Always ``tdvae`` (names the model in ``config.json``).
        in_channels: Frame channels.
        image_size: Frame height and width (a power of two >= 8).
        channels: Channels of the first encoder convolution (doubled per downsampling).
        frame_features: Width of the frame encoder's output (the LSTM input).
        belief_dim: LSTM state width.
        hidden_dim: Width of the MLPs of p_B, p_T and p_S.
        latent_dim: Latent width ``d`` of each layer.
        layers: Latent layers (1, or 2 as in the paper).
        max_jump: Largest jump ``Δ`` drawn in training (and the size of the Δ one-hot).
        pairs: (t1, Δ) pairs drawn per sequence and step, each independently: the frames are
            encoded once and decoded `pairs` times, so the decoder sees more targets per step.
        warmup_steps: Optimizer steps over which the weight ``w`` of the information terms
            (``kl + belief_t2 - transition``) grows linearly from 0 to 1 (0: always 1). A
            KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): the decoder learns to use
            the latents before their cost is paid in full, instead of collapsing to the mean
            frame.
        frame_skip: Append the current frame's features to the LSTM state (the belief is
            ``belief_dim + frame_features`` wide): the belief sees the current frame directly
            as well as through the LSTM.
    """

    family: Literal["tdvae"] = "tdvae"
    in_channels: int = 1
    image_size: int = 32
    channels: int = 32
    frame_features: int = 256
    belief_dim: int = 256
    hidden_dim: int = 256
    latent_dim: int = 8
    layers: int = 2
    max_jump: int = 4
    pairs: int = 1
    warmup_steps: int = 0
    frame_skip: bool = False

    @property
    def belief_width(self) -> int:
        """Width of a belief ``b_t`` (LSTM state, and the frame features with frame_skip)."""
        return self.belief_dim + (self.frame_features if self.frame_skip else 0)

    def __post_init__(self):
        if self.family != "tdvae":
            raise ValueError(f"family: must be 'tdvae', got {self.family!r}")
        check_image_size(self.image_size)
        for name in (
            "in_channels",
            "channels",
            "frame_features",
            "belief_dim",
            "hidden_dim",
            "latent_dim",
            "layers",
            "max_jump",
            "pairs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")


class _GaussianHead(nn.Module):
    """MLP ``inputs -> (mu, logvar)`` of a diagonal Gaussian over ``d`` dims."""

    def __init__(self, in_features: int, hidden: int, d: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * d),
        )

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(torch.cat(inputs, dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def _sample(mu: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


class TDVAE(nn.Module):
    """TD-VAE. See the module docstring for the parts, shapes and the loss."""

    def __init__(self, config: TDVAEConfig):
        super().__init__()
        self.config = c = config
        d, e, h, L = c.latent_dim, c.belief_width, c.hidden_dim, c.layers
        self.encoder = nn.Sequential(
            ConvEncoder(c.in_channels, c.image_size, c.channels, c.frame_features), nn.ReLU()
        )
        self.belief = nn.LSTM(c.frame_features, c.belief_dim, batch_first=True)
        # layer i (0 = top) of each distribution also sees the i layers above it
        self.belief_heads = nn.ModuleList(_GaussianHead(e + i * d, h, d) for i in range(L))
        self.smoothing_heads = nn.ModuleList(
            _GaussianHead(L * d + 2 * e + i * d, h, d) for i in range(L)
        )
        self.transition_heads = nn.ModuleList(
            _GaussianHead(L * d + c.max_jump + i * d, h, d) for i in range(L)
        )
        self.decoder = ConvDecoder(L * d, c.in_channels, c.image_size, c.channels)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # ----- warm-up schedule ------------------------------------------------------------

    @torch.no_grad()
    def advance(self) -> None:
        """Counts one optimizer step; call once after each ``optimizer.step()``."""
        self.step.add_(1)

    def info_weight(self) -> torch.Tensor:
        """Current weight ``w`` of the information terms (1 after the warm-up)."""
        if self.config.warmup_steps == 0:
            return torch.ones((), device=self.step.device)
        return (self.step.double() / self.config.warmup_steps).clamp(max=1.0).float()

    # ----- the parts -------------------------------------------------------------------

    def beliefs(self, frames: torch.Tensor) -> torch.Tensor:
        """Beliefs ``b t e`` of frames ``b t c h w`` (b_t has seen frames 0..t only)."""
        t = frames.shape[1]
        features = self.encoder(rearrange(frames, "b t c h w -> (b t) c h w"))
        features = rearrange(features, "(b t) f -> b t f", t=t)
        out, _ = self.belief(features)
        return torch.cat([out, features], -1) if self.config.frame_skip else out

    def _jump_code(self, delta: torch.Tensor) -> torch.Tensor:
        if bool((delta < 1).any()) or bool((delta > self.config.max_jump).any()):
            raise ValueError(f"jump sizes must be in 1..{self.config.max_jump}")
        return F.one_hot(delta - 1, self.config.max_jump).float()

    def _layer(self, z: torch.Tensor, i: int) -> torch.Tensor:
        """Layer `i`'s slice ``b d`` of latents ``b (L d)``."""
        d = self.config.latent_dim
        return z[:, i * d : (i + 1) * d]

    def _layers(self, heads, context: tuple, given=None, generator=None, residual=None):
        """Top-down over the layers: per layer (mu, logvar) and a sample (or the given one).

        With `residual` (latents ``b (L d)``), layer i's mean is ``residual[i] + head output``.
        Returns (list of (mu, logvar), latents ``b (L d)``).
        """
        params, zs = [], []
        for i, head in enumerate(heads):
            mu, logvar = head(*context, *zs)
            if residual is not None:
                mu = mu + self._layer(residual, i)
            z = self._layer(given, i) if given is not None else _sample(mu, logvar, generator)
            params.append((mu, logvar))
            zs.append(z)
        return params, torch.cat(zs, dim=-1)

    def belief_distribution(self, b: torch.Tensor, z=None, generator=None):
        """p_B(z | b): per-layer (mu, logvar) and a sample ``b (L d)`` (or the given `z`)."""
        return self._layers(self.belief_heads, (b,), z, generator)

    def transition(self, z1: torch.Tensor, delta: torch.Tensor, z2=None, generator=None):
        """p_T(z2 | z1, Δ): per-layer (mu, logvar) and a sample (or the given `z2`).

        The means are residual: layer i's mean is ``z1[i] + head output``.
        """
        code = self._jump_code(delta)
        return self._layers(self.transition_heads, (z1, code), z2, generator, residual=z1)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits ``b c h w`` of p_D(x | z)."""
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean frames ``b c h w`` in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    # ----- the objective ---------------------------------------------------------------

    def sample_pairs(self, batch: int, frames: int, generator=None):
        """(t1, Δ) drawn independently for every sequence: Δ ~ U{1..min(max_jump, frames-1)},
        then t1 ~ U{0..frames-1-Δ}."""
        max_jump = min(self.config.max_jump, frames - 1)
        if max_jump < 1:
            raise ValueError(f"sequences need at least 2 frames, got {frames}")
        delta = torch.randint(1, max_jump + 1, (batch,), generator=generator)
        room = (frames - delta).double()
        t1 = (torch.rand(batch, generator=generator, dtype=torch.float64) * room).long()
        return torch.minimum(t1, frames - 1 - delta), delta

    def forward(
        self,
        frames: torch.Tensor,
        t1: torch.Tensor | None = None,
        delta: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """The negative TD-VAE objective for one (t1, t2) pair per sequence.

        Args:
            frames: ``b t c h w`` in [0, 1].
            t1, delta: ``b`` int64 on the CPU; when not given, ``pairs`` per sequence are drawn
                with `sample_pairs` (``(pairs b)``, sequence-major within each repeat).
            generator: Seeds the pair draw (the latent samples use the global RNG).

        Returns:
            dict with scalar ``loss``, ``recon``, ``kl``, ``belief_t2``, ``transition`` (see
            the module docstring), ``info_weight`` (``w``; ``loss = recon + w * (kl + belief_t2
            - transition)``, the negative objective once ``w = 1``) and ``t1``, ``delta``
            (``b``).
        """
        b, t = frames.shape[:2]
        rows = torch.arange(b, device=frames.device)
        if t1 is None or delta is None:
            rows = rows.repeat(self.config.pairs)
            t1, delta = self.sample_pairs(len(rows), t, generator)
        device = frames.device
        beliefs = self.beliefs(frames)
        b1 = beliefs[rows, t1.to(device)]
        b2 = beliefs[rows, (t1 + delta).to(device)]
        x2 = frames[rows, (t1 + delta).to(device)]

        belief2, z2 = self.belief_distribution(b2)
        smooth, z1 = self._layers(self.smoothing_heads, (z2, b1, b2))
        belief1, _ = self.belief_distribution(b1, z=z1)  # p_B(z1 | b1) at the smoothed z1
        trans, _ = self.transition(z1, delta.to(device), z2=z2)

        kl = sum(gaussian_kl_between(*q, *p) for q, p in zip(smooth, belief1, strict=True))
        log_belief2 = sum(gaussian_log_prob(self._layer(z2, i), *p) for i, p in enumerate(belief2))
        log_trans = sum(gaussian_log_prob(self._layer(z2, i), *p) for i, p in enumerate(trans))
        recon = reconstruction(self.decode_logits(z2), x2, "bernoulli")
        terms = {
            "recon": recon.mean(),
            "kl": kl.mean(),
            "belief_t2": log_belief2.mean(),
            "transition": log_trans.mean(),
        }
        weight = self.info_weight()
        info = terms["kl"] + terms["belief_t2"] - terms["transition"]
        loss = terms["recon"] + weight * info
        return {"loss": loss, **terms, "info_weight": weight, "t1": t1, "delta": delta}

    # ----- prediction ------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self, context: torch.Tensor, deltas: list[int], samples: int, generator=None
    ) -> torch.Tensor:
        """Predicted frames ``x_{k-1+Δ}`` for each Δ, from the belief after the context.

        One jump of size Δ per prediction (Δ <= max_jump): ``z ~ p_B(b_{k-1})``, ``z' ~ p_T(z,
        Δ)``, mean of ``p_D(x | z')``.

        Args:
            context: Observed frames ``b k c h w``.
            deltas: Jump sizes.
            samples: Independent samples per sequence.

        Returns:
            ``s b n c h w`` probabilities (``n = len(deltas)``).
        """
        b = context.shape[0]
        belief = self.beliefs(context)[:, -1].repeat(samples, 1)  # (s b) e
        _, z = self.belief_distribution(belief, generator=generator)
        out = []
        for delta in deltas:
            jump = torch.full((len(z),), delta, dtype=torch.long, device=z.device)
            _, z_next = self.transition(z, jump, generator=generator)
            out.append(self.decode(z_next))
        return rearrange(torch.stack(out, 1), "(s b) n c h w -> s b n c h w", b=b)

    @torch.no_grad()
    def rollout(
        self, context: torch.Tensor, steps: int, jump: int, samples: int, generator=None
    ) -> torch.Tensor:
        """Jumpy rollouts: from the belief after the context, apply p_T with jump size `jump`
        `steps` times, decoding after each jump.

        Returns:
            ``s b steps c h w`` probabilities (frame ``k - 1 + i * jump`` for ``i = 1..steps``).
        """
        b = context.shape[0]
        belief = self.beliefs(context)[:, -1].repeat(samples, 1)
        _, z = self.belief_distribution(belief, generator=generator)
        jumps = torch.full((len(z),), jump, dtype=torch.long, device=z.device)
        out = []
        for _ in range(steps):
            _, z = self.transition(z, jumps, generator=generator)
            out.append(self.decode(z))
        return rearrange(torch.stack(out, 1), "(s b) n c h w -> s b n c h w", b=b)

    # ----- save / load -----------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors``."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> TDVAE:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, TDVAEConfig, directory, map_location)


class FrameVAE(nn.Module):
    """A VAE on single frames that shares a TD-VAE's encoder and decoder (for pre-training).

    ``q(z | x) = N(head(encoder(x)))`` over the decoder's full input width ``L d``, prior
    ``N(0, I)``, likelihood the TD-VAE's Bernoulli decoder. Only `head` is its own; the encoder
    and decoder are the `model`'s modules, so training this trains them in place.
    """

    def __init__(self, model: TDVAE):
        super().__init__()
        c = model.config
        self.encoder, self.decoder = model.encoder, model.decoder
        self.head = nn.Linear(c.frame_features, 2 * c.layers * c.latent_dim)

    def forward(self, x: torch.Tensor) -> dict:
        """Negative ELBO of frames ``b c h w`` in [0, 1]: ``loss = recon + kl``, batch means
        in nats per frame."""
        mu, logvar = self.head(self.encoder(x)).chunk(2, dim=-1)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        recon = reconstruction(self.decoder(_sample(mu, logvar)), x, "bernoulli").mean()
        kl = gaussian_kl(mu, logvar).mean()
        return {"loss": recon + kl, "recon": recon, "kl": kl}
