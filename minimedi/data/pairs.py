"""Training pairs of the super-resolution stage: the same images at the base resolution and at the final one.

The phantom renders every slice at any size (`PhantomCorpus.images(size=...)`), so both halves of a
phantom pair are real renders: the high-resolution half is never an upsampled image posing as detail,
and the low-resolution half is bit for bit what the base model learned from. Real corpora (ROCO, ROCOv2)
exist at one resolution: they are loaded at the final size and the low half is their box filter
(`resize.downsampled_pairs`; the base model's own images were resized from the originals by Pillow's
antialiased bicubic, a slightly sharper filter, which noise conditioning augmentation absorbs).
"""
import dataclasses

import torch
from torch.utils.data import Subset

from minimedi.data.load import load_target_corpus, materialize
from minimedi.data.phantom import PhantomCorpus, pretraining_corpus, target_corpus
from minimedi.data.roco import ROCO, ROCOv2
from minimedi.errors import UserError
from minimedi.resize import downsampled_pairs

REAL_CORPORA = {"roco": ROCO, "rocov2": ROCOv2}
HELDOUT_SPLITS = {"roco": "validation", "rocov2": "valid"}


def load_sr_pairs(data_cfg, size, n, source="pretrain"):
    """(low float16 [N, 1, s, s], high float16 [N, 1, size, size], captions [N]) for the first N = min(n, corpus)
    items of the pretraining data `--data` (source "pretrain") or of the target data `--target` ("target"),
    with s = data_cfg.image_size (the base model's side)."""
    if source == "target":
        return _target_pairs(data_cfg, size, n)
    if data_cfg.pretrain.partition(":")[0] == "phantom":
        return _rendered_pairs(pretraining_corpus(data_cfg), size, n)
    return _real_pairs(data_cfg, size, n, "train")


def load_heldout_pairs(data_cfg, size, n):
    """As `load_sr_pairs`, from images no stage trained on: the phantom corpus of the next seed, or the
    validation split of a real corpus."""
    kind = data_cfg.pretrain.partition(":")[0]
    if kind == "phantom":
        return _rendered_pairs(PhantomCorpus(n, data_cfg.image_size, data_cfg.pretrain_female, data_cfg.seed + 1,
                                             "pretrain", p_tumor=data_cfg.pretrain_tumor), size, n)
    return _real_pairs(data_cfg, size, n, HELDOUT_SPLITS.get(kind, "train"))


def _rendered_pairs(corpus, size, n):
    """The first min(n, corpus) phantom slices rendered at the corpus's size and at `size`, with captions."""
    ids = range(min(n, len(corpus)))
    return corpus.images(ids).to(torch.float16), corpus.images(ids, size=size).to(torch.float16), \
        [corpus.caption(i) for i in ids]


def _target_pairs(data_cfg, size, n):
    if data_cfg.target.partition(":")[0] == "phantom":
        return _rendered_pairs(target_corpus(data_cfg), size, n)
    corpus = load_target_corpus(dataclasses.replace(data_cfg, image_size=size))
    low, high = downsampled_pairs(corpus.images[:n], data_cfg.image_size)
    return low.to(torch.float16), high.to(torch.float16), corpus.captions[:n]


def _real_pairs(data_cfg, size, n, split):
    kind, _, path = data_cfg.pretrain.partition(":")
    if kind not in REAL_CORPORA or not path:
        raise UserError(f"--data {data_cfg.pretrain!r}: expected phantom, roco:PATH or rocov2:PATH")
    dataset = REAL_CORPORA[kind](path, split, size)
    high, captions, _ = materialize(Subset(dataset, range(min(n, len(dataset)))), f"loading {kind} at {size} px")
    low, high = downsampled_pairs(high, data_cfg.image_size)
    return low, high, captions
