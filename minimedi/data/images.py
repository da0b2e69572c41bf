"""What every real-data loader shares: decode an image once to a small square grayscale grid, refuse
file names that leave the dataset folder, and keep count of what was skipped and why.

Geometry. An image of any size becomes `size x size` by scaling its short side to `size` and keeping
the centred square: the centred square of side min(w, h) is resampled straight to the output in one
bicubic pass (`resize(..., box=...)`), which is the same picture as "resize, then centre-crop" with
a single interpolation. Downscaling in Pillow is antialiased (the kernel widens with the scale).

Speed. A ROCO image is ~500 px and we keep 64: JPEG can decode at 1/2, 1/4 or 1/8 scale directly from
the DCT coefficients, and `Image.draft` asks the decoder for the smallest such scale that still covers
the output (and for luminance only), so most of the work is never done.

Intensity. Colour and alpha are dropped (ITU-R 601 luma, Pillow's "L" conversion); 8-bit grey stays
as is. High-bit-depth images (16-bit PNG, float TIFF) have no standard range, so each is min-max scaled
to 8 bits. Pixels are kept as uint8 and mapped to [-1, 1] float32 when an item is read.

Bad items. A loader checks every item when it is built and keeps only the good ones; each skip goes into
a `LoadReport` under a short reason (as does each item kept after a stated repair), and the report becomes
one line: `str(report)`, also issued once as a `DataWarning` when anything was skipped or repaired, so
neither is ever silent nor a traceback.
"""
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image

# Everything Pillow raises for an unreadable, truncated or absurdly large file.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
HIGH_BIT_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DataWarning(UserWarning):
    """Some items of a dataset were skipped; the rest loaded."""


class LoadReport:
    """Items a loader kept, skipped and repaired, by reason, with the first example of each reason.

    `str(report)` is one line, e.g. "ROCO train: kept 118 images, skipped 3: 2 corrupt image
    (e.g. ROCO_00012), 1 missing image (e.g. ROCO_00031)". The public dataset constructors call
    `warn_if_any` last, so the warning points at the caller's line.
    """

    def __init__(self, name, unit="items"):
        self.name, self.unit = name, unit
        self.kept = 0
        self.skipped = Counter()
        self.repaired = Counter()
        self.examples = {}

    def skip(self, reason, example):
        self.skipped[reason] += 1
        self.examples.setdefault(reason, str(example))

    def repair(self, reason, example):
        """An item kept after a repair the loader's docstring states (e.g. NaN background set to 0)."""
        self.repaired[reason] += 1
        self.examples.setdefault(reason, str(example))

    def _reasons(self, counts):
        return ", ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in counts.most_common())

    def __str__(self):
        line = f"{self.name}: kept {self.kept} {self.unit}"
        if self.skipped:
            line += f", skipped {sum(self.skipped.values())}: {self._reasons(self.skipped)}"
        else:
            line += ", none skipped"
        if self.repaired:
            line += f"; repaired {sum(self.repaired.values())}: {self._reasons(self.repaired)}"
        return line

    def warn_if_any(self):
        if self.skipped or self.repaired:
            warnings.warn(str(self), DataWarning, stacklevel=3)


def is_plain_name(name):
    """True if `name` is a single file name, so `folder / name` stays inside `folder`.

    IDs in these layouts are plain names (ROCO_00020, ROCOv2_2023_train_000001); a separator, a drive
    colon, '..' or a NUL byte means the entry points elsewhere (`../../etc/passwd`, `/abs/path`).
    """
    return name not in ("", ".", "..") and not any(c in name for c in "/\\:\0")


def square_box(width, height):
    """(left, top, right, bottom) of the centred square of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def resize_square(picture, size):
    """Short side to `size`, centre crop to `size x size`, in one bicubic resampling."""
    return picture.resize((size, size), Image.BICUBIC, box=square_box(*picture.size))


def to_luminance(picture):
    """A Pillow image of any mode -> mode "L" (8-bit grey)."""
    if picture.mode in HIGH_BIT_DEPTH:
        pixels = np.asarray(picture, dtype=np.float64)
        lo, hi = pixels.min(), pixels.max()
        scaled = (pixels - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8))
    return picture if picture.mode == "L" else picture.convert("L")


def load_grayscale(path, size):
    """Decode an image file fully -> uint8 [size, size]. Raises one of IMAGE_ERRORS if it is unreadable."""
    with Image.open(path) as picture:
        picture.draft("L", (size, size))  # JPEG only: decode at the smallest scale >= size (see top)
        return np.array(resize_square(to_luminance(picture), size))


def uint8_to_unit(pixels):
    """uint8 [H, W] -> float32 tensor [1, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels).float().div(127.5).sub(1.0)[None]
