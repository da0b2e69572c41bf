"""The small CLIP: `python train.py --task clip` -> <run>/clip.pt.

Without real CLIP weights (`--clip`), the frozen text encoder of the diffusion model is a small CLIP trained
here, contrastively, on the pretraining corpus's image/caption pairs (CLIP's symmetric InfoNCE, Radford et
al. 2021, Fig. 3). Captions longer than the 77-token context are cut, as CLIP training does (and counted).
The first min(1000, N/10) pairs are held out; after training, the CLIP evaluation (`minimedi.clip_eval`)
reports retrieval recall@1/5/10 both ways on them, and zero-shot accuracy where the data has attributes.
Under 10 pairs none is held out, and the run says it skipped the evaluation.

Under DDP every rank encodes its slice of the global batch and the features are gathered, so every
caption is contrasted with every image of the *global* batch, as in one process
(`distributed.gather_with_local_grad`).
"""
import dataclasses
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimedi import distributed, training
from minimedi.clip import CLIP, CLIPConfig, contrastive_loss, preprocess
from minimedi.config import config_to_dict
from minimedi.clip_eval import evaluate_clip, summary
from minimedi.data.load import load_pretraining_corpus
from minimedi.errors import UserError
from minimedi.text import trim_padding
from minimedi.tokenizer import Tokenizer


def clip_config(clip, image_size):
    """The small CLIP's architecture from the `clip` config section: heads = width / head size (at least 1)."""
    heads = [max(1, width // clip.head_dim) for width in (clip.width, clip.vision_width)]
    for flag, width, h in (("--clip-width", clip.width, heads[0]), ("--clip-vision-width", clip.vision_width, heads[1])):
        if width % h:
            raise UserError(f"{flag} {width} does not split into {h} heads of --clip-head-dim {clip.head_dim}")
    if image_size % clip.patch:
        raise UserError(f"--clip-patch {clip.patch} does not divide the image size {image_size}")
    return CLIPConfig(embed_dim=clip.embed_dim, text_width=clip.width, text_layers=clip.layers, text_heads=heads[0],
                      image_resolution=image_size, vision_width=clip.vision_width, vision_layers=clip.vision_layers,
                      vision_heads=heads[1], patch_size=clip.patch)


def architecture(cfg):
    """The settings that shape the small CLIP's weights (a resume must keep them)."""
    keep = ("width", "layers", "head_dim", "vision_width", "vision_layers", "patch", "embed_dim")
    return {"clip": {k: getattr(cfg.clip, k) for k in keep}, "data": {"image_size": cfg.data.image_size}}


class NormalizedFeatures(nn.Module):
    """CLIP's two towers as one module for DDP: (unit image features, unit text features, logit scale)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, images, tokens):
        scale = self.clip.logit_scale.clamp(max=math.log(100)).exp()  # CLIP §2.5 clips the scale at 100
        return (F.normalize(self.clip.encode_image(images), dim=-1),
                F.normalize(self.clip.encode_text(tokens), dim=-1), scale)


def make_clip(cfg, d):
    """Train the small CLIP on the pretraining corpus; returns the model (eval mode)."""
    path = os.path.join(cfg.run_dir, "clip.pt")
    c = cfg.clip
    config = clip_config(c, cfg.data.image_size)
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"), d.main)
    torch.manual_seed(cfg.run.seed)
    corpus = load_pretraining_corpus(cfg.data)
    images, tokenizer = corpus.images, Tokenizer()
    tokens, n_cut = tokenizer.tokenize_corpus(corpus.captions)
    tokens = trim_padding(tokens)
    report_truncation(n_cut, len(tokens), log, "clip", d)
    n_val = min(1000, len(images) // 10)  # none under 10 pairs: then the evaluation is skipped, and says so
    train_ids = torch.arange(n_val, len(images))

    model = CLIP(config).to(d.device)
    features = distributed.wrap_ddp(NormalizedFeatures(model), d)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: training.warmup_cosine(s, max(1, c.steps // 20), c.steps))
    g = torch.Generator().manual_seed(cfg.run.seed)
    metrics = {}

    def record():
        return {"model": model.state_dict(), "clip_config": dataclasses.asdict(config), "config": config_to_dict(cfg),
                "architecture": architecture(cfg), "data": {**corpus.provenance, "captions_truncated": n_cut},
                "clip_eval": metrics}

    loop = training.TrainLoop(path, c.steps, {"model": model, "optimizer": opt, "scheduler": sched, "batches": g},
                              record, cfg.train.ckpt_every, d, cfg.run.resume, architecture(cfg), desc="clip")
    for step in loop:
        ids = distributed.shard(train_ids[torch.randint(len(train_ids), (c.batch,), generator=g)], d)
        x = preprocess(images[ids].to(d.device).float(), config.image_resolution)
        image_features, text_features, scale = features(x, tokens[ids].to(d.device))
        logits = scale * distributed.gather_with_local_grad(image_features, d) @ \
            distributed.gather_with_local_grad(text_features, d).t()
        loss = contrastive_loss(logits)
        loop.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loop.bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.train.log_every == 0 or step == c.steps - 1:
            log(task="clip", step=step, loss=loss, lr=sched.get_last_lr()[0])

    model.eval()
    if d.main:
        if n_val:
            metrics.update(evaluate_clip(model, tokenizer, images[:n_val].float(), corpus.captions[:n_val],
                                         corpus.attributes[:n_val]))
            log(task="clip", step=c.steps, **metrics)
            print(summary(metrics))
        else:
            print(f"CLIP evaluation skipped: {len(images)} pairs are too few to hold out a tenth of them")
        loop.finish()
        print(f"saved {path}")
    return model


def report_truncation(n_cut, n, log, task, d):
    """Say once how many captions were longer than CLIP's context and were cut (never a stop)."""
    log(task=task, captions_truncated=n_cut, captions=n)
    if n_cut and d.main:
        print(f"{n_cut} of {n} captions are longer than 77 CLIP tokens: truncated, as CLIP training does")
