"""The differentiable sampler of alignment tuning: deterministic DDIM whose images carry the gradient of
a loss back to the UNet's trainable weights, without backpropagating through the whole chain (Shen et al.
2024, "adjusted direct fine-tuning", section 4.2), and the frozen teacher's images from the same noise.
"""
import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from minimedi.diffusion import alpha_sigma, ddim_coefficients, ddim_step, make_denoiser, sample_ddim, x0_eps_from_pred
from minimedi.grad import ScaleGrad


def direct_coefficients(log_snr_t, log_snr_s, prediction):
    """(d, b) with x_s = d x_t + b pred for one DDIM (eta = 0) step, the network output `pred` held fixed.

    ddim_step is x_s = c_x x_t + c_x0 x0_hat, and x0_hat = alpha_t x_t - sigma_t v (v-prediction) or
    (x_t - sigma_t eps) / alpha_t (eps-prediction); collect the x_t and pred terms.
    """
    c_x, c_x0, _ = ddim_coefficients(log_snr_t, log_snr_s)
    alpha_t, sigma_t = alpha_sigma(log_snr_t)
    if prediction == "v":
        return c_x + c_x0 * alpha_t, -c_x0 * sigma_t
    return c_x + c_x0 / alpha_t, -c_x0 * sigma_t / alpha_t


def chain_factors(log_snrs, prediction):
    """A_i [K], float64: d x_final / d pred_i when every UNet input is detached,
    A_i = b_i * prod_{j > i} d_j (step i's prediction coefficient times the later direct x_t coefficients)."""
    log_snrs = log_snrs.double()
    steps = [direct_coefficients(t, s, prediction) for t, s in zip(log_snrs[:-1], log_snrs[1:])]
    factors, later = [], torch.ones((), dtype=torch.float64)
    for d, b in reversed(steps):
        factors.append(b * later)
        later = later * d
    return torch.stack(factors[::-1])


def guided_unet(unet, x, log_snr, tokens2, mask2, pooled2, drop, guidance, detach_uncond=False):
    """(guided prediction, null-caption prediction): both branches in one batched UNet call, combined by the
    guidance scale. The null-caption prediction is returned undetached, for `null_drift`."""
    cond, uncond = unet(torch.cat([x, x]), torch.cat([log_snr, log_snr]), tokens2, mask2, pooled2,
                        drop_text=drop).chunk(2)
    held = uncond.detach() if detach_uncond else uncond
    return held + guidance * (cond - held), uncond


def sample_ddim_with_grad(unet, x, log_snrs, text_tokens, text_mask, text_pooled, guidance=1.0,
                          prediction="v", rescale=True, checkpoint=True, grad_steps=None, detach_uncond=False,
                          null_anchor=None):
    """(images, null drift): deterministic DDIM from x along `log_snrs`, differentiable w.r.t. the UNet's
    trainable weights, and how far its null-caption branch has moved from `null_anchor`'s.

    Forward values equal `sample_ddim(make_denoiser(..., threshold=0), x, log_snrs)` exactly (no dynamic
    thresholding: its per-sample quantile would cut the gradient of the clipped pixels). Backward:

    * The UNet input is detached at every step, so step i's prediction pred_i reaches the final image
      only through the sampler's linear updates x_{i+1} = d_i x_i + b_i pred_i, i.e. with the scalar
      factor A_i = b_i prod_{j>i} d_j (`chain_factors`). This drops the Jacobians through the UNet input,
      which make full backpropagation through the chain expensive and unstable.
    * rescale=True multiplies the gradient entering pred_i by 1 / (K |A_i|): every step's prediction then
      receives the final-image gradient dL/dx_K with the same weight 1/K (sign kept). Shen et al. set each
      A_i to 1; we also divide by K so that the gradient's scale, and with it gradient clipping and the
      learning rate, does not depend on the number of steps. How much the rescaling matters depends on
      the parametrisation: at K = 20, |A_i| spans 0.074-0.079 for v-prediction on the cosine schedule
      (every step rotates (x0, eps) by about the same angle), 0.0039-0.16 for v on the linear schedule,
      and 0.079-2.2e4 for eps-prediction on the cosine schedule (the noisiest step's eps is divided by
      alpha ~ 5e-5 to reach x0), where without it one step would swamp the others.
    * checkpoint=True wraps each UNet call in `torch.utils.checkpoint`: only the step's inputs are kept
      and the activations are recomputed in backward, so memory is flat in K.
    * grad_steps (a set of step indices, None = all K): only these steps' predictions carry gradient; the
      others run without autograd. Backward then costs |S| UNet calls instead of K. With the rescaling
      the gradient is 1/|S| sum_{i in S} instead of 1/K sum_i of the per-step terms: a Monte-Carlo estimate
      of the full one, unbiased when S is a uniform random subset (`random_grad_steps`). Unlike truncating
      to the last steps, the early, low-SNR steps that decide global anatomy (head size) keep their share.
    * detach_uncond=True lets the gradient reach the weights through the conditional branch only. The
      guided prediction is w cond + (1 - w) uncond, and the null caption's branch is shared by every
      prompt: through it, at w = 3, pushing one prompt's images female pushes the null caption male with
      weight -2, which makes every prompt's guided images more female, those that say "man" included.
    * null_anchor (the frozen UNet, or None): at the steps that carry gradient, the mean squared distance
      between this UNet's null-caption prediction and the anchor's at the same input (`null_drift`),
      averaged over those steps; a zero without graph when None.
    """
    b, k = x.shape[0], len(log_snrs) - 1
    grad_steps = set(range(k)) if grad_steps is None else set(grad_steps)
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    tokens2, mask2, pooled2 = (torch.cat([t, t]) for t in (text_tokens, text_mask, text_pooled))
    scales = 1.0 / len(grad_steps) / chain_factors(log_snrs, prediction).abs() if rescale and grad_steps else None
    drifts = []
    for i, (log_snr_t, log_snr_s) in enumerate(zip(log_snrs[:-1], log_snrs[1:])):
        log_snr = torch.as_tensor(log_snr_t, device=x.device).expand(b)
        args = (unet, x.detach(), log_snr, tokens2, mask2, pooled2, drop, guidance, detach_uncond)
        if i not in grad_steps:
            with torch.no_grad():
                pred, _ = guided_unet(*args)
        elif checkpoint:
            pred, uncond = grad_checkpoint(guided_unet, *args, use_reentrant=False)
        else:
            pred, uncond = guided_unet(*args)
        if i in grad_steps and null_anchor is not None:
            drifts.append(null_drift(uncond, null_anchor, x, log_snr, text_tokens, text_mask, text_pooled))
        if rescale and i in grad_steps:
            pred = ScaleGrad.apply(pred, float(scales[i]))
        x0_hat, _ = x0_eps_from_pred(pred, x, log_snr, prediction)
        x = ddim_step(x, x0_hat, log_snr_t, log_snr_s)
    return x, torch.stack(drifts).mean() if drifts else x.new_zeros(())


def null_drift(uncond, anchor, x, log_snr, text_tokens, text_mask, text_pooled):
    """Mean squared distance between a null-caption prediction `uncond` (with grad) and the frozen `anchor`'s at
    the same input.

    Why anchor the null caption: it is the one input every prompt's guided prediction w cond + (1 - w) uncond
    shares, and a LoRA runs through both branches, so tuning moves it although no loss asks for that (on the
    default preset as far as the captioned branch: unconditional samples go from 0.23 to 0.46 female). For the
    tuning prompts the captioned branch makes up for the move; for a prompt tuning never saw, whose captioned
    branch moves only part as far, the guided image then moves by about w times that part less (w - 1) times
    the null move. With the null caption held where the frozen model has it, every prompt moves by w times
    its own part, and the aligned model's unconditional samples stay the frozen model's.
    """
    with torch.no_grad():
        held = anchor(x.detach(), log_snr, text_tokens, text_mask, text_pooled,
                      drop_text=torch.ones(x.shape[0], dtype=torch.bool, device=x.device))
    return (uncond - held).square().mean()


def random_grad_steps(k, m, generator):
    """A uniform random subset of m of the K sampler steps (all of them when m = 0 or m >= K)."""
    if m <= 0 or m >= k:
        return set(range(k))
    return set(torch.randperm(k, generator=generator)[:m].tolist())


@torch.no_grad()
def sample_ddim_teacher(unet, x, log_snrs, text_tokens, text_mask, text_pooled, guidance=1.0, prediction="v"):
    """The frozen teacher's images for the same noise and captions: the plain sampler, no thresholding, no grad."""
    denoise = make_denoiser(unet, text_tokens, text_mask, text_pooled, guidance, prediction, threshold=0)
    return sample_ddim(denoise, x, log_snrs)
