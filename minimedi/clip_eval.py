"""What a CLIP model can be shown to know, on image/caption pairs it never trained on.

Retrieval recall (the standard CLIP metric; Radford et al. 2021, sec. 3.1.4 and table 13): embed the
held-out images and their captions, and for every image rank all the captions by cosine similarity
(image -> text), and for every caption rank all the images (text -> image). Recall@k is the share of
queries whose true partner is among the k best. With N pairs, chance is about k / N, so the size of the
pool is reported with the recalls: recall@1 on 1,000 pairs and on 100 are different numbers.

Duplicates. Identical captions ("Axial CT of the chest.") are common in radiology corpora and can never
be told apart, so captions are compared as the token ids the model reads (after truncation to the
context), each distinct caption is one candidate, and an image's partner is its caption. A caption
query is answered by any of the images it describes: its rank is the number of other images scored
above the best of them. Ties count in the query's favour (a score must be strictly higher to outrank).

Zero-shot accuracy, for data that carries the attributes: classify held-out phantom images by modality
and by tumour side. Each class is the average normalised text embedding of many captions that state the
class and vary everything else (Radford et al. 2021, sec. 3.1.4, prompt ensembling); the captions come
from the corpus grammar with sex and age never mentioned. An attribute is scored on the images whose
value is one of its classes (side: images with a tumour), and left out when no image has one, so real
corpora without these attributes (ROCO) get retrieval alone.
"""
import numpy as np
import torch
import torch.nn.functional as F

from minimedi.clip import preprocess
from minimedi.data.captions import LOBES, MODALITIES, SIDES, SIZES, caption

RECALL_AT = (1, 5, 10)


# ---- retrieval ------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_pairs(clip, tokenizer, images, captions, batch_size=256):
    """(normalised image features [N, E], normalised text features of the distinct captions [M, E],
    the index of each image's caption among them [N]) for images [N, 1, H, W] in [-1, 1]."""
    device = next(clip.parameters()).device
    tokens, _ = tokenizer.tokenize_corpus(captions, clip.config.context_length)
    distinct, caption_index = torch.unique(tokens, dim=0, return_inverse=True)
    image_features = torch.cat([
        F.normalize(clip.encode_image(preprocess(x.to(device).float(), clip.config.image_resolution)), dim=-1)
        for x in images.split(batch_size)])
    text_features = torch.cat([F.normalize(clip.encode_text(t.to(device)), dim=-1)
                               for t in distinct.split(batch_size)])
    return image_features.float().cpu(), text_features.float().cpu(), caption_index


def retrieval_recall(image_features, text_features, caption_index, ks=RECALL_AT):
    """{"i2t_recall@k", "t2i_recall@k" for k in ks, "retrieval_pairs": N, "retrieval_captions": M} from
    normalised features (see the top for the ranks and the duplicates)."""
    scores = image_features @ text_features.T                                   # [N images, M captions]
    n, m = scores.shape
    truth = scores[torch.arange(n), caption_index]
    image_rank = (scores > truth[:, None]).sum(1)                               # captions above the partner
    partner = caption_index[:, None] == torch.arange(m)[None]                   # [N, M]: image i shows caption j
    best = scores.masked_fill(~partner, -torch.inf).max(0).values               # each caption's best partner
    caption_rank = ((scores > best[None]) & ~partner).sum(0)                    # other images above it
    out = {"retrieval_pairs": n, "retrieval_captions": m}
    for k in ks:
        out[f"i2t_recall@{k}"] = float((image_rank < k).double().mean())
        out[f"t2i_recall@{k}"] = float((caption_rank < k).double().mean())
    return out


# ---- zero-shot classification ---------------------------------------------------------------------------

def class_prompts(per_class=64, seed=0):
    """{attribute: {class: [prompts]}}: `per_class` grammar captions per class, other attributes random."""
    rng = np.random.Generator(np.random.PCG64(seed))

    def random_attributes(tumor=None):
        tumor = bool(rng.random() < 0.5) if tumor is None else tumor
        a = {"modality": str(rng.choice(MODALITIES)), "tumor": tumor}
        if tumor:
            a.update(side=str(rng.choice(SIDES)), lobe=str(rng.choice(LOBES)), tumor_size=str(rng.choice(SIZES)))
        return a

    def prompts(fixed, tumor=None):
        return [caption({**random_attributes(tumor), **fixed}, rng, p_sex=0.0, p_age=0.0) for _ in range(per_class)]

    return {"modality": {m: prompts({"modality": m}) for m in MODALITIES},
            "side": {s: prompts({"side": s}, tumor=True) for s in SIDES}}


@torch.no_grad()
def class_embeddings(clip, tokenizer, prompts_by_class):
    """[K, E]: per class, the normalised mean of its prompts' normalised text embeddings."""
    device = next(clip.parameters()).device
    rows = []
    for prompts in prompts_by_class.values():
        e = F.normalize(clip.encode_text(tokenizer(prompts, truncate=True).to(device)), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(clip, tokenizer, image_features, attributes):
    """{attribute: accuracy} for the attributes of `class_prompts` that some image has (see the top), from
    normalised image features [N, E] and the images' attribute dicts."""
    accuracy = {}
    for attribute, prompts in class_prompts().items():
        names = list(prompts)
        keep = [i for i, a in enumerate(attributes) if a.get(attribute) in names]
        if not keep:
            continue
        truth = torch.tensor([names.index(attributes[i][attribute]) for i in keep])
        classes = class_embeddings(clip, tokenizer, prompts).float().cpu()
        predicted = (image_features[keep] @ classes.T).argmax(-1)
        accuracy[attribute] = float((predicted == truth).float().mean())
    return accuracy


def evaluate_clip(clip, tokenizer, images, captions, attributes, batch_size=256):
    """Everything above on held-out pairs: retrieval recall both ways, and `zero_shot_<attribute>` for the
    attributes present. A flat dict of numbers, for log.jsonl and the checkpoint."""
    image_features, text_features, caption_index = encode_pairs(clip, tokenizer, images, captions, batch_size)
    zero_shot = zero_shot_accuracy(clip, tokenizer, image_features, attributes)
    return {**retrieval_recall(image_features, text_features, caption_index),
            **{f"zero_shot_{k}": v for k, v in zero_shot.items()}}


def summary(metrics):
    """`evaluate_clip`'s numbers as the one line a training run prints."""
    line = f"held-out retrieval on {metrics['retrieval_pairs']} pairs, recall@1/5/10: " + "; ".join(
        f"{name} " + " / ".join(f"{metrics[f'{key}_recall@{k}']:.1%}" for k in RECALL_AT)
        for key, name in (("i2t", "image->text"), ("t2i", "text->image")))
    zero_shot = [f"{key.removeprefix('zero_shot_')} {value:.1%}" for key, value in metrics.items()
                 if key.startswith("zero_shot_")]
    return line + (f"; zero-shot {', '.join(zero_shot)}" if zero_shot else "")
