"""Procedural dSprites (Matthey et al. 2017): white shapes on black, 64x64, binary.

The five varying factors of the original dataset (its sixth, ``color``, has one value, white):

=============  ======  =====================================================
factor         values  real values (`factor_values`)
=============  ======  =====================================================
shape          3       square, ellipse, heart (the original's 1, 2, 3)
scale          6       linspace(0.5, 1, 6)
orientation    40      linspace(0, 2π, 40) radians (0 and 2π are the same)
pos_x          32      linspace(0, 1, 32): the image column, left to right
pos_y          32      linspace(0, 1, 32): the image row, top to bottom
=============  ======  =====================================================

The grid holds 3 x 6 x 40 x 32 x 32 = 737,280 combinations (`grid_size`); `factor_grid_index`
numbers them in C order over `FACTOR_SIZES`, as the original ``.npz`` does. As there, the square
repeats itself every π/2 and the ellipse every π of orientation; all 40 values are kept.

Geometry, in pixels of the 64-pixel canvas (everything scales with ``size / 64``):

- at scale 1 the square is 20 px on a side; the ellipse has semi-axes 13 px (along x at
  orientation 0) and 6.5 px; the heart is the region ``(x² + y² - 1)³ - x² y³ <= 0`` at 10 px per
  unit (22.8 px wide, 22.4 px tall), upright at orientation 0. Other scales multiply these sizes.
- the sprite's centre (the heart's: its centroid) is at ``14.5 + 1.125 * index`` px on both
  axes, i.e. ``64 * (0.2266 + 0.5449 * pos)``, from 14.5 to 49.375 px (pixel ``i`` spans
  ``[i, i + 1)``). The range of roughly 8..56 px quoted for the original would cut sprites at
  the border, as a 20 px square turned by 45° reaches 14.14 px from its centre; this one is
  about as wide as it can be while every sprite at every orientation stays whole.
- orientation turns the sprite counter-clockwise on screen about its centre.

Rendering: each pixel holds an 8x8 grid of samples at ``(k + 0.5) / 8`` px, a sample is on when
it lies inside the shape (an analytic inside test), and a pixel is on (255) when at least half
of its samples are (so an unrotated square whose edges cut pixels in half spans 21 px, else
20 px). The centres lie on the sample grid's cell corners (14.5 px = 116 samples,
step 1.125 px = 9 samples), so every position moves the sprite by whole samples (and no sample
lies on an edge of the unrotated square): one supersampled mask per (shape, scale, orientation)
serves every position exactly, its pixel coverages read from the mask's integral image at the
position's offset. Masks are cached (720 of them at 64 px, about 25 MB in all). At other sizes
the geometry scales and centres are rounded to the nearest cell corner (at most 1/16 px).

Images are uint8 ``n h w c`` with c = 1 (``h w`` for `render`), values 0 or 255.
"""

from __future__ import annotations

import functools
import math

import numpy as np

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
SUPERSAMPLE = 8  # samples per pixel along each axis

_REFERENCE_SIZE = 64  # the pixel sizes below are for a canvas of this size
_CENTRE_FIRST_PX = 14.5
_CENTRE_STEP_PX = 1.125  # 9 samples of 1/8 px
_SQUARE_HALF_SIDE_PX = 10.0
_ELLIPSE_SEMI_AXES_PX = (13.0, 6.5)
_HEART_PX_PER_UNIT = 10.0
_HEART_CENTROID_Y = 0.29349  # centroid of (x² + y² - 1)³ <= x² y³ (numerical integration)
_MAX_RADIUS_PX = _SQUARE_HALF_SIDE_PX * math.sqrt(2.0)  # farthest sprite point from its centre


def factor_values(name: str) -> np.ndarray:
    """The real values of one factor, in index order, as in the original dataset.

    Args:
        name: One of `FACTOR_NAMES`.

    Returns:
        float64 array: shape 1, 2, 3 (square, ellipse, heart); scale 0.5..1 (6 values);
        orientation 0..2π radians (40 values); pos_x and pos_y 0..1 (32 values).
    """
    if name == "shape":
        return np.arange(1.0, 4.0)
    if name == "scale":
        return np.linspace(0.5, 1.0, 6)
    if name == "orientation":
        return np.linspace(0.0, 2.0 * np.pi, 40)
    if name in ("pos_x", "pos_y"):
        return np.linspace(0.0, 1.0, 32)
    raise ValueError(f"unknown dSprites factor {name!r}; choose one of {FACTOR_NAMES}")


def grid_size() -> int:
    """The number of factor combinations, 3 * 6 * 40 * 32 * 32 = 737,280."""
    return math.prod(FACTOR_SIZES)


def factor_grid_index(factors: np.ndarray) -> np.ndarray:
    """Flat index of factor index rows in the full grid (C order over `FACTOR_SIZES`).

    Args:
        factors: int ``n 5`` (or one row of 5) factor indices, columns as `FACTOR_NAMES`.

    Returns:
        int64 ``n`` (or a scalar array for one row) in ``[0, grid_size())``.
    """
    factors = _check_factors(factors)
    return np.ravel_multi_index(tuple(factors.T), FACTOR_SIZES).astype(np.int64)


def sample_factors(n: int, seed: int) -> np.ndarray:
    """Draws `n` factor index rows uniformly over the grid (each factor independently).

    Args:
        n: Number of rows.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        int64 ``n 5``, columns as `FACTOR_NAMES`.
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, FACTOR_SIZES, size=(n, len(FACTOR_SIZES)), dtype=np.int64)


def render(
    shape: int,
    scale_index: int,
    orientation_index: int,
    x_index: int,
    y_index: int,
    size: int = 64,
) -> np.ndarray:
    """Renders one sprite.

    Args:
        shape: 0 square, 1 ellipse, 2 heart (`SHAPES`).
        scale_index: Index into ``factor_values("scale")``.
        orientation_index: Index into ``factor_values("orientation")``.
        x_index: Index into ``factor_values("pos_x")`` (image column).
        y_index: Index into ``factor_values("pos_y")`` (image row).
        size: Canvas side in pixels.

    Returns:
        uint8 ``h w`` image with values 0 and 255.
    """
    factors = np.array([[shape, scale_index, orientation_index, x_index, y_index]])
    return render_batch(factors, size)[0, :, :, 0]


def render_batch(factors: np.ndarray, size: int = 64) -> np.ndarray:
    """Renders one sprite per factor index row.

    Args:
        factors: int ``n 5`` factor indices, columns as `FACTOR_NAMES`.
        size: Canvas side in pixels.

    Returns:
        uint8 ``n h w 1`` images with values 0 and 255.
    """
    factors = _check_factors(factors).reshape(-1, len(FACTOR_SIZES))
    if size < 8:
        raise ValueError(f"size: must be at least 8 pixels, got {size}")
    n = len(factors)
    out = np.zeros((n, size, size), np.uint8)
    flat = out.reshape(-1)
    s = SUPERSAMPLE
    centre_col = _centre_samples(factors[:, 3], size)
    centre_row = _centre_samples(factors[:, 4], size)
    groups = np.ravel_multi_index(tuple(factors[:, :3].T), FACTOR_SIZES[:3])
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        shape, scale_index, orientation_index = factors[members[0], :3]
        mask = _mask(int(shape), int(scale_index), int(orientation_index), size)
        integral = _integral_image(mask)
        half = mask.shape[0] // 2
        pixels = (integral.shape[0] - 1) // s - 1  # pixel rows the mask can touch
        steps = s * np.arange(pixels + 1)
        # first pixel the mask touches and where that pixel starts in the padded mask
        first_row, first_col = (centre_row[members] - half) // s, (centre_col[members] - half) // s
        start_row = first_row * s - (centre_row[members] - half) + s
        start_col = first_col * s - (centre_col[members] - half) + s
        rows = start_row[:, None] + steps
        cols = start_col[:, None] + steps
        corners = integral[rows[:, :, None], cols[:, None, :]]
        coverage = (
            corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
        )
        on = 2 * coverage >= s * s
        pixel_row = first_row[:, None, None] + np.arange(pixels)[None, :, None]
        pixel_col = first_col[:, None, None] + np.arange(pixels)[None, None, :]
        keep = on & (pixel_row >= 0) & (pixel_row < size) & (pixel_col >= 0) & (pixel_col < size)
        index = (members[:, None, None] * size + pixel_row) * size + pixel_col
        flat[index[keep]] = 255
    return out[..., None]


def generate(n: int, seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draws `n` sprites with factors uniform over the grid.

    20,000 images at 64 px take about 0.7 s on one CPU core once the shape masks are cached;
    the first call also builds the masks it needs (under a second for all 720).

    Args:
        n: Number of images.
        seed: Seed of the factor draw; the same seed gives the same images and factors.
        size: Canvas side in pixels.

    Returns:
        ``(images, factors)``: uint8 ``n h w 1`` (0 or 255) and int64 ``n 5`` factor indices,
        columns as `FACTOR_NAMES`.
    """
    factors = sample_factors(n, seed)
    return render_batch(factors, size), factors


# ----- geometry -----------------------------------------------------------------------------


def _check_factors(factors) -> np.ndarray:
    factors = np.asarray(factors)
    if factors.shape[-1:] != (len(FACTOR_SIZES),) or not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(
            f"factors: expected integer indices of shape (n, {len(FACTOR_SIZES)}), "
            f"got {factors.dtype} {factors.shape}"
        )
    bad = (factors < 0) | (factors >= np.asarray(FACTOR_SIZES))
    if bad.any():
        column = int(np.argwhere(bad)[0][-1])
        raise ValueError(
            f"factors: {FACTOR_NAMES[column]} index out of range [0, {FACTOR_SIZES[column]})"
        )
    return factors.astype(np.int64)


def _centre_samples(index: np.ndarray, size: int) -> np.ndarray:
    """Centre positions in samples (sample ``t`` spans ``[t, t + 1) / SUPERSAMPLE`` px)."""
    centre_px = (_CENTRE_FIRST_PX + _CENTRE_STEP_PX * index) * size / _REFERENCE_SIZE
    return np.rint(centre_px * SUPERSAMPLE).astype(np.int64)


def _mask_half_width(scale: float, size: int) -> int:
    """Half side, in samples, of a square of samples that holds any sprite of `scale`."""
    return math.ceil(_MAX_RADIUS_PX * scale * size / _REFERENCE_SIZE * SUPERSAMPLE) + 1


@functools.lru_cache(maxsize=math.prod(FACTOR_SIZES[:3]))
def _mask(shape: int, scale_index: int, orientation_index: int, size: int) -> np.ndarray:
    """Supersampled bool mask ``2 half x 2 half`` of one sprite, centred between its middle samples."""
    scale = factor_values("scale")[scale_index]
    angle = factor_values("orientation")[orientation_index]
    mask = _shape_mask(shape, scale, angle, size)
    mask.flags.writeable = False
    return mask


def _shape_mask(shape: int, scale: float, angle: float, size: int) -> np.ndarray:
    half = _mask_half_width(scale, size)
    offsets = (np.arange(2 * half, dtype=np.float32) + np.float32(0.5 - half)) / SUPERSAMPLE
    dx, dy = offsets[None, :], offsets[:, None]  # columns right, rows down
    up = -dy
    unit = scale * size / _REFERENCE_SIZE  # px per reference px
    cos, sin = np.float32(math.cos(angle) / unit), np.float32(math.sin(angle) / unit)
    # rotate the sample back by `angle` into the sprite's own frame (y up), in reference px
    u = cos * dx + sin * up
    v = cos * up - sin * dx
    if shape == 0:
        return (np.abs(u) <= _SQUARE_HALF_SIDE_PX) & (np.abs(v) <= _SQUARE_HALF_SIDE_PX)
    if shape == 1:
        a, b = _ELLIPSE_SEMI_AXES_PX
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if shape == 2:
        x2 = np.square(u / np.float32(_HEART_PX_PER_UNIT))
        y = v / np.float32(_HEART_PX_PER_UNIT) + np.float32(_HEART_CENTROID_Y)
        y2 = y * y
        w = x2 + y2 - np.float32(1.0)
        return w * w * w <= x2 * y2 * y
    raise ValueError(f"shape: index must be 0, 1 or 2 ({', '.join(SHAPES)}), got {shape}")


def _integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of `mask` padded by one pixel of samples before and enough after.

    ``integral[a, b]`` counts the on samples of the padded mask above row ``a`` and left of
    column ``b``; the mask starts at padded index ``SUPERSAMPLE``.
    """
    s = SUPERSAMPLE
    side = mask.shape[0]
    pixels = -(-(side - 1) // s) + 1
    # uint16 sums wrap modulo 2**16, which the block sums read from them (at most 64) survive
    padded = np.zeros((s + pixels * s, s + pixels * s), np.uint16)
    padded[s : s + side, s : s + side] = mask
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), np.uint16)
    np.cumsum(padded, axis=0, dtype=np.uint16, out=padded)
    np.cumsum(padded, axis=1, dtype=np.uint16, out=integral[1:, 1:])
    return integral
