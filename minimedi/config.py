"""Configuration: plain dataclasses, named presets, and command-line flags generated from the fields.

A `Config` is a handful of sections (data, clip, unet, diffusion, train, classifier, align, sample).
A preset is a *named set of overrides* on top of the dataclass defaults, so nothing is copied:

    cfg = make_config("tiny")                          # defaults + the tiny overrides
    cfg = make_config("default", train={"steps": 10})  # plus your own

Every field becomes a flag `--field-name` of the field's type, e.g. `train.grad_clip` -> `--grad-clip`.
Field names are unique across sections so the flags stay short (`--lambda-clip 0.5`, `--n 16`).
`parse_config(argv, sections=...)` reads `--preset` first, so `--help` shows that preset's values.
"""
import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field


def opt(default, help, **argparse_kwargs):
    """A dataclass field with its `--help` text (and e.g. `choices`, `aliases`) kept beside the default."""
    meta = {"help": help, **argparse_kwargs}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # --run-dir spells the same flag for torchrun, whose own parser mistakes `--run` for its `--run-path`.
    run: str = opt("", "run directory (default: runs/<preset>)", aliases=("--run-dir",))
    seed: int = opt(0, "global random seed")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = opt(False, "continue from the run's checkpoint")
    compile: bool = opt(False, "torch.compile the UNet for training and sampling (slow first step; see benchmarks)")


@dataclass
class DataConfig:
    image_size: int = opt(32, "image side in pixels")
    data: str = opt("phantom", "pretraining data: phantom | roco:PATH | rocov2:PATH")
    target: str = opt("phantom", "target data for the subgroup classifier: phantom | brats:PATH")
    labels: str = opt("", "labels CSV for --target brats:PATH: subject,sex[,age] or OASIS-1 columns ID,M/F,Age")
    modality: str = opt("flair", "BraTS modality: t1 | t1ce | t2 | flair")
    n_pretrain: int = opt(20000, "size of the phantom pretraining corpus")
    n_target: int = opt(4000, "size of the phantom target corpus")
    pretrain_female: float = opt(0.2, "female share of the phantom pretraining corpus (the bias)")
    target_corpus_female: float = opt(0.45, "female share of the phantom target corpus")
    pretrain_tumor: float = opt(0.6, "glioma share of the phantom pretraining corpus (the rest are normal)")
    data_seed: int = opt(0, "seed of the phantom corpora")


@dataclass
class ClipConfig:
    clip: str = opt("", "real CLIP weights (OpenAI .pt or Hugging Face folder/file); empty = train a small one")
    clip_width: int = opt(128, "small CLIP: text width")
    clip_layers: int = opt(3, "small CLIP: text layers")
    clip_vision_width: int = opt(128, "small CLIP: vision width")
    clip_vision_layers: int = opt(3, "small CLIP: vision layers")
    clip_patch: int = opt(8, "small CLIP: vision patch size")
    clip_embed_dim: int = opt(128, "small CLIP: joint embedding size")
    clip_steps: int = opt(1000, "small CLIP: training steps")
    clip_batch: int = opt(128, "small CLIP: batch size")
    clip_lr: float = opt(1e-3, "small CLIP: peak learning rate")


@dataclass
class UNetConfig:
    dim: int = opt(32, "base channel width")
    dim_mults: tuple = opt((1, 2, 4), "width multiplier per resolution level")
    num_res_blocks: int = opt(1, "residual blocks per level")
    attn_resolutions: tuple = opt((8,), "feature-map sides that get self- and cross-attention")
    head_dim: int = opt(32, "attention head size")
    groups: int = opt(8, "GroupNorm groups")
    cond_drop: float = opt(0.1, "caption dropout for classifier-free guidance")


@dataclass
class DiffusionConfig:
    schedule: str = opt("cosine", "log-SNR schedule", choices=("cosine", "linear"))
    prediction: str = opt("v", "network target", choices=("eps", "v"))
    min_snr_gamma: float = opt(5.0, "min-SNR-gamma loss weighting (0 = off)")
    dynamic_threshold: float = opt(0.95, "Imagen dynamic-thresholding percentile when sampling (0 = off)")


@dataclass
class TrainConfig:
    task: str = opt("diffusion", "what to train", choices=("diffusion", "clip", "classifier"))
    steps: int = opt(1500, "optimisation steps")
    batch_size: int = opt(64, "global batch size")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup: int = opt(100, "linear warm-up steps")
    grad_clip: float = opt(1.0, "gradient norm clip")
    ema_decay: float = opt(0.995, "EMA decay of the weights")
    log_every: int = opt(25, "log metrics every N steps")
    sample_every: int = opt(500, "write a sample grid every N steps (0 = never)")
    ckpt_every: int = opt(250, "write a checkpoint every N steps")


@dataclass
class ClassifierConfig:
    subgroup: str = opt("sex", "subgroup axis", choices=("sex", "age", "sex_age"))
    cls_arch: str = opt("resnet", "classifier architecture", choices=("resnet", "vgg"))
    cls_width: int = opt(32, "classifier base width")
    cls_steps: int = opt(600, "classifier training steps")
    cls_batch: int = opt(128, "classifier batch size")
    cls_lr: float = opt(1e-3, "classifier learning rate")
    cls_holdout: float = opt(0.2, "share of the target images held out for calibration and metrics")


@dataclass
class AlignConfig:
    lambda_clip: float = opt(0.5, "weight of the CLIP-consistency (distillation) loss")
    target_female: typing.Optional[float] = opt(None, "target female share (default: the target corpus')")
    align_loss: str = opt("dal", "alignment loss", choices=("dal", "kl"))
    align_steps: int = opt(150, "alignment tuning steps")
    align_batch: int = opt(24, "images generated per step")
    align_lr: float = opt(1e-3, "alignment learning rate")
    align_ddim_steps: int = opt(10, "DDIM steps in the differentiable sampler")
    align_grad_steps: int = opt(3, "of those, how many (a random subset per step) carry gradient; 0 = all")
    align_checkpoint: bool = opt(False, "gradient checkpointing of the UNet calls (memory flat in the steps)")
    align_guidance: float = opt(3.0, "classifier-free guidance scale while tuning")
    uncertainty: float = opt(0.2, "drop assignments whose binomial uncertainty exceeds this")
    lora_rank: int = opt(8, "LoRA rank")
    full: bool = opt(False, "tune the whole UNet instead of LoRA adapters")
    align_ema: float = opt(0.95, "EMA decay of the tuned weights")
    report: bool = opt(True, "when done, write the before/after fairness report (python -m minimedi.evaluate)")


@dataclass
class SampleConfig:
    prompt: list = opt([], "caption (repeat for several)")
    n: int = opt(16, "images per prompt")
    sample_steps: int = opt(50, "sampler steps")
    sampler: str = opt("ddim", "sampler", choices=("ddpm", "ddim", "dpmpp2m"))
    eta: float = opt(0.0, "DDIM eta (0 = deterministic)")
    guidance: float = opt(3.0, "classifier-free guidance scale")
    out: str = opt("", "output PNG (default: <run>/samples/sample.png)")
    model: str = opt("diffusion", "which weights", choices=("diffusion", "aligned"))
    nifti: str = opt("", "also write the images as a NIfTI stack here")
    truncate: bool = opt(False, "cut prompts longer than 77 CLIP tokens instead of refusing them")


@dataclass
class EvalConfig:
    eval_n: int = opt(4, "evaluation: images per held-out prompt (64 prompts)")
    eval_steps: int = opt(50, "evaluation: DDIM steps")
    probe_steps: int = opt(800, "evaluation: training steps of the attribute probe")


@dataclass
class Config:
    preset: str = "default"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self):
        return self.run.run or f"runs/{self.preset}"


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "preset")

# Named presets: overrides of the dataclass defaults above, section by section.
PRESETS = {
    # Seconds per task: what tests and CI run.
    "tiny": {
        "data": {"image_size": 16, "n_pretrain": 512, "n_target": 256},
        "clip": {"clip_width": 64, "clip_layers": 2, "clip_vision_width": 64, "clip_vision_layers": 2,
                 "clip_embed_dim": 64, "clip_steps": 20, "clip_batch": 32},
        "unet": {"dim": 16, "dim_mults": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
                 "head_dim": 16, "groups": 4},
        "train": {"steps": 20, "batch_size": 8, "warmup": 5, "log_every": 5, "sample_every": 0,
                  "ckpt_every": 10},
        "classifier": {"cls_width": 8, "cls_steps": 20, "cls_batch": 32},
        "align": {"align_steps": 4, "align_batch": 4, "align_ddim_steps": 4, "align_grad_steps": 2, "lora_rank": 2,
                  "report": False},
        "sample": {"n": 2, "sample_steps": 4},
        "eval": {"eval_n": 1, "eval_steps": 2, "probe_steps": 10},
    },
    # The embedded phantom corpus at 32x32, sized for a 2-core CPU: the field defaults.
    "default": {},
    # 64x64 on real ROCO + BraTS paths, for a GPU (multi-GPU with torchrun).
    "paper": {
        "data": {"image_size": 64},
        "clip": {"clip_width": 512, "clip_layers": 8, "clip_vision_width": 512, "clip_vision_layers": 8,
                 "clip_patch": 8, "clip_embed_dim": 512, "clip_steps": 20000, "clip_batch": 512},
        "unet": {"dim": 128, "dim_mults": (1, 2, 3, 4), "num_res_blocks": 3, "attn_resolutions": (32, 16, 8),
                 "head_dim": 64, "groups": 32},
        "train": {"steps": 200000, "batch_size": 256, "lr": 1e-4, "warmup": 2000, "ema_decay": 0.9999,
                  "sample_every": 5000, "ckpt_every": 2000},
        "classifier": {"cls_width": 64, "cls_steps": 10000},
        "align": {"align_steps": 2000, "align_batch": 24, "align_lr": 1e-4, "align_ema": 0.995, "align_ddim_steps": 20,
                  "align_grad_steps": 0, "align_checkpoint": True,
                  "lora_rank": 50},
    },
}


def make_config(preset="default", **overrides):
    """The dataclass defaults, then the preset's overrides, then `overrides` (section -> {field: value})."""
    if preset not in PRESETS:
        from minimedi.errors import UserError
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for layer in (PRESETS[preset], overrides):
        for section, values in layer.items():
            setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


def config_to_dict(cfg):
    """A plain dict (only str/int/float/bool/list/None), safe for `torch.load(weights_only=True)`."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    d = {"preset": cfg.preset}
    for s in SECTIONS:
        d[s] = {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
    return d


def config_from_dict(d):
    """Inverse of `config_to_dict`; fields unknown to this version are ignored, missing ones defaulted."""
    cfg = Config(preset=d.get("preset", "default"))
    for s in SECTIONS:
        section = getattr(cfg, s)
        hints = typing.get_type_hints(type(section))
        known = {f.name for f in dataclasses.fields(section)}
        values = {k: tuple(v) if hints[k] is tuple else v for k, v in d.get(s, {}).items() if k in known}
        setattr(cfg, s, dataclasses.replace(section, **values))
    return cfg


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _add_field(group, f, typ, default):
    flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
    kwargs = {"help": f"{f.metadata.get('help', '')} [{default}]", "dest": f.name}
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if typ is bool:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kwargs)
    elif typ is tuple:
        group.add_argument(*flags, type=int, nargs="+", default=default, **kwargs)
    elif typ is list:
        group.add_argument(*flags, action="append", default=None, **kwargs)
    else:
        if typing.get_origin(typ) is typing.Union:  # Optional[X]
            typ = next(a for a in typing.get_args(typ) if a is not type(None))
        group.add_argument(*flags, type=typ, default=default, **kwargs)


def build_parser(cfg, sections, description=""):
    """An argparse parser with one flag per field of the named sections, defaulting to `cfg`'s values."""
    parser = _Parser(description=description)
    parser.add_argument("--preset", choices=tuple(PRESETS), default=cfg.preset, help="named preset [%(default)s]")
    for s in sections:
        section = getattr(cfg, s)
        group = parser.add_argument_group(s)
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            _add_field(group, f, hints[f.name], getattr(section, f.name))
    return parser


def parse_config(argv=None, sections=SECTIONS, description=""):
    """Parse `argv` into a Config: preset first, then every flag of `sections` on top of it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = _Parser(add_help=False)
    pre.add_argument("--preset", choices=tuple(PRESETS), default="default")
    preset = pre.parse_known_args(argv)[0].preset
    cfg = make_config(preset)
    args = build_parser(cfg, sections, description).parse_args(argv)
    for s in sections:
        section = getattr(cfg, s)
        hints = typing.get_type_hints(type(section))
        values = {}
        for f in dataclasses.fields(section):
            v = getattr(args, f.name)
            if hints[f.name] is tuple:
                v = tuple(v)
            elif hints[f.name] is list and v is None:  # an `append` flag never given
                v = getattr(section, f.name)
            values[f.name] = v
        setattr(cfg, s, dataclasses.replace(section, **values))
    return cfg

