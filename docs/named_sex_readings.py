"""How surely the tuning classifier reads images of prompts that name sex, against real slices of that sex.

Reproduces the diagnosis in docs/fairness_experiments.md ("The re-rendered tuning classifier, with the
one-sided cap"): the calibrated log-odds toward each image's own (or named) sex, as quantiles, the median
head area and the share read as that sex (log-odds > 0), for
- the real target slices the classifier never trained on (what `--align-cap` matches to), and how far the head
  areas of 64 of them (a named sex's images in the report) stray from all of them by chance;
- 128 of them of each sex re-rendered by the base model (SDEdit, as the classifier's training images);
- the base and the aligned model's images of the report's 32 "woman" and 32 "man" prompts, twice each, and
  of the 64 captions of each named sex that tuning draws from (`--named-sex`), once each: whether a shortfall
  on the report's prompts is one on the tuning's own prompts too.

    python docs/named_sex_readings.py --run runs/fair-s0
"""
import argparse
import os

import numpy as np
import torch

from minimedi import diffusion
from minimedi.checkpoint import load_checkpoint
from minimedi.classifier import calibrated_log_odds, load_classifier
from minimedi.data.captions import named_sex_evaluation_prompts, named_sex_tuning_prompts
from minimedi.data.reference import classifier_reference
from minimedi.morphometry import head_area, ks_distance
from minimedi.pipeline import load_generator
from minimedi.rerender import rerender

LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


def row(name, toward, areas):
    quantiles = "  ".join(f"{q:6.2f}" for q in np.quantile(toward, LEVELS))
    print(f"{name:36s} {quantiles}   {np.median(areas):16.3f}   {np.mean(toward > 0):16.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True)
    run = parser.parse_args().run
    classifier, ckpt = load_classifier(os.path.join(run, "classifier.pt"), "cpu")
    real = classifier_reference(ckpt)
    female = np.array([a["sex"] == "female" for a in real.attributes])
    real_lo, real_area = calibrated_log_odds(classifier, real.images).numpy(), head_area(real.images.float()).numpy()
    print(f"{'log-odds toward own sex':36s} " + "  ".join(f"{q:>6.0%}" for q in LEVELS) +
          "   median head area   read as that sex")
    row("real women", real_lo[female], real_area[female])
    row("real men", -real_lo[~female], real_area[~female])
    rng = np.random.default_rng(0)
    for sex, of_sex in (("women", female), ("men", ~female)):
        areas = torch.from_numpy(real_area[of_sex])
        ks = np.array([float(ks_distance(areas[rng.choice(len(areas), 64, replace=False)], areas)) for _ in range(500)])
        print(f"  64 real {sex}' head areas against all: KS {ks.mean():.3f} on average, over 0.15 in {np.mean(ks > 0.15):.0%}")
    base = load_generator("diffusion", run, "cpu")
    chosen = np.concatenate([np.flatnonzero(female)[:128], np.flatnonzero(~female)[:128]])
    redrawn = rerender(base, real.images[chosen].float(), [real.captions[i] for i in chosen], seed=0)
    lo, area = calibrated_log_odds(classifier, redrawn).numpy(), head_area(redrawn).numpy()
    row("128 real women, re-rendered", lo[:128], area[:128])
    row("128 real men, re-rendered", -lo[128:], area[128:])
    log_snrs = diffusion.sampling_log_snrs(25, base.diffusion.schedule)
    for model in ("diffusion", "aligned"):
        generator = base if model == "diffusion" else load_generator(model, run, "cpu")
        for sex, sign in (("female", 1), ("male", -1)):
            for which, named in (("", named_sex_evaluation_prompts), (" (tuning's)", named_sex_tuning_prompts)):
                prompts = [p["prompt"] for p in named()[sex]]
                prompts = prompts * (64 // len(prompts))
                noise = torch.randn(len(prompts), 1, base.image_size, base.image_size,
                                    generator=torch.Generator().manual_seed(1))
                with torch.inference_mode():
                    images = diffusion.sample_ddim(generator.denoiser(prompts, 3.0), noise, log_snrs)
                row(f"{model}, {'woman' if sex == 'female' else 'man'} prompts{which}",
                    sign * calibrated_log_odds(classifier, images).numpy(), head_area(images).numpy())


if __name__ == "__main__":
    main()
