"""BraTSSlices on small BraTS-style trees built in tmp_path, and on the real brain volumes nibabel ships.

The synthetic volumes have a known brain (an ellipsoid, background exactly 0), so slice selection,
orientation and percentile normalisation are checked against numpy computations written here from
the rules in the module docstring; the resampling to a fixed field of view against scipy. Every
bad-input case has a test.
"""
import gzip
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path
from scipy import ndimage

from minimedi.data.brats import MODALITIES, BraTSSlices, read_volume, volume_slices
from minimedi.data.images import DataWarning
from minimedi.errors import UserError
from minimedi.morphometry import head_area
from tests.trees import brats_tree, ellipsoid_brain, save_nifti

SHAPE = (24, 28, 20)  # x (right), y (anterior), z (superior)


def ellipsoid(shape=SHAPE):
    """A brain-like ellipsoid mask whose axial area shrinks towards the top and bottom slices."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return x ** 2 / 0.8 ** 2 + y ** 2 / 0.85 ** 2 + (z + 0.1) ** 2 / 0.95 ** 2 <= 1


def brain_volume(seed, modality="flair"):
    """Intensities 200..600 inside the ellipsoid (with a few hot voxels), exactly 0 outside."""
    rng = np.random.default_rng(seed + 97 * MODALITIES.index(modality))
    mask = ellipsoid()
    volume = np.where(mask, rng.uniform(200, 600, SHAPE), 0.0).astype(np.float32)
    volume[tuple(rng.integers(0, 4, (3, 5)) + np.array(SHAPE)[:, None] // 2)] = 5000  # outliers
    return volume


def save(volume, path, affine=np.eye(4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)


def save_subject(root, grade, subject, seed):
    for i, modality in enumerate(MODALITIES):
        save(brain_volume(seed, modality), root / grade / subject / f"{subject}_{modality}.nii.gz")
    save(ellipsoid().astype(np.uint8), root / grade / subject / f"{subject}_seg.nii.gz")


def write_labels(path, text):
    path.write_text(text)
    return path


def make_tree(tmp_path):
    root = tmp_path / "brats"
    for seed, (grade, subject) in enumerate([("HGG", "Brats18_A"), ("HGG", "Brats18_B"), ("LGG", "Brats18_C")]):
        save_subject(root, grade, subject, seed)
    labels = write_labels(tmp_path / "labels.csv", "subject,sex,age\nBrats18_A,F,61.5\nBrats18_B,male,\n"
                                                   "Brats18_C, Female ,40\n")
    return root, labels


def expected_slices(volume):
    """Independent numpy version of the rules: brain = the ellipsoid, keep slices with >= half the
    largest area, 0 -> -1 and the 99.5th percentile of the brain -> 1, radiological display orientation."""
    mask = ellipsoid()
    area = mask.sum(axis=(0, 1))
    keep = np.flatnonzero(area >= 0.5 * area.max())
    scaled = np.clip(volume / np.percentile(volume[mask], 99.5), 0, 1) * 2 - 1
    # rows: anterior (high y) first; columns: the patient's right (high x) first, so left is on the right
    images = [np.flip(scaled[:, :, k], (0, 1)).T for k in keep]
    return keep, np.stack(images)[:, 2:26, :]  # 28 rows -> centre 24 (the short side: no resampling)


def test_slices_match_independent_pipeline(tmp_path):
    """Voxels of 1 mm and a field of view of 24 mm on 24 pixels: no resampling, a centred crop."""
    root, labels = make_tree(tmp_path)
    ds = BraTSSlices(root, labels, "flair", 24, fov_mm=24)
    keep, images = expected_slices(brain_volume(0, "flair"))
    assert 0 < len(keep) < SHAPE[2]  # the rule drops the small top and bottom slices
    items = [ds[i] for i in range(len(ds))]
    first = [item for item in items if item["subject"] == "Brats18_A"]
    assert [item["slice"] for item in first] == list(keep)
    got = torch.stack([item["image"][0] for item in first])
    torch.testing.assert_close(got, torch.from_numpy(images).float(), atol=2e-3, rtol=0)  # float16 storage
    assert len(ds) == 3 * len(keep) and ds.report.kept == len(ds) and not ds.report.skipped


def test_items_labels_and_captions(tmp_path):
    root, labels = make_tree(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # a clean tree loads without a warning
        ds = BraTSSlices(root, labels, "t1ce", 16, fov_mm=28)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].std() > 0.2
        assert item["modality"] == "t1ce" and "contrast-enhanced T1-weighted" in item["caption"]
        assert not any(word in item["caption"].lower() for word in ("male", "man", "age", "year"))
    by_subject = {ds[i]["subject"]: ds[i] for i in range(len(ds))}
    a, b, c = by_subject["Brats18_A"], by_subject["Brats18_B"], by_subject["Brats18_C"]
    assert (a["label"], a["sex"], a["age"], a["grade"]) == (1, "female", 61.5, "HGG")
    assert (b["label"], b["sex"], b["grade"]) == (0, "male", "HGG") and np.isnan(b["age"])
    assert (c["label"], c["sex"], c["age"], c["grade"]) == (1, "female", 40.0, "LGG")
    assert "high-grade glioma" in a["caption"] and "low-grade glioma" in c["caption"]
    assert ds.groups == [ds[i]["subject"] for i in range(len(ds))]
    # Item i is the same slice in a dataset built again, and reading it hands out a copy.
    again = BraTSSlices(root, labels, "t1ce", 16, fov_mm=28)
    assert [again[i]["slice"] for i in range(len(again))] == [ds[i]["slice"] for i in range(len(ds))]
    assert all(torch.equal(again[i]["image"], ds[i]["image"]) for i in range(len(ds)))
    before = ds[5]["image"].clone()
    ds[5]["image"].zero_()
    assert torch.equal(ds[5]["image"], before)


def test_orientation_is_radiological_whatever_the_affine(tmp_path):
    """A marker at the patient's anterior left shows top right, from a RAS file and from an LPS file."""
    volume = brain_volume(0)
    volume[6:9, 17:20, 8:12] = 800  # RAS: low x = the patient's left, high y = anterior
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = [SHAPE[0] - 1, SHAPE[1] - 1]  # the same voxel grid in world space, stored flipped
    save(volume, tmp_path / "b" / "HGG" / "S1" / "S1_flair.nii.gz")
    save(volume[::-1, ::-1].copy(), tmp_path / "b" / "HGG" / "S2" / "S2_flair.nii.gz", lps)
    ds = BraTSSlices(tmp_path / "b", write_labels(tmp_path / "l.csv", "subject,sex\nS1,F\nS2,M\n"), "flair", 24,
                     fov_mm=24)
    s1 = [ds[i] for i in range(len(ds)) if ds[i]["subject"] == "S1" and ds[i]["slice"] == 10][0]["image"][0]
    s2 = [ds[i] for i in range(len(ds)) if ds[i]["subject"] == "S2" and ds[i]["slice"] == 10][0]["image"][0]
    assert torch.equal(s1, s2)
    top, left = 28 - 1 - 18 - 2, 24 - 1 - 7  # row of y=18 after the crop of 2 rows; column of x=7
    assert s1[top, left] == s1.max() and left > 12 and top < 12  # top right


def real_volume(name):
    return nib.load(f"{data_path}/{name}")


def reference_resampling(image, spacing, centre, fov_mm, size):
    """scipy's cubic spline at the centres of a size x size grid of fov_mm / size mm around `centre`
    (pixel-edge coordinates), background -1 outside: the geometry of step 6, by another interpolator."""
    step = fov_mm / size
    offsets = (np.arange(size) + 0.5) * step - fov_mm / 2                     # mm from the centre
    rows = centre[0] + offsets / spacing[0] - 0.5                             # index coordinates
    cols = centre[1] + offsets / spacing[1] - 0.5
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(image, [rr, cc], order=3, mode="constant", cval=-1.0).clip(-1, 1)


def test_real_nibabel_brain_against_scipy_resampling(tmp_path):
    """anatomical.nii (a real T1 brain, LAS, 2 mm voxels) at 2.4 mm pixels, against the rules written
    here and scipy's spline for the resampling, in a BraTS-like tree with OASIS-1 style labels."""
    anatomical = real_volume("anatomical.nii")
    assert nib.aff2axcodes(anatomical.affine) == ("L", "A", "S") and anatomical.header.get_zooms() == (2, 2, 2)
    (tmp_path / "real" / "HGG" / "OAS1_0001_MR1").mkdir(parents=True)
    nib.save(anatomical, tmp_path / "real" / "HGG" / "OAS1_0001_MR1" / "OAS1_0001_MR1_t1.nii.gz")
    labels = write_labels(tmp_path / "oasis_cross-sectional.csv",
                          "ID,M/F,Hand,Age,Educ,SES,MMSE,CDR,eTIV,nWBV,ASF,Delay\n"
                          "OAS1_0001_MR1,F,R,74,2,3,29,0,1344,0.743,1.306,N/A\n")
    ds = BraTSSlices(tmp_path / "real", labels, "t1", 40, fov_mm=96)
    assert ds[0]["age"] == 74 and ds[0]["label"] == 1
    ras = np.asarray(anatomical.dataobj, dtype=np.float32)[::-1]            # LAS -> RAS by hand
    mask = ras > 0.1 * np.percentile(ras[ras > 0], 99)
    area = mask.sum(axis=(0, 1))
    keep = np.flatnonzero(area >= 0.5 * area.max())
    assert [ds[i]["slice"] for i in range(len(ds))] == list(keep) and len(keep) == anatomical.shape[2]
    scaled = np.clip(ras / np.percentile(ras[mask], 99.5), 0, 1) * 2 - 1
    projection = np.flip(mask.any(axis=2), (0, 1)).T
    rows, cols = np.flatnonzero(projection.any(axis=1)), np.flatnonzero(projection.any(axis=0))
    centre = ((rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2)
    correlations, mirrored = [], []
    for i, k in enumerate(keep):
        expected = reference_resampling(np.flip(scaled[:, :, k], (0, 1)).T, (2.0, 2.0), centre, 96, 40)
        got = ds[i]["image"][0].numpy()
        correlation = np.corrcoef(expected.ravel(), got.ravel())[0, 1]
        assert np.abs(expected - got).mean() < 0.075, k
        assert np.corrcoef(expected[::-1].ravel(), got.ravel())[0, 1] < correlation - 0.05, k  # not upside down
        correlations.append(correlation)
        mirrored.append(correlation - np.corrcoef(expected[:, ::-1].ravel(), got.ravel())[0, 1])
    # Spline and bicubic differ at the sharp brain edge: 0.95 at worst, 0.96 on average; half a pixel of
    # shift gives 0.925 on average, a 10% error in the spacing less still.
    assert min(correlations) > 0.94 and np.mean(correlations) > 0.95
    assert min(mirrored) > 0 and np.mean(mirrored) > 0.02  # a brain is nearly symmetric, not quite
    assert ds[len(ds) // 2]["image"][0, 0].max() == -1                     # 96 mm > the brain: a background row


def test_real_nibabel_epi_4d_is_skipped_and_its_frame_loads(tmp_path):
    """example4d.nii.gz (a real 4D EPI, 2 x 2 x 2.2 mm) is skipped by the 4D rule; its first frame as a 3D
    file loads, the head in the middle of the default 240 mm field of view."""
    root = tmp_path / "real"
    (root / "LGG" / "OAS1_0002_MR1").mkdir(parents=True)
    shutil.copy(f"{data_path}/example4d.nii.gz", root / "LGG" / "OAS1_0002_MR1" / "OAS1_0002_MR1_t1.nii.gz")
    epi = real_volume("example4d.nii.gz")
    save(np.asarray(epi.dataobj)[..., 0].astype(np.float32), root / "LGG" / "OAS1_0003_MR1" / "OAS1_0003_MR1_t1.nii.gz",
         epi.affine)
    labels = write_labels(tmp_path / "labels.csv", "ID,M/F\nOAS1_0002_MR1,F\nOAS1_0003_MR1,M\n")
    with pytest.warns(DataWarning, match="1 not a 3D volume"):
        ds = BraTSSlices(root, labels, "t1", 33)
    assert dict(ds.report.skipped) == {"not a 3D volume": 1} and set(ds.groups) == {"OAS1_0003_MR1"}
    images = torch.stack([ds[i]["image"][0] for i in range(len(ds))])
    assert 0 < len(images) <= epi.shape[2] and images.min() >= -1 and images.max() <= 1
    assert all(len(torch.unique(im)) > 100 for im in images)              # not a flat or binary image
    assert images[:, 13:20, 13:20].mean() > 0 and images[:, :3, :3].max() == -1  # head centred, corners empty


def middle_area(volume, zooms, size=32, fov_mm=200.0):
    """head_area of the slice with the largest cross-section."""
    slices, _ = volume_slices(volume, zooms, size, fov_mm=fov_mm)
    return float(head_area(torch.from_numpy(slices)[:, None]).max())


def test_voxel_size_does_not_change_the_head():
    """One physical brain sampled at 1 x 1, 1 x 2, 2 x 1, 0.94 x 0.94 and 2 x 2 mm in-plane: the same area
    on the grid, the area of the ellipse. Read as square voxels, the coarse grid would halve it."""
    scale = 1.05
    truth = np.pi * 70 * 85 * scale ** 2 / 200 ** 2      # the largest cross-section, mm^2 / field of view^2
    areas = {}
    for zooms in ((1.0, 1.0, 5.0), (1.0, 2.0, 5.0), (2.0, 1.0, 5.0), (0.94, 0.94, 5.0), (2.0, 2.0, 5.0)):
        volumes, _ = ellipsoid_brain(zooms, scale, np.random.default_rng(0))
        areas[zooms] = middle_area(volumes["t1"], zooms)
        assert areas[zooms] == pytest.approx(truth, rel=0.04), zooms
    volumes, _ = ellipsoid_brain((1.0, 2.0, 5.0), scale, np.random.default_rng(0))
    assert middle_area(volumes["t1"], (1.0, 1.0, 5.0)) == pytest.approx(truth / 2, rel=0.06)


def test_the_same_head_draws_the_same_pixels_at_any_voxel_size():
    fine, _ = ellipsoid_brain((1.0, 1.0, 5.0), 1.0, np.random.default_rng(0))
    coarse, _ = ellipsoid_brain((2.0, 1.0, 5.0), 1.0, np.random.default_rng(0))
    a, _ = volume_slices(fine["flair"], (1.0, 1.0, 5.0), 32, fov_mm=200)
    b, _ = volume_slices(coarse["flair"], (2.0, 1.0, 5.0), 32, fov_mm=200)
    assert a.shape == b.shape and np.abs(a - b).mean() < 0.03
    squashed, _ = volume_slices(coarse["flair"], (1.0, 1.0, 5.0), 32, fov_mm=200)
    assert np.abs(a - squashed).mean() > 0.1           # what ignoring the voxel size would draw


def nifti_by_hand(path):
    """(raw voxels, scl_slope, scl_inter) of a little-endian NIfTI-1 .nii.gz, from the header bytes."""
    data = gzip.decompress(path.read_bytes())
    dim = np.frombuffer(data, "<i2", 8, 40)
    code = int(np.frombuffer(data, "<i2", 1, 70)[0])
    offset, slope, inter = np.frombuffer(data, "<f4", 3, 108)
    dtype = {4: "<i2", 16: "<f4"}[code]
    raw = np.frombuffer(data, dtype, int(np.prod(dim[1:4])), int(offset)).reshape(dim[1:4], order="F")
    return raw, float(slope), float(inter)


def test_int16_scaled_and_float_volumes_read_as_the_values_they_stand_for(tmp_path):
    volumes, _ = ellipsoid_brain((2.0, 2.0, 5.0), 1.0, np.random.default_rng(0))
    signal = volumes["t2"]
    for dtype in (np.int16, "scaled", np.float32):
        path = tmp_path / f"{dtype if isinstance(dtype, str) else dtype.__name__}.nii.gz"
        save_nifti(signal, (2.0, 2.0, 5.0), path, dtype)
        raw, slope, inter = nifti_by_hand(path)
        stands_for = raw.astype(np.float64) * (slope if slope == slope and slope != 0 else 1.0) + \
            (inter if inter == inter else 0.0)
        volume, zooms = read_volume(path)
        assert zooms == (2.0, 2.0, 5.0) and volume.dtype == np.float32
        np.testing.assert_allclose(volume, stands_for, rtol=1e-6, atol=1e-3)
        np.testing.assert_allclose(volume, signal * 1000, atol=0.6 if dtype == np.int16 else 0.05)
        if dtype == "scaled":
            assert slope not in (0.0, 1.0) and raw.dtype == np.int16        # the case being tested
    # stored flipped (LPS) with a scale, read back in RAS: the values, once
    lps = np.diag([-2.0, -2.0, 5.0, 1.0])
    image = nib.Nifti1Image(signal[::-1, ::-1].copy() * 1000, lps)
    image.set_data_dtype(np.int16)
    nib.save(image, tmp_path / "lps.nii.gz")
    volume, zooms = read_volume(tmp_path / "lps.nii.gz")
    assert zooms == (2.0, 2.0, 5.0)
    np.testing.assert_allclose(volume, signal * 1000, atol=0.05)


def test_root_may_be_the_folder_holding_the_training_folder(tmp_path):
    root, labels = make_tree(tmp_path)
    (tmp_path / "download").mkdir()
    shutil.move(root, tmp_path / "download" / "MICCAI_BraTS_2018_Data_Training")
    ds = BraTSSlices(tmp_path / "download", labels, "flair", 16)
    assert set(ds.groups) == {"Brats18_A", "Brats18_B", "Brats18_C"}


def make_bad_tree(tmp_path):
    """Two good subjects and one subject per kind of bad item."""
    root = tmp_path / "bad"
    save_subject(root, "HGG", "good1", 0)
    save_subject(root, "LGG", "good2", 1)
    save_subject(root, "HGG", "unlabelled", 2)
    save_subject(root, "HGG", "noflair", 3)
    (root / "HGG" / "noflair" / "noflair_flair.nii.gz").unlink()
    save_subject(root, "HGG", "truncated", 4)
    path = root / "HGG" / "truncated" / "truncated_flair.nii.gz"
    path.write_bytes(path.read_bytes()[:600])
    save_subject(root, "LGG", "fourd", 5)
    save(np.stack([brain_volume(5)] * 2, -1), root / "LGG" / "fourd" / "fourd_flair.nii.gz")
    save_subject(root, "LGG", "nans", 6)  # NaN and inf in the background: set to 0, kept
    volume = brain_volume(6)
    volume[3, 4, 5], volume[0, 0, 0] = np.nan, np.inf
    save(volume, root / "LGG" / "nans" / "nans_flair.nii.gz")
    save_subject(root, "LGG", "holes", 10)  # NaN in the middle of the brain: skipped
    volume = brain_volume(10)
    volume[12, 14, 9] = np.nan
    save(volume, root / "LGG" / "holes" / "holes_flair.nii.gz")
    save_subject(root, "LGG", "empty", 7)
    save(np.zeros(SHAPE, np.float32), root / "LGG" / "empty" / "empty_flair.nii.gz")
    save_subject(root, "LGG", "singleton", 8)  # [X, Y, Z, 1] is a 3D volume
    save(brain_volume(8)[..., None], root / "LGG" / "singleton" / "singleton_flair.nii.gz")
    save_subject(tmp_path, "outside", "evil", 9)  # a subject outside ROOT, named by a traversal in the labels
    names = ["good1", "good2", "noflair", "truncated", "fourd", "nans", "empty", "singleton", "holes"]
    rows = [f"{name},{'F' if i % 2 else 'M'}" for i, name in enumerate(names)]
    rows += ["../../outside/evil,F", "/etc/passwd,M", "weird,unknown", ",F", "good1,F"]
    return root, write_labels(tmp_path / "labels.csv", "subject,sex\n" + "\n".join(rows) + "\n")


def test_bad_items_are_skipped_counted_and_warned_once(tmp_path):
    root, labels = make_bad_tree(tmp_path)
    with pytest.warns(DataWarning) as caught:
        ds = BraTSSlices(root, labels, "flair", 16)
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and str(caught[0].message) == str(ds.report)
    assert dict(ds.report.skipped) == {
        "subject not in labels": 1, "missing flair file": 1, "unreadable volume": 1, "not a 3D volume": 1,
        "NaN or inf inside the brain": 1, "no slice with enough brain": 1, "label row without subject or sex": 2,
        "duplicate label row": 1}
    assert dict(ds.report.repaired) == {"NaN or inf background set to 0": 1}
    assert "repaired 1: 1 NaN or inf background set to 0 (e.g. nans_flair.nii.gz)" in str(ds.report)
    assert {ds[i]["subject"] for i in range(len(ds))} == {"good1", "good2", "singleton", "nans"}
    assert "from 4 subjects" in str(ds.report)
    nans = torch.stack([ds[i]["image"] for i in range(len(ds)) if ds[i]["subject"] == "nans"])
    clean, _ = volume_slices(brain_volume(6), (1.0, 1.0, 1.0), 16)  # the volume before its background was spoilt
    torch.testing.assert_close(nans[:, 0], torch.from_numpy(clean).half().float(), atol=0, rtol=0)
    for i in range(len(ds)):
        assert torch.isfinite(ds[i]["image"]).all()
    with pytest.warns(DataWarning, match="1 subject not in labels"):  # the label problems again
        ds_t1 = BraTSSlices(root, labels, "t1", 16)  # the other modalities of these subjects are fine
    assert {ds_t1[i]["subject"] for i in range(len(ds_t1))} == {
        "good1", "good2", "noflair", "truncated", "fourd", "nans", "empty", "singleton", "holes"}


def test_structural_errors(tmp_path):
    root, labels = make_tree(tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        BraTSSlices(tmp_path / "nowhere", labels, "flair", 16)
    with pytest.raises(UserError, match="unknown modality 'seg'"):
        BraTSSlices(root, labels, "seg", 16)
    with pytest.raises(UserError, match="labels file .* not found"):
        BraTSSlices(root, tmp_path / "missing.csv", "flair", 16)
    wrong = write_labels(tmp_path / "wrong.csv", "name,gender_code\nBrats18_A,F\n")
    message = r"missing column\(s\) subject \(or ID\), sex \(or M/F\); found name, gender_code"
    with pytest.raises(UserError, match=message):
        BraTSSlices(root, wrong, "flair", 16)
    no_sex = write_labels(tmp_path / "no_sex.csv", "ID,Age\nBrats18_A,50\n")
    with pytest.raises(UserError, match=r"missing column\(s\) sex \(or M/F\); found id, age"):
        BraTSSlices(root, no_sex, "flair", 16)
    with pytest.raises(UserError, match="missing column.*found none"):
        BraTSSlices(root, write_labels(tmp_path / "empty.csv", ""), "flair", 16)
    other = write_labels(tmp_path / "other.csv", "subject,sex\nOAS1_0001_MR1,F\n")
    with pytest.raises(UserError, match="none of the 3 subjects .* labels like 'OAS1_0001_MR1'"):
        BraTSSlices(root, other, "flair", 16)
    (tmp_path / "flat" / "survival_data.csv").parent.mkdir()
    with pytest.raises(UserError, match="no subject folder"):
        BraTSSlices(tmp_path / "flat", labels, "flair", 16)
    for subject in ("Brats18_A", "Brats18_B", "Brats18_C"):
        grade = "LGG" if subject == "Brats18_C" else "HGG"
        (root / grade / subject / f"{subject}_flair.nii.gz").write_bytes(b"broken")
    with pytest.raises(UserError, match="no usable slice.*3 unreadable volume"):
        BraTSSlices(root, labels, "flair", 16)


def test_all_sequences_keep_a_subject_in_one_group(tmp_path):
    """--modality all: every sequence of every subject, each slice naming its own sequence, one group per subject."""
    tree = brats_tree(tmp_path / "b", n=3, zooms=(2.0, 2.0, 6.0), seed=4)
    flair = BraTSSlices(tree["root"], tree["labels"], "flair", 16)
    every = BraTSSlices(tree["root"], tree["labels"], "all", 16)
    assert {item["modality"] for item in every.items} == {"t1", "t1ce", "t2", "flair"}
    assert sorted(set(every.groups)) == sorted(set(flair.groups))
    mine = [i for i, item in enumerate(every.items) if item["modality"] == "flair"]
    assert torch.equal(every.images[mine], flair.images)
    assert all("FLAIR" in every.items[i]["caption"] for i in mine)
