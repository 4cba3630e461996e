"""VQ-VAE-2 training and encoding throughput on the reference configuration of DESIGN.md.

Reference configuration: channel 128, 2 residual blocks of 32 channels, embed_dim 64, 512 codes,
batch 32 (training) and 256 (encoding), 3x32x32, 1x32x32 and 3x64x64 inputs.

Two variants of our model run in the same process, same weights shapes:
- ``baseline_fp32``: fp32, contiguous tensors: the same computation the reference implementation
  does (its layer shapes are identical), so it is the in-run reference;
- ``twostage``: what the train_autoencoder stage does by default: bf16 autocast (on CPUs with
  AVX512-BF16 / AMX) and channels-last memory format.
Each figure is also compared with the reference implementation's published figures
(DESIGN.md, measured on the same kind of 2-core machine), and the model's FLOPs per image with
the machine's measured matmul peak.

    python -m bench.vqvae2_throughput
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import machine, median_rate, write
from models.vqvae2 import VQVAE2, VQVAE2Config

# the reference implementation's figures from DESIGN.md (img/s, 2-core CPU, torch 2.13)
REFERENCE = {
    "3x32x32": {"train": 427, "encode": (1500, 1900)},
    "1x32x32": {"train": 512, "encode": None},
    "3x64x64": {"train": 150, "encode": (324, 324)},
}
SHAPES = [(3, 32), (1, 32), (3, 64)]


def _model(channels: int, size: int, fast: bool) -> VQVAE2:
    torch.manual_seed(0)
    model = VQVAE2(VQVAE2Config(image_size=size, in_channels=channels))
    return model.to(memory_format=torch.channels_last) if fast else model


def _input(batch: int, channels: int, size: int, fast: bool) -> torch.Tensor:
    x = torch.rand(batch, channels, size, size) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if fast else x


def train_rate(channels: int, size: int, fast: bool, batch: int = 32) -> float:
    model = _model(channels, size, fast)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    x = _input(batch, channels, size, fast)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    for _ in range(3):
        step()
    return median_rate(step, batch, calls=8 if size <= 32 else 4)


def encode_rate(channels: int, size: int, fast: bool, batch: int = 256) -> float:
    model = _model(channels, size, fast)
    model.train()
    model(_input(32, channels, size, fast))  # initialise the codebooks from data
    model.eval()
    x = _input(batch, channels, size, fast)

    def encode():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            model.encode_indices(x)

    encode()
    return median_rate(encode, batch, calls=4 if size <= 32 else 1)


def gflop_per_image(channels: int, size: int) -> dict:
    model = _model(channels, size, False)
    x = _input(8, channels, size, False)
    with FlopCounterMode(display=False) as counter:
        model(x)["loss"].backward()
    train = counter.get_total_flops() / 8 / 1e9
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_indices(x)
    return {"train": round(train, 4), "encode": round(counter.get_total_flops() / 8 / 1e9, 4)}


def main() -> dict:
    figures = {
        "machine": machine(),
        "config": "channel 128, 2 res blocks of 32, embed_dim 64, "
        "512 codes, batch 32 train / 256 encode",
        "shapes": {},
    }
    peak32 = figures["machine"]["matmul_fp32_gflops"]
    peak16 = figures["machine"]["matmul_bf16_gflops"]
    for channels, size in SHAPES:
        name = f"{channels}x{size}x{size}"
        flops = gflop_per_image(channels, size)
        row = {"gflop_per_image": flops}
        for variant, fast in (("baseline_fp32", False), ("twostage", True)):
            tr, en = train_rate(channels, size, fast), encode_rate(channels, size, fast)
            peak = peak16 if fast else peak32
            row[variant] = {
                "train_img_s": round(tr, 1),
                "encode_img_s": round(en, 1),
                "train_gflops": round(tr * flops["train"], 1),
                "train_fraction_of_matmul_peak": round(tr * flops["train"] / peak, 3),
            }
            print(f"{name} {variant:<14} train {tr:7.1f} img/s  encode {en:7.1f} img/s", flush=True)
        ours, base, ref = row["twostage"], row["baseline_fp32"], REFERENCE[name]
        row["speedup_vs_in_run_fp32"] = {
            "train": round(ours["train_img_s"] / base["train_img_s"], 2),
            "encode": round(ours["encode_img_s"] / base["encode_img_s"], 2),
        }
        row["speedup_vs_reference_figures"] = {
            "train": round(ours["train_img_s"] / ref["train"], 2),
            "encode": None
            if ref["encode"] is None
            else [round(ours["encode_img_s"] / r, 2) for r in ref["encode"]],
        }
        figures["shapes"][name] = row
    write("vqvae2_throughput", figures)
    return figures


if __name__ == "__main__":
    main()
