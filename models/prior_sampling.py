"""The sampling engine of `models.prior.CodePrior`: a KV-cached decoder forward and the draw of
one code from logits.

`CachedDecoder` is a written-out forward of a `transformers` ``LlamaModel`` with a preallocated
KV cache: same weights and arithmetic as ``LlamaModel.forward`` (tested against it), without
the general-purpose machinery that, at one token per step on a CPU, costs more than the step's
small matrix products. Its products run in fp32, in bf16 (with a bf16 KV cache) or with fp16
weights and fp32 inputs (`_Matrix`); at a few rows per step a product on a CPU is bound by
reading its weights, so fp16 weights, half the bytes, make it up to twice as fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# sampling precision -> what it feeds its products and keeps in the KV cache (fp16 weights
# multiply fp32 inputs)
class CachedDecoder:
    """The forward of a `transformers` ``LlamaModel`` for sampling, with a static KV cache.

    Each call takes the next ``b n d`` input embeddings, writes their keys and values into
    tensors preallocated for the whole sequence and returns the final-norm hidden states. The
    arithmetic is LlamaModel's (RMSNorm, rotary positions from the model's own rotary module,
    causal attention, SwiGLU MLP), rearranged for few small operations per layer: q/k/v and
    gate/up fused into one matrix product each, the norms' weights folded into the next
    matrix, and the rotation done as one complex product. ``precision`` (`PRECISIONS`) sets
    how the matrices multiply (`_Matrix`) and the KV cache's dtype (bf16 for ``bf16``, else
    fp32).
    """

    def __init__(self, model, batch: int, length: int, like: torch.Tensor, precision: str = "fp32"):
        config = model.config
        if config.hidden_act != "silu" or config.attention_bias or config.mlp_bias:
            raise ValueError("CachedDecoder: expects a Llama decoder with SiLU and no biases")
        check_precision(precision, like.device)
        self.heads = h = config.num_attention_heads
        self.kv_heads = kv = config.num_key_value_heads
        self.head_dim = d = model.layers[0].self_attn.head_dim
        dim = config.hidden_size
        cos, sin = model.rotary_emb(like, torch.arange(length, device=like.device)[None])
        # Llama rotates dimension i with i + d/2; reorder q and k rows (the same way: q.k is
        # unchanged) so each rotated pair is adjacent, then rotate as complex numbers
        half = d // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], 1).reshape(-1)
        q_order = (torch.arange(h)[:, None] * d + pairs).reshape(-1)
        k_order = (torch.arange(kv)[:, None] * d + pairs).reshape(-1)
        self.rotation = torch.complex(cos[0, :, :half], sin[0, :, :half])  # length d/2
        # rms_norm(x) * g == normalize(x) * sqrt(dim) * g (up to eps): fold sqrt(dim) * g into
        # the next matrix
        root = math.sqrt(dim)
        self.layers = []
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            g1 = layer.input_layernorm.weight * root
            g2 = layer.post_attention_layernorm.weight * root
            qkv = torch.cat([a.q_proj.weight[q_order], a.k_proj.weight[k_order], a.v_proj.weight])
            gate_up = torch.cat([m.gate_proj.weight, m.up_proj.weight])
            self.layers.append(
                tuple(
                    _Matrix(w, precision)
                    for w in (qkv * g1, a.o_proj.weight, gate_up * g2, m.down_proj.weight)
                )
            )
        self.norm = model.norm.weight * root
        self.dtype = dt = _INPUT_DTYPE[precision]  # of the KV cache
        shape = (len(self.layers), batch, kv, length, d)
        self.keys = like.new_zeros(shape, dtype=dt)
        self.values = like.new_zeros(shape, dtype=dt)
        self.filled = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        start, end = self.filled, self.filled + n
        if end > self.keys.shape[3]:
            raise ValueError(
                f"CachedDecoder: {end} positions exceed the cache's {self.keys.shape[3]}"
            )
        rotation = self.rotation[start:end]
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        mask = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(start) if n > 1 else None
        dt = self.dtype  # of the KV cache; x, the norms and rotations stay fp32
        for i, (qkv, out, gate_up, down) in enumerate(self.layers):
            y = qkv(F.normalize(x, dim=-1))
            qk = y[..., : (h + kv) * d].unflatten(-1, (h + kv, d // 2, 2)).transpose(1, 2)
            qk = torch.view_as_complex(qk.float().contiguous()) * rotation
            qk = torch.view_as_real(qk).flatten(-2).to(dt)
            self.keys[i, :, :, start:end] = qk[:, h:]
            self.values[i, :, :, start:end] = (
                y[..., (h + kv) * d :].unflatten(-1, (kv, d)).transpose(1, 2)
            )
            keys, values = self.keys[i, :, :, :end], self.values[i, :, :, :end]
            if n == 1:  # the query heads that share a key/value head are rows of one product
                q = qk[:, :h].reshape(b, kv, h // kv, d)
                attn = F.scaled_dot_product_attention(q, keys, values).reshape(b, 1, h * d)
            else:
                if kv < h:
                    keys = keys.repeat_interleave(h // kv, 1)
                    values = values.repeat_interleave(h // kv, 1)
                attn = F.scaled_dot_product_attention(qk[:, :h], keys, values, attn_mask=mask)
                attn = attn.transpose(1, 2).reshape(b, n, h * d)
            x = x + out(attn).float()
            gate, up = gate_up(F.normalize(x, dim=-1)).chunk(2, -1)
            x = x + down(F.silu(gate) * up).float()
        self.filled = end
        return F.normalize(x, dim=-1) * self.norm


_INPUT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16_weights": torch.float32}


PRECISIONS = tuple(_INPUT_DTYPE)


def fp16_weights_available() -> bool:
    """Whether this PyTorch has fbgemm's fp16-weight products (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def check_precision(precision: str, device: torch.device) -> None:
    """Raises ValueError for a precision the sampler does not know or cannot run on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp16_weights":
        return
    if device.type != "cpu":
        where = device.type
    elif not fp16_weights_available():
        where = "a CPU without PyTorch's fbgemm engine"
    else:
        return
    raise ValueError(f"precision: fp16_weights runs on x86 CPUs, not on {where}; use fp32 or bf16")


class _Matrix:
    """One weight matrix of `CachedDecoder` (``out x in``, as ``nn.Linear``), multiplied the
    way its precision runs fastest: called on ``... in`` inputs, returns ``... out``.

    - ``fp32`` / ``bf16``: a transposed copy, ``x.to(dtype) @ w``;
    - ``fp16_weights``: fbgemm's packed fp16 matrix; inputs, accumulation and outputs stay
      fp32 (the weights are rounded to fp16: about 2e-4 relative error in a product of the
      benchmark's prior). At a few rows per product the product is bound by reading its
      weights from memory, and fp16 halves what it reads.
    """

    def __init__(self, weight: torch.Tensor, precision: str):
        self.fp16 = precision == "fp16_weights"
        if self.fp16:
            self.weight = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None)
        else:
            self.weight = weight.t().to(_INPUT_DTYPE[precision]).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.weight)
        return x.to(self.weight.dtype) @ self.weight


def sample_token(
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
    # inverse-CDF draw: one uniform per row (torch.multinomial costs ~10x more per call on CPU)
    cdf = logits.softmax(-1).cpu().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)
    return index.squeeze(-1).to(logits.device)
