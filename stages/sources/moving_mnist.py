"""Procedural sequences of moving MNIST digits, the data of the TD-VAE stage.

Two generators, each a frozen dataclass of its parameters (`GENERATORS` maps their names):

- `Bouncing`: bouncing Moving MNIST (Srivastava et al. 2015). ``num_digits`` digits (resized to
  ``digit_size`` px, bilinear, when that differs from the pool's) move on a ``canvas`` x
  ``canvas`` frame. Each starts at a position uniform in ``[0, free]²`` (``free = canvas -
  digit_size``, the range of a digit's top-left corner) and moves in a direction uniform in
  ``[0, 2π)`` at ``speed * free`` px per frame. A coordinate that leaves ``[0, free]`` is
  reflected back inside (``x -> -x`` or ``x -> 2 free - x``) and its velocity component flips
  sign, so the speed never changes. Positions are continuous; a digit is pasted at its rounded
  position, and digits combine by pixelwise max.
- `Shifted`: the one-digit horizontal shift of public TD-VAE reproductions. One digit, centred
  vertically (top row ``(canvas - digit_size) // 2``), starts at a column uniform in
  ``[0, canvas)`` and moves ``shift`` px per frame to the left or the right (one direction per
  sequence), wrapping around the edges as ``np.roll`` does.

Every sequence comes from its own integer seed: ``numpy.random.default_rng(seed)`` draws, in this
order, the digit indices (uniform over the pool, with replacement), then the start positions,
then the directions (`Bouncing`: the angles; `Shifted`: left or right). So `generate_one`
regenerates any sequence from its seed, and changing that order changes every dataset (bump the
ingest stage's ``VERSION``). `sequence_seeds` numbers the rows of a batch: row ``i`` of a batch
drawn with seed ``s`` uses ``s * SEED_STRIDE + i``.

Shapes: the digit pool is uint8 ``n h w`` (or ``n h w 1``); frames are uint8 ``n t h w 1``;
positions and velocities are float64 ``n t k 2`` as (row, column) of each digit's top-left corner,
rows growing downwards; digit indices are int64 ``n k`` (``k = 1`` for `Shifted`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

SEED_STRIDE = 1_000_003  # rows per base seed before two base seeds' row seeds meet


@dataclass(frozen=True)
class Bouncing:
    """Bouncing Moving MNIST (Srivastava et al. 2015); defaults as in the paper.

    Args:
        frames: Frames per sequence.
        canvas: Frame side in pixels.
        num_digits: Digits per sequence.
        digit_size: Side of a digit on the canvas in pixels (pool digits are resized to it).
        speed: Distance per frame as a fraction of the free range ``canvas - digit_size``.
    """

    name: ClassVar[str] = "bouncing"

    frames: int = 20
    canvas: int = 64
    num_digits: int = 2
    digit_size: int = 28
    speed: float = 0.1

    def __post_init__(self):
        _check_frame(self.frames, self.canvas, self.digit_size)
        if self.num_digits < 1:
            raise ValueError(f"num_digits: must be at least 1, got {self.num_digits}")
        if not 0.0 <= self.speed <= 1.0:
            raise ValueError(
                f"speed: must be in [0, 1] (a fraction of canvas - digit_size per frame), "
                f"got {self.speed}"
            )


@dataclass(frozen=True)
class Shifted:
    """One digit shifted horizontally with wrap-around, as in public TD-VAE reproductions.

    Args:
        frames: Frames per sequence.
        canvas: Frame side in pixels.
        digit_size: Side of the digit on the canvas in pixels (pool digits are resized to it).
        shift: Pixels moved per frame.
    """

    name: ClassVar[str] = "shifted"

    frames: int = 20
    canvas: int = 64
    digit_size: int = 28
    shift: int = 1

    def __post_init__(self):
        _check_frame(self.frames, self.canvas, self.digit_size)
        if not 1 <= self.shift < self.canvas:
            raise ValueError(
                f"shift: must be between 1 and canvas - 1 ({self.canvas - 1}), got {self.shift}"
            )


GENERATORS = {Bouncing.name: Bouncing, Shifted.name: Shifted}


@dataclass
class Sequences:
    """Generated sequences with their ground truth (shapes in the module docstring).

    Attributes:
        frames: uint8 ``n t h w 1``.
        positions: float64 ``n t k 2``, (row, column) of each digit's top-left corner per frame.
        velocities: float64 ``n t k 2``, the velocity (px per frame) each digit leaves frame
            ``t`` with; a bounce between frames ``t`` and ``t + 1`` shows as a flipped component
            at ``t + 1``.
        digits: int64 ``n k`` indices into the pool.
        seeds: int64 ``n``, the seed of each sequence.
    """

    frames: np.ndarray
    positions: np.ndarray
    velocities: np.ndarray
    digits: np.ndarray
    seeds: np.ndarray

    def __len__(self) -> int:
        return len(self.seeds)


def sequence_seeds(seed: int, count: int, start: int = 0) -> np.ndarray:
    """The seeds of rows ``start .. start + count - 1`` of a batch drawn with `seed`.

    Row ``i`` uses ``seed * SEED_STRIDE + i``: distinct for every (seed, row) with fewer than
    `SEED_STRIDE` rows, and readable back from a table's ``seed`` column.

    Args:
        seed: The batch's base seed, non-negative.
        count: Number of rows.
        start: Index of the first row.

    Returns:
        int64 ``count``.
    """
    if seed < 0 or start < 0:
        raise ValueError(f"seed and start must be non-negative, got seed {seed}, start {start}")
    return seed * SEED_STRIDE + start + np.arange(count, dtype=np.int64)


def generate(params: Bouncing | Shifted, pool: np.ndarray, seeds) -> Sequences:
    """Draws one sequence per seed.

    Args:
        params: The generator and its parameters.
        pool: uint8 ``n h w`` (or ``n h w 1``) digits to draw from, e.g. MNIST's 28x28.
        seeds: Non-negative integer seeds, one per sequence (see `sequence_seeds`).

    Returns:
        The sequences, in the order of `seeds`.
    """
    pool = _check_pool(pool)
    seeds = np.asarray(seeds, np.int64).reshape(-1)
    k = params.num_digits if isinstance(params, Bouncing) else 1
    digits = np.zeros((len(seeds), k), np.int64)
    start, velocity = np.zeros((2, len(seeds), k, 2))
    for i, seed in enumerate(seeds.tolist()):
        digits[i], start[i], velocity[i] = _draw(params, len(pool), seed)
    if isinstance(params, Bouncing):
        free = float(params.canvas - params.digit_size)
        positions, velocities = _bounce(start, velocity, free, params.frames)
    else:
        steps = np.arange(params.frames, dtype=np.float64)[None, :, None, None]
        positions = start[:, None] + steps * velocity[:, None]
        positions[..., 1] %= params.canvas
        velocities = np.repeat(velocity[:, None], params.frames, axis=1)
    frames = np.zeros((len(seeds), params.frames, params.canvas, params.canvas, 1), np.uint8)
    for i, sequence_digits in enumerate(digits):
        glyphs = [_resize(pool[d], params.digit_size) for d in sequence_digits]
        if isinstance(params, Bouncing):
            _paste(frames[i, ..., 0], glyphs, positions[i])
        else:
            _paste_wrapped(frames[i, ..., 0], glyphs[0], positions[i])
    return Sequences(frames, positions, velocities, digits, seeds)


def generate_one(params: Bouncing | Shifted, pool: np.ndarray, seed: int) -> Sequences:
    """Regenerates the one sequence of `seed` (e.g. a table row's ``seed``); ``n`` is 1."""
    return generate(params, pool, [seed])


# ----- motion -------------------------------------------------------------------------------


def _draw(params: Bouncing | Shifted, pool_size: int, seed: int):
    """The random choices of one sequence, in their fixed order (digits, start, direction):
    digit indices ``k``, start position ``k 2`` and velocity ``k 2``, as (row, column)."""
    rng = np.random.default_rng(seed)
    if isinstance(params, Bouncing):
        k, free = params.num_digits, params.canvas - params.digit_size
        digits = rng.integers(0, pool_size, size=k)
        start = rng.uniform(0.0, free, size=(k, 2))
        angle = rng.uniform(0.0, 2.0 * math.pi, size=k)
        velocity = params.speed * free * np.stack([np.sin(angle), np.cos(angle)], axis=1)
        return digits, start, velocity
    digits = rng.integers(0, pool_size, size=1)
    start = np.array([[(params.canvas - params.digit_size) // 2, rng.integers(0, params.canvas)]])
    velocity = np.array([[0, params.shift if rng.integers(0, 2) else -params.shift]])
    return digits, start.astype(np.float64), velocity.astype(np.float64)


def _bounce(start: np.ndarray, velocity: np.ndarray, free: float, frames: int):
    """Straight-line motion reflected inside ``[0, free]``: positions and velocities ``n t k 2``
    from start positions and velocities ``n k 2``."""
    positions = np.zeros((len(start), frames, *start.shape[1:]))
    velocities = np.zeros_like(positions)
    position = start
    for t in range(frames):
        positions[:, t], velocities[:, t] = position, velocity
        position = position + velocity
        below, above = position < 0.0, position > free
        position = np.where(below, -position, np.where(above, 2.0 * free - position, position))
        velocity = np.where(below | above, -velocity, velocity)
    return positions, velocities


# ----- drawing ------------------------------------------------------------------------------


def _paste(frames: np.ndarray, glyphs: list[np.ndarray], positions: np.ndarray) -> None:
    """Draws each glyph at its rounded position into `frames` (``t h w``) by pixelwise max."""
    size = glyphs[0].shape[0]
    corners = np.rint(positions).astype(np.int64)
    for frame, frame_corners in zip(frames, corners, strict=True):
        for glyph, (row, column) in zip(glyphs, frame_corners, strict=True):
            window = frame[row : row + size, column : column + size]
            np.maximum(window, glyph, out=window)


def _paste_wrapped(frames: np.ndarray, glyph: np.ndarray, positions: np.ndarray) -> None:
    """Draws the glyph at each frame's position into `frames` (``t h w``), columns wrapping
    around as ``np.roll`` does: column ``j`` of frame ``t`` is column ``(j - column_t) mod w``
    of the glyph placed at the left edge."""
    size = glyph.shape[0]
    row = int(positions[0, 0, 0])
    at_left = np.zeros(frames.shape[1:], np.uint8)
    at_left[row : row + size, :size] = glyph
    width = at_left.shape[1]
    columns = (np.arange(width) - positions[:, 0, 1:].astype(np.int64)) % width  # t w
    frames[:] = np.moveaxis(at_left[:, columns], 1, 0)


def _resize(digit: np.ndarray, size: int) -> np.ndarray:
    if digit.shape == (size, size):
        return digit
    from PIL import Image

    return np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR), np.uint8)


def _check_frame(frames: int, canvas: int, digit_size: int) -> None:
    if frames < 2:
        raise ValueError(
            f"frames: must be at least 2 (a sequence needs a next frame), got {frames}"
        )
    if not 4 <= canvas <= 4096:
        raise ValueError(f"canvas: must be between 4 and 4096 pixels, got {canvas}")
    if not 1 <= digit_size <= canvas:
        raise ValueError(
            f"digit_size: must be between 1 and the canvas ({canvas} px) so the digit fits, "
            f"got {digit_size}"
        )


def _check_pool(pool) -> np.ndarray:
    pool = np.asarray(pool)
    if pool.ndim == 4 and pool.shape[-1] == 1:
        pool = pool[..., 0]
    if pool.dtype != np.uint8 or pool.ndim != 3 or len(pool) == 0:
        raise ValueError(
            f"pool: expected a non-empty uint8 array of digits n h w, got {pool.dtype} {pool.shape}"
        )
    return pool
