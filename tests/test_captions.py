"""The prompt sets of tuning and of the report: what each names, what it never names, and that the report's
prompts are not tuning prompts. Captions are read back with test_phantom's hand-written parser."""
from collections import Counter

import dataclasses

from minimedi.config import AlignConfig
from minimedi.data.captions import (MAX_PHRASINGS, MODALITIES, TUNING_TEMPLATES, all_captions, evaluation_prompts,
                                    named_sex_evaluation_prompts, named_sex_tuning_prompts, tuning_prompts,
                                    unseen_prompts)
from tests.test_phantom import parse, words

SEX_WORDS = {"man", "woman", "male", "female"}


def combination(p):
    return p["modality"], p["side"], p["lobe"], p["tumor_size"]


def test_tuning_prompts_are_distinct_phrasings_of_every_combination():
    one, eight = tuning_prompts(), tuning_prompts(8)
    assert len(one) == 64 and len({combination(p) for p in one}) == 64
    assert len(eight) == 512 and len({p["prompt"] for p in eight}) == 512
    assert Counter(combination(p) for p in eight) == {combination(p): 8 for p in one}
    assert [p["prompt"] for p in eight[::8]] == [p["prompt"] for p in one]  # more phrasings extend the set
    for p in eight:
        parsed = parse(p["prompt"])
        assert not parsed["sexes"] and not parsed["ages"] and parsed["modality"] == p["modality"]
        assert p["prompt"] in all_captions({**p, "tumor": True})
    openings = Counter(p["prompt"].split(" ")[0] for p in eight if p["modality"] == "flair")
    assert len(openings) > 3  # FLAIR's 128 captions mix openings and sequence names


def test_tuning_templates_add_one_caption_a_combination_in_shapes_the_grammar_never_writes():
    one, more = tuning_prompts(), tuning_prompts(1, len(TUNING_TEMPLATES))
    width = 1 + len(TUNING_TEMPLATES)
    assert len(more) == 64 * width and len({p["prompt"] for p in more}) == 64 * width
    assert [p["prompt"] for p in more[::width]] == [p["prompt"] for p in one]  # the grammar's captions come first
    for k, p in enumerate(more):
        parsed = parse(p["prompt"])
        assert not parsed["sexes"] and not parsed["ages"] and parsed["modality"] == p["modality"]
        assert parsed["sides"] == [p["side"]] and parsed["lobes"] == [p["lobe"]]
        assert parsed["sizes"] == [p["tumor_size"]]
        if k % width:
            assert p["prompt"] not in all_captions({**p, "tumor": True})
    shapes = Counter(p["prompt"].split(" ")[0] for p in more[1::width])
    assert len(shapes) > 1  # the first template opens with its size word, drawn per combination


def test_named_sex_tuning_prompts_name_their_sex_and_come_from_the_grammar():
    named = named_sex_tuning_prompts(4)
    neutral = {combination(p) for p in tuning_prompts()}
    for sex, prompts in named.items():
        assert len(prompts) == 256 and len({p["prompt"] for p in prompts}) == 256
        assert Counter(combination(p) for p in prompts) == {c: 4 for c in neutral}
        for p in prompts:
            parsed = parse(p["prompt"])
            assert parsed["sexes"] == [sex] and not parsed["ages"] and p["sex"] == sex
            assert parsed["modality"] == p["modality"] and parsed["sides"] == [p["side"]]
            assert p["prompt"] in all_captions({**p, "tumor": True}, mention_sex=True)


def test_report_prompts_are_never_tuning_prompts():
    phrasings = {f.name: f for f in dataclasses.fields(AlignConfig)}["phrasings"]
    assert phrasings.metadata["le"] == MAX_PHRASINGS  # --align-phrasings cannot reach past what the report avoids
    templates = {f.name: f for f in dataclasses.fields(AlignConfig)}["templates"]
    assert templates.metadata["le"] == len(TUNING_TEMPLATES)
    tuning = {p["prompt"] for p in tuning_prompts(MAX_PHRASINGS, len(TUNING_TEMPLATES))}
    tuning |= {p["prompt"] for prompts in named_sex_tuning_prompts(MAX_PHRASINGS).values() for p in prompts}
    report = [p for p in evaluation_prompts()]
    report += [p for prompts in named_sex_evaluation_prompts().values() for p in prompts]
    report += [p for prompts in unseen_prompts().values() for p in prompts]
    assert tuning.isdisjoint(p["prompt"] for p in report)


def test_named_sex_evaluation_prompts():
    for sex, prompts in named_sex_evaluation_prompts(per_sex=32).items():
        assert len({p["prompt"] for p in prompts}) == 32
        assert Counter(p["modality"] for p in prompts) == {m: 8 for m in MODALITIES}
        for p in prompts:
            parsed = parse(p["prompt"])
            assert parsed["sexes"] == [sex] and parsed["modality"] == p["modality"]
            assert parsed["ages"] in ([], [p["age"]])
        assert 0 < sum(bool(parse(p["prompt"])["ages"]) for p in prompts) < 32  # the age, half the time


def test_unseen_prompts_name_no_sex_and_differ_from_tuning_in_their_kind():
    prompts = unseen_prompts(per_kind=32)
    grammar_vocabulary = set()
    for p in tuning_prompts():
        grammar_vocabulary.update(words(p["prompt"]))
    for kind, ps in prompts.items():
        assert len(ps) == 32 and Counter(p["modality"] for p in ps) == {m: 8 for m in MODALITIES}
        for p in ps:
            parsed = parse(p["prompt"])
            assert not SEX_WORDS & set(words(p["prompt"])) and parsed["modality"] == p["modality"]
            if kind == "normal":
                assert not p["tumor"] and not parsed["sides"] and not parsed["lobes"] and not parsed["ages"]
            elif kind == "age":
                assert parsed["ages"] == [p["age"]] and parsed["lobes"] == [p["lobe"]]
            else:  # the second template: grammar words in an order the grammar never writes
                assert not parsed["ages"] and parsed["sides"] == [p["side"]] and parsed["lobes"] == [p["lobe"]]
                assert p["prompt"] not in all_captions({**p, "sex": "male"}) and set(words(p["prompt"])) <= grammar_vocabulary
