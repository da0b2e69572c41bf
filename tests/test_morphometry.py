"""head_area: Otsu's level against a brute-force search, the hole filling on drawn shapes, and the area
against the head size the phantom rendered."""
import numpy as np
import pytest
import torch

from minimedi.data.phantom import HEAD_AXES, PhantomCorpus
from scipy import stats

from minimedi.morphometry import BINS, head_area, otsu_levels, plausibility


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


def test_plausibility_against_scipy():
    g = torch.Generator().manual_seed(0)
    real = 0.35 + 0.03 * torch.randn(500, generator=g)
    for shift, spread in ((0.0, 1.0), (0.02, 1.0), (0.0, 2.0)):
        generated = 0.35 + shift + 0.03 * spread * torch.randn(300, generator=g)
        got = plausibility(generated, real)
        assert got["ks"] == pytest.approx(stats.ks_2samp(generated.numpy(), real.numpy()).statistic, abs=1e-12)
        lo, hi = np.percentile(real.numpy(), [1, 99])
        outside = np.mean((generated.numpy() < lo) | (generated.numpy() > hi))
        assert got["outside_real_1_99"] == pytest.approx(outside, abs=1e-12)
    assert plausibility(real, real) == {"ks": 0.0, "outside_real_1_99": pytest.approx(0.02, abs=0.005)}
