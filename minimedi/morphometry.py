"""Head size read from the pixels: the morphometric of the report's anatomical-plausibility check.

A sex classifier on brain MR largely reads head size, so alignment tuning can move the sex share by
drawing heads of a size no real patient has. The check compares, per sex, the head sizes of generated
images with those of real target slices. Generated images carry no mask, so the measure is read from
the pixels alone, and the same function serves phantom slices, real slices and generated ones:

    head_area(images) = the share of the image inside the head's outer contour

1. Threshold each image at its Otsu level (Otsu 1979: of all levels, the one that maximises the
   between-class variance w0 w1 (m0 - m1)^2 of the dark and bright pixels it separates), from a
   256-bin histogram over [-1, 1]. The background (air, or the zero outside a skull-stripped brain) is
   the dark class; one level per image, so no intensity scale is assumed.
2. Fill the holes: a dark pixel that cannot reach the image border through dark pixels lies inside the
   head (ventricles, dark CSF, the phantom's skull under its bright scalp) and counts as head. The
   reachable dark pixels are grown from the border, one 4-connected step at a time, until they stop
   changing; 4-connectivity, so a contour closed only diagonally still holds.
3. Around the filling, a morphological closing: the bright class is dilated by one pixel (3 x 3) before
   and the filled head eroded by one pixel after. At 32 px the phantom's scalp is under a pixel thick and
   noise breaks it; without the closing the fill leaks through the gaps and the head loses its skull
   (measured on 400 phantom slices against the rendered head scale: correlation 0.78 without, 0.995 with,
   0.999 at 64 px either way). Below 32 px the measure is too coarse to trust.

What it measures: on skull-stripped MR (BraTS) the brain's cross-section, on unstripped MR and on the
phantom the head's (scalp outline). Multiply by the field of view squared for mm^2: BraTS slices are
loaded at a fixed field of view (`minimedi.data.brats`), the phantom's head at scale 1 covers
pi * 0.66 * 0.80 / 4 = 0.415 of the image.

`anatomy(areas, real_areas)` compares a set of generated areas with the real ones (one sex's, or all):
the two-sample Kolmogorov-Smirnov distance `ks_distance` (the largest gap between the two empirical
distribution functions: 0 for identical distributions, 1 for disjoint ones) and `share_outside`, the share
of generated areas outside the real 1st..99th percentile (where a real head is rare: 2% for a perfect
model, and the most telling number when a few images are pushed far past the real range). Both are
invariant under any increasing transform of the measure, so area or diameter gives the same verdict.
"""
import torch
import torch.nn.functional as F

BINS = 256


def otsu_levels(images):
    """Otsu's threshold [N] of images [N, 1, H, W] in [-1, 1]: the upper edge of the dark class."""
    n = images.shape[0]
    index = ((images.reshape(n, -1).float().clamp(-1, 1) + 1) / 2 * BINS).long().clamp(max=BINS - 1)
    ones = torch.ones(index.shape, dtype=torch.float64)
    counts = torch.zeros(n, BINS, dtype=torch.float64).scatter_add_(1, index, ones)
    centres = (torch.arange(BINS, dtype=torch.float64) + 0.5) / BINS * 2 - 1
    w0 = counts.cumsum(1)                             # pixels in bins 0..k (the dark class)
    s0 = (counts * centres).cumsum(1)
    w1, s1 = w0[:, -1:] - w0, s0[:, -1:] - s0
    between = w0 * w1 * (s0 / w0.clamp(min=1) - s1 / w1.clamp(min=1)) ** 2
    k = between.argmax(1)
    return ((k + 1).double() / BINS * 2 - 1).float()


def outside(dark):
    """Dark pixels 4-connected to the image border through dark pixels, bool [N, H, W]."""
    reach = torch.zeros_like(dark)
    reach[:, 0], reach[:, -1], reach[:, :, 0], reach[:, :, -1] = dark[:, 0], dark[:, -1], dark[:, :, 0], dark[:, :, -1]
    while True:
        padded = F.pad(reach[:, None].float(), (1, 1, 1, 1))[:, 0].bool()
        grown = reach | padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
        grown &= dark
        if torch.equal(grown, reach):
            return reach
        reach = grown


@torch.no_grad()
def head_area(images, batch_size=512):
    """The share of each image [N, 1, H, W] in [-1, 1] inside the head's outer contour, float [N]."""
    areas = []
    for chunk in images.split(batch_size):
        chunk = chunk.detach().float().cpu()
        bright = chunk[:, 0] >= otsu_levels(chunk)[:, None, None]
        closed = F.max_pool2d(bright[:, None].float(), 3, 1, 1)[:, 0] > 0
        head = ~outside(~closed)
        eroded = -F.max_pool2d(-head[:, None].float(), 3, 1, 1)[:, 0] > 0
        areas.append(eroded.flatten(1).float().mean(1))
    return torch.cat(areas)


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup_x |F_a(x) - F_b(x)| of two 1-D samples.

    The empirical CDFs are step functions that jump only at sample points, so the supremum is reached at
    one of them: evaluate both (right-continuous) at every point of the pooled sample."""
    a, b = (torch.as_tensor(x, dtype=torch.float64).flatten().sort().values for x in (a, b))
    pooled = torch.cat([a, b])
    f_a = torch.searchsorted(a, pooled, right=True).double() / len(a)
    f_b = torch.searchsorted(b, pooled, right=True).double() / len(b)
    return float((f_a - f_b).abs().max())


def share_outside(values, reference, low=0.01, high=0.99):
    """Share of `values` outside the reference's [low, high] quantile range (linear interpolation)."""
    reference = torch.as_tensor(reference, dtype=torch.float64).flatten()
    lo, hi = torch.quantile(reference, torch.tensor([low, high], dtype=torch.float64))
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    return float(((values < lo) | (values > hi)).double().mean())


def anatomy(areas, real_areas):
    """The report's comparison of generated head areas with real ones: n, KS distance, share outside the
    real 1-99% range, and both medians."""
    areas, real = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (areas, real_areas))
    return {"n": len(areas), "ks": ks_distance(areas, real), "outside": share_outside(areas, real),
            "median": float(torch.quantile(areas, 0.5)), "real_median": float(torch.quantile(real, 0.5)), "n_real": len(real)}
