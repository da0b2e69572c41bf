"""The subgroup classifier: a small residual CNN over slices, temperature-calibrated.

Alignment tuning trusts this network's probabilities: the optimal-transport targets are ranks of
p(female), and the KL loss matches their batch mean. A classifier that is right but over-confident
makes those numbers meaningless, so after training we fit one temperature T on held-out logits
(Guo et al. 2017, "On Calibration of Modern Neural Networks"): p = softmax(logits / T), T chosen to
minimise the held-out negative log-likelihood. It does not change a single prediction, only the
confidence; the expected calibration error (ECE) before and after shows what it bought.

Subgroups (`subgroup_labels`): "sex" (0 = male, 1 = female), "age" (0 = under 50, 1 = 50 and over;
50 splits the phantom's 20-85 range near its middle and is the usual young/old cut-off in brain MR),
and "sex_age" (2 * sex + age group: male <50, male >=50, female <50, female >=50).

Held-out images. Calibration, the held-out accuracy and the confusion matrix that corrects the report's
shares all come from images the network never trained on, and on real data that means never trained on
the same *subject*: neighbouring slices of one head are near copies, and the head's size (the cue) is
the same in all of them. So the split is drawn over groups (subjects; on the phantom every image is its
own subject): `heldout_groups` takes `holdout` of each class's groups, so both sexes are held out in
their own proportion even when there are few subjects.

Augmentation keeps what the label depends on. Sex is read from head size (as in real brain MR), so
there is no zoom; age from ventricles and cortex. Both are left-right symmetric, so horizontal flips
are label-preserving (they move a glioma to the other hemisphere, which is fine here). Small shifts,
a gain on the intensities and a little noise cover the pose and scanner variation of the data.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minimedi.checkpoint import load_checkpoint
from minimedi.errors import UserError

SUBGROUP_CLASSES = {
    "sex": ("male", "female"),
    "age": ("age<50", "age>=50"),
    "sex_age": ("male age<50", "male age>=50", "female age<50", "female age>=50"),
}
AGE_CUTOFF = 50


# ---- labels ------------------------------------------------------------------------------------------

def _sex_index(value):
    if value not in ("male", "female"):
        raise UserError(f"subgroup label: sex must be 'male' or 'female', got {value!r}")
    return int(value == "female")


def subgroup_labels(items, axis):
    """LongTensor [N] of class indices (see SUBGROUP_CLASSES) from dicts with "sex" and/or "age"."""
    if axis not in SUBGROUP_CLASSES:
        raise UserError(f"unknown subgroup axis {axis!r}; choose one of {', '.join(SUBGROUP_CLASSES)}")
    labels = []
    for item in items:
        needed = {"sex": ("sex",), "age": ("age",), "sex_age": ("sex", "age")}[axis]
        missing = [k for k in needed if item.get(k) is None]
        if missing:
            raise UserError(f"subgroup {axis!r} needs {' and '.join(missing)} for every image")
        sex = _sex_index(item["sex"]) if "sex" in needed else 0
        old = int(float(item["age"]) >= AGE_CUTOFF) if "age" in needed else 0
        labels.append({"sex": sex, "age": old, "sex_age": 2 * sex + old}[axis])
    return torch.tensor(labels, dtype=torch.long)


def class_shares(labels, num_classes):
    """The share of each class [K] in a label tensor: the target distribution of alignment."""
    return torch.bincount(labels, minlength=num_classes).float() / max(1, len(labels))


# ---- the network -------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """conv-GN-SiLU-conv-GN plus a (strided 1x1) shortcut; stride 2 halves the side."""

    def __init__(self, dim_in, dim_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(math.gcd(8, dim_out), dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(math.gcd(8, dim_out), dim_out)
        same = stride == 1 and dim_in == dim_out
        self.shortcut = nn.Identity() if same else nn.Conv2d(dim_in, dim_out, 1, stride=stride)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.shortcut(x) + self.norm2(self.conv2(h)))


def vgg_stages(in_channels, width):
    """The alternative trunk: stages of (conv3x3-BN-ReLU) x 2 at widths w, 2w, 4w, 4w with 2x2 max-pooling
    between them and no shortcuts (Simonyan & Zisserman 2015, with batch norm). Not used for tuning: it is
    the architecture of the independent check classifier, so agreement between the two is not shared
    inductive bias."""
    layers, dim = [], in_channels
    for i, out in enumerate((width, 2 * width, 4 * width, 4 * width)):
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        for _ in range(2):
            layers += [nn.Conv2d(dim, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            dim = out
    return nn.Sequential(*layers)


ARCHITECTURES = ("resnet", "vgg")


class SubgroupClassifier(nn.Module):
    """Slices [N, 1, H, W] in [-1, 1] -> logits [N, K]. arch "resnet": a stem, three residual stages
    (width w, 2w, 4w, each halving the side); "vgg": `vgg_stages`. Then global average pooling and a
    linear head. `temperature` is a buffer, so it is saved with the weights; `predict_proba` applies it."""

    def __init__(self, num_classes=2, width=32, in_channels=1, arch="resnet"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise UserError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if arch == "resnet":
            self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
            self.stages = nn.Sequential(ResidualBlock(width, width, 1), ResidualBlock(width, 2 * width, 2),
                                        ResidualBlock(2 * width, 4 * width, 2),
                                        ResidualBlock(4 * width, 4 * width, 2))
        else:
            self.stem, self.stages = nn.Identity(), vgg_stages(in_channels, width)
        self.head = nn.Linear(4 * width, num_classes)
        self.register_buffer("temperature", torch.ones(()))

    def features(self, x):
        """The pooled trunk output [N, 4w] that the head reads."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x):
        """Uncalibrated logits [N, K]."""
        return self.head(self.features(x))

    def predict_proba(self, x):
        """Calibrated class probabilities softmax(logits / T) [N, K]."""
        return torch.softmax(self(x) / self.temperature, dim=-1)


# ---- augmentation ------------------------------------------------------------------------------------

def augment(images, generator, max_shift=2, gain=0.1, noise=0.05, blur=0.0):
    """Random shifts (up to `max_shift` px, background-filled), horizontal flips, an intensity gain about
    the background level -1, and Gaussian noise of a random std up to `noise`; from `generator`. With
    blur > 0, first a 3 x 3 box blur mixed in at a weight ~ U[0, blur] per image: a classifier that must read
    generated images (smoother than real ones) then cannot take sharpness for a subgroup cue."""
    if blur:
        w = blur * torch.rand(images.shape[0], 1, 1, 1, generator=generator).to(images)
        images = torch.lerp(images, F.avg_pool2d(F.pad(images, (1,) * 4, mode="replicate"), 3, 1), w)
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip[:, None, None, None].to(out.device), out.flip(-1), out)
    g = 1 + gain * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    std = noise * torch.rand(n, 1, 1, 1, generator=generator)
    eps = torch.randn(out.shape, generator=generator)
    return (out + 1) * g.to(out) - 1 + (std * eps).to(out)


# ---- calibration -------------------------------------------------------------------------------------

def fit_temperature(logits, labels, iters=50):
    """The T > 0 minimising NLL(softmax(logits / T), labels), by LBFGS on log T (so T stays positive)."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def expected_calibration_error(probs, labels, bins=15):
    """ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|, with the confidence (top-class
    probability) in equal-width bins (k/bins, (k+1)/bins] (Naeini et al. 2015; Guo et al. 2017)."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).float()
    which = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            gap = correct[in_bin].mean() - confidence[in_bin].mean()
            ece += in_bin.float().mean().double() * gap.abs().double()
    return float(ece)


@torch.no_grad()
def calibrated_log_odds(classifier, images, batch_size=256):
    """log p(female) / p(male) [N], float64 on the CPU, from a calibrated sex classifier (logits / temperature)."""
    device = next(classifier.parameters()).device
    logits = torch.cat([classifier(x.to(device).float()).cpu() for x in images.split(batch_size)]).double()
    return (logits[:, 1] - logits[:, 0]) / float(classifier.temperature)


# ---- the held-out split ----------------------------------------------------------------------------------

def heldout_groups(labels, groups, share, generator):
    """The groups (e.g. subject ids) to hold out: a random `share` of each class's groups, at least one
    and never all of a class that has two or more. A group's class is the label of its first image
    (sex and age group are per subject). Returns a list in order of first appearance in `groups`."""
    group_label = {}
    for label, group in zip(labels.tolist(), groups):
        group_label.setdefault(group, label)
    held = set()
    for c in sorted(set(group_label.values())):
        members = [g for g, label in group_label.items() if label == c]
        k = min(max(round(share * len(members)), 1), len(members) - 1)
        held.update(members[i] for i in torch.randperm(len(members), generator=generator)[:k].tolist())
    if not held:
        raise UserError(f"classifier: cannot hold out a subject: every class has a single one "
                        f"({len(group_label)} subjects in all)")
    return [g for g in group_label if g in held]


# ---- training ----------------------------------------------------------------------------------------

@torch.no_grad()
def predict_logits(model, images, device, batch_size=256):
    model.eval()
    return torch.cat([model(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)])


def evaluate(logits, labels, temperature):
    probs = torch.softmax(logits / temperature, dim=-1)
    return {"accuracy": float((probs.argmax(-1) == labels).float().mean()),
            "nll": float(F.cross_entropy(logits / temperature, labels)),
            "ece": expected_calibration_error(probs, labels)}


def classifier_split(images, labels, cfg, generator, groups=None, heldout=None):
    """(train ids, held-out ids, held-out groups) for a ClassifierConfig `cfg`.

    `groups` [N] names the subject of each image (default: every image its own); the groups in `heldout`
    (default: drawn by `heldout_groups` with `cfg.holdout`) are held out, so no subject is on both sides
    and the held-out accuracy is honest."""
    num_classes = len(SUBGROUP_CLASSES[cfg.subgroup])
    groups = list(range(len(images))) if groups is None else list(groups)
    if not len(images) == len(labels) == len(groups) or len(images) < 10:
        raise UserError(f"classifier: need >= 10 images with one label and one group each, got {len(images)}, "
                        f"{len(labels)} and {len(groups)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"classifier: labels must lie in 0..{num_classes - 1} for subgroup {cfg.subgroup!r}")
    heldout = heldout_groups(labels, groups, cfg.holdout, generator) if heldout is None else list(heldout)
    held = set(heldout)
    is_heldout = torch.tensor([g in held for g in groups])
    val, train = is_heldout.nonzero()[:, 0], (~is_heldout).nonzero()[:, 0]
    if len(val) == 0 or len(train) == 0:
        raise UserError(f"classifier: the held-out subjects leave {len(train)} training and {len(val)} held-out "
                        f"images; both must be non-empty")
    return train, val, heldout


def classifier_optimizer(model, cfg):
    """AdamW under a cosine schedule over `cfg.steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.steps))


def classifier_step(model, opt, schedule, images, labels, train, batch, generator, device, blur=0.0,
                    rerendered=None, share=0.0):
    """One AdamW step on an augmented random batch of the training ids; returns the loss. With `rerendered`
    (the images re-rendered by the generator, `minimedi.rerender`), a `share` of the batch is drawn from them."""
    model.train()
    ids = train[torch.randint(len(train), (batch,), generator=generator)]
    x = images[ids]
    if rerendered is not None and share > 0:
        swap = torch.rand(batch, generator=generator) < share
        x = torch.where(swap[:, None, None, None], rerendered[ids].to(x), x)
    x = augment(x, generator, blur=blur).to(device)
    loss = F.cross_entropy(model(x), labels[ids].to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()
    return loss


def calibrate(model, images, labels, val, device):
    """Fit the temperature on the held-out logits; returns the held-out metrics before and after."""
    logits = predict_logits(model, images[val], device)
    temperature = fit_temperature(logits, labels[val])
    model.temperature.fill_(temperature)
    before, after = evaluate(logits, labels[val], 1.0), evaluate(logits, labels[val], temperature)
    return {"temperature": temperature, "n_heldout": len(val), **{f"{k}_uncalibrated": v for k, v in before.items()},
            **after}


def train_classifier(images, labels, cfg, device="cpu", log=None, generator=None, groups=None, heldout=None):
    """Train a SubgroupClassifier on images [N, 1, H, W] and labels [N] (`cfg`: a ClassifierConfig) in one
    go: the held-out split (`classifier_split`), `cfg.steps` augmented AdamW steps, then the temperature
    fitted on the held-out logits. Returns (model in eval mode, metrics: held-out accuracy, NLL and ECE
    before and after calibration, the temperature, and `heldout_groups`, the list to record so that
    evaluation, and a second classifier, can use the same held-out subjects). The `train.py --task
    classifier` task runs the same pieces in a resumable loop (`minimedi.tasks.classifier`)."""
    generator = generator or torch.Generator().manual_seed(0)
    train, val, heldout = classifier_split(images, labels, cfg, generator, groups, heldout)
    model = SubgroupClassifier(len(SUBGROUP_CLASSES[cfg.subgroup]), cfg.width, images.shape[1], cfg.arch).to(device)
    opt, schedule = classifier_optimizer(model, cfg)
    for step in tqdm(range(cfg.steps), desc="classifier", leave=False, disable=None):
        loss = classifier_step(model, opt, schedule, images, labels, train, cfg.batch, generator, device, cfg.blur)
        if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
            log(task="classifier", step=step, loss=loss.item())
    metrics = calibrate(model, images, labels, val, device)
    return model.eval(), {**metrics, "n_heldout_groups": len(heldout), "heldout_groups": heldout}


def load_classifier(path, device="cpu"):
    """(classifier in eval mode with its temperature, checkpoint dict) from a `classifier.pt`-style file."""
    ckpt = load_checkpoint(path)
    c = ckpt["config"]["classifier"]
    model = SubgroupClassifier(len(ckpt["classes"]), c["width"], arch=c.get("arch", "resnet"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval().requires_grad_(False), ckpt
