"""Female share by MR sequence on the tuning's prompts and the report's, at 10 and 25 DDIM steps.

align.py tunes on 64 prompts (`tuning_prompts`; the first phrasing of each combination when
`--align-phrasings` gives it more) with images from a 10-step chain (`--align-ddim-steps`); the
report reads 25-step images of 64 other prompts (`evaluation_prompts`). A per-sequence spread in the report
can come from either difference rather than from the tuning itself. This draws 6 images of every prompt of
both sets from the same noise at both lengths, and prints for each model the raw share the tuning
classifier reads as female (not corrected; the same reader everywhere) and the median head area, by
sequence (docs/fairness_experiments.md, "The worst sequence").

    python docs/shares_by_sequence.py --run runs/det-s0
"""
import argparse
import os

import numpy as np

from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.captions import evaluation_prompts, tuning_prompts
from minimedi.morphometry import head_area
from minimedi.pipeline import load_generator


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    classifier, _ = load_classifier(os.path.join(run, "classifier.pt"), "cpu")
    sets = {"tuning": tuning_prompts(), "held-out": evaluation_prompts()}
    sequences = list(dict.fromkeys(p["modality"] for p in sets["held-out"]))
    print(f"{'model':10s} {'prompts':9s} {'steps':>5s}  {'all':>6s}  " + "  ".join(f"{m:>12s}" for m in sequences))
    for model in ("diffusion", "aligned"):
        generator = load_generator(model, run, "cpu")
        for name, prompts in sets.items():
            prompts = [p for p in prompts for _ in range(6)]
            texts, modality = [p["prompt"] for p in prompts], np.array([p["modality"] for p in prompts])
            for steps in (10, 25):  # one batch, one seed: the same noise at both lengths and for both models
                images = generator(texts, steps, guidance=3.0, seed=0, batch_size=len(texts))
                female, area = calibrated_log_odds(classifier, images).numpy() > 0, head_area(images).numpy()
                cells = "  ".join(f"{female[modality == m].mean():.3f} {np.median(area[modality == m]):.3f}"
                                  for m in sequences)
                print(f"{model:10s} {name:9s} {steps:5d}  {female.mean():6.3f}  {cells}", flush=True)
    print("each sequence: raw share read as female, median head area; 96 images a sequence")


if __name__ == "__main__":
    main()
