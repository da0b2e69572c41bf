"""Anatomy read straight from the pixels, and how far a set of generated images strays from real anatomy.

A sex classifier on brain MR largely reads head size (on the phantom it is the only sex-linked feature),
so alignment can buy its target share by drawing heads that no real patient has. The check has to look
at the anatomy without any network: `head_size` measures the head's silhouette, and the generated
distribution is compared with that of real target slices by

- the two-sample Kolmogorov-Smirnov distance `ks_distance`: sup_x |F_generated(x) - F_real(x)|, 0 for
  identical distributions, 1 for disjoint ones;
- `share_outside`: the share of generated images outside the real 1st-99th percentile, 2% for a
  perfect model (and the most telling number when a few images are pushed far past the real range).

Both are invariant under any increasing transform of the morphometric, so the choice between area,
diameter or a relative scale does not change them.
"""
import torch

FOREGROUND = -0.6  # in [-1, 1]: a fifth of full signal, far above the noise of the air around the head


def head_size(images, threshold=FOREGROUND):
    """The linear size of the head's silhouette, sqrt(area / image area), float64 [N].

    A pixel is foreground when brighter than `threshold`. Dark tissue inside the head (skull, CSF, a
    necrotic core) would leave holes, so each row counts every pixel from its first foreground pixel to
    its last: the filled area of a shape that is convex along rows, as a head's axial outline is. On the
    phantom this tracks the rendered head scale with correlation 0.995 (tests/test_morphometry.py); on
    skull-stripped data (BraTS) it is the brain-mask area.
    """
    mask = images.reshape(len(images), -1, images.shape[-1]) > threshold  # [N, H, W]
    width = mask.shape[-1]
    first = mask.to(torch.uint8).argmax(-1)
    last = width - 1 - mask.flip(-1).to(torch.uint8).argmax(-1)
    area = ((last - first + 1) * mask.any(-1)).sum(-1).double()
    return (area / (mask.shape[-2] * width)).sqrt()


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| of two 1D samples.

    The empirical CDFs are step functions that jump only at sample points, so the supremum is reached at
    one of them: evaluate both CDFs (right-continuous, `searchsorted(side="right")`) at every point of the
    pooled sample."""
    a, b = (torch.sort(torch.as_tensor(x, dtype=torch.float64).flatten())[0] for x in (a, b))
    points = torch.cat([a, b])
    f_a = torch.searchsorted(a, points, right=True).double() / len(a)
    f_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return float((f_a - f_b).abs().max())


def share_outside(values, reference, low=0.01, high=0.99):
    """Share of `values` outside the reference's [low, high] quantile range (linear interpolation)."""
    reference = torch.as_tensor(reference, dtype=torch.float64)
    lo, hi = torch.quantile(reference, torch.tensor([low, high], dtype=torch.float64))
    values = torch.as_tensor(values, dtype=torch.float64)
    return float(((values < lo) | (values > hi)).double().mean())


def anatomy(values, reference):
    """The report's comparison of a generated morphometric with the real one: n, KS distance, share
    outside the real 1-99% range, and both medians."""
    values, reference = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return {"n": len(values), "ks": ks_distance(values, reference), "outside": share_outside(values, reference),
            "median": float(torch.quantile(values, 0.5)), "real_median": float(torch.quantile(reference, 0.5)), "n_real": len(reference)}
