"""Shared benchmark helpers: machine figures measured in the same run, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n matmul in `dtype` on this CPU, right now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(torch.cpu._is_amx_tile_supported())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "avx512_bf16": avx512_bf16,
        "amx": amx,
        "matmul_fp32_gflops": round(matmul_gflops(torch.float32), 1),
        # without native bf16 a 2048^2 bf16 matmul crawls (~0.3 GFLOP/s here): time a small one
        "matmul_bf16_gflops": round(
            matmul_gflops(torch.bfloat16, *((2048, 5) if avx512_bf16 or amx else (256, 2))), 1
        ),
    }


def median_rate(fn, items_per_call: int, calls: int, repeats: int = 3) -> float:
    """Median over `repeats` of items/s for `calls` consecutive calls of `fn`."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rates.append(items_per_call * calls / (time.perf_counter() - t))
    return statistics.median(rates)


def write(name: str, figures: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return path
