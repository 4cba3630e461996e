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

Loss: ``nll`` = mean cross-entropy over this level's codes in nats; ``loss`` = ``nll``.
Bits per code = nll / ln 2.

Sampling runs the decoder's layers through `_CachedDecoder`, a written-out forward with a
preallocated KV cache: same weights and arithmetic as ``LlamaModel.forward`` (tested against
it), without the general-purpose machinery that, at one token per step on a CPU, costs more
than the step's small matrix products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.io import load_model, save_model


@dataclass(frozen=True)
class PriorConfig:
    """Prior hyper-parameters.

    Args:
        grid: (h, w) of the modelled level.
        codebook_size: Codes of the modelled level.
        context_grids: Upper levels' grids, in prefix order (name -> [h, w]).
        context_codebook_sizes: Upper levels' codebook sizes (name -> K).
        num_classes: Classes for conditioning (0: unconditional).
        class_dropout: Probability of replacing the label by the null class in training.
        hidden_size: Transformer width.
        layers: Decoder layers.
        heads: Attention heads.
        mlp_ratio: MLP width as a multiple of hidden_size.
        dropout: Attention dropout.
    """

    grid: list[int] = field(default_factory=lambda: [4, 4])
    codebook_size: int = 512
    context_grids: dict[str, list[int]] = field(default_factory=dict)
    context_codebook_sizes: dict[str, int] = field(default_factory=dict)
    num_classes: int = 0
    class_dropout: float = 0.1
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        if self.hidden_size % self.heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by heads {self.heads}"
            )
        if set(self.context_grids) != set(self.context_codebook_sizes):
            raise ValueError("context_grids: must name the same levels as context_codebook_sizes")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout: must be in [0, 1), got {self.class_dropout}")

    @property
    def length(self) -> int:
        """Tokens of the modelled level."""
        return self.grid[0] * self.grid[1]

    @property
    def prefix_length(self) -> int:
        """cond token + upper-level codes."""
        return 1 + sum(h * w for h, w in self.context_grids.values())


class _GridEmbedding(nn.Module):
    """Code embedding + row + column + level embedding for one level's grid."""

    def __init__(self, codebook_size: int, grid: list[int], dim: int):
        super().__init__()
        self.h, self.w = grid
        self.codes = nn.Embedding(codebook_size, dim)
        self.rows = nn.Parameter(torch.zeros(self.h, dim))
        self.cols = nn.Parameter(torch.zeros(self.w, dim))
        self.level = nn.Parameter(torch.zeros(dim))
        for p in (self.rows, self.cols, self.level):
            nn.init.normal_(p, std=0.02)

    def position(self, index: torch.Tensor) -> torch.Tensor:
        """2D position embedding of flat positions `index` (any shape)."""
        return self.rows[index // self.w] + self.cols[index % self.w] + self.level

    def forward(self, flat_codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``b n`` codes at flat positions start..start+n -> ``b n d``."""
        index = torch.arange(start, start + flat_codes.shape[1], device=flat_codes.device)
        return self.codes(flat_codes) + self.position(index)[None]


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
        self.target = _GridEmbedding(c.codebook_size, c.grid, c.hidden_size)
        self.decoder = LlamaModel(
            LlamaConfig(
                vocab_size=1,  # inputs are embedded here, not by token id
                hidden_size=c.hidden_size,
                intermediate_size=c.mlp_ratio * c.hidden_size,
                num_hidden_layers=c.layers,
                num_attention_heads=c.heads,
                num_key_value_heads=c.heads,
                max_position_embeddings=c.prefix_length + c.length,
                attention_dropout=c.dropout,
                bos_token_id=None,
                eos_token_id=None,
                pad_token_id=None,
            )
        )
        self.head = nn.Linear(c.hidden_size, c.codebook_size, bias=False)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _prefix(self, context: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        parts = [self.cond(labels)[:, None]]
        for name, embed in self.context.items():
            parts.append(embed(rearrange(context[name], "b h w -> b (h w)")))
        return torch.cat(parts, 1)

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
        flat = rearrange(codes, "b h w -> b (h w)")
        inputs = torch.cat([self._prefix(context or {}, labels), self.target(flat[:, :-1])], 1)
        hidden = self.decoder(inputs_embeds=inputs).last_hidden_state
        logits = self.head(hidden[:, self.config.prefix_length - 1 :])
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat.reshape(-1))
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
    ) -> torch.Tensor:
        """Samples ``n h w`` codes, one code per step.

        Args:
            n: Number of grids.
            context: Upper levels' codes (``n h w`` each) for lower-level priors.
            labels: ``n`` class labels to condition on (None: unconditional).
            temperature, top_k, top_p: Sampling controls (top_k 0 and top_p 1 switch them off).
            guidance: Classifier-free guidance scale; 1 is plain conditional sampling.
            generator: Random generator (same generator state -> same codes).
            use_cache: Reuse keys and values (KV cache); False recomputes the whole sequence
                at every step (the reference the benchmark compares against).
        """
        device = self.head.weight.device
        labels = self._labels(labels, n, device)
        guided = guidance != 1.0 and self.config.num_classes > 0
        context = context or {}
        if guided:  # conditional and unconditional rows in one batch
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
            context = {k: torch.cat([v, v]) for k, v in context.items()}
        prefix = self._prefix({k: v.to(device) for k, v in context.items()}, labels)
        out = torch.empty(n, self.config.length, dtype=torch.long, device=device)
        total = self.config.prefix_length + self.config.length - 1  # the last code is not input
        cached = _CachedDecoder(self.decoder, prefix.shape[0], total, prefix) if use_cache else None
        sequence = prefix
        for t in range(self.config.length):
            if t > 0:
                token = self.target(out[:, t - 1 : t].repeat(2 if guided else 1, 1), t - 1)
                sequence = token if use_cache else torch.cat([sequence, token], 1)
            if use_cache:
                hidden = cached(sequence)[:, -1]
            else:  # the plain transformers forward over the whole sequence, every step
                hidden = self.decoder(inputs_embeds=sequence, use_cache=False).last_hidden_state
                hidden = hidden[:, -1]
            logits = self.head(hidden).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            out[:, t] = _sample(logits, temperature, top_k, top_p, generator)
        return rearrange(out, "b (h w) -> b h w", h=self.config.grid[0])

    # ----- save / load -------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes ``config.json`` and ``model.safetensors`` (weights and buffers)."""
        save_model(self, self.config, directory)

    @classmethod
    def load(cls, directory: Path, map_location: str = "cpu") -> CodePrior:
        """Loads a model written by `save`; names any missing file."""
        return load_model(cls, PriorConfig, directory, map_location)


class _CachedDecoder:
    """The forward of a `transformers` ``LlamaModel`` for sampling, with a static KV cache.

    Each call takes the next ``b n d`` input embeddings, writes their keys and values into
    tensors preallocated for the whole sequence and returns the final-norm hidden states. The
    arithmetic is LlamaModel's (RMSNorm, rotary positions from the model's own rotary module,
    causal attention, SwiGLU MLP) with q/k/v and gate/up fused into one matrix product each.
    """

    def __init__(self, model, batch: int, length: int, like: torch.Tensor):
        config = model.config
        if config.hidden_act != "silu" or config.attention_bias or config.mlp_bias:
            raise ValueError("_CachedDecoder: expects a Llama decoder with SiLU and no biases")
        if config.num_key_value_heads != config.num_attention_heads:
            raise ValueError("_CachedDecoder: expects as many key/value heads as query heads")
        self.heads = config.num_attention_heads
        self.head_dim = model.layers[0].self_attn.head_dim
        self.eps = config.rms_norm_eps
        cos, sin = model.rotary_emb(like, torch.arange(length, device=like.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # length head_dim
        self.layers = [
            (
                layer.input_layernorm.weight,
                torch.cat(
                    [
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ]
                ),
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
                layer.mlp.down_proj.weight,
            )
            for layer in model.layers
        ]
        self.norm = model.norm.weight
        shape = (len(self.layers), batch, self.heads, length, self.head_dim)
        self.keys, self.values = like.new_zeros(shape), like.new_zeros(shape)
        self.filled = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        start, end = self.filled, self.filled + n
        if end > self.keys.shape[3]:
            raise ValueError(
                f"_CachedDecoder: {end} positions exceed the cache's {self.keys.shape[3]}"
            )
        cos, sin = self.cos[start:end], self.sin[start:end]
        half = self.head_dim // 2
        # query i (at position start + i) sees keys 0..start + i
        mask = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(start) if n > 1 else None
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(self.layers):
            h = F.rms_norm(x, (dim,), norm1, self.eps)
            q, k, v = rearrange(F.linear(h, qkv), "b n (s h d) -> s b h n d", s=3, h=self.heads)
            qk = torch.stack([q, k])
            qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin
            self.keys[i, :, :, start:end] = qk[1]
            self.values[i, :, :, start:end] = v
            attn = F.scaled_dot_product_attention(
                qk[0], self.keys[i, :, :, :end], self.values[i, :, :, :end], attn_mask=mask
            )
            x = x + F.linear(rearrange(attn, "b h n d -> b n (h d)"), out)
            gate, up = F.linear(F.rms_norm(x, (dim,), norm2, self.eps), gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, down)
        self.filled = end
        return F.rms_norm(x, (dim,), self.norm, self.eps)


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row from ``b K`` logits with temperature, top-k and nucleus filtering."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the first token always
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, -math.inf))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
