"""Pretraining. `python train.py [--task diffusion|clip|classifier] [--preset tiny|default|paper] [--flags]`

  --task clip        a small CLIP, contrastively, on the pretraining corpus -> <run>/clip.pt
  --task diffusion   the text-to-image UNet on the pretraining corpus, conditioned on the frozen CLIP text
                     encoder (trains the small CLIP first when neither <run>/clip.pt nor --clip exists)
                     -> <run>/diffusion.pt, sample grids in <run>/samples/
  --task classifier  the subgroup classifier on the target corpus -> <run>/classifier.pt

Multi-GPU / multi-node: `torchrun --nproc_per_node N train.py ...` (PyTorch DDP; rank 0 logs and saves).
Every task shows a progress bar and appends its metrics to <run>/log.jsonl.
"""
import os

import torch
from tqdm import tqdm

from minimedi import diffusion, training
from minimedi.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from minimedi.classifier import SUBGROUP_CLASSES, class_shares, subgroup_labels, train_classifier
from minimedi.clip import CLIP, CLIPConfig, contrastive_loss, load_clip, preprocess
from minimedi.config import config_to_dict, parse_config
from minimedi.data import evaluation_prompts, load_pretraining_data, load_target_data
from minimedi.errors import UserError, run_main
from minimedi.evaluate import zero_shot_accuracy
from minimedi.imageio import save_grid
from minimedi.text import CaptionCache, FrozenTextEncoder, trim_padding
from minimedi.tokenizer import Tokenizer
from minimedi.unet import UNet

SECTIONS = ("run", "data", "clip", "unet", "diffusion", "train", "classifier")


# ---- the small CLIP ------------------------------------------------------------------------------

def small_clip_config(cfg):
    c = cfg.clip
    return CLIPConfig(embed_dim=c.embed_dim, text_width=c.width, text_layers=c.layers,
                      text_heads=max(1, c.width // 64), image_resolution=cfg.data.image_size,
                      vision_width=c.vision_width, vision_layers=c.vision_layers,
                      vision_heads=max(1, c.vision_width // 64), patch_size=c.patch)


def train_clip(cfg, d):
    """Contrastive pretraining of a small CLIP; reports zero-shot modality and tumor-side accuracy."""
    path = os.path.join(cfg.run_dir, "clip.pt")
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    torch.manual_seed(cfg.run.seed)
    images, captions, attributes = load_pretraining_data(cfg.data)
    tokenizer = Tokenizer()
    tokens = trim_padding(tokenizer(captions, truncate=True))
    n_val = min(1000, len(images) // 10)
    train_ids = torch.arange(n_val, len(images))

    model = CLIP(small_clip_config(cfg)).to(d.device)
    ddp = training.wrap_ddp(model, d)
    c = cfg.clip
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: training.warmup_cosine(s, max(1, c.steps // 20), c.steps))
    g = torch.Generator().manual_seed(cfg.run.seed)
    bar = tqdm(range(c.steps), desc="clip", disable=not d.main)
    for step in bar:
        ids = training.shard(train_ids[torch.randint(len(train_ids), (c.batch,), generator=g)], d)
        x = preprocess(images[ids].to(d.device).float(), model.config.image_resolution)
        logits_per_image, _ = ddp(x, tokens[ids].to(d.device))
        loss = contrastive_loss(logits_per_image)
        training.check_finite(loss, step, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.train.log_every == 0 or step == c.steps - 1:
            log(task="clip", step=step, loss=loss, lr=sched.get_last_lr()[0])

    model.eval()
    accuracy = zero_shot_accuracy(model, tokenizer, images[:n_val].float(), attributes[:n_val])
    log(task="clip", step=c.steps, **{f"zero_shot_{k}": v for k, v in accuracy.items()})
    if d.main:
        print("zero-shot accuracy on held-out images: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
        save_checkpoint(path, {"model": model.state_dict(), "step": c.steps, "config": config_to_dict(cfg),
                               "zero_shot": accuracy})
        print(f"saved {path}")
    return model


def text_encoder(cfg, d):
    """The frozen CLIP text encoder: --clip weights, else <run>/clip.pt, else train the small CLIP now."""
    path = cfg.clip.weights or os.path.join(cfg.run_dir, "clip.pt")
    if not os.path.exists(path):
        if cfg.clip.weights:
            raise UserError(f"--clip {path}: no such file or folder")
        print(f"{path} not found: training the small CLIP first (python train.py --task clip)")
        train_clip(cfg, d)
    return FrozenTextEncoder(load_clip(path).to(d.device)), path


# ---- the text-to-image diffusion model -------------------------------------------------------------

def build_unet(cfg, text_dims):
    return UNet(cfg.unet, *text_dims, image_channels=1, image_size=cfg.data.image_size)


def diffusion_checkpoint(step, unet, ema, opt, sched, g, cfg, clip_path, text_dims):
    return {"model": unet.state_dict(), "ema": ema.module.state_dict(), "ema_state": ema.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
            "config": config_to_dict(cfg), "rng": {**rng_state(), "batch": g.get_state()},
            "text": {"clip": os.path.abspath(clip_path), "dims": list(text_dims)}}


@torch.no_grad()
def sample_grid(ema_unet, encoder, cfg, path, device, n=16):
    """A fixed-seed grid from the evaluation prompts (same noise every time: progress is comparable)."""
    prompts = [p["prompt"] for p in evaluation_prompts()][:n]
    states, mask, pooled = encoder.encode(prompts)
    denoise = diffusion.make_denoiser(ema_unet.eval(), states, mask, pooled, cfg.sample.guidance,
                                      cfg.diffusion.prediction, cfg.diffusion.dynamic_threshold)
    g = torch.Generator(device).manual_seed(0)
    size = cfg.data.image_size
    x = diffusion.sample(denoise, (len(prompts), 1, size, size), 25, "ddim", cfg.diffusion.schedule,
                         generator=g, device=device)
    save_grid(x, path, nrow=8, scale=2)


def train_diffusion(cfg, d):
    """Pretrain the UNet: min-SNR-weighted v (or eps) loss, AdamW + warm-up, grad clip, EMA, exact resume."""
    path = os.path.join(cfg.run_dir, "diffusion.pt")
    t = cfg.train
    encoder, clip_path = text_encoder(cfg, d)
    images, captions, _ = load_pretraining_data(cfg.data)
    cache = CaptionCache(encoder, captions)
    torch.manual_seed(cfg.run.seed)
    unet = build_unet(cfg, encoder.dims).to(d.device)
    ema = training.make_ema(unet, t.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: training.warmup_cosine(s, t.warmup, t.steps))
    g = torch.Generator().manual_seed(cfg.run.seed)  # the global batch: identical on every rank
    start = 0
    if cfg.run.resume:
        ckpt = load_checkpoint(path)
        unet.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema_state"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        g.set_state(ckpt["rng"]["batch"])
        start = ckpt["step"]
    if cfg.run.compile:
        unet.compile()  # in place: the state_dict keys (and so the checkpoints) stay those of the eager UNet
    model = training.wrap_ddp(unet, d)
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda")

    def save(step):
        if d.main:
            save_checkpoint(path, diffusion_checkpoint(step, unet, ema, opt, sched, g, cfg, clip_path, encoder.dims))

    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, desc="diffusion", disable=not d.main)
    with training.StopOnCtrlC() as stop:
        for step in bar:
            ids = torch.randint(len(images), (t.batch_size,), generator=g)
            t_batch = diffusion.sample_t(t.batch_size, g)
            noise = torch.randn((t.batch_size, *images.shape[1:]), generator=g)
            drop = torch.rand(t.batch_size, generator=g) < cfg.unet.cond_drop
            ids, t_batch, noise, drop = (training.shard(x, d).to(d.device) for x in (ids, t_batch, noise, drop))
            states, mask, pooled = (x.to(d.device) for x in cache.lookup(ids))
            with autocast:
                out = diffusion.training_losses(model, images[ids.cpu()].to(d.device).float(),
                                                cfg.diffusion.schedule, cfg.diffusion.prediction,
                                                cfg.diffusion.min_snr_gamma, t=t_batch, noise=noise,
                                                text_tokens=states, text_mask=mask, text_pooled=pooled,
                                                drop_text=drop)
            loss = out["loss"].mean()
            training.check_finite(loss, step, path)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            ema.update_parameters(unet)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                steps_per_s = bar.format_dict["rate"] or 0.0
                log(task="diffusion", step=done, loss=loss, mse=out["mse"].mean(), grad_norm=grad_norm,
                    lr=sched.get_last_lr()[0], images_per_s=steps_per_s * t.batch_size)
            if d.main and t.sample_every and done % t.sample_every == 0:
                sample_grid(ema.module, encoder, cfg, os.path.join(cfg.run_dir, "samples", f"step{done:06d}.png"),
                            d.device)
            if done % t.ckpt_every == 0 or done == t.steps or stop.requested:
                save(done)
            if stop.requested:
                print(f"interrupted: checkpoint of step {done} saved to {path}; continue with --resume")
                raise SystemExit(130)
    if d.main:
        print(f"saved {path}")
    return ema.module


# ---- the subgroup classifier ---------------------------------------------------------------------------

def train_subgroup_classifier(cfg, d):
    """The target corpus' subgroup classifier (calibrated); its class shares are the alignment target."""
    path = os.path.join(cfg.run_dir, "classifier.pt")
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    images, _, attributes = load_target_data(cfg.data)
    labels = subgroup_labels(attributes, cfg.classifier.subgroup)
    torch.manual_seed(cfg.run.seed)
    model, metrics = train_classifier(images.float(), labels, cfg.classifier, d.device, log,
                                      torch.Generator().manual_seed(cfg.run.seed))
    classes = SUBGROUP_CLASSES[cfg.classifier.subgroup]
    shares = class_shares(labels, len(classes))
    log(task="classifier", **metrics)
    if d.main:
        print(f"classifier ({cfg.classifier.subgroup}): held-out accuracy {metrics['accuracy']:.1%}, ECE "
              f"{metrics['ece_uncalibrated']:.3f} -> {metrics['ece']:.3f} after temperature {metrics['temperature']:.2f}")
        save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(cfg), "metrics": metrics,
                               "classes": list(classes), "target_shares": shares.tolist()})
        print(f"saved {path}")
    return model


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description=__doc__)
    d = training.setup(cfg.run.device)
    tasks = {"clip": train_clip, "diffusion": train_diffusion, "classifier": train_subgroup_classifier}
    try:
        tasks[cfg.train.task](cfg, d)
    finally:
        training.teardown()


if __name__ == "__main__":
    run_main(main)
