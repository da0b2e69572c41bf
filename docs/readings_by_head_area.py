"""Do the classifiers read generated images as they read real slices of the same head size?

On the phantom, sex is drawn only as head size, and on real target slices both sex classifiers read it
mostly from there. For each generated image this finds the K real held-out slices of the same MR sequence
whose head areas (`minimedi.morphometry.head_area`) are nearest, and takes the share of them each classifier
reads as female: the reading the image's head size predicts. Printed by sequence, for the base and the
aligned model, on the report's held-out prompts and on the neutral tuning prompts (6 images a prompt, 96 a
sequence, one noise): the share read as female, the share its head areas predict, and the median head area.
A sequence read well below its prediction carries something else the classifiers take for male
(docs/fairness_experiments.md, "The worst sequence").

    python docs/readings_by_head_area.py --run runs/det-s0
"""
import argparse
import os

import numpy as np

from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.captions import evaluation_prompts, tuning_prompts
from minimedi.data.reference import classifier_reference
from minimedi.morphometry import head_area
from minimedi.pipeline import load_generator

K = 50  # real slices per prediction: about 5 % of a sequence's held-out slices


def predicted(areas, real_areas, real_female):
    """For each area, the share read as female among the K real slices with the nearest head areas."""
    nearest = np.argsort(np.abs(areas[:, None] - real_areas[None, :]), axis=1)[:, :K]
    return real_female[nearest].mean(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    readers = {name: load_classifier(os.path.join(run, f"{name}.pt"), "cpu")[0] for name in ("classifier", "sex_check")}
    real = classifier_reference(load_classifier(os.path.join(run, "classifier.pt"), "cpu")[1])
    real_modality = np.array([a["modality"] for a in real.attributes])
    real_area = head_area(real.images.float()).numpy()
    real_read = {r: calibrated_log_odds(c, real.images.float()).numpy() > 0 for r, c in readers.items()}
    sets = {"held-out": evaluation_prompts(), "tuning": tuning_prompts()}
    sequences = list(dict.fromkeys(p["modality"] for p in sets["held-out"]))
    print(f"{'model':10s} {'prompts':9s} {'reader':11s}  " + "  ".join(f"{m:>19s}" for m in sequences))
    for model in ("diffusion", "aligned"):
        generator = load_generator(model, run, "cpu")
        for name, prompts in sets.items():
            prompts = [p for p in prompts for _ in range(6)]
            modality = np.array([p["modality"] for p in prompts])
            images = generator([p["prompt"] for p in prompts], 25, guidance=3.0, seed=0, batch_size=len(prompts))
            area = head_area(images).numpy()
            for r, classifier in readers.items():
                read = calibrated_log_odds(classifier, images).numpy() > 0
                cells = []
                for m in sequences:
                    here, there = modality == m, real_modality == m
                    expected = predicted(area[here], real_area[there], real_read[r][there]).mean()
                    cells.append(f"{read[here].mean():.2f} {expected:.2f} {np.median(area[here]):.3f}")
                print(f"{model:10s} {name:9s} {r:11s}  " + "  ".join(f"{c:>19s}" for c in cells), flush=True)
    print(f"each sequence: share read as female, share its head areas predict ({K} nearest real slices), median "
          "head area; 96 images a sequence")


if __name__ == "__main__":
    main()
