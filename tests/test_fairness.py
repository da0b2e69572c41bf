"""Alignment losses, against brute force, explicit sums and hand algebra (the sampler: test_differentiable_sampler.py)."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimedi.clip import CLIP, CLIPConfig
from minimedi.fairness import (
    GroupFocus, assign_within_prompts, binomial_cdf, clip_consistency_loss, consistency_weights,
    distributional_alignment_loss, hungarian, joint_alignment_loss, joint_ot_assign, kl_alignment_loss,
    largest_remainder_counts, matched_caps, matched_log_odds, ot_assign, prompt_batch, real_confidence, uncertainty)


def transport_cost(probs, targets):
    """sum_i ||p_i - e_{y_i}||^2, in float64."""
    probs = probs.double()
    return float(((probs - F.one_hot(targets, probs.shape[1]).double()) ** 2).sum())


# ---- optimal transport ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_binary_ot_assign_is_optimal_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = 8
    p = torch.rand(n, generator=g)
    r = float(torch.rand((), generator=g))
    targets, rank = ot_assign(p, r)
    n_female = math.floor(n * r + 0.5)
    assert int(targets.sum()) == n_female
    assert sorted(rank.tolist()) == list(range(n)) and bool((p[rank == 0] == p.max()).all())
    probs = torch.stack([1 - p, p], dim=1)
    best = min(transport_cost(probs, torch.tensor([int(i in females) for i in range(n)]))
               for females in itertools.combinations(range(n), n_female))
    assert transport_cost(probs, targets) == pytest.approx(best, abs=1e-12)


def test_randomized_rounding_takes_n_r_women_on_average():
    """floor(n r + u), u ~ U[0, 1): n r = 5.46 gives 5 women with probability 0.54 and 6 with 0.46, so the
    mean over a fine grid of offsets is 5.46; the plain rounding (u = 0.5) always gives 5."""
    p = torch.linspace(0.9, 0.1, 12)
    counts = [int(ot_assign(p, 0.455, (k + 0.5) / 1000)[0].sum()) for k in range(1000)]
    assert set(counts) == {5, 6} and sum(counts) / 1000 == pytest.approx(12 * 0.455, abs=1e-3)
    assert int(ot_assign(p, 0.455)[0].sum()) == 5


def expected_net_push(s, threshold, n=12, r=0.455, offsets=20):
    """The expected number of images per prompt that the alignment pushes to "female" minus those it pushes
    to "male" (kept assignments that contradict the classifier's reading), when each of the n images reads
    as female with probability s: what moves a prompt's share. Exact over F ~ Binomial(n, s) women read,
    averaged over a grid of rounding offsets."""
    push = 0.0
    for f in range(n + 1):
        read_female = torch.arange(n) < f
        p = torch.where(read_female, 0.8, 0.2) - 0.01 * torch.arange(n) / n  # distinct readings, no ties
        groups = torch.arange(offsets).repeat_interleave(n)
        shares = torch.full((offsets,), r, dtype=torch.float64)
        grid = (torch.arange(offsets) + 0.5) / offsets
        targets, keep = assign_within_prompts(p.repeat(offsets), groups, shares, threshold, grid)
        female = read_female.repeat(offsets)
        net = (keep & (targets == 1) & ~female).sum() - (keep & (targets == 0) & female).sum()
        push += math.comb(n, f) * s ** f * (1 - s) ** (n - f) * float(net) / offsets
    return push


def test_without_the_uncertainty_filter_every_prompt_is_pushed_toward_its_share():
    """Keeping every assignment and rounding at random, the net push is n (r - s) on average: zero only at
    the target, and as strong near it as the distance asks. Shen et al.'s filter at 0.2 drops ranks 4-6 of
    12 at r = 0.455: only a prompt read with under 4 or over 7 women in 12 is pushed, by max(0, 4 - F) -
    max(0, F - 7), which near the target is under half the push without the filter."""
    for s in (0.2, 0.35, 0.455, 0.55, 0.7):
        unfiltered, filtered = expected_net_push(s, 1.0), expected_net_push(s, 0.2)
        assert unfiltered == pytest.approx(12 * (0.455 - s), abs=0.02)
        by_hand = sum(math.comb(12, f) * s ** f * (1 - s) ** (12 - f) * (max(0, 4 - f) - max(0, f - 7))
                      for f in range(13))
        assert filtered == pytest.approx(by_hand, abs=1e-9)
        if 0.4 < s < 0.6 and s != 0.455:
            assert abs(filtered) < 0.45 * abs(unfiltered)


@pytest.mark.parametrize("seed", range(5))
def test_hungarian_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(6, 6, generator=g).double()
    cost[0] = cost[1]  # ties must not confuse it
    col = hungarian(cost.tolist())
    assert sorted(col) == list(range(6))
    best = min(sum(cost[i, perm[i]] for i in range(6)) for perm in itertools.permutations(range(6)))
    assert float(sum(cost[i, col[i]] for i in range(6))) == pytest.approx(float(best), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_joint_ot_assign_is_optimal_by_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 7, 3
    probs = torch.softmax(2 * torch.randn(n, k, generator=g), dim=1)
    shares = torch.distributions.Dirichlet(torch.ones(k)).sample()
    counts = largest_remainder_counts(shares.tolist(), n)
    assert sum(counts) == n and all(abs(c - n * s) < 1 for c, s in zip(counts, shares.tolist()))
    targets = joint_ot_assign(probs, shares.tolist())
    assert torch.bincount(targets, minlength=k).tolist() == counts
    slots = [c for c, m in enumerate(counts) for _ in range(m)]
    best = min(transport_cost(probs, torch.tensor(perm)) for perm in set(itertools.permutations(slots)))
    assert transport_cost(probs, targets) == pytest.approx(best, abs=1e-12)


def test_largest_remainder_counts_hand_example():
    assert largest_remainder_counts([0.45, 0.35, 0.2], 7) == [3, 3, 1]  # quotas 3.15, 2.45, 1.4
    assert largest_remainder_counts([0.25, 0.25, 0.25, 0.25], 24) == [6, 6, 6, 6]
    assert largest_remainder_counts([1.0, 0.0], 5) == [5, 0]


def test_joint_ot_with_two_classes_agrees_with_the_sorted_cut():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(24, generator=g)
    targets, _ = ot_assign(p, 0.3)  # 7.2 -> 7 women under both roundings
    joint = joint_ot_assign(torch.stack([1 - p, p], 1), [0.7, 0.3])
    assert torch.equal(joint, targets)


# ---- uncertainty ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,r", [(1, 0.5), (7, 0.3), (24, 0.45), (24, 0.0), (24, 1.0), (60, 0.2)])
def test_uncertainty_matches_binomial_sums_with_math_comb(n, r):
    cdf = [sum(math.comb(n, k) * r ** k * (1 - r) ** (n - k) for k in range(j + 1)) for j in range(n + 1)]
    torch.testing.assert_close(binomial_cdf(n, r), torch.tensor(cdf, dtype=torch.float64), rtol=0, atol=1e-12)
    rank = torch.arange(n)
    u_female, u_male = uncertainty(rank, n, r)
    torch.testing.assert_close(u_female, torch.tensor(cdf[:n], dtype=torch.float64), rtol=0, atol=1e-12)
    tail = [sum(math.comb(n, k) * r ** k * (1 - r) ** (n - k) for k in range(j + 1, n + 1)) for j in range(n)]
    torch.testing.assert_close(u_male, torch.tensor(tail, dtype=torch.float64), rtol=0, atol=1e-12)


# ---- losses -----------------------------------------------------------------------------------------

def one_prompt(n):
    return torch.zeros(n, dtype=torch.long)


def test_distributional_alignment_loss_keeps_confident_ranks_and_only_logits_get_grad():
    g = torch.Generator().manual_seed(0)
    n, r, temperature = 24, 0.45, 1.7
    logits = torch.randn(n, 2, generator=g, requires_grad=True)
    loss, stats = distributional_alignment_loss(logits, one_prompt(n), torch.tensor([r]), 0.2, temperature)
    # Independently: rank by the calibrated p(female); rank j is kept iff its assigned label is contradicted
    # with probability <= 0.2.
    p = torch.softmax(logits.detach() / temperature, -1)[:, 1]
    order = sorted(range(n), key=lambda i: -p[i].item())
    n_female = round(n * r + 1e-9)
    cdf = [sum(math.comb(n, k) * r ** k * (1 - r) ** (n - k) for k in range(j + 1)) for j in range(n)]
    kept = [(i, int(j < n_female)) for j, i in enumerate(order) if (cdf[j] if j < n_female else 1 - cdf[j]) <= 0.2]
    assert stats == {"kept": len(kept), "past_real": 0} and 0 < len(kept) < n
    idx, y = torch.tensor([i for i, _ in kept]), torch.tensor([t for _, t in kept])
    torch.testing.assert_close(loss, F.cross_entropy(logits[idx], y))
    loss.backward()
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[idx] = False
    assert logits.grad[dropped].abs().sum() == 0 and logits.grad[idx].abs().sum() > 0


def test_alignment_loss_with_nothing_kept_is_a_differentiable_zero():
    logits = torch.tensor([[0.0, 0.4], [0.4, 0.0]], requires_grad=True)
    loss, stats = distributional_alignment_loss(logits, one_prompt(2), torch.tensor([0.5]), threshold=0.2)
    assert stats["kept"] == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 2))


def test_per_prompt_ot_assigns_the_target_share_within_each_prompt():
    """Two prompts whose readings differ: ranked within each prompt, each gets its round(12 x 0.5) = 6
    women; ranked together (one group), the prompt that reads more female takes every "female" target."""
    p = torch.cat([torch.linspace(0.55, 0.95, 12), torch.linspace(0.05, 0.45, 12)])
    groups = torch.arange(2).repeat_interleave(12)
    targets, keep = assign_within_prompts(p, groups, torch.tensor([0.5, 0.5]), threshold=1.0)
    assert keep.all() and targets[:12].sum() == 6 and targets[12:].sum() == 6
    assert targets[:12].tolist() == [0] * 6 + [1] * 6 and targets[12:].tolist() == [0] * 6 + [1] * 6  # the top 6
    pooled, _ = assign_within_prompts(p, torch.zeros(24, dtype=torch.long), torch.tensor([0.5]), threshold=1.0)
    assert pooled[:12].sum() == 12 and pooled[12:].sum() == 0
    # The loss follows the per-prompt targets: its gradient raises p(female) exactly where "female" was assigned.
    logits = torch.stack([torch.zeros(24), torch.logit(p)], 1).requires_grad_()
    loss, _ = distributional_alignment_loss(logits, groups, torch.tensor([0.5, 0.5]), threshold=1.0)
    loss.backward()
    assert torch.equal(logits.grad[:, 1] < 0, targets == 1)


def test_weighted_prompt_draws_follow_the_weights():
    neutral, named = [f"n{i}" for i in range(4)], {"female": ["w"], "male": ["m"]}
    same = [prompt_batch(neutral, named, 300, 1, 0.25, 0.45, torch.Generator().manual_seed(3), weights)[0]
            for weights in (None, torch.ones(4))]
    assert same[0] == same[1]  # uniform weights draw exactly what no weights draw
    weights = torch.tensor([0.0, 1.0, 2.0, 5.0])
    captions, _, _ = prompt_batch(neutral, named, 8000, 1, 0.0, 0.45, torch.Generator().manual_seed(4), weights)
    for caption, w in zip(neutral, (weights / weights.sum()).tolist()):
        share = captions.count(caption) / len(captions)
        assert abs(share - w) < 4 * math.sqrt(max(w * (1 - w), 1e-12) / len(captions)) + 1e-12, caption


def test_group_focus_weights_the_groups_furthest_from_the_target():
    focus = GroupFocus(["t1", "t2", "t1", "flair"], target_share=0.4, strength=10.0, decay=0.5)
    assert focus.weights().tolist() == [1.0] * 4  # nothing read: every group counts as on target
    # prompt 0 (t1) reads 0.4 (on target), prompt 1 (t2) 0.1; flair is not drawn this step
    focus.update(torch.tensor([0, 0, 1, 1, -1]), torch.tensor([0.3, 0.5, 0.0, 0.2, 0.9]))
    assert focus.shares() == pytest.approx({"t1": 0.4, "t2": 0.1})
    assert focus.weights().tolist() == pytest.approx([1.0, math.exp(3.0), 1.0, 1.0])
    focus.update(torch.tensor([1, 3]), torch.tensor([0.5, 0.9]))  # t2 now 0.5 0.1 + 0.5 0.5; flair first read
    assert focus.shares() == pytest.approx({"flair": 0.9, "t1": 0.4, "t2": 0.3})
    assert focus.weights().tolist() == pytest.approx([1.0, math.exp(1.0), 1.0, math.exp(5.0)])
    restored = GroupFocus(["t1", "t2", "t1", "flair"], 0.4, 10.0, 0.5)
    restored.load_state_dict(focus.state_dict())
    assert torch.equal(restored.weights(), focus.weights())


def test_named_sex_prompts_take_share_one_or_zero():
    neutral, named = ["n0", "n1", "n2"], {"female": ["w0", "w1"], "male": ["m0"]}
    g = torch.Generator().manual_seed(0)
    captions, groups, shares = prompt_batch(neutral, named, 400, 3, 1.0, 0.45, g)
    assert groups.tolist() == [i // 3 for i in range(1200)] and captions[::3] == captions[1::3] == captions[2::3]
    for caption, share in zip(captions[::3], shares.tolist()):
        assert (share == 1.0 and caption in named["female"]) or (share == 0.0 and caption in named["male"])
    assert 150 < shares.sum() < 250  # women and men evenly
    captions, _, shares = prompt_batch(neutral, named, 50, 2, 0.0, 0.45, g)
    assert set(captions) <= set(neutral) and shares.tolist() == [0.45] * 50
    _, _, shares = prompt_batch(neutral, named, 2000, 1, 0.25, 0.45, g)
    assert abs(float((shares != 0.45).double().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 2000)
    # A named prompt's images are all assigned its sex, and no assignment is uncertain.
    p = torch.rand(12, generator=g)
    for share in (1.0, 0.0):
        targets, keep = assign_within_prompts(p, one_prompt(12), torch.tensor([share]), threshold=0.2)
        assert keep.all() and targets.tolist() == [int(share)] * 12


def test_matched_caps_stop_the_push_at_the_matched_real_confidence():
    """Real women's log-odds toward female are 0, 0.1, ..., 9.9: the quantile at level q is 9.9 q. Four
    images assigned "female" at log-odds 0.5, 9, 3, 7 are matched in order to the levels 1/8, 3/8, 5/8, 7/8,
    i.e. to caps 1.2375, 3.7125, 6.1875, 8.6625: the images at 7 and 9 are already past theirs."""
    real_toward = (torch.arange(50, dtype=torch.float64) * 0.2, torch.arange(100, dtype=torch.float64) * 0.1)
    toward = torch.tensor([0.5, 9.0, 3.0, 7.0], dtype=torch.float64)
    caps = matched_caps(toward, torch.ones(4, dtype=torch.long), one_prompt(4), real_toward)
    torch.testing.assert_close(caps, torch.tensor([1.2375, 8.6625, 3.7125, 6.1875], dtype=torch.float64))
    # Men are matched to real men's quantiles (here 9.8 q), each prompt on its own.
    caps = matched_caps(toward, torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), real_toward)
    torch.testing.assert_close(caps, torch.tensor([0.25, 0.75, 0.25, 0.75], dtype=torch.float64) * 9.8)
    # In the loss: a named-woman prompt whose two most confident images are past their caps.
    logits = torch.stack([torch.zeros(4), toward.float()], 1).requires_grad_()
    loss, stats = distributional_alignment_loss(logits, one_prompt(4), torch.tensor([1.0]), real_toward=real_toward,
                                                cap="stop")
    assert stats == {"kept": 2, "past_real": 2}
    torch.testing.assert_close(loss, F.cross_entropy(logits[[0, 2]], torch.ones(2, dtype=torch.long)))
    loss.backward()
    assert logits.grad[[1, 3]].abs().sum() == 0 and logits.grad[[0, 2]].abs().min() > 0


def mix_quantile(women, men, r, level):
    """The level-quantile (inverse CDF) of r x real women's log-odds of female + (1 - r) x real men's, by
    walking the sorted atoms: an independent reference for `matched_log_odds`."""
    atoms = sorted([(float(v), r / len(women)) for v in women] + [(float(v), (1 - r) / len(men)) for v in men])
    total = 0.0
    for value, weight in atoms:
        total += weight
        if weight > 0 and total > level:
            return value
    return atoms[-1][0]


@pytest.mark.parametrize("r", [1.0, 0.0, 0.455])
def test_matched_log_odds_are_the_real_mix_quantiles_in_the_images_order(r):
    g = torch.Generator().manual_seed(1)
    real_toward = (torch.randn(70, generator=g, dtype=torch.float64) + 2, torch.randn(90, generator=g, dtype=torch.float64) + 1.5)
    women, men = real_toward[1].tolist(), (-real_toward[0]).tolist()
    log_odds = torch.randn(24, generator=g, dtype=torch.float64)
    groups, shares, offsets = torch.arange(2).repeat_interleave(12), torch.tensor([r, 0.5]), torch.tensor([0.5, 0.1])
    matched = matched_log_odds(log_odds, groups, shares, real_toward, offsets)
    for p, (share, u) in enumerate(zip(shares.tolist(), offsets.tolist())):
        images = range(12 * p, 12 * p + 12)
        by_reading = sorted(images, key=lambda i: float(log_odds[i]))
        for k, i in enumerate(by_reading):
            assert float(matched[i]) == mix_quantile(women, men, share, (k + u) / 12)
    # A named woman's images are matched to real women's readings only, a named man's to real men's.
    if r == 1.0:
        assert set(matched[:12].tolist()) <= set(women)
    if r == 0.0:
        assert set(matched[:12].tolist()) <= set(men)


def test_matched_loss_pulls_each_image_to_its_match_from_either_side():
    """The "match" loss is T KL(sigmoid(c) || sigmoid(t)): zero when every image reads as its real match,
    and its gradient in the raw logit difference is sigmoid(t) - sigmoid(c), so an image the classifier is
    surer of than of its match is pulled back, toward the real range."""
    real_toward = (torch.arange(50, dtype=torch.float64) * 0.2, torch.arange(100, dtype=torch.float64) * 0.1)
    temperature = 1.5
    t = torch.tensor([0.5, 9.0, 3.0, 7.0], dtype=torch.float64)
    matched = matched_log_odds(t, one_prompt(4), torch.tensor([1.0]), real_toward)
    torch.testing.assert_close(matched, torch.tensor([1.2, 8.7, 3.7, 6.2], dtype=torch.float64))
    logits = torch.stack([torch.zeros(4), t * temperature], 1).requires_grad_()
    loss, stats = distributional_alignment_loss(logits, one_prompt(4), torch.tensor([1.0]), temperature=temperature,
                                                real_toward=real_toward)
    assert stats == {"kept": 4, "past_real": 2}  # 9.0 and 7.0 read surer than their matches 8.7 and 6.2
    q, p = torch.sigmoid(matched), torch.sigmoid(t)
    kl = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    torch.testing.assert_close(loss, temperature * kl.mean())
    loss.backward()
    torch.testing.assert_close(logits.grad[:, 1], (p - q) / 4)
    assert logits.grad[[1, 3], 1].min() > 0 and logits.grad[[0, 2], 1].max() < 0
    at_match = torch.stack([torch.zeros(4), matched * temperature], 1)
    loss, _ = distributional_alignment_loss(at_match, one_prompt(4), torch.tensor([1.0]), temperature=temperature,
                                            real_toward=real_toward)
    assert abs(float(loss)) < 1e-12


def test_real_confidence_reads_calibrated_log_odds_toward_each_image_s_own_class():
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    classifier.temperature = torch.tensor(2.0)
    images = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    is_female = torch.tensor([True, False, True, True, False, False])
    men, women = real_confidence(classifier, images, is_female)
    logits = classifier(images).detach().double()
    log_odds = torch.log_softmax(logits / 2, -1)
    torch.testing.assert_close(women, (log_odds[:, 1] - log_odds[:, 0])[is_female])
    torch.testing.assert_close(men, (log_odds[:, 0] - log_odds[:, 1])[~is_female])


def test_kl_alignment_loss_matches_formula_and_vanishes_at_target():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1]], requires_grad=True)
    mean_female = 0.25
    expected = 0.45 * math.log(0.45 / mean_female) + 0.55 * math.log(0.55 / (1 - mean_female))
    loss = kl_alignment_loss(probs, 0.45)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert probs.grad[:, 1].sum() < 0  # raising p(female) lowers the loss
    assert float(kl_alignment_loss(probs.detach(), torch.tensor([0.75, 0.25]))) == pytest.approx(0.0, abs=1e-7)
    # Per prompt: the mean over prompts of each prompt's KL to its own target.
    per_prompt = kl_alignment_loss(probs.detach(), torch.tensor([[0.3, 0.7], [1.0, 0.0]]), torch.tensor([0, 0, 1, 1]))
    expected = (0.3 * math.log(0.3 / 0.7) + 0.7 * math.log(0.7 / 0.3) + 1.0 * math.log(1.0 / 0.8)) / 2
    assert per_prompt.item() == pytest.approx(expected, rel=1e-6)


def test_joint_alignment_loss_and_consistency_weights():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    logits = probs.log().requires_grad_()
    loss, stats = joint_alignment_loss(logits, probs, [0.25, 0.75])
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 1, 1, 1])))
    assert stats == {"kept": 4, "class_fraction": [0.5, 0.5]}
    targets, _ = ot_assign(probs[:, 1], 0.75)
    assert targets.tolist() == [0, 1, 1, 1]
    assert consistency_weights(probs[:, 1], targets).tolist() == pytest.approx([1.0, 1.0, 0.2, 1.0])
    assert consistency_weights(probs, targets).tolist() == pytest.approx([1.0, 1.0, 0.2, 1.0])
    # Within prompts {0, 1} and {2, 3}: one "female" slot each (0.5 of 2 = 1).
    loss, _ = joint_alignment_loss(logits, probs, [0.5, 0.5], torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 1, 0, 1])))


def test_clip_consistency_loss():
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(embed_dim=16, vocab_size=500, text_width=64, text_layers=1, image_resolution=16,
                           vision_width=64, vision_layers=1, patch_size=4)).requires_grad_(False)
    student = torch.rand(3, 1, 16, 16, requires_grad=True) * 2 - 1
    student.retain_grad()
    teacher = (torch.rand(3, 1, 16, 16) * 2 - 1).requires_grad_()
    assert float(clip_consistency_loss(clip, teacher.detach(), teacher.detach())) == pytest.approx(0.0, abs=1e-6)
    loss = clip_consistency_loss(clip, student, teacher)
    to_clip = lambda x: ((((x + 1) / 2).expand(-1, 3, -1, -1) - torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None])
                         / torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None])
    f_s, f_t = clip.encode_image(to_clip(student)), clip.encode_image(to_clip(teacher))
    expected = (1 - (f_s * f_t).sum(-1) / (f_s.norm(dim=-1) * f_t.norm(dim=-1))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
