"""The text-to-image diffusion model: `python train.py` -> <run>/diffusion.pt.

The UNet learns to denoise the pretraining corpus's images conditioned on their captions, as encoded by the
frozen CLIP text encoder (`--clip` weights, or the run's clip.pt): min-SNR-weighted v (or eps) loss, AdamW
with warm-up and cosine decay, gradient clipping, an EMA of the weights (what sampling uses). Caption
embeddings are computed once (`CaptionCache`), since the encoder never changes.

The checkpoint names its text encoder relative to the run folder when it is the run's own clip.pt, so the
folder can be moved; external `--clip` weights are named by absolute path (`python -m minimedi.export` makes
a self-contained copy of a model).
"""
import os

import torch

from minimedi import diffusion, distributed, training
from minimedi.config import config_to_dict
from minimedi.data import evaluation_prompts
from minimedi.data.load import load_pretraining_corpus
from minimedi.imageio import save_grid
from minimedi.pipeline import TextToImage, load_text_encoder
from minimedi.tasks.clip import report_truncation
from minimedi.text import CaptionCache
from minimedi.tokenizer import Tokenizer
from minimedi.unet import UNet


def architecture(cfg):
    """The settings that shape the UNet's weights (a resume must keep them)."""
    return {"unet": {k: v for k, v in vars(cfg.unet).items() if k != "cond_drop"},
            "data": {"image_size": cfg.data.image_size}}


def text_encoder_reference(cfg):
    """How diffusion.pt names its text encoder: "clip.pt" (the run's own, relative) or the --clip path."""
    return os.path.abspath(cfg.clip.weights) if cfg.clip.weights else "clip.pt"


def write_sample_grid(unet, encoder, cfg, step):
    """<run>/samples/step<N>.png: the EMA UNet on the first 16 held-out prompts, the same noise every time so
    the grids of one run compare. A function of its own, so that nothing it names can rebind the training
    loop's variables (a grid once replaced the corpus `images` and the UNet went on training on its 16 samples)."""
    prompts = [p["prompt"] for p in evaluation_prompts()][:16]
    grid = TextToImage(unet, encoder, cfg.diffusion, cfg.data.image_size)(prompts, steps=25, seed=0)
    save_grid(grid, os.path.join(cfg.run_dir, "samples", f"step{step:06d}.png"), nrow=8, scale=2)


def make_diffusion(cfg, d):
    """Pretrain the UNet on the pretraining corpus; returns the EMA UNet."""
    path = os.path.join(cfg.run_dir, "diffusion.pt")
    t = cfg.train
    clip_ref = text_encoder_reference(cfg)
    encoder = load_text_encoder(clip_ref, cfg.run_dir, d.device, truncate=True)
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    corpus = load_pretraining_corpus(cfg.data)
    images = corpus.images
    n_cut = Tokenizer().tokenize_corpus(corpus.captions)[1]  # the encoder cuts them (truncate=True above)
    report_truncation(n_cut, len(images), log, "diffusion", d)
    cache = CaptionCache(encoder, corpus.captions)
    torch.manual_seed(cfg.run.seed)
    unet = UNet(cfg.unet, *encoder.dims, image_channels=1, image_size=cfg.data.image_size).to(d.device)
    ema = training.make_ema(unet, t.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: training.warmup_cosine(s, t.warmup, t.steps))
    g = torch.Generator().manual_seed(cfg.run.seed)  # the global batch: identical on every rank

    def record():
        return {"model": unet.state_dict(), "ema": ema.module.state_dict(), "config": config_to_dict(cfg),
                "architecture": architecture(cfg),
                "data": {**corpus.provenance, "captions_truncated": n_cut},
                "text": {"clip": clip_ref, "dims": list(encoder.dims)}}

    loop = training.TrainLoop(path, t.steps, {"model": unet, "ema": ema, "optimizer": opt, "scheduler": sched,
                                              "batches": g},
                              record, t.ckpt_every, d, cfg.run.resume, architecture(cfg), desc="diffusion")
    if cfg.run.compile:
        unet.compile()  # in place: the state_dict keys (and so the checkpoints) stay those of the eager UNet
    model = distributed.wrap_ddp(unet, d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=d.device.type == "cuda")
    for step in loop:
        ids = torch.randint(len(images), (t.batch_size,), generator=g)
        t_batch = diffusion.sample_t(t.batch_size, g)
        noise = torch.randn((t.batch_size, *images.shape[1:]), generator=g)
        drop = torch.rand(t.batch_size, generator=g) < cfg.unet.cond_drop
        ids, t_batch, noise, drop = (distributed.shard(x, d).to(d.device) for x in (ids, t_batch, noise, drop))
        states, mask, pooled = (x.to(d.device) for x in cache.lookup(ids))
        with autocast:
            out = diffusion.training_losses(model, images[ids.cpu()].to(d.device).float(), cfg.diffusion.schedule,
                                            cfg.diffusion.prediction, cfg.diffusion.min_snr_gamma, t=t_batch,
                                            noise=noise, text_tokens=states, text_mask=mask, text_pooled=pooled,
                                            drop_text=drop)
        loss = out["loss"].mean()
        loop.check_finite(loss, step)
        grad_norm = training.optimizer_step(loss, unet, opt, sched, ema, t.grad_clip)
        loop.bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            steps_per_s = loop.bar.format_dict["rate"] or 0.0
            log(task="diffusion", step=done, loss=loss, mse=out["mse"].mean(), grad_norm=grad_norm,
                lr=sched.get_last_lr()[0], images_per_s=steps_per_s * t.batch_size)
        if d.main and t.sample_every and done % t.sample_every == 0:
            write_sample_grid(ema.module, encoder, cfg, done)
    loop.finish()
    if d.main:
        print(f"saved {path}")
    return ema.module
