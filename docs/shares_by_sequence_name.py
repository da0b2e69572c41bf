"""Female share of FLAIR and T1 prompts by the name of the sequence and by template, base and aligned.

The report's FLAIR cell is the lowest in every seed (docs/fairness_experiments.md, "The worst sequence").
Its prompts write the sequence as "FLAIR" in a template tuning never saw; the grammar also writes "T2-FLAIR"
and "fluid-attenuated inversion recovery". This crosses each name with four templates (the report's two
held-out ones and two grammar phrasings) and draws 4 images of each of the sequence's 16 glioma
combinations per cell (64 images, one batch, seed 0), read by the tuning classifier (raw share, not
corrected; the same reader everywhere).

    python docs/shares_by_sequence_name.py --run runs/det-s0
"""
import argparse
import os

from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.captions import EVALUATION_TEMPLATE, MODALITY_NAMES, SECOND_TEMPLATE, tumor_attributes
from minimedi.pipeline import load_generator

TEMPLATES = {
    "report's": EVALUATION_TEMPLATE,
    "second held-out": SECOND_TEMPLATE,
    "grammar, axial first": "Axial {modality} MRI of the brain showing a {size} glioma in the {side} {lobe} lobe.",
    "grammar, name first": "{modality} MR image of the brain, axial slice, {size} glioma in the {side} {lobe} lobe.",
}
NAMES = {"flair": MODALITY_NAMES["flair"], "t1": MODALITY_NAMES["t1"][:2]}
PER_PROMPT = 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    classifier, _ = load_classifier(os.path.join(run, "classifier.pt"), "cpu")
    cells, texts = [], []
    for sequence, names in NAMES.items():
        combinations = [a for a in tumor_attributes() if a["modality"] == sequence]
        for name in names:
            for template_name, template in TEMPLATES.items():
                cells.append((sequence, name, template_name))
                texts += [template.format(modality=name, size=a["tumor_size"], side=a["side"], lobe=a["lobe"])
                          for a in combinations for _ in range(PER_PROMPT)]
    shares = {}
    for model in ("diffusion", "aligned"):
        images = load_generator(model, run, "cpu")(texts, 25, guidance=3.0, seed=0, batch_size=256)
        female = (calibrated_log_odds(classifier, images) > 0).float().reshape(len(cells), -1).mean(1)
        shares[model] = female.tolist()
    print(f"{'sequence':8s} {'name':38s} " + "  ".join(f"{t:>20s}" for t in TEMPLATES) + "   (base -> aligned)")
    for i in range(0, len(cells), len(TEMPLATES)):
        sequence, name, _ = cells[i]
        row = "  ".join(f"{shares['diffusion'][j]:>9.3f} -> {shares['aligned'][j]:.3f}"
                        for j in range(i, i + len(TEMPLATES)))
        print(f"{sequence:8s} {name:38s} {row}")
    print(f"each cell: raw share read as female, 16 combinations x {PER_PROMPT} images")


if __name__ == "__main__":
    main()
