"""From a `--data` / `--target` setting to tensors in memory: what the training tasks consume.

Every corpus here fits in memory at training resolution (20,000 phantom slices at 32x32 are 40 MB in
float16; all of ROCO's radiology split at 64x64 is 0.5 GB), so we decode each image once, keep the
stack as one tensor and draw batches by index: no per-step decoding, exact reproducibility, and every
DDP rank can draw the same global batch.

A `Corpus` also says what it is. Its `provenance` is a plain dict (str, int, float, and dicts and lists
of them: it goes into `torch.load(weights_only=True)` checkpoints and into JSON) naming the kind of
data, the path as it was given, the split, how many items were kept and skipped and why, the image size
and the modality, so that every artifact can record the data it learned from. Its `groups` name the
subject of every image, for splits that keep a subject on one side (`classifier.heldout_groups`).

A real corpus also says, on loading, what it kept and skipped: its `LoadReport` line, printed as the
first thing a command tells about its data ("ROCO train: kept 63 images, skipped 2: 1 corrupt image
(e.g. ROCO_00064), ..."), rather than as a Python warning with a source line under it.
"""
import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from minimedi.data.brats import BraTSSlices
from minimedi.data.images import DataWarning
from minimedi.data.phantom import PhantomCorpus, pretraining_corpus, target_corpus
from minimedi.data.roco import ROCO, ROCOv2
from minimedi.errors import UserError

ATTRIBUTES = ("sex", "age", "modality", "tumor", "side", "lobe", "tumor_size", "label", "subject", "grade", "slice")
PHANTOM_MODALITIES = "t1, t1ce, t2, flair (phantom)"
RADIOLOGY = "radiology (mixed)"


@dataclass
class Corpus:
    """images float16 [N, 1, H, W] in [-1, 1]; captions [N]; attributes [N] dicts; groups [N] (the
    subject of each image: an index or ID where every image is its own); provenance (see the top)."""
    images: torch.Tensor
    captions: list
    attributes: list
    groups: list
    provenance: dict

    def of_groups(self, groups):
        """The items of the given groups (e.g. a classifier's `heldout_groups`), in corpus order."""
        wanted = set(groups)
        keep = [i for i, g in enumerate(self.groups) if g in wanted]
        return Corpus(self.images[keep], [self.captions[i] for i in keep], [self.attributes[i] for i in keep],
                      [self.groups[i] for i in keep], self.provenance)


def materialize(dataset, desc="loading", batch_size=256):
    """(images float16 [N, 1, H, W], captions [N], attributes [N] dicts) from a dataset of item dicts."""
    if len(dataset) == 0:
        raise UserError(f"{desc}: the dataset is empty")
    if isinstance(dataset, PhantomCorpus):  # batched rendering, ~3x faster than item by item
        attributes = [dataset.attributes(i) for i in range(len(dataset))]
        captions = [a.pop("caption") for a in attributes]
        return dataset.images().to(torch.float16), captions, attributes
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=list)
    images, captions, attributes = [], [], []
    for items in tqdm(loader, desc=desc, leave=False):
        images.append(torch.stack([item["image"] for item in items]).to(torch.float16))
        captions.extend(item["caption"] for item in items)
        attributes.extend({k: item[k] for k in ATTRIBUTES if k in item} for item in items)
    return torch.cat(images), captions, attributes


def describe(kind, path, split, image_size, modality, report=None, kept=None, **facts):
    """The provenance dict of a corpus: the facts every kind has, the counts of its `LoadReport` (or
    `kept`, for data that skips nothing), then `facts`."""
    out = {"kind": kind, "path": str(path), "split": split, "image_size": int(image_size), "modality": modality,
           "kept": int(report.kept if report is not None else kept)}
    if report is not None:
        out.update(skipped=sum(report.skipped.values()), skipped_by_reason=dict(report.skipped),
                   repaired=sum(report.repaired.values()), repaired_by_reason=dict(report.repaired),
                   summary=str(report))
    else:
        out.update(skipped=0, skipped_by_reason={}, repaired=0, repaired_by_reason={})
    return {**out, **facts}


def _split_spec(spec, flag):
    kind, _, path = spec.partition(":")
    if kind != "phantom" and not path:
        raise UserError(f"{flag} {spec!r}: expected phantom or KIND:PATH")
    return kind, path


def _read(dataset_class, *args):
    """A real-data dataset, built with its one `DataWarning` silenced and its report line printed instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        dataset = dataset_class(*args)
    print(dataset.report)
    return dataset


def _phantom(corpus, split, facts):
    images, captions, attributes = materialize(corpus, f"rendering the phantom {split} corpus")
    provenance = describe("phantom", "", split, corpus.size, PHANTOM_MODALITIES, kept=len(corpus),
                          seed=corpus.seed, female_share=corpus.p_female, glioma_share=corpus.p_tumor, **facts)
    return Corpus(images, captions, attributes, list(range(len(corpus))), provenance)


def load_pretraining_corpus(data):
    """The image/caption corpus the diffusion model (and small CLIP) learn from (`data`: a DataConfig,
    its `--data` setting): phantom, roco:PATH or rocov2:PATH, the training split."""
    kind, path = _split_spec(data.pretrain, "--data")
    if kind == "phantom":
        return _phantom(pretraining_corpus(data), "pretrain", {})
    if kind not in ("roco", "rocov2"):
        raise UserError(f"--data {data.pretrain!r}: expected phantom, roco:PATH or rocov2:PATH")
    dataset = _read(ROCO if kind == "roco" else ROCOv2, path, "train", data.image_size)
    images, captions, attributes = materialize(dataset, f"loading {dataset.report.name}")
    provenance = describe(kind, path, "train", data.image_size, RADIOLOGY, dataset.report)
    return Corpus(images, captions, attributes, list(dataset.ids), provenance)


def load_target_corpus(data):
    """The labelled target corpus the subgroup classifier learns from (`data`: a DataConfig, its
    `--target` setting): phantom, or brats:PATH with `--labels`."""
    kind, path = _split_spec(data.target, "--target")
    if kind == "phantom":
        return _phantom(target_corpus(data), "target", {})
    if kind != "brats":
        raise UserError(f"--target {data.target!r}: expected phantom or brats:PATH")
    if not data.labels:
        raise UserError("--target brats:PATH needs --labels CSV (subject,sex): BraTS ships no sex")
    dataset = _read(BraTSSlices, path, data.labels, data.modality, data.image_size, data.min_brain, data.fov)
    images, captions, attributes = materialize(dataset, "loading BraTS")
    female = sum(a["label"] for a in attributes) / len(attributes)
    provenance = describe("brats", path, "training", data.image_size, data.modality, dataset.report,
                          labels=str(data.labels), subjects=len(set(dataset.groups)), female_share=female,
                          fov_mm=float(dataset.fov_mm), pixel_mm=dataset.fov_mm / data.image_size)
    return Corpus(images, captions, attributes, list(dataset.groups), provenance)


def load_pretraining_data(data):
    """(images, captions, attributes) of `load_pretraining_corpus`."""
    corpus = load_pretraining_corpus(data)
    return corpus.images, corpus.captions, corpus.attributes


def load_target_data(data):
    """(images, captions, attributes) of `load_target_corpus`."""
    corpus = load_target_corpus(data)
    return corpus.images, corpus.captions, corpus.attributes
