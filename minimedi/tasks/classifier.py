"""The subgroup classifier: `python train.py --task classifier` -> <run>/classifier.pt.

A calibrated classifier of the target corpus's subgroups (`--subgroup sex | age | sex_age`,
`minimedi.classifier`), trained on the subjects outside a held-out share and calibrated on the held-out
ones (no subject on both sides). The share of each class in the target corpus is the alignment's target
distribution, recorded as "target_shares"; the held-out subjects are recorded as "split", so the report's
independent check classifier and its confusion matrices use the same ones.
"""
import os

import torch

from minimedi import training
from minimedi.classifier import (SUBGROUP_CLASSES, SubgroupClassifier, calibrate, class_shares, classifier_optimizer,
                                 classifier_split, classifier_step, subgroup_labels)
from minimedi.config import config_to_dict
from minimedi.data.load import load_target_corpus


def architecture(cfg):
    c = cfg.classifier
    return {"classifier": {"subgroup": c.subgroup, "arch": c.arch, "width": c.width},
            "data": {"image_size": cfg.data.image_size}}


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
    model = SubgroupClassifier(len(classes), c.width, images.shape[1], c.arch).to(d.device)
    opt, schedule = classifier_optimizer(model, c)
    metrics = {}

    def record():
        return {"model": model.state_dict(), "config": config_to_dict(cfg), "architecture": architecture(cfg),
                "data": corpus.provenance, "classes": list(classes),
                "target_shares": class_shares(labels, len(classes)).tolist(), "split": {"heldout_groups": heldout},
                "metrics": metrics}

    loop = training.TrainLoop(path, c.steps, {"model": model, "optimizer": opt, "scheduler": schedule, "batches": g},
                              record, cfg.train.ckpt_every, d, cfg.run.resume, architecture(cfg), desc="classifier")
    for step in loop:
        loss = classifier_step(model, opt, schedule, images, labels, train, c.batch, g, d.device, c.blur)
        loop.check_finite(loss, step)
        if step % cfg.train.log_every == 0 or step == c.steps - 1:
            log(task="classifier", step=step, loss=loss)
    metrics.update(calibrate(model, images, labels, val, d.device), n_heldout_groups=len(heldout))
    log(task="classifier", **metrics)
    print(f"classifier ({c.subgroup}): held-out accuracy {metrics['accuracy']:.1%} on {len(val)} images of "
          f"{len(heldout)} held-out subjects, ECE {metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f} after "
          f"temperature {metrics['temperature']:.2f}")
    loop.finish()
    print(f"saved {path}")
    return model.eval()
