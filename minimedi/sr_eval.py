"""The cascade's evaluation: `python -m minimedi.sr_eval --run DIR` -> <run>/sr_report.json, sr_report.md and
sr_samples.png (128 px at the default preset).

Quality, on held-out real pairs (`data.pairs.load_heldout_pairs`: images no stage trained on):
  * FID at the final resolution against other held-out real images, in the pooled features of a network
    trained on target images *at that resolution* (the sex classifier below, `SubgroupClassifier`): a
    feature space trained at the base size would not see the detail the SR stage adds;
  * the consistency error ||downsample(x) - x_low|| (RMS per image, box filter): how far the output strays
    from the low-resolution image it was asked to enlarge;
  for the SR stage, for bicubic upsampling (`resize.bicubic_baseline`), and for the real high-resolution
  images (the floor). The same for the whole cascade from text: the base model's samples for held-out
  prompts, bicubic-upsampled and super-resolved, each against the real images.

Fairness through the cascade, for the diffusion and (when the run has it) the aligned base model: a sex
classifier trained on target images at the final resolution (cached as <run>/sex<size>.pt, temperature-
calibrated on held-out subjects) reads the female share of the cascade's images; the base classifier
(the run's classifier.pt when it is a sex classifier, else one trained alike at the base size) reads the
base images of the same samples. Each share comes with its binomial standard error, and the two with a
two-proportion z-test: the SR stage must not move the share beyond sampling error. The two readings are of
the same samples, so McNemar's exact test on the samples whose reading changed is reported beside it (the
paired test, more sensitive than the two-proportion one).

And the anatomy itself, not only what two classifiers say: the head area (`morphometry.head_area`, the
phantom's only sex-linked trait) of each base image and of its cascade output, their mean paired change
beside the real female-male difference at the final size.
"""
import dataclasses
import json
import math
import os

import torch

from minimedi import distributed
from minimedi.atomic import atomic_path
from minimedi.cascade import super_resolve
from minimedi.checkpoint import load_checkpoint, save_checkpoint
from minimedi.classifier import load_classifier, subgroup_labels, train_classifier
from minimedi.config import ClassifierConfig, config_from_dict
from minimedi.data import evaluation_prompts
from minimedi.data.load import load_target_corpus
from minimedi.data.pairs import load_heldout_pairs
from minimedi.errors import UserError, run_main
from minimedi.flags import parse_config
from minimedi.imageio import save_grid
from minimedi.metrics import fid
from minimedi.morphometry import head_area
from minimedi.pipeline import Cascade, load_generator
from minimedi.resize import bicubic_baseline, downsample

SECTIONS = ("run", "sample", "sr_eval")


def sex_classifier(run_dir, load_corpus, size, e, seed, device):
    """A calibrated sex classifier trained on `load_corpus()`, target images at `size` px, with blur
    augmentation, cached as <run>/sex<size>.pt (retrained when its settings change; the corpus is decoded
    only then); returns (model, its held-out metrics)."""
    path = os.path.join(run_dir, f"sex{size}.pt")
    c = ClassifierConfig(subgroup="sex", width=e.feature_width, steps=e.feature_steps, batch=32, blur=e.feature_blur)
    if os.path.exists(path):
        model, ckpt = load_classifier(path, device)
        if ckpt["config"]["classifier"] == dataclasses.asdict(c):
            return model, ckpt["metrics"]
    corpus = load_corpus()
    print(f"training the {size} px sex classifier on {len(corpus.images)} target images -> {path}")
    torch.manual_seed(seed)
    model, metrics = train_classifier(corpus.images.float(), subgroup_labels(corpus.attributes, "sex"), c, device,
                                      generator=torch.Generator().manual_seed(seed), groups=corpus.groups)
    save_checkpoint(path, {"model": model.state_dict(), "config": {"classifier": dataclasses.asdict(c)},
                           "classes": ["male", "female"], "metrics": metrics, "size": size})
    return model.requires_grad_(False), metrics


def target_at(data_cfg, size, n):
    """The first n target images (and labels) at `size` px."""
    return load_target_corpus(dataclasses.replace(data_cfg, image_size=size, n_target=n))


def base_sex_classifier(run_dir, data_cfg, low_size, e, seed, device):
    """The run's classifier.pt when it reads sex, else a sex classifier trained like the final-size one."""
    path = os.path.join(run_dir, "classifier.pt")
    if os.path.exists(path):
        model, ckpt = load_classifier(path, device)
        if ckpt["classes"] == ["male", "female"]:
            return model, ckpt.get("metrics", {})
    return sex_classifier(run_dir, lambda: target_at(data_cfg, low_size, e.features), low_size, e, seed, device)


@torch.no_grad()
def features_and_p_female(classifier, images, batch_size=128):
    """(pooled features [N, 4w], calibrated p(female) [N]) on the CPU."""
    device = next(classifier.parameters()).device
    feats, probs = [], []
    for x in images.split(batch_size):
        f = classifier.features(x.to(device).float())
        feats.append(f.cpu())
        probs.append(torch.softmax(classifier.head(f) / classifier.temperature, -1)[:, 1].cpu())
    return torch.cat(feats), torch.cat(probs)


def consistency(images, low):
    """RMS of downsample(images) - low per image: mean and its standard error."""
    per = (downsample(images.float(), low.shape[-1]) - low.float()).square().flatten(1).mean(1).sqrt()
    return {"mean": per.mean().item(), "se": (per.std() / math.sqrt(len(per))).item()}


def female_share(p_female):
    """The share read as female (p > 1/2) with its binomial standard error, and the mean calibrated p."""
    n, k = len(p_female), int((p_female > 0.5).sum())
    share = k / n
    return {"female": k, "n": n, "share": share, "se": math.sqrt(share * (1 - share) / n),
            "mean_p_female": p_female.mean().item()}


def two_proportion_test(a, b):
    """z and two-sided p-value of H0: the two shares (`female_share` dicts) are equal (pooled variance)."""
    pooled = (a["female"] + b["female"]) / (a["n"] + b["n"])
    se = math.sqrt(pooled * (1 - pooled) * (1 / a["n"] + 1 / b["n"]))
    z = (a["share"] - b["share"]) / se if se > 0 else 0.0
    return {"z": z, "p_value": math.erfc(abs(z) / math.sqrt(2))}


def mcnemar_test(before, after):
    """McNemar's exact test of H0: a change of reading is as likely either way, on the same samples' p(female)
    before and after: the counts of female -> male and male -> female, and the two-sided p-value (binomial
    with p = 1/2 on the changed samples)."""
    was, now = before > 0.5, after > 0.5
    f_to_m, m_to_f = int((was & ~now).sum()), int((~was & now).sum())
    n, k = f_to_m + m_to_f, min(f_to_m, m_to_f)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return {"female_to_male": f_to_m, "male_to_female": m_to_f, "p_value": min(1.0, 2 * tail)}


def head_area_change(low, high, sex_gap):
    """The head area (share of the image) of the base images and of their outputs: means, the mean paired
    change with its standard error, and `sex_gap`, the real male - female difference, for scale."""
    a, b = head_area(low.float()), head_area(high.float())
    change = b - a
    return {"base": a.mean().item(), "final": b.mean().item(), "change": change.mean().item(),
            "change_se": (change.std() / math.sqrt(len(change))).item(), "sex_gap": sex_gap}


def real_sex_gap(corpus):
    """Mean head area of the real male minus the real female target slices of `corpus`."""
    area, female = head_area(corpus.images.float()), subgroup_labels(corpus.attributes, "sex") == 1
    return (area[~female].mean() - area[female].mean()).item()


def quality(images, low, reference_features, classifier):
    return {"fid": fid(features_and_p_female(classifier, images)[0], reference_features),
            "consistency": consistency(images, low)}


def evaluate_pairs(cascade, low, high, reference, captions, classifiers, seed):
    """SR vs bicubic vs the real images on held-out pairs, and the female share each classifier reads on
    them (the control for the cascade's: how far the two classifiers agree on the same real slices);
    returns (metrics, SR outputs)."""
    base_cls, classifier = classifiers
    reference_features = features_and_p_female(classifier, reference)[0]
    states, mask, pooled = cascade.encoder.encode(captions)
    d = cascade.sr_diffusion
    with torch.inference_mode():
        sr = super_resolve(cascade.sr_unet, low.float().to(cascade.device), states, mask, pooled,
                           size=cascade.image_size, aug_level=cascade.sr["aug_level"], steps=cascade.sr["steps"],
                           guidance=cascade.sr["guidance"], prediction=d.prediction, schedule=d.schedule,
                           threshold=d.dynamic_threshold, generator=torch.Generator(cascade.device).manual_seed(seed),
                           keep_low=cascade.sr["keep_low"]).cpu()
    size = cascade.image_size
    p_real, p_sr = features_and_p_female(classifier, high)[1], features_and_p_female(classifier, sr)[1]
    shares = {"low": female_share(features_and_p_female(base_cls, low)[1]), "real": female_share(p_real),
              "sr": female_share(p_sr), "paired_sr": mcnemar_test(p_real, p_sr)}
    shares["test_real"] = two_proportion_test(shares["low"], shares["real"])
    shares["test_sr"] = two_proportion_test(shares["low"], shares["sr"])
    return {"sr": quality(sr, low, reference_features, classifier),
            "bicubic": quality(bicubic_baseline(low.float(), size), low, reference_features, classifier),
            "real": quality(high, low, reference_features, classifier), "female_share": shares}, sr


def evaluate_cascade(cascade, prompts, steps, guidance, seed, reference, classifiers, sex_gap):
    """The cascade from text: quality of its images and of the bicubic-upsampled base images, the female
    share each classifier reads at its own resolution, and the head areas before and after; returns
    (metrics, base images, final images)."""
    low, high = cascade(prompts, steps=steps, guidance=guidance, seed=seed, return_base=True)
    base_cls, final_cls = classifiers
    reference_features = features_and_p_female(final_cls, reference)[0]
    p_base, p_final = features_and_p_female(base_cls, low)[1], features_and_p_female(final_cls, high)[1]
    base_share, final_share = female_share(p_base), female_share(p_final)
    return {"sr": quality(high, low, reference_features, final_cls),
            "bicubic": quality(bicubic_baseline(low, cascade.image_size), low, reference_features, final_cls),
            "female_share": {"base": base_share, "cascade": final_share,
                             "test": two_proportion_test(base_share, final_share),
                             "paired": mcnemar_test(p_base, p_final)},
            "head_area": head_area_change(low, high, sex_gap)}, low, high


def sr_report(cfg, device):
    """Every number of the SR report (a dict), and writes the sample grid."""
    run, e, s = cfg.run_dir, cfg.sr_eval, cfg.sample
    path = os.path.join(run, "sr.pt")
    if not os.path.exists(path):
        raise UserError(f"no super-resolution stage at {path}: run `python train.py --task sr --run {run}` first")
    sr_ckpt = load_checkpoint(path)
    data_cfg = config_from_dict(sr_ckpt["config"]).data
    low_size, size = sr_ckpt["architecture"]["data"]["image_size"], sr_ckpt["architecture"]["sr"]["size"]
    settings = {"aug_level": s.sr_aug_level, "steps": s.sr_steps, "guidance": s.sr_guidance, "keep_low": s.sr_keep_low}
    models = [m for m in ("diffusion", "aligned") if os.path.exists(os.path.join(run, f"{m}.pt"))]
    cascades = {m: load_generator(m, run, device, stages="all", sr=settings) for m in models}
    if "diffusion" not in cascades or not isinstance(cascades["diffusion"], Cascade):
        raise UserError(f"no base model at {run}/diffusion.pt: run `python train.py --run {run}` first")
    final_target = target_at(data_cfg, size, e.features)  # the final-size reader's data, and the real sex gap
    final_cls, final_metrics = sex_classifier(run, lambda: final_target, size, e, cfg.run.seed, device)
    base_cls, base_metrics = base_sex_classifier(run, data_cfg, low_size, e, cfg.run.seed, device)
    low, high, captions = load_heldout_pairs(data_cfg, size, 2 * e.n)
    reference = high[e.n:].float()  # the FID reference: held-out real images, none of them evaluated
    low, high, captions = low[:e.n].float(), high[:e.n].float(), captions[:e.n]
    report = {"n": e.n, "low_size": low_size, "size": size, "sr_settings": settings, "base_steps": e.steps,
              "guidance": s.guidance, "classifiers": {"base": base_metrics, "final": final_metrics}}
    report["pairs"], sr_images = evaluate_pairs(cascades["diffusion"], low, high, reference, captions,
                                                (base_cls, final_cls), cfg.run.seed)
    prompts = [p["prompt"] for p in evaluation_prompts()]
    prompts = [prompts[i % len(prompts)] for i in range(e.n)]
    grid = [upsample_nearest(low[:8], size), bicubic_baseline(low[:8], size), sr_images[:8], high[:8]]
    sex_gap = real_sex_gap(final_target)
    for model, cascade in cascades.items():
        report[model], base, final = evaluate_cascade(cascade, prompts, e.steps, s.guidance, cfg.run.seed, reference,
                                                      (base_cls, final_cls), sex_gap)
        grid += [upsample_nearest(base[:8], size), final[:8]]
    save_grid(torch.cat(grid), os.path.join(run, "sr_samples.png"), nrow=8)
    return report


def upsample_nearest(images, size):
    """The low-resolution pixels as they are, enlarged for a grid beside the final-size images."""
    return torch.nn.functional.interpolate(images.float(), size=(size, size), mode="nearest")


def markdown(report):
    """sr_report.md: the quality table and the female shares before and after the SR stage."""
    r, size, low = report, report["size"], report["low_size"]

    def row(name, q):
        c = q["consistency"]
        return f"| {name} | {q['fid']:.2f} | {c['mean']:.4f} ± {c['se']:.4f} |"

    def share_row(images, reader, share):
        return f"| {images} | {reader} | {share['share']:.3f} ± {share['se']:.3f} |"

    def test(t):
        return f"z = {t['z']:.2f}, p = {t['p_value']:.3f}"

    lines = [f"# Super-resolution stage: {low} px -> {size} px", "",
             f"{r['n']} images each; SR: noise augmentation level {r['sr_settings']['aug_level']}, "
             f"{r['sr_settings']['steps']} steps, guidance {r['sr_settings']['guidance']}, "
             f"{'keeping' if r['sr_settings']['keep_low'] else 'free to redraw'} the base image; base model: "
             f"{r['base_steps']} DDIM steps, guidance {r['guidance']}. FID in the features of a sex classifier "
             f"trained on {size} px target images; consistency = RMS of downsample(x) - x_low per image "
             f"(mean ± s.e.).", "", "## Held-out real pairs", "",
             "| images | FID | consistency |", "|---|---|---|",
             row("SR stage", r["pairs"]["sr"]), row("bicubic", r["pairs"]["bicubic"]),
             row("real (floor)", r["pairs"]["real"])]
    pairs = r["pairs"]["female_share"]
    lines += ["", "| female share | read by | share ± s.e. |", "|---|---|---|",
              share_row(f"real inputs ({low} px)", "base classifier", pairs["low"]),
              share_row(f"real images ({size} px)", f"{size} px classifier", pairs["real"]),
              share_row(f"SR of the inputs ({size} px)", f"{size} px classifier", pairs["sr"]), "",
              f"Two-proportion tests against the inputs' share: real {test(pairs['test_real'])}, "
              f"SR {test(pairs['test_sr'])}. Paired, the {size} px classifier on the real image and on the SR of "
              f"its input (McNemar): {pairs['paired_sr']['female_to_male']} female -> male, "
              f"{pairs['paired_sr']['male_to_female']} male -> female, p = {pairs['paired_sr']['p_value']:.3f}."]
    for model in ("diffusion", "aligned"):
        if model not in r:
            continue
        m, share, area = r[model], r[model]["female_share"], r[model]["head_area"]
        lines += ["", f"## The cascade from text ({model} base)", "", "| images | FID | consistency |",
                  "|---|---|---|", row("cascade", m["sr"]), row("base + bicubic", m["bicubic"]), "",
                  "| female share | read by | share ± s.e. |", "|---|---|---|",
                  share_row(f"base images ({low} px)", "base classifier", share["base"]),
                  share_row(f"cascade images ({size} px)", f"{size} px classifier", share["cascade"]), "",
                  f"Two-proportion test: {test(share['test'])}. Paired (McNemar, the same samples): "
                  f"{share['paired']['female_to_male']} read female -> male, {share['paired']['male_to_female']} "
                  f"male -> female, p = {share['paired']['p_value']:.3f}.", "",
                  f"Head area (share of the image): base {area['base']:.4f}, cascade {area['final']:.4f}, mean "
                  f"paired change {area['change']:+.4f} ± {area['change_se']:.4f} (real male - female: "
                  f"{area['sex_gap']:.4f})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description="python -m minimedi.sr_eval --run DIR: " + __doc__.split("\n")[0])
    report = sr_report(cfg, distributed.resolve_device(cfg.run.device))
    for name, text in (("sr_report.json", json.dumps(report, indent=2)), ("sr_report.md", markdown(report))):
        with atomic_path(os.path.join(cfg.run_dir, name)) as tmp, open(tmp, "w") as f:
            f.write(text)
    print(markdown(report))
    print(f"wrote {cfg.run_dir}/sr_report.json, sr_report.md and sr_samples.png")


if __name__ == "__main__":
    run_main(main)
