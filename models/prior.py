"""Autoregressive prior over VQ code grids: a Hugging Face Llama decoder built from a config.

Shapes: code grids ``b h w`` (int64), flattened row-major to sequences ``b (h w)``.

One prior models one level. Its input sequence is a prefix followed by the level's codes::

    [cond] [codes of the upper levels ...] [codes of this level ...]

- ``cond`` is the class label (0..C-1) or the null class C, which stands for "no class"; with
  ``class_dropout`` the label is replaced by the null class during training so one model gives
  both the conditional and the unconditional logits that classifier-free guidance mixes;
- upper levels (VQ-VAE-2 Sec. 3.2: lower levels are conditioned on the levels above) enter as
  a prefix. We chose a prefix over cross-attention: one decoder-only causal LM serves every
  level, the prefix is pre-filled into the KV cache once per sample, and the upper grids are
  at most a quarter of the lower one, so the extra attention cost is small.
Every code token's embedding is its code embedding plus learned row, column and level
embeddings (2D position), on top of the decoder's own rotary 1D positions. The logits for the
code at position t come from the hidden state of the token before it.

Patches (``PriorConfig.patch``, default 1x1). With a ph x pw patch, a token of the modelled
level is one patch: the grid is cut into patches taken in raster order, and a patch's embedding
is the sum of its codes' embeddings (one table per place in the patch) plus the patch's 2D
position. The decoder then takes one step per patch, and `_PatchHead` predicts the patch's
codes one after another (raster order inside the patch) from the hidden state before the patch
plus the codes already chosen in it. The factorisation stays exact,
p(patch) = p(c_0) p(c_1 | c_0) ..., but sampling a level takes ph * pw times fewer decoder steps,
which is what bounds sampling time on a CPU (one small matrix product per layer and step). The
price: each code gets a fraction of the decoder's work, so at the same width a patched prior
models codes worse than an unpatched one of the same width.
The idea is that of the local models of MEGABYTE (Yu et al., 2023) and RQ-Transformer (Lee et
al., 2022); here the local model is one residual MLP.

Loss: ``nll`` = mean cross-entropy over this level's codes in nats; ``loss`` = ``nll``.
Bits per code = nll / ln 2.

Sampling (`CodePrior.sample`) runs the decoder's layers through the KV-cached engine of
`models.prior_sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.io import load_model, save_model
from models.prior_sampling import CachedDecoder, check_precision, sample_token


@dataclass(frozen=True)
class PriorArchitecture:
    """The transformer's size, conditioning dropout and patching: what a user chooses about a
    prior (`PriorConfig` adds what the codes decide).

    Args:
        hidden_size: Transformer width.
        layers: Decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (grouped-query attention; must divide ``heads``); 0: as many
            as ``heads``. Fewer shrink the KV cache that every sampling step reads.
        mlp_ratio: MLP width as a multiple of hidden_size.
        dropout: Attention dropout.
        class_dropout: Probability of replacing the label by the null class in training
            (classifier-free guidance).
        patch: (ph, pw) codes per sequence token. [1, 1]: one code per token. Larger patches
            make the decoder take one step per patch, and a small head predicts the patch's
            codes one after another (see the module docstring). Must divide the level's grid.
    """

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 0
    mlp_ratio: int = 4
    dropout: float = 0.0
    class_dropout: float = 0.1
    patch: list[int] = field(default_factory=lambda: [1, 1])

    def __post_init__(self):
        for name in ("hidden_size", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by heads {self.heads}"
            )
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise ValueError(f"kv_heads: must divide heads ({self.heads}), got {self.kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout: must be in [0, 1), got {self.class_dropout}")
        if len(self.patch) != 2 or min(self.patch) < 1:
            raise ValueError(f"patch: must be two positive sizes [ph, pw], got {self.patch}")


@dataclass(frozen=True)
class PriorConfig(PriorArchitecture):
    """Prior hyper-parameters: the architecture (`PriorArchitecture`) and the codes it models.

    Args:
        grid: (h, w) of the modelled level.
        codebook_size: Codes of the modelled level.
        context_grids: Upper levels' grids, in prefix order (name -> [h, w]).
        context_codebook_sizes: Upper levels' codebook sizes (name -> K).
        num_classes: Classes for conditioning (0: unconditional).
    """

    grid: list[int] = field(default_factory=lambda: [4, 4])
    codebook_size: int = 512
    context_grids: dict[str, list[int]] = field(default_factory=dict)
    context_codebook_sizes: dict[str, int] = field(default_factory=dict)
    num_classes: int = 0

    def __post_init__(self):
        super().__post_init__()
        if set(self.context_grids) != set(self.context_codebook_sizes):
            raise ValueError("context_grids: must name the same levels as context_codebook_sizes")
        if any(g % p for p, g in zip(self.patch, self.grid, strict=True)):
            raise ValueError(
                f"patch: must be two positive sizes that divide the grid {self.grid}, "
                f"got {self.patch}"
            )

    @property
    def length(self) -> int:
        """Codes of the modelled level."""
        return self.grid[0] * self.grid[1]

    @property
    def patch_codes(self) -> int:
        """Codes per sequence token."""
        return self.patch[0] * self.patch[1]

    @property
    def patch_grid(self) -> list[int]:
        """(h, w) of the grid of patches."""
        return [g // p for g, p in zip(self.grid, self.patch, strict=True)]

    @property
    def steps(self) -> int:
        """Sequence tokens (patches) of the modelled level: decoder steps to sample it."""
        return self.length // self.patch_codes

    @property
    def prefix_length(self) -> int:
        """cond token + upper-level codes."""
        return 1 + sum(h * w for h, w in self.context_grids.values())


class _GridEmbedding(nn.Module):
    """Token embedding for one level's grid: code (per place in the patch) + row + column + level.

    A token is one patch of ``s`` codes; its embedding is the sum of one embedding per code,
    looked up in a table per place in the patch, plus the patch's 2D position.
    """

    def __init__(self, codebook_size: int, grid: list[int], dim: int, patch_codes: int = 1):
        super().__init__()
        self.h, self.w = grid
        self.codes = nn.Embedding(patch_codes * codebook_size, dim)
        self.rows = nn.Parameter(torch.zeros(self.h, dim))
        self.cols = nn.Parameter(torch.zeros(self.w, dim))
        self.level = nn.Parameter(torch.zeros(dim))
        self.register_buffer("offsets", torch.arange(patch_codes) * codebook_size, persistent=False)
        for p in (self.rows, self.cols, self.level):
            nn.init.normal_(p, std=0.02)

    def position(self, index: torch.Tensor) -> torch.Tensor:
        """2D position embedding of flat positions `index` (any shape)."""
        return self.rows[index // self.w] + self.cols[index % self.w] + self.level

    def forward(self, patches: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``b n s`` codes of the patches at flat positions start..start+n -> ``b n d``."""
        index = torch.arange(start, start + patches.shape[1], device=patches.device)
        return self.codes(patches + self.offsets).sum(2) + self.position(index)[None]


class _PatchHead(nn.Module):
    """Predicts the ``s`` codes of one patch in turn from the decoder's hidden state for it.

    The input for the code at place j is the hidden state plus a place embedding plus one
    embedding of each code already chosen in the patch (a table per place), followed by a
    residual MLP; the prior's output layer turns it into logits. So the patch's codes are
    modelled autoregressively, p(c_0) p(c_1 | c_0) ..., not as independent guesses.
    """

    def __init__(self, dim: int, codebook_size: int, patch_codes: int, mlp_ratio: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.place = nn.Parameter(torch.randn(patch_codes, dim) * 0.02)
        self.chosen = nn.Embedding(patch_codes * codebook_size, dim)
        self.norm = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def inputs(self, hidden: torch.Tensor, place: int, chosen: torch.Tensor) -> torch.Tensor:
        """Features for the code at `place` from ``b d`` hidden and ``b d`` summed choices."""
        return self._refine(hidden + self.place[place] + chosen)

    def choice(self, codes: torch.Tensor, place: int) -> torch.Tensor:
        """Embedding of ``b`` codes chosen at `place`, to add to the running sum."""
        return self.chosen(codes + place * self.codebook_size)

    def forward(self, hidden: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Teacher-forced features: ``b n d`` hidden, ``b n s`` codes -> ``b n s d``."""
        offsets = torch.arange(patches.shape[2], device=patches.device) * self.codebook_size
        chosen = F.pad(self.chosen(patches + offsets).cumsum(2)[:, :, :-1], (0, 0, 1, 0))
        return self._refine(hidden[:, :, None] + self.place + chosen)  # j sees codes before j

    def _refine(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.mlp(self.norm(z))


class CodePrior(nn.Module):
    """Autoregressive prior for one code level (see the module docstring)."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.config = c = config
        self.cond = nn.Embedding(c.num_classes + 1, c.hidden_size)  # last index: null class
        self.context = nn.ModuleDict(
            {
                name: _GridEmbedding(c.context_codebook_sizes[name], grid, c.hidden_size)
                for name, grid in c.context_grids.items()
            }
        )
        self.target = _GridEmbedding(c.codebook_size, c.patch_grid, c.hidden_size, c.patch_codes)
        self.decoder = LlamaModel(
            LlamaConfig(
                vocab_size=1,  # inputs are embedded here, not by token id
                hidden_size=c.hidden_size,
                intermediate_size=c.mlp_ratio * c.hidden_size,
                num_hidden_layers=c.layers,
                num_attention_heads=c.heads,
                num_key_value_heads=c.kv_heads or c.heads,
                max_position_embeddings=c.prefix_length + c.steps,
                attention_dropout=c.dropout,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=None,
            )
        )
        self.head = nn.Linear(c.hidden_size, c.codebook_size, bias=False)
        self.patch_head = (
            _PatchHead(c.hidden_size, c.codebook_size, c.patch_codes, c.mlp_ratio)
            if c.patch_codes > 1
            else None
        )

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _prefix(self, context: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        parts = [self.cond(labels)[:, None]]
        for name, embed in self.context.items():
            parts.append(embed(rearrange(context[name], "b h w -> b (h w) 1")))
        return torch.cat(parts, 1)

    def to_patches(self, codes: torch.Tensor) -> torch.Tensor:
        """``b h w ...`` -> ``b n s ...``: patches in raster order, codes in raster order within."""
        ph, pw = self.config.patch
        return rearrange(codes, "b (gh ph) (gw pw) ... -> b (gh gw) (ph pw) ...", ph=ph, pw=pw)

    def from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_patches` (extra trailing dims are kept)."""
        (ph, pw), gh = self.config.patch, self.config.patch_grid[0]
        return rearrange(
            patches, "b (gh gw) (ph pw) ... -> b (gh ph) (gw pw) ...", gh=gh, ph=ph, pw=pw
        )

    def _labels(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels is None or self.config.num_classes == 0:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = labels.to(device).long()
        return torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)

    def forward(
        self,
        codes: torch.Tensor,
        context: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict:
        """Teacher-forced logits and loss.

        Args:
            codes: ``b h w`` codes of the modelled level.
            context: Upper levels' ``b h w`` codes (for lower-level priors).
            labels: ``b`` class labels (-1 or None: no class).

        Returns:
            ``logits`` (``b (h w) K``), ``nll`` (nats per code) and ``loss``.
        """
        b = codes.shape[0]
        labels = self._labels(labels, b, codes.device)
        if self.training and self.config.class_dropout > 0 and self.config.num_classes > 0:
            drop = torch.rand(b, device=codes.device) < self.config.class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        patches = self.to_patches(codes)
        inputs = torch.cat([self._prefix(context or {}, labels), self.target(patches[:, :-1])], 1)
        hidden = self.decoder(inputs_embeds=inputs).last_hidden_state
        hidden = hidden[:, self.config.prefix_length - 1 :]  # the state before each patch
        if self.patch_head is not None:
            hidden = self.patch_head(hidden, patches)  # b n s d
        else:
            hidden = hidden[:, :, None]
        logits = rearrange(self.from_patches(self.head(hidden)), "b h w k -> b (h w) k")
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
        return {"logits": logits, "nll": nll, "loss": nll}

    @torch.inference_mode()
    def sample(
        self,
        n: int,
        context: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        guidance: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """Samples ``n h w`` codes: one decoder step per patch, then the patch's codes in turn.

        Args:
            n: Number of grids.
            context: Upper levels' codes (``n h w`` each) for lower-level priors.
            labels: ``n`` class labels to condition on (None: unconditional).
            temperature, top_k, top_p: Sampling controls (top_k 0 and top_p 1 switch them off).
            guidance: Classifier-free guidance scale; 1 is plain conditional sampling.
            generator: Random generator (same generator state -> same codes).
            use_cache: Reuse keys and values (KV cache); False recomputes the whole sequence
                at every step (the reference the benchmark compares against).
            precision: Of the cached decoder's matrix products (`PRECISIONS`): ``fp32``;
                ``bf16`` products and KV cache, where the hardware has bf16; ``fp16_weights``,
                fp16 weights times fp32 inputs (x86 CPUs). The residual stream, norms,
                rotations and logits stay fp32.
        """
        device = self.head.weight.device
        check_precision(precision, device)
        labels = self._labels(labels, n, device)
        guided = guidance != 1.0 and self.config.num_classes > 0
        copies = 2 if guided else 1  # each sampled code feeds the guided row pair
        context = context or {}
        if guided:  # conditional and unconditional rows in one batch
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
            context = {k: torch.cat([v, v]) for k, v in context.items()}
        prefix = self._prefix({k: v.to(device) for k, v in context.items()}, labels)
        c = self.config
        out = torch.empty(n, c.steps, c.patch_codes, dtype=torch.long, device=device)
        total = c.prefix_length + c.steps - 1  # the last patch is not input
        cached = None
        if use_cache:
            cached = CachedDecoder(self.decoder, prefix.shape[0], total, prefix, precision)
        sequence = prefix
        for t in range(c.steps):
            if t > 0:
                token = self.target(out[:, t - 1 : t].repeat(copies, 1, 1), t - 1)
                sequence = token if use_cache else torch.cat([sequence, token], 1)
            if use_cache:
                hidden = cached(sequence)[:, -1]
            else:  # the plain transformers forward over the whole sequence, every step
                hidden = self.decoder(inputs_embeds=sequence, use_cache=False).last_hidden_state
                hidden = hidden[:, -1]
            chosen = torch.zeros_like(hidden)
            for j in range(c.patch_codes):
                features = hidden
                if self.patch_head is not None:
                    features = self.patch_head.inputs(hidden, j, chosen)
                logits = self.head(features).float()
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = uncond + guidance * (cond - uncond)
                out[:, t, j] = sample_token(logits, temperature, top_k, top_p, generator)
                if self.patch_head is not None:
                    chosen = chosen + self.patch_head.choice(out[:, t, j].repeat(copies), j)
        return self.from_patches(out)

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (weights and buffers)."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> CodePrior:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, PriorConfig, directory, map_location)


# sampling precision -> what it feeds its products and keeps in the KV cache (fp16 weights
# multiply fp32 inputs)
