"""The two resampling operators of the cascade: down to the base resolution, and back up.

`downsample` is the box filter: each low-resolution pixel is the mean of the `factor x factor` block of
high-resolution pixels it covers, the model of a detector that integrates over its pixel. It is also how
the phantom anti-aliases (`data/phantom.py`: every pixel is its area's tissue fractions), so a 128 px
render box-filtered to 32 px is within 0.03 RMS of the 32 px render of the same slice (noise-free;
an antialiased bicubic filter is 0.05 off, bilinear 0.07). It makes the low-resolution half of a real
(ROCO / BraTS) training pair, and it is the operator of the consistency error ||downsample(SR(x)) - x||.

`upsample` is bicubic interpolation (Keys 1981; `align_corners=False`, pixel centres as in Pillow): the
first guess of the high-resolution image, which the super-resolution UNet reads beside its noisy input
(Ho et al. 2021, "Cascaded Diffusion Models", sec. 3), and the baseline the stage must beat. Cubic
interpolation overshoots at edges by a few percent; `upsample` leaves that in (the UNet conditions on it),
`bicubic_baseline` clamps to the image range [-1, 1].
"""
import torch.nn.functional as F


def scale_factor(low_size, high_size):
    """high_size / low_size, which must be a whole number."""
    if high_size % low_size:
        raise ValueError(f"{high_size} px is not a whole multiple of {low_size} px")
    return high_size // low_size


def downsample(x, size):
    """Box-filter [N, C, H, H] down to [N, C, size, size] (H a multiple of size)."""
    factor = scale_factor(size, x.shape[-1])
    return F.avg_pool2d(x, factor) if factor > 1 else x


def upsample(x, size):
    """Bicubic [N, C, h, h] up to [N, C, size, size], not clamped."""
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def bicubic_baseline(x, size):
    """The image bicubic interpolation alone makes of a low-resolution image: `upsample`, clamped to [-1, 1]."""
    return upsample(x, size).clamp(-1.0, 1.0)


def downsampled_pairs(high, low_size):
    """(low, high) training pairs from real high-resolution images [N, C, H, H]: the low half is their box filter."""
    return downsample(high.float(), low_size).to(high.dtype), high
