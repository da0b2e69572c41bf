"""The pipeline of artifacts: what each file of a run folder is, what makes it, and what it needs first.

    clip.pt ─────> diffusion.pt ──┬──> sr.pt (the cascade's super-resolution stage)
                        │         ├──> aligned.pt ──> report.md / report.json / fairness.png
                        └──> classifier.pt ──┘

(classifier.pt needs diffusion.pt only to re-render its training images, `--cls-rerendered`; at 0 it
learns from the target corpus alone.)

Each artifact is made by one function (`make_<name>(cfg, d)`, one file each in this package). Scripts call
`run(cfg, name)`: it makes what the run is missing first (`ensure`), then the artifact asked for. A missing
prerequisite is made with the run's *recorded* config (the sections its existing artifacts were trained
with, `recorded_config`), so `python align.py` on a run trained on ROCO never makes a classifier or a
diffusion model on other data; when the record cannot say (the run learned from real data but names no
real target), it stops with one line naming the command to run. An interrupted artifact (a checkpoint
short of its total) is resumed, not restarted.

Under torchrun, the artifacts that train with DDP are made by every rank together; the others by rank 0
while the rest wait at a barrier, so no rank reads a file before it is whole.
"""
import dataclasses
import os
from dataclasses import dataclass

from minimedi import distributed
from minimedi.checkpoint import load_checkpoint
from minimedi.config import config_from_dict
from minimedi.errors import UserError
from minimedi.lora import UNET_TARGETS
from minimedi.tasks.align import make_aligned
from minimedi.tasks.classifier import make_classifier
from minimedi.tasks.clip import clip_config, make_clip
from minimedi.tasks.diffusion import make_diffusion
from minimedi.tasks.report import make_report
from minimedi.tasks.sr import make_sr
from minimedi.unet import check_config as check_unet


@dataclass(frozen=True)
class Artifact:
    file: str           # in the run folder
    make: object        # make(cfg, d)
    needs: object       # needs(cfg) -> names of the artifacts to make first
    command: str        # what a user types to make it
    sections: tuple     # the config sections it records and a prerequisite made later should reuse
    ddp: bool           # trained by every rank under torchrun (else by rank 0 alone)
    data: str = ""      # the DataConfig field naming the corpus it learns from ("pretrain" or "target")


# The DataConfig fields that describe each corpus: an artifact's record speaks for its own side only.
DATA_FIELDS = {"pretrain": ("image_size", "pretrain", "n_pretrain", "pretrain_female", "pretrain_tumor", "seed"),
               "target": ("image_size", "target", "labels", "modality", "fov", "min_brain", "n_target",
                          "target_corpus_female", "seed")}


ARTIFACTS = {
    "clip": Artifact("clip.pt", make_clip, lambda cfg: (), "python train.py --task clip", ("clip",), ddp=True,
                     data="pretrain"),
    "diffusion": Artifact("diffusion.pt", make_diffusion, lambda cfg: () if cfg.clip.weights else ("clip",),
                          "python train.py", ("clip", "unet", "diffusion", "train"), ddp=True, data="pretrain"),
    # needs no prerequisite made on demand: without the run's diffusion.pt it refuses (`tasks.sr.base_model`)
    "sr": Artifact("sr.pt", make_sr, lambda cfg: (), "python train.py --task sr", ("sr",), ddp=True),
    "classifier": Artifact("classifier.pt", make_classifier,
                           lambda cfg: ("diffusion",) if cfg.classifier.rerendered else (),
                           "python train.py --task classifier", ("classifier",), ddp=False, data="target"),
    "aligned": Artifact("aligned.pt", make_aligned, lambda cfg: ("diffusion", "classifier"), "python align.py",
                        ("align",), ddp=False),
    "report": Artifact("report.json", make_report, lambda cfg: ("diffusion", "classifier"),
                       "python -m minimedi.evaluate",
                       (), ddp=False),
}
RECORD_ORDER = ("classifier", "clip", "diffusion")  # later ones win where two recorded the same section


def status(path):
    """"missing", "unfinished" (an interrupted training run) or "finished"."""
    if not os.path.exists(path):
        return "missing"
    ckpt = load_checkpoint(path)
    return "finished" if ckpt.get("finished", True) else "unfinished"


def recorded_config(cfg):
    """`cfg` with what the run's existing artifacts recorded put back: each artifact's own sections, and the
    data fields of the corpus it learned from (`DATA_FIELDS`)."""
    sections, data = {}, {}
    for name in RECORD_ORDER:
        art = ARTIFACTS[name]
        path = os.path.join(cfg.run_dir, art.file)
        if os.path.exists(path):
            saved = load_checkpoint(path)["config"]
            sections.update({s: saved[s] for s in art.sections if s in saved})
            data.update({k: saved["data"][k] for k in DATA_FIELDS[art.data] if k in saved["data"]})
    if not sections and not data:
        return cfg
    from_record = config_from_dict({"preset": cfg.preset, **sections})
    out = dataclasses.replace(cfg, **{s: getattr(from_record, s) for s in sections})
    return dataclasses.replace(out, data=dataclasses.replace(out.data, **data))


def refuse_phantom_substitute(cfg, name):
    """A run that learned from real data must never get a prerequisite made from the phantom."""
    art = ARTIFACTS[name]
    if not art.data or getattr(cfg.data, art.data) != "phantom":
        return
    real = [f"{field} {getattr(cfg.data, f)}" for f, field in (("pretrain", "--data"), ("target", "--target"))
            if getattr(cfg.data, f) != "phantom"]
    if real:
        flag = "--data roco:PATH" if art.data == "pretrain" else "--target brats:PATH --labels CSV"
        raise UserError(f"{cfg.run_dir}/{art.file} is missing and this run learned from {', '.join(real)}, "
                        f"not the phantom: make it with `{art.command} {flag} --run {cfg.run_dir}`")


def ensure(cfg, name, d):
    """Make `name` with the run's recorded config unless the run has it finished (resume it if interrupted)."""
    art = ARTIFACTS[name]
    path = os.path.join(cfg.run_dir, art.file)
    state = status(path) if name != "report" else "missing"
    if state == "finished":
        return
    made = recorded_config(cfg)
    for need in art.needs(made):
        ensure(cfg, need, d)
    refuse_phantom_substitute(made, name)
    if d.main:
        doing = "resuming it" if state == "unfinished" else "making it first"
        print(f"{path} {'is unfinished' if state == 'unfinished' else 'not found'}: {doing} ({art.command})")
    made = dataclasses.replace(made, run=dataclasses.replace(made.run, resume=state == "unfinished"))
    build(made, name, d)


def build(cfg, name, d):
    """Run `name`'s make function on the ranks that make it, then let every rank go on once the file is whole."""
    art = ARTIFACTS[name]
    if art.ddp or d.main:
        art.make(cfg, d)
    distributed.barrier(d)


def run(cfg, name, d):
    """What a script does: make `name` from `cfg` (the command line), after whatever it needs first."""
    preflight(cfg)
    for need in ARTIFACTS[name].needs(cfg):
        ensure(cfg, need, d)
    build(cfg, name, d)


def preflight(cfg):
    """Everything about `cfg` that can be checked in a moment, checked before any long work: the files and
    folders it names exist, and the shapes it asks for can be built (one `UserError` line otherwise)."""
    for flag, path in (("--clip", cfg.clip.weights), ("--labels", cfg.data.labels)):
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such file or folder")
    for flag, spec, kinds in (("--data", cfg.data.pretrain, ("roco", "rocov2")), ("--target", cfg.data.target, ("brats",))):
        kind, _, path = spec.partition(":")
        if spec != "phantom" and (kind not in kinds or not path):
            raise UserError(f"{flag} {spec}: expected phantom or {' or '.join(k + ':PATH' for k in kinds)}")
        if path and not os.path.isdir(path):
            raise UserError(f"{flag} {spec}: {path} is not a directory")
    if cfg.data.target.startswith("brats:") and not cfg.data.labels:
        raise UserError("--target brats:PATH needs --labels CSV (subject,sex): BraTS ships no sex")
    if cfg.align.batch % cfg.align.per_prompt:
        raise UserError(f"--align-batch {cfg.align.batch} is not a multiple of --align-per-prompt {cfg.align.per_prompt}")
    unknown = set(cfg.align.lora_targets.split(",")) - set(UNET_TARGETS + ("text",))
    if unknown:
        raise UserError(f"--lora-targets {cfg.align.lora_targets}: {', '.join(sorted(unknown))} is not one of "
                        f"{','.join(UNET_TARGETS + ('text',))}")
    check_unet(cfg.unet, cfg.data.image_size)
    if not cfg.clip.weights:
        clip_config(cfg.clip, cfg.data.image_size)
