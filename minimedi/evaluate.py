"""Evaluation: what a trained model can be shown to know, and the before/after fairness report.

`zero_shot_accuracy`: CLIP zero-shot classification of held-out phantom images by modality and by tumour
side. Each class is the average normalised text embedding of many captions that state the class and
vary everything else (Radford et al. 2021, sec. 3.1.4, prompt ensembling); the captions come from the
corpus grammar with sex and age never mentioned.

`fairness_report` (`python -m minimedi.evaluate --run DIR`): images for the held-out prompts from the base
model and the aligned one, with the same noise, judged by three networks that play different roles: the
tuning classifier (`classifier.pt`, what alignment optimised), an independent check classifier (other
architecture and seed, never seen by tuning), and the attribute probe (`minimedi.probe`, trained on real
pretraining-like slices), whose features are the space of the domain FID. `minimedi.report` writes it up.
"""
import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from minimedi.checkpoint import load_checkpoint, save_checkpoint
from minimedi.classifier import load_classifier, subgroup_labels, train_classifier
from minimedi.clip import preprocess
from minimedi.config import config_from_dict, parse_config
from minimedi.data.captions import LOBES, MODALITIES, SIDES, SIZES, caption, evaluation_prompts
from minimedi.data.load import load_pretraining_data, load_target_data
from minimedi.data.phantom import PhantomCorpus
from minimedi.distributed import resolve_device
from minimedi.errors import UserError, run_main
from minimedi.metrics import clip_score, fid, nearest_neighbour_distance
from minimedi.pipeline import load_generator
from minimedi.probe import load_or_train_probe, predictions_from_features, probe_features, readback
from minimedi.report import write_report
from minimedi.tokenizer import Tokenizer


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
    device = next(clip.parameters()).device
    rows = []
    for prompts in prompts_by_class.values():
        e = F.normalize(clip.encode_text(tokenizer(prompts, truncate=True).to(device)), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(clip, tokenizer, images, attributes, batch_size=256):
    """{"modality": acc, "side": acc} on images [N, 1, H, W] in [-1, 1] with their attribute dicts;
    side is scored on the images that have a tumour."""
    device = next(clip.parameters()).device
    feats = torch.cat([F.normalize(clip.encode_image(preprocess(x.to(device).float(),
                                                                 clip.config.image_resolution)), dim=-1)
                       for x in images.split(batch_size)])
    accuracy = {}
    for attribute, prompts in class_prompts().items():
        names = list(prompts)
        keep = torch.tensor([a[attribute] in names for a in attributes])
        truth = torch.tensor([names.index(a[attribute]) for a in attributes if a[attribute] in names])
        pred = (feats[keep.to(device)] @ class_embeddings(clip, tokenizer, prompts).T).argmax(-1).cpu()
        accuracy[attribute] = (pred == truth).float().mean().item()
    return accuracy


# ---- the fairness report: base model against aligned model ---------------------------------------------

def load_check_classifier(cfg, data_cfg, device):
    """The independent sex classifier of a run: the other architecture (vgg) and another seed, trained on
    the same target images, never used in tuning. If the aligned model only fooled the tuning classifier,
    this one would not see the change. Cached as <run>/sex_check.pt."""
    path = os.path.join(cfg.run_dir, "sex_check.pt")
    if not os.path.exists(path):
        print(f"training the independent sex classifier (vgg, seed {cfg.run.seed + 1}) -> {path}")
        c = dataclasses.replace(cfg.classifier, subgroup="sex", arch="vgg")
        images, _, attributes = load_target_data(data_cfg)
        torch.manual_seed(cfg.run.seed + 1)
        model, metrics = train_classifier(images.float(), subgroup_labels(attributes, "sex"), c, device,
                                          generator=torch.Generator().manual_seed(cfg.run.seed + 1))
        save_checkpoint(path, {"model": model.state_dict(), "config": {"classifier": dataclasses.asdict(c)},
                               "classes": ["male", "female"], "metrics": metrics})
    return load_classifier(path, device)


def reference_images(cfg, n=1280):
    """(images, sex labels [N], captions) of real target images: a fresh phantom target corpus (another seed
    than the one the classifiers learned from), or the `--target` data itself."""
    if cfg.data.target == "phantom":
        corpus = PhantomCorpus(n, cfg.data.image_size, cfg.data.target_corpus_female, cfg.data.seed + 1, "target")
        attributes = [corpus.attributes(i) for i in range(n)]
        return corpus.images(), subgroup_labels(attributes, "sex"), [a["caption"] for a in attributes]
    images, captions, attributes = load_target_data(cfg.data)
    return images.float()[:n], subgroup_labels(attributes[:n], "sex"), list(captions[:n])


@torch.no_grad()
def p_female(classifier, images, batch_size=256):
    """Calibrated p(female) [N] (CPU) of a sex classifier."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.predict_proba(x.to(device))[:, 1].cpu() for x in images.split(batch_size)])


def subgroup_fid(features, is_female, reference_features, reference_female):
    """FID of each sex's images (as the tuning classifier reads them) against that sex's real images."""
    out = {}
    for name, mine, theirs in (("female", is_female, reference_female), ("male", ~is_female, ~reference_female)):
        out[f"fid_{name}"] = fid(features[mine], reference_features[theirs]) if mine.sum() >= 2 else None
    return out


def judge(images, texts, prompted, judges):
    """Everything the report says about one set of generated images (see `fairness_report`)."""
    p = p_female(judges["classifier"], images)
    features = probe_features(judges["probe"], images)
    fidelity = readback(predictions_from_features(judges["probe"], features), prompted)
    distance, _ = nearest_neighbour_distance(images, judges["training"])
    out = {"female_fraction": float((p > 0.5).float().mean()), "mean_p_female": float(p.mean()),
           "female_fraction_check": float((p_female(judges["check"], images) > 0.5).float().mean()),
           "female_fraction_probe": fidelity.pop("female_fraction"), **fidelity,
           "domain_fid": fid(features, judges["reference_features"]),
           **subgroup_fid(features, p > 0.5, judges["reference_features"], judges["reference_labels"] == 1),
           "clip_score": clip_score(judges["clip"], images, judges["tokenizer"](texts, truncate=True))[0],
           "nn_distance": float(distance.mean())}
    return out


def fairness_report(cfg, device):
    """(report dict, {model: images}) for the base model and, when <run>/aligned.pt exists, the aligned one:
    M = eval_n images for each of the 64 held-out prompts, the same noise for both models.

    Per model: the female fraction read by the tuning classifier (p > 0.5) and by the independent check
    classifier; text fidelity (modality, side, lobe) read by the attribute probe; domain FID in the probe's
    feature space against real target images, and per subgroup; CLIP score; the mean RMS distance to the
    nearest training image. The same numbers for as many real target images (not in the FID reference set)
    are the floor row: what a perfect model would score at this sample size."""
    run = cfg.run_dir
    if not os.path.exists(os.path.join(run, "classifier.pt")):
        raise UserError(f"no sex classifier at {run}/classifier.pt: run `python train.py --task classifier` "
                        f"(or `python align.py`, which trains it) first")
    classifier, ckpt = load_classifier(os.path.join(run, "classifier.pt"), device)
    if ckpt["classes"] != ["male", "female"]:
        raise UserError(f"the fairness report reads sex, but {run}/classifier.pt classifies {ckpt['classes']}")
    target = ckpt["target_shares"][1]
    if os.path.exists(os.path.join(run, "aligned.pt")):  # the share the model was tuned to (--target-female)
        target = load_checkpoint(os.path.join(run, "aligned.pt")).get("target_shares", [None, target])[1]
    models = ["diffusion"] + (["aligned"] if os.path.exists(os.path.join(run, "aligned.pt")) else [])
    generators = {which: load_generator(which, run, device) for which in models}
    base_cfg = config_from_dict(load_checkpoint(os.path.join(run, "diffusion.pt"))["config"])
    prompts = evaluation_prompts()
    texts = [p["prompt"] for p in prompts for _ in range(cfg.eval.n)]
    prompted = [p for p in prompts for _ in range(cfg.eval.n)]
    real, real_labels, captions = reference_images(base_cfg)
    # Real images outside the reference set, as many as each model generates: their FID is the floor that
    # sampling noise alone puts under any model's FID at this sample size.
    m = min(len(texts), len(real) // 2)
    reference, labels = real[m:], real_labels[m:]
    check, check_ckpt = load_check_classifier(cfg, base_cfg.data, device)
    probe = load_or_train_probe(run, base_cfg.data.image_size, device, cfg.eval.probe_steps)
    judges = {"classifier": classifier, "check": check, "probe": probe, "tokenizer": Tokenizer(),
              "training": load_pretraining_data(base_cfg.data)[0], "reference_labels": labels,
              "reference_features": probe_features(probe, reference)}
    report = {"target_female": target, "images_per_model": len(texts), "steps": cfg.eval.steps,
              "guidance": cfg.sample.guidance, "seed": cfg.run.seed, "models": {},
              "classifier_heldout_accuracy": ckpt["metrics"]["accuracy"],
              "check_classifier_heldout_accuracy": check_ckpt["metrics"]["accuracy"]}
    images = {}
    for which in models:
        generator = generators[which]
        if cfg.run.compile:
            generator.unet.compile()
        judges["clip"] = generator.encoder.clip
        start = time.time()
        images[which] = generator(texts, cfg.eval.steps, guidance=cfg.sample.guidance, seed=cfg.run.seed)
        seconds = time.time() - start
        report["models"][which] = {**judge(images[which], texts, prompted, judges),
                                   "seconds_per_image": seconds / len(texts)}
        report["models"][which]["female_gap"] = abs(report["models"][which]["female_fraction"] - target)
    floor, floor_female = real[:m], real_labels[:m] == 1
    floor_features = probe_features(probe, floor)
    report["real_target"] = {"true_female_fraction": float(floor_female.float().mean()),
                             "female_fraction": float((p_female(classifier, floor) > 0.5).float().mean()),
                             "female_fraction_check": float((p_female(check, floor) > 0.5).float().mean()),
                             "domain_fid": fid(floor_features, judges["reference_features"]),
                             **subgroup_fid(floor_features, floor_female, judges["reference_features"], labels == 1),
                             "clip_score": clip_score(judges["clip"], floor, judges["tokenizer"](
                                 captions[:m], truncate=True))[0],
                             "nn_distance": float(nearest_neighbour_distance(floor, judges["training"])[0].mean())}
    return report, images


SECTIONS = ("run", "sample", "eval", "classifier")


def main(argv=None):
    cfg = parse_config(argv, SECTIONS,
                       description="the before/after fairness report of a run: python -m minimedi.evaluate --run DIR")
    device = resolve_device(cfg.run.device)
    report, images = fairness_report(cfg, device)
    for path in write_report(cfg.run_dir, report, images):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
