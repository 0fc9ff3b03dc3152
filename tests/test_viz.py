"""Pictures: the grid fitted to the number of heads, captions that stay within their tile, the colour
key, pictures at the photo's aspect and heat maps blended over a photo."""

from __future__ import annotations

import numpy as np
import pytest

from dinokit import viz

WHITE = (255, 255, 255)


@pytest.mark.parametrize(
    "n, shape",
    [(1, (1, 1)), (4, (2, 2)), (6, (2, 3)), (12, (3, 4)), (16, (4, 4)), (24, (4, 6))],
)
def test_grid_shape_fits_the_number_of_square_tiles(n, shape):
    assert viz.grid_shape(n) == shape


def test_grid_shape_never_leaves_a_whole_row_empty():
    for n in range(1, 40):
        for aspect in (0.5, 1.0, 1.5):
            rows, cols = viz.grid_shape(n, aspect, header=3)
            assert rows * cols >= n and (rows - 1) * cols < n


def test_captions_are_cut_to_their_tile_and_never_reach_the_next():
    tiles = [np.zeros((20, 20, 3), np.uint8) for _ in range(3)]
    labels = ["a caption far too long for one small tile of twenty pixels"] * 3
    grid = viz.make_grid(tiles, labels, cols=3, pad=4)
    # tiles of 20 px are enlarged (nearest) to 160 px: 3 * (160 + 4) + 4 wide
    assert grid.shape[1] == 3 * 164 + 4
    caption_rows = grid[4:20]
    for c in range(1, 3):  # the gaps between the tiles' columns stay background
        gap = caption_rows[:, c * 164 : c * 164 + 4]
        assert (gap == WHITE).all()
    assert (caption_rows[:, :164] != WHITE).any()  # some text was drawn


def test_fit_text_keeps_short_text_and_cuts_long_text():
    font = viz.load_font(12)
    assert viz.fit_text("head 3", font, 200) == "head 3"
    cut = viz.fit_text("x" * 200, font, 60)
    assert cut.endswith("...") and font.getlength(cut) <= 60


def test_legend_draws_each_colour_swatch():
    colors = viz.distinct_colors(12)
    key = viz.legend(colors, [f"head {h}" for h in range(12)], width=200)
    assert key.shape[1] == 200 and key.shape[0] > 20  # 12 entries need several rows at this width
    for c in colors:
        assert (key == c).all(-1).sum() >= 9 * 9, c


def test_to_aspect_keeps_the_height_and_takes_the_photo_proportions():
    pic = np.zeros((64, 64, 3), np.uint8)
    assert viz.to_aspect(pic, (640, 480)).shape == (64, 85, 3)
    assert viz.to_aspect(pic, (300, 600)).shape == (64, 32, 3)


def test_blend_heatmap_is_the_alpha_mix_of_photo_and_colours():
    photo = np.full((2, 2, 3), 100, np.uint8)
    values = np.array([[0.0, 1.0], [0.5, 0.25]])
    out = viz.blend_heatmap(photo, values, "viridis", alpha=0.6).astype(float)
    low, high = np.array([68, 1, 84]), np.array([253, 231, 37])  # viridis at 0 and 1
    np.testing.assert_allclose(out[0, 0], 40 + 0.6 * low, atol=1.5)
    np.testing.assert_allclose(out[0, 1], 40 + 0.6 * high, atol=1.5)


def test_enlarge_by_a_whole_factor():
    pic = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    big = viz.enlarge(pic, 5)
    assert big.shape == (6, 6, 3) and (big[:3, :3] == pic[0, 0]).all()
    assert viz.enlarge(pic, 2) is pic or np.array_equal(viz.enlarge(pic, 2), pic)
