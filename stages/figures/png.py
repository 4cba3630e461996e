"""Small image helpers shared by stages: PNG grids of uint8 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def grid(images: np.ndarray, nrow: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tiles uint8 images ``n h w c`` into one ``H W c`` image, `nrow` images per row."""
    n, h, w, c = images.shape
    ncol_rows = -(-n // nrow)
    canvas = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        canvas[top : top + h, left : left + w] = im
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def save_png(image: np.ndarray, path: Path) -> None:
    """Writes a uint8 ``H W c`` array (c = 1 or 3) as PNG."""
    from PIL import Image

    array = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(array).save(path, optimize=True)
