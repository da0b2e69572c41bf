"""Female share by MR sequence at the tuning's DDIM chain (10 steps) and the report's (25 steps).

align.py tunes on images from a 10-step chain (`--align-ddim-steps`); the report reads 25-step images. If
the tuned model drew each sequence at its target only on the chain it was tuned on, the report's
per-sequence spread would be a mismatch of samplers rather than of tuning. This draws the report's 64
held-out prompts x 6 images from the same noise at both lengths, and prints for each model the raw share
the tuning classifier reads as female (not corrected; the same reader at both lengths) and the median
head area, by sequence (docs/fairness_experiments.md, "The worst sequence").

    python docs/shares_by_chain_length.py --run runs/det-s0
"""
import argparse
import os

import numpy as np
import torch

from minimedi import diffusion
from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.captions import evaluation_prompts
from minimedi.morphometry import head_area
from minimedi.pipeline import load_generator


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    classifier, _ = load_classifier(os.path.join(run, "classifier.pt"), "cpu")
    prompts = [p for p in evaluation_prompts() for _ in range(6)]
    texts, modality = [p["prompt"] for p in prompts], np.array([p["modality"] for p in prompts])
    sequences = list(dict.fromkeys(modality))
    print(f"{'model':10s} {'steps':>5s}  {'all':>6s}  " + "  ".join(f"{m:>12s}" for m in sequences))
    for model in ("diffusion", "aligned"):
        generator = load_generator(model, run, "cpu")
        noise = torch.randn(len(texts), 1, generator.image_size, generator.image_size,
                            generator=torch.Generator().manual_seed(0))
        for steps in (10, 25):
            log_snrs = diffusion.sampling_log_snrs(steps, generator.diffusion.schedule)
            with torch.inference_mode():
                images = torch.cat([diffusion.sample_ddim(generator.denoiser(texts[i:i + 96], 3.0), noise[i:i + 96],
                                                          log_snrs) for i in range(0, len(texts), 96)])
            female, area = calibrated_log_odds(classifier, images).numpy() > 0, head_area(images).numpy()
            cells = "  ".join(f"{female[modality == m].mean():.3f} {np.median(area[modality == m]):.3f}"
                              for m in sequences)
            print(f"{model:10s} {steps:5d}  {female.mean():6.3f}  {cells}")
    print("each sequence: raw share read as female, median head area; 96 images a sequence")


if __name__ == "__main__":
    main()
