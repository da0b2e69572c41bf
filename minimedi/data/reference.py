"""Real target images that no classifier trained on: what generated images are measured against.

The fairness report corrects a classifier's reading by its confusion matrix, and alignment tuning caps
its push at the classifier's confidence on real images. Both need real target images with known labels
that the classifier never saw in training, or its errors (and its confidence) look better than they
are. On the phantom that is a fresh target corpus: the same distribution under another seed
(`--data-seed` + 1); the classifiers learn from `--data-seed`.
"""
from minimedi.data.load import load_target_data
from minimedi.data.phantom import PhantomCorpus

REFERENCE_SIZE = 4000  # 1,000 per MR sequence: the per-sequence error rates to about +-0.03


def reference_images(data_cfg, n=REFERENCE_SIZE):
    """(images float32 [N, 1, H, W], attributes [N] dicts with "caption", "sex", and, on the phantom,
    "modality", "head_scale", ...) of real target images held out from every classifier."""
    if data_cfg.target == "phantom":
        corpus = PhantomCorpus(n, data_cfg.image_size, data_cfg.target_corpus_female, data_cfg.seed + 1, "target")
        return corpus.images(), [corpus.attributes(i) for i in range(n)]
    # Real data has no second corpus: its images stand in, although the classifier trained on part of them.
    images, captions, attributes = load_target_data(data_cfg)
    return images.float()[:n], [{**a, "caption": c} for a, c in zip(attributes[:n], captions[:n])]
