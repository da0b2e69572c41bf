"""Configuration: plain dataclasses and named presets.

A `Config` is a handful of sections (run, data, clip, unet, diffusion, train, sr, sr_eval, classifier, align,
sample, eval). A preset is a *named set of overrides* on top of the dataclass defaults, so nothing is
copied:

    cfg = make_config("tiny")                          # defaults + the tiny overrides
    cfg = make_config("default", train={"steps": 10})  # plus your own

Each field carries, beside its default, its `--help` text and optionally its flag name, valid range (`ge`,
`gt`, `le`, `lt`) or `choices`: `minimedi/flags.py` turns every field into a checked command-line flag.
A field's name reads well inside its section (`cfg.align.steps`, `cfg.classifier.width`). Checkpoints
carry `config_to_dict(cfg)`, and `config_from_dict` rebuilds the config from it.
"""
import dataclasses
import typing
from dataclasses import dataclass, field

from minimedi.errors import UserError


def opt(default, help, flag=None, **meta):
    """A dataclass field with its `--help` text, and optionally its flag name, valid range
    (ge / gt / le / lt), `choices` or `aliases`, kept beside the default."""
    meta = {"help": help, "flag": flag, **meta}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    # --run-dir spells the same flag for torchrun, whose own parser mistakes `--run` for its `--run-path`.
    dir: str = opt("", "run directory (default: runs/<preset>)", flag="--run", aliases=("--run-dir",))
    seed: int = opt(0, "global random seed", ge=0)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = opt(False, "continue the artifact's interrupted (or finished, to extend it) training run")
    compile: bool = opt(False, "torch.compile the UNet for training and sampling (slow first step; see benchmarks)")


@dataclass
class DataConfig:
    image_size: int = opt(32, "image side in pixels (the base model's resolution)", ge=8)
    pretrain: str = opt("phantom", "pretraining data: phantom | roco:PATH | rocov2:PATH", flag="--data")
    target: str = opt("phantom", "target data for the subgroup classifier: phantom | brats:PATH")
    labels: str = opt("", "labels CSV for --target brats:PATH: subject,sex[,age] or OASIS-1 columns ID,M/F,Age")
    modality: str = opt("all", "BraTS sequence(s) the target classifier learns from (all: every sequence the "
                        "prompts name)", choices=("all", "t1", "t1ce", "t2", "flair"))
    fov: float = opt(240.0, "BraTS: field of view in mm that a slice is resampled to (square pixels of fov/size)",
                     gt=0)
    min_brain: float = opt(0.5, "BraTS: keep axial slices whose brain area is at least this share of the largest",
                           gt=0, le=1)
    n_pretrain: int = opt(20000, "size of the phantom pretraining corpus", ge=1)
    n_target: int = opt(4000, "size of the phantom target corpus", ge=10)
    pretrain_female: float = opt(0.2, "female share of the phantom pretraining corpus (the bias)", ge=0, le=1)
    target_corpus_female: float = opt(0.45, "female share of the phantom target corpus", ge=0, le=1)
    pretrain_tumor: float = opt(0.6, "glioma share of the phantom pretraining corpus (the rest are normal)",
                                ge=0, le=1)
    seed: int = opt(0, "seed of the phantom corpora", flag="--data-seed", ge=0)


@dataclass
class ClipConfig:
    weights: str = opt("", "real CLIP weights (OpenAI .pt or Hugging Face folder/file); empty = train a small one",
                       flag="--clip")
    width: int = opt(128, "small CLIP: text width", flag="--clip-width", ge=1)
    layers: int = opt(3, "small CLIP: text layers", flag="--clip-layers", ge=1)
    head_dim: int = opt(64, "small CLIP: attention head size (heads = width / head size, at least 1)",
                        flag="--clip-head-dim", ge=1)
    vision_width: int = opt(128, "small CLIP: vision width", flag="--clip-vision-width", ge=1)
    vision_layers: int = opt(3, "small CLIP: vision layers", flag="--clip-vision-layers", ge=1)
    patch: int = opt(8, "small CLIP: vision patch size", flag="--clip-patch", ge=1)
    embed_dim: int = opt(128, "small CLIP: joint embedding size", flag="--clip-embed-dim", ge=1)
    steps: int = opt(1000, "small CLIP: training steps", flag="--clip-steps", ge=1)
    batch: int = opt(128, "small CLIP: global batch size", flag="--clip-batch", ge=2)
    lr: float = opt(1e-3, "small CLIP: peak learning rate", flag="--clip-lr", gt=0)


@dataclass
class UNetConfig:
    dim: int = opt(32, "base channel width", ge=1)
    dim_mults: tuple = opt((1, 2, 4), "width multiplier per resolution level", ge=1)
    num_res_blocks: int = opt(1, "residual blocks per level", ge=1)
    attn_resolutions: tuple = opt((8,), "feature-map sides that get self- and cross-attention", ge=1)
    head_dim: int = opt(32, "attention head size", ge=1)
    groups: int = opt(8, "GroupNorm groups", ge=1)
    cond_drop: float = opt(0.1, "caption dropout for classifier-free guidance", ge=0, lt=1)


@dataclass
class DiffusionConfig:
    schedule: str = opt("cosine", "log-SNR schedule", choices=("cosine", "linear"))
    prediction: str = opt("v", "network target", choices=("eps", "v"))
    min_snr_gamma: float = opt(5.0, "min-SNR-gamma loss weighting (0 = off)", ge=0)
    dynamic_threshold: float = opt(0.95, "Imagen dynamic-thresholding percentile when sampling (0 = off)",
                                   ge=0, lt=1)


@dataclass
class TrainConfig:
    task: str = opt("diffusion", "what to train", choices=("diffusion", "clip", "sr", "classifier"))
    steps: int = opt(1500, "optimisation steps", ge=1)
    batch_size: int = opt(64, "global batch size", ge=1)
    lr: float = opt(1e-3, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0)
    warmup: int = opt(100, "linear warm-up steps", ge=0)
    grad_clip: float = opt(1.0, "gradient norm clip", gt=0)
    ema_decay: float = opt(0.995, "EMA decay of the weights", ge=0, lt=1)
    log_every: int = opt(25, "log metrics every N steps", ge=1)
    sample_every: int = opt(500, "write a sample grid every N steps (0 = never)", ge=0)
    ckpt_every: int = opt(250, "write a checkpoint every N steps (every task)", ge=1)


@dataclass
class SRConfig:
    """The super-resolution stage of the cascade (Imagen sec. 2.5): --image-size -> size, trained on crops."""
    size: int = opt(128, "super-resolution stage: output side, a multiple of --image-size", flag="--sr-size", ge=16)
    crop: int = opt(64, "super-resolution stage: training crop side (0 = the whole image)", flag="--sr-crop", ge=0)
    n: int = opt(2000, "super-resolution stage: training pairs (the first n of the pretraining data)",
                 flag="--sr-n", ge=1)
    pairs: str = opt("pretrain", "super-resolution stage: the corpus its pairs come from: the base model's "
                     "pretraining data, or the target data (--target; its subgroup mix is the one alignment aims at)",
                     flag="--sr-pairs", choices=("pretrain", "target"))
    dim: int = opt(16, "super-resolution UNet: channel width at the output resolution", flag="--sr-dim", ge=1)
    dim_mults: tuple = opt((2, 4, 4), "super-resolution UNet: width multiplier per level (each level halves the "
                           "side first)", flag="--sr-dim-mults", ge=1)
    num_res_blocks: tuple = opt((1, 1, 2), "super-resolution UNet: residual blocks per level (more at low "
                                "resolution)", flag="--sr-res-blocks", ge=1)
    attn_resolutions: tuple = opt((16,), "super-resolution UNet: sides (at the output size) with cross-attention "
                                  "to the caption", flag="--sr-attn-resolutions", ge=1)
    head_dim: int = opt(32, "super-resolution UNet: attention head size", flag="--sr-head-dim", ge=1)
    groups: int = opt(8, "super-resolution UNet: GroupNorm groups", flag="--sr-groups", ge=1)
    cond_drop: float = opt(0.1, "super-resolution UNet: caption dropout for classifier-free guidance",
                           flag="--sr-cond-drop", ge=0, lt=1)
    steps: int = opt(800, "super-resolution stage: optimisation steps", flag="--sr-steps", ge=1)
    batch: int = opt(32, "super-resolution stage: global batch size", flag="--sr-batch", ge=1)
    lr: float = opt(2e-3, "super-resolution stage: peak learning rate (AdamW)", flag="--sr-lr", gt=0)
    min_snr_gamma: float = opt(0.0, "super-resolution stage: min-SNR-gamma loss weighting (0 = off: the plain "
                               "v loss keeps the noisiest levels, where the condition is all there is)",
                               flag="--sr-min-snr-gamma", ge=0)
    aug_max: float = opt(0.5, "noise conditioning augmentation: training levels ~ U[0, this]", flag="--sr-aug-max",
                         ge=0, le=1)


@dataclass
class SREvalConfig:
    """`python -m minimedi.sr_eval`: the SR stage against bicubic, and fairness through the cascade."""
    n: int = opt(32, "SR evaluation: held-out real pairs, and cascade samples per model", flag="--sr-eval-n", ge=2)
    steps: int = opt(25, "SR evaluation: the base model's DDIM steps", flag="--sr-eval-steps", ge=1)
    features: int = opt(600, "SR evaluation: target images at the final size the sex classifier (and FID "
                        "feature space) learns from", flag="--sr-eval-features", ge=10)
    feature_steps: int = opt(150, "SR evaluation: that classifier's training steps", flag="--sr-eval-feature-steps",
                             ge=1)
    feature_width: int = opt(8, "SR evaluation: that classifier's base width", flag="--sr-eval-feature-width", ge=1)
    # Blurring real 128 px renders (3 x 3 box) took the share a classifier trained without blur reads from 0.240
    # to 0.094 (96 slices): it read sharpness as sex, and the SR stage's outputs are a little smoother than renders.
    feature_blur: float = opt(1.0, "SR evaluation: that classifier's blur augmentation (see --cls-blur)",
                              flag="--sr-eval-feature-blur", ge=0, le=1)


@dataclass
class ClassifierConfig:
    subgroup: str = opt("sex", "subgroup axis", choices=("sex", "age", "sex_age"))
    arch: str = opt("resnet", "classifier architecture", flag="--cls-arch", choices=("resnet", "vgg"))
    width: int = opt(32, "classifier base width", flag="--cls-width", ge=1)
    steps: int = opt(600, "classifier training steps", flag="--cls-steps", ge=1)
    batch: int = opt(128, "classifier batch size", flag="--cls-batch", ge=1)
    lr: float = opt(1e-3, "classifier learning rate", flag="--cls-lr", gt=0)
    holdout: float = opt(0.2, "share of the target images held out for calibration and metrics",
                         flag="--cls-holdout", gt=0, lt=1)
    blur: float = opt(0.0, "augmentation: the largest weight of a 3 x 3 box blur mixed into each training image",
                      flag="--cls-blur", ge=0, le=1)
    rerendered: float = opt(0.5, "share of the training images shown re-rendered by the run's diffusion.pt "
                                 "(SDEdit, minimedi.rerender) under their real label; 0: real images only, "
                                 "and no diffusion.pt needed", flag="--cls-rerendered", ge=0, le=1)
    rerender_start: float = opt(0.4, "where in the 10-step DDIM chain the re-rendering starts (0: pure noise, "
                                     "1: the image itself)", flag="--cls-rerender-start", ge=0, le=1)


@dataclass
class AlignConfig:
    lambda_clip: float = opt(0.5, "weight of the CLIP-consistency (distillation) loss", ge=0)
    lambda_null: float = opt(0.0, "weight of the term that holds the null caption's prediction at the frozen "
                                  "model's (mean squared distance at the steps that carry gradient)", ge=0)
    target_female: typing.Optional[float] = opt(None, "target female share (default: the target corpus')",
                                                ge=0, le=1)
    loss: str = opt("dal", "alignment loss", flag="--align-loss", choices=("dal", "kl"))
    steps: int = opt(150, "alignment tuning steps", flag="--align-steps", ge=1)
    batch: int = opt(24, "images generated per step", flag="--align-batch", ge=2)
    per_prompt: int = opt(12, "images per prompt: a step is batch / per_prompt prompts, each drawn this many times",
                          flag="--align-per-prompt", ge=1)
    per_prompt_ot: bool = opt(True, "assign targets within each prompt's images (--no-per-prompt-ot: one "
                                    "assignment over the whole batch, the ablation)")
    phrasings: int = opt(1, "grammar captions per attribute combination among the tuning prompts (1: 64 neutral "
                            "prompts; 8 or 16 did not reach the report's phrasing better, README)",
                         flag="--align-phrasings", ge=1, le=16)
    templates: int = opt(0, "also tune on each combination in this many tuning-only sentence shapes "
                            "(captions.TUNING_TEMPLATES; 0: the grammar's alone)", flag="--align-templates", ge=0, le=3)
    focus: float = opt(0.0, "draw the neutral tuning prompts of sequences further from the target more often: "
                            "weight exp(focus |running share - target|) (0: uniformly)", flag="--align-focus", ge=0)
    named_sex: float = opt(0.25, "share of tuning prompts that name sex, with that sex as their target "
                                 "(0 = none, the ablation)", ge=0, le=1)
    cap: str = opt("match", "pull each image to the classifier's reading of its matched real target image from "
                            "either side (match), only stop pushing it there (stop), or plain cross-entropy (none)",
                   flag="--align-cap", choices=("match", "stop", "none"))
    lr: float = opt(1e-3, "alignment learning rate", flag="--align-lr", gt=0)
    ddim_steps: int = opt(10, "DDIM steps in the differentiable sampler", flag="--align-ddim-steps", ge=1)
    grad_steps: int = opt(3, "of those, how many (a random subset per step) carry gradient; 0 = all",
                          flag="--align-grad-steps", ge=0)
    checkpoint: bool = opt(False, "gradient checkpointing of the UNet calls (memory flat in the steps)",
                           flag="--align-checkpoint")
    guidance: float = opt(3.0, "classifier-free guidance scale while tuning", flag="--align-guidance", ge=0)
    detach_uncond: bool = opt(True, "the tuning gradient (alignment and CLIP terms) reaches the weights through the "
                                    "captioned branch of the guided prediction only, not the shared null caption's",
                              flag="--align-detach-uncond")
    uncertainty: float = opt(1.0, "drop assignments whose binomial uncertainty exceeds this (1: keep all; "
                                  "Shen et al.'s 0.2 weakens the pull near the target)", ge=0, le=1)
    lora_rank: int = opt(8, "LoRA rank", ge=1)
    lora_targets: str = opt("qkv,q,kv,out,film", "the UNet's linear layers that get adapters, by name, comma-separated: "
                                                 "qkv (self-attention), q / kv (cross-attention's image queries / "
                                                 "caption keys and values), out (both attentions' outputs), film "
                                                 "(the timestep and pooled caption's scale and shift), text (the "
                                                 "CLIP text transformer's: aligned.pt then carries its tuned copy)")
    full: bool = opt(False, "tune the whole UNet instead of LoRA adapters")
    ema: float = opt(0.95, "EMA decay of the tuned weights", flag="--align-ema", ge=0, lt=1)
    ckpt_every: int = opt(10, "write aligned.pt every N steps", flag="--align-ckpt-every", ge=1)
    report: bool = opt(True, "when done, write the before/after fairness report (python -m minimedi.evaluate)")


@dataclass
class SampleConfig:
    prompt: list = opt([], "caption (repeat for several)")
    n: int = opt(16, "images per prompt", ge=1)
    steps: int = opt(50, "sampler steps", flag="--sample-steps", ge=1)
    sampler: str = opt("ddim", "sampler", choices=("ddpm", "ddim", "dpmpp2m"))
    eta: float = opt(0.0, "DDIM eta (0 = deterministic)", ge=0)
    guidance: float = opt(3.0, "classifier-free guidance scale", ge=0)
    out: str = opt("", "output PNG (default: <run>/samples/sample.png)")
    model: str = opt("diffusion", "which weights: diffusion | aligned | the path of an exported model folder")
    nifti: str = opt("", "also write the images as a NIfTI stack here")
    truncate: bool = opt(False, "cut prompts longer than 77 CLIP tokens instead of refusing them")
    stages: str = opt("all", "all: the whole cascade when the run has sr.pt; base: the base model alone",
                      choices=("all", "base"))
    # 0.1 from a sweep of the default cascade (0, 0.1, 0.2, 0.3, 0.5): FID and consistency best at 0 and 0.1 (tied
    # within noise), then worse with every step up; 0.1 keeps some slack for the base model's artefacts.
    sr_aug_level: float = opt(0.1, "super-resolution stage: the fixed noise conditioning augmentation level",
                              flag="--sr-aug-level", ge=0, le=1)
    sr_steps: int = opt(20, "super-resolution stage: sampler steps", flag="--sr-sample-steps", ge=1)
    sr_guidance: float = opt(1.0, "super-resolution stage: classifier-free guidance scale", flag="--sr-guidance",
                             ge=0)
    sr_keep_low: bool = opt(True, "super-resolution stage: keep the base image at its own scale (every step's "
                                  "estimate box-filters back to it; --no-sr-keep-low lets the stage redraw it)",
                            flag="--sr-keep-low")


@dataclass
class EvalConfig:
    n: int = opt(6, "evaluation: images per held-out prompt (64 prompts)", flag="--eval-n", ge=1)
    extra_n: int = opt(2, "evaluation: images per named-sex prompt (2 x 32) and per unseen prompt (3 x 32)",
                       flag="--eval-extra-n", ge=1)
    steps: int = opt(25, "evaluation: DDIM steps", flag="--eval-steps", ge=1)
    probe_steps: int = opt(800, "evaluation: training steps of the attribute probe", ge=1)
    bootstrap: int = opt(1000, "evaluation: bootstrap replicates of every interval", flag="--eval-bootstrap",
                         ge=100)


@dataclass
class Config:
    preset: str = "default"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    sr_eval: SREvalConfig = field(default_factory=SREvalConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self):
        return self.run.dir or f"runs/{self.preset}"


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "preset")

# Named presets: overrides of the dataclass defaults above, section by section.
PRESETS = {
    # Seconds per task: what tests and CI run.
    "tiny": {
        "data": {"image_size": 16, "n_pretrain": 512, "n_target": 256},
        "clip": {"width": 64, "layers": 2, "vision_width": 64, "vision_layers": 2, "embed_dim": 64, "steps": 20,
                 "batch": 32},
        "unet": {"dim": 16, "dim_mults": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,),
                 "head_dim": 16, "groups": 4},
        "train": {"steps": 20, "batch_size": 8, "warmup": 5, "log_every": 5, "sample_every": 0,
                  "ckpt_every": 10},
        "sr": {"size": 32, "crop": 16, "n": 128, "dim": 8, "dim_mults": (2, 4), "num_res_blocks": (1, 1),
               "attn_resolutions": (8,), "head_dim": 16, "groups": 4, "steps": 20, "batch": 8},
        "classifier": {"width": 8, "steps": 20, "batch": 32},
        "align": {"steps": 4, "batch": 4, "per_prompt": 2, "ddim_steps": 4, "grad_steps": 2, "lora_rank": 2,
                  "report": False},
        "sample": {"n": 2, "steps": 4, "sr_steps": 4},
        "sr_eval": {"n": 8, "steps": 2, "features": 40, "feature_steps": 10, "feature_width": 4},
        "eval": {"n": 1, "extra_n": 1, "steps": 2, "probe_steps": 10, "bootstrap": 100},
    },
    # The embedded phantom corpus at 32x32, sized for a 2-core CPU: the field defaults.
    "default": {},
    # 64x64 on real ROCO + BraTS paths, for a GPU (multi-GPU with torchrun).
    "paper": {
        "data": {"image_size": 64},
        "clip": {"width": 512, "layers": 8, "vision_width": 512, "vision_layers": 8, "patch": 8, "embed_dim": 512,
                 "steps": 20000, "batch": 512},
        "unet": {"dim": 128, "dim_mults": (1, 2, 3, 4), "num_res_blocks": 3, "attn_resolutions": (32, 16, 8),
                 "head_dim": 64, "groups": 32},
        "train": {"steps": 200000, "batch_size": 256, "lr": 1e-4, "warmup": 2000, "ema_decay": 0.9999,
                  "sample_every": 5000, "ckpt_every": 2000},
        "sr": {"size": 256, "crop": 128, "n": 20000, "dim": 64, "dim_mults": (2, 4, 8, 8),
               "num_res_blocks": (2, 4, 8, 8), "attn_resolutions": (32, 16), "head_dim": 64, "groups": 32,
               "steps": 100000, "batch": 64, "lr": 1e-4},
        "sample": {"sr_steps": 50},
        "classifier": {"width": 64, "steps": 10000},
        "align": {"steps": 2000, "batch": 24, "lr": 1e-4, "ema": 0.995, "ddim_steps": 20, "grad_steps": 0,
                  "checkpoint": True, "lora_rank": 50},
    },
}


def make_config(preset="default", **overrides):
    """The dataclass defaults, then the preset's overrides, then `overrides` (section -> {field: value})."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for layer in (PRESETS[preset], overrides):
        for section, values in layer.items():
            setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **values))
    return cfg


def config_to_dict(cfg):
    """A plain dict (only str/int/float/bool/list/None), safe for `torch.load(weights_only=True)` and JSON."""
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
