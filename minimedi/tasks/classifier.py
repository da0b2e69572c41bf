"""The subgroup classifier: `python train.py --task classifier` -> <run>/classifier.pt.

A calibrated classifier of the target corpus's subgroups (`--subgroup sex | age | sex_age`,
`minimedi.classifier`); the share of each class in the target corpus is the alignment's target
distribution, recorded as "target_shares".
"""
import os

import torch

from minimedi import training
from minimedi.checkpoint import save_checkpoint
from minimedi.classifier import SUBGROUP_CLASSES, class_shares, subgroup_labels, train_classifier
from minimedi.config import config_to_dict
from minimedi.data import load_target_data


def architecture(cfg):
    return {"classifier": {"subgroup": cfg.classifier.subgroup, "arch": cfg.classifier.arch,
                           "width": cfg.classifier.width}, "data": {"image_size": cfg.data.image_size}}


def make_classifier(cfg, d):
    """Train and calibrate the subgroup classifier on the target corpus (rank 0 only)."""
    path = os.path.join(cfg.run_dir, "classifier.pt")
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    images, _, attributes = load_target_data(cfg.data)
    labels = subgroup_labels(attributes, cfg.classifier.subgroup)
    torch.manual_seed(cfg.run.seed)
    model, metrics = train_classifier(images.float(), labels, cfg.classifier, d.device, log,
                                      torch.Generator().manual_seed(cfg.run.seed))
    classes = SUBGROUP_CLASSES[cfg.classifier.subgroup]
    shares = class_shares(labels, len(classes))
    log(task="classifier", **metrics)
    print(f"classifier ({cfg.classifier.subgroup}): held-out accuracy {metrics['accuracy']:.1%}, ECE "
          f"{metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f} after temperature {metrics['temperature']:.2f}")
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(cfg), "metrics": metrics,
                           "architecture": architecture(cfg), "data": {"target": cfg.data.target},
                           "classes": list(classes), "target_shares": shares.tolist(),
                           "step": cfg.classifier.steps, "total": cfg.classifier.steps, "finished": True})
    print(f"saved {path}")
    return model
