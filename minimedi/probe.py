"""The attribute probe: a CNN that reads what a generated image shows, trained on *real* phantom slices.

Text fidelity asks whether an image generated for "... glioma in the left frontal lobe" shows a glioma in
the left frontal lobe. The probe answers for modality, tumour side, lobe and sex (one head each) and is
trained once per run on a fresh, sex-balanced phantom corpus, never on generated images, so it cannot
learn the generator's quirks. Its pooled features also serve as the fixed feature space of the domain
FID (`minimedi.evaluate`): a network trained here on phantom images, and not the fairness classifier.
"""
import os

import torch
import torch.nn.functional as F

from minimedi.checkpoint import load_checkpoint, save_checkpoint
from minimedi.classifier import SubgroupClassifier
from minimedi.data.phantom import PhantomCorpus

PROBE_HEADS = {"modality": ("t1", "t1ce", "t2", "flair"), "side": ("none", "left", "right"),
               "lobe": ("none", "frontal", "temporal", "parietal", "occipital"), "sex": ("male", "female")}


def probe_targets(attributes):
    """{head: LongTensor [N]} class indices of each attribute head."""
    return {h: torch.tensor([names.index(a[h]) for a in attributes]) for h, names in PROBE_HEADS.items()}


def split_heads(logits):
    """Probe logits [N, sum of heads] -> {head: logits [N, classes]}."""
    sizes = [len(names) for names in PROBE_HEADS.values()]
    return dict(zip(PROBE_HEADS, logits.split(sizes, dim=-1)))


def train_probe(size, steps=800, batch=128, n=12000, seed=1234, device="cpu", width=16):
    """A CNN that reads modality, tumour side, lobe and sex off *real* phantom slices (a fresh corpus,
    sexes balanced so its sex read-out has no prior). Trained without flips: flips swap the side."""
    corpus = PhantomCorpus(n, size, p_female=0.5, seed=seed, kind="pretrain")
    images = corpus.images()
    targets = probe_targets([corpus.attributes(i) for i in range(n)])
    probe = SubgroupClassifier(sum(len(v) for v in PROBE_HEADS.values()), width).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(n, (batch,), generator=g)
        noise = 0.03 * torch.randn(images[ids].shape, generator=g)
        logits = split_heads(probe((images[ids] + noise).to(device)))
        loss = sum(F.cross_entropy(logits[h], targets[h][ids].to(device)) for h in PROBE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return probe.eval()


def probe_predictions(probe, images, batch_size=256):
    """{head: predicted class names [N]} for images [N, 1, H, W] in [-1, 1]."""
    return predictions_from_features(probe, probe_features(probe, images, batch_size))


@torch.no_grad()
def predictions_from_features(probe, features):
    """{head: predicted class names [N]} from the probe's pooled features (`probe_features`)."""
    logits = probe.head(features.to(next(probe.parameters()).device)).cpu()
    return {h: [PROBE_HEADS[h][i] for i in lg.argmax(-1).tolist()] for h, lg in split_heads(logits).items()}


def readback(predictions, prompted):
    """Text fidelity: the share of images whose probed modality / side / lobe is the prompted one, and the
    female fraction the probe reads."""
    out = {h: sum(p == a[h] for p, a in zip(predictions[h], prompted)) / len(prompted)
           for h in ("modality", "side", "lobe")}
    out["female_fraction"] = sum(s == "female" for s in predictions["sex"]) / len(prompted)
    return out


def load_or_train_probe(run_dir, size, device, steps=800):
    """The attribute probe of a run, trained once on real phantom slices and cached as <run>/probe.pt."""
    path = os.path.join(run_dir, "probe.pt")
    if os.path.exists(path):
        ckpt = load_checkpoint(path)
        probe = SubgroupClassifier(sum(len(v) for v in PROBE_HEADS.values()), ckpt["width"])
        probe.load_state_dict(ckpt["model"])
        return probe.to(device).eval()
    print(f"training the attribute probe on real phantom slices -> {path}")
    probe = train_probe(size, steps=steps, device=device)
    save_checkpoint(path, {"model": probe.state_dict(), "width": probe.stem.out_channels, "size": size})
    return probe


@torch.no_grad()
def probe_features(probe, images, batch_size=256):
    """The probe's pooled trunk features [N, 4w] (float32, CPU): the feature space of the domain FID."""
    device = next(probe.parameters()).device
    return torch.cat([probe.features(x.to(device).float()).cpu() for x in images.split(batch_size)])
