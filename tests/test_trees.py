"""The official-layout trees of tests/trees.py, read by the loaders and by `minimedi.data.load`: the layouts
are the documented ones, every planted fault is found and counted, sex survives loading as head size, and
every corpus says what it is in a dict that checkpoints and JSON can hold."""
import json
import warnings
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from minimedi.config import make_config
from minimedi.data import BraTSSlices, DataWarning, ROCO, ROCOv2, load_pretraining_corpus, load_target_corpus
from minimedi.errors import UserError
from minimedi.morphometry import head_area
from minimedi.tokenizer import Tokenizer
from tests.trees import brats_tree, roco_tree, rocov2_tree

SIZE = 32


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    return SimpleNamespace(root=root, roco=roco_tree(root / "roco"), rocov2=rocov2_tree(root / "rocov2"),
                           brats=brats_tree(root / "brats"))


def quietly(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return make(*args, **kwargs)


def test_roco_tree_layout_and_faults(trees):
    split = trees.root / "roco" / "data" / "train" / "radiology"
    assert (split / "captions.txt").is_file() and (split / "images" / "ROCO_00001.jpg").is_file()
    assert (trees.root / "roco" / "data" / "validation" / "radiology" / "images" / "ROCO_10001.jpg").is_file()
    first = (split / "captions.txt").read_text().splitlines()[0]
    assert first.startswith("ROCO_00001\t ")                       # tab, then a space, as the release
    for name, expected in trees.roco.items():
        with pytest.warns(DataWarning) as caught:
            ds = ROCO(trees.root / "roco", name, SIZE)
        assert len(caught) == 1 and ds.ids == expected["kept"]
        assert dict(ds.report.skipped) == {"malformed caption line": 1, "corrupt image": 1}
        _, n_cut = Tokenizer().tokenize_corpus(ds.captions)
        assert n_cut == expected["long"] > 0
        assert all(0.25 < (ds.pixels[i] > 40).mean() < 0.6 for i in range(len(ds)))  # a head, not a blank


def test_rocov2_tree_layout_and_faults(trees):
    assert (trees.root / "rocov2" / "train" / "ROCOv2_2023_train_000001.jpg").is_file()
    for name, expected in trees.rocov2.items():
        ds = quietly(ROCOv2, trees.root / "rocov2", name, SIZE)
        assert ds.ids == expected["kept"]
        assert dict(ds.report.skipped) == {"malformed CSV row": 1, "corrupt image": 1}
        assert Tokenizer().tokenize_corpus(ds.captions)[1] == expected["long"] > 0


def test_brats_tree_layout_voxels_and_labels(trees):
    tree = trees.brats
    assert tree["root"].name == "MICCAI_BraTS_2018_Data_Training" and (tree["root"] / "survival_data.csv").is_file()
    stored = {}
    for name, subject in tree["subjects"].items():
        folder = tree["root"] / subject["grade"] / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{name}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
        image = nib.load(folder / f"{name}_flair.nii.gz")
        assert image.header.get_zooms() == pytest.approx((0.94, 0.94, 5.0))
        stored[name] = (image.get_data_dtype().name, float(image.dataobj.slope) != 1.0)
    kinds = list(stored.values())
    assert kinds[0] == ("int16", True) and kinds[1] == ("float32", False)
    assert all(kind == ("int16", False) for kind in kinds[2:])
    assert {s["grade"] for s in tree["subjects"].values()} == {"HGG", "LGG"}
    assert {s["sex"] for s in tree["subjects"].values()} == {"female", "male"}
    with pytest.warns(DataWarning) as caught:
        ds = BraTSSlices(tree["root"].parent, tree["labels"], "flair", SIZE)
    assert len(caught) == 1 and sorted(set(ds.groups)) == sorted(tree["labelled"])
    assert dict(ds.report.skipped) == {"subject not in labels": 1, "label row without subject or sex": 1}


def test_brats_tree_carries_sex_as_head_size_through_loading(trees):
    """The brain's size (from the tree) is read back from the loaded pixels, whatever each subject's
    storage (scaled, float, int16): the cue a sex classifier needs survives the 0.94 x 0.94 x 5 mm voxels."""
    tree = trees.brats
    ds = quietly(BraTSSlices, tree["root"], tree["labels"], "t2", SIZE)
    area = head_area(ds.images.float()[:, None])
    subjects = tree["labelled"]
    largest = torch.stack([area[[i for i, g in enumerate(ds.groups) if g == s]].max() for s in subjects])
    scale = torch.tensor([tree["subjects"][s]["scale"] for s in subjects])
    truth = np.pi * 70 * 85 * scale ** 2 / 240 ** 2         # the ellipsoid's largest cross-section / FOV^2
    assert (largest / truth - 1).abs().max() < 0.08
    assert np.corrcoef(largest, scale ** 2)[0, 1] > 0.95
    female = torch.tensor([tree["subjects"][s]["sex"] == "female" for s in subjects])
    assert largest[female].mean() < largest[~female].mean()


def test_brats_tree_is_deterministic(tmp_path):
    a = brats_tree(tmp_path / "a", n=2, zooms=(4.0, 4.0, 5.0), seed=3)
    b = brats_tree(tmp_path / "b", n=2, zooms=(4.0, 4.0, 5.0), seed=3)
    assert a["subjects"] == b["subjects"] and a["labels"].read_text() == b["labels"].read_text()
    for name, subject in a["subjects"].items():
        path = f"{subject['grade']}/{name}/{name}_t1ce.nii.gz"
        assert np.array_equal(nib.load(a["root"] / path).get_fdata(), nib.load(b["root"] / path).get_fdata())


def plain(value):
    """True if `value` is made of str / int / float and dicts and lists of them only."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def round_trip(provenance, tmp_path):
    torch.save({"data": provenance}, tmp_path / "ckpt.pt")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"] == provenance
    assert json.loads(json.dumps(provenance)) == provenance


def test_corpora_of_the_trees_say_what_they_are(trees, tmp_path, capsys):
    data = make_config("tiny", data={"pretrain": f"roco:{trees.root / 'roco'}", "image_size": SIZE}).data
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # what was skipped is one printed line, not a warning
        corpus = load_pretraining_corpus(data)
    assert capsys.readouterr().out.splitlines()[-1] == corpus.provenance["summary"]
    kept = trees.roco["train"]["kept"]
    assert corpus.images.shape == (len(kept), 1, SIZE, SIZE) and corpus.images.dtype == torch.float16
    assert corpus.groups == kept and len(corpus.captions) == len(kept) and corpus.attributes[0] == {}
    p = corpus.provenance
    assert p["kind"] == "roco" and p["path"] == str(trees.root / "roco") and p["split"] == "train"
    assert (p["kept"], p["skipped"], p["image_size"]) == (len(kept), 2, SIZE)
    assert p["skipped_by_reason"] == {"malformed caption line": 1, "corrupt image": 1}
    assert "kept 23 images" in p["summary"] and plain(p)
    round_trip(p, tmp_path)

    data = make_config("tiny", data={"pretrain": f"rocov2:{trees.root / 'rocov2'}", "image_size": SIZE}).data
    assert load_pretraining_corpus(data).provenance["kind"] == "rocov2"

    brats = trees.brats
    data = make_config("tiny", data={"target": f"brats:{brats['root']}", "labels": str(brats["labels"]),
                                     "modality": "t1", "image_size": SIZE}).data
    corpus = load_target_corpus(data)
    assert capsys.readouterr().out.splitlines()[-1] == corpus.provenance["summary"]
    assert sorted(set(corpus.groups)) == sorted(brats["labelled"]) and len(corpus.groups) == len(corpus.images)
    assert [a["subject"] for a in corpus.attributes] == corpus.groups
    assert {a["grade"] for a in corpus.attributes} == {"HGG", "LGG"}        # for a feature network's extra heads
    assert all(isinstance(a["slice"], int) for a in corpus.attributes)
    p = corpus.provenance
    female = np.mean([brats["subjects"][g]["sex"] == "female" for g in corpus.groups])
    assert p["kind"] == "brats" and p["modality"] == "t1" and p["labels"] == str(brats["labels"])
    assert p["subjects"] == len(brats["labelled"]) and p["female_share"] == pytest.approx(female)
    assert (p["fov_mm"], p["pixel_mm"], p["skipped"]) == (240.0, 240.0 / SIZE, 2) and plain(p)
    round_trip(p, tmp_path)
    heldout = corpus.of_groups(brats["labelled"][1:3])
    rows = [i for i, g in enumerate(corpus.groups) if g in brats["labelled"][1:3]]
    assert set(heldout.groups) == set(brats["labelled"][1:3]) and torch.equal(heldout.images, corpus.images[rows])
    assert heldout.attributes == [corpus.attributes[i] for i in rows]
    assert heldout.captions == [corpus.captions[i] for i in rows]


def test_phantom_corpora_say_what_they_are(tmp_path):
    data = make_config("tiny", data={"n_pretrain": 12, "n_target": 10}).data
    pretrain, target = load_pretraining_corpus(data), load_target_corpus(data)
    assert pretrain.groups == list(range(12)) and target.groups == list(range(10))
    assert pretrain.provenance == {"kind": "phantom", "path": "", "split": "pretrain", "image_size": 16,
                                   "modality": "t1, t1ce, t2, flair (phantom)", "kept": 12, "skipped": 0,
                                   "skipped_by_reason": {}, "repaired": 0, "repaired_by_reason": {},
                                   "seed": 0, "female_share": 0.2, "glioma_share": 0.6}
    assert target.provenance["split"] == "target" and target.provenance["female_share"] == 0.45
    round_trip(target.provenance, tmp_path)


def test_data_settings_that_cannot_work_are_one_line(trees):
    for field, value, message in (("pretrain", "roco", "expected phantom or KIND:PATH"),
                                  ("pretrain", "coco:/x", "expected phantom, roco:PATH or rocov2:PATH"),
                                  ("target", "oasis:/x", "expected phantom or brats:PATH")):
        bad = make_config("tiny", data={field: value}).data
        load = load_pretraining_corpus if field == "pretrain" else load_target_corpus
        with pytest.raises(UserError, match=message):
            load(bad)
    no_labels = make_config("tiny", data={"target": f"brats:{trees.brats['root']}"}).data
    with pytest.raises(UserError, match="needs --labels"):
        load_target_corpus(no_labels)
