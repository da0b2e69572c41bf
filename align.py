"""Fairness alignment tuning. `python align.py [--preset ...] [--lambda-clip 0.5] [--target-female P] [--flags]`

Fine-tunes the run's text-to-image model (<run>/diffusion.pt) so that the subgroup classifier
(<run>/classifier.pt) reads the target dataset's share of each subgroup in images generated from prompts
that do not name it, while a CLIP-consistency term keeps each image what the frozen model drew
(`minimedi/tasks/align.py`). Missing prerequisites are made first with the run's recorded config.
Writes <run>/aligned.pt (`python sample.py --model aligned`), then the before/after report (report.md,
report.json, fairness.png; --no-report skips it). Ctrl-C saves; --resume continues exactly.
"""
from minimedi import distributed, tasks
from minimedi.errors import UserError, run_main
from minimedi.flags import parse_config

SECTIONS = ("run", "align", "eval")


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description=__doc__)
    d = distributed.setup(cfg.run.device)
    try:
        if d.world > 1:
            raise UserError("align.py tunes in one process (LoRA on a few dozen images a step): run it without torchrun")
        tasks.run(cfg, "aligned", d)
        if cfg.align.report:
            tasks.run(cfg, "report", d)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_main(main)
