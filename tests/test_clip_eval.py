"""CLIP evaluation: retrieval recall against a brute-force reference, duplicates and truncation, and
zero-shot accuracy that scores only the attributes a corpus has."""
import torch
import torch.nn.functional as F

from minimedi.clip import CLIP, CLIPConfig
from minimedi.clip_eval import (
    class_embeddings, class_prompts, encode_pairs, evaluate_clip, retrieval_recall, summary, zero_shot_accuracy)
from minimedi.data.phantom import PhantomCorpus
from minimedi.tokenizer import Tokenizer
from tests.trees import LONG_TAIL

SEX_WORDS = ("man", "woman", "male", "female")


def tiny_clip(resolution=16):
    torch.manual_seed(0)
    config = CLIPConfig(embed_dim=16, text_width=64, text_heads=2, text_layers=1, image_resolution=resolution,
                        vision_width=64, vision_heads=2, vision_layers=1, patch_size=8)
    return CLIP(config).eval()


def reference_recall(scores, caption_index, k):
    """Brute force: sort every row (column) and find the partner (the first partner) in the order."""
    n, m = scores.shape
    i2t = []
    for i in range(n):
        order = sorted(range(m), key=lambda j: -float(scores[i, j]))
        i2t.append(order.index(int(caption_index[i])) < k)
    t2i = []
    for j in range(m):
        order = sorted(range(n), key=lambda i: -float(scores[i, j]))
        first = next(position for position, i in enumerate(order) if caption_index[i] == j)
        t2i.append(first < k)
    return sum(i2t) / n, sum(t2i) / m


def test_recall_matches_brute_force_with_duplicate_captions():
    g = torch.Generator().manual_seed(0)
    n, m = 60, 45                                        # 15 captions describe two images each
    caption_index = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=g)])
    text = F.normalize(torch.randn(m, 8, generator=g), dim=-1)
    image = F.normalize(text[caption_index] + 0.9 * torch.randn(n, 8, generator=g), dim=-1)
    got = retrieval_recall(image, text, caption_index)
    assert got["retrieval_pairs"] == n and got["retrieval_captions"] == m
    for k in (1, 5, 10):
        i2t, t2i = reference_recall(image @ text.T, caption_index, k)
        assert abs(got[f"i2t_recall@{k}"] - i2t) < 1e-9 and abs(got[f"t2i_recall@{k}"] - t2i) < 1e-9
    assert 0.1 < got["i2t_recall@1"] < got["i2t_recall@5"] < got["i2t_recall@10"] < 1  # neither trivial nor chance


def test_recall_of_a_perfect_and_of_an_uninformed_model():
    g = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(200, 32, generator=g), dim=-1)
    perfect = retrieval_recall(features, features, torch.arange(200))
    assert all(perfect[f"{d}_recall@{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    shuffled = retrieval_recall(features, features, torch.randperm(200, generator=g))
    for k in (1, 5, 10):  # chance is k / 200
        assert shuffled[f"i2t_recall@{k}"] < 3 * k / 200 + 0.02 and shuffled[f"t2i_recall@{k}"] < 3 * k / 200 + 0.02


def test_hand_example():
    # images 0 and 1 both show caption 0; image 2 shows caption 1
    scores_image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    got = retrieval_recall(scores_image, torch.eye(2), torch.tensor([0, 0, 1]), ks=(1,))
    # image -> text: image 0 right, image 1 ranks caption 1 first (wrong), image 2 right
    # text -> image: caption 0's best partner (image 0) is first; caption 1's partner ties with image 1: a tie
    # is no defeat
    assert got["i2t_recall@1"] == 2 / 3 and got["t2i_recall@1"] == 1.0


def test_encode_pairs_counts_identical_and_truncated_captions_once():
    clip, tokenizer = tiny_clip(), Tokenizer()
    words = " ".join(["glioma"] * 90)
    captions = ["Axial CT of the chest.", "Axial CT of the chest.", "A brain MRI.",
                words + " in the left lobe.", words + " in the right lobe.",   # the same first 77 tokens
                "A brain MRI." + LONG_TAIL]
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    image_features, text_features, index = encode_pairs(clip, tokenizer, images, captions)
    assert image_features.shape == (6, 16) and text_features.shape == (4, 16)
    assert index[0] == index[1] and index[3] == index[4] and len(set(index.tolist())) == 4
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(6))
    with torch.no_grad():  # each distinct caption's feature is that caption's own embedding
        alone = F.normalize(clip.encode_text(tokenizer(captions[2:3])), dim=-1)
    torch.testing.assert_close(text_features[index[2]], alone[0], atol=1e-5, rtol=0)


def test_zero_shot_prompts_state_their_class_and_never_sex():
    prompts = class_prompts(per_class=16)
    for attribute, by_class in prompts.items():
        for name, texts in by_class.items():
            assert len(texts) == 16
            for text in texts:
                words = text.lower().replace(",", " ").replace(".", " ").split()
                assert not any(w in SEX_WORDS for w in words), text
                if attribute == "side":
                    assert name in words and "left right".replace(name, "").strip() not in words
    assert set(prompts["modality"]) == {"t1", "t1ce", "t2", "flair"}


def test_zero_shot_scores_the_attributes_present_and_reads_the_class_embeddings():
    clip, tokenizer = tiny_clip(), Tokenizer()
    corpus = PhantomCorpus(40, 16, 0.5, seed=0)
    attributes = [corpus.attributes(i) for i in range(40)]
    classes = {a: class_embeddings(clip, tokenizer, p) for a, p in class_prompts().items()}
    # Images whose features are exactly their modality's class embedding: modality is read perfectly.
    names = list(class_prompts()["modality"])
    oracle = torch.stack([classes["modality"][names.index(a["modality"])] for a in attributes])
    accuracy = zero_shot_accuracy(clip, tokenizer, oracle, attributes)
    assert set(accuracy) == {"modality", "side"} and accuracy["modality"] == 1.0
    wrong = torch.stack([classes["modality"][(names.index(a["modality"]) + 1) % 4] for a in attributes])
    assert zero_shot_accuracy(clip, tokenizer, wrong, attributes)["modality"] == 0.0
    # ROCO items carry no attributes, BraTS items a modality but no side: nothing missing is scored.
    features = torch.randn(3, 16)
    assert zero_shot_accuracy(clip, tokenizer, features, [{}, {}, {}]) == {}
    assert set(zero_shot_accuracy(clip, tokenizer, features, [{"modality": "flair"}] * 3)) == {"modality"}
    no_tumour = [{"modality": "t1", "side": "none"}] * 3
    assert set(zero_shot_accuracy(clip, tokenizer, features, no_tumour)) == {"modality"}


def test_evaluate_clip_on_captions_without_attributes():
    clip, tokenizer = tiny_clip(), Tokenizer()
    images = torch.rand(12, 1, 16, 16) * 2 - 1
    captions = [f"Radiograph number {i}." + (LONG_TAIL if i % 3 == 0 else "") for i in range(12)]
    metrics = evaluate_clip(clip, tokenizer, images, captions, [{} for _ in captions])
    assert set(metrics) == {"retrieval_pairs", "retrieval_captions",
                            *(f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))}
    assert metrics["retrieval_pairs"] == 12 and metrics["retrieval_captions"] == 12
    assert all(0 <= v <= 1 for key, v in metrics.items() if "recall" in key)
    assert metrics["i2t_recall@10"] >= metrics["i2t_recall@5"] >= metrics["i2t_recall@1"]


def test_summary_is_one_line_with_every_number():
    metrics = {"retrieval_pairs": 100, "retrieval_captions": 98, "i2t_recall@1": 0.1, "i2t_recall@5": 0.25,
               "i2t_recall@10": 0.5, "t2i_recall@1": 0.125, "t2i_recall@5": 0.3, "t2i_recall@10": 0.55}
    assert summary(metrics) == ("held-out retrieval on 100 pairs, recall@1/5/10: image->text 10.0% / 25.0% / "
                                "50.0%; text->image 12.5% / 30.0% / 55.0%")
    assert summary({**metrics, "zero_shot_modality": 0.75}).endswith("; zero-shot modality 75.0%")
