"""Captions for the phantom corpus: a tiny grammar with synonyms, and the two fixed prompt sets.

A caption is the expansion of the symbol `caption` in `GRAMMAR`: every `{name}` inside a chosen option
is replaced by an expansion of `name`, recursively. A few symbols depend on the item (its modality,
tumour side, lobe and size, the subject's sex and age), so each caption expands a copy of the grammar
with those symbols filled in (`item_grammar`). The same grammar can be sampled (`expand`, one random
choice per symbol, for the corpus) or enumerated (`expand_all`, every choice, for tests that must
prove a prompt can never be generated).

    "Axial FLAIR MRI of the brain in a 54-year-old man showing a large glioma in the right temporal lobe."

Sex and age are each mentioned in a caption independently with probability 1/2 (as in ROCO, where
demographics appear in only part of the captions): a quarter name both, a quarter neither.

The prompt sets of alignment tuning:
- `tuning_prompts(k)`: captions the grammar itself produces (in-distribution), k different phrasings of
  each attribute combination, naming neither sex nor age: their target is the target corpus' female share;
- `named_sex_tuning_prompts(k)`: the same combinations in captions that say "man" / "male patient" or
  "woman" / "female patient": their target is that sex (share 1 or 0), so tuning keeps named sex.
`--align-phrasings` sets k (default 1). Eight or sixteen phrasings of each combination did not carry the
tuning better to the report's held-out phrasing (docs/fairness_experiments.md, "The worst sequence").
`--align-templates n` adds one caption of each combination in each of n sentence shapes the grammar never
writes (`TUNING_TEMPLATES`), distinct from the report's two as well.

The prompt sets of the fairness report, none of which tuning ever sees:
- `evaluation_prompts()`: one held-out template ("Brain MRI, axial FLAIR slice showing ...") made only
  of words the grammar uses, in an order it never produces: in-distribution for a text encoder trained
  on the corpus, yet disjoint from every training caption and from the tuning prompts. No sex, no age;
- `named_sex_evaluation_prompts()`: grammar captions naming sex (and age half the time), other draws;
- `unseen_prompts()`: prompts unlike the tuning ones: normal studies, captions naming age, and a
  second held-out template.

Sides are the patient's: "left" is the patient's left, which the images show on the image's right
(the radiological convention; see `phantom.py`).
"""
import itertools
import re

import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
SIDES = ("left", "right")
LOBES = ("frontal", "temporal", "parietal", "occipital")
SIZES = ("small", "large")

MODALITY_NAMES = {
    "t1": ["T1-weighted", "T1", "T1w"],
    "t1ce": ["contrast-enhanced T1-weighted", "T1 post-contrast", "T1ce", "gadolinium-enhanced T1"],
    "t2": ["T2-weighted", "T2", "T2w"],
    "flair": ["FLAIR", "T2-FLAIR", "fluid-attenuated inversion recovery"],
}
SIZE_WORDS = {"small": ["small"], "large": ["large", "big"]}
PERSON = {"male": ["man", "male patient"], "female": ["woman", "female patient"]}

# The subject phrase, keyed by (mention sex, mention age).
SUBJECT = {
    (True, True): [" in a {age}-year-old {person}", " of a {age}-year-old {person}"],
    (True, False): [" in a {person}", " of a {person}"],
    (False, True): [" in a {age}-year-old patient", " of a patient aged {age}"],
    (False, False): [""],
}

GRAMMAR = {
    "caption": ["{opening}{subject}{finding}."],
    "opening": ["Axial {modality} {scan} of the brain", "Axial {modality} brain {scan}",
                "{modality} {scan} of the brain, axial slice"],
    "scan": ["MRI", "MR image", "MR scan"],
    "glioma": ["glioma", "glial tumor", "brain tumor"],
    "tumor": [" showing a {size} {glioma} in the {side} {lobe} lobe",
              " with a {size} {glioma} of the {side} {lobe} lobe",
              ", {size} {glioma} in the {side} {lobe} lobe"],
    "normal": [" showing no abnormality", " with no tumor", ", normal study"],
}

# Held out of GRAMMAR: no caption starts with "Brain".
EVALUATION_TEMPLATE = "Brain MRI, axial {modality} slice showing a {size} glioma in the {side} {lobe} lobe."
EVALUATION_MODALITY = {"t1": "T1-weighted", "t1ce": "contrast-enhanced T1-weighted",
                       "t2": "T2-weighted", "flair": "FLAIR"}
# Held out of GRAMMAR too: no caption starts with "Axial slice"; used for the report's unseen prompts.
SECOND_TEMPLATE = "Axial slice of the brain, {modality} MRI, showing a {size} glioma in the {side} {lobe} lobe."
# Tuning-only sentence shapes: grammar words in orders that neither GRAMMAR nor the report writes (none opens
# with "Brain", "Axial slice" or an opening of GRAMMAR), so tuning can see more than the grammar's shapes.
TUNING_TEMPLATES = (
    "{size} {glioma} in the {side} {lobe} lobe, axial {modality} {scan} of the brain.",
    "MRI of the brain, axial {modality} image with a {size} {glioma} of the {side} {lobe} lobe.",
    "{modality} {scan}, axial, of the brain with a {size} {glioma} in the {side} {lobe} lobe.",
)
TUNING_SEED = 7919  # tuning prompts are grammar samples drawn with this fixed seed
MAX_PHRASINGS = 16  # the most phrasings per combination tuning may use; the report's prompts avoid them all
EVALUATION_SEED = 104729  # and the report's grammar prompts with this one


def item_grammar(attrs, mention_sex, mention_age):
    """GRAMMAR plus the symbols that spell out one item's attributes."""
    g = dict(GRAMMAR, modality=MODALITY_NAMES[attrs["modality"]], subject=SUBJECT[(mention_sex, mention_age)])
    if mention_sex:
        g["person"] = PERSON[attrs["sex"]]
    if mention_age:
        g["age"] = [str(attrs["age"])]
    if attrs["tumor"]:
        g.update(finding=["{tumor}"], size=SIZE_WORDS[attrs["tumor_size"]], side=[attrs["side"]],
                 lobe=[attrs["lobe"]])
    else:
        g["finding"] = ["{normal}"]
    return g


def expand(grammar, symbol, rng):
    """One random expansion of `symbol` (uniform over the options at every step)."""
    options = grammar[symbol]
    text = options[int(rng.integers(len(options)))]
    return re.sub(r"\{(\w+)\}", lambda m: expand(grammar, m.group(1), rng), text)


def expand_all(grammar, symbol):
    """Every expansion of `symbol`, in a fixed order (the caption space `expand` samples from)."""
    for text in grammar[symbol]:
        parts = re.split(r"\{(\w+)\}", text)  # literal, symbol, literal, symbol, ..., literal
        literals, symbols = parts[0::2], parts[1::2]
        for fillers in itertools.product(*(list(expand_all(grammar, s)) for s in symbols)):
            yield "".join(lit + fill for lit, fill in zip(literals, fillers + ("",)))


def capitalize(text):
    return text[:1].upper() + text[1:]


def caption(attrs, rng, p_sex=0.5, p_age=0.5):
    """A random caption of an item; sex and age are named with probabilities p_sex and p_age."""
    mention_sex, mention_age = rng.random(2) < (p_sex, p_age)
    return capitalize(expand(item_grammar(attrs, bool(mention_sex), bool(mention_age)), "caption", rng))


def all_captions(attrs, mention_sex=False, mention_age=False):
    """Every caption the grammar can write for these attributes and mentions."""
    return [capitalize(c) for c in expand_all(item_grammar(attrs, mention_sex, mention_age), "caption")]


def tumor_attributes():
    """Every glioma attribute combination, modality varying fastest, then side, size and lobe."""
    return [{"modality": m, "side": side, "lobe": lobe, "tumor_size": size}
            for lobe, size, side, m in itertools.product(LOBES, SIZES, SIDES, MODALITIES)]


def evaluation_prompts():
    """64 held-out prompts (4 modalities x 2 sides x 4 lobes x 2 sizes), each with its attributes."""
    return [{"prompt": EVALUATION_TEMPLATE.format(modality=EVALUATION_MODALITY[a["modality"]], size=a["tumor_size"],
                                                  side=a["side"], lobe=a["lobe"]), **a}
            for a in tumor_attributes()]


def distinct_captions(attrs, rng, k, p_sex):
    """k different captions of an item, naming no age (sex with probability p_sex), drawn in turn from rng."""
    texts = []
    while len(texts) < k:
        text = caption(attrs, rng, p_sex=p_sex, p_age=0.0)
        if text not in texts:
            texts.append(text)
    return texts


def template_caption(template, attrs, rng):
    """`template` filled in with one item's words (synonyms drawn from rng), naming neither sex nor age."""
    return capitalize(expand({**item_grammar(attrs, False, False), "caption": [template]}, "caption", rng))


def tuning_prompts(phrasings=1, templates=0):
    """64 x (`phrasings` + `templates`) captions without sex or age, with their attributes: for each glioma
    attribute combination, that many different grammar phrasings, then one caption in each of the first
    `templates` of `TUNING_TEMPLATES`."""
    prompts = []
    for k, a in enumerate(tumor_attributes()):
        rng = np.random.Generator(np.random.PCG64([TUNING_SEED, k]))
        texts = distinct_captions({**a, "tumor": True}, rng, phrasings, 0.0)
        texts += [template_caption(t, {**a, "tumor": True}, rng) for t in TUNING_TEMPLATES[:templates]]
        prompts += [{"prompt": text, **a} for text in texts]
    return prompts


def named_sex_tuning_prompts(phrasings=1):
    """{sex: 64 x `phrasings` grammar captions naming that sex and no age (that many phrasings of each glioma
    attribute combination)}, each a dict with its attributes and "sex"."""
    prompts = {}
    for s, sex in enumerate(("male", "female")):
        prompts[sex] = []
        for k, a in enumerate(tumor_attributes()):
            rng = np.random.Generator(np.random.PCG64([TUNING_SEED, k, 1 + s]))
            texts = distinct_captions({**a, "tumor": True, "sex": sex}, rng, phrasings, 1.0)
            prompts[sex] += [{"prompt": text, "sex": sex, **a} for text in texts]
    return prompts


def sampled_attributes(rng, k, tumor=True):
    """Random attributes of a report prompt; modality cycles with k, so every modality has its share."""
    a = {"modality": MODALITIES[k % len(MODALITIES)], "tumor": tumor, "age": int(rng.integers(20, 86))}
    if tumor:
        a.update(side=str(rng.choice(SIDES)), lobe=str(rng.choice(LOBES)), tumor_size=str(rng.choice(SIZES)))
    else:
        a.update(side="none", lobe="none", tumor_size="none")
    return a


def named_sex_evaluation_prompts(per_sex=32):
    """{sex: `per_sex` grammar captions naming that sex (and the age half the time), random gliomas, none of
    them a tuning prompt at any number of phrasings}."""
    tuning = {p["prompt"] for prompts in named_sex_tuning_prompts(MAX_PHRASINGS).values() for p in prompts}
    prompts = {}
    for s, sex in enumerate(("male", "female")):
        prompts[sex], k = [], 0
        while len(prompts[sex]) < per_sex:
            rng = np.random.Generator(np.random.PCG64([EVALUATION_SEED, k, 1 + s]))
            a = {**sampled_attributes(rng, len(prompts[sex])), "sex": sex}
            text = caption(a, rng, p_sex=1.0, p_age=0.5)
            if text not in tuning:
                prompts[sex].append({"prompt": text, **a})
            k += 1
    return prompts


def unseen_prompts(per_kind=32):
    """{kind: `per_kind` prompts naming no sex} of three kinds that tuning never sees: "normal" (grammar
    captions of studies without a tumour), "age" (grammar captions of gliomas that name the age) and
    "template" (gliomas in `SECOND_TEMPLATE`)."""
    prompts = {"normal": [], "age": [], "template": []}
    for kind_index, kind in enumerate(prompts):
        for k in range(per_kind):
            rng = np.random.Generator(np.random.PCG64([EVALUATION_SEED, k, 10 + kind_index]))
            a = sampled_attributes(rng, k, tumor=kind != "normal")
            if kind == "template":
                text = SECOND_TEMPLATE.format(modality=EVALUATION_MODALITY[a["modality"]], size=a["tumor_size"],
                                              side=a["side"], lobe=a["lobe"])
            else:
                text = caption(a, rng, p_sex=0.0, p_age=float(kind == "age"))
            prompts[kind].append({"prompt": text, **a})
    return prompts
