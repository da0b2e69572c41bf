"""How surely the tuning classifier reads real target slices of each MR sequence, by sex.

`--align-cap match` matches every prompt's images to one pooled population of real readings, whatever
the prompt's sequence. This prints, for each sequence, the quantiles of the calibrated log-odds toward
each slice's own sex on the real target slices the classifier never trained on, and the share read as
that sex: if one sequence's real readings sat apart from the pool, matching to the pool would aim that
sequence's images at the wrong share (docs/fairness_experiments.md, "The worst sequence").

    python docs/real_readings_by_sequence.py --run runs/default
"""
import argparse
import os

import numpy as np

from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.reference import classifier_reference

LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    classifier, ckpt = load_classifier(os.path.join(run, "classifier.pt"), "cpu")
    real = classifier_reference(ckpt)
    female = np.array([a["sex"] == "female" for a in real.attributes])
    modality = np.array([a["modality"] for a in real.attributes])
    toward = calibrated_log_odds(classifier, real.images).numpy() * np.where(female, 1, -1)
    print(f"{'sequence':10s} {'sex':6s} {'n':>5s}  " + "  ".join(f"{q:>6.0%}" for q in LEVELS) + "   read as that sex")
    for name in ["all", *dict.fromkeys(modality)]:
        for sex, of_sex in (("women", female), ("men", ~female)):
            chosen = of_sex & ((modality == name) | (name == "all"))
            quantiles = "  ".join(f"{q:6.2f}" for q in np.quantile(toward[chosen], LEVELS))
            print(f"{name:10s} {sex:6s} {chosen.sum():5d}  {quantiles}   {np.mean(toward[chosen] > 0):17.3f}")


if __name__ == "__main__":
    main()
