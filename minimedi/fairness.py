"""Alignment tuning: the losses that pull the generated subgroup distribution to a target (the sampler they
are backpropagated through is `differentiable_sampler.py`).

Following Shen et al. 2024 ("Finetuning Text-to-Image Diffusion Models for Fairness", ICLR), one
step of alignment tuning generates a batch of a few prompts x several images each (`prompt_batch`),
and asks a frozen subgroup classifier what it sees:

1. **Distributional alignment** (`distributional_alignment_loss`). Within each prompt's n images, rank
   by the classifier's p(female) and call the top n r "female" (randomized rounding), the rest "male": for
   one binary attribute this is the optimal transport between the prompt's images and its target
   distribution (r = the target female share for a prompt that does not name sex; 1 or 0 for one that
   does). Cross-entropy against these hard targets would push p(class) towards 1 without end, and with it
   the anatomy the classifier reads (head size) past the real range. So each prompt's readings are instead
   matched, in order, to those of real target images at the prompt's share (`matched_log_odds`), and the
   loss pulls each image to its match from either side.
   Shen et al. also drop the assignments that a fresh target sample of n would often contradict
   (`uncertainty`, threshold 0.2); here that filter is off by default (threshold 1), because it weakens
   the pull exactly where it matters: with 12 images at r = 0.455 it drops ranks 4-6, so a batch read with
   4 to 7 women in 12 gets no push, and a prompt near the target is pushed less than half as hard as
   without it. For several
   attributes (e.g. sex x age group) the assignment is a small exact OT problem (`joint_ot_assign`).
2. **CLIP consistency** (`clip_consistency_loss`): 1 - cos between CLIP image embeddings of the student
   image and the frozen teacher's image from the same noise and prompt, so that only the subgroup
   changes, not the content ("knowledge distillation" in Han et al. 2025).
"""
import bisect
import math

import torch
import torch.nn.functional as F

from minimedi.classifier import calibrated_log_odds
from minimedi.clip import preprocess


# ---- one binary attribute: closed-form OT and its uncertainty -----------------------------------------

def ot_assign(p_female, target_share, offset=0.5):
    """(targets [N] long, 1 = female; rank [N] long, 0 = most female) for the classifier's p(female) [N].

    Moving image i to class y costs ||p_i - e_y||^2, and with a fixed number of females the total cost
    is smallest when the females are the images with the largest p: sort, cut at floor(N r + offset).
    offset 0.5 is round(N r); an offset drawn from U[0, 1) at every step is randomized rounding, whose
    count is N r on average: 12 images at r = 0.455 then take 5 or 6 women, never 5 every time.
    """
    n = p_female.shape[0]
    order = torch.argsort(p_female, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=p_female.device)
    targets = (rank < math.floor(n * target_share + offset)).long()
    return targets, rank


def binomial_cdf(n, r):
    """P(K <= k) for k = 0..n, K ~ Binomial(n, r), float64 [n + 1], summed from exact log-pmfs."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_choose = torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64)) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    r = torch.tensor(r, dtype=torch.float64)
    log_pmf = log_choose + torch.xlogy(k, r) + torch.xlogy(n - k, 1 - r)  # xlogy: 0 log 0 = 0 at r = 0 or 1
    return log_pmf.exp().cumsum(0).clamp(max=1.0)


def uncertainty(rank, n, r):
    """(u_female, u_male) [N] for images at 0-based `rank` of n, target female share r.

    A fresh target sample of n has K ~ Binomial(n, r) women; the image at rank j is female in it iff
    K > j. So calling it "female" is wrong with probability P(K <= j), and "male" with P(K > j).
    """
    cdf = binomial_cdf(n, r).to(rank.device)
    at_most = cdf[rank]
    return at_most, (1 - at_most).clamp(min=0.0)


# ---- per prompt: the tuning batch, and the assignment within each prompt's images ---------------------

def prompt_batch(neutral, named, n_prompts, per_prompt, named_share, target_share, generator, weights=None):
    """One tuning step's prompts: (captions [P M], groups [P M] long, shares [P] float), P = n_prompts.

    Each prompt names sex with probability `named_share` (then a woman or a man, evenly, from `named` =
    {"female": [...], "male": [...]}) and takes that sex as its target, share 1 or 0; otherwise it is one
    of the `neutral` captions, drawn in proportion to `weights` (None: uniformly; `GroupFocus`), and takes
    `target_share`. Each prompt is repeated per_prompt (M) times with its own noise, and groups[i] says
    which prompt image i belongs to: the assignment runs within it.
    """
    cdf = None if weights is None else (weights.cumsum(0) / weights.sum()).tolist()
    captions, shares = [], []
    for named_now, woman, u in torch.rand(n_prompts, 3, generator=generator).tolist():
        if named_now < named_share:
            pool, share = named["female" if woman < 0.5 else "male"], float(woman < 0.5)
            captions.append(pool[int(u * len(pool))])
        else:
            index = int(u * len(neutral)) if cdf is None else min(bisect.bisect_right(cdf, u), len(neutral) - 1)
            captions.append(neutral[index])
            share = target_share
        shares.append(share)
    groups = torch.arange(n_prompts).repeat_interleave(per_prompt)
    return [captions[g] for g in groups.tolist()], groups, torch.tensor(shares, dtype=torch.float64)


class GroupFocus:
    """Which neutral tuning prompts to draw more often: those of the groups (e.g. sequences) whose images are
    furthest from the target share. Group DRO (Sagawa et al. 2020) upweights the worst group's loss; here the
    reweighting picks the prompts, so a lagging group gets more tuning steps, each with the usual loss.

    Prompt i of group g is drawn with weight exp(strength |s_g - r|), where s_g is a running mean (decay per
    reading) of the classifier's calibrated p(female) over group g's tuning images and r the target share;
    a group not read yet counts as on target. strength 0 draws uniformly.
    """

    def __init__(self, keys, target_share, strength, decay=0.8):
        self.names = sorted(set(keys))
        self.group = torch.tensor([self.names.index(k) for k in keys])
        self.target, self.strength, self.decay = target_share, strength, decay
        self.share = torch.full((len(self.names),), math.nan, dtype=torch.float64)

    def weights(self):
        """[len(keys)] the draw weight of each prompt."""
        gap = (self.share - self.target).abs().nan_to_num(0.0)
        return torch.exp(self.strength * gap)[self.group]

    def update(self, prompt_index, p_female):
        """Read one step's images: prompt_index [N] long (the neutral prompt each image came from, -1 for the
        others) and their p_female [N]."""
        for g in range(len(self.names)):
            mine = (prompt_index >= 0) & (self.group[prompt_index.clamp(min=0)] == g)
            if mine.any():
                now = float(p_female[mine].double().mean())
                old = float(self.share[g])
                self.share[g] = now if math.isnan(old) else self.decay * old + (1 - self.decay) * now

    def shares(self):
        """{group: running share} of the groups read so far, for the log."""
        return {n: float(s) for n, s in zip(self.names, self.share) if not math.isnan(s)}

    def state_dict(self):
        return {"share": self.share.clone()}

    def load_state_dict(self, state):
        self.share = state["share"].clone()


def assign_within_prompts(p_female, groups, shares, threshold=1.0, offsets=None):
    """(targets [N] long, 1 = female; keep [N] bool): the OT assignment and uncertainty filter run within
    each prompt's images. groups [N] says which prompt each image belongs to, shares [P] each prompt's
    target female share, p_female [N] the classifier's calibrated readings, offsets [P] each prompt's
    rounding offset (`ot_assign`; None: 0.5, plain rounding).

    Ranking each prompt on its own is Shen et al.'s setting (each of their batches is one prompt). Ranked
    together, the prompts the classifier already reads as more female would take the "female" targets
    and the others none: the batch would hit its share while every prompt stays as biased as before.
    """
    targets = torch.zeros_like(groups)
    keep = torch.zeros(len(groups), dtype=torch.bool, device=p_female.device)
    offsets = [0.5] * len(shares) if offsets is None else offsets.tolist()
    for g, (share, offset) in enumerate(zip(shares.tolist(), offsets)):
        idx = torch.nonzero(groups == g).squeeze(1)
        targets[idx], rank = ot_assign(p_female[idx], share, offset)
        u_female, u_male = uncertainty(rank, len(idx), share)
        keep[idx] = torch.where(targets[idx] == 1, u_female, u_male) <= threshold
    return targets, keep


def matched_caps(toward, targets, groups, real_toward):
    """The confidence each image may be pushed to: caps [N] on its log-odds toward its target class.

    `toward` [N] is the calibrated log-odds of each image's assigned class (log p(y) / p(not y)), and
    real_toward[y] the same quantity on real target images of class y. Within each prompt and class, the
    n assigned images are sorted by `toward` and the k-th (0-based) gets the real images' quantile at
    (k + 1/2) / n: the monotone (1D optimal-transport) matching of the batch's confidences to the real
    ones. An image stops receiving the alignment gradient once it is as confident as its matched real
    image, so the images assigned to a class end up spread like real images of that class, not beyond
    them: cross-entropy alone keeps pushing p(y) towards 1, and with it the anatomy the classifier reads
    (head size) past the real range.
    """
    caps = torch.full_like(toward, math.inf)
    for g in groups.unique():
        for y in (0, 1):
            idx = torch.nonzero((groups == g) & (targets == y)).squeeze(1)
            if len(idx):
                order = idx[torch.argsort(toward[idx], stable=True)]
                levels = (torch.arange(len(idx), dtype=real_toward[y].dtype) + 0.5) / len(idx)
                caps[order] = torch.quantile(real_toward[y], levels).to(caps)
    return caps


def matched_log_odds(log_odds, groups, shares, real_toward, offsets=None):
    """The calibrated log-odds of female each image is pulled to, [N]: within each prompt, the monotone (1D
    optimal-transport) matching of its images' `log_odds` to the readings of a real target population with
    the prompt's female share r.

    That population's log-odds are distributed as the mix r F_women + (1 - r) F_men of the classifier's
    readings of real women and men (`real_confidence`; real_toward = ([men toward male], [women toward
    female])). The prompt's n images, sorted, take that mix's quantiles at the levels (k + u) / n, u the
    prompt's rounding offset (`ot_assign`; None: 0.5, the midpoints). This is Shen et al.'s OT to the two
    points {male, female} with weights (1 - r, r), each point replaced by how real images of that sex
    actually read: a named-woman prompt (r = 1) is matched to real women's readings, ambiguous ones
    included, rather than to p(female) = 1, which the classifier reaches by drawing smaller heads than any
    real woman's.
    """
    women, men = real_toward[1], -real_toward[0]
    values, order = torch.cat([women, men]).sort()
    offsets = [0.5] * len(shares) if offsets is None else offsets.tolist()
    matched = torch.empty_like(log_odds)
    for g, (share, offset) in enumerate(zip(shares.tolist(), offsets)):
        weights = torch.cat([torch.full_like(women, share / len(women)), torch.full_like(men, (1 - share) / len(men))])
        cdf = weights[order].cumsum(0)
        idx = torch.nonzero(groups == g).squeeze(1)
        levels = (torch.arange(len(idx), dtype=cdf.dtype) + offset) / len(idx)
        # The inverse CDF; side="right" skips the zero-weight sex at level 0.
        quantiles = values[torch.searchsorted(cdf, levels, right=True).clamp(max=len(values) - 1)]
        matched[idx[torch.argsort(log_odds[idx], stable=True)]] = quantiles.to(matched)
    return matched


def distributional_alignment_loss(logits, groups, shares, threshold=1.0, temperature=1.0, real_toward=None,
                                  offsets=None, cap="match"):
    """The alignment loss on the classifier's `logits` [N, 2] (class 1 = female; they carry the gradient),
    from the calibrated log-odds t = (logit_1 - logit_0) / temperature without grad and the assignments of
    `assign_within_prompts` (the uncertainty filter decides which are kept). The loss averages over the kept
    images:

    * real_toward None: cross-entropy against the assigned class, which pushes p(class) towards 1 forever;
    * cap "match": T KL(sigmoid(c) || sigmoid(t)), c the matched real log-odds (`matched_log_odds`). Its
      gradient in the raw log-odds is sigmoid(t) - sigmoid(c), on the scale of the cross-entropy's: it pushes an
      image toward its matched real reading from either side, and pulls back one the classifier is surer of
      than of its real match;
    * cap "stop": cross-entropy, with an assignment dropped once its image is as confident as its matched real
      image of its class (`matched_caps`): one-sided, so what is already past the real range stays there.

    Returns (loss, stats): "kept" (images used) and "past_real" (of those, the ones more confident of their
    assigned class than their real match: dropped by "stop", pulled back by "match")."""
    log_odds = (logits[:, 1] - logits[:, 0]).detach() / temperature  # log p(female) / p(male), calibrated
    targets, keep = assign_within_prompts(torch.sigmoid(log_odds), groups, shares, threshold, offsets)
    past, matching = torch.zeros_like(keep), real_toward is not None and cap == "match"
    if matching:
        matched = matched_log_odds(log_odds, groups, shares, real_toward, offsets)
        past = keep & torch.where(targets == 1, log_odds > matched, log_odds < matched)
    elif real_toward is not None:
        toward = torch.where(targets == 1, log_odds, -log_odds)
        past = keep & (toward >= matched_caps(toward, targets, groups, real_toward))
        keep &= ~past
    stats = {"kept": int(keep.sum()), "past_real": int(past.sum())}
    if not keep.any():  # a zero that still belongs to the graph, so backward() works
        return logits.sum() * 0.0, stats
    if matching:
        q, t = torch.sigmoid(matched[keep]).to(logits), (logits[keep, 1] - logits[keep, 0]) / temperature
        entropy = -(torch.xlogy(q, q) + torch.xlogy(1 - q, 1 - q))
        per_image = F.binary_cross_entropy_with_logits(t, q, reduction="none") - entropy
        return temperature * per_image.mean(), stats
    return F.cross_entropy(logits[keep], targets[keep]), stats


def real_confidence(classifier, images, is_female, batch_size=256):
    """(log-odds of real males toward male, of real females toward female): float64, CPU, from the
    calibrated classifier on real target images it did not train on; what `matched_log_odds` matches to."""
    log_odds = calibrated_log_odds(classifier, images, batch_size)
    return -log_odds[~is_female], log_odds[is_female]


def kl_alignment_loss(probs, target, groups=None):
    """KL(target || mean probability) within each prompt, averaged over prompts: probs [N, K] with grad;
    target a female share (K = 2), shares [K], or one row of shares per prompt [P, K]; groups [N] as in
    `distributional_alignment_loss` (None: one prompt)."""
    if not torch.is_tensor(target):
        target = torch.tensor([1.0 - target, target])
    groups = torch.zeros(len(probs), dtype=torch.long, device=probs.device) if groups is None else groups
    target = target.to(probs).expand(int(groups.max()) + 1, probs.shape[1])
    losses = [torch.sum(torch.xlogy(t, t) - t * torch.log(probs[groups == g].mean(dim=0)))
              for g, t in enumerate(target)]
    return torch.stack(losses).mean()


def consistency_weights(p_current, targets, changed_weight=0.2):
    """Per-image weights of the CLIP-consistency loss: `changed_weight` where the OT target (`ot_assign`,
    `joint_ot_assign`) differs from the classifier's current class, i.e. for the images that are *meant*
    to change (Shen et al. use 0.2); 1 elsewhere. p_current: p(female) [N] or class probabilities [N, K]."""
    current = p_current.argmax(dim=-1) if p_current.ndim == 2 else (p_current > 0.5).long()
    return torch.where(current == targets, 1.0, changed_weight).to(p_current.dtype)


# ---- several attributes: OT with class counts, solved exactly -------------------------------------

def largest_remainder_counts(shares, n):
    """Integer counts n_k summing to n, closest to n * pi_k (Hamilton's largest-remainder method)."""
    quotas = [float(s) * n for s in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in by_remainder[:n - sum(counts)]:
        counts[k] += 1
    return counts


def hungarian(cost):
    """Row -> column assignment of a square cost matrix (list of lists) with the least total cost.

    The Kuhn-Munkres algorithm with dual potentials u (rows) and v (columns), O(n^3): rows are added
    one at a time, each along a shortest augmenting path in reduced costs cost[i][j] - u[i] - v[j] >= 0.
    Index 0 is a virtual column holding the row being inserted.
    """
    n = len(cost)
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    row_of = [0] * (n + 1)        # row_of[j]: the row (1-based) matched to column j, 0 = free
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        dist, prev, done = [math.inf] * (n + 1), [0] * (n + 1), [False] * (n + 1)
        while row_of[j0]:         # grow the path until it reaches a free column
            done[j0] = True
            i0, delta, j1 = row_of[j0], math.inf, 0
            for j in range(1, n + 1):
                if not done[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < dist[j]:
                        dist[j], prev[j] = reduced, j0
                    if dist[j] < delta:
                        delta, j1 = dist[j], j
            for j in range(n + 1):  # shift the potentials so the new edge becomes tight
                if done[j]:
                    u[row_of[j]] += delta
                    v[j] -= delta
                else:
                    dist[j] -= delta
            j0 = j1
        while j0:                 # flip the matching along the path
            j1 = prev[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col_of = [0] * n
    for j in range(1, n + 1):
        col_of[row_of[j] - 1] = j - 1
    return col_of


def joint_ot_assign(probs, shares):
    """targets [N] long: the assignment of images to K classes with counts `largest_remainder_counts`
    that minimises sum_i ||p_i - e_k(i)||^2, solved exactly on the N x N matrix with one column per slot."""
    n = probs.shape[0]
    counts = largest_remainder_counts(shares, n)
    slot_class = [k for k, c in enumerate(counts) for _ in range(c)]
    p = probs.detach().double().cpu()
    class_cost = ((p[:, None, :] - torch.eye(p.shape[1], dtype=torch.float64)[None]) ** 2).sum(-1)  # [N, K]
    cost = class_cost[:, slot_class].tolist()
    return torch.tensor([slot_class[j] for j in hungarian(cost)], device=probs.device)


def joint_alignment_loss(logits, probs_nograd, shares, groups=None):
    """Cross-entropy of `logits` [N, K] against `joint_ot_assign` targets, assigned within each prompt's
    images (groups [N]; None: one prompt), all kept: the binomial uncertainty above is a statement about
    ranks on one axis. Returns (loss, stats)."""
    groups = torch.zeros(len(logits), dtype=torch.long, device=logits.device) if groups is None else groups
    targets = torch.empty_like(groups)
    for g in groups.unique():
        targets[groups == g] = joint_ot_assign(probs_nograd[groups == g], shares)
    counts = torch.bincount(probs_nograd.argmax(dim=-1), minlength=probs_nograd.shape[1])
    return F.cross_entropy(logits, targets), {"kept": len(targets), "class_fraction": (counts / len(targets)).tolist()}


# ---- CLIP consistency --------------------------------------------------------------------------------

def clip_consistency_loss(clip_model, x_student, x_teacher, weights=None):
    """mean_i w_i (1 - cos(CLIP_img(x_student_i), CLIP_img(x_teacher_i))); the teacher side has no grad.

    Images are ours ([N, 1, H, W] in [-1, 1]); `clip.preprocess` resizes and normalises them
    differentiably for the frozen CLIP image encoder.
    """
    resolution = clip_model.config.image_resolution
    f_student = clip_model.encode_image(preprocess(x_student, resolution))
    with torch.no_grad():
        f_teacher = clip_model.encode_image(preprocess(x_teacher, resolution))
    per_image = 1 - F.cosine_similarity(f_student, f_teacher, dim=-1)
    return per_image.mean() if weights is None else (weights * per_image).mean()
