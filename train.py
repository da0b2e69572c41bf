"""Pretraining. `python train.py [--task diffusion|clip|sr|classifier] [--preset tiny|default|paper] [--flags]`

  --task clip        a small CLIP, contrastively, on the pretraining corpus -> <run>/clip.pt
  --task diffusion   the text-to-image UNet on the pretraining corpus, conditioned on the frozen CLIP text
                     encoder (makes the small CLIP first when neither <run>/clip.pt nor --clip exists)
                     -> <run>/diffusion.pt, sample grids in <run>/samples/
  --task sr          the cascade's super-resolution stage (--image-size -> --sr-size) on top of the run's
                     diffusion.pt, trained on random crops -> <run>/sr.pt
  --task classifier  the subgroup classifier on the target corpus -> <run>/classifier.pt

Every task checkpoints periodically; Ctrl-C saves and exits 130, and --resume continues exactly.
Multi-GPU / multi-node: `torchrun --nproc_per_node N train.py --run-dir DIR ...` (PyTorch DDP).
"""
from minimedi import distributed, tasks
from minimedi.errors import run_main
from minimedi.flags import parse_config

SECTIONS = ("run", "data", "clip", "unet", "diffusion", "train", "sr", "classifier")


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description=__doc__)
    d = distributed.setup(cfg.run.device)
    try:
        tasks.run(cfg, cfg.train.task, d)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_main(main)
