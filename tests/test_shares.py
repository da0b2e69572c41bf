"""Shares through an imperfect classifier: the confusion-matrix correction recovers a known share, and the
bootstrap interval covers the true share at its nominal rate, on simulated classifiers and generators."""
import numpy as np
import pytest

from minimedi.shares import (ErrorRates, bootstrap_shares, corrected, corrected_share, error_rates, prompt_gap_floor,
                             share_estimate)

STRATA = ("t1", "t1ce", "t2", "flair")
TPR = np.array([0.85, 0.70, 0.90, 0.80])  # the classifier errs differently in each MR sequence
FPR = np.array([0.10, 0.25, 0.30, 0.15])


def simulate_reference(rng, n_per_stratum, female_share=0.45):
    """Held-out real images: true sex, stratum, and the simulated classifier's call."""
    stratum = np.repeat(np.arange(len(STRATA)), n_per_stratum)
    is_female = rng.random(len(stratum)) < female_share
    called = rng.random(len(stratum)) < np.where(is_female, TPR[stratum], FPR[stratum])
    return error_rates(called, is_female, stratum, STRATA)


def simulate_generated(rng, prompt_shares, per_prompt):
    """Generated images: prompts cycle through the strata; each image is female with its prompt's true share
    and called female with the stratum's TPR or FPR."""
    prompt = np.repeat(np.arange(len(prompt_shares)), per_prompt)
    stratum = prompt % len(STRATA)
    is_female = rng.random(len(prompt)) < prompt_shares[prompt]
    called = rng.random(len(prompt)) < np.where(is_female, TPR[stratum], FPR[stratum])
    return called, stratum, prompt, is_female


def test_corrected_inverts_the_confusion_matrix():
    """p = C^-1 q, from np.linalg.solve on the 2 x 2 matrix C[i][j] = P(call i | true j) (rows: male, female)."""
    for q, tpr, fpr in [(0.4, 0.8, 0.15), (0.3, 0.95, 0.05), (0.62, 0.7, 0.4)]:
        c = np.array([[1 - fpr, 1 - tpr], [fpr, tpr]])
        p_male, p_female = np.linalg.solve(c, [1 - q, q])
        assert p_male + p_female == pytest.approx(1.0)
        assert float(corrected(q, tpr, fpr)) == pytest.approx(p_female)
    assert float(corrected(0.05, 0.8, 0.15)) == 0.0 and float(corrected(0.9, 0.8, 0.15)) == 1.0  # clipped
    assert np.isnan(corrected(0.5, 0.3, 0.3))  # a classifier at chance says nothing


def test_error_rates_count_calls_per_stratum():
    rates = error_rates(np.array([1, 0, 1, 1, 0, 1], bool), np.array([1, 1, 0, 1, 0, 0], bool),
                        np.array([0, 0, 0, 1, 1, 1]), ("a", "b"))
    assert rates.n_female.tolist() == [2, 1] and rates.tp.tolist() == [1, 1]
    assert rates.n_male.tolist() == [1, 2] and rates.fp.tolist() == [1, 1]
    assert rates.as_dict()["b"] == {"tpr": 1.0, "fpr": 0.5, "n_female": 1, "n_male": 2}


def test_correction_recovers_a_known_share_per_stratum():
    """The true share differs by stratum and so do the error rates. The raw called share is far off; the
    correction with one confusion matrix per stratum recovers the truth, while a single pooled matrix is
    biased, because it weights each stratum's errors by the real images' mix of sexes, not the generated one."""
    rng = np.random.default_rng(0)
    rates = simulate_reference(rng, 50000)
    truth_per_stratum = np.array([0.5, 0.05, 0.05, 0.5])
    called, stratum, _, is_female = simulate_generated(rng, np.tile(truth_per_stratum, 50), 1000)
    truth = is_female.mean()
    assert abs(called.mean() - truth) > 0.04
    assert corrected_share(called, stratum, rates) == pytest.approx(truth, abs=0.006)
    pooled = ErrorRates(("all",), *(x.sum(keepdims=True) for x in (rates.n_female, rates.tp, rates.n_male, rates.fp)))
    assert abs(corrected_share(called, np.zeros_like(stratum), pooled) - truth) > 0.02


def test_bootstrap_interval_covers_the_true_share_at_its_nominal_rate():
    """300 simulated reports: 64 prompts x 6 images whose true shares vary by prompt (Beta around a per-stratum
    mean), a 1,000-image held-out set per stratum. The estimand is the share of the prompt population,
    sum_s w_s E[share | s]; the 95% interval must contain it in about 95% of the reports (binomial standard
    error 1.3 points at 300 reports)."""
    rng = np.random.default_rng(1)
    means = np.array([0.3, 0.5, 0.2, 0.6])
    hits, widths = 0, []
    for _ in range(300):
        rates = simulate_reference(rng, 1000)
        prompt_means = np.tile(means, 16)
        prompt_shares = rng.beta(8 * prompt_means, 8 * (1 - prompt_means))  # spread between prompts
        called, stratum, prompt, _ = simulate_generated(rng, prompt_shares, 6)
        replicates = bootstrap_shares(called, stratum, prompt, rates, 500, rng)
        low, high = np.percentile(replicates, [2.5, 97.5])
        hits += low <= means.mean() <= high
        widths.append(high - low)
    assert 0.91 <= hits / 300 <= 0.99, hits / 300
    assert 0.1 < np.mean(widths) < 0.4  # an interval, not the whole unit range


def test_share_estimate_reports_point_interval_and_raw_share():
    rng = np.random.default_rng(2)
    rates = simulate_reference(rng, 1000)
    called, stratum, prompt, _ = simulate_generated(rng, np.full(64, 0.4), 6)
    estimate = share_estimate(called, stratum, prompt, rates, n_boot=400, seed=3)
    assert estimate["n"] == 384 and estimate["raw"] == pytest.approx(called.mean())
    assert estimate["corrected"] == pytest.approx(corrected_share(called, stratum, rates))
    low, high = estimate["ci"]
    assert low < estimate["corrected"] < high
    assert share_estimate(called, stratum, prompt, rates, n_boot=400, seed=3) == estimate  # seeded


def test_prompt_gap_floor_matches_a_simulation():
    rng = np.random.default_rng(4)
    n, target, tpr, fpr = 6, 0.45, 0.8, 0.15
    k = rng.binomial(n, tpr * target + fpr * (1 - target), 200000)
    simulated = np.abs(corrected(k / n, tpr, fpr) - target).mean()
    assert prompt_gap_floor(n, target, tpr, fpr) == pytest.approx(simulated, abs=0.003)
    assert prompt_gap_floor(n, target, 1.0, 0.0) == pytest.approx(np.abs(rng.binomial(n, target, 200000) / n - target).mean(),
                                                                abs=0.003)
