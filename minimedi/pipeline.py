"""A trained text-to-image model as one object: `TextToImage(prompts) -> images`.

What a generator is: the frozen text encoder it was trained with, the UNet (its EMA weights), and the
diffusion settings it was trained under (parametrisation, schedule, dynamic thresholding). A call runs the
steps of every text-to-image pipeline (diffusers' `__call__`, in a few lines): encode the captions, draw
the noise from the seed, sample with classifier-free guidance, return images in [-1, 1].

Where a generator comes from (`load_generator`):
- a run folder's `diffusion.pt` or `aligned.pt`: the checkpoint records its architecture, its diffusion
  settings and its text encoder ("clip.pt", relative to the run folder, or an absolute `--clip` path);
- an exported model folder (`python -m minimedi.export`): `config.json`, `model.safetensors` (UNet EMA
  weights) and `text_encoder.safetensors` (the CLIP it reads captions with), which loads from anywhere.

Imagen's cascade (`Cascade`): with `stages="all"` and a super-resolution stage beside the base model (the
run's `sr.pt`, or `sr.safetensors` in an exported folder), the generator is the base model followed by
`cascade.super_resolve`. The aligned model's cascade is the aligned base followed by the same SR stage: the
SR stage only adds detail the low-resolution image cannot hold, so it is trained once, on the base corpus.
Each stage reads captions through the text encoder it was trained with: an aligned.pt whose text encoder
was tuned (`align.py --lora-targets ...,text`) still hands the SR stage the frozen one.
"""
import json
import os

import torch
from safetensors.torch import load_file

from minimedi import diffusion
from minimedi.cascade import super_resolve
from minimedi.checkpoint import load_checkpoint
from minimedi.clip import CLIP, CLIPConfig, load_clip
from minimedi.config import DiffusionConfig, SRConfig, UNetConfig
from minimedi.errors import UserError
from minimedi.sr_unet import SRUNet
from minimedi.text import FrozenTextEncoder
from minimedi.unet import UNet

MAKES = {"diffusion": "python train.py", "aligned": "python align.py"}
EXPORT_FILES = ("config.json", "model.safetensors", "text_encoder.safetensors")
SR_TEXT_ENCODER = "sr_text_encoder.safetensors"  # exported only when the base's text encoder was tuned


class TextToImage:
    """Captions -> images [N, 1, S, S] in [-1, 1]; the same seed gives the same images."""

    def __init__(self, unet, encoder, diffusion_cfg, image_size):
        self.unet, self.encoder, self.diffusion, self.image_size = unet, encoder, diffusion_cfg, image_size

    @property
    def device(self):
        return next(self.unet.parameters()).device

    def denoiser(self, prompts, guidance):
        """`diffusion.make_denoiser` for these captions (one image each), with the model's parametrisation
        and dynamic thresholding."""
        states, mask, pooled = self.encoder.encode(prompts)
        return diffusion.make_denoiser(self.unet, states, mask, pooled, guidance, self.diffusion.prediction,
                                       self.diffusion.dynamic_threshold)

    @torch.inference_mode()
    def __call__(self, prompts, steps=50, sampler="ddim", guidance=3.0, eta=0.0, seed=0, batch_size=128,
                 generator=None):
        """One image per prompt (repeat a prompt for several), in batches of `batch_size` drawn from one
        generator seeded with `seed` (or from `generator`, which then goes on for a later stage)."""
        g = generator or torch.Generator(self.device).manual_seed(seed)
        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            denoise = self.denoiser(chunk, guidance)
            shape = (len(chunk), 1, self.image_size, self.image_size)
            images.append(diffusion.sample(denoise, shape, steps, sampler, self.diffusion.schedule, eta,
                                           generator=g, device=self.device).cpu())
        return torch.cat(images)


class Cascade:
    """The base model, then the super-resolution stage: captions -> images [N, 1, size, size] in [-1, 1].

    `sr` holds the SR stage's sampling settings (`cascade.super_resolve`): the fixed noise conditioning
    augmentation level `aug_level`, `steps`, `guidance` and `keep_low`. One generator seeded with `seed` draws
    the base samples and then the SR stage's noise, so the same seed gives the same images and the two stages
    never share noise. `sr_encoder` is the text encoder the SR stage was trained with."""

    def __init__(self, base, sr_unet, sr_encoder, sr_diffusion, size, aug_level=0.1, steps=20, guidance=1.0,
                 keep_low=True):
        self.base, self.sr_unet, self.sr_encoder, self.sr_diffusion = base, sr_unet, sr_encoder, sr_diffusion
        self.image_size = size
        self.sr = {"aug_level": aug_level, "steps": steps, "guidance": guidance, "keep_low": keep_low}

    @property
    def unet(self):
        return self.base.unet

    @property
    def encoder(self):
        return self.base.encoder

    @property
    def device(self):
        return self.base.device

    @torch.inference_mode()
    def __call__(self, prompts, steps=50, sampler="ddim", guidance=3.0, eta=0.0, seed=0, batch_size=128,
                 return_base=False):
        """As `TextToImage`; with `return_base`, (base images, final images) of the same samples."""
        g = torch.Generator(self.device).manual_seed(seed)
        low = self.base(prompts, steps, sampler, guidance, eta, batch_size=batch_size, generator=g)
        states, mask, pooled = self.sr_encoder.encode(prompts)
        d = self.sr_diffusion
        high = super_resolve(self.sr_unet, low.to(self.device), states, mask, pooled, size=self.image_size,
                             aug_level=self.sr["aug_level"], steps=self.sr["steps"], sampler=sampler, eta=eta,
                             guidance=self.sr["guidance"], prediction=d.prediction, schedule=d.schedule,
                             threshold=d.dynamic_threshold, generator=g, batch_size=batch_size,
                             keep_low=self.sr["keep_low"]).cpu()
        return (low, high) if return_base else high


def load_text_encoder(reference, base_dir, device="cpu", truncate=False):
    """The frozen text encoder named by a checkpoint: a path relative to `base_dir` or absolute."""
    path = reference if os.path.isabs(reference) else os.path.join(base_dir, reference)
    if not os.path.exists(path):
        raise UserError(f"text encoder {path} not found" + ("" if os.path.isabs(reference) else
                        f": make it with `python train.py --task clip --run {base_dir}`, or pass --clip WEIGHTS"))
    return FrozenTextEncoder(load_clip(path).to(device), truncate=truncate)


def checkpoint_text_encoder(ckpt, run_dir, device="cpu", truncate=False):
    """The text encoder a checkpoint's UNet reads: its own tuned CLIP (aligned.pt of `align.py --lora-targets
    ...,text`) or the frozen one it names."""
    tuned = ckpt.get("text_encoder")
    if tuned is None:
        return load_text_encoder(ckpt["text"]["clip"], run_dir, device, truncate)
    clip = CLIP.from_openai_state_dict(tuned["model"], CLIPConfig(**tuned["config"])).eval()
    return FrozenTextEncoder(clip.to(device), truncate=truncate)


def build_unet(architecture, text_dims):
    """A UNet with the shape an artifact recorded (`architecture` = {"unet": {...}, "data": {"image_size"}})."""
    return UNet(UNetConfig(**architecture["unet"]), *text_dims, image_channels=1,
                image_size=architecture["data"]["image_size"])


def build_sr_unet(architecture, text_dims):
    """An SRUNet with the shape sr.pt recorded (`architecture` = {"sr": {...}, "data": {"image_size"}})."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in architecture["sr"].items()}
    return SRUNet(SRConfig(**fields, crop=0), *text_dims)


def with_sr(base, sr_unet, sr_encoder, record, sr):
    """`base` followed by the SR stage `sr_unet` (its checkpoint or export record: architecture, config,
    text dims) reading captions through `sr_encoder`, sampled with the settings `sr` (see `Cascade`)."""
    if list(record["text"]["dims"]) != list(sr_encoder.dims):
        raise UserError(f"the super-resolution stage reads {record['text']['dims']}-wide text features, its text "
                        f"encoder gives {list(sr_encoder.dims)}: retrain it with `python train.py --task sr`")
    sr_unet = sr_unet.to(base.device).eval().requires_grad_(False)
    return Cascade(base, sr_unet, sr_encoder, DiffusionConfig(**record["config"]["diffusion"]),
                   record["architecture"]["sr"]["size"], **(sr or {}))


def load_generator(model="diffusion", run_dir="runs/default", device="cpu", truncate=False, stages="base",
                   sr=None):
    """A TextToImage from `model`: "diffusion" or "aligned" (the run's checkpoint) or an exported folder;
    with stages="all", a `Cascade` through the run's (or the folder's) SR stage when it has one."""
    if model not in MAKES:
        base, folder = load_exported(model, device, truncate), model
        path = os.path.join(folder, "sr.safetensors")
        if stages == "base" or not os.path.exists(path):
            return base
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        record = config["sr"]
        sr_unet = build_sr_unet(record["architecture"], record["text"]["dims"])
        sr_unet.load_state_dict(load_file(path))
        sr_encoder = base.encoder
        if os.path.exists(os.path.join(folder, SR_TEXT_ENCODER)):  # the base's text encoder was tuned
            sr_encoder = exported_encoder(folder, SR_TEXT_ENCODER, config["text_encoder"], device, truncate)
        return with_sr(base, sr_unet, sr_encoder, record, sr)
    base = load_base(model, run_dir, device, truncate)
    path = os.path.join(run_dir, "sr.pt")
    if stages == "base" or not os.path.exists(path):
        return base
    ckpt = load_checkpoint(path)
    sr_unet = build_sr_unet(ckpt["architecture"], ckpt["text"]["dims"])
    sr_unet.load_state_dict(ckpt["ema"])
    return with_sr(base, sr_unet, load_text_encoder(ckpt["text"]["clip"], run_dir, device, truncate), ckpt, sr)


def load_base(model, run_dir, device, truncate):
    """The TextToImage of the run's diffusion.pt or aligned.pt."""
    path = os.path.join(run_dir, f"{model}.pt")
    if not os.path.exists(path):
        raise UserError(f"no {model} model at {path}: run `{MAKES[model]}` first (or pass --run DIR)")
    ckpt = load_checkpoint(path)
    encoder = checkpoint_text_encoder(ckpt, run_dir, device, truncate)
    unet = build_unet(ckpt["architecture"], ckpt["text"]["dims"])
    unet.load_state_dict(ckpt["ema"])
    unet = unet.to(device).eval().requires_grad_(False)
    return TextToImage(unet, encoder, DiffusionConfig(**ckpt["config"]["diffusion"]),
                       ckpt["architecture"]["data"]["image_size"])


def load_exported(folder, device="cpu", truncate=False):
    """A TextToImage from a folder written by `python -m minimedi.export`."""
    missing = [name for name in EXPORT_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise UserError(f"--model {folder}: not diffusion, aligned or an exported model folder "
                        f"(missing {', '.join(missing)})")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    encoder = exported_encoder(folder, "text_encoder.safetensors", config["text_encoder"], device, truncate)
    unet = build_unet(config["architecture"], encoder.dims)
    unet.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    unet = unet.to(device).eval().requires_grad_(False)
    return TextToImage(unet, encoder, DiffusionConfig(**config["config"]["diffusion"]),
                       config["architecture"]["data"]["image_size"])


def exported_encoder(folder, name, clip_config, device, truncate):
    """The text encoder in `folder`/`name`, a CLIP of `clip_config` as safetensors."""
    clip = CLIP.from_openai_state_dict(load_file(os.path.join(folder, name)), CLIPConfig(**clip_config))
    return FrozenTextEncoder(clip.to(device), truncate=truncate)
