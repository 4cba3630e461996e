"""Prior sampling speed: KV-cached sampling against full recompute per step, in one run.

Two-level VQ-VAE-2 grids from DESIGN.md's reference figures: 32px (4x4 top + 8x8 bottom) and
64px (8x8 top + 16x16 bottom). For each, 16 class-conditional images are sampled level by
level (top prior, then bottom prior conditioned on the sampled top codes) with our
`CodePrior` (hidden 320, 4 heads, 4 layers top / 5 layers bottom: at least the reference's
6.5M + 8.1M parameters at 64px) in two forms:

- ``per_code``: one decoder step per code, as PixelSNAIL;
- ``patch_2x2``: one decoder step per 2x2 patch of codes, whose four codes a small head then
  samples in turn (``PriorConfig.patch``): a quarter of the decoder steps, and a quarter of
  the decoder's work per code, so at the same width it models codes worse;
- ``patch_2x2_wide``: the same at hidden 640 (8 heads), about the decoder work per code of
  ``per_code``; on the demo's shards a 2x2 prior of twice the width matched the per-code
  prior's val bits per code (docs/results.md);
- ``*_kv1``: one key/value head shared by the 4 query heads (grouped-query attention), which
  cuts the KV cache each step reads by 4; hidden 336 keeps the parameters above the
  reference's;
- ``*_fp16w``: fp16 weights times fp32 inputs (`sample` precision ``fp16_weights``, fbgemm's
  packed fp16 products; x86 only): half the weight bytes each step reads;
- ``per_code_bf16``: ``per_code`` with bf16 matrix products and KV cache, timed only on CPUs
  with native bf16 (AVX512-BF16 or AMX; elsewhere bf16 products are emulated and slow).

Each is timed with the KV cache (median of 3 runs) and, for the first two, recomputing the
whole sequence at every step (once; what PixelSNAIL does); both must give the same codes. Weights are
untrained: speed does not depend on them. For one-step-per-code forms the run also times the
matrix products alone (``matmul_floor``): the decoder's and output layer's products of one
cached sampling run, same weights, rows and precision, with no attention, norms or sampling.
No sampler of that prior built on those products is faster on the machine than this floor.
Building the sampler (folding and packing the weights) is inside every timed sampling run;
the floor packs its weights before its clock starts.
Reference: PixelSNAIL small (128 ch) 16 images in 2.0 s at 32px (656 tokens/s), 22.8 s at 64px
(225 tokens/s).

    python -m bench.prior_sampling
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.common import machine, write
from models.prior import CodePrior, PriorConfig
from models.prior_sampling import CachedDecoder, fp16_weights_available

REFERENCE_TOKENS_S = {"32px": 656, "64px": 225}
REFERENCE_SECONDS = {"32px": 2.0, "64px": 22.8}
GRIDS = {"32px": ([4, 4], [8, 8]), "64px": ([8, 8], [16, 16])}
FP16W = "fp16_weights"
FORMS = {  # name: prior shape; recompute: also time the full recompute
    "per_code": dict(patch=[1, 1], hidden_size=320, heads=4, kv_heads=0, recompute=True),
    "per_code_kv1": dict(patch=[1, 1], hidden_size=336, heads=4, kv_heads=1, recompute=False),
    "patch_2x2": dict(patch=[2, 2], hidden_size=320, heads=4, kv_heads=0, recompute=True),
    "patch_2x2_kv1": dict(patch=[2, 2], hidden_size=336, heads=4, kv_heads=1, recompute=False),
    "patch_2x2_wide": dict(patch=[2, 2], hidden_size=640, heads=8, kv_heads=0, recompute=False),
    # fp16 weights times fp32 inputs (`sample` precision fp16_weights); x86 CPUs only
    "per_code_fp16w": dict(
        patch=[1, 1], hidden_size=320, heads=4, kv_heads=0, recompute=False, precision=FP16W
    ),
    "per_code_kv1_fp16w": dict(
        patch=[1, 1], hidden_size=336, heads=4, kv_heads=1, recompute=False, precision=FP16W
    ),
    # bf16 products and KV cache (`sample` precision bf16); timed only on CPUs with native bf16
    "per_code_bf16": dict(
        patch=[1, 1], hidden_size=320, heads=4, kv_heads=0, recompute=False, precision="bf16"
    ),
}
IMAGES = 16


def _priors(top: list[int], bottom: list[int], **shape) -> tuple[CodePrior, CodePrior]:
    torch.manual_seed(0)
    common = dict(codebook_size=512, num_classes=10, **shape)
    top_prior = CodePrior(PriorConfig(grid=top, layers=4, **common)).eval()
    bottom_prior = CodePrior(
        PriorConfig(
            grid=bottom,
            context_grids={"top": top},
            context_codebook_sizes={"top": 512},
            layers=5,
            **common,
        )
    ).eval()
    return top_prior, bottom_prior


def gflop_per_image(prior: CodePrior) -> float:
    """Matrix-product GFLOP to sample one grid with the KV cache (attention excluded)."""
    c = prior.config
    decoder = sum(p.numel() for n, p in prior.named_parameters() if "decoder.layers" in n)
    per_code = prior.head.weight.numel()
    if prior.patch_head is not None:
        per_code += sum(p.numel() for p in prior.patch_head.mlp.parameters() if p.dim() == 2)
    return 2 * ((c.prefix_length + c.steps - 1) * decoder + c.length * per_code) / 1e9


def sample_rate(top_prior, bottom_prior, n: int, use_cache: bool, precision: str = "fp32") -> dict:
    labels = torch.arange(n) % 10
    generator = torch.Generator().manual_seed(0)
    options = dict(generator=generator, use_cache=use_cache, precision=precision)
    start = time.perf_counter()
    top = top_prior.sample(n, labels=labels, **options)
    middle = time.perf_counter()
    bottom = bottom_prior.sample(n, {"top": top}, labels, **options)
    end = time.perf_counter()
    tokens = n * (top[0].numel() + bottom[0].numel())
    return {
        "seconds": round(end - start, 3),
        "seconds_top": round(middle - start, 3),
        "seconds_bottom": round(end - middle, 3),
        "tokens_per_s": round(tokens / (end - start), 1),
        "codes": {"top": top, "bottom": bottom},
    }


def matmul_floor(priors: tuple[CodePrior, ...], n: int, precision: str = "fp32") -> float:
    """Seconds for only the matrix products of sampling `n` grids with each one-code-per-step
    prior in turn, the decoder's in `precision`: the prefix in one product per matrix, then one
    per step and matrix, and after each the fp32 output layer on `n` rows (one code each)."""
    work = []
    for prior in priors:
        c = prior.config
        like = torch.zeros(1, c.hidden_size)
        layers = CachedDecoder(prior.decoder, 1, 1, like, precision).layers  # packed weights
        head = prior.head.weight.t().contiguous()
        inner = prior.decoder.config.intermediate_size
        for rows in [n * c.prefix_length] + [n] * (c.steps - 1):
            work.append((layers, head, torch.randn(rows, c.hidden_size), torch.randn(rows, inner)))
    start = time.perf_counter()
    for layers, head, x, inner in work:
        for qkv, out, gate_up, down in layers:
            qkv(x), out(x), gate_up(x), down(inner)
        x[:n] @ head
    return time.perf_counter() - start


def main() -> dict:
    figures = {
        "machine": machine(),
        "images": IMAGES,
        "prior": "mlp_ratio 4; 4 layers top, 5 layers bottom; width per form",
        "grids": {},
    }
    native_bf16 = figures["machine"]["avx512_bf16"] or figures["machine"]["amx"]
    skip_reason = {}  # precision -> why its rows are not timed on this machine
    if not native_bf16:
        skip_reason["bf16"] = "no native bf16 here"
    if not fp16_weights_available():
        skip_reason[FP16W] = "no fbgemm (x86) here"
    for name, (top, bottom) in GRIDS.items():
        for form, shape in FORMS.items():
            shape = dict(shape)
            recompute = shape.pop("recompute")
            precision = shape.pop("precision", "fp32")
            if precision in skip_reason:
                figures["grids"].setdefault(name, {})[form] = {"skipped": skip_reason[precision]}
                continue
            top_prior, bottom_prior = _priors(top, bottom, **shape)
            runs = [sample_rate(top_prior, bottom_prior, IMAGES, True, precision) for _ in range(3)]
            cached = sorted(runs, key=lambda r: r["seconds"])[1]  # the median run
            row = {
                **shape,
                "precision": precision,
                "parameters": {
                    "top": sum(p.numel() for p in top_prior.parameters()),
                    "bottom": sum(p.numel() for p in bottom_prior.parameters()),
                },
                "decoder_steps": {
                    "top": top_prior.config.steps,
                    "bottom": bottom_prior.config.steps,
                },
                "gflop_per_image": round(
                    gflop_per_image(top_prior) + gflop_per_image(bottom_prior), 3
                ),
                "kv_cached": {k: v for k, v in cached.items() if k != "codes"},
                "kv_cached_runs_seconds": [r["seconds"] for r in runs],
                "vs_pixelsnail_small_reference": round(
                    cached["tokens_per_s"] / REFERENCE_TOKENS_S[name], 2
                ),
                "speedup_vs_reference_seconds": round(
                    REFERENCE_SECONDS[name] / cached["seconds"], 1
                ),
                "spread_seconds": round(statistics.pstdev(r["seconds"] for r in runs), 3),
            }
            if recompute:
                full = sample_rate(top_prior, bottom_prior, IMAGES, False)
                row["full_recompute"] = {k: v for k, v in full.items() if k != "codes"}
                row["speedup_cache"] = round(full["seconds"] / cached["seconds"], 2)
                row["same_codes"] = all(
                    torch.equal(cached["codes"][k], full["codes"][k]) for k in ("top", "bottom")
                )
            if shape["patch"] == [1, 1] and precision != "bf16":
                floor = statistics.median(
                    matmul_floor((top_prior, bottom_prior), IMAGES, precision) for _ in range(3)
                )
                row["matmul_floor_seconds"] = round(floor, 3)
                row["best_speedup_vs_reference_seconds"] = round(REFERENCE_SECONDS[name] / floor, 1)
            figures["grids"].setdefault(name, {})[form] = row
            print(name, form, row, flush=True)
    write("prior_sampling", figures)
    return figures


if __name__ == "__main__":
    main()
