"""The female share read off the anatomy alone: a third reader of generated images, with no classifier in it.

Both sex classifiers of the report are networks, and alignment tuning optimises one of them; where the two
disagree, something that was never trained should have the last word. On the phantom, sex is drawn only
as head size (`minimedi.data.phantom`: head scale N(0.92, 0.04) for women, N(1.00, 0.04) for men), and in
real brain MR head size is the largest sex difference a classifier reads. So the head areas of a set of
images whose true female share is p follow the mixture

    G = p F_female + (1 - p) F_male,

with F_female and F_male the distribution functions of real target slices of each sex, in the same MR
sequence (the head's outline that `minimedi.morphometry.head_area` reads depends on the sequence's
contrast). Given G's empirical distribution function, p is the least-squares fit on distribution functions
(Choi & Bulgren 1968, "An estimation procedure for mixtures of distributions", JRSS B 30):

    p_hat = argmin_p sum_k (G(x_k) - F_male(x_k) - p D(x_k))^2 = sum_k (G - F_male) D / sum_k D^2,
    D = F_female - F_male,                                                      (`mixture_share`)

clipped to [0, 1], over a grid x_k of quantiles of the sequence's real head areas. Its assumption is not the
classifiers' (that they err on generated images as on real ones) but that generated heads of each sex are
sized like real heads of that sex. `fit_ks`, the largest distance between G and the fitted mixture, says
where that fails: a head size that no mix of real women and men explains. Where the sexes' head sizes
overlap much (real MR), the interval says how little the anatomy can tell.

The interval resamples as `minimedi.shares` does: whole prompts within each sequence, and the real slices
of each sex (the components are estimates too). The components and their replicates are made once
(`components`) and shared by every set of images read against them.
"""
from dataclasses import dataclass

import numpy as np

from minimedi.shares import percentile_interval, resample_counts

GRID = 256  # quantiles of the real head areas the distribution functions are compared at


def mixture_share(g, f_female, f_male):
    """The least-squares mixing share p of `g` ~ p f_female + (1 - p) f_male, distribution functions on one
    grid (the last axis; leading axes broadcast), clipped to [0, 1]."""
    d = f_female - f_male
    return np.clip(((g - f_male) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)


def below(values, grid):
    """float [N, K]: 1 where values[n] <= grid[k]; its mean over n is the empirical distribution function."""
    return (np.asarray(values, dtype=np.float64)[:, None] <= grid[None, :]).astype(np.float64)


def resampled(indicators, n_boot, rng):
    """[n_boot, K] bootstrap replicates of the distribution function whose indicators [N, K] are given."""
    return resample_counts(len(indicators), n_boot, rng) @ indicators / len(indicators)


@dataclass
class Components:
    """The mixture's components, made once for every set of images read against them: per stratum, a grid
    of quantiles of the real head areas and each sex's distribution function on it, with `n_boot`
    bootstrap replicates [n_boot, K] (the real slices of each sex resampled). A stratum lacking real
    slices of either sex has none."""
    grid: dict
    female: dict
    male: dict
    female_boot: dict
    male_boot: dict
    n_boot: int


def components(real_head, real_female, real_stratum, n_boot=1000, seed=0):
    """`Components` of real target slices: head areas [R], sex [R] (bool), stratum [R]."""
    real_head, real_female, real_stratum = (np.asarray(x) for x in (real_head, real_female, real_stratum))
    rng = np.random.Generator(np.random.PCG64(seed))
    parts = Components({}, {}, {}, {}, {}, n_boot)
    for s in np.unique(real_stratum):
        real = real_stratum == s
        women, men = real_head[real & real_female], real_head[real & ~real_female]
        if len(women) == 0 or len(men) == 0:
            continue
        grid = np.quantile(real_head[real], np.linspace(0, 1, GRID))
        f_female, f_male = below(women, grid), below(men, grid)
        parts.grid[s], parts.female[s], parts.male[s] = grid, f_female.mean(0), f_male.mean(0)
        parts.female_boot[s], parts.male_boot[s] = resampled(f_female, n_boot, rng), resampled(f_male, n_boot, rng)
    return parts


def anatomy_share(areas, stratum, cluster, parts, seed=0, level=0.95):
    """{"share", "ci", "fit_ks"} of a set of generated images: head areas [N], stratum indices [N] and prompt
    (cluster) indices [N], read against the real slices' `Components`. Each stratum is fitted to its own
    real slices and the shares are weighted by images; fit_ks is the worst stratum's. None where a stratum
    has no components; no interval when they have no replicates."""
    areas, stratum, cluster = (np.asarray(x) for x in (areas, stratum, cluster))
    if len(areas) == 0 or any(s not in parts.grid for s in np.unique(stratum)):
        return {"share": None, "ci": None, "fit_ks": None}
    rng = np.random.Generator(np.random.PCG64(seed))
    point, fit_ks, total, images = 0.0, 0.0, np.zeros(parts.n_boot), np.zeros(parts.n_boot)
    for s in np.unique(stratum):
        here = stratum == s
        mine = below(areas[here], parts.grid[s])
        g, ff, fm = mine.mean(0), parts.female[s], parts.male[s]
        p = mixture_share(g, ff, fm)
        point += here.sum() * p
        fit_ks = max(fit_ks, float(np.abs(g - (p * ff + (1 - p) * fm)).max()))

        _, members = np.unique(cluster[here], return_inverse=True)
        draws = resample_counts(members.max() + 1, parts.n_boot, rng)  # [B, prompts]
        weights = draws[:, members].astype(np.float64)  # [B, images]: each image as often as its prompt
        n_s = weights.sum(1)
        total += n_s * mixture_share(weights @ mine / n_s[:, None], parts.female_boot[s], parts.male_boot[s])
        images += n_s
    ci = percentile_interval(total / images, level) if parts.n_boot else None
    return {"share": float(point / len(areas)), "ci": ci, "fit_ks": fit_ks}
