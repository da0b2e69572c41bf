"""Small trees in the official dataset layouts (REFERENCE.md, "Dataset layouts"), for tests.

    roco_tree     ROOT/data/{train,validation}/radiology/{captions.txt, images/ROCO_00001.jpg}
    rocov2_tree   ROOT/{train,valid}_captions.csv + ROOT/{split}/ROCOv2_2023_{split}_000001.jpg
    brats_tree    ROOT/MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/<subject>/<subject>_{t1,t1ce,t2,flair,seg}.nii.gz
                  + ROOT/labels.csv (subject,sex)

The ROCO images are phantom renders (`minimedi.data.phantom`) with their captions; the BraTS volumes are
skull-stripped ellipsoid brains whose size carries sex as the phantom's head scale does
(`phantom.HEAD_SCALE`), so a classifier can learn it. Each tree holds the faults a real download has:
captions over CLIP's 77 tokens, a corrupt JPEG and a malformed caption line (ROCO, ROCOv2); int16 volumes
with anisotropic voxels, one scaled (`scl_slope`/`scl_inter`) and one float volume, a subject missing
from the labels and a bad labels row (BraTS). Each builder returns what a loader should find.
Deterministic for a seed, and a few seconds at most.
"""
import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from minimedi.data.phantom import HEAD_SCALE, PhantomCorpus

# Appended to every LONG_EVERY-th caption: with it, a caption is well over CLIP's 77-token context.
LONG_TAIL = (" The study was obtained on a 1.5 tesla scanner with an eight-channel head coil, and the images"
             " were reviewed by two board-certified neuroradiologists in consensus, who compared them with"
             " the prior examination, the clinical history, the operative report, the pathology findings"
             " and the follow-up imaging obtained at three, six and twelve months after the initial surgery.")
LONG_EVERY = 5


# ---- ROCO and ROCOv2 ------------------------------------------------------------------------------------

def write_jpeg(pixels, path, wide):
    """A phantom render [-1, 1] as an RGB JPEG, every other one padded to a wide picture as many are."""
    gray = np.round((pixels + 1) * 127.5).clip(0, 255).astype(np.uint8)
    if wide:
        gray = np.pad(gray, ((0, 0), (gray.shape[1] // 4,) * 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(gray[..., None], 3, -1)).save(path, quality=92)


def image_captions(n, size, seed):
    """n phantom renders [n, size, size] and their captions, every LONG_EVERY-th with LONG_TAIL."""
    corpus = PhantomCorpus(n, size, 0.2, seed=seed, kind="pretrain")
    captions = [c + (LONG_TAIL if i % LONG_EVERY == 0 else "") for i, c in enumerate(corpus.captions())]
    return corpus.images()[:, 0].numpy(), captions


def corrupt(path):
    """Cut a JPEG in half: Pillow reads the header, then fails on the data."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def roco_tree(root, n=24, size=48, seed=0, splits=("train", "validation")):
    """ROCO: n image/caption pairs per split. In each split the last image is corrupt and one extra line
    has no tab; a non-radiology folder sits beside (the loader reads radiology only).
    Returns {split: {"kept": [IDs a loader keeps], "long": n long captions among them}}."""
    root = Path(root)
    expected = {}
    for k, split in enumerate(splits):
        folder = root / "data" / split / "radiology"
        images, captions = image_captions(n, size, seed + k)
        ids = [f"ROCO_{10000 * k + i + 1:05d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            write_jpeg(images[i], folder / "images" / f"{image_id}.jpg", wide=i % 2 == 1)
        corrupt(folder / "images" / f"{ids[-1]}.jpg")
        lines = [f"{image_id}\t {caption}" for image_id, caption in zip(ids, captions)]
        lines.insert(n // 2, "ROCO_99999 a line without its tab")
        (folder / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        other = root / "data" / split / "non-radiology"
        other.mkdir(parents=True, exist_ok=True)
        (other / "captions.txt").write_text("ROCO_90001\t A photograph of a hand.\n")
        kept = ids[:-1]
        expected[split] = {"kept": kept, "long": sum(1 for i in range(n - 1) if i % LONG_EVERY == 0)}
    return expected


def rocov2_tree(root, n=24, size=48, seed=0, splits=("train", "valid")):
    """ROCOv2: n pairs per split in `{split}_captions.csv` (ID,Caption) and `{split}/`; the last image is
    corrupt and one extra row has an empty caption. Returns as `roco_tree`."""
    root = Path(root)
    expected = {}
    for k, split in enumerate(splits):
        images, captions = image_captions(n, size, seed + 10 + k)
        ids = [f"ROCOv2_2023_{split}_{i + 1:06d}" for i in range(n)]
        for i, image_id in enumerate(ids):
            write_jpeg(images[i], root / split / f"{image_id}.jpg", wide=i % 2 == 1)
        corrupt(root / split / f"{ids[-1]}.jpg")
        rows = list(zip(ids, captions))
        rows.insert(n // 2, (f"ROCOv2_2023_{split}_999999", ""))
        with open(root / f"{split}_captions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("ID", "Caption"))
            writer.writerows(rows)
        expected[split] = {"kept": ids[:-1], "long": sum(1 for i in range(n - 1) if i % LONG_EVERY == 0)}
    return expected


# ---- BraTS 2018 -----------------------------------------------------------------------------------------

BRAIN_AXES = (70.0, 85.0, 60.0)    # mm, semi-axes (left-right, anterior-posterior, inferior-superior) at scale 1
FIELD = (200.0, 200.0, 155.0)      # mm covered by a volume
# Relative signal of (white matter, ventricles, tumour) per sequence, in the spirit of phantom.CONTRAST.
CONTRAST = {"t1": (0.72, 0.12, 0.40), "t1ce": (0.72, 0.12, 1.00), "t2": (0.42, 0.95, 0.85),
            "flair": (0.45, 0.08, 0.95)}
MODALITIES = tuple(CONTRAST)


def grid(zooms):
    """Voxel-centre coordinates in mm (x, y, z), each centred on 0, broadcastable to the volume."""
    shape = [int(round(f / z)) for f, z in zip(FIELD, zooms)]
    axes = [((np.arange(n) - (n - 1) / 2) * z).astype(np.float32) for n, z in zip(shape, zooms)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def ellipsoid_brain(zooms, scale, rng):
    """({modality: float32 volume of signal in [0, 1]}, uint8 tumour labels), RAS, background exactly 0.

    A brain ellipsoid of semi-axes BRAIN_AXES * scale, two lateral ventricles, a glioma in one
    hemisphere (BraTS label 4 core, 2 edema) and a smooth texture, all in mm, so every voxel size draws
    the same anatomy."""
    x, y, z = grid(zooms)
    a, b, c = (scale * s for s in BRAIN_AXES)
    r2 = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2
    brain = r2 <= 1
    ventricles = (((np.abs(x) - 0.12 * a) / (0.08 * a)) ** 2 + ((y + 0.05 * b) / (0.35 * b)) ** 2
                  + (z / (0.2 * c)) ** 2 <= 1)
    side = rng.choice((-1, 1))
    centre = (side * 0.45 * a, rng.uniform(-0.4, 0.4) * b, rng.uniform(-0.2, 0.3) * c)
    d2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    core, edema = brain & (d2 <= rng.uniform(8, 14) ** 2), brain & (d2 <= rng.uniform(18, 24) ** 2)
    texture = 0.05 * np.cos(x / 7 + rng.uniform(0, 6)) * np.cos(y / 9 + rng.uniform(0, 6)) * np.cos(z / 11)
    shading = np.where(brain, 1 - 0.2 * r2, 0).astype(np.float32)
    texture = np.where(brain, texture, 0).astype(np.float32)
    volumes = {}
    for modality, (tissue, csf, tumour) in CONTRAST.items():
        signal = tissue * shading + texture
        signal[ventricles] = csf
        signal[edema] = 0.5 * (signal[edema] + tumour)
        signal[core] = tumour
        volumes[modality] = signal
    labels = np.where(core, 4, np.where(edema, 2, 0)).astype(np.uint8)
    return volumes, labels


def save_nifti(volume, zooms, path, dtype=np.int16, scale=1000.0):
    """An RAS NIfTI with the given voxel sizes. int16: the signal times `scale`, stored unscaled (as
    BraTS is); float32: stored as is; "scaled": the signal times `scale`, which nibabel stores as int16
    with the scl_slope / scl_inter it chooses."""
    affine = np.diag([*zooms, 1.0])
    if dtype == "scaled":
        image = nib.Nifti1Image((volume * scale).astype(np.float32), affine)
        image.set_data_dtype(np.int16)
    elif dtype == np.int16:
        image = nib.Nifti1Image(np.round(volume * scale).astype(np.int16), affine)
    else:
        image = nib.Nifti1Image(np.asarray(volume * scale, dtype=dtype), affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def brats_tree(root, n=12, p_female=0.5, zooms=(0.94, 0.94, 5.0), seed=0):
    """BraTS 2018 training layout with n subjects (two thirds HGG, a third LGG), sex drawn with p_female
    and head scale from phantom.HEAD_SCALE. Subject 0 is stored as scaled int16, subject 1 as float32,
    the rest as int16. The labels CSV leaves out the last subject and has one row with an unknown sex.

    Returns {"root": training folder, "labels": CSV path, "subjects": {name: {"sex", "grade", "scale"}}
    of every subject folder, "labelled": the names a loader keeps}."""
    root = Path(root)
    training = root / "MICCAI_BraTS_2018_Data_Training"
    rng = np.random.default_rng(seed)
    subjects = {}
    for i in range(n):
        grade = "LGG" if i % 3 == 2 else "HGG"
        name = f"Brats18_TCIA{i % 10:02d}_{100 + i}_1"
        sex = "female" if rng.random() < p_female else "male"
        mean, std = HEAD_SCALE[sex]
        scale = float(mean + std * rng.standard_normal())
        volumes, tumour = ellipsoid_brain(zooms, scale, rng)
        dtype = "scaled" if i == 0 else np.float32 if i == 1 else np.int16
        for modality, volume in volumes.items():
            save_nifti(volume, zooms, training / grade / name / f"{name}_{modality}.nii.gz", dtype)
        save_nifti(tumour, zooms, training / grade / name / f"{name}_seg.nii.gz", np.uint8, scale=1)
        subjects[name] = {"sex": sex, "grade": grade, "scale": scale}
    names = list(subjects)
    survival = [f"{name},{50 + i},{300 + 10 * i},GTR" for i, name in enumerate(names)
                if subjects[name]["grade"] == "HGG"]
    (training / "survival_data.csv").write_text("BraTS18ID,Age,Survival,ResectionStatus\n" + "\n".join(survival) + "\n")
    rows = [f"{name},{subjects[name]['sex'][0].upper()}" for name in names[:-1]]
    rows.insert(1, "Brats18_TCIA99_999_1,unknown")
    labels = root / "labels.csv"
    labels.write_text("subject,sex\n" + "\n".join(rows) + "\n")
    return {"root": training, "labels": labels, "subjects": subjects, "labelled": names[:-1]}
