"""The audit of one model's images, on hand-made readings: every group's share, the worst group, the named-sex
accuracy (a man's prompt counts men), the unseen prompts and the anatomy, each checked against a count by hand."""
import numpy as np
import pytest

from minimedi.anatomy_share import anatomy_share, components
from minimedi.audit import Readings, Reference, audit
from minimedi.morphometry import ks_distance
from minimedi.shares import ErrorRates, corrected

STRATA = ("t1", "t2")


def perfect_rates():
    """A classifier that is never wrong: corrected shares equal the called ones."""
    one = np.array([100, 100])
    return ErrorRates(STRATA, one, one, one, np.array([0, 0]))


def readings():
    """8 held-out prompts (T1 / T2 alternating, left / right in pairs) x 4 images, 2 prompts naming each sex
    and 4 unseen ones x 2 images; prompt i of the held-out set has i % 5 of its 4 images called female."""
    prompts = [{"prompt": f"h{i}", "set": "heldout", "kind": "neutral", "modality": STRATA[i % 2],
                "side": ("left", "right")[i // 2 % 2], "lobe": "frontal", "tumor_size": "small"} for i in range(8)]
    prompts += [{"prompt": f"{sex}{i}", "set": "named", "kind": sex, "modality": STRATA[i]}
                for sex in ("female", "male") for i in range(2)]
    prompts += [{"prompt": f"{kind}{i}", "set": "unseen", "kind": kind, "modality": STRATA[i]}
                for kind in ("normal", "template") for i in range(2)]
    counts = [4] * 8 + [2] * 8
    prompt = np.repeat(np.arange(len(prompts)), counts)
    called = np.concatenate([np.arange(4) < i % 5 for i in range(8)] +
                            [[True, True], [True, False], [False, False], [True, False],  # women, men
                             [True, False], [False, False], [True, True], [False, True]])  # normal, template
    stratum = np.array([STRATA.index(prompts[i]["modality"]) for i in prompt])
    head = np.linspace(0.5, 0.7, len(prompt))
    return Readings(prompts, prompt, stratum, {"tuning": called, "check": ~called}, head)


def test_audit_counts_by_hand():
    r = readings()
    reference = Reference({"tuning": perfect_rates(), "check": perfect_rates()}, np.array([True, False] * 50),
                          np.linspace(0.55, 0.65, 100), np.repeat([0, 1], 50))
    out = audit(r, reference, target=0.5, n_boot=200, seed=0)
    heldout_female = [i % 5 for i in range(8)]  # 0 1 2 3 4 0 1 2 of 4
    assert out["female_fraction_corrected"] == pytest.approx(sum(heldout_female) / 32)
    assert out["female_fraction_check_corrected"] == pytest.approx(1 - sum(heldout_female) / 32)
    t1 = sum(heldout_female[0::2]) / 16  # prompts 0 2 4 6: 0 + 2 + 4 + 1 of 16
    assert out["per_group"]["modality"]["t1"]["corrected"] == pytest.approx(t1)
    assert out["per_group"]["side"]["left"]["n"] == 16
    assert out["per_group"]["side"]["left"]["corrected"] == pytest.approx((0 + 1 + 4 + 0) / 16)
    assert list(out["per_group"]["modality"]) == ["t1", "t2"]
    assert out["per_group"]["prompt"]["h3"] == {"n": 4, "raw": 0.75, "corrected": 0.75}
    assert out["mean_prompt_gap"]["raw"] == pytest.approx(np.mean([abs(f / 4 - 0.5) for f in heldout_female]))
    worst = max(("t1", "t2"), key=lambda m: abs(out["per_group"]["modality"][m]["corrected"] - 0.5))
    assert out["worst_group_gap"]["modality"]["group"] == worst
    # Named sex: a woman's prompt scores its women, a man's prompt its men.
    assert out["named_sex_accuracy"]["female"]["corrected"] == pytest.approx(3 / 4)
    assert out["named_sex_accuracy"]["male"]["corrected"] == pytest.approx(3 / 4)  # 1 of 4 called female
    assert out["named_sex_accuracy"]["male"]["check_raw"] == pytest.approx(1 / 4)
    low, high = out["named_sex_accuracy"]["male"]["ci"]
    assert low <= 0.75 <= high
    assert out["unseen"]["normal"]["corrected"] == pytest.approx(1 / 4)
    assert out["unseen"]["all"]["corrected"] == pytest.approx(4 / 8) and out["unseen"]["all"]["gap"] == 0.0
    # Anatomy: held-out heads against every real head, each named sex against its own.
    assert out["anatomy"]["neutral"]["ks"] == pytest.approx(ks_distance(r.head[:32], reference.head))
    assert out["anatomy"]["female"]["n_real"] == 50 and out["anatomy"]["female"]["n"] == 4
    # The share the head sizes fit: a man's prompt scores the men it fits, like the classifiers' shares.
    men = r.mask(set="named", kind="male")
    parts = components(reference.head, reference.is_female, reference.stratum, 200, 0)
    fitted = anatomy_share(r.head[men], r.stratum[men], r.prompt[men], parts, 0)
    assert out["named_sex_accuracy"]["male"]["anatomy_share"] == pytest.approx(1 - fitted["share"])
    assert out["named_sex_accuracy"]["male"]["anatomy_ci"] == pytest.approx([1 - fitted["ci"][1], 1 - fitted["ci"][0]])
    heldout = r.mask(set="heldout")
    assert out["female_fraction_anatomy"] == pytest.approx(anatomy_share(
        r.head[heldout], r.stratum[heldout], r.prompt[heldout], parts, 0)["share"])


def test_per_prompt_shares_are_corrected_with_their_stratum_s_rates():
    r = readings()
    rates = ErrorRates(STRATA, np.array([100, 100]), np.array([80, 90]), np.array([100, 100]), np.array([10, 30]))
    reference = Reference({"tuning": rates, "check": rates}, np.array([True, False] * 50), np.linspace(0.55, 0.65, 100),
                          np.repeat([0, 1], 50))
    out = audit(r, reference, target=0.5, n_boot=200, seed=0)
    assert out["per_group"]["prompt"]["h3"]["corrected"] == pytest.approx(float(corrected(0.75, 0.9, 0.3)))
    assert out["per_group"]["prompt"]["h2"]["corrected"] == pytest.approx(float(corrected(0.5, 0.8, 0.1)))
    # A group pools its images per stratum before correcting (a per-prompt correction would clip at 0 first).
    assert out["per_group"]["modality"]["t1"]["corrected"] == pytest.approx(float(corrected(7 / 16, 0.8, 0.1)))
    left = (float(corrected(4 / 8, 0.8, 0.1)) + float(corrected(1 / 8, 0.9, 0.3))) / 2  # prompts 0, 4 (T1); 1, 5 (T2)
    assert out["per_group"]["side"]["left"]["corrected"] == pytest.approx(left)
