"""ROCO / ROCOv2 loaders on small trees of the official layouts built in tmp_path.

Pixels are checked against an independent reference (centre crop + torch's antialiased bicubic
resize, which follows Pillow's kernel), and every kind of bad input has a case: structural problems
raise `UserError` with one clear line, bad items are skipped, counted and warned about once.
"""
import csv
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimedi.data.images import DataWarning, load_grayscale
from minimedi.data.roco import ROCO, ROCOv2
from minimedi.errors import UserError

SIZE = 16


def smooth_rgb(width, height, seed):
    """A smooth colour picture (JPEG-friendly) of the given size."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    rgb = [127 + 120 * np.sin(4 * x + 3 * y + p) for p in phase]
    return np.stack(rgb, -1).round().astype(np.uint8)


def gradient(width=37, height=57):
    """An 8-bit grey pattern that changes along both axes, so a misplaced crop shows (even size
    differences: the centre crop then starts on a whole pixel, as in the reference)."""
    y, x = np.mgrid[0:height, 0:width]
    return (255 * (0.5 + 0.3 * np.sin(x / 5) + 0.2 * np.cos(y / 4))).round().clip(0, 255).astype(np.uint8)


def reference(gray, size):
    """Independent reference: centre square crop, then torch antialiased bicubic to size x size, in [-1, 1]."""
    h, w = gray.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = torch.from_numpy(gray[top:top + side, left:left + side].astype(np.float32))[None, None]
    out = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (out[0].clamp(0, 255) / 127.5 - 1).float()


def write_images(folder):
    """Good images of odd sizes and modes (some PNG content under a .jpg name, as Pillow reads by content)
    and bad ones. Returns {id: grayscale uint8 array the loader should see (None: not checked exactly)}."""
    folder.mkdir(parents=True)
    gray = gradient()
    Image.fromarray(gray).save(folder / "ROCO_00001.jpg", format="PNG")
    Image.fromarray(smooth_rgb(300, 200, 0)).save(folder / "ROCO_00002.jpg", quality=95)
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128                               # pure red, half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "ROCO_00003.jpg", format="PNG")
    Image.fromarray(np.full((21, 17), 40000, np.uint16)).save(folder / "ROCO_00004.jpg", format="PNG")  # 16 bit
    Image.fromarray(gradient(45, 23)).save(folder / "ROCO_00005.jpg", format="PNG")  # wide, grey
    good = (folder / "ROCO_00002.jpg").read_bytes()
    (folder / "ROCO_00006.jpg").write_bytes(good[:len(good) // 2])      # truncated JPEG
    (folder / "ROCO_00007.jpg").write_bytes(b"not an image at all")     # garbage
    red_luma = round(200 * 299 / 1000)                                   # ITU-R 601 luma of (200, 0, 0)
    return {"ROCO_00001": gray, "ROCO_00003": np.full((40, 30), red_luma, np.uint8),
            "ROCO_00004": np.zeros((21, 17), np.uint8), "ROCO_00005": gradient(45, 23), "ROCO_00002": None}


def make_roco(tmp_path):
    split = tmp_path / "roco" / "data" / "train" / "radiology"
    expected = write_images(split / "images")
    (tmp_path / "secret.jpg").write_bytes((split / "images" / "ROCO_00001.jpg").read_bytes())
    assert (split / "images" / "../../../../../secret.jpg").resolve() == (tmp_path / "secret.jpg").resolve()
    # ROCO_00005 under the name the ROCO repository's fetch script gives it, found through dlinks.txt
    (split / "images" / "ROCO_00005.jpg").rename(split / "images" / "PMC3970251_CRIONM2014-931546.003.jpg")
    (split / "dlinks.txt").write_text(
        "ROCO_00005\twget -r ftp://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package/1e/ed/PMC3970251.tar.gz -P /path/to/Dir"
        "\tCRIONM2014-931546.003.jpg\n"
        "ROCO_00011\twget -r ftp://x/PMC1.tar.gz -P /path/to/Dir\t../../../../secret.jpg\n"
        "a line of another shape\n")
    lines = [b"ROCO_00001\t CT of the chest.", b"ROCO_00002\t Axial MRI, brain.", b"",
             b"ROCO_00003\t X-ray of the hand.", b"ROCO_00004\t Sixteen-bit PNG.", b"ROCO_00005\t Ultrasound.",
             b"ROCO_00006\t Truncated.", b"ROCO_00007\t Garbage.", b"ROCO_00008\t Missing file.",
             b"no tab on this line", b"ROCO_00009\t", b"\t caption without an id", b"ROCO_00010\t bad \xff byte",
             b"ROCO_00001\t Duplicate.", b"../../../../../secret\t Escapes the root.",
             b"/etc/passwd\t Absolute.", b"  ",
             b"ROCO_00011\t Its dlinks.txt name escapes the root."]
    (split / "captions.txt").write_bytes(b"\n".join(lines) + b"\n")
    return tmp_path / "roco", expected


def load_quietly(cls, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return cls(*args)


def test_roco_items_match_reference_and_bad_items_are_counted(tmp_path):
    root, expected = make_roco(tmp_path)
    with pytest.warns(DataWarning) as caught:
        ds = ROCO(root, "train", SIZE)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert ds.ids == ["ROCO_00001", "ROCO_00002", "ROCO_00003", "ROCO_00004", "ROCO_00005"]
    assert ds.report.kept == 5
    assert dict(ds.report.skipped) == {"corrupt image": 2, "missing image": 1, "malformed caption line": 4,
                                       "duplicate ID": 1, "unsafe path": 3}
    assert str(ds.report) == str(caught[0].message) and "skipped 11" in str(ds.report)
    for i, image_id in enumerate(ds.ids):
        item = ds[i]
        assert item["image"].shape == (1, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
        assert item["id"] == image_id
        if expected[image_id] is not None:
            torch.testing.assert_close(item["image"], reference(expected[image_id], SIZE), atol=2.5 / 127.5, rtol=0)
    assert ds[0]["caption"] == "CT of the chest." and ds[1]["caption"] == "Axial MRI, brain."
    assert ds[1]["image"].std() > 0.05                   # the RGB picture kept its structure


def image_file(image_id):
    """The file of an ID in make_roco's tree (ROCO_00005 under its fetch-script name)."""
    return "PMC3970251_CRIONM2014-931546.003.jpg" if image_id == "ROCO_00005" else f"{image_id}.jpg"


def test_roco_item_order_does_not_depend_on_the_decoding_threads(tmp_path):
    """Decoding runs on a thread pool whose images finish in any order; item i must still be the i-th
    good line of captions.txt, with its own image."""
    root, _ = make_roco(tmp_path)
    one, many = load_quietly(ROCO, root, "train", SIZE, 1), load_quietly(ROCO, root, "train", SIZE, 4)
    assert one.ids == many.ids and one.captions == many.captions and np.array_equal(one.pixels, many.pixels)
    assert len({one.pixels[i].tobytes() for i in range(len(one))}) == len(one)  # five different images
    images = root / "data" / "train" / "radiology" / "images"
    for i, image_id in enumerate(one.ids):
        assert np.array_equal(one.pixels[i], load_grayscale(images / image_file(image_id), SIZE))


def test_roco_accepts_data_folder_as_root(tmp_path):
    root, _ = make_roco(tmp_path)
    a, b = load_quietly(ROCO, root, "train", SIZE), load_quietly(ROCO, root / "data", "train", SIZE)
    assert a.ids == b.ids and np.array_equal(a.pixels, b.pixels)


def test_draft_decoding_of_a_large_jpeg_matches_full_decoding(tmp_path):
    rgb = smooth_rgb(1000, 760, 3)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    fast = torch.from_numpy(load_grayscale(tmp_path / "big.jpg", SIZE)).float() / 127.5 - 1
    with Image.open(tmp_path / "big.jpg") as picture:
        full = np.asarray(picture.convert("L"))
    assert (fast - reference(full, SIZE)[0]).abs().mean() < 3 / 127.5


def test_roco_structural_errors(tmp_path):
    root, _ = make_roco(tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        ROCO(tmp_path / "nowhere", "train", SIZE)
    with pytest.raises(UserError, match="unknown split 'valid'"):
        ROCO(root, "valid", SIZE)
    with pytest.raises(UserError, match="validation/radiology/captions.txt"):
        ROCO(root, "validation", SIZE)
    test_split = root / "data" / "test" / "radiology"
    test_split.mkdir(parents=True)
    (test_split / "captions.txt").write_text("ROCO_00001\t A caption.\n")
    with pytest.raises(UserError, match="no image folder"):
        ROCO(root, "test", SIZE)
    (test_split / "images").mkdir()
    (test_split / "captions.txt").write_text("just text\nmore text without tabs\n")
    with pytest.raises(UserError, match="no valid line.*2 malformed caption line"):
        ROCO(root, "test", SIZE)
    (test_split / "captions.txt").write_text("")
    with pytest.raises(UserError, match="no valid line"):
        ROCO(root, "test", SIZE)
    (test_split / "captions.txt").write_text("ROCO_00001\t Missing.\nROCO_00002\t Corrupt.\n")
    (test_split / "images" / "ROCO_00002.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(UserError, match="no readable image.*1 missing image.*1 corrupt image|1 corrupt.*1 missing"):
        ROCO(root, "test", SIZE)


def make_rocov2(tmp_path, rows, header=("ID", "Caption")):
    root = tmp_path / "rocov2"
    write_images(root / "train")
    with open(root / "train_captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return root


def test_rocov2_items_and_bad_rows(tmp_path):
    rows = [("ROCO_00001", "CT, axial, with contrast."), ("ROCO_00003", "Plain film."), ("ROCO_00006", "Truncated."),
            ("ROCO_00042", "Missing."), ("ROCO_00004", ""), ("../train/ROCO_00001", "Escapes."),
            ("/tmp/x", "Absolute."), ("ROCO_00005", "Extra", "field"), ("ROCO_00003", "Duplicate.")]
    root = make_rocov2(tmp_path, rows)
    with pytest.warns(DataWarning):
        ds = ROCOv2(root, "train", SIZE)
    assert ds.ids == ["ROCO_00001", "ROCO_00003"]
    assert [ds[i]["caption"] for i in range(2)] == ["CT, axial, with contrast.", "Plain film."]
    assert dict(ds.report.skipped) == {"corrupt image": 1, "missing image": 1, "malformed CSV row": 2,
                                       "unsafe path": 2, "duplicate ID": 1}
    torch.testing.assert_close(ds[0]["image"], reference(gradient(), SIZE), atol=2.5 / 127.5, rtol=0)


def test_rocov2_structural_errors(tmp_path):
    root = make_rocov2(tmp_path, [("ROCO_00001", "x")], header=("id", "text"))
    with pytest.raises(UserError, match="missing column\\(s\\) caption; found id, text"):
        ROCOv2(root, "train", SIZE)
    with pytest.raises(UserError, match="unknown split 'validation'"):
        ROCOv2(root, "validation", SIZE)
    with pytest.raises(UserError, match="test_captions.csv"):
        ROCOv2(root, "test", SIZE)
    (root / "train_captions.csv").write_text("")
    with pytest.raises(UserError, match="missing column\\(s\\) id, caption; found none"):
        ROCOv2(root, "train", SIZE)
    (root / "train_captions.csv").write_text("ID,Caption\n,\nROCO_00001,\n")
    with pytest.raises(UserError, match="no valid row"):
        ROCOv2(root, "train", SIZE)
