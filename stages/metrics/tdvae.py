"""Val figures of a TD-VAE (`models.tdvae`) and of its frame-VAE pre-training, on fixed draws
so that two evaluations of one model agree. Frames: float ``b t c h w`` in [0, 1]."""

from __future__ import annotations

import torch
from einops import rearrange

from models.tdvae import TDVAE, FrameVAE

PRETRAIN_TERMS = ("loss", "recon", "kl")
VAL_TERMS = ("recon", "kl", "belief_t2", "transition")  # the TD-VAE's unweighted terms


@torch.no_grad()
def evaluate_frames(frame_vae: FrameVAE, frames: torch.Tensor, device, seed: int = 0) -> dict:
    """The frame VAE's val terms (``val_pretrain_<term>``) over every frame of the val
    sequences, with fixed latent samples (the global RNG is restored afterwards)."""
    if len(frames) == 0:
        return {}
    flat = rearrange(frames, "b t c h w -> (b t) c h w")
    sums = dict.fromkeys(PRETRAIN_TERMS, 0.0)
    frame_vae.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(flat), 1024):
            out = frame_vae(flat[start : start + 1024].to(device))
            for k in sums:
                sums[k] += float(out[k]) * min(1024, len(flat) - start)
    frame_vae.train()
    return {f"val_pretrain_{k}": v / len(flat) for k, v in sums.items()}


@torch.no_grad()
def evaluate(
    model: TDVAE, frames: torch.Tensor, device: torch.device, draws: int = 4, seed: int = 0
) -> dict:
    """Val loss terms (``val_<term>``) averaged over `draws` draws of one (t1, Δ) pair per
    sequence, with fixed pairs and latent samples (the global RNG is restored afterwards).
    ``val_loss`` is the negative objective with weight 1 on every term, warm-up or not."""
    if len(frames) == 0:
        return {}
    model.eval()
    sums = dict.fromkeys(VAL_TERMS, 0.0)
    pairs = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(draws):
            for start in range(0, len(frames), 256):
                x = frames[start : start + 256].to(device)
                out = model(x, generator=pairs)
                for k in sums:
                    sums[k] += float(out[k]) * len(x)
    model.train()
    metrics = {f"val_{k}": v / (draws * len(frames)) for k, v in sums.items()}
    metrics["val_loss"] = (
        metrics["val_recon"]
        + metrics["val_kl"]
        + metrics["val_belief_t2"]
        - metrics["val_transition"]
    )
    return metrics
