"""Evaluation: what a trained model can be shown to know, and the before/after fairness report.

`zero_shot_accuracy`: CLIP zero-shot classification of held-out phantom images by modality and by tumour
side. Each class is the average normalised text embedding of many captions that state the class and
vary everything else (Radford et al. 2021, sec. 3.1.4, prompt ensembling); the captions come from the
corpus grammar with sex and age never mentioned.

`fairness_report` (`python -m minimedi.evaluate --run DIR`): images from the base model and the aligned one,
with the same noise, for three prompt sets tuning never saw (`report_prompts`): the 64 held-out prompts,
prompts that name sex, and unseen kinds of prompts. Three networks with different roles judge them: the
tuning classifier (`classifier.pt`, what alignment optimised), an independent check classifier (other
architecture and seed, never seen by tuning), and the attribute probe (`minimedi.probe`, trained on real
pretraining-like slices), whose features are the space of the domain FID. Real target images that no
classifier trained on give each classifier's error rates, by which `minimedi.audit` corrects every share,
and the real head sizes the generated anatomy is held against. `minimedi.report` writes it up.
"""
import dataclasses
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from minimedi import diffusion
from minimedi.checkpoint import load_checkpoint, save_checkpoint
from minimedi.classifier import load_classifier, subgroup_labels, train_classifier
from minimedi.clip import preprocess
from minimedi.config import parse_config
from minimedi.audit import Readings, Reference, audit
from minimedi.data.captions import LOBES, MODALITIES, SIDES, SIZES, caption, evaluation_prompts, \
    named_sex_evaluation_prompts, unseen_prompts
from minimedi.data.load import load_pretraining_data, load_target_data
from minimedi.data.reference import reference_images
from minimedi.errors import UserError, run_main
from minimedi.metrics import clip_score, fid, nearest_neighbour_distance
from minimedi.morphometry import anatomy, head_size
from minimedi.pipeline import load_generator
from minimedi.probe import load_or_train_probe, predictions_from_features, probe_features, readback
from minimedi.report import write_report
from minimedi.shares import error_rates
from minimedi.tokenizer import Tokenizer
from minimedi.training import resolve_device


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


def report_prompts(n_heldout, n_extra):
    """(prompt dicts, images per prompt) of every set the report generates: the 64 held-out prompts
    ("heldout", kind "neutral"), the named-sex prompts ("named", kind = the sex) and the unseen prompts
    ("unseen", kind "normal" / "age" / "template")."""
    prompts = [{**p, "set": "heldout", "kind": "neutral"} for p in evaluation_prompts()]
    counts = [n_heldout] * len(prompts)
    extra = [{**p, "set": "named", "kind": sex} for sex, ps in named_sex_evaluation_prompts().items() for p in ps]
    extra += [{**p, "set": "unseen", "kind": kind} for kind, ps in unseen_prompts().items() for p in ps]
    return prompts + extra, counts + [n_extra] * len(extra)


def generate(unet, encoder, cfg, texts, steps, guidance, seed, device):
    """One image per caption in `texts`, DDIM, the same noise for the same seed."""
    images = []
    g = torch.Generator(device).manual_seed(seed)
    for chunk in [texts[i:i + 128] for i in range(0, len(texts), 128)]:
        states, mask, pooled = encoder.encode(chunk)
        denoise = diffusion.make_denoiser(unet, states, mask, pooled, guidance, cfg.diffusion.prediction,
                                          cfg.diffusion.dynamic_threshold)
        size = cfg.data.image_size
        with torch.inference_mode():
            images.append(diffusion.sample(denoise, (len(chunk), 1, size, size), steps, "ddim",
                                           cfg.diffusion.schedule, generator=g, device=device).cpu())
    return torch.cat(images)


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


def judge(images, texts, prompted, p, p_check, judges):
    """Quality and the raw readings of the held-out images; p, p_check: the two classifiers' p(female)."""
    features = probe_features(judges["probe"], images)
    fidelity = readback(predictions_from_features(judges["probe"], features), prompted)
    distance, _ = nearest_neighbour_distance(images, judges["training"])
    return {"female_fraction": float((p > 0.5).float().mean()), "mean_p_female": float(p.mean()),
            "female_fraction_check": float((p_check > 0.5).float().mean()),
            "female_fraction_probe": fidelity.pop("female_fraction"), **fidelity,
            "domain_fid": fid(features, judges["reference_features"]),
            **subgroup_fid(features, p > 0.5, judges["reference_features"], judges["reference_labels"]),
            "clip_score": clip_score(judges["clip"], images, judges["tokenizer"](texts, truncate=True))[0],
            "nn_distance": float(distance.mean())}


def strata_of(attributes):
    """The strata the classifier's error rates are estimated in: the MR sequences when the real images
    cover all four (the phantom), else one stratum (e.g. BraTS slices of one sequence)."""
    return MODALITIES if {a.get("modality") for a in attributes} == set(MODALITIES) else ("all",)


def fairness_report(cfg, device):
    """(report dict, {model: held-out images}) for the base model and, when <run>/aligned.pt exists, the
    aligned one, from the same noise: the 64 held-out prompts x eval_n images, the named-sex and the unseen
    prompts x eval_extra_n.

    Per model: the raw female share read by the tuning and the independent check classifier; everything
    `minimedi.audit` says (corrected shares with intervals, per group, named sex, unseen prompts, anatomy);
    text fidelity (modality, side, lobe) read by the attribute probe; domain FID in the probe's feature
    space against real target images, and per subgroup; CLIP score; the mean RMS distance to the nearest
    training image. Real target images that no classifier trained on (`reference_images`) give the
    classifiers' error rates, the real head sizes and, for as many images as each model's held-out set,
    the floor row: what a perfect model would score at this sample size."""
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
    generators = {which: load_generator(run, which, device) for which in models}
    base_cfg = generators["diffusion"][2]
    prompts, counts = report_prompts(cfg.eval.n, cfg.eval.extra_n)
    prompt_of = np.repeat(np.arange(len(prompts)), counts)
    texts = [prompts[i]["prompt"] for i in prompt_of]
    heldout = torch.tensor([prompts[i]["set"] == "heldout" for i in prompt_of])
    real, attributes = reference_images(base_cfg.data)
    real_female = torch.tensor([a["sex"] == "female" for a in attributes])
    strata = strata_of(attributes)
    real_stratum = np.array([strata.index(a["modality"]) if len(strata) > 1 else 0 for a in attributes])
    stratum = np.array([strata.index(prompts[i]["modality"]) if len(strata) > 1 else 0 for i in prompt_of])
    check, check_ckpt = load_check_classifier(cfg, base_cfg.data, device)
    readers = {"tuning": classifier, "check": check}
    rates = {r: error_rates((p_female(c, real) > 0.5).numpy(), real_female.numpy(), real_stratum, strata)
             for r, c in readers.items()}
    real_head = head_size(real).numpy()
    reference = Reference(rates, real_female.numpy(), real_head)
    # Real images outside the FID reference set, as many as each model's held-out images: their FID is the
    # floor that sampling noise alone puts under any model's FID at this sample size.
    m = min(int(heldout.sum()), len(real) // 2)
    probe = load_or_train_probe(run, base_cfg.data.image_size, device, cfg.eval.probe_steps)
    judges = {"probe": probe, "tokenizer": Tokenizer(), "training": load_pretraining_data(base_cfg.data)[0],
              "reference_labels": real_female[m:], "reference_features": probe_features(probe, real[m:])}
    report = {"target_female": target, "images_per_model": int(heldout.sum()), "steps": cfg.eval.steps,
              "guidance": cfg.sample.guidance, "seed": cfg.run.seed, "bootstrap": cfg.eval.bootstrap,
              "images": {s: int(sum(c for p, c in zip(prompts, counts) if p["set"] == s))
                         for s in ("heldout", "named", "unseen")},
              "error_rates": {r: rates[r].as_dict() for r in readers}, "models": {},
              "classifier_heldout_accuracy": ckpt["metrics"]["accuracy"],
              "check_classifier_heldout_accuracy": check_ckpt["metrics"]["accuracy"]}
    held_out_images = {}
    for which in models:
        unet, encoder, model_cfg = generators[which]
        if cfg.run.compile:
            unet.compile()
        judges["clip"] = encoder.clip
        start = time.time()
        images = generate(unet, encoder, model_cfg, texts, cfg.eval.steps, cfg.sample.guidance, cfg.run.seed, device)
        seconds = time.time() - start
        p = {r: p_female(c, images) for r, c in readers.items()}
        readings = Readings(prompts, prompt_of, stratum, {r: (v > 0.5).numpy() for r, v in p.items()},
                            head_size(images).numpy())
        held_out_images[which] = images[heldout]
        report["models"][which] = {
            **judge(images[heldout], [t for t, h in zip(texts, heldout) if h],
                    [prompts[i] for i in prompt_of[heldout.numpy()]], p["tuning"][heldout], p["check"][heldout],
                    judges),
            **audit(readings, reference, target, cfg.eval.bootstrap, cfg.run.seed),
            "seconds_per_image": seconds / len(texts)}
    floor, floor_female = real[:m], real_female[:m]
    floor_features = probe_features(probe, floor)
    report["real_target"] = {"true_female_fraction": float(floor_female.float().mean()),
                             "female_fraction": float((p_female(classifier, floor) > 0.5).float().mean()),
                             "female_fraction_check": float((p_female(check, floor) > 0.5).float().mean()),
                             "domain_fid": fid(floor_features, judges["reference_features"]),
                             **subgroup_fid(floor_features, floor_female, judges["reference_features"],
                                            real_female[m:]),
                             "clip_score": clip_score(judges["clip"], floor, judges["tokenizer"](
                                 [a["caption"] for a in attributes[:m]], truncate=True))[0],
                             "nn_distance": float(nearest_neighbour_distance(floor, judges["training"])[0].mean()),
                             "anatomy": {"neutral": anatomy(real_head[:m], real_head[m:])}}
    return report, held_out_images


def main(argv=None):
    cfg = parse_config(argv, ("run", "sample", "eval", "classifier"),
                       description="the before/after fairness report of a run: python -m minimedi.evaluate --run DIR")
    device = resolve_device(cfg.run.device)
    report, images = fairness_report(cfg, device)
    for path in write_report(cfg.run_dir, report, images):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
