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

`plausibility(areas, real_areas)` compares one sex's generated areas with the real ones: the two-sample
Kolmogorov-Smirnov distance (the largest gap between the two empirical distribution functions) and the
share of generated areas outside the real 1st..99th percentile (where a real head of that sex is rare).
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


def plausibility(areas, real_areas):
    """{"ks": two-sample Kolmogorov-Smirnov distance, "outside_real_1_99": share of `areas` outside the
    1st..99th percentile of `real_areas`} for 1-D tensors of head areas."""
    areas, real_areas = areas.double().flatten(), real_areas.double().flatten()
    pooled = torch.cat([areas, real_areas])

    def cdf(x):  # the empirical distribution function of x at every pooled value
        return torch.searchsorted(x.sort().values, pooled, right=True).double() / len(x)

    lo, hi = torch.quantile(real_areas, torch.tensor([0.01, 0.99], dtype=torch.float64))
    return {"ks": float((cdf(areas) - cdf(real_areas)).abs().max()),
            "outside_real_1_99": float(((areas < lo) | (areas > hi)).double().mean())}
