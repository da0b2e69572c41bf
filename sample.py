"""Text -> images. `python sample.py --prompt "Axial FLAIR MRI of the brain showing a glioma" [--flags]`

Loads <run>/diffusion.pt (its EMA weights) or, with --model aligned, <run>/aligned.pt, encodes each
--prompt with the frozen CLIP text encoder the model was trained with, and writes a PNG grid (one row
per prompt) to --out (default <run>/samples/sample.png); --nifti PATH also writes the images as a NIfTI
stack. Same --seed, same images.
"""
import os

import torch

from minimedi import diffusion
from minimedi.config import parse_config
from minimedi.errors import UserError, run_main
from minimedi.imageio import save_grid, save_nifti
from minimedi.pipeline import load_generator
from minimedi.training import resolve_device
from minimedi.tokenizer import Tokenizer

SECTIONS = ("run", "sample")


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description=__doc__)
    s = cfg.sample
    if not s.prompt:
        raise UserError("give at least one --prompt \"...\"")
    if any(not p.strip() for p in s.prompt):
        raise UserError("empty --prompt: describe the image to generate")
    if s.n < 1 or s.steps < 1:
        raise UserError("--n and --sample-steps must be at least 1")
    tokenizer = Tokenizer()
    for prompt in s.prompt:
        length = len(tokenizer.encode(prompt)) + 2  # + start and end tokens
        if length > 77 and not s.truncate:
            raise UserError(f"--prompt is too long: {length} CLIP tokens, the limit is 77 (shorten it or add "
                            f"--truncate): {prompt[:40]!r}...")
    device = torch.device(resolve_device(cfg.run.device))
    unet, encoder, model_cfg = load_generator(cfg.run_dir, s.model, device, truncate=s.truncate)
    if cfg.run.compile:
        unet.compile()  # compiles on the first step (a minute or more on a CPU), then every step is faster

    prompts = [p for p in s.prompt for _ in range(s.n)]
    states, mask, pooled = encoder.encode(prompts)
    denoise = diffusion.make_denoiser(unet, states, mask, pooled, s.guidance, model_cfg.diffusion.prediction,
                                      model_cfg.diffusion.dynamic_threshold)
    size = model_cfg.data.image_size
    g = torch.Generator(device).manual_seed(cfg.run.seed)
    with torch.inference_mode():
        images = diffusion.sample(denoise, (len(prompts), 1, size, size), s.steps, s.sampler,
                                  model_cfg.diffusion.schedule, s.eta, generator=g, device=device)

    out = s.out or os.path.join(cfg.run_dir, "samples", "sample.png")
    save_grid(images, out, nrow=s.n if len(s.prompt) > 1 else min(s.n, 8), scale=max(1, 128 // size))
    print(f"wrote {out} ({len(prompts)} images, {s.sampler}, {s.steps} steps, guidance {s.guidance})")
    if s.nifti:
        save_nifti(images, s.nifti)
        print(f"wrote {s.nifti}")


if __name__ == "__main__":
    run_main(main)
