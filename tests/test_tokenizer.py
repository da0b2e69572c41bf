"""The CLIP tokenizer against OpenAI's own code on thousands of deterministic, nasty strings.

The references are `clip/simple_tokenizer.py` (loaded by file path) and the real `clip.tokenize`
from `clip/clip.py`, imported with stand-ins for `torchvision` / `pkg_resources` when those are not
installed (`tokenize` needs neither; the package imports them for image preprocessing).
"""
import gzip
import importlib
import importlib.util
import random
import sys
import types
import unicodedata
from unittest import mock

import packaging.version  # noqa: F401  (imported before clip.clip, which reaches it via pkg_resources)
import PIL.Image  # noqa: F401  (real dependencies of clip.clip, imported outside the patched sys.modules)
import pytest
import torch
import tqdm  # noqa: F401

from minimedi.errors import UserError
from minimedi.tokenizer import PIECES, Tokenizer, clean
from tests.helpers import load_module_from_file, openai_clip_file

MODALITIES = ["MRI", "MR", "CT", "PET-CT", "X-ray", "radiograph", "ultrasound", "FLAIR", "DWI", "ADC map"]
SEQUENCES = ["T1-weighted", "T2-weighted", "T1w post-contrast", "T2*", "SWI", "PD-FS", "STIR"]
PLANES = ["axial", "coronal", "sagittal", "oblique", "Axial", "SAGITTAL"]
ANATOMY = ["brain", "left frontal lobe", "right temporal lobe", "cerebellum", "pons", "chest", "liver",
           "lumbar spine (L4-L5)", "knee", "corpus callosum", "basal ganglia"]
FINDINGS = ["glioblastoma", "meningioma", "no acute abnormality", "ring-enhancing lesion",
            "peritumoral oedema", "midline shift", "haemorrhage", "metastases", "low-grade glioma"]
UNITS = ["3.5 mm", "12x12cm", "4 x 3.2 x 2 cm", "1.5T", "3 T", "10 mL", "0.5mm", "25%", "~7mm", "±2 mm",
         "5×5 cm", "120 kVp", "b=1000 s/mm²", "TR/TE 4000/90 ms", "−3.2 °C", "½ cm", "12,345.67", "1e-3"]
APOSTROPHES = ["patient's", "patient’s", "don't", "DON'T", "it‘s", "they're", "we've", "I'm", "we'll",
               "he'd", "O'Brien", "rock 'n' roll", "'quoted'", "“double”", "``latex''", "Hodgkin's",
               "IT'S", "'S", "'ll", "can’t", "'re'", "''"]
ENTITIES = ["&amp;", "&lt;b&gt;", "&amp;lt;", "&amp;amp;amp;", "&#39;", "&#x2019;", "&nbsp;", "&hellip;",
            "&quot;tumour&quot;", "&notanentity;", "&#0;", "&#xD800;", "&#1114112;", "&eacute;", "&amp",
            "&lt;&lt;", "AT&T", "&#128512;", "&frac12;", "&amp;#39;", "&AMP;", "&Amp;"]
MOJIBAKE_SOURCES = ["café", "naïve", "Größe", "“quoted”", "doesn’t", "voilà le travail", "señor",
                    "Ödem", "脑部", "résumé – x", "€100", "Zürich…", "ﬁbrosis", "✔ done", "🙂"]
EMOJI = ["🧠", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸🇯🇵", "1️⃣", "❤️", "👩🏿‍⚕️", "🫀", "😀😃😄", "⚕", "©®™"]
SCRIPTS = ["脑部磁共振成像", "胸部CT平扫", "頭部ＭＲＩ検査", "뇌 자기공명영상", "صورة الرنين المغناطيسي للدماغ",
           "МРТ головного мозга", "मस्तिष्क का एमआरआई", "Μαγνητική τομογραφία", "בדיקת MRI", "ภาพสมอง",
           "Ελληνικά ΣΊΣΥΦΟΣ", "İstanbul ıi", "ǅemal ß ẞ", "ＦＵＬＬＷＩＤＴＨ １２３", "١٢٣ ٤٥٦", "๑๒๓"]
COMBINING = ["e\u0301", "a\u0308\u0323", "n\u0303o", "Z\u0351\u0364\u036b\u0300a\u0315l\u0337go",
             "\u0301leading", "o\u0338", "\u0345", "ı\u0307", "क्षि", "한\u0300"]
SPACES = [" ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2003", "\u3000", "\u200b", "\u2028", "\u2029",
          "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\x0b", "\x0c", "\u180e", "\ufeff", "  \t\n "]
CONTROLS = ["\x00", "\x01", "\x07", "\x08", "\x1b", "\x1b[31mred\x1b[0m", "\x7f", "\x80", "\x81", "\x9d",
            "\u200d", "\u200e", "\u202e", "\ufff9", "\ufffc", "\ufffd", "\ud800", "\udfff", "\U000e0041"]
TRICKY = ["<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "</w>", "a</w>b", "<|", "|>", "&", "<b>",
          "x<y & y>z", "::", "...", "--", "C++", "e-mail@host.org", "https://x.org/a?b=1&c=2", "#42", "$5"]
FRAGMENTS = [MODALITIES, SEQUENCES, PLANES, ANATOMY, FINDINGS, UNITS, APOSTROPHES, ENTITIES, EMOJI,
             SCRIPTS, COMBINING, SPACES, CONTROLS, TRICKY]


def caption(rng):
    """A radiology-style caption, with random casing and punctuation."""
    text = (f"{rng.choice(PLANES)} {rng.choice(SEQUENCES)} {rng.choice(MODALITIES)} of the "
            f"{rng.choice(ANATOMY)} of a {rng.randrange(1, 99)}-year-old {rng.choice(['female', 'male', 'F', 'M'])}"
            f" patient: {rng.choice(FINDINGS)}, {rng.choice(UNITS)}.")
    return rng.choice([str, str.upper, str.lower, str.title])(text)


def mojibake(rng):
    """UTF-8 text decoded with the wrong codec, once or twice."""
    text = rng.choice(MOJIBAKE_SOURCES)
    for _ in range(rng.choice([1, 1, 2])):
        text = text.encode("utf-8").decode(rng.choice(["latin-1", "cp1252", "cp437"]), errors="replace")
    return text


def random_codepoints(rng, n):
    """n code points: mostly from the BMP, some astral, surrogates and unassigned ones included."""
    return "".join(chr(rng.randrange(0x10000) if rng.random() < 0.8 else rng.randrange(0x110000)) for _ in range(n))


def mixture(rng):
    """A few fragments of any kind joined with random separators."""
    parts = [rng.choice(rng.choice(FRAGMENTS)) for _ in range(rng.randrange(1, 8))]
    parts += [caption(rng)] if rng.random() < 0.3 else []
    parts += [mojibake(rng)] if rng.random() < 0.3 else []
    rng.shuffle(parts)
    return "".join(p + rng.choice(["", " ", " ", "\t", "\n", ",", "\u00a0"]) for p in parts)


def make_corpus(seed=0, n=2400):
    """Deterministic test strings: every fragment list on its own, then seeded random kinds of string."""
    rng = random.Random(seed)
    corpus = ["", " ", "\t\n", "\u3000\u00a0 ", "a", "A", "1", "'", "&"]
    corpus += [s for fragments in FRAGMENTS for s in fragments]
    corpus += [unicodedata.normalize(form, s) for form in ("NFD", "NFKC") for s in SCRIPTS + COMBINING]
    kinds = [
        lambda: caption(rng),
        lambda: mixture(rng),
        lambda: mojibake(rng),
        lambda: random_codepoints(rng, rng.randrange(1, 30)),
        lambda: "".join(chr(rng.randrange(0x20, 0x7f)) for _ in range(rng.randrange(1, 60))),  # printable ASCII
        lambda: "".join(chr(rng.randrange(0, 0x80)) for _ in range(rng.randrange(1, 40))),  # any ASCII
        lambda: " ".join(caption(rng) for _ in range(rng.randrange(3, 8))),  # far past 77 tokens
        lambda: rng.choice(SCRIPTS) * rng.randrange(5, 40),  # long runs without spaces
        lambda: rng.choice("ab-.'") * rng.randrange(30, 400),  # one long piece
        lambda: "".join(rng.choice(SPACES) for _ in range(rng.randrange(1, 6))),  # whitespace only
        lambda: " ".join(str(rng.uniform(-1e4, 1e4)) for _ in range(rng.randrange(1, 12))),
    ]
    while len(corpus) < n:
        corpus.append(rng.choice(kinds)())
    return corpus


@pytest.fixture(scope="module")
def reference():
    return load_module_from_file("clip_simple_tokenizer", openai_clip_file("simple_tokenizer.py")).SimpleTokenizer()


@pytest.fixture(scope="module")
def clip_tokenize():
    """The real `clip.tokenize`, imported with stand-ins for missing image-only dependencies.

    sys.modules is restored afterwards, so neither the stand-ins nor `clip` leak into other tests."""
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        transforms = types.ModuleType("torchvision.transforms")
        for name in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize"):
            setattr(transforms, name, None)
        transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
        stubs["torchvision"] = types.ModuleType("torchvision")
        stubs["torchvision"].transforms = transforms
        stubs["torchvision.transforms"] = transforms
    if importlib.util.find_spec("pkg_resources") is None:
        stubs["pkg_resources"] = types.ModuleType("pkg_resources")
        stubs["pkg_resources"].packaging = sys.modules["packaging"]
    with mock.patch.dict(sys.modules, stubs):
        return importlib.import_module("clip.clip").tokenize


@pytest.fixture(scope="module")
def ours():
    return Tokenizer()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


def outcome(fn, *args, **kwargs):
    """fn's result, or the exception class name it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (the point is to compare failures too)
        return type(e).__name__


def test_corpus_is_varied(corpus):
    assert len(corpus) >= 2000 and len(set(corpus)) > 1900
    assert sum(not s.isascii() for s in corpus) > 600 and sum(s.isascii() for s in corpus) > 600
    assert sum(len(s) > 300 for s in corpus) > 100


def test_encode_matches_reference(ours, reference, corpus):
    mismatches = [s for s in corpus if outcome(ours.encode, s) != outcome(reference.encode, s)]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:5]!r}"


def test_decode_matches_reference(ours, reference, corpus):
    for s in corpus:
        ids = reference.encode(s)
        assert ours.decode(ids) == reference.decode(ids), repr(s)
        assert ours.decode(ours.encode(s)) == reference.decode(reference.encode(s)), repr(s)


def test_decode_random_ids_matches_reference(ours, reference):
    """Arbitrary id sequences, which split UTF-8 characters and put special tokens anywhere."""
    rng = random.Random(1)
    for _ in range(500):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(0, 20))]
        assert ours.decode(ids) == reference.decode(ids), ids


def test_round_trip_gives_the_cleaned_pieces(ours, reference, corpus):
    """decode(encode(x)) is the cleaned text's pieces, each followed by a space, wherever that holds
    for the reference."""
    round_trips = 0
    for s in corpus:
        expected = "".join(p + " " for p in PIECES.findall(clean(s)))
        if reference.decode(reference.encode(s)) == expected:
            assert ours.decode(ours.encode(s)) == expected, repr(s)
            round_trips += 1
    assert round_trips > 0.95 * len(corpus)


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenize_matches_clip(ours, clip_tokenize, corpus, context_length):
    truncated = ours(corpus, context_length=context_length, truncate=True)
    assert truncated.dtype == torch.long and truncated.shape == (len(corpus), context_length)
    assert torch.equal(truncated, clip_tokenize(corpus, context_length=context_length, truncate=True).long())
    n_too_long = 0
    for s in corpus:
        expected = outcome(clip_tokenize, s, context_length=context_length)
        if isinstance(expected, str):
            assert expected == "RuntimeError", expected
            with pytest.raises(UserError):
                ours(s, context_length=context_length)
            n_too_long += 1
        else:
            assert torch.equal(ours(s, context_length=context_length), expected.long()), repr(s)
    assert n_too_long > 100
    # Training captions: all cut as clip.tokenize(truncate=True) cuts them, and counted as it refuses them.
    tokens, n_cut = ours.tokenize_corpus(corpus, context_length)
    assert torch.equal(tokens, truncated) and n_cut == n_too_long


def test_single_string_and_empty_batch(ours, clip_tokenize):
    tokens = ours("axial T2-weighted MRI of the brain")
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    assert tokens[0, 0] == 49406 and tokens[0, tokens.argmax()] == 49407 and tokens[0, -1] == 0
    assert torch.equal(tokens, clip_tokenize("axial T2-weighted MRI of the brain").long())
    assert ours([]).shape == (0, 77)
    tokens, n_cut = ours.tokenize_corpus([])
    assert tokens.shape == (0, 77) and n_cut == 0


def test_too_long_error_is_one_clear_line(ours):
    n = len(ours.encode("brain " * 100)) + 2
    with pytest.raises(UserError) as info:
        ours(["short", "brain " * 100])
    message = str(info.value)
    assert "\n" not in message and f"{n} tokens" in message and "77" in message and "truncate" in message


def test_missing_or_corrupt_merges_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt").write_text("not gzip")
    with pytest.raises(UserError, match="cannot read"):
        Tokenizer(tmp_path / "plain.txt")
    with gzip.open(tmp_path / "short.txt.gz", "wt") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(UserError, match="not a CLIP BPE merges file"):
        Tokenizer(tmp_path / "short.txt.gz")
