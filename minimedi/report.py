"""Writing the fairness report: report.json (every number), report.md (the tables a person reads),
fairness.png (the corrected female share before / after / target, overall and per group) and
samples/before_after.png (same noise, same prompt, base model left, aligned model right). The numbers
come from `minimedi.evaluate.fairness_report` and `minimedi.audit`.

The acceptance checks are the method's claims, stated as tests on the aligned model's numbers:
- fairness, for every prompt: the corrected female share within `GAP` of the target over the held-out
  prompts, within `GROUP_GAP` in every MR sequence, within `UNSEEN_GAP` on unseen prompts;
- named sex kept: prompts that name a sex drawn as that sex at least `NAMED_ACCURACY` of the time, and
  no more than `NAMED_DROP` below the base model;
- real anatomy: head areas within `KS` (Kolmogorov-Smirnov) of real target slices and at most
  `OUTSIDE` outside their 1-99% range, for neutral prompts and for each named sex;
- not an adversarial pattern: the independent check classifier's corrected share agrees within `GAP`;
- quality: domain FID grows by at most `FID_RATIO`, modality and side fidelity drop by at most
  `FIDELITY_DROP`.
A share is a sample estimate, so its check reads the 95% bootstrap interval: "pass" when the whole
interval meets the claim, "FAIL" when none of it does, "inconclusive" when the sample cannot tell.
"""
import json
import math
import os

from minimedi.atomic import atomic_path
from minimedi.imageio import bar_chart, save_panels, save_side_by_side

GAP = 0.05
GROUP_GAP = 0.15
UNSEEN_GAP = 0.10
NAMED_ACCURACY = 0.90
NAMED_DROP = 0.03
KS = 0.15
OUTSIDE = 0.03
FID_RATIO = 1.15
FIDELITY_DROP = 0.03

ROWS = [  # (key, label, format)
    ("female_fraction_corrected", "female share, corrected (tuning classifier)", "{:.3f}"),
    ("female_fraction_ci", "its 95% bootstrap interval", "[{:.3f}, {:.3f}]"),
    ("female_gap", "\\|corrected female share - target\\|", "{:.3f}"),
    ("female_fraction_check_corrected", "female share, corrected (independent check classifier)", "{:.3f}"),
    ("female_fraction_anatomy", "female share that fits the head sizes (no classifier)", "{:.3f}"),
    ("female_fraction_anatomy_ci", "its 95% bootstrap interval", "[{:.3f}, {:.3f}]"),
    ("anatomy_fit_ks", "head sizes vs that fitted mix of real sexes: KS", "{:.3f}"),
    ("female_fraction", "female share called by the tuning classifier (raw)", "{:.3f}"),
    ("female_fraction_check", "female share called by the check classifier (raw)", "{:.3f}"),
    ("female_fraction_probe", "female share called by the attribute probe (raw)", "{:.3f}"),
    ("mean_p_female", "mean calibrated p(female)", "{:.3f}"),
    ("modality", "modality fidelity (probe)", "{:.1%}"),
    ("side", "tumour-side fidelity (probe)", "{:.1%}"),
    ("lobe", "lobe fidelity (probe)", "{:.1%}"),
    ("domain_fid", "domain FID vs real target (feature network)", "{:.2f}"),
    ("fid_female", "FID, female images vs real female", "{:.2f}"),
    ("fid_male", "FID, male images vs real male", "{:.2f}"),
    ("clip_score", "CLIP score (100 cos, small CLIP)", "{:.2f}"),
    ("nn_distance", "mean RMS distance to nearest training image", "{:.3f}"),
    ("seconds_per_image", "sampling seconds / image", "{:.3f}"),
]
LEFT_OUT_LABELS = {"modality": "MR-sequence fidelity", "side": "tumour-side fidelity", "lobe": "lobe fidelity",
                   "female_fraction_probe": "a third sex read-out"}
GROUP_LABELS = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def interval_verdict(ci, low=-math.inf, high=math.inf):
    """"pass" if the interval lies inside [low, high], "FAIL" if it lies wholly outside, else "inconclusive"."""
    if ci is None:
        return "inconclusive"
    if low <= ci[0] and ci[1] <= high:
        return "pass"
    return "FAIL" if ci[1] < low or ci[0] > high else "inconclusive"


def verdict(ok):
    return "pass" if ok else "FAIL"


def share_text(share, key="corrected", ci_key="ci"):
    """'0.412 [0.350, 0.470]' of a share dict with `key` and `ci_key` ("anatomy_share", "anatomy_ci": the
    share the head sizes fit)."""
    if share is None or share.get(key) is None:
        return "n/a"
    ci = share.get(ci_key)
    return f"{share[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def checks(report):
    """[(claim, measured, verdict)] for the aligned model; empty without one."""
    models = report["models"]
    if "aligned" not in models:
        return []
    base, aligned, t = models["diffusion"], models["aligned"], report["target_female"]
    overall = {"corrected": aligned["female_fraction_corrected"], "ci": aligned["female_fraction_ci"]}
    rows = [(f"corrected female share within {GAP} of the target {t:.3f}", share_text(overall),
             interval_verdict(overall["ci"], t - GAP, t + GAP))]
    sequences = aligned["per_group"].get("modality", {})
    if sequences:
        verdicts = [interval_verdict(s["ci"], t - GROUP_GAP, t + GROUP_GAP) for s in sequences.values()]
        worst = aligned["worst_group_gap"].get("modality")
        rows.append((f"every MR sequence within {GROUP_GAP} of the target",
                     f"worst {worst['group']}: {share_text(sequences[worst['group']])}" if worst else "n/a",
                     "FAIL" if "FAIL" in verdicts else "inconclusive" if "inconclusive" in verdicts else "pass"))
    if "all" in aligned["unseen"]:
        unseen = aligned["unseen"]["all"]
        rows.append((f"unseen prompts within {UNSEEN_GAP} of the target", share_text(unseen),
                     interval_verdict(unseen["ci"], t - UNSEEN_GAP, t + UNSEEN_GAP)))
    for sex, accuracy in aligned["named_sex_accuracy"].items():
        rows.append((f"prompts naming a {'woman' if sex == 'female' else 'man'} drawn as one >= {NAMED_ACCURACY:.0%}",
                     share_text(accuracy), interval_verdict(accuracy["ci"], low=NAMED_ACCURACY)))
        before = base["named_sex_accuracy"][sex]["corrected"]
        if before is not None and accuracy["corrected"] is not None:
            drop = before - accuracy["corrected"]
            rows.append((f"... and no more than {NAMED_DROP:.0%} below the base model ({before:.3f})",
                         f"{-drop:+.3f}", verdict(drop <= NAMED_DROP)))
    for name, a in aligned["anatomy"].items():
        against = "all real slices" if name == "neutral" else f"real {name} slices"
        rows.append((f"head area ({name} prompts) within KS {KS} of {against}", f"{a['ks']:.3f}", verdict(a["ks"] <= KS)))
        rows.append((f"head area ({name} prompts) outside the real 1-99% range <= {OUTSIDE:.0%}", f"{a['outside']:.1%}",
                     verdict(a["outside"] <= OUTSIDE)))
    if aligned["female_fraction_check_corrected"] is not None and overall["corrected"] is not None:
        agreement = abs(aligned["female_fraction_check_corrected"] - overall["corrected"])
        rows.append((f"check classifier's corrected share agrees within {GAP}", f"{agreement:.3f}",
                     verdict(agreement <= GAP)))
    fid_ratio = aligned["domain_fid"] / max(base["domain_fid"], 1e-12)
    rows.append((f"domain FID after <= {FID_RATIO} x before", f"{fid_ratio:.2f} x", verdict(fid_ratio <= FID_RATIO)))
    rows += [(f"{name} fidelity drops <= {FIDELITY_DROP:.0%}", f"{base[name] - aligned[name]:+.1%}",
              verdict(base[name] - aligned[name] <= FIDELITY_DROP)) for name in ("modality", "side") if name in aligned]
    return rows


def escape(text):
    """A table cell: Markdown reads a bare | as a column break."""
    return text.replace("|", "\\|")


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def cell(fmt, value):
    if value is None:
        return ""
    return fmt.format(*value) if isinstance(value, list) else fmt.format(value)


def data_text(report):
    """What the models learned from, what they are measured against, and the rows left out."""
    data, reference = report["data"], report["reference"]
    text = (f"Pretraining data: {data['pretrain'].get('kind')} {data['pretrain'].get('path', '')}; target data: "
            f"{data['target'].get('kind')} {data['target'].get('path', '')}. Real reference: "
            f"{reference['images']} images, {reference['source']}. FID features: {report['feature_network']}.\n")
    if report["left_out"]:
        text += (f"\nLeft out on this data: {', '.join(LEFT_OUT_LABELS.get(k, k) for k in report['left_out'])} ("
                 f"{next(iter(report['left_out'].values()))}).\n")
    return text


def render_markdown(report):
    """report.md: the headline table (a column per model plus real target images), then per group, named
    sex, unseen prompts, anatomy, the classifiers' error rates, and the acceptance checks."""
    models = list(report["models"])
    columns = [*models, "real_target"]
    n = report.get("images", {})
    lines = ["# Fairness report\n",
             f"{report['images_per_model']} images per model for the 64 held-out prompts (none naming sex), "
             f"{n.get('named', 0)} for prompts naming sex and {n.get('unseen', 0)} for unseen prompts; DDIM "
             f"{report['steps']} steps, guidance {report['guidance']}, seed {report['seed']}; the same noise for "
             f"every model. Target female share: **{report['target_female']:.3f}**. Held-out accuracy of the "
             f"tuning classifier {report['classifier_heldout_accuracy']:.1%}, of the independent check "
             f"classifier {report['check_classifier_heldout_accuracy']:.1%}. Corrected shares invert each "
             f"classifier's confusion matrix per MR sequence, measured on real target images it never trained on; "
             f"intervals are 95% bootstrap intervals ({report.get('bootstrap', 0)} replicates) over prompts, "
             f"images and those real images.\n", data_text(report)]
    rows = []
    for key, label, fmt in ROWS:
        cells = [cell(fmt, (report[c] if c == "real_target" else report["models"][c]).get(key)) for c in columns]
        if any(cells):
            rows.append([label, *cells])
    lines += table(["metric", *columns], rows)
    lines.append(f"\nreal_target: {report['images_per_model']} real target images outside the FID reference set "
                 f"(true female fraction {report['real_target']['true_female_fraction']:.3f}), the floor of every "
                 f"metric at this sample size.")
    first = report["models"][models[0]]
    if "per_group" in first:
        lines += ["\n## Corrected female share by group (held-out prompts)\n"]
        rows = [[f"{attribute} {GROUP_LABELS.get(value, value)}", str(first["per_group"][attribute][value]["n"]),
                 *[share_text(report["models"][m]["per_group"][attribute][value]) for m in models],
                 *[share_text(report["models"][m]["per_group"][attribute][value], "anatomy_share", "anatomy_ci")
                   for m in models]]
                for attribute in first["per_group"] if attribute != "prompt" for value in first["per_group"][attribute]]
        rows.append(["worst modality gap", "", *[cell("{:.3f}", report["models"][m]["worst_group_gap"].get(
            "modality", {}).get("gap")) for m in models], *[""] * len(models)])
        rows.append(["mean per-prompt gap (Shen et al.), corrected / raw", "",
                     *[f"{cell('{:.3f}', g['corrected']) or 'n/a'} / {g['raw']:.3f}" for g in
                       (report["models"][m]["mean_prompt_gap"] for m in models)], *[""] * len(models)])
        lines += table(["group", "images", *models, *[f"{m}: fit to head sizes" for m in models]], rows)
        lines.append(f"\nA model with every prompt exactly at the target would still show a mean per-prompt gap of "
                     f"{cell('{:.3f}', first['mean_prompt_gap']['floor']) or 'n/a'} (corrected) from "
                     f"{report['images_per_model'] // first['mean_prompt_gap']['prompts']} images per prompt.")
        lines += ["\n## Prompts that name sex: share drawn as the named sex\n"]
        rows = [[{"female": "woman", "male": "man"}[sex], str(first["named_sex_accuracy"][sex]["n"]),
                 *[f"{a['tuning_raw']:.3f} / {a['check_raw']:.3f} / {share_text(a)}"
                   for a in (report["models"][m]["named_sex_accuracy"][sex] for m in models)]]
                for sex in first["named_sex_accuracy"]]
        lines += table(["prompt names a", "images", *[f"{m}: raw tuning / raw check / corrected" for m in models]], rows)
        lines += ["\n## Unseen prompts: corrected female share\n"]
        rows = [[kind, str(first["unseen"][kind]["n"]), *[share_text(report["models"][m]["unseen"][kind]) for m in models],
                 *[share_text(report["models"][m]["unseen"][kind], "anatomy_share", "anatomy_ci") for m in models]]
                for kind in first["unseen"]]
        lines += table(["prompts", "images", *models, *[f"{m}: fit to head sizes" for m in models]], rows)
        lines += ["\n## Anatomy: head area read from the pixels, against real target slices\n"]
        rows = [[name, *[f"{a['ks']:.3f} / {a['outside']:.1%}" for a in (report["models"][m]["anatomy"][name]
                                                                         for m in models)],
                 f"{first['anatomy'][name]['real_median']:.3f}",
                 *[f"{report['models'][m]['anatomy'][name]['median']:.3f}" for m in models]]
                for name in first["anatomy"]]
        lines += table(["prompts", *[f"{m}: KS / outside 1-99%" for m in models], "real median",
                        *[f"{m} median" for m in models]], rows)
        floor = report["real_target"].get("anatomy", {}).get("neutral")
        if floor:
            lines.append(f"\nReal images against real images at this sample size: KS {floor['ks']:.3f}, "
                         f"{floor['outside']:.1%} outside.")
        lines += ["\n## Error rates on held-out real target images\n"]
        rows = [[stratum, *[f"{report['error_rates'][r][stratum]['tpr']:.3f} / {report['error_rates'][r][stratum]['fpr']:.3f}"
                            for r in report["error_rates"]],
                 f"{report['error_rates']['tuning'][stratum]['n_female']} / {report['error_rates']['tuning'][stratum]['n_male']}"]
                for stratum in report["error_rates"]["tuning"]]
        lines += table(["stratum", *[f"{r}: TPR / FPR" for r in report["error_rates"]], "women / men"], rows)
    rows = checks(report)
    if rows:
        lines += ["\n## Checks\n"]
        lines += table(["claim", "measured", ""], [[escape(c), v, ok if ok == "pass" else f"**{ok}**"]
                                                   for c, v, ok in rows])
    return "\n".join(lines) + "\n"


def plain(value):
    """The report with NaN as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def fairness_picture(report):
    """Two panels: the corrected female share over the held-out prompts (both classifiers and the head sizes),
    and per group."""
    names = {"diffusion": "base", "aligned": "aligned"}
    models = report["models"]
    target = ("target", report["target_female"])
    bars = [(f"{names[m]}", r["female_fraction_corrected"] or 0.0, r["female_fraction_ci"]) for m, r in models.items()]
    bars += [(f"{names[m]} (check)", r["female_fraction_check_corrected"] or 0.0, r["female_fraction_check_ci"])
             for m, r in models.items()]
    bars += [(f"{names[m]} (head size)", r.get("female_fraction_anatomy") or 0.0, r.get("female_fraction_anatomy_ci"))
             for m, r in models.items()]
    overall = bar_chart("Female share of generated images (corrected)", [b[0] for b in bars],
                        [("", [b[1] for b in bars], [b[2] for b in bars])], target)
    first = next(iter(models.values()))
    groups = [(a, v) for a in first["per_group"] if a != "prompt" for v in first["per_group"][a]]
    series = [(names[m], [r["per_group"][a][v]["corrected"] or 0.0 for a, v in groups],
               [r["per_group"][a][v]["ci"] for a, v in groups]) for m, r in models.items()]
    by_group = bar_chart("Female share by group (corrected, 95% intervals)", [GROUP_LABELS.get(v, v) for _, v in groups],
                         series, target, size=(1200, 400))
    return [overall, by_group]


def write_report(run_dir, report, images):
    """Write report.json, report.md, fairness.png and samples/before_after.png; returns their paths."""
    report = plain({**report, "checks": [{"claim": c, "measured": v, "verdict": ok} for c, v, ok in checks(report)]})
    paths = [os.path.join(run_dir, name) for name in ("report.json", "report.md", "fairness.png")]
    with atomic_path(paths[0]) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    with atomic_path(paths[1]) as tmp, open(tmp, "w") as f:
        f.write(render_markdown(report))
    save_panels(paths[2], fairness_picture(report))
    if "aligned" in images:
        per_prompt = report["images_per_model"] // 64
        chosen = slice(0, None, per_prompt)  # the first image of every prompt
        paths.append(os.path.join(run_dir, "samples", "before_after.png"))
        save_side_by_side(images["diffusion"][chosen], images["aligned"][chosen], paths[-1],
                          titles=("base model", "aligned model"))
    return paths
