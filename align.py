"""Fairness alignment tuning. `python align.py [--preset ...] [--lambda-clip 0.5] [--target-female P] [--flags]`

Fine-tunes the pretrained text-to-image model so that the subgroup classifier's female share over images
generated from prompts that never mention sex matches the target dataset's, while a CLIP-consistency term
keeps each image close to what the frozen original model draws from the same noise and prompt.

Per step (DESIGN.md, "Alignment tuning"; Shen et al. 2024):
  1. N = --align-batch noise images for N / M tuning prompts, M = --align-per-prompt images each; a share
     --named-sex of the prompts name sex. The student (LoRA adapters on the UNet, or the whole UNet with
     --full) samples with DDIM *with gradients* (per-step detach + gradient rescaling, `fairness.py`);
     the frozen teacher samples from the same noise without.
  2. Distributional alignment, within each prompt's M images: rank by the calibrated p(female), assign
     the top round(M r) to "female" (optimal transport to the prompt's target share r: the target
     corpus' share, or 1 / 0 for a prompt naming a woman / a man), drop uncertain assignments and those
     the classifier is already as sure of as of real target images (--align-cap), cross-entropy.
     (`--align-loss kl`: KL between each prompt's mean probability and r.)
  3. loss = alignment + lambda_clip * (1 - cos(CLIP_img(student), CLIP_img(teacher))).
Missing prerequisites (diffusion.pt, classifier.pt) are trained first. Writes <run>/aligned.pt (EMA of the
tuned weights, adapters merged: it loads like diffusion.pt, e.g. `python sample.py --model aligned`), then
the before/after report (`minimedi/evaluate.py`: report.md, report.json, fairness.png; --no-report skips it).
"""
import copy
import os

import torch
from tqdm import tqdm

import train
from minimedi import diffusion, evaluate, fairness, training
from minimedi.checkpoint import load_checkpoint, save_checkpoint
from minimedi.classifier import class_shares, load_classifier
from minimedi.config import config_to_dict, parse_config
from minimedi.data.captions import named_sex_tuning_prompts, tuning_prompts
from minimedi.data.reference import reference_images
from minimedi.errors import UserError, run_main
from minimedi.lora import inject_lora, merge_lora
from minimedi.pipeline import load_generator
from minimedi.report import write_report

SECTIONS = ("run", "align", "eval")


def prerequisites(cfg, d):
    """diffusion.pt and classifier.pt of the run, trained now (with a log line) when missing."""
    if not os.path.exists(os.path.join(cfg.run_dir, "diffusion.pt")):
        print(f"{cfg.run_dir}/diffusion.pt not found: training the diffusion model first (python train.py)")
        train.train_diffusion(cfg, d)
    path = os.path.join(cfg.run_dir, "classifier.pt")
    if not os.path.exists(path):
        print(f"{path} not found: training the subgroup classifier first (python train.py --task classifier)")
        train.train_subgroup_classifier(cfg, d)
    classifier, ckpt = load_classifier(path, d.device)
    classes, shares = ckpt["classes"], ckpt["target_shares"]
    if cfg.align.target_female is not None:
        if classes != ["male", "female"]:
            raise UserError(f"--target-female needs a sex classifier; {path} classifies {classes}")
        if not 0 <= cfg.align.target_female <= 1:
            raise UserError(f"--target-female {cfg.align.target_female}: must lie in [0, 1]")
        shares = [1 - cfg.align.target_female, cfg.align.target_female]
    return classifier, classes, shares


def alignment_loss(cfg, classifier, images, groups, prompt_shares, shares, real_toward):
    """The fairness term on the student's images, and the batch's predicted class shares for the log.

    One binary axis (sex, age group): the distributional alignment loss with its closed-form OT, within
    each prompt's images (`groups`, target `prompt_shares` per prompt). More classes (sex x age group):
    the exact OT over the joint distribution, within each prompt. `--align-loss kl`: KL between the
    target shares and each prompt's mean probabilities."""
    logits = classifier(images)
    probs = torch.softmax(logits.detach() / classifier.temperature, -1)  # predict_proba, without a second pass
    stats = {}
    if cfg.align.loss == "kl":
        target = torch.stack([1 - prompt_shares, prompt_shares], 1) if len(shares) == 2 else torch.tensor(shares)
        loss = fairness.kl_alignment_loss(torch.softmax(logits / classifier.temperature, -1), target, groups)
    elif len(shares) == 2:
        loss, stats = fairness.distributional_alignment_loss(logits, groups, prompt_shares, cfg.align.uncertainty,
                                                             float(classifier.temperature), real_toward)
    else:
        loss, _ = fairness.joint_alignment_loss(logits, probs, shares, groups)
    return loss, class_shares(probs.argmax(-1), len(shares)), stats


def main(argv=None):
    cfg = parse_config(argv, SECTIONS, description=__doc__)
    a = cfg.align
    if a.batch % a.per_prompt:
        raise UserError(f"--align-batch {a.batch} is not a multiple of --align-per-prompt {a.per_prompt}")
    d = training.setup(cfg.run.device)
    classifier, classes, shares = prerequisites(cfg, d)
    teacher, encoder, base_cfg = load_generator(cfg.run_dir, "diffusion", d.device)
    if cfg.run.compile:
        teacher.compile()  # the teacher only samples; the student's LoRA graph stays eager (it is merged later)
    base = load_checkpoint(os.path.join(cfg.run_dir, "diffusion.pt"))
    student = copy.deepcopy(teacher).requires_grad_(True)
    torch.manual_seed(cfg.run.seed)  # the adapters' random init: same seed, same run
    params = list(student.parameters()) if a.full else inject_lora(student, a.lora_rank)
    opt = torch.optim.AdamW(params, lr=a.lr)
    ema = training.make_ema(student, a.ema)
    g = torch.Generator().manual_seed(cfg.run.seed)
    path, start = os.path.join(cfg.run_dir, "aligned.pt"), 0
    if cfg.run.resume:
        ckpt = load_checkpoint(path)
        student.load_state_dict(ckpt["student"])
        ema.load_state_dict(ckpt["ema_state"])
        opt.load_state_dict(ckpt["optimizer"])
        g.set_state(ckpt["rng"])
        start = ckpt["step"]

    neutral = [p["prompt"] for p in tuning_prompts()]
    named = {sex: [p["prompt"] for p in prompts] for sex, prompts in named_sex_tuning_prompts().items()}
    named_share = a.named_sex if classes == ["male", "female"] else 0.0  # only a sex classifier reads named sex
    real_toward = None
    if a.cap == "match" and a.loss == "dal" and classes == ["male", "female"]:
        real, attributes = reference_images(base_cfg.data)
        is_female = torch.tensor([x["sex"] == "female" for x in attributes])
        real_toward = fairness.real_confidence(classifier, real, is_female)
    size, prediction = base_cfg.data.image_size, base_cfg.diffusion.prediction
    log_snrs = diffusion.sampling_log_snrs(a.ddim_steps, base_cfg.diffusion.schedule, d.device)
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"))
    goal = ", ".join(f"{c} {share:.3f}" for c, share in zip(classes, shares))
    print(f"aligning to the shares {goal} ({a.loss} loss, lambda_clip {a.lambda_clip}, "
          f"{'full UNet' if a.full else f'LoRA rank {a.lora_rank}'})")
    running = None
    bar = tqdm(range(start, a.steps), initial=start, total=a.steps, desc="align")
    for step in bar:
        captions, groups, prompt_shares = fairness.prompt_batch(neutral, named, a.batch // a.per_prompt, a.per_prompt,
                                                                named_share, shares[1], g)
        if not a.per_prompt_ot:  # the ablation: one assignment over the whole batch, to the batch's mean share
            groups, prompt_shares = torch.zeros_like(groups), prompt_shares.mean().reshape(1)
        states, mask, pooled = encoder.encode(captions)
        noise = torch.randn((a.batch, 1, size, size), generator=g).to(d.device)
        grad_steps = fairness.random_grad_steps(a.ddim_steps, a.grad_steps, g)
        x_student = fairness.sample_ddim_with_grad(student, noise, log_snrs, states, mask, pooled, a.guidance,
                                                   prediction, checkpoint=a.checkpoint, grad_steps=grad_steps)
        align, fractions, stats = alignment_loss(cfg, classifier, x_student, groups.to(d.device), prompt_shares,
                                                 shares, real_toward)
        loss, clip = align, torch.zeros(())
        if a.lambda_clip > 0:  # the teacher's images cost as much as the student's forward: skip when unused
            x_teacher = fairness.sample_ddim_teacher(teacher, noise, log_snrs, states, mask, pooled,
                                                     a.guidance, prediction)
            clip = fairness.clip_consistency_loss(encoder.clip, x_student, x_teacher)
            loss = align + a.lambda_clip * clip
        training.check_finite(loss, step, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update_parameters(student)
        running = fractions if running is None else 0.9 * running + 0.1 * fractions
        bar.set_postfix(align=f"{align.item():.3f}", clip=f"{clip.item():.3f}",
                        **{c.replace(" ", "_"): f"{share:.2f}" for c, share in zip(classes, running.tolist())})
        log(task="align", step=step + 1, align_loss=align, clip_loss=clip,
            class_fractions=dict(zip(classes, fractions.tolist())), **stats,
            running_class_fractions=dict(zip(classes, running.tolist())))

    merged = merge_lora(copy.deepcopy(ema.module))
    save_checkpoint(path, {"model": merged.state_dict(), "ema": merged.state_dict(), "student": student.state_dict(),
                           "ema_state": ema.state_dict(), "optimizer": opt.state_dict(), "rng": g.get_state(),
                           "step": a.steps, "config": base["config"], "text": base["text"],
                           "align": config_to_dict(cfg)["align"], "classes": classes, "target_shares": shares})
    print(f"saved {path}")
    if a.report and classes != ["male", "female"]:
        print(f"the fairness report reads sex; skipped for a {'/'.join(classes)} classifier")
    elif a.report:
        report, images = evaluate.fairness_report(cfg, d.device)
        for written in write_report(cfg.run_dir, report, images):
            print(f"wrote {written}")


if __name__ == "__main__":
    run_main(main)
