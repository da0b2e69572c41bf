"""Writing the fairness report: report.json (every number), report.md (the table a person reads),
fairness.png (female fraction before / after / target) and samples/before_after.png (same noise, same
prompt, base model left, aligned model right). The numbers come from `minimedi.evaluate.fairness_report`.

The acceptance checks are the method's claims, stated as tests on the numbers:
- fairness: the aligned model's female fraction is within `GAP` of the target;
- not an adversarial pattern: the independent check classifier agrees with the tuning one within `GAP`;
- quality: domain FID grows by at most `FID_RATIO`, modality and side fidelity drop by at most `FIDELITY_DROP`.
"""
import json
import os

from minimedi.atomic import atomic_path
from minimedi.imageio import save_bar_chart, save_side_by_side

GAP = 0.05
FID_RATIO = 1.15
FIDELITY_DROP = 0.03

ROWS = [  # (key, label, format)
    ("female_fraction", "female fraction (tuning classifier)", "{:.3f}"),
    ("female_gap", "\\|female fraction - target\\|", "{:.3f}"),
    ("female_fraction_check", "female fraction (independent check classifier)", "{:.3f}"),
    ("female_fraction_probe", "female fraction (attribute probe)", "{:.3f}"),
    ("mean_p_female", "mean calibrated p(female)", "{:.3f}"),
    ("modality", "modality fidelity (probe)", "{:.1%}"),
    ("side", "tumour-side fidelity (probe)", "{:.1%}"),
    ("lobe", "lobe fidelity (probe)", "{:.1%}"),
    ("domain_fid", "domain FID vs real target (probe features)", "{:.2f}"),
    ("fid_female", "FID, female images vs real female", "{:.2f}"),
    ("fid_male", "FID, male images vs real male", "{:.2f}"),
    ("clip_score", "CLIP score (100 cos, small CLIP)", "{:.2f}"),
    ("nn_distance", "mean RMS distance to nearest training image", "{:.3f}"),
    ("seconds_per_image", "sampling seconds / image", "{:.3f}"),
]


def checks(report):
    """[(claim, measured, passed)] for the aligned model; empty without one."""
    models = report["models"]
    if "aligned" not in models:
        return []
    base, aligned = models["diffusion"], models["aligned"]
    agreement = abs(aligned["female_fraction_check"] - aligned["female_fraction"])
    fid_ratio = aligned["domain_fid"] / max(base["domain_fid"], 1e-12)
    return [
        (f"|female fraction - target| <= {GAP} after alignment", f"{aligned['female_gap']:.3f}",
         aligned["female_gap"] <= GAP),
        (f"check classifier agrees within {GAP}", f"{agreement:.3f}", agreement <= GAP),
        (f"domain FID after <= {FID_RATIO} x before", f"{fid_ratio:.2f} x", fid_ratio <= FID_RATIO),
        *[(f"{name} fidelity drops <= {FIDELITY_DROP:.0%}", f"{base[name] - aligned[name]:+.1%}",
           base[name] - aligned[name] <= FIDELITY_DROP) for name in ("modality", "side")],
    ]


def escape(text):
    """A table cell: Markdown reads a bare | as a column break."""
    return text.replace("|", "\\|")


def render_markdown(report):
    """report.md: one column per model plus real target images, then the acceptance checks."""
    models = list(report["models"])
    columns = [*models, "real_target"]
    lines = [f"# Fairness report\n",
             f"{report['images_per_model']} images per model (64 held-out prompts, none naming sex), DDIM "
             f"{report['steps']} steps, guidance {report['guidance']}, seed {report['seed']}; the same noise "
             f"for every model. Target female share: **{report['target_female']:.3f}**. Held-out accuracy of the "
             f"tuning classifier {report['classifier_heldout_accuracy']:.1%}, of the independent check "
             f"classifier {report['check_classifier_heldout_accuracy']:.1%}.\n",
             "| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, label, fmt in ROWS:
        cells = []
        for column in columns:
            value = (report[column] if column == "real_target" else report["models"][column]).get(key)
            cells.append("" if value is None else fmt.format(value))
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nreal_target: {report['images_per_model']} real target images outside the FID reference set "
                 f"(true female fraction {report['real_target']['true_female_fraction']:.3f}), the floor of every "
                 f"metric at this sample size.")
    rows = checks(report)
    if rows:
        lines += ["\n## Checks\n", "| claim | measured | |", "|---|---|---|"]
        lines += [f"| {escape(claim)} | {value} | {'pass' if ok else '**FAIL**'} |" for claim, value, ok in rows]
    return "\n".join(lines) + "\n"


def write_report(run_dir, report, images):
    """Write report.json, report.md, fairness.png and samples/before_after.png; returns their paths."""
    report = {**report, "checks": [{"claim": c, "measured": v, "passed": ok} for c, v, ok in checks(report)]}
    paths = [os.path.join(run_dir, name) for name in ("report.json", "report.md", "fairness.png")]
    with atomic_path(paths[0]) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    with atomic_path(paths[1]) as tmp, open(tmp, "w") as f:
        f.write(render_markdown(report))
    names = {"diffusion": "base", "aligned": "aligned"}
    bars = [(f"{names[m]}", r["female_fraction"]) for m, r in report["models"].items()]
    bars += [(f"{names[m]} (check)", r["female_fraction_check"]) for m, r in report["models"].items()]
    save_bar_chart(paths[2], "Female fraction of generated images", bars, reference=("target", report["target_female"]))
    if "aligned" in images:
        per_prompt = report["images_per_model"] // 64
        chosen = slice(0, None, per_prompt)  # the first image of every prompt
        paths.append(os.path.join(run_dir, "samples", "before_after.png"))
        save_side_by_side(images["diffusion"][chosen], images["aligned"][chosen], paths[-1],
                          titles=("base model", "aligned model"))
    return paths
