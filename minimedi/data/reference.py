"""Real target images that no classifier trained on: what generated images are measured against.

The fairness report corrects a classifier's reading by its confusion matrix, and alignment tuning caps
its push at the classifier's confidence on real images. Both need real target images with known labels
the classifiers never trained on, or their errors (and their confidence) look better than
they are:

- on the phantom, a fresh target corpus: the same distribution under another seed (`--data-seed` + 1),
  4,000 slices, 1,000 per MR sequence, so the per-sequence error rates are known to about +-0.03;
- on real data (BraTS), the subjects the subgroup classifier held out (`classifier.pt`'s
  split.heldout_groups): every slice of them, and none of any subject a classifier trained on. The
  tuning classifier's temperature was fitted on them, which moves no decision (argmax) and so no
  error rate.
"""
import dataclasses

from minimedi.config import config_from_dict
from minimedi.data.load import load_target_corpus

PHANTOM_REFERENCE = 4000


def reference_corpus(target_cfg, heldout_groups):
    """The `Corpus` of real target images held out from every classifier (see the top); `target_cfg` is
    the DataConfig the classifier recorded, `heldout_groups` its held-out subjects."""
    if target_cfg.target == "phantom":
        return load_target_corpus(dataclasses.replace(target_cfg, seed=target_cfg.seed + 1,
                                                      n_target=PHANTOM_REFERENCE))
    return load_target_corpus(target_cfg).of_groups(heldout_groups)


def classifier_reference(classifier_ckpt):
    """`reference_corpus` for the classifier saved in `classifier_ckpt` (a loaded classifier.pt): the real
    target images of the data it recorded, less every subject it trained on."""
    return reference_corpus(config_from_dict(classifier_ckpt["config"]).data, classifier_ckpt["split"]["heldout_groups"])
