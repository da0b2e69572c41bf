"""Anatomy read from the pixels: head size against the phantom's rendered head scale and hand-drawn shapes;
the KS distance against scipy; the share outside the real range by hand."""
import numpy as np
import pytest
import torch
from scipy import stats

from minimedi.data.phantom import PhantomCorpus
from minimedi.morphometry import anatomy, head_size, ks_distance, share_outside


def test_head_size_fills_dark_tissue_inside_the_outline():
    """A 6 x 10 block with a dark 2 x 4 hole (skull, CSF) and a dark gap in one row: every row counts from
    its first to its last bright pixel, so the area is the full 60 pixels of 16 x 16."""
    image = -torch.ones(1, 1, 16, 16)
    image[0, 0, 3:9, 2:12] = 0.5
    image[0, 0, 5:7, 4:8] = -1.0
    image[0, 0, 8, 6] = -1.0
    assert head_size(image).item() == pytest.approx((60 / 256) ** 0.5)
    assert head_size(-torch.ones(2, 1, 8, 8)).tolist() == [0.0, 0.0]


def test_head_size_tracks_the_rendered_head_scale_in_every_sequence():
    corpus = PhantomCorpus(600, 32, 0.45, seed=3, kind="target")
    attributes = [corpus.attributes(i) for i in range(len(corpus))]
    size = head_size(corpus.images()).numpy()
    scale = np.array([a["head_scale"] for a in attributes])
    assert np.corrcoef(size, scale)[0, 1] > 0.98
    ratio = size / scale  # one constant for every sequence, whatever its contrast
    for modality in ("t1", "t1ce", "t2", "flair"):
        here = np.array([a["modality"] == modality for a in attributes])
        assert abs(ratio[here].mean() / ratio.mean() - 1) < 0.01, modality
    female = np.array([a["sex"] == "female" for a in attributes])
    assert size[female].mean() < 0.95 * size[~female].mean()  # women's heads are 8% smaller


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
