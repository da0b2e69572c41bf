"""The subgroup classifier: `python train.py --task classifier` -> <run>/classifier.pt.

A calibrated classifier of the target corpus's subgroups (`--subgroup sex | age | sex_age`,
`minimedi.classifier`), trained on the subjects outside a held-out share and calibrated on the held-out
ones (no subject on both sides). The share of each class in the target corpus is the alignment's target
distribution, recorded as "target_shares"; the held-out subjects are recorded as "split", so the report's
independent check classifier and its confusion matrices use the same ones.

The classifier's job is to read *generated* images, so by default half of each training batch shows the
training images re-rendered by the run's diffusion.pt (`minimedi.rerender`), under their real labels: a
classifier of real images alone took a trait of the generator's T1 images for a female cue.
"""
import hashlib
import os

import torch

from minimedi import training
from minimedi.atomic import atomic_path
from minimedi.classifier import (SUBGROUP_CLASSES, SubgroupClassifier, calibrate, class_shares, classifier_optimizer,
                                 classifier_split, classifier_step, subgroup_labels)
from minimedi.config import config_to_dict
from minimedi.data.load import load_target_corpus
from minimedi.errors import UserError
from minimedi.pipeline import load_generator
from minimedi.rerender import rerender


def architecture(cfg):
    c = cfg.classifier
    return {"classifier": {"subgroup": c.subgroup, "arch": c.arch, "width": c.width},
            "data": {"image_size": cfg.data.image_size}}


def rerendered_images(cfg, d, images, captions, train):
    """(the training images re-rendered by the run's diffusion.pt, what it learned from) for
    `--cls-rerendered` > 0; (None, None) otherwise. Held-out images stay real: they calibrate the classifier
    and measure it on what it will be corrected with, real slices."""
    c = cfg.classifier
    if c.rerendered == 0:
        return None, None
    generator = load_generator("diffusion", cfg.run_dir, d.device, truncate=True)
    if generator.image_size != images.shape[-1]:
        raise UserError(f"--cls-rerendered: {cfg.run_dir}/diffusion.pt draws {generator.image_size} px images, the "
                        f"target images are {images.shape[-1]} px; pass --image-size {generator.image_size}")
    out = images.clone()
    out[train] = kept_rerender(cfg, generator, images[train], [captions[i] for i in train.tolist()])
    return out, {"model": "diffusion.pt", "start": c.rerender_start, "share": c.rerendered}


def rerender_cache_path(cfg):
    return os.path.join(cfg.run_dir, "classifier.rerendered.pt")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kept_rerender(cfg, generator, images, captions):
    """`rerender` of the training images, kept in <run>/classifier.rerendered.pt until the classifier is
    finished, so that --resume takes them back instead of spending minutes drawing them again. They are taken
    back only for the same diffusion.pt (its bytes), settings and images, and drawn again otherwise."""
    c, path = cfg.classifier, rerender_cache_path(cfg)
    key = {"diffusion.pt": file_sha256(os.path.join(cfg.run_dir, "diffusion.pt")), "start": c.rerender_start,
           "seed": cfg.run.seed, "images": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    if cfg.run.resume and os.path.exists(path):
        try:
            kept = torch.load(path, weights_only=True)
        except Exception:  # unreadable: drawn again, as if it were not there
            kept = {"key": None}
        if kept["key"] == key:
            print(f"re-rendered training images taken back from {path}")
            return kept["images"]
    print(f"re-rendering {len(images)} training images with {cfg.run_dir}/diffusion.pt (start {c.rerender_start})")
    rendered = rerender(generator, images, captions, c.rerender_start, seed=cfg.run.seed)
    with atomic_path(path) as tmp:
        torch.save({"key": key, "images": rendered}, tmp)
    return rendered


def make_classifier(cfg, d):
    """Train and calibrate the subgroup classifier on the target corpus (rank 0 only); returns it."""
    c = cfg.classifier
    path = os.path.join(cfg.run_dir, "classifier.pt")
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    corpus = load_target_corpus(cfg.data)
    images, labels = corpus.images.float(), subgroup_labels(corpus.attributes, c.subgroup)
    classes = SUBGROUP_CLASSES[c.subgroup]
    torch.manual_seed(cfg.run.seed)
    g = torch.Generator().manual_seed(cfg.run.seed)
    train, val, heldout = classifier_split(images, labels, c, g, corpus.groups)
    rerendered, rerendered_by = rerendered_images(cfg, d, images, corpus.captions, train)
    model = SubgroupClassifier(len(classes), c.width, images.shape[1], c.arch).to(d.device)
    opt, schedule = classifier_optimizer(model, c)
    metrics = {}

    def record():
        return {"model": model.state_dict(), "config": config_to_dict(cfg), "architecture": architecture(cfg),
                "data": corpus.provenance, "classes": list(classes),
                "target_shares": class_shares(labels, len(classes)).tolist(), "split": {"heldout_groups": heldout},
                "rerendered_by": rerendered_by, "metrics": metrics}

    loop = training.TrainLoop(path, c.steps, {"model": model, "optimizer": opt, "scheduler": schedule, "batches": g},
                              record, cfg.train.ckpt_every, d, cfg.run.resume, architecture(cfg), desc="classifier")
    for step in loop:
        loss = classifier_step(model, opt, schedule, images, labels, train, c.batch, g, d.device, c.blur,
                               rerendered, c.rerendered)
        loop.check_finite(loss, step)
        if step % cfg.train.log_every == 0 or step == c.steps - 1:
            log(task="classifier", step=step, loss=loss)
    metrics.update(calibrate(model, images, labels, val, d.device), n_heldout_groups=len(heldout))
    log(task="classifier", **metrics)
    print(f"classifier ({c.subgroup}): held-out accuracy {metrics['accuracy']:.1%} on {len(val)} images of "
          f"{len(heldout)} held-out subjects, ECE {metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f} after "
          f"temperature {metrics['temperature']:.2f}")
    loop.finish()
    if rerendered is not None and os.path.exists(rerender_cache_path(cfg)):
        os.remove(rerender_cache_path(cfg))
    print(f"saved {path}")
    return model.eval()
