"""The phantom corpus: determinism, anatomy and contrast, the sex signal, captions, proportions, prompts."""
import hashlib
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minimedi.config import make_config
from minimedi.data import PhantomCorpus, evaluation_prompts, pretraining_corpus, target_corpus, tuning_prompts
from minimedi.data.captions import LOBES, MODALITIES, SIDES, SIZES, all_captions
from minimedi.data.phantom import TISSUES, draw_noise, render, tissue_fractions
from minimedi.errors import UserError

SEX_AGE_WORDS = {"man", "men", "woman", "women", "male", "female", "boy", "girl", "sex", "gender", "year", "years",
                 "old", "aged", "age", "elderly", "young"}


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def parse(caption):
    """Attributes read back from a caption with hand-written rules (independent of the grammar tables)."""
    text = caption.lower()
    if re.search(r"contrast|gadolinium|t1ce", text):
        modality = "t1ce"
    elif re.search(r"flair|fluid-attenuated", text):
        modality = "flair"
    elif "t2" in text:
        modality = "t2"
    else:
        modality = "t1" if "t1" in text else None
    sexes = {"man": "male", "male": "male", "woman": "female", "female": "female"}
    return {"modality": modality,
            "sides": re.findall(r"\b(left|right)\b", text),
            "lobes": re.findall(r"\b(frontal|temporal|parietal|occipital)\b", text),
            "sizes": ["large" if w == "big" else w for w in re.findall(r"\b(small|large|big)\b", text)],
            "sexes": [sexes[w] for w in re.findall(r"\b(man|male|woman|female)\b", text)],
            "ages": [int(a or b) for a, b in re.findall(r"\b(\d+)-year-old\b|\baged (\d+)\b", text)]}


def binomial_ok(k, n, p, sigmas=4.0):
    return abs(k / n - p) <= sigmas * np.sqrt(p * (1 - p) / n) + 1e-12


@pytest.fixture(scope="module")
def pretrain_10k():
    c = PhantomCorpus(10000, 32, 0.2, seed=0, kind="pretrain")
    return [c.attributes(i) for i in range(len(c))]


def test_items_are_deterministic_in_any_order_and_batch():
    c = PhantomCorpus(40, 32, 0.3, seed=5)
    forward = [c[i] for i in range(40)]
    backward = [c[i] for i in reversed(range(40))][::-1]
    fresh = PhantomCorpus(40, 32, 0.3, seed=5)
    batched = fresh.images(list(range(39, -1, -1)), batch_size=7).flip(0)
    for a, b, img in zip(forward, backward, batched):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], img)
        assert a["caption"] == b["caption"] and a["head_scale"] == b["head_scale"]
    other = PhantomCorpus(40, 32, 0.3, seed=6)
    assert sum(torch.equal(forward[i]["image"], other[i]["image"]) for i in range(40)) == 0
    assert sum(forward[i]["caption"] == other[i]["caption"] for i in range(40)) < 10


def test_pinned_items():
    """The same bytes on every machine (pinned on x86-64, numpy 2.4). numpy's Generator may change its
    distributions between numpy versions (NEP 19): if this fails only after an upgrade, check and re-pin."""
    c = PhantomCorpus(8, 32, 0.5, seed=0, kind="target")
    assert c[0]["caption"] == ("Axial fluid-attenuated inversion recovery brain MR image of a man showing a big "
                               "glioma in the left frontal lobe.")
    digest = hashlib.sha256(c.images().numpy().tobytes()).hexdigest()
    assert digest == "501261166804fd9da79fd416995e647643ff647fefa9523ccc85f839dbc0d52b"


@pytest.mark.parametrize("size", [16, 32, 64])
def test_images_in_range_and_attributes_independent_of_size(size):
    c, ref = PhantomCorpus(16, size, 0.5, seed=1), PhantomCorpus(16, 32, 0.5, seed=1)
    images = c.images()
    assert images.shape == (16, 1, size, size) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.3
    assert [c.attributes(i) for i in range(16)] == [ref.attributes(i) for i in range(16)]


def test_dataloader_collates_items():
    corpus = pretraining_corpus(make_config("tiny").data)
    assert len(corpus) == 512 and corpus.p_female == 0.2
    batch = next(iter(DataLoader(corpus, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16)
    assert batch["label"].tolist() == [int(s == "female") for s in batch["sex"]]
    assert set(batch) == {"image", "caption", "sex", "age", "modality", "tumor", "side", "lobe", "tumor_size",
                          "head_scale", "label"}


def test_bad_settings_are_user_errors():
    for kwargs in ({"n": -1}, {"size": 4}, {"p_female": 1.5}, {"kind": "validation"}, {"seed": -3},
                   {"p_tumor": -0.1}):
        with pytest.raises(UserError):
            PhantomCorpus(**{"n": 10, "size": 32, "p_female": 0.5, **kwargs})
    with pytest.raises(IndexError):
        PhantomCorpus(10, 32, 0.5)[10]


def test_head_area_predicts_sex_but_not_trivially():
    """Logistic regression on one feature, the head area (pixels above the background), fit by Newton's
    method on half the target corpus: held-out accuracy near the Bayes rate Phi(1) = 84%."""
    c = PhantomCorpus(3000, 32, 0.45, seed=0, kind="target")
    area = (c.images()[:, 0] > -0.8).sum(dim=(1, 2)).double().numpy()
    y = np.array([c.slice(i)["sex"] == "female" for i in range(len(c))], dtype=np.float64)
    feature = np.stack([(area - area.mean()) / area.std(), np.ones_like(area)], axis=1)
    train, test = slice(0, 1500), slice(1500, 3000)
    w = np.zeros(2)
    for _ in range(25):
        p = 1 / (1 + np.exp(-feature[train] @ w))
        hessian = (feature[train] * (p * (1 - p))[:, None]).T @ feature[train]
        w -= np.linalg.solve(hessian, feature[train].T @ (p - y[train]))
    accuracy = np.mean((feature[test] @ w > 0) == (y[test] == 1))
    assert 0.70 <= accuracy <= 0.90, accuracy
    assert w[0] < 0  # smaller heads -> female


def test_tumor_is_on_the_stated_side():
    """Radiological convention: the patient's left is the image's right. The lesion is the difference
    between the item and the same item without its glioma (same noise); also visible directly."""
    c = PhantomCorpus(300, 32, 0.45, seed=2, kind="target")
    slices = [c.slice(i) for i in range(len(c))]
    noise = np.stack([draw_noise(c.rng(i, "noise"), 32) for i in range(len(c))])
    lesion = np.abs(render(slices, 32, noise) - render([dict(s, tumor=False) for s in slices], 32, noise))
    x = (2 * np.arange(32) + 1) / 32 - 1
    centroid = (lesion * x).sum(axis=(1, 2)) / lesion.sum(axis=(1, 2))
    expected = np.array([1.0 if s["side"] == "left" else -1.0 for s in slices])
    assert np.all(np.sign(centroid) == expected)
    for modality, size, need in (("flair", 32, 0.97), ("t1ce", 64, 0.9)):
        indices = [i for i, s in enumerate(slices) if s["modality"] == modality]
        picked = [slices[i] for i in indices]
        images = PhantomCorpus(300, size, 0.45, seed=2, kind="target").images(indices).numpy()[:, 0]
        brain = tissue_fractions(picked, size)[TISSUES.index("csf"):TISSUES.index("dura")].sum(axis=0) > 0.5
        x = (2 * np.arange(size) + 1) / size - 1
        right = []
        for image, inside in zip(images, brain):
            bright = np.clip(image - np.median(image[inside]), 0, None) ** 2 * inside  # the lesion dominates
            right.append((bright * x).sum() > 0)
        agree = np.mean(np.array(right) == np.array([s["side"] == "left" for s in picked]))
        assert agree >= need, (modality, agree)


def test_modality_contrasts():
    """Mean intensity of pure-tissue pixels (partial-volume fraction > 0.99) in noisy 64x64 images."""
    c = PhantomCorpus(240, 64, 0.5, seed=3, kind="target")
    slices = [c.slice(i) for i in range(len(c))]
    images = c.images().numpy()[:, 0]
    pure = tissue_fractions(slices, 64) > 0.99
    mean = {}
    for m in MODALITIES:
        pick = np.array([s["modality"] == m for s in slices])
        mean[m] = {t: images[pick][pure[k][pick]].mean() for k, t in enumerate(TISSUES) if pure[k][pick].any()}
    t1, t1ce, t2, flair = (mean[m] for m in MODALITIES)
    assert t1["wm"] > t1["gm"] > t1["csf"] and t1["csf"] < -0.5
    assert t2["csf"] > t2["gm"] > t2["wm"] and t2["csf"] > 0.5 and t2["edema"] > t2["gm"]
    assert flair["edema"] > flair["gm"] > flair["wm"] > flair["csf"] and flair["csf"] < -0.5
    assert t1ce["rim"] > t1ce["wm"] and t1ce["rim"] > t1["rim"] + 0.8
    for m in MODALITIES:
        assert mean[m]["skull"] < -0.7 and mean[m]["background"] < -0.8


def test_t1ce_differs_from_t1_without_a_tumor():
    """Dura and falx enhance after gadolinium, so T1ce is recognisable in a normal brain too."""
    s = dict(PhantomCorpus(1, 32, 0.5, seed=5).slice(0), tumor=False)
    t1, t1ce = render([dict(s, modality="t1"), dict(s, modality="t1ce")], 32)
    diff = t1ce - t1
    assert diff.min() > -1e-9 and diff.max() > 0.5  # only brighter, and clearly so somewhere


def test_aging_widens_ventricles_and_thins_cortex():
    s = PhantomCorpus(1, 32, 0.5, seed=4).slice(0)
    young, old = tissue_fractions([dict(s, age=20), dict(s, age=85)], 64).sum(axis=(2, 3)).T
    csf, gm = TISSUES.index("csf"), TISSUES.index("gm")
    assert old[csf] > 1.3 * young[csf] and old[gm] < 0.9 * young[gm]


def test_anti_aliased_at_any_size():
    """Coverage-based edges: a noise-free 64x64 image box-filtered to 32x32 matches the 32x32 render."""
    slices = [PhantomCorpus(20, 32, 0.5, seed=5).slice(i) for i in range(20)]
    fine, coarse = render(slices, 64), render(slices, 32)
    assert np.abs(fine.reshape(20, 32, 2, 32, 2).mean(axis=(2, 4)) - coarse).mean() < 0.02
    fractions = tissue_fractions(slices, 32)
    assert np.allclose(fractions.sum(axis=0), 1) and ((fractions > 0.05) & (fractions < 0.95)).sum() > 20 * 100


def test_captions_agree_with_attributes(pretrain_10k):
    for item in pretrain_10k[:3000]:
        parsed = parse(item["caption"])
        assert parsed["modality"] == item["modality"], item["caption"]
        n = int(item["tumor"])
        assert parsed["sides"] == [item["side"]] * n and parsed["lobes"] == [item["lobe"]] * n
        assert parsed["sizes"] == [item["tumor_size"]] * n
        assert set(parsed["sexes"]) <= {item["sex"]} and set(parsed["ages"]) <= {item["age"]}, item["caption"]
    mentions = np.array([[bool(parse(i["caption"])["sexes"]), bool(parse(i["caption"])["ages"])] for i in pretrain_10k])
    n = len(mentions)
    assert binomial_ok(mentions[:, 0].sum(), n, 0.5) and binomial_ok(mentions[:, 1].sum(), n, 0.5)
    assert binomial_ok((mentions[:, 0] & mentions[:, 1]).sum(), n, 0.25)  # mentioned independently


def test_at_least_500_distinct_captions_per_10k(pretrain_10k):
    assert len({item["caption"] for item in pretrain_10k}) >= 500


def test_proportions_match_settings(pretrain_10k):
    n = len(pretrain_10k)
    female = np.array([i["sex"] == "female" for i in pretrain_10k])
    tumor = np.array([i["tumor"] for i in pretrain_10k])
    assert binomial_ok(female.sum(), n, 0.2) and binomial_ok(tumor.sum(), n, 0.6)
    for attribute, values in (("modality", MODALITIES), ("side", SIDES), ("lobe", LOBES), ("tumor_size", SIZES)):
        column = np.array([i[attribute] for i in pretrain_10k])
        for v in values:  # uniform among gliomas, and sex independent of every value
            pick = column == v
            assert binomial_ok(pick.sum(), tumor.sum() if attribute != "modality" else n,
                               1 / len(values))
            assert binomial_ok(female[pick].sum(), pick.sum(), 0.2)
    ages = np.array([i["age"] for i in pretrain_10k])
    assert ages.min() == 20 and ages.max() == 85
    target = target_corpus(make_config("default").data)
    t = [target.attributes(i) for i in range(len(target))]
    assert len(t) == 4000 and all(i["tumor"] for i in t)
    assert binomial_ok(sum(i["sex"] == "female" for i in t), len(t), 0.45)
    skewed = PhantomCorpus(2000, 32, 0.7, seed=9, kind="pretrain", p_tumor=0.3)
    s = [skewed.slice(i) for i in range(2000)]
    assert binomial_ok(sum(i["sex"] == "female" for i in s), 2000, 0.7)
    assert binomial_ok(sum(i["tumor"] for i in s), 2000, 0.3)


def test_prompt_sets():
    evaluation, tuning = evaluation_prompts(), tuning_prompts()
    combos = {(a["modality"], a["side"], a["lobe"], a["tumor_size"]) for a in evaluation}
    assert len(evaluation) == len(combos) == 64 and len({p["prompt"] for p in evaluation}) == 64
    assert {c[0] for c in combos} == set(MODALITIES) and {c[1] for c in combos} == set(SIDES)
    assert {p["prompt"] for p in evaluation}.isdisjoint(p["prompt"] for p in tuning)
    grammar_space, vocabulary = set(), set()
    for a in evaluation:
        for mention_age in (False, True):  # the captions that could collide: those naming no sex
            grammar_space.update(all_captions({**a, "tumor": True, "sex": "female", "age": 40}, False, mention_age))
    for caption in grammar_space:
        vocabulary.update(words(caption))
    for prompts in (evaluation, tuning):
        for p in prompts:
            parsed = parse(p["prompt"])
            assert parsed["modality"] == p["modality"] and parsed["sides"] == [p["side"]]
            assert parsed["lobes"] == [p["lobe"]] and parsed["sizes"] == [p["tumor_size"]]
            assert not SEX_AGE_WORDS & set(words(p["prompt"])) and not parsed["ages"]
    for p in evaluation:  # held out from training, but made of words the text encoder was trained on
        assert p["prompt"] not in grammar_space and set(words(p["prompt"])) <= vocabulary
    assert all(p["prompt"] in grammar_space for p in tuning)


def test_evaluation_prompts_never_generated(pretrain_10k):
    assert {p["prompt"] for p in evaluation_prompts()}.isdisjoint(i["caption"] for i in pretrain_10k)


def test_images_at_another_size_are_that_size_s_renders():
    """`images(size=...)` renders the same slices as a corpus of that size: what the SR stage's pairs are."""
    small, large = PhantomCorpus(6, 16, 0.5, seed=3), PhantomCorpus(6, 48, 0.5, seed=3)
    assert torch.equal(small.images(size=48), large.images())
    assert torch.equal(large.images([4, 1], size=16), small.images([4, 1]))
    assert [small.caption(i) for i in range(6)] == [large.caption(i) for i in range(6)]
    with pytest.raises(UserError):
        small.images(size=4)
