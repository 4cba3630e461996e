import math

import numpy as np
import pytest

from stages.sources import dsprites


def _centre_of_mass(image: np.ndarray) -> np.ndarray:
    """(row, column) centre of mass of the on pixels of an ``h w`` image."""
    return np.argwhere(image > 0).mean(axis=0)


def _area(image: np.ndarray) -> int:
    return int(np.count_nonzero(image))


def _reference_render(factors, size: int = 64, samples: int = 8) -> np.ndarray:
    """Brute force: every pixel's 8x8 samples tested against the shape, float64, no caching."""
    shape, scale_index, orientation_index, x_index, y_index = factors
    scale = 0.5 + 0.1 * scale_index
    angle = 2 * math.pi * orientation_index / 39
    centre_x, centre_y = 14.5 + 1.125 * x_index, 14.5 + 1.125 * y_index
    t = (np.arange(size * samples) + 0.5) / samples
    dx, up = t[None, :] - centre_x, centre_y - t[:, None]
    u = (math.cos(angle) * dx + math.sin(angle) * up) / scale
    v = (-math.sin(angle) * dx + math.cos(angle) * up) / scale
    if shape == 0:
        inside = np.maximum(np.abs(u), np.abs(v)) <= 10
    elif shape == 1:
        inside = (u / 13) ** 2 + (v / 6.5) ** 2 <= 1
    else:
        x, y = u / 10, v / 10 + 0.29349
        inside = (x**2 + y**2 - 1) ** 3 <= x**2 * y**3
    coverage = inside.reshape(size, samples, size, samples).mean(axis=(1, 3))
    return np.where(coverage >= 0.5, 255, 0).astype(np.uint8)


def test_factor_grid_matches_the_original_dataset():
    assert dsprites.FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert dsprites.FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert dsprites.SHAPES == ("square", "ellipse", "heart")
    assert dsprites.grid_size() == 737_280 == 3 * 6 * 40 * 32 * 32
    for name, size in zip(dsprites.FACTOR_NAMES, dsprites.FACTOR_SIZES, strict=True):
        assert len(dsprites.factor_values(name)) == size


def test_factor_values_ranges():
    np.testing.assert_allclose(dsprites.factor_values("scale"), [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    orientation = dsprites.factor_values("orientation")
    assert len(orientation) == 40
    assert orientation[0] == 0.0 and orientation[-1] == pytest.approx(2 * math.pi)
    np.testing.assert_allclose(np.diff(orientation), 2 * math.pi / 39)
    for name in ("pos_x", "pos_y"):
        position = dsprites.factor_values(name)
        assert len(position) == 32 and position[0] == 0.0 and position[-1] == 1.0
        np.testing.assert_allclose(np.diff(position), 1 / 31)
    np.testing.assert_array_equal(dsprites.factor_values("shape"), [1, 2, 3])
    with pytest.raises(ValueError, match="unknown dSprites factor"):
        dsprites.factor_values("color")


def test_factor_grid_index_is_c_order():
    sizes = dsprites.FACTOR_SIZES
    rows = np.array([[0, 0, 0, 0, 0], [2, 5, 39, 31, 31], [1, 2, 3, 4, 5], [0, 0, 0, 0, 1]])
    expected = [
        (((s * sizes[1] + sc) * sizes[2] + o) * sizes[3] + x) * sizes[4] + y
        for s, sc, o, x, y in rows
    ]
    np.testing.assert_array_equal(dsprites.factor_grid_index(rows), expected)
    assert expected[1] == dsprites.grid_size() - 1
    every = dsprites.factor_grid_index(dsprites.sample_factors(5000, seed=0))
    assert every.min() >= 0 and every.max() < dsprites.grid_size()
    with pytest.raises(ValueError, match="orientation index out of range"):
        dsprites.factor_grid_index(np.array([[0, 0, 40, 0, 0]]))


def test_pos_x_moves_the_column_and_pos_y_the_row():
    for shape, scale, orientation in [(0, 5, 0), (1, 2, 7), (2, 4, 21)]:
        along_x = np.array(
            [_centre_of_mass(dsprites.render(shape, scale, orientation, x, 16)) for x in range(32)]
        )
        along_y = np.array(
            [_centre_of_mass(dsprites.render(shape, scale, orientation, 16, y)) for y in range(32)]
        )
        assert np.all(np.diff(along_x[:, 1]) > 0), "pos_x must move the centre right (columns)"
        assert np.ptp(along_x[:, 0]) < 0.5, "pos_x must not move the sprite along rows"
        assert np.all(np.diff(along_y[:, 0]) > 0), "pos_y must move the centre down (rows)"
        assert np.ptp(along_y[:, 1]) < 0.5, "pos_y must not move the sprite along columns"
        # the centre travels 1.125 px per step, 34.9 px in all
        assert along_x[-1, 1] - along_x[0, 1] == pytest.approx(34.875, abs=0.6)


def test_scale_increases_area():
    for shape in range(3):
        for orientation in (0, 5, 13):
            areas = [_area(dsprites.render(shape, s, orientation, 10, 20)) for s in range(6)]
            assert np.all(np.diff(areas) > 0), (dsprites.SHAPES[shape], orientation, areas)
            assert areas[-1] / areas[0] == pytest.approx(4.0, rel=0.15)  # (1 / 0.5)^2
    # the largest square spans 20 px
    rows, cols = np.nonzero(dsprites.render(0, 5, 0, 0, 0))
    assert 20 <= np.ptp(rows) + 1 <= 21 and 20 <= np.ptp(cols) + 1 <= 21


def test_shapes_differ():
    for scale, orientation in [(5, 0), (3, 11)]:
        images = [dsprites.render(shape, scale, orientation, 16, 16) for shape in range(3)]
        areas = [_area(im) for im in images]
        for a in range(3):
            for b in range(a + 1, 3):
                assert np.count_nonzero(images[a] != images[b]) > 0.1 * max(areas)
    # the heart is upright at orientation 0: its lobes (wide part) are above its point
    heart = dsprites.render(2, 5, 0, 16, 16)
    rows = np.nonzero(heart.any(axis=1))[0]
    widths = np.count_nonzero(heart[rows], axis=1)
    assert widths[: len(rows) // 3].mean() > widths[-len(rows) // 3 :].mean()


def test_sprites_stay_inside_the_canvas():
    # each extreme position has an interior partner 8 steps (exactly 9 px) inward, at the same
    # sub-pixel phase: an uncut sprite is the partner's image moved by 9 px
    corners = [(x, y) for x in (0, 31) for y in (0, 31)]
    inward = {0: 8, 31: 23}
    rows = [[s, 5, o, x, y] for s in range(3) for o in range(40) for x, y in corners]
    partners = [[s, sc, o, inward[x], inward[y]] for s, sc, o, x, y in rows]
    images = dsprites.render_batch(np.array(rows + partners))[..., 0]
    at_corners, inside = images[: len(rows)], images[len(rows) :]
    border = np.concatenate(
        [at_corners[:, 0, :], at_corners[:, -1, :], at_corners[:, :, 0], at_corners[:, :, -1]],
        axis=-1,
    )
    assert not border.any(), "a sprite at an extreme position touches the canvas border"
    for (_, _, _, x, y), corner, partner in zip(rows, at_corners, inside, strict=True):
        moved = np.roll(partner, (9 * np.sign(y - inward[y]), 9 * np.sign(x - inward[x])), (0, 1))
        np.testing.assert_array_equal(corner, moved)
    # exactly 45 degrees (between grid values): the square's corners reach 14.14 px, within the
    # margin between the extreme centres (14.5 and 49.375 px) and the canvas edges
    half = dsprites._mask_half_width(1.0, 64)
    offsets = (np.arange(2 * half) + 0.5 - half) / dsprites.SUPERSAMPLE
    for shape in range(3):
        mask = dsprites._shape_mask(shape, 1.0, math.pi / 4, 64)
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any()
        reach = np.abs(offsets[np.nonzero(mask.any(axis=0))[0]]).max()
        assert reach <= min(14.5, 64 - 49.375)


def test_matches_brute_force_rendering():
    factors = dsprites.sample_factors(12, seed=7)
    factors[:3] = [[0, 5, 5, 0, 31], [1, 0, 0, 31, 0], [2, 5, 20, 31, 31]]
    images = dsprites.render_batch(factors)[..., 0]
    for row, image in zip(factors, images, strict=True):
        reference = _reference_render(row)
        assert np.count_nonzero(image != reference) == 0, row


def test_generate_is_deterministic_binary_and_consistent():
    images, factors = dsprites.generate(64, seed=3)
    assert images.shape == (64, 64, 64, 1) and images.dtype == np.uint8
    assert factors.shape == (64, 5) and np.issubdtype(factors.dtype, np.integer)
    assert set(np.unique(images)) <= {0, 255}
    assert np.all(np.count_nonzero(images, axis=(1, 2, 3)) > 0)
    again_images, again_factors = dsprites.generate(64, seed=3)
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(factors, again_factors)
    other_images, other_factors = dsprites.generate(64, seed=4)
    assert not np.array_equal(factors, other_factors)
    assert not np.array_equal(images, other_images)
    np.testing.assert_array_equal(factors, dsprites.sample_factors(64, seed=3))
    np.testing.assert_array_equal(images[5, :, :, 0], dsprites.render(*factors[5]))
    assert np.all((factors >= 0) & (factors < np.array(dsprites.FACTOR_SIZES)))


def test_other_sizes_scale_the_geometry():
    small = dsprites.render(0, 5, 0, 0, 0, size=32)
    large = dsprites.render(0, 5, 0, 0, 0, size=128)
    assert small.shape == (32, 32) and large.shape == (128, 128)
    assert _area(small) == pytest.approx(_area(dsprites.render(0, 5, 0, 0, 0)) / 4, rel=0.15)
    assert _area(large) == pytest.approx(_area(dsprites.render(0, 5, 0, 0, 0)) * 4, rel=0.15)
