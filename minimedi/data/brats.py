"""BraTS-style NIfTI volumes -> labelled 2D axial slices: the paper's target corpus for the sex classifier.

    ROOT/{HGG,LGG}/<subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii.gz     (BraTS 2018 training layout;
        ROOT is MICCAI_BraTS_2018_Data_Training, or the folder that holds it)
    labels CSV: subject,sex[,age]   sex as F/M/female/male (case-insensitive)
            or: OASIS-1's oasis_cross-sectional.csv (ID, M/F, Hand, Age, ...): sex from M/F, age from Age

Items are `{"image": float32 [1, size, size] in [-1, 1], "caption", "label" (1 = female, 0 = male),
"sex", "subject", "grade" ("HGG"/"LGG"), "modality", "slice"}`, plus "age" when the labels have an Age
column (NaN where blank). `dataset.groups` is the subject of every item: slices of one subject must
stay on one side of a train / held-out split (`minimedi.classifier.heldout_groups`).

Sex labels. BraTS ships no demographics, so the labels come from a CSV. For BraTS 2018: the BraTS 2019
and 2020 training sets include `name_mapping.csv`, which maps `BraTS_2018_subject_ID` to
`TCGA_TCIA_subject_ID` (e.g. TCGA-02-0006); join that with the TCGA-GBM / TCGA-LGG clinical data
(GDC portal, field `gender`) and write `subject,sex`. Only the TCGA-derived subjects have a mapping;
the rest are skipped as "not in labels" and counted.

Which slices, and why. Of each volume we keep the axial slices whose brain cross-section is at least
half (`min_brain`) of the volume's largest one: the levels from the upper convexity down through the
ventricles to the temporal lobes, where a slice shows the whole brain outline. The vertex and the skull
base give slivers that carry little anatomy and whose area says more about the slice's level than about
the head, and head size is what a sex classifier reads. The rule is relative to the volume, so it does
not depend on the slice thickness or the field of view.

The slice pipeline, per volume:
1. Read with nibabel, which applies `scl_slope` / `scl_inter`: int16, scaled int16 and float volumes all
   become the float32 values they stand for. Reorient to RAS+ (`nib.as_closest_canonical`, which also
   permutes the voxel sizes), so axis 2 is inferior -> superior whatever the file's affine (BraTS is
   stored LPS-like). Slices are shown in the radiological convention of the phantom corpus: anterior at
   the top, the patient's left on the image's right.
2. NaN / inf voxels become 0, the background value, when none lies inside the brain (between brain voxels
   along both its row and its column): registration tools write NaN for voxels outside the field they
   resampled (SPM does by default), and 0 is what those voxels mean. The volume is counted as repaired.
   A NaN / inf inside the brain is a hole we cannot fill honestly: that subject is skipped.
3. Foreground = voxels above 10% of the 99th percentile of the positive voxels: the brain of a
   skull-stripped BraTS volume (background exactly 0), and not the air of an unstripped scan.
4. Slices: see above.
5. Map 0 to -1 and the 99.5th percentile of the foreground to 1, and clip. MR magnitude has a true zero
   (no signal: the background of a skull-stripped volume) but no absolute scale, and the percentile
   ignores the few hot voxels. As in the phantom, -1 means no signal, so the brain's outline survives
   where its tissue is dark (CSF on FLAIR), and the head size read from the pixels is the brain's.
6. Resample each slice, in one antialiased bicubic pass, onto a square grid of `size` pixels covering
   `fov_mm` millimetres (default 240 mm, the BraTS / SRI24 field of view) centred on the volume's
   in-plane foreground. The pixel spacing is then fov_mm / size in both directions whatever the voxels
   (0.94 x 0.94 mm, 1 x 1.5 mm, 2 mm, ...): head size is the sex cue, and anisotropic voxels or another
   field of view must not change it. Outside the volume is background. Clip again to [-1, 1] (bicubic
   overshoots at edges). A BraTS volume (240 x 240 voxels of 1 mm) is thus resized as a whole.

All volumes are read when the dataset is built (a volume is 240x240x155 floats, 36 MB; we keep only
the selected slices, resized, as float16: ~90 slices x 8 KB per subject at 64 px). Checking there,
not in `__getitem__`, means a bad volume can never stop training midway, and item i is always the
same slice. Captions are a template from what is known: modality, glioma, grade. Sex and age are never
in the caption (the target corpus is for the classifier, and prompts never mention them).

Bad data:
- structural (raise `UserError`, one line): a missing root, modality or labels file; a labels CSV
  without a subject or sex column (the message names what is missing and what was found); no subject
  folder under ROOT/HGG or ROOT/LGG; no subject in the labels at all; no usable slice at all.
- per subject (skipped, counted in `dataset.report`, one `DataWarning` line): not in the labels, a
  missing modality file, a truncated or unreadable volume, a volume that is not 3D (4D), NaN or inf
  inside the brain, no slice with enough brain; and per labels row: unknown sex, duplicate subject.
  Repaired volumes (NaN / inf background) are counted in the same line.
Label rows are only ever *looked up* by the names of the subject folders found under ROOT, never turned
into paths, so an entry like `../../etc/passwd` in the labels can match nothing and read nothing.
"""
import csv
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from minimedi.data.images import LoadReport
from minimedi.errors import UserError

MODALITIES = ("t1", "t1ce", "t2", "flair")
MODALITY_NAMES = {"t1": "T1-weighted", "t1ce": "contrast-enhanced T1-weighted", "t2": "T2-weighted",
                  "flair": "FLAIR"}
GRADES = {"HGG": "high-grade", "LGG": "low-grade"}
SUBJECT_COLUMNS = ("subject", "id", "brats18id", "brats_2018_subject_id")
SEX_COLUMNS = ("sex", "m/f", "gender")
SEX_VALUES = {"f": "female", "female": "female", "m": "male", "male": "male"}
FOREGROUND = 0.1                   # of the 99th percentile of positive voxels
WHITE = 99.5                       # the foreground percentile that becomes 1
FIELD_OF_VIEW = 240.0              # mm: BraTS volumes are 240 x 240 voxels of 1 mm in SRI24 space
TRAINING_FOLDER = "MICCAI_BraTS_2018_Data_Training"
VOLUME_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def read_labels(path, report):
    """{subject: {"sex": "female" | "male", "age": float (if the file has an Age column)}}."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels file {path} not found (a CSV with subject,sex)")
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        try:
            rows = list(csv.reader(f))
        except csv.Error as e:
            raise UserError(f"labels {path}: not a readable CSV ({e})") from None
    header = [name.strip().lower() for name in rows[0]] if rows else []
    subject_col = next((header.index(c) for c in SUBJECT_COLUMNS if c in header), None)
    sex_col = next((header.index(c) for c in SEX_COLUMNS if c in header), None)
    if subject_col is None or sex_col is None:
        missing = [name for name, col in (("subject (or ID)", subject_col), ("sex (or M/F)", sex_col)) if col is None]
        raise UserError(f"labels {path}: missing column(s) {', '.join(missing)}; "
                        f"found {', '.join(header) or 'none'}")
    age_col = header.index("age") if "age" in header else None
    labels = {}
    for number, row in enumerate(rows[1:], 2):
        if not any(field.strip() for field in row):
            continue
        subject = row[subject_col].strip() if len(row) > subject_col else ""
        sex = SEX_VALUES.get(row[sex_col].strip().lower()) if len(row) > sex_col else None
        if not subject or sex is None:
            report.skip("label row without subject or sex", f"{path.name} line {number}")
        elif subject in labels:
            report.skip("duplicate label row", subject)
        else:
            labels[subject] = {"sex": sex}
            if age_col is not None:
                labels[subject]["age"] = _number(row[age_col]) if len(row) > age_col else math.nan
    return labels


def _number(text):
    try:
        return float(text)
    except ValueError:
        return math.nan


class BadVolume(Exception):
    """A volume we cannot use; the message is the reason counted in the report."""


def read_volume(path):
    """(float32 [X, Y, Z] in RAS+ orientation, voxel sizes (x, y, z) in mm); raises BadVolume for a
    volume we cannot read or that is not 3D. NaN / inf are left in (see `zero_nonfinite`)."""
    try:
        image = nib.load(path)
    except VOLUME_ERRORS:
        raise BadVolume("unreadable volume") from None
    if len(image.shape) < 3 or any(n != 1 for n in image.shape[3:]):  # [X, Y, Z, 1] is still 3D
        raise BadVolume("not a 3D volume")
    canonical = nib.as_closest_canonical(image)
    try:  # the voxels are decompressed only here: a truncated .nii.gz fails here, not in nib.load
        volume = np.asarray(canonical.dataobj, dtype=np.float32)
    except VOLUME_ERRORS:
        raise BadVolume("unreadable volume") from None
    return volume.reshape(volume.shape[:3]), tuple(float(z) for z in canonical.header.get_zooms()[:3])


def brain_mask(volume):
    """Foreground voxels (see step 3 at the top); all False for an empty volume."""
    positive = volume[volume > 0]
    if positive.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    return volume > FOREGROUND * np.percentile(positive, 99)


def inside(mask):
    """Voxels lying between `mask` voxels along both their row (x) and their column (y)."""
    def between(axis):
        before = np.logical_or.accumulate(mask, axis=axis)
        after = np.flip(np.logical_or.accumulate(np.flip(mask, axis), axis=axis), axis)
        return before & after
    return between(0) & between(1)


def zero_nonfinite(volume):
    """Set NaN / inf voxels to 0 in place (step 2 at the top); their count. Raises BadVolume if any
    lies inside the brain."""
    bad = ~np.isfinite(volume)
    if bad.any():
        volume[bad] = 0.0
        if (bad & inside(brain_mask(volume))).any():
            raise BadVolume("NaN or inf inside the brain")
    return int(bad.sum())


def select_slices(mask, min_brain):
    """Indices of axial slices whose brain area is at least `min_brain` of the largest one's."""
    area = mask.sum(axis=(0, 1))
    if area.max() == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(area >= min_brain * area.max())


def normalize(volume, mask):
    """0 -> -1 and the foreground's WHITE percentile -> 1, clipped (step 5 at the top)."""
    return np.clip(volume / np.percentile(volume[mask], WHITE), 0.0, 1.0) * 2.0 - 1.0


def axial_image(volume, k):
    """Slice k of a RAS+ volume as an image: rows anterior -> posterior, columns patient right -> left.
    Rows step along y, columns along x."""
    return volume[::-1, ::-1, k].T


def foreground_centre(mask):
    """(row, column) of the centre of the in-plane bounding box of `mask`'s axial images, in pixel-edge
    coordinates (the first pixel spans 0..1)."""
    projection = axial_image(mask.any(axis=2, keepdims=True), 0)
    rows, cols = np.flatnonzero(projection.any(axis=1)), np.flatnonzero(projection.any(axis=0))
    return (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2


def resample(image, spacing, centre, fov_mm, size):
    """An image [rows, cols] with pixel spacing (row mm, column mm) -> float32 [size, size] covering
    fov_mm x fov_mm around `centre` (pixel-edge coordinates): one antialiased bicubic pass of Pillow over
    the box of source pixels that spans the field of view, after padding with background (-1) so that
    the box lies inside the image (Pillow's boxes must)."""
    half_rows, half_cols = fov_mm / 2 / spacing[0], fov_mm / 2 / spacing[1]
    box = (centre[1] - half_cols, centre[0] - half_rows, centre[1] + half_cols, centre[0] + half_rows)
    height, width = image.shape
    pad = 2 + math.ceil(max(0.0, -box[0], -box[1], box[2] - width, box[3] - height))
    padded = np.pad(np.asarray(image, dtype=np.float32), pad, constant_values=-1.0)
    picture = Image.fromarray(padded)  # mode "F"
    out = picture.resize((size, size), Image.BICUBIC, box=tuple(b + pad for b in box))
    return np.clip(np.asarray(out), -1.0, 1.0)


def volume_slices(volume, zooms, size, min_brain=0.5, fov_mm=FIELD_OF_VIEW):
    """(float32 [n, size, size] in [-1, 1], slice indices [n]) of one RAS+ volume with voxel sizes
    `zooms` (x, y, z) in mm: steps 3 to 6 at the top."""
    mask = brain_mask(volume)
    keep = select_slices(mask, min_brain)
    if not keep.size:
        return np.zeros((0, size, size), dtype=np.float32), np.zeros(0, dtype=np.int64)
    scaled = normalize(volume, mask)
    spacing, centre = (zooms[1], zooms[0]), foreground_centre(mask)  # image rows step along y, columns along x
    images = np.stack([resample(axial_image(scaled, k), spacing, centre, fov_mm, size) for k in keep])
    return images, keep


def find_subjects(root):
    """[(grade, subject folder)] under ROOT/HGG and ROOT/LGG, sorted."""
    subjects = []
    for grade in GRADES:
        folder = root / grade
        if folder.is_dir():
            subjects += [(grade, d) for d in sorted(folder.iterdir()) if d.is_dir()]
    return subjects


def volume_path(folder, modality):
    """The subject's `<subject>_<modality>.nii.gz` (or uncompressed `.nii`), or None."""
    for suffix in (".nii.gz", ".nii"):
        path = folder / f"{folder.name}_{modality}{suffix}"
        if path.is_file():
            return path
    return None


class BraTSSlices(Dataset):
    """Axial slices of one modality (or of all four: `modality="all"`) of every labelled subject under
    ROOT/{HGG,LGG}, on a grid of `size` pixels spanning `fov_mm` millimetres.

    "all" is what a classifier that judges generated images of every sequence must learn from: the tuning
    and evaluation prompts name all four, and a FLAIR-only classifier would be asked about T1 images it
    never saw. A subject's slices of every sequence share its group, so a split by subject keeps them
    together."""

    def __init__(self, root, labels_csv, modality="all", size=64, min_brain=0.5, fov_mm=FIELD_OF_VIEW):
        if modality not in (*MODALITIES, "all"):
            raise UserError(f"BraTS: unknown modality {modality!r}; expected all or one of {', '.join(MODALITIES)}")
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"BraTS root {root} is not a directory")
        if not find_subjects(root) and (root / TRAINING_FOLDER).is_dir():
            root = root / TRAINING_FOLDER
        self.modality, self.size, self.min_brain, self.fov_mm = modality, size, min_brain, fov_mm
        self.modalities = MODALITIES if modality == "all" else (modality,)
        self.report = LoadReport(f"BraTS {modality}", "slices")
        labels = read_labels(labels_csv, self.report)
        subjects = find_subjects(root)
        if not subjects:
            raise UserError(f"BraTS: no subject folder under {root}/HGG or {root}/LGG")
        labelled = [(grade, folder) for grade, folder in subjects if folder.name in labels]
        if not labelled:
            raise UserError(f"BraTS: none of the {len(subjects)} subjects under {root} is in {labels_csv} "
                            f"(folders look like {subjects[0][1].name!r}, labels like {next(iter(labels), 'none')!r})")
        for grade, folder in subjects:
            if folder.name not in labels:
                self.report.skip("subject not in labels", folder.name)
        images, self.items = [], []
        for grade, folder in tqdm(labelled, desc=f"reading BraTS {modality}", leave=False):
            for m in self.modalities:
                slices, indices = self._subject_slices(folder, m)
                images.append(slices)
                self.items += [self._attributes(folder.name, grade, labels[folder.name], m, int(k)) for k in indices]
        if not self.items:
            raise UserError(f"BraTS: no usable slice under {root} ({self.report})")
        self.images = torch.from_numpy(np.concatenate(images)).to(torch.float16)
        self.groups = [item["subject"] for item in self.items]
        self.report.kept = len(self.items)
        self.report.unit = f"slices from {len(set(self.groups))} subjects"
        self.report.warn_if_any()

    def _subject_slices(self, folder, modality):
        """The subject's selected slices of one sequence, or none (with the reason counted)."""
        empty = np.zeros((0, self.size, self.size), dtype=np.float32), np.zeros(0, dtype=np.int64)
        path = volume_path(folder, modality)
        if path is None:
            self.report.skip(f"missing {modality} file", folder.name)
            return empty
        try:
            volume, zooms = read_volume(path)
            if zero_nonfinite(volume):
                self.report.repair("NaN or inf background set to 0", path.name)
        except BadVolume as e:
            self.report.skip(str(e), path.name)
            return empty
        slices, indices = volume_slices(volume, zooms, self.size, self.min_brain, self.fov_mm)
        if not len(indices):
            self.report.skip("no slice with enough brain", path.name)
        return slices, indices

    def _attributes(self, subject, grade, label, modality, k):
        caption = (f"Axial {MODALITY_NAMES[modality]} MRI of the brain of a patient with a "
                   f"{GRADES[grade]} glioma.")
        return {"caption": caption, "label": int(label["sex"] == "female"), **label, "subject": subject,
                "grade": grade, "modality": modality, "slice": k}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"image": self.images[i].float()[None], **self.items[i]}
