"""The report's pictures, read back pixel by pixel: bar heights, the reference line, the ticks, the
side-by-side grids; and no file at all when writing fails."""
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from minimedi import imageio
from minimedi.errors import UserError
from minimedi.imageio import BAR_COLORS, CHART_SIZE, REFERENCE_COLOR, make_grid, save_bar_chart, save_side_by_side

BARS = [("before", 0.3), ("after", 0.45), ("real", 1.0), ("none", 0.0), ("small", 0.1)]


def read(path):
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("RGB"))


def rows_of(pixels, color):
    """Row indices of every pixel of exactly `color`."""
    return np.nonzero((pixels == np.array(color, np.uint8)).all(-1))[0]


@pytest.fixture(scope="module")
def chart(tmp_path_factory):
    path = tmp_path_factory.mktemp("chart") / "fairness.png"
    save_bar_chart(path, "female fraction", BARS, reference=("target", 0.6))
    return read(path)


def bar_extent(pixels, i):
    """(top row, bottom row) of bar i, found by its colour."""
    rows = rows_of(pixels, BAR_COLORS[i])
    return rows.min(), rows.max()


def test_chart_has_the_chart_size(chart):
    assert chart.shape == (CHART_SIZE[1], CHART_SIZE[0], 3)


def test_bar_heights_are_proportional_to_values(chart):
    baseline = bar_extent(chart, 0)[1] + 1  # the row under every bar: the x axis
    heights = {}
    for i, (_, value) in enumerate(BARS):
        if value == 0:
            assert len(rows_of(chart, BAR_COLORS[i])) == 0
            continue
        top, bottom = bar_extent(chart, i)
        assert bottom + 1 == baseline
        heights[value] = baseline - top
    scale = heights[1.0]
    assert scale > 200  # the plot uses most of the 400 px height
    for value, height in heights.items():
        assert abs(height - value * scale) <= 1


def test_reference_line_sits_at_its_value_and_is_dashed(chart):
    baseline = bar_extent(chart, 0)[1] + 1
    scale = baseline - bar_extent(chart, 2)[0]  # the bar at 1.0
    rows, counts = np.unique(rows_of(chart, REFERENCE_COLOR), return_counts=True)
    line = rows[counts > 100]  # the dashes; the label's pixels are far fewer per row
    assert len(line) >= 1 and all(abs(r - (baseline - 0.6 * scale)) <= 1 for r in line)
    on = (chart[line[0]] == np.array(REFERENCE_COLOR, np.uint8)).all(-1)
    dashes = np.count_nonzero(on[1:] & ~on[:-1])
    assert dashes > 20


def test_ticks_at_quarters(chart):
    black = (chart == 0).all(-1)
    axis = black.sum(0).argmax()  # the y axis: the longest black column
    baseline = bar_extent(chart, 0)[1] + 1
    scale = baseline - bar_extent(chart, 2)[0]
    ticks = np.nonzero(black[:, axis - 3])[0]
    expected = [baseline - k / 4 * scale for k in range(5)]
    assert len(ticks) == 5 and all(abs(t - e) <= 1 for t, e in zip(sorted(ticks, reverse=True), expected))


def test_chart_without_reference_has_no_reference_colour(tmp_path):
    save_bar_chart(tmp_path / "c.png", "t", [("a", 0.5), ("b", 2.0)], ylabel="share", ymax=2.0)
    pixels = read(tmp_path / "c.png")
    assert len(rows_of(pixels, REFERENCE_COLOR)) == 0
    baseline = bar_extent(pixels, 0)[1] + 1
    assert abs((baseline - bar_extent(pixels, 0)[0]) * 4 - (baseline - bar_extent(pixels, 1)[0])) <= 2


def test_chart_with_the_old_bitmap_font(tmp_path, monkeypatch):
    """Pillow before 10.1 has no size argument to load_default, and its default is a bitmap font: the chart
    is still drawn."""
    def load_default(**kwargs):
        if kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(ImageFont, "load_default", load_default)
    save_bar_chart(tmp_path / "c.png", "female fraction", BARS, reference=("target", 0.5))
    pixels = read(tmp_path / "c.png")
    assert pixels.shape == (CHART_SIZE[1], CHART_SIZE[0], 3)
    assert len(rows_of(pixels, BAR_COLORS[2])) > 0


def test_side_by_side_puts_each_grid_under_its_title(tmp_path):
    g = torch.Generator().manual_seed(0)
    left, right = torch.rand(10, 1, 12, 12, generator=g) * 2 - 1, torch.rand(10, 1, 12, 12, generator=g) * 2 - 1
    save_side_by_side(left, right, tmp_path / "s.png", nrow=4, scale=3)
    pixels = read(tmp_path / "s.png")
    grids = [np.repeat(np.repeat(np.repeat(make_grid(x, 4), 3, 0), 3, 1), 3, 2) for x in (left, right)]
    h, w = grids[0].shape[:2]
    assert pixels.shape[0] > h and pixels.shape[1] > 2 * w
    np.testing.assert_array_equal(pixels[-h:, :w], grids[0])
    np.testing.assert_array_equal(pixels[-h:, -w:], grids[1])
    band = pixels[:-h]
    for x0, x1 in ((0, w), (pixels.shape[1] - w, pixels.shape[1])):
        ink = np.nonzero((band[:, x0:x1] < 128).all(-1).any(0))[0]
        assert len(ink) > 0 and abs((ink.min() + ink.max()) / 2 - w / 2) < 10  # a title, centred over its grid


def test_side_by_side_rejects_different_shapes(tmp_path):
    with pytest.raises(UserError):
        save_side_by_side(torch.zeros(4, 1, 8, 8), torch.zeros(3, 1, 8, 8), tmp_path / "s.png")
    assert not os.path.exists(tmp_path / "s.png")


@pytest.mark.parametrize("write", [
    lambda path: save_bar_chart(path, "t", BARS, reference=("target", 0.5)),
    lambda path: save_side_by_side(torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 8, 8), path),
])
def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch, write):
    def broken_save(self, fp, format=None, **params):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(imageio.Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path / "out.png")
    assert os.listdir(tmp_path) == []
