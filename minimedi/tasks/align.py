"""Fairness alignment tuning: `python align.py` -> <run>/aligned.pt, then the before/after report.

Fine-tunes the pretrained text-to-image model so that the subgroup classifier's share of each class over
images generated from prompts that never name the subgroup matches the target dataset's, while a
CLIP-consistency term keeps each image close to what the frozen original model draws from the same noise
and prompt (DESIGN.md, "Alignment tuning"; Shen et al. 2024). Per step:

  1. a batch of --align-batch noise images for batch / M tuning prompts, M = --align-per-prompt images each;
     a share --named-sex of the prompts name sex. The student (LoRA adapters on the UNet, or the whole UNet
     with --full) samples with DDIM *with gradients* (per-step detach + gradient rescaling, and by default
     through the captioned branch of the guided prediction only: `differentiable_sampler.py`); the frozen
     teacher samples from the same noise without;
  2. distributional alignment, within each prompt's M images: rank by the calibrated p(female), assign the
     top M r (randomized rounding) to "female" (optimal transport to the prompt's target share r: the target
     corpus' share, or 1 / 0 for a prompt naming a woman / a man); the loss pulls each image, from either
     side, to the classifier's reading of its matched real target image (--align-cap, `fairness.py`);
  3. loss = alignment + lambda_clip * (1 - cos(CLIP_img(student), CLIP_img(teacher))), plus, with
     --lambda-null, lambda_null times how far the student's null-caption prediction has moved from the
     teacher's (`differentiable_sampler.null_drift`; 0 by default: holding it did not help, README).

aligned.pt holds the EMA of the tuned weights with the adapters merged, so it loads like diffusion.pt
(`python sample.py --model aligned`), and the student, optimiser and generators for an exact resume.
"""
import copy
import dataclasses
import os

import torch

from minimedi import diffusion, fairness, training
from minimedi.checkpoint import load_checkpoint
from minimedi.classifier import class_shares, load_classifier
from minimedi.config import config_to_dict
from minimedi.data.captions import named_sex_tuning_prompts, tuning_prompts
from minimedi.data.reference import classifier_reference
from minimedi.differentiable_sampler import random_grad_steps, sample_ddim_teacher, sample_ddim_with_grad
from minimedi.errors import UserError
from minimedi.lora import TEXT_TARGETS, inject_lora, merge_lora
from minimedi.pipeline import load_generator


def architecture(cfg):
    a = cfg.align
    return {"align": {"full": a.full, "lora_rank": a.lora_rank, "lora_targets": a.lora_targets}}


def target_shares(cfg, classes, shares, path):
    """The class shares to align to: the target corpus' (from classifier.pt), or --target-female."""
    if cfg.align.target_female is None:
        return shares
    if list(classes) != ["male", "female"]:
        raise UserError(f"--target-female needs a sex classifier; {path} classifies {classes}")
    return [1 - cfg.align.target_female, cfg.align.target_female]


def alignment_loss(cfg, classifier, images, groups, prompt_shares, shares, real_toward, offsets):
    """The fairness term on the student's images, the batch's predicted class shares and stats for the log.

    One binary axis (sex, age group): the distributional alignment loss with its closed-form OT, within
    each prompt's images (`groups`, target `prompt_shares` per prompt, rounding `offsets`). More classes
    (sex x age group): the exact OT over the joint distribution, within each prompt. `--align-loss kl`: KL
    between the target shares and each prompt's mean probabilities."""
    logits = classifier(images)
    probs = torch.softmax(logits.detach() / classifier.temperature, -1)  # predict_proba, without a second pass
    stats = {}
    if cfg.align.loss == "kl":
        target = torch.stack([1 - prompt_shares, prompt_shares], 1) if len(shares) == 2 else torch.tensor(shares)
        loss = fairness.kl_alignment_loss(torch.softmax(logits / classifier.temperature, -1), target, groups)
    elif len(shares) == 2:
        loss, stats = fairness.distributional_alignment_loss(logits, groups, prompt_shares, cfg.align.uncertainty,
                                                             float(classifier.temperature), real_toward, offsets,
                                                             cfg.align.cap)
    else:
        loss, _ = fairness.joint_alignment_loss(logits, probs, shares, groups)
    return loss, probs, stats


def real_confidence(cfg, classifier, cls_ckpt):
    """What `--align-cap match` / `stop` matches to: the calibrated log-odds of real target images held out
    from the classifier toward their own sex (`fairness.real_confidence`); None when there is no cap."""
    a = cfg.align
    if a.cap == "none" or a.loss != "dal" or cls_ckpt["classes"] != ["male", "female"]:
        return None
    real = classifier_reference(cls_ckpt)
    is_female = torch.tensor([x["sex"] == "female" for x in real.attributes])
    return fairness.real_confidence(classifier, real.images.float(), is_female)


def make_aligned(cfg, d):
    """Tune the run's diffusion model toward the classifier's target shares; returns the merged EMA UNet."""
    a = cfg.align
    classifier_path = os.path.join(cfg.run_dir, "classifier.pt")
    classifier, cls_ckpt = load_classifier(classifier_path, d.device)
    classes = cls_ckpt["classes"]
    shares = target_shares(cfg, classes, cls_ckpt["target_shares"], classifier_path)
    teacher = load_generator("diffusion", cfg.run_dir, d.device)
    base = load_checkpoint(os.path.join(cfg.run_dir, "diffusion.pt"))
    if cfg.run.compile:
        teacher.unet.compile()  # the teacher only samples; the student's LoRA graph stays eager (it is merged later)
    student = copy.deepcopy(teacher.unet).requires_grad_(a.full)
    targets = a.lora_targets.split(",")
    unet_targets = tuple(t for t in targets if t != "text")
    torch.manual_seed(cfg.run.seed)  # the adapters' random init: same seed, same run
    params = list(student.parameters()) if a.full else []
    if unet_targets and not a.full:
        params = inject_lora(student, a.lora_rank, targets=unet_targets)
    state = {"student": student}
    text_student = None
    if "text" in targets:  # Shen et al.'s default: adapters on the text encoder, so every caption's states move
        text_student = copy.deepcopy(teacher.encoder.clip)
        params += inject_lora(text_student.transformer, a.lora_rank, targets=TEXT_TARGETS)
        state.update(text_student=text_student, text_ema=training.make_ema(text_student, a.ema))
    opt = torch.optim.AdamW(params, lr=a.lr)
    ema = training.make_ema(student, a.ema)
    g = torch.Generator().manual_seed(cfg.run.seed)
    path = os.path.join(cfg.run_dir, "aligned.pt")

    def record():
        merged = merge_lora(copy.deepcopy(ema.module))
        text = {}
        if text_student is not None:
            clip = merge_lora(copy.deepcopy(state["text_ema"].module))
            text = {"text_encoder": {"config": dataclasses.asdict(clip.config), "model": clip.state_dict()}}
        return {"model": merged.state_dict(), "ema": merged.state_dict(), "config": base["config"],
                "architecture": {**base["architecture"], **architecture(cfg)}, "data": base["data"],
                "target_data": cls_ckpt["data"], **text,
                "text": base["text"], "align": config_to_dict(cfg)["align"], "classes": classes,
                "target_shares": shares}

    tuning = tuning_prompts(a.phrasings, a.templates)
    neutral, position = [p["prompt"] for p in tuning], {p["prompt"]: i for i, p in enumerate(tuning)}
    reads_sex = classes == ["male", "female"]  # only a sex classifier reads named sex or a sequence's female share
    focus = fairness.GroupFocus([p["modality"] for p in tuning], shares[1], a.focus if reads_sex else 0.0)
    loop = training.TrainLoop(path, a.steps, {**state, "ema": ema, "optimizer": opt, "batches": g, "focus": focus},
                              record, a.ckpt_every, d, cfg.run.resume, architecture(cfg), desc="align")
    named = {sex: [p["prompt"] for p in prompts] for sex, prompts in named_sex_tuning_prompts(a.phrasings).items()}
    named_share = a.named_sex if reads_sex else 0.0
    real_toward = real_confidence(cfg, classifier, cls_ckpt)
    size, prediction = teacher.image_size, teacher.diffusion.prediction
    log_snrs = diffusion.sampling_log_snrs(a.ddim_steps, teacher.diffusion.schedule, d.device)
    log = training.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"))
    goal = ", ".join(f"{c} {share:.3f}" for c, share in zip(classes, shares))
    print(f"aligning to the shares {goal} ({a.loss} loss, lambda_clip {a.lambda_clip}, lambda_null {a.lambda_null}, "
          f"{'full UNet' if a.full else f'LoRA rank {a.lora_rank}'}; {a.batch // a.per_prompt} prompts x "
          f"{a.per_prompt} images a step, {'within each prompt' if a.per_prompt_ot else 'one OT over the batch'}, "
          f"{named_share:.0%} naming sex, cap {a.cap if real_toward is not None else 'none'})")
    encoder, running = teacher.encoder, None
    for step in loop:
        captions, groups, prompt_shares = fairness.prompt_batch(neutral, named, a.batch // a.per_prompt, a.per_prompt,
                                                                named_share, shares[1], g,
                                                                focus.weights() if focus.strength > 0 else None)
        if not a.per_prompt_ot:  # the ablation: one assignment over the whole batch, to the batch's mean share
            groups, prompt_shares = torch.zeros_like(groups), prompt_shares.mean().reshape(1)
        offsets = torch.rand(len(prompt_shares), generator=g)  # randomized rounding of each prompt's n r women
        states, mask, pooled = encoder.encode(captions)
        student_states, student_pooled = states, pooled
        if text_student is not None:
            student_states, _, student_pooled = encoder.encode_with(text_student, captions)
        noise = torch.randn((a.batch, 1, size, size), generator=g).to(d.device)
        grad_steps = random_grad_steps(a.ddim_steps, a.grad_steps, g)
        x_student, drift = sample_ddim_with_grad(student, noise, log_snrs, student_states, mask, student_pooled,
                                                 a.guidance, prediction, checkpoint=a.checkpoint, grad_steps=grad_steps,
                                                 detach_uncond=a.detach_uncond,
                                                 null_anchor=teacher.unet if a.lambda_null > 0 else None)
        align, probs, stats = alignment_loss(cfg, classifier, x_student, groups.to(d.device), prompt_shares,
                                             shares, real_toward, offsets)
        fractions = class_shares(probs.argmax(-1), len(shares))
        if reads_sex:
            focus.update(torch.tensor([position.get(c, -1) for c in captions]), probs[:, 1].cpu())
        loss, clip = align, torch.zeros(())
        if a.lambda_clip > 0:  # the teacher's images cost as much as the student's forward: skip when unused
            x_teacher = sample_ddim_teacher(teacher.unet, noise, log_snrs, states, mask, pooled, a.guidance, prediction)
            clip = fairness.clip_consistency_loss(encoder.clip, x_student, x_teacher)
            loss = align + a.lambda_clip * clip
        loss = loss + a.lambda_null * drift
        loop.check_finite(loss, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update_parameters(student)
        if text_student is not None:
            state["text_ema"].update_parameters(text_student)
        running = fractions if running is None else 0.9 * running + 0.1 * fractions
        loop.bar.set_postfix(align=f"{align.item():.3f}", clip=f"{clip.item():.3f}",
                             **{c.replace(" ", "_"): f"{share:.2f}" for c, share in zip(classes, running.tolist())})
        log(task="align", step=step + 1, align_loss=align, clip_loss=clip, null_drift=drift,
            class_fractions=dict(zip(classes, fractions.tolist())), **stats,
            running_class_fractions=dict(zip(classes, running.tolist())), sequence_female=focus.shares())
    loop.finish()
    print(f"saved {path}")
    return merge_lora(copy.deepcopy(ema.module))
