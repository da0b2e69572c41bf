"""The before/after fairness report: `python -m minimedi.evaluate --run DIR` (align.py writes it when done).

`fairness_report` draws images from the base model and the aligned one, with the same noise, for three
prompt sets tuning never saw (`report_prompts`): the 64 held-out prompts, prompts that name sex, and unseen
kinds of prompts. Readers with different roles judge them:

- the tuning classifier (`classifier.pt`, what alignment optimised);
- an independent check classifier (`sex_check.pt`: the other architecture and another seed, trained on the
  same target subjects and never seen by tuning): if alignment only fooled the tuning classifier, the
  check would not see the change;
- a feature network, the space of the FIDs. On the phantom it is the attribute probe (`minimedi.probe`,
  trained on real phantom slices), which also reads modality, side and lobe for text fidelity. On real
  data it is the check classifier, a network trained on the target images themselves: a probe trained on
  the phantom has no meaning for real slices, so its rows are left out of the report, with a note;
- no network at all: the share that fits the images' head sizes as a mix of real women's and men's
  (`minimedi.anatomy_share`), for where the two classifiers disagree.

Real target images that no classifier trained on (`minimedi.data.reference`: a fresh phantom corpus, or
the held-out BraTS subjects) give each classifier's error rates, by which `minimedi.audit` corrects every
share, the head areas the generated anatomy is held against, and the FID reference. `minimedi.report`
writes it all up.
"""
import dataclasses
import os
import time

import numpy as np
import torch

from minimedi.anatomy_share import anatomy_share, components
from minimedi.audit import Readings, Reference, audit
from minimedi.checkpoint import load_checkpoint, save_checkpoint
from minimedi.classifier import calibrated_log_odds, load_classifier, subgroup_labels, train_classifier
from minimedi.config import config_from_dict
from minimedi.data.captions import MODALITIES, evaluation_prompts, named_sex_evaluation_prompts, unseen_prompts
from minimedi.data.load import load_pretraining_corpus, load_target_corpus
from minimedi.data.reference import reference_corpus
from minimedi.distributed import resolve_device
from minimedi.errors import UserError, run_main
from minimedi.flags import parse_config
from minimedi.metrics import clip_score, fid, nearest_neighbour_distance
from minimedi.morphometry import anatomy, head_area
from minimedi.pipeline import load_generator
from minimedi.probe import load_or_train_probe, predictions_from_features, probe_features, readback
from minimedi.report import write_report
from minimedi.shares import error_rates
from minimedi.tokenizer import Tokenizer

SECTIONS = ("run", "sample", "eval", "classifier")
PHANTOM_ONLY = {row: "read by a network trained on phantom slices: no meaning for real images"
                for row in ("modality", "side", "lobe", "female_fraction_probe")}


def load_check_classifier(cfg, target_cfg, heldout, device):
    """The independent sex classifier of a run: the other architecture (vgg) and another seed, trained on
    the target corpus the tuning classifier learned from, holding out the same subjects. Cached as
    <run>/sex_check.pt, with the data and split it learned from."""
    path = os.path.join(cfg.run_dir, "sex_check.pt")
    if not os.path.exists(path):
        print(f"training the independent sex classifier (vgg, seed {cfg.run.seed + 1}) -> {path}")
        c = dataclasses.replace(cfg.classifier, subgroup="sex", arch="vgg", rerendered=0.0)  # real images only
        corpus = load_target_corpus(target_cfg)
        torch.manual_seed(cfg.run.seed + 1)
        model, metrics = train_classifier(corpus.images.float(), subgroup_labels(corpus.attributes, "sex"), c,
                                          device, generator=torch.Generator().manual_seed(cfg.run.seed + 1),
                                          groups=corpus.groups, heldout=heldout or None)
        save_checkpoint(path, {"model": model.state_dict(), "config": {"classifier": dataclasses.asdict(c)},
                               "classes": ["male", "female"], "metrics": metrics, "data": corpus.provenance,
                               "split": {"heldout_groups": metrics["heldout_groups"]}})
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


def p_female(classifier, images):
    """Calibrated p(female) [N] (float32, CPU) of a sex classifier."""
    return torch.sigmoid(calibrated_log_odds(classifier, images)).float()


def subgroup_fid(features, is_female, reference_features, reference_female):
    """FID of each sex's images (as the tuning classifier reads them) against that sex's real images."""
    out = {}
    for name, mine, theirs in (("female", is_female, reference_female), ("male", ~is_female, ~reference_female)):
        enough = mine.sum() >= 2 and theirs.sum() >= 2
        out[f"fid_{name}"] = fid(features[mine], reference_features[theirs]) if enough else None
    return out


def judge(images, texts, prompted, p, p_check, judges):
    """Quality and the raw readings of the held-out images; p, p_check: the two classifiers' p(female)."""
    features = probe_features(judges["features"], images)
    out = {"female_fraction": float((p > 0.5).float().mean()), "mean_p_female": float(p.mean()),
           "female_fraction_check": float((p_check > 0.5).float().mean()),
           "domain_fid": fid(features, judges["reference_features"]),
           **subgroup_fid(features, p > 0.5, judges["reference_features"], judges["reference_female"]),
           "clip_score": clip_score(judges["clip"], images, judges["tokenizer"](texts, truncate=True))[0],
           "nn_distance": float(nearest_neighbour_distance(images, judges["training"])[0].mean())}
    if judges["phantom"]:  # text fidelity: the probe reads what the image shows
        fidelity = readback(predictions_from_features(judges["features"], features), prompted)
        out.update(female_fraction_probe=fidelity.pop("female_fraction"), **fidelity)
    return out


def strata_of(attributes):
    """The strata the classifiers' error rates are estimated in: the MR sequences when the real images
    cover all four, else one stratum (e.g. BraTS slices of one sequence)."""
    return MODALITIES if {a.get("modality") for a in attributes} == set(MODALITIES) else ("all",)


def require_prerequisites(run):
    """One line naming the command to run when the run lacks what the report reads."""
    for name, make in (("classifier.pt", "python train.py --task classifier"), ("diffusion.pt", "python train.py")):
        if not os.path.exists(os.path.join(run, name)):
            raise UserError(f"no {run}/{name}: run `{make} --run {run}` (or `python align.py`, which makes it) first")


def fairness_report(cfg, device):
    """(report dict, {model: held-out images}) for the base model and, when <run>/aligned.pt exists, the
    aligned one, from the same noise: the 64 held-out prompts x eval_n images, the named-sex and the unseen
    prompts x eval_extra_n.

    Per model: the raw female share read by the tuning and the check classifier; everything `minimedi.audit`
    says (corrected shares with intervals, per group, named sex, unseen prompts, anatomy); FID in the
    feature network's space against real target images, and per sex; CLIP score; the mean RMS distance to
    the nearest pretraining image; on the phantom, text fidelity (modality, side, lobe). Half of the real
    reference images, as many as each model's held-out set, give the floor row: what a perfect model
    would score at this sample size."""
    run = cfg.run_dir
    require_prerequisites(run)
    classifier, ckpt = load_classifier(os.path.join(run, "classifier.pt"), device)
    base = load_checkpoint(os.path.join(run, "diffusion.pt"))
    target_cfg, base_cfg = config_from_dict(ckpt["config"]).data, config_from_dict(base["config"]).data
    models = ["diffusion"] + (["aligned"] if os.path.exists(os.path.join(run, "aligned.pt")) else [])
    if ckpt["classes"] != ["male", "female"]:
        raise UserError(f"the fairness report reads sex, but {run}/classifier.pt classifies {ckpt['classes']}")
    target = ckpt["target_shares"][1]
    if "aligned" in models:  # the share the model was tuned to (--target-female)
        target = load_checkpoint(os.path.join(run, "aligned.pt")).get("target_shares", [None, target])[1]
    phantom = target_cfg.target == "phantom"
    heldout_groups = ckpt["split"]["heldout_groups"]
    real = reference_corpus(target_cfg, heldout_groups)
    real_images = real.images.float()
    real_female = torch.tensor([a["sex"] == "female" for a in real.attributes])
    strata = strata_of(real.attributes)
    real_stratum = np.array([strata.index(a["modality"]) if len(strata) > 1 else 0 for a in real.attributes])
    check, check_ckpt = load_check_classifier(cfg, target_cfg, heldout_groups, device)
    readers = {"tuning": classifier, "check": check}
    rates = {r: error_rates((p_female(c, real_images) > 0.5).numpy(), real_female.numpy(), real_stratum, strata)
             for r, c in readers.items()}
    real_head = head_area(real_images).numpy()
    reference = Reference(rates, real_female.numpy(), real_head, real_stratum)

    prompts, counts = report_prompts(cfg.eval.n, cfg.eval.extra_n)
    prompt_of = np.repeat(np.arange(len(prompts)), counts)
    texts = [prompts[i]["prompt"] for i in prompt_of]
    heldout = torch.tensor([prompts[i]["set"] == "heldout" for i in prompt_of])
    stratum = np.array([strata.index(prompts[i]["modality"]) if len(strata) > 1 else 0 for i in prompt_of])
    m = min(int(heldout.sum()), len(real_images) // 2)
    features = load_or_train_probe(run, base_cfg.image_size, device, cfg.eval.probe_steps) if phantom else check
    judges = {"features": features, "phantom": phantom, "tokenizer": Tokenizer(),
              "training": load_pretraining_corpus(base_cfg).images, "reference_female": real_female[m:],
              "reference_features": probe_features(features, real_images[m:])}
    report = {"target_female": target, "images_per_model": int(heldout.sum()), "steps": cfg.eval.steps,
              "guidance": cfg.sample.guidance, "seed": cfg.run.seed, "bootstrap": cfg.eval.bootstrap,
              "images": {s: int(sum(c for p, c in zip(prompts, counts) if p["set"] == s))
                         for s in ("heldout", "named", "unseen")},
              "data": {"pretrain": base["data"], "target": ckpt["data"]},
              "reference": {"images": len(real_images), "subjects": sorted(set(real.groups)) if not phantom else [],
                            "source": "a fresh phantom target corpus (seed + 1)" if phantom else
                            "the subjects the subgroup classifier held out"},
              "feature_network": "attribute probe (trained on real phantom slices)" if phantom else
                                 "check classifier (vgg, trained on the target images of the training subjects)",
              "left_out": {} if phantom else PHANTOM_ONLY,
              "error_rates": {r: rates[r].as_dict() for r in readers}, "models": {},
              "classifier_heldout_accuracy": ckpt["metrics"]["accuracy"],
              "check_classifier_heldout_accuracy": check_ckpt["metrics"]["accuracy"]}
    held_out_images = {}
    for which in models:
        generator = load_generator(which, run, device, truncate=True)
        if cfg.run.compile:
            generator.unet.compile()
        judges.setdefault("clip", generator.encoder.clip)  # the base's: aligned.pt may carry a tuned text encoder
        start = time.time()
        images = generator(texts, cfg.eval.steps, guidance=cfg.sample.guidance, seed=cfg.run.seed)
        seconds = time.time() - start
        p = {r: p_female(c, images) for r, c in readers.items()}
        readings = Readings(prompts, prompt_of, stratum, {r: (v > 0.5).numpy() for r, v in p.items()},
                            head_area(images).numpy())
        held_out_images[which] = images[heldout]
        report["models"][which] = {
            **judge(images[heldout], [t for t, h in zip(texts, heldout) if h],
                    [prompts[i] for i in prompt_of[heldout.numpy()]], p["tuning"][heldout], p["check"][heldout],
                    judges),
            **audit(readings, reference, target, cfg.eval.bootstrap, cfg.run.seed),
            "seconds_per_image": seconds / len(texts)}
    floor, floor_female = real_images[:m], real_female[:m]
    floor_features = probe_features(features, floor)
    report["real_target"] = {"true_female_fraction": float(floor_female.float().mean()),
                             "female_fraction": float((p_female(classifier, floor) > 0.5).float().mean()),
                             "female_fraction_check": float((p_female(check, floor) > 0.5).float().mean()),
                             "domain_fid": fid(floor_features, judges["reference_features"]),
                             **subgroup_fid(floor_features, floor_female, judges["reference_features"],
                                            real_female[m:]),
                             "clip_score": clip_score(judges["clip"], floor, judges["tokenizer"](
                                 real.captions[:m], truncate=True))[0],
                             "nn_distance": float(nearest_neighbour_distance(floor, judges["training"])[0].mean()),
                             "anatomy": {"neutral": anatomy(real_head[:m], real_head[m:])},
                             "female_fraction_anatomy": anatomy_share(real_head[:m], real_stratum[:m], np.arange(m),
                                                                      components(real_head[m:], real_female[m:].numpy(),
                                                                                 real_stratum[m:], 0))["share"]}
    return report, held_out_images


def main(argv=None):
    cfg = parse_config(argv, SECTIONS,
                       description="the before/after fairness report of a run: python -m minimedi.evaluate --run DIR")
    report, images = fairness_report(cfg, resolve_device(cfg.run.device))
    for path in write_report(cfg.run_dir, report, images):
        print(f"wrote {path}")


if __name__ == "__main__":
    run_main(main)
