"""The cascade's super-resolution stage: `python train.py --task sr` -> <run>/sr.pt.

The SR UNet (`minimedi.sr_unet`) learns p(x_high | x_low, caption) on pairs of the base model's own
pretraining corpus at the base size and at --sr-size (`data/pairs.py`: two phantom renders of each slice;
for ROCO, the real image and its box filter), with noise conditioning augmentation and random crops
(`minimedi.cascade`). It is only useful on top of a base model, so it needs the run's diffusion.pt: its
image size is the low resolution, its recorded data config says which corpus to pair, and its text encoder
encodes the captions (the cascade encodes a prompt once, for both stages). Training is the base model's
loop: AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights, `TrainLoop`'s
checkpoints, Ctrl-C, NaN stop and exact resume.
"""
import os

import torch

from minimedi import distributed, training
from minimedi.cascade import draw_sr_batch, sr_training_losses
from minimedi.checkpoint import load_checkpoint
from minimedi.config import config_from_dict, config_to_dict
from minimedi.data.pairs import load_sr_pairs
from minimedi.errors import UserError
from minimedi.pipeline import load_text_encoder
from minimedi.sr_unet import SRUNet, check_sr_config
from minimedi.text import CaptionCache

# The SRConfig fields that shape the weights (a resume must keep them, a loader rebuilds from them).
ARCHITECTURE_FIELDS = ("size", "dim", "dim_mults", "num_res_blocks", "attn_resolutions", "head_dim", "groups")


def architecture(cfg, low_size):
    return {"sr": {k: getattr(cfg.sr, k) for k in ARCHITECTURE_FIELDS}, "data": {"image_size": low_size}}


def base_model(cfg):
    """The run's diffusion.pt checkpoint, after checking --sr-size against its image size (one line each)."""
    path = os.path.join(cfg.run_dir, "diffusion.pt")
    if not os.path.exists(path):
        raise UserError(f"--task sr needs a base model: {path} not found (make it with `python train.py --run "
                        f"{cfg.run_dir}`); the SR stage enlarges its samples")
    base = load_checkpoint(path)
    check_sr_config(cfg.sr, base["architecture"]["data"]["image_size"])
    return base


def make_sr(cfg, d):
    """Train the SR stage on pairs of the base model's corpus; returns the EMA SR UNet."""
    base = base_model(cfg)
    path = os.path.join(cfg.run_dir, "sr.pt")
    s, t = cfg.sr, cfg.train
    base_cfg = config_from_dict(base["config"])
    low_size = base["architecture"]["data"]["image_size"]
    cfg = config_from_dict({**config_to_dict(cfg), "data": config_to_dict(base_cfg)["data"],
                            "diffusion": config_to_dict(base_cfg)["diffusion"]})
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    encoder = load_text_encoder(base["text"]["clip"], cfg.run_dir, d.device, truncate=True)
    low, high, captions = load_sr_pairs(cfg.data, s.size, s.n, s.pairs)
    cache = CaptionCache(encoder, captions)
    torch.manual_seed(cfg.run.seed)
    unet = SRUNet(s, *encoder.dims).to(d.device)
    ema = training.make_ema(unet, t.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: training.warmup_cosine(k, t.warmup, s.steps))
    g = torch.Generator().manual_seed(cfg.run.seed)  # the global batch: identical on every rank
    data = {"pairs": len(low), "source": s.pairs, "low_size": low_size, "size": s.size, "corpus": base.get("data", {})}

    def record():
        return {"model": unet.state_dict(), "ema": ema.module.state_dict(), "config": config_to_dict(cfg),
                "architecture": architecture(cfg, low_size), "data": data,
                "text": {"clip": base["text"]["clip"], "dims": list(encoder.dims)}}

    loop = training.TrainLoop(path, s.steps, {"model": unet, "ema": ema, "optimizer": opt, "scheduler": sched,
                                              "batches": g},
                              record, t.ckpt_every, d, cfg.run.resume, architecture(cfg, low_size), desc="sr")
    model = distributed.wrap_ddp(unet, d)
    for step in loop:
        ids = torch.randint(len(low), (s.batch,), generator=g)
        draws = draw_sr_batch(s.batch, low.shape[1], low_size, s.size, s.crop, s.aug_max, s.cond_drop, g)
        ids = distributed.shard(ids, d)
        draws = {k: distributed.shard(v, d).to(d.device) for k, v in draws.items()}
        states, mask, pooled = (x.to(d.device) for x in cache.lookup(ids))
        out = sr_training_losses(model, high[ids].to(d.device), low[ids].to(d.device), states, mask, pooled, draws,
                                 cfg.diffusion.schedule, cfg.diffusion.prediction, s.min_snr_gamma)
        loss = out["loss"].mean()
        loop.check_finite(loss, step)
        grad_norm = training.optimizer_step(loss, unet, opt, sched, ema, t.grad_clip)
        loop.bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % t.log_every == 0 or done == s.steps:
            steps_per_s = loop.bar.format_dict["rate"] or 0.0
            log(task="sr", step=done, loss=loss, mse=out["mse"].mean(), grad_norm=grad_norm,
                lr=sched.get_last_lr()[0], pairs_per_s=steps_per_s * s.batch)
    loop.finish()
    if d.main:
        print(f"saved {path}")
    return ema.module
