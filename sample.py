"""Text -> images. `python sample.py --prompt "Axial FLAIR MRI of the brain showing a glioma" [--flags]`

--model diffusion (default) or aligned samples from <run>/diffusion.pt or <run>/aligned.pt; --model FOLDER
from a model exported with `python -m minimedi.export`. When the run (or the exported folder) has the
cascade's super-resolution stage (sr.pt: `python train.py --task sr`), the base model's images are enlarged
by it (--sr-aug-level, --sr-sample-steps, --sr-guidance), and every output is at its size; --stages base
samples the base model alone. Each --prompt is encoded with the frozen CLIP text
encoder the model was trained with; the images go to a PNG grid (one row per prompt) at --out (default
<run>/samples/sample.png) and, with --nifti PATH, to a NIfTI stack. Same --seed, same images.
"""
import os

from minimedi import distributed
from minimedi.errors import UserError, run_main
from minimedi.flags import parse_config
from minimedi.imageio import save_grid, save_nifti
from minimedi.pipeline import TextToImage, load_generator
from minimedi.tokenizer import Tokenizer

SECTIONS = ("run", "sample")


def check_prompts(prompts, truncate):
    if not prompts:
        raise UserError("give at least one --prompt \"...\"")
    if any(not p.strip() for p in prompts):
        raise UserError("empty --prompt: describe the image to generate")
    tokenizer = Tokenizer()
    for prompt in prompts:
        length = len(tokenizer.encode(prompt)) + 2  # + start and end tokens
        if length > 77 and not truncate:
            raise UserError(f"--prompt is too long: {length} CLIP tokens, the limit is 77 (shorten it or add "
                            f"--truncate): {prompt[:40]!r}...")


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description=__doc__)
    s = cfg.sample
    check_prompts(s.prompt, s.truncate)
    sr = {"aug_level": s.sr_aug_level, "steps": s.sr_steps, "guidance": s.sr_guidance, "keep_low": s.sr_keep_low}
    device = distributed.resolve_device(cfg.run.device)
    generator = load_generator(s.model, cfg.run_dir, device, s.truncate, s.stages, sr)
    if cfg.run.compile:
        generator.unet.compile()  # compiles on the first step (a minute or more on a CPU), then every step is faster
    prompts = [p for p in s.prompt for _ in range(s.n)]
    images = generator(prompts, s.steps, s.sampler, s.guidance, s.eta, cfg.run.seed)
    out = s.out or os.path.join(cfg.run_dir, "samples", "sample.png")
    save_grid(images, out, nrow=s.n if len(s.prompt) > 1 else min(s.n, 8), scale=max(1, 128 // generator.image_size))
    stages = "" if isinstance(generator, TextToImage) else f", then super-resolution at level {s.sr_aug_level}"
    print(f"wrote {out} ({len(prompts)} images of {generator.image_size} px, {s.sampler}, {s.steps} steps, "
          f"guidance {s.guidance}{stages})")
    if s.nifti:
        save_nifti(images, s.nifti)
        print(f"wrote {s.nifti}")


if __name__ == "__main__":
    run_main(main)
