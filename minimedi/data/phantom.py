"""The embedded synthetic brain-MR corpus: axial slices rendered from sampled attributes.

Real ROCO and BraTS need registration and cannot be downloaded here, so the default data is a
procedural phantom with the structure the fairness method needs: a subgroup (sex) that is learnable
from anatomy but not trivially, a biased pretraining corpus and a labelled target corpus.

Each item is drawn in three steps, each from its own random stream keyed by (seed, corpus, index):
1. `sample_slice`: the attributes (sex, age, modality, glioma side/lobe/size) and the nuisance pose
   (rotation, translation, bias field, noise level, lesion jitter). Sex only sets the head size:
   male head scale ~ N(1.00, 0.04), female ~ N(0.92, 0.04) (relative), so the Bayes accuracy of a
   sex classifier is about Phi(1) = 84%, as in real brain MR where classifiers largely read head size.
2. `caption` (`captions.py`): a caption from a small grammar with synonyms.
3. `render`: partial-volume tissue fractions (`tissue_fractions`), a per-sequence contrast for each
   tissue, a smooth multiplicative bias field and Rician noise |s + n1 + i n2|, mapped to [-1, 1].

Anatomy of the slice (a level through the lateral ventricles): scalp, skull, sulcal CSF, cortical gray
matter folded into gyri, white matter, two lateral ventricles and the interhemispheric fissure. With
age (20-85) the ventricles and the sulcal CSF widen and the cortex thins.

Convention: radiological. Image x grows to the right (columns), y grows downwards (rows); anterior is
at the top and the patient's left is on the image's RIGHT, as radiologists view axial slices. A
glioma "in the left frontal lobe" therefore lies in the upper right of the image.

Determinism: item i depends only on (seed, corpus, i) through PCG64 streams, never on call order,
batch composition or thread count. Per-pixel math is float64 and uses only + - * / sqrt, min/max and
clip, which IEEE 754 rounds identically on every machine (angles come from rational parametrisations
and Chebyshev double-angle formulas instead of sin/cos/atan2); the image is cast to float32 last.
"""
import numpy as np
import torch
from torch.utils.data import Dataset

from minimedi.data.captions import LOBES, MODALITIES, SIDES, SIZES, caption
from minimedi.errors import UserError

CORPORA = {"pretrain": 0, "target": 1}        # part of every RNG key: the two corpora share no item
DEFAULT_TUMOR_SHARE = {"pretrain": 0.6, "target": 1.0}
STREAMS = {"slice": 0, "caption": 1, "noise": 2}

HEAD_SCALE = {"male": (1.00, 0.04), "female": (0.92, 0.04)}  # (mean, std): the sex-linked anatomy
AGE_RANGE = (20, 85)
IMAGE_X = {"left": 1.0, "right": -1.0}  # patient left -> image right (radiological convention)

# Tissues in the painter's order of `tissue_fractions` (bottom first).
TISSUES = ("background", "scalp", "skull", "csf", "gm", "wm", "edema", "rim", "necrosis", "dura")
# Relative signal of each tissue per sequence. T1: WM > GM > CSF, fat-rich scalp bright. T1ce: T1 plus
# gadolinium enhancement of the tumour rim and of the dura and falx (which enhance in every post-contrast
# scan, so T1ce is told from T1 even without a tumour). T2: fluid bright (CSF > GM > WM), edema bright.
# FLAIR: T2 with free water nulled, so CSF is dark while edema stays the brightest tissue. Cortical bone
# is dark on all.
CONTRAST = {
    "t1": (0.0, 0.85, 0.08, 0.12, 0.50, 0.72, 0.38, 0.33, 0.20, 0.15),
    "t1ce": (0.0, 0.85, 0.08, 0.12, 0.50, 0.72, 0.38, 1.00, 0.20, 0.95),
    "t2": (0.0, 0.60, 0.08, 0.95, 0.62, 0.42, 0.85, 0.70, 0.90, 0.15),
    "flair": (0.0, 0.60, 0.08, 0.08, 0.62, 0.45, 0.95, 0.75, 0.45, 0.15),
}

# Geometry in the head's own frame: units of half the image side at head scale 1.
HEAD_AXES = (0.66, 0.80)       # scalp outline, semi-axes (left-right, anterior-posterior)
SCALP, SKULL = 0.045, 0.08     # layer thicknesses (the skull's includes the dura)
DURA = 0.025                   # the dura lining the inner table of the skull
BRAIN_AXES = (HEAD_AXES[0] - SCALP - SKULL, HEAD_AXES[1] - SCALP - SKULL)  # inner table of the skull
# Lesion centres as fractions of BRAIN_AXES: (|x| towards the patient's side, y towards posterior).
LOBE_CENTRES = {"frontal": (0.40, -0.55), "temporal": (0.66, 0.02), "parietal": (0.45, 0.32),
                "occipital": (0.35, 0.66)}
CORE_RADIUS = {"small": (0.07, 0.10), "large": (0.13, 0.17)}  # uniform ranges
GYRI = 16                      # folds around the brain; must be a power of two (double-angle steps)
MAX_TILT = 0.05                # rotation tan(theta/2): |theta| <= 5.7 degrees
MAX_SHIFT = 0.03               # translation, in half image sides


def rotation(t):
    """(cos, sin) of the angle 2 atan(t), by the rational parametrisation of the circle: no libm."""
    return (1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)


VENTRICLE_TILT = rotation(0.1)  # the ventricles diverge backwards by about 11 degrees from the midline


def sample_slice(rng, p_female, p_tumor):
    """All the random choices of one item: public attributes and nuisance parameters, as a flat dict.

    A fixed number of draws whatever the outcome, and sex drawn from its own uniform: sex is independent
    of every other attribute and changes nothing but the head scale."""
    u = rng.random(20)
    z = rng.standard_normal(3)
    sex = "female" if u[0] < p_female else "male"
    tumor = bool(u[3] < p_tumor)
    side, lobe, size = (SIDES[int(u[4] * 2)], LOBES[int(u[5] * 4)], SIZES[int(u[6] * 2)]) if tumor else ("none",) * 3
    mean, std = HEAD_SCALE[sex]
    s = {"sex": sex, "age": AGE_RANGE[0] + int(u[1] * (AGE_RANGE[1] - AGE_RANGE[0] + 1)),
         "modality": MODALITIES[int(u[2] * 4)], "tumor": tumor, "side": side, "lobe": lobe, "tumor_size": size,
         "head_scale": float(mean + std * z[0]),
         "tilt": MAX_TILT * (2 * u[7] - 1), "shift_x": MAX_SHIFT * (2 * u[8] - 1),
         "shift_y": MAX_SHIFT * (2 * u[9] - 1),
         "bias_x": 0.16 * u[10] - 0.08, "bias_y": 0.16 * u[11] - 0.08, "bias_r": 0.16 * u[12] - 0.08,
         "gain": 0.92 + 0.13 * u[13], "sigma": 0.015 + 0.025 * u[14]}
    # A random phase for the gyri and for the lesion's lobulation: a unit vector from two normals.
    norm = np.sqrt(z[1] * z[1] + z[2] * z[2]) + 1e-12
    s["fold_cos"], s["fold_sin"] = z[1] / norm, z[2] / norm
    if tumor:
        fx, fy = LOBE_CENTRES[lobe]
        lo, hi = CORE_RADIUS[size]
        s.update(lesion_x=IMAGE_X[side] * (fx + 0.12 * (u[15] - 0.5)) * BRAIN_AXES[0],
                 lesion_y=(fy + 0.12 * (u[16] - 0.5)) * BRAIN_AXES[1],
                 core=lo + (hi - lo) * u[17], edema=1.5 + 0.4 * u[18], necrosis=0.3 + 0.25 * u[19])
    else:
        s.update(lesion_x=0.0, lesion_y=0.0, core=0.0, edema=0.0, necrosis=0.0)
    return s


def column(slices, key):
    """One parameter of every slice as a float64 [N, 1, 1] array, broadcasting over the pixel grid."""
    return np.array([s[key] for s in slices], dtype=np.float64).reshape(-1, 1, 1)


def head_frame(slices, size):
    """Pixel centres mapped into each head's own frame: x' = R^T (x - shift) / scale, both [N, H, W]."""
    centres = (2 * np.arange(size, dtype=np.float64) + 1) / size - 1
    x, y = centres.reshape(1, 1, -1), centres.reshape(1, -1, 1)
    cos, sin = rotation(column(slices, "tilt"))
    scale = column(slices, "head_scale")
    u, v = x - column(slices, "shift_x"), y - column(slices, "shift_y")
    return (cos * u + sin * v) / scale, (cos * v - sin * u) / scale


def ellipse_sdf(x, y, a, b, wobble=1.0):
    """Signed distance (negative inside) to the ellipse (x/a)^2 + (y/b)^2 = wobble^2, to first order:
    f / |grad f| with f = (x/a)^2 + (y/b)^2 - wobble^2, exact enough within a pixel of the edge."""
    xa, yb = x / a, y / b
    f = xa * xa + yb * yb - wobble * wobble
    gx, gy = xa / a, yb / b                  # half the gradient of f
    return f / (2 * np.sqrt(gx * gx + gy * gy + 1e-12))


def angular_wave(x, y, k, cos_phase, sin_phase):
    """cos(k theta + phase) around the origin, k a power of two, by repeated double angles from
    cos theta = x / r and sin theta = y / r (Chebyshev recurrences: no atan2, no cos)."""
    r = np.sqrt(x * x + y * y + 1e-12)
    c, s = x / r, y / r
    for _ in range(k.bit_length() - 1):
        c, s = c * c - s * s, 2 * c * s
    return c * cos_phase - s * sin_phase


def coverage(d, pixel):
    """Fraction of a pixel inside a shape whose edge is at signed distance d from the pixel centre:
    the box filter of a straight edge is a linear ramp one pixel wide (analytic anti-aliasing)."""
    return np.clip(0.5 - d / pixel, 0.0, 1.0)


def ventricle_sdf(x, y, aging, sign):
    """One lateral ventricle: an ellipse beside the midline, its frontal horn close to the septum and its
    atrium further out; it widens with age (ex vacuo, as the brain around it shrinks)."""
    half_width, half_length = 0.035 + 0.045 * aging, 0.18 + 0.05 * aging
    dx, dy = x - sign * (0.075 + 0.03 * aging), y + 0.02
    cos, sin = VENTRICLE_TILT
    along = -sign * sin * dx - cos * dy     # along the ventricle, positive towards the frontal horn
    across = cos * dx - sign * sin * dy
    return ellipse_sdf(across, along, half_width, half_length)


def lesion_sdfs(x, y, p):
    """Signed distances to the glioma's edema, enhancing rim and necrotic core: concentric, lobulated."""
    dx, dy = x - p["lesion_x"], y - p["lesion_y"]
    r = np.sqrt(dx * dx + dy * dy + 1e-12)
    c, s = dx / r, dy / r
    cos3, sin3 = 4 * c * c * c - 3 * c, 3 * s - 4 * s * s * s   # cos 3theta, sin 3theta
    lobes = cos3 * p["fold_cos"] - sin3 * p["fold_sin"]
    core = p["core"]
    return (r - core * p["edema"] * (1 + 0.15 * lobes), r - core * (1 + 0.08 * lobes),
            r - core * p["necrosis"])


def tissue_fractions(slices, size):
    """Partial-volume fraction of each tissue in each pixel: float64 [len(TISSUES), N, size, size].

    Shapes are painted bottom to top; each covers what lies under it by its pixel coverage, so the
    fractions of a pixel sum to 1 and edges are anti-aliased at any size."""
    keys = ("head_scale", "age", "fold_cos", "fold_sin", "lesion_x", "lesion_y", "core", "edema", "necrosis",
            "tumor")
    p = {k: column(slices, k) for k in keys}
    x, y = head_frame(slices, size)
    pixel = 2.0 / (size * p["head_scale"])           # one pixel, in head-frame units
    aging = (p["age"] - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    folds = angular_wave(x, y, GYRI, p["fold_cos"], p["fold_sin"])
    sulci = 0.012 + 0.028 * aging                     # sulcal CSF between skull and brain widens with age
    cortex = 0.085 - 0.03 * aging                     # and the cortical ribbon thins
    bx, by = BRAIN_AXES[0] - sulci, BRAIN_AXES[1] - sulci
    brain = coverage(ellipse_sdf(x, y, bx, by, 1 + 0.02 * folds), pixel)
    fissure = np.maximum(np.abs(x) - (0.008 + 0.008 * aging), 0.22 - np.abs(y))
    ventricles = np.minimum(ventricle_sdf(x, y, aging, 1.0), ventricle_sdf(x, y, aging, -1.0))
    edema, rim, necrosis = lesion_sdfs(x, y, p)
    in_lesion = brain * p["tumor"]
    layers = [  # (tissue, coverage), bottom to top
        ("scalp", coverage(ellipse_sdf(x, y, *HEAD_AXES), pixel)),
        ("skull", coverage(ellipse_sdf(x, y, HEAD_AXES[0] - SCALP, HEAD_AXES[1] - SCALP), pixel)),
        ("dura", coverage(ellipse_sdf(x, y, BRAIN_AXES[0] + DURA, BRAIN_AXES[1] + DURA), pixel)),
        ("csf", coverage(ellipse_sdf(x, y, *BRAIN_AXES), pixel)),
        ("gm", brain),
        ("wm", coverage(ellipse_sdf(x, y, bx - cortex, by - cortex, 1 + 0.06 * folds), pixel)),
        ("csf", coverage(ventricles, pixel)),
        ("dura", coverage(fissure, pixel) * brain),  # the falx fills the interhemispheric fissure
        ("edema", coverage(edema, pixel) * in_lesion),
        ("rim", coverage(rim, pixel) * in_lesion),
        ("necrosis", coverage(necrosis, pixel) * in_lesion),
    ]
    fractions = np.zeros((len(TISSUES),) + x.shape)
    uncovered = np.ones(x.shape)
    for tissue, cover in reversed(layers):            # top first: each layer gets what is still uncovered
        share = cover * uncovered
        fractions[TISSUES.index(tissue)] += share
        uncovered = uncovered - share
    fractions[TISSUES.index("background")] = uncovered
    return fractions


def draw_noise(rng, size):
    """The two standard-normal channels of complex MR noise for one slice: float64 [2, size, size]."""
    return rng.standard_normal((2, size, size))


def render(slices, size, noise=None):
    """Images in [-1, 1], float32 [N, size, size]: tissue signal x bias field, then Rician noise.

    `noise` ([N, 2, size, size] standard normals) is optional: without it the image is noise-free."""
    fractions = tissue_fractions(slices, size)
    contrast = np.array([CONTRAST[s["modality"]] for s in slices], dtype=np.float64)
    signal = np.zeros(fractions.shape[1:])
    for t in range(len(TISSUES)):
        signal = signal + fractions[t] * contrast[:, t].reshape(-1, 1, 1)
    centres = (2 * np.arange(size, dtype=np.float64) + 1) / size - 1
    x, y = centres.reshape(1, 1, -1), centres.reshape(1, -1, 1)
    # A smooth receive-coil bias field: gain x (1 + linear ramp + radial term), within about +-12%.
    bias = column(slices, "gain") * (1 + column(slices, "bias_x") * x + column(slices, "bias_y") * y
                                     + column(slices, "bias_r") * (x * x + y * y - 0.5))
    signal = signal * bias
    if noise is not None:  # magnitude of a complex signal with Gaussian noise in both channels (Rician)
        sigma = column(slices, "sigma")
        real, imag = signal + sigma * noise[:, 0], sigma * noise[:, 1]
        signal = np.sqrt(real * real + imag * imag)
    return (2 * np.clip(signal, 0.0, 1.0) - 1).astype(np.float32)


PUBLIC = ("sex", "age", "modality", "tumor", "side", "lobe", "tumor_size", "head_scale")


class PhantomCorpus(Dataset):
    """`n` phantom slices of side `size`; item i depends only on (seed, kind, i).

    kind "pretrain": ROCO-like, mixed pathology (`p_tumor` gliomas, default 0.6); "target": BraTS-like,
    all gliomas by default. `p_female` is the share of women. Items are dicts (see `__getitem__`);
    `images()` renders many at once (vectorised over the batch), `captions()` needs no rendering."""

    def __init__(self, n, size, p_female, seed=0, kind="pretrain", p_tumor=None):
        if kind not in CORPORA:
            raise UserError(f"phantom corpus kind {kind!r}: expected one of {', '.join(CORPORA)}")
        p_tumor = DEFAULT_TUMOR_SHARE[kind] if p_tumor is None else p_tumor
        if int(n) != n or n < 0 or int(size) != size or size < 8 or int(seed) != seed or seed < 0:
            raise UserError(f"phantom corpus: need n >= 0, size >= 8 and seed >= 0 integers, got {n}, {size}, {seed}")
        for name, p in (("female share", p_female), ("glioma share", p_tumor)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"phantom corpus: {name} must be in [0, 1], got {p}")
        self.n, self.size, self.seed, self.kind = int(n), int(size), int(seed), kind
        self.p_female, self.p_tumor = float(p_female), float(p_tumor)

    def __len__(self):
        return self.n

    def rng(self, i, stream):
        return np.random.Generator(np.random.PCG64([self.seed, CORPORA[self.kind], i, STREAMS[stream]]))

    def check_index(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"phantom item {i} out of range for a corpus of {self.n}")
        return int(i)

    def slice(self, i):
        """Every sampled parameter of item i (no rendering)."""
        return sample_slice(self.rng(self.check_index(i), "slice"), self.p_female, self.p_tumor)

    def caption(self, i, s=None):
        return caption(s or self.slice(i), self.rng(self.check_index(i), "caption"))

    def captions(self):
        """All n captions, without rendering a pixel."""
        return [self.caption(i) for i in range(self.n)]

    def attributes(self, i, s=None):
        """Item i without its image: caption, attributes and the label (1 = female)."""
        s = s or self.slice(i)
        return {"caption": self.caption(i, s), **{k: s[k] for k in PUBLIC}, "label": int(s["sex"] == "female")}

    def images(self, indices=None, batch_size=32, size=None):
        """Rendered images of `indices` (default: all), float32 [len, 1, size, size], bitwise equal to
        `self[i]["image"]`.

        `size` (default: the corpus') renders the same slices at another resolution: the same anatomy,
        pose, contrast and bias field, anti-aliased for that pixel size, with MR noise drawn per pixel at
        that size. Two sizes give the super-resolution stage real renders at both ends of a pair."""
        size = self.size if size is None else int(size)
        if size < 8:
            raise UserError(f"phantom corpus: need size >= 8, got {size}")
        indices = range(self.n) if indices is None else [self.check_index(i) for i in indices]
        out = torch.empty(len(indices), 1, size, size, dtype=torch.float32)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            slices = [self.slice(i) for i in chunk]
            noise = np.stack([draw_noise(self.rng(i, "noise"), size) for i in chunk])
            out[start:start + len(chunk), 0] = torch.from_numpy(render(slices, size, noise))
        return out

    def __getitem__(self, i):
        """{"image": [1, size, size] in [-1, 1], "caption", "sex", "age", "modality", "tumor", "side",
        "lobe", "tumor_size", "head_scale", "label"}."""
        i = self.check_index(i)
        s = self.slice(i)
        image = render([s], self.size, draw_noise(self.rng(i, "noise"), self.size)[None])
        return {"image": torch.from_numpy(image), **self.attributes(i, s)}


def pretraining_corpus(cfg):
    """The biased ROCO-like corpus of a `DataConfig`."""
    return PhantomCorpus(cfg.n_pretrain, cfg.image_size, cfg.pretrain_female, cfg.seed, "pretrain",
                         p_tumor=cfg.pretrain_tumor)


def target_corpus(cfg):
    """The labelled BraTS-like corpus of a `DataConfig` (all gliomas)."""
    return PhantomCorpus(cfg.n_target, cfg.image_size, cfg.target_corpus_female, cfg.seed, "target")
