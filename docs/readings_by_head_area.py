"""Do the classifiers read generated images as they read real slices of the same head size?

On the phantom, sex is drawn only as head size, and on real target slices both sex classifiers read it
mostly from there. For each generated image this finds the K real held-out slices of the same MR sequence
whose head areas (`minimedi.morphometry.head_area`) are nearest, and takes the share of them each classifier
reads as female: the reading the image's head size predicts. Printed by sequence, for the base and the
aligned model, on the report's held-out prompts and on the neutral tuning prompts (6 images a prompt, 96 a
sequence, one noise), for all gliomas and for the small and the large ones apart: the share read as female,
the share its head areas predict, the median head area and the median bright area (the share of pixels
above 0.5: the lesion, and in FLAIR its edema). The real held-out slices' median bright area comes first.
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


def bright_area(images):
    """The share of each image's pixels above 0.5 (of [-1, 1]): the lesion's extent, [N]."""
    return (images[:, 0] > 0.5).float().mean((1, 2)).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    classifier, ckpt = load_classifier(os.path.join(run, "classifier.pt"), "cpu")
    readers = {"classifier": classifier, "sex_check": load_classifier(os.path.join(run, "sex_check.pt"), "cpu")[0]}
    real = classifier_reference(ckpt)  # the real slices neither classifier trained on
    real_images = real.images.float()
    real_modality = np.array([a["modality"] for a in real.attributes])
    real_size = np.array([a["tumor_size"] for a in real.attributes])
    real_area, real_bright = head_area(real_images).numpy(), bright_area(real_images)
    real_read = {r: calibrated_log_odds(c, real_images).numpy() > 0 for r, c in readers.items()}
    sets = {"held-out": evaluation_prompts(), "tuning": tuning_prompts()}
    sequences = list(dict.fromkeys(p["modality"] for p in sets["held-out"]))
    sizes = {"all": ("small", "large"), "small": ("small",), "large": ("large",)}
    print("real held-out slices, median bright area, small / large gliomas: " + "  ".join(
        f"{m} {np.median(real_bright[(real_modality == m) & (real_size == 'small')]):.4f} / "
        f"{np.median(real_bright[(real_modality == m) & (real_size == 'large')]):.4f}" for m in sequences))
    print(f"{'model':10s} {'prompts':9s} {'reader':11s} {'gliomas':7s}  " + "  ".join(f"{m:>26s}" for m in sequences))
    for model in ("diffusion", "aligned"):
        generator = load_generator(model, run, "cpu")
        for name, prompts in sets.items():
            prompts = [p for p in prompts for _ in range(6)]
            modality, size = np.array([p["modality"] for p in prompts]), np.array([p["tumor_size"] for p in prompts])
            images = generator([p["prompt"] for p in prompts], 25, guidance=3.0, seed=0, batch_size=len(prompts))
            area, bright = head_area(images).numpy(), bright_area(images)
            for r, classifier in readers.items():
                read = calibrated_log_odds(classifier, images).numpy() > 0
                for gliomas, kept in sizes.items():
                    cells = []
                    for m in sequences:
                        here, there = (modality == m) & np.isin(size, kept), real_modality == m
                        expected = predicted(area[here], real_area[there], real_read[r][there]).mean()
                        cells.append(f"{read[here].mean():.2f} {expected:.2f} {np.median(area[here]):.3f} "
                                     f"{np.median(bright[here]):.4f}")
                    print(f"{model:10s} {name:9s} {r:11s} {gliomas:7s}  " + "  ".join(f"{c:>26s}" for c in cells),
                          flush=True)
    print(f"each sequence: share read as female, share its head areas predict ({K} nearest real slices), median "
          "head area, median bright area; 96 images a sequence (48 of each glioma size)")


if __name__ == "__main__":
    main()
