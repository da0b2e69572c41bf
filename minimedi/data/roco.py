"""ROCO and ROCOv2: radiology images with their captions, the paper's pretraining corpus.

    ROCO   (github.com/razorx89/roco-dataset)   ROOT/data/{train,validation,test}/radiology/
               captions.txt        lines "ROCO_00020<TAB> Axial computed tomography ..." (tab, then a space)
               images/ROCO_00020.jpg, or the name the repository's fetch script gives it,
               images/PMC3970251_CRIONM2014-931546.003.jpg, found through dlinks.txt
               ("ROCO_00020<TAB>wget -r ftp://.../PMC3970251.tar.gz -P /path/to/Dir<TAB>CRIONM2014-931546.003.jpg")
    ROCOv2 (zenodo, ImageCLEFmedical 2023)      ROOT/{train,valid,test}_captions.csv   (ID,Caption)
                                                ROOT/{train,valid,test}/ROCOv2_2023_train_000001.jpg

`ROCO(root, ...)` accepts ROOT as the repository or its `data/` folder, and reads radiology only (the
paper's corpus; the non-radiology half is photographs and charts).

Items are `{"image": float32 [1, size, size] in [-1, 1], "caption": str, "id": str}`.

Every image is decoded once, when the dataset is built, into one uint8 array [N, size, size] (all 65k
ROCO radiology images at 64 px are 270 MB). Checking at construction rather than in `__getitem__` is
what makes bad files harmless: a truncated JPEG is found before training starts instead of killing
epoch 7, and since only good items get an index, item i is the same image on every call, in every
worker and on every rank. Decoding runs on a thread pool (Pillow releases the GIL while decoding) and
keeps the order of the caption file.

Bad data:
- structural (raise `UserError`, one line): a missing root, split, caption file or image folder; a CSV
  without the `ID` and `Caption` columns; a caption file with no valid line; no readable image at all.
- per item (skipped, counted in `dataset.report`, one `DataWarning` line): a malformed caption line,
  a duplicate ID, an image name that is not a plain file name (`../../etc/passwd`, `/abs/x`, from the
  captions or from dlinks.txt: refused before any file is touched; a skip rather than an error, because
  one poisoned row should not make the other 80,000 unusable, and the warning names it), a missing
  image, an unreadable or truncated image.

`str(dataset.report)` is the one-line summary (kept / skipped by reason) for scripts to print.
"""
import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset
from tqdm import tqdm

from minimedi.data.images import IMAGE_ERRORS, LoadReport, is_plain_name, load_grayscale, uint8_to_unit
from minimedi.errors import UserError

ROCO_SPLITS = ("train", "validation", "test")
ROCOV2_SPLITS = ("train", "valid", "test")


class ImageCaptions(Dataset):
    """(ID, image file name, caption) records whose images in `images_dir` decode, as uint8 pixels."""

    def __init__(self, records, images_dir, size, report, workers=None):
        self.size, self.report = size, report
        records = [r for r in records if _is_safe(r, report)]
        paths = [images_dir / file_name for _, file_name, _ in records]
        pixels = np.empty((len(records), size, size), dtype=np.uint8)
        self.ids, self.captions = [], []
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            decoded = pool.map(lambda path: _decode(path, size), paths)
            for (image_id, _, caption), (image, reason) in tqdm(zip(records, decoded), total=len(records),
                                                                desc=f"decoding {report.name}", leave=False):
                if image is None:
                    report.skip(reason, image_id)
                    continue
                pixels[len(self.ids)] = image
                self.ids.append(image_id)
                self.captions.append(caption)
        if not self.ids:
            raise UserError(f"{report.name}: no readable image in {images_dir} ({report})")
        self.pixels = pixels[:len(self.ids)].copy()
        report.kept = len(self.ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"image": uint8_to_unit(self.pixels[i]), "caption": self.captions[i], "id": self.ids[i]}


def _is_safe(record, report):
    image_id, file_name, _ = record
    if not (is_plain_name(image_id) and is_plain_name(file_name)):
        report.skip("unsafe path", repr(file_name))
        return False
    return True


def _decode(path, size):
    """(uint8 [size, size], None) or (None, reason)."""
    if not path.is_file():
        return None, "missing image"
    try:
        return load_grayscale(path, size), None
    except IMAGE_ERRORS:
        return None, "corrupt image"


def _check_split(name, split, splits):
    if split not in splits:
        raise UserError(f"{name}: unknown split {split!r}; expected one of {', '.join(splits)}")


def _existing_dir(path, what):
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{what}: {path} is not a directory")
    return path


class ROCO(ImageCaptions):
    """ROCO radiology split: `ROCO(root, "train" | "validation" | "test", size)`; `workers` decoding
    threads (default min(8, CPU cores))."""

    def __init__(self, root, split="train", size=64, workers=None):
        _check_split("ROCO", split, ROCO_SPLITS)
        root = _existing_dir(root, "ROCO root")
        data = root / "data" if (root / "data").is_dir() else root
        split_dir = data / split / "radiology"
        captions_file, images_dir = split_dir / "captions.txt", split_dir / "images"
        if not captions_file.is_file():
            raise UserError(f"ROCO: no {captions_file} (ROOT must be the ROCO repository or its data/ folder, "
                            f"holding {split}/radiology/captions.txt)")
        if not images_dir.is_dir():
            raise UserError(f"ROCO: no image folder {images_dir} (the repository ships captions only; "
                            "fetch the images with its download script)")
        report = LoadReport(f"ROCO {split}", "images")
        fetched = read_dlinks(split_dir / "dlinks.txt")
        pairs = read_roco_captions(captions_file, report)
        records = [(i, roco_file_name(i, images_dir, fetched), c) for i, c in pairs]
        super().__init__(records, images_dir, size, report, workers)
        report.warn_if_any()


def read_roco_captions(path, report):
    """[(ID, caption)] from a ROCO captions.txt; bad lines are counted in `report`, blank lines ignored."""
    pairs, seen = [], set()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            image_id, tab, caption = line.partition("\t")
            image_id, caption = image_id.strip(), caption.strip()
            if not (tab and image_id and caption) or "\ufffd" in line:
                report.skip("malformed caption line", f"line {number}")
            elif image_id in seen:
                report.skip("duplicate ID", image_id)
            else:
                seen.add(image_id)
                pairs.append((image_id, caption))
    if not pairs:
        raise UserError(f"{path}: no valid line (expected 'ROCO_00020<TAB> caption'; {report})")
    return pairs


def roco_file_name(image_id, images_dir, fetched):
    """<ID>.jpg if it is there, else the fetch script's name for the ID (if dlinks.txt knows it)."""
    name = f"{image_id}.jpg"
    plain_and_there = is_plain_name(name) and (images_dir / name).is_file()
    return name if plain_and_there else fetched.get(image_id, name)


def read_dlinks(path):
    """{ID: "<PMCID>_<image name>"}, the file names ROCO's fetch script writes; {} without dlinks.txt.

    A line is "ROCO_00020<TAB>wget -r ftp://.../PMC3970251.tar.gz -P /path/to/Dir<TAB>name.jpg"; lines of
    another shape are left out (their images can still be found as <ID>.jpg, else count as missing).
    """
    names = {}
    if not path.is_file():
        return names
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            words = fields[1].split() if len(fields) == 3 else []
            archive = next((w for w in words if w.endswith(".tar.gz")), "")
            if archive:
                names[fields[0].strip()] = f"{archive.rsplit('/', 1)[-1][:-len('.tar.gz')]}_{fields[2].strip()}"
    return names


class ROCOv2(ImageCaptions):
    """ROCOv2 split: `ROCOv2(root, "train" | "valid" | "test", size)`; `workers` as for `ROCO`."""

    def __init__(self, root, split="train", size=64, workers=None):
        _check_split("ROCOv2", split, ROCOV2_SPLITS)
        root = _existing_dir(root, "ROCOv2 root")
        captions_file = root / f"{split}_captions.csv"
        if not captions_file.is_file():
            raise UserError(f"ROCOv2: no {captions_file} (expected ROOT/{split}_captions.csv and ROOT/{split}/)")
        images_dir = _existing_dir(root / split, "ROCOv2 images")
        report = LoadReport(f"ROCOv2 {split}", "images")
        records = [(i, f"{i}.jpg", c) for i, c in read_rocov2_captions(captions_file, report)]
        super().__init__(records, images_dir, size, report, workers)
        report.warn_if_any()


def read_rocov2_captions(path, report):
    """[(ID, caption)] from an `ID,Caption` CSV (column names matched case-insensitively)."""
    pairs, seen = [], set()
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        header = [name.strip().lower() for name in next(reader, [])]
        missing = [name for name in ("id", "caption") if name not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}")
        id_col, caption_col = header.index("id"), header.index("caption")
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    report.skip("malformed CSV row", f"line {reader.line_num}")
                    continue
                image_id, caption = row[id_col].strip(), row[caption_col].strip()
                if not (image_id and caption) or "\ufffd" in image_id + caption:
                    report.skip("malformed CSV row", f"line {reader.line_num}")
                elif image_id in seen:
                    report.skip("duplicate ID", image_id)
                else:
                    seen.add(image_id)
                    pairs.append((image_id, caption))
        except csv.Error as e:
            raise UserError(f"{path}: not a readable CSV at line {reader.line_num} ({e})") from None
    if not pairs:
        raise UserError(f"{path}: no valid row ({report})")
    return pairs
