"""Prior training speed: tokens/s of one training step (forward, backward, AdamW) on CPU.

The two-level grids of DESIGN.md's reference figures, 32px (4x4 top + 8x8 bottom) and 64px
(8x8 top + 16x16 bottom), with the sampling benchmark's priors (hidden 320, 4 heads; 4 layers
top, 5 layers bottom). The in-run references are the machine itself: achieved GFLOP/s of the
step (6 x parameters x tokens, plus attention) against the same run's fp32 and bf16 matmul
GFLOP/s, and the step in fp32 against the step under bf16 autocast where the CPU has bf16.

    python -m bench.prior_training
"""

from __future__ import annotations

import time

import torch

from bench.common import machine, write
from models.prior import CodePrior, PriorConfig

GRIDS = {"32px": ([4, 4], [8, 8]), "64px": ([8, 8], [16, 16])}
BATCH = 32


def _prior(grid, context, layers) -> CodePrior:
    torch.manual_seed(0)
    return CodePrior(
        PriorConfig(
            grid=grid,
            codebook_size=512,
            context_grids=context,
            context_codebook_sizes={k: 512 for k in context},
            num_classes=10,
            hidden_size=320,
            heads=4,
            layers=layers,
        )
    )


def step_rate(model: CodePrior, bf16: bool, steps: int = 6) -> dict:
    """Tokens/s and GFLOP/s of training steps (after one warm-up step)."""
    c = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    codes = torch.randint(c.codebook_size, (BATCH, *c.grid))
    context = {k: torch.randint(512, (BATCH, *g)) for k, g in c.context_grids.items()}
    labels = torch.randint(10, (BATCH,))
    seconds = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(codes, context, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i:
            seconds.append(time.perf_counter() - start)
    per_step = sorted(seconds)[len(seconds) // 2]
    tokens = BATCH * c.length
    sequence = c.prefix_length + c.length - 1
    dense = sum(p.numel() for n, p in model.named_parameters() if "decoder.layers" in n)
    dense += model.head.weight.numel() * c.length / sequence
    attention = 4 * c.layers * sequence * c.hidden_size  # QK^T and AV per token, fwd
    flops = 3 * (2 * dense + attention) * BATCH * sequence  # forward + backward (2x)
    return {
        "seconds_per_step": round(per_step, 4),
        "tokens_per_s": round(tokens / per_step, 1),
        "gflops": round(flops / per_step / 1e9, 1),
    }


def main() -> dict:
    info = machine()
    has_bf16 = info["avx512_bf16"] or info["amx"]
    figures = {"machine": info, "batch": BATCH, "grids": {}}
    for name, (top, bottom) in GRIDS.items():
        row = {}
        for level, model in (
            ("top", _prior(top, {}, 4)),
            ("bottom", _prior(bottom, {"top": top}, 5)),
        ):
            fp32 = step_rate(model, bf16=False)
            entry = {
                "parameters": sum(p.numel() for p in model.parameters()),
                "fp32": fp32,
                "fp32_efficiency_vs_matmul": round(fp32["gflops"] / info["matmul_fp32_gflops"], 3),
            }
            if has_bf16:
                bf16 = step_rate(model, bf16=True)
                entry["bf16_autocast"] = bf16
                entry["bf16_speedup"] = round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 2)
            row[level] = entry
        figures["grids"][name] = row
        print(name, row, flush=True)
    write("prior_training", figures)
    return figures


if __name__ == "__main__":
    main()
