"""The share read off head sizes (`minimedi.anatomy_share`) on simulated heads whose true share is known."""
import numpy as np
import pytest

from minimedi.anatomy_share import anatomy_share, components, mixture_share


def heads(rng, n, p, shift=0.0):
    """Phantom-like head areas: scale N(0.92, 0.04) for women, N(1.00, 0.04) for men, area ~ scale^2."""
    female = rng.random(n) < p
    scale = np.where(female, rng.normal(0.92, 0.04, n), rng.normal(1.00, 0.04, n))
    return 0.415 * scale ** 2 + shift, female


def reference(rng, n=1000, shifts=(0.0,)):
    """n real slices per stratum, half of each sex, the stratum's areas offset by its shift."""
    areas, female, stratum = [], [], []
    for s, shift in enumerate(shifts):
        a, f = heads(rng, n, 0.5, shift)
        areas.append(a), female.append(f), stratum.append(np.full(n, s))
    return np.concatenate(areas), np.concatenate(female), np.concatenate(stratum)


def test_an_exact_mixture_of_distribution_functions_gives_its_share():
    grid = np.linspace(0, 1, 50)
    f_female, f_male = grid ** 0.5, grid ** 2
    for p in (0.0, 0.3, 0.455, 1.0):
        assert mixture_share(p * f_female + (1 - p) * f_male, f_female, f_male) == pytest.approx(p)
    assert mixture_share(f_female + 0.5, f_female, f_male) == 1.0  # beyond either component: clipped


def test_the_closed_form_is_the_least_squares_minimum_scipy_finds():
    """Noisy distribution functions, and mixes past either end (p = -0.2, 1.3), where the closed form clips
    and a bounded search stops at the bound."""
    from scipy.optimize import minimize_scalar
    rng = np.random.default_rng(4)
    f_female, f_male = np.sort(rng.random(64)) ** 0.5, np.sort(rng.random(64)) ** 2
    for p in (-0.2, 0.1, 0.455, 0.8, 1.3):
        g = p * f_female + (1 - p) * f_male + rng.normal(0, 0.05, 64)
        found = minimize_scalar(lambda q: ((g - q * f_female - (1 - q) * f_male) ** 2).sum(), bounds=(0, 1),
                                method="bounded", options={"xatol": 1e-10})
        assert mixture_share(g, f_female, f_male) == pytest.approx(found.x, abs=1e-6)


def test_recovers_the_share_per_stratum_where_a_pooled_fit_would_not():
    """Two sequences whose head outlines read 0.05 apart: 0.2 women in one, 0.7 in the other. Fitted
    against the pooled real slices, the offset would pass for sex; fitted per stratum, it does not."""
    rng = np.random.default_rng(0)
    real = reference(rng, 2000, shifts=(0.0, 0.05))
    a0, _ = heads(rng, 3000, 0.2)
    a1, _ = heads(rng, 1000, 0.7, 0.05)
    areas, stratum = np.concatenate([a0, a1]), np.repeat([0, 1], [3000, 1000])
    out = anatomy_share(areas, stratum, np.arange(4000), components(*real, n_boot=200))
    truth = (0.2 * 3000 + 0.7 * 1000) / 4000
    assert out["share"] == pytest.approx(truth, abs=0.03)
    assert out["ci"][0] <= truth <= out["ci"][1] and out["fit_ks"] < 0.05
    pooled = anatomy_share(areas, np.zeros(4000, int), np.arange(4000),
                           components(real[0], real[1], np.zeros(4000, int), n_boot=0))
    assert abs(pooled["share"] - truth) > 0.05


def test_the_interval_covers_the_true_share_at_about_its_nominal_rate():
    """40 prompts x 6 images, each prompt with its own share (Beta, mean 0.3): the prompt-level bootstrap
    has to carry the between-prompt spread, and the real slices are resampled too."""
    rng = np.random.default_rng(1)
    covered, runs = 0, 200
    for run in range(runs):
        real = reference(rng, 500)
        shares = rng.beta(3, 7, 40)  # mean 0.3
        areas = np.concatenate([heads(rng, 6, p)[0] for p in shares])
        out = anatomy_share(areas, np.zeros(240, int), np.repeat(np.arange(40), 6),
                            components(*real, n_boot=300, seed=run), seed=run)
        covered += out["ci"][0] <= 0.3 <= out["ci"][1]
    # 95% nominal; the binomial sd of the count over 200 runs is 3 points, and percentile intervals run a
    # little short at this size
    assert 0.88 <= covered / runs <= 0.99


def test_heads_no_real_patient_has_show_in_the_fit():
    rng = np.random.default_rng(2)
    parts = components(*reference(rng), n_boot=50)
    small, _ = heads(rng, 200, 1.0, shift=-0.1)  # every head far below the smallest real woman's
    out = anatomy_share(small, np.zeros(200, int), np.arange(200), parts)
    assert out["share"] == 1.0 and out["fit_ks"] > 0.5
    fine, _ = heads(rng, 200, 1.0)
    assert anatomy_share(fine, np.zeros(200, int), np.arange(200), parts)["fit_ks"] < 0.15


def test_a_stratum_without_real_slices_of_one_sex_has_no_share():
    rng = np.random.default_rng(3)
    areas, female, stratum = reference(rng, 100)
    out = anatomy_share(areas[:10], stratum[:10], np.arange(10), components(areas[female], female[female], stratum[female]))
    assert out == {"share": None, "ci": None, "fit_ks": None}
