"""head_area: Otsu's level against a brute-force search, the hole filling on drawn shapes, and the area
against the head size the phantom rendered; the KS distance against scipy; the share outside the real range
by hand."""
import numpy as np
import pytest
import torch

from minimedi.data.phantom import HEAD_AXES, PhantomCorpus
from scipy import stats

from minimedi.morphometry import BINS, anatomy, head_area, ks_distance, otsu_levels, share_outside


def brute_force_otsu(image):
    """Every level between histogram bins, the between-class variance computed from the pixels."""
    pixels = image.ravel().astype(np.float64)
    bins = np.minimum(((pixels + 1) / 2 * BINS).astype(int), BINS - 1)
    centres = (bins + 0.5) / BINS * 2 - 1
    best, level = -1.0, None
    for k in range(BINS):
        dark = bins <= k
        if dark.all() or not dark.any():
            continue
        w0, w1 = dark.mean(), 1 - dark.mean()
        variance = w0 * w1 * (centres[dark].mean() - centres[~dark].mean()) ** 2
        if variance > best + 1e-12:
            best, level = variance, (k + 1) / BINS * 2 - 1
    return level


def test_otsu_level_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    images = torch.cat([torch.rand(3, 1, 32, 32, generator=g) * 2 - 1,
                        PhantomCorpus(3, 32, 0.5, seed=1).images()])
    levels = otsu_levels(images)
    for image, level in zip(images, levels):
        assert float(level) == pytest.approx(brute_force_otsu(image.numpy()), abs=1e-6)


def disk(size, radius, centre=None):
    centre = (size / 2, size / 2) if centre is None else centre
    y, x = np.mgrid[0:size, 0:size] + 0.5
    return (x - centre[1]) ** 2 + (y - centre[0]) ** 2 <= radius ** 2


def test_holes_are_filled_and_open_notches_are_not():
    size = 48
    ring = disk(size, 18) & ~disk(size, 15)                       # a bright rim around a dark inside
    image = torch.where(torch.from_numpy(ring), 0.8, -1.0)[None, None].float()
    assert float(head_area(image)) == pytest.approx(disk(size, 18).mean(), abs=0.01)
    notch = ring.copy()
    notch[22:26, 36:] = False                                     # a gap through the rim: the inside leaks out
    opened = torch.where(torch.from_numpy(notch), 0.8, -1.0)[None, None].float()
    assert float(head_area(opened)) < 0.5 * disk(size, 18).mean()
    two = torch.where(torch.from_numpy(disk(size, 8, (12, 12)) | disk(size, 8, (36, 36))), 0.5, -1.0)
    assert float(head_area(two[None, None].float())) == pytest.approx(2 * disk(size, 8).mean(), abs=0.01)


@pytest.mark.parametrize("size", [32, 64])
def test_area_follows_the_rendered_head_size(size):
    """The phantom's scalp outline is an ellipse of semi-axes HEAD_AXES * head_scale (half image sides), so
    the share of the image inside it is pi * a * b * scale^2 / 4, for every sequence."""
    corpus = PhantomCorpus(120, size, 0.5, seed=2)
    scale = torch.tensor([corpus.slice(i)["head_scale"] for i in range(len(corpus))])
    area = head_area(corpus.images())
    truth = np.pi * HEAD_AXES[0] * HEAD_AXES[1] * scale ** 2 / 4
    tolerance = 0.05 if size == 32 else 0.02
    assert (area / truth - 1).abs().max() < tolerance
    assert np.corrcoef(area, scale ** 2)[0, 1] > (0.99 if size == 32 else 0.998)
    female = torch.tensor([corpus.slice(i)["sex"] == "female" for i in range(len(corpus))])
    assert area[female].mean() < area[~female].mean()


@pytest.mark.parametrize("seed", range(3))
def test_ks_distance_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, 200).round(1)  # ties within and across the samples
    b = rng.normal(0.3, 1.2, 333).round(1)
    assert ks_distance(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert ks_distance(a, a) == 0.0 and ks_distance(a, a + 100) == 1.0


def test_share_outside_the_real_percentile_range():
    reference = np.arange(101.0)  # 1st and 99th percentiles: 1 and 99
    assert share_outside([0.5, 1.0, 50, 99.0, 99.5, 200], reference) == pytest.approx(3 / 6)
    report = anatomy(np.array([10.0, 20, 30, 40]), reference)
    assert report["n"] == 4 and report["n_real"] == 101 and report["outside"] == 0.0
    assert report["median"] == 25.0 and report["real_median"] == 50.0
    assert report["ks"] == pytest.approx(stats.ks_2samp([10.0, 20, 30, 40], reference).statistic)
    g = torch.Generator().manual_seed(0)
    real = 0.35 + 0.03 * torch.randn(2000, generator=g)
    assert anatomy(real, real)["outside"] == pytest.approx(0.02, abs=0.001) and anatomy(real, real)["ks"] == 0.0
