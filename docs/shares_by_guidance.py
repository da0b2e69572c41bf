"""Female share by MR sequence at guidance 0 (the null caption's branch alone), 1 (the captioned branch
alone) and 3 (the guided prediction the report samples), for the base and the aligned model.

The guided prediction is uncond + w (cond - uncond). Alignment tuning trains a LoRA that both branches run
through, so tuning moves the null caption's prediction too, for every prompt alike, while the captioned
branch of a prompt tuning never saw moves only as far as the tuning carries to it. This draws 6 images of
every held-out prompt of the report and of every neutral tuning prompt from one noise at each guidance, and
prints the raw share the tuning classifier reads as female by sequence (the same reader everywhere; not
corrected), so that each branch's move can be read apart: at w = 0 the sequence columns only split the
noise (docs/fairness_experiments.md, "The worst sequence").

    python docs/shares_by_guidance.py --run runs/det-s0
"""
import argparse
import os

import numpy as np

from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.captions import evaluation_prompts, tuning_prompts
from minimedi.pipeline import load_generator


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    classifier, _ = load_classifier(os.path.join(args.run, "classifier.pt"), "cpu")
    sets = {"tuning": tuning_prompts(), "held-out": evaluation_prompts()}
    sequences = list(dict.fromkeys(p["modality"] for p in sets["held-out"]))
    print(f"{'model':10s} {'prompts':9s} {'w':>3s}  {'all':>6s}  " + "  ".join(f"{m:>6s}" for m in sequences))
    for model in ("diffusion", "aligned"):
        generator = load_generator(model, args.run, "cpu")
        for name, prompts in sets.items():
            prompts = [p for p in prompts for _ in range(6)]
            texts, modality = [p["prompt"] for p in prompts], np.array([p["modality"] for p in prompts])
            for w in (0.0, 1.0, 3.0):  # one batch, one seed: the same noise at every guidance, for both models
                images = generator(texts, args.steps, guidance=w, seed=0, batch_size=len(texts))
                female = calibrated_log_odds(classifier, images).numpy() > 0
                cells = "  ".join(f"{female[modality == m].mean():6.3f}" for m in sequences)
                print(f"{model:10s} {name:9s} {w:3.0f}  {female.mean():6.3f}  {cells}", flush=True)
    print("raw share read as female by the tuning classifier; 96 images a sequence, 384 a row")


if __name__ == "__main__":
    main()
