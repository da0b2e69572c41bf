"""A subgroup share measured through an imperfect classifier: corrected for its errors, with an interval.

A sex classifier of accuracy a does not count women; it reports a share biased toward 0.5. With
C[i][j] = P(pred = i | true = j) its confusion matrix on held-out real images with known labels, the
share q it reports on a set whose true distribution is p is, in expectation, q = C p. Black-box shift
estimation (Lipton et al. 2018, "Detecting and Correcting for Label Shift with Black Box Predictors")
inverts it: p = C^-1 q. For two classes, with TPR = P(called female | female) and FPR = P(called female |
male), q = TPR p + FPR (1 - p), so

    p = (q - FPR) / (TPR - FPR),                                              (`corrected`)

clipped to [0, 1]. The inversion assumes that the classifier errs on generated images as it does on
real ones of the same sex: P(pred | true) is unchanged, only the mix of sexes moves (label shift). That
fails where error rates differ by a variable the generated mix does not share, so the rates are
estimated per stratum (MR sequence) and each stratum is corrected with its own. CLEAM (Teo et al. 2023, "On
Measuring Fairness in Generative Models", NeurIPS) refines the same idea with the classifier's
per-sample uncertainty.

The interval (`bootstrap_shares`) resamples both sources of noise together:
- the generated images, by resampling whole prompts (clusters) with replacement within each stratum.
  Resampling the top stage only is the right scheme for two-stage samples (Davison & Hinkley 1997,
  "Bootstrap Methods and their Application", sec. 3.8): a prompt's images share the prompt, and its
  resampled mean carries the within-prompt noise as well as the between-prompt spread;
- the held-out set the rates come from: its women and men of each stratum, resampled separately. A
  resampled true-positive count is Binomial(n_female, TPR), so it is drawn as one.
The 2.5th and 97.5th percentiles of the replicates give the 95% percentile interval.
"""
import math
from dataclasses import dataclass

import numpy as np


@dataclass
class ErrorRates:
    """A classifier's calls on held-out real images, per stratum s: n_female[s] women of which
    tp[s] were called female, n_male[s] men of which fp[s] were."""
    strata: tuple
    n_female: np.ndarray
    tp: np.ndarray
    n_male: np.ndarray
    fp: np.ndarray

    @property
    def tpr(self):
        return self.tp / np.maximum(self.n_female, 1)

    @property
    def fpr(self):
        return self.fp / np.maximum(self.n_male, 1)

    def as_dict(self):
        return {s: {"tpr": float(self.tpr[i]), "fpr": float(self.fpr[i]), "n_female": int(self.n_female[i]),
                    "n_male": int(self.n_male[i])} for i, s in enumerate(self.strata)}


def error_rates(called_female, is_female, stratum, strata):
    """`ErrorRates` from held-out calls [R] (bool), true labels [R] (bool) and stratum indices [R] into
    the names `strata`."""
    called_female, is_female, stratum = (np.asarray(x) for x in (called_female, is_female, stratum))

    def count(mask):
        return np.bincount(stratum[mask], minlength=len(strata))

    return ErrorRates(tuple(strata), count(is_female), count(is_female & called_female), count(~is_female),
                      count(~is_female & called_female))


def corrected(q, tpr, fpr):
    """(q - FPR) / (TPR - FPR) clipped to [0, 1]; NaN where TPR <= FPR (a classifier no better than chance
    says nothing about the share)."""
    q, tpr, fpr = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (q, tpr, fpr)))
    informative = tpr > fpr
    p = (q - fpr) / np.where(informative, tpr - fpr, 1.0)
    return np.where(informative, np.clip(p, 0.0, 1.0), np.nan)


def corrected_share(called_female, stratum, rates):
    """The estimated true female share of a set of images: each stratum's called share corrected with its
    own rates, weighted by the stratum's number of images."""
    called_female, stratum = np.asarray(called_female, dtype=np.float64), np.asarray(stratum)
    total = 0.0
    for s in np.unique(stratum):
        here = stratum == s
        total += here.sum() * corrected(called_female[here].mean(), rates.tpr[s], rates.fpr[s])
    return float(total / len(stratum))


def resample_counts(n, n_boot, rng):
    """[n_boot, n]: how often each of n items is drawn in each of n_boot resamples of n with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def percentile_interval(replicates, level):
    """The bootstrap percentile interval [low, high] at `level` of the replicates."""
    tail = 100 * (1 - level) / 2
    return [float(v) for v in np.percentile(replicates, [tail, 100 - tail])]


def bootstrap_shares(called_female, stratum, cluster, rates, n_boot, rng):
    """n_boot bootstrap replicates [n_boot] of `corrected_share`: whole clusters (prompts) resampled within
    each stratum, and the stratum's held-out women and men resampled (binomially) for its rates."""
    called_female, stratum, cluster = (np.asarray(x) for x in (called_female, stratum, cluster))
    total, images = np.zeros(n_boot), np.zeros(n_boot)
    for s in np.unique(stratum):
        here = stratum == s
        _, members = np.unique(cluster[here], return_inverse=True)
        female = np.bincount(members, weights=called_female[here].astype(np.float64))
        size = np.bincount(members).astype(np.float64)
        draws = resample_counts(len(size), n_boot, rng)  # [B, clusters]
        n_s = draws @ size
        tpr = rng.binomial(rates.n_female[s], rates.tpr[s], n_boot) / max(rates.n_female[s], 1)
        fpr = rng.binomial(rates.n_male[s], rates.fpr[s], n_boot) / max(rates.n_male[s], 1)
        total += n_s * corrected((draws @ female) / n_s, tpr, fpr)
        images += n_s
    return total / images


def share_estimate(called_female, stratum, cluster, rates, n_boot=1000, seed=0, level=0.95):
    """{"n", "raw" (share called female), "corrected", "ci": [low, high]} of one set of images; the
    interval is the bootstrap percentile interval at `level` (None when the correction is undefined)."""
    replicates = bootstrap_shares(called_female, stratum, cluster, rates, n_boot,
                                  np.random.Generator(np.random.PCG64(seed)))
    ci = None if np.isnan(replicates).any() else percentile_interval(replicates, level)
    point = corrected_share(called_female, stratum, rates)
    return {"n": len(called_female), "raw": float(np.mean(called_female)),
            "corrected": None if math.isnan(point) else point, "ci": ci}


def prompt_gap_floor(n, target, tpr, fpr):
    """E |corrected(K / n) - target| with K ~ Binomial(n, TPR target + FPR (1 - target)): the mean
    per-prompt gap that a model whose every prompt sits exactly at the target would still show, read by
    this classifier from n images per prompt. A measured per-prompt gap is only meaningful above it."""
    q = tpr * target + fpr * (1 - target)
    k = np.arange(n + 1)
    pmf = np.array([math.comb(n, int(j)) for j in k]) * q ** k * (1 - q) ** (n - k)
    return float((pmf * np.abs(corrected(k / n, tpr, fpr) - target)).sum())
