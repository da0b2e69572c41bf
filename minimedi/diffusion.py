"""Continuous-time Gaussian diffusion: noise schedules, the training loss, samplers and guidance.

Notation (Kingma et al. 2021, "Variational Diffusion Models"; Imagen): time t in [0, 1] runs from
data (t = 0) to noise (t = 1); a schedule gives the log signal-to-noise ratio lambda(t), decreasing in t.

    alpha^2 = sigmoid(lambda),  sigma^2 = sigmoid(-lambda)      (so alpha^2 + sigma^2 = 1, SNR = e^lambda)
    x_t     = alpha x0 + sigma eps,   eps ~ N(0, I)

The network sees (x_t, lambda) and predicts eps or v = alpha eps - sigma x0 (Salimans & Ho 2022);
either converts to x0_hat. Every sampler below is a small stateless function (as in k-diffusion) over
a `denoise(x, log_snr) -> x0_hat` callable and an increasing sequence of log-SNRs (noise decreasing,
ending at +inf = the clean image), so it can be tested with exact denoisers of toy data sets.
`make_denoiser` turns a UNet + caption into such a callable, with classifier-free guidance and
Imagen's dynamic thresholding.
"""
import math

import torch

from minimedi.errors import UserError

LOG_SNR_MIN, LOG_SNR_MAX = -20.0, 20.0


def cosine_log_snr(t):
    """lambda(t) = -2 log tan(pi t / 2), with t squeezed so that lambda(0) = 20 and lambda(1) = -20.

    The squeeze (as in VDM++ / simple diffusion) keeps lambda finite and smooth instead of clamping.
    """
    t_min = math.atan(math.exp(-0.5 * LOG_SNR_MAX))
    t_max = math.atan(math.exp(-0.5 * LOG_SNR_MIN))
    log_snr = -2 * torch.log(torch.tan(t_min + t * (t_max - t_min)))
    return log_snr.clamp(LOG_SNR_MIN, LOG_SNR_MAX)


def linear_log_snr(t):
    """lambda(t) = -log(expm1(1e-4 + 10 t^2)): DDPM's linear beta schedule in continuous time."""
    return -torch.log(torch.expm1(1e-4 + 10 * t ** 2)).clamp(LOG_SNR_MIN, LOG_SNR_MAX)


SCHEDULES = {"cosine": cosine_log_snr, "linear": linear_log_snr}


def log_snr_schedule(name):
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def alpha_sigma(log_snr):
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda)); lambda = +inf gives (1, 0)."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def expand_like(coef, x):
    """A per-sample [B] (or scalar) coefficient, viewed so it broadcasts against x [B, ...]."""
    coef = torch.as_tensor(coef, device=x.device)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim)) if coef.ndim else coef


def q_sample(x0, log_snr, noise):
    """x_t = alpha x0 + sigma eps: the forward (noising) process in one jump."""
    alpha, sigma = alpha_sigma(expand_like(log_snr, x0))
    return alpha * x0 + sigma * noise


# ---- what the network predicts, and back ----------------------------------------------------------

def v_target(x0, noise, log_snr):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, "Progressive Distillation", eq. 5 onwards)."""
    alpha, sigma = alpha_sigma(expand_like(log_snr, x0))
    return alpha * noise - sigma * x0


def x0_eps_from_pred(pred, x_t, log_snr, prediction):
    """(x0_hat, eps_hat) from the network output.

    eps-prediction: x0 = (x_t - sigma eps) / alpha;  v-prediction: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v.
    """
    alpha, sigma = alpha_sigma(expand_like(log_snr, x_t))
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if prediction == "v":
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    raise UserError(f"unknown prediction {prediction!r}; choose eps or v")


def min_snr_weight(log_snr, gamma, prediction):
    """Min-SNR-gamma (Hang et al. 2023): weight the loss like min(SNR, gamma) * ||x0_hat - x0||^2.

    ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 and ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2, hence
    min(SNR, gamma) / SNR on the eps loss and min(SNR, gamma) / (SNR + 1) on the v loss. gamma = 0: off.
    """
    if gamma <= 0:
        return torch.ones_like(log_snr)
    snr = log_snr.exp()
    clipped = snr.clamp(max=gamma)
    return clipped / snr if prediction == "eps" else clipped / (snr + 1)


def sample_t(batch, generator=None, device="cpu"):
    """t ~ U[0, 1), low-discrepancy: one uniform offset shared by an even grid (Kingma et al. 2021, VDM)."""
    u = torch.rand((), generator=generator, device=device)
    return (u + torch.arange(batch, device=device) / batch) % 1.0


def training_losses(model_fn, x0, schedule="cosine", prediction="v", min_snr_gamma=5.0,
                    t=None, noise=None, generator=None, **model_kwargs):
    """Per-sample diffusion losses of `model_fn(x_t, log_snr, **model_kwargs)` on clean images x0.

    Returns {"loss": min-SNR-weighted MSE [B], "mse": unweighted MSE [B], "log_snr": [B]}; the training
    step minimises loss.mean(). Pass t and noise to control the randomness (e.g. the same global draw
    on every DDP rank); otherwise they come from `generator`.
    """
    if t is None:
        t = sample_t(x0.shape[0], generator, x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    log_snr = log_snr_schedule(schedule)(t)
    x_t = q_sample(x0, log_snr, noise)
    target = noise if prediction == "eps" else v_target(x0, noise, log_snr)
    pred = model_fn(x_t, log_snr, **model_kwargs)
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return {"loss": min_snr_weight(log_snr, min_snr_gamma, prediction) * mse, "mse": mse, "log_snr": log_snr}


# ---- noise conditioning augmentation (cascaded diffusion) ------------------------------------------

def augmentation_log_snr(level, schedule="cosine"):
    """The log-SNR of augmentation level s in [0, 1]: the schedule's lambda(s), and +inf at s = 0.

    The level is a diffusion time on the model's own schedule, so "0.2" means the corruption x_t has at
    t = 0.2. Level 0 is no corruption at all (alpha = 1, sigma = 0 exactly) rather than lambda(0) = 20.
    """
    level = torch.as_tensor(level, dtype=torch.float32)
    return torch.where(level > 0, log_snr_schedule(schedule)(level), torch.full_like(level, math.inf))


def noise_augment(x_low, level, noise, schedule="cosine"):
    """(z, lambda_s): the low-resolution condition corrupted by the forward process at level s [B] or scalar.

    Noise conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models", sec. 4.2; Imagen sec. 2.5):
    z = alpha_s x_low + sigma_s eps. A super-resolution model trained on clean low-resolution *data* would
    trust every pixel of its condition, and at sampling time that condition is a *base sample*, with the
    base model's own artefacts. Trained on z at random s and told lambda_s, it learns to treat the condition
    as evidence of a given reliability; at sampling one fixed s trades fidelity to the base sample (small s)
    against freedom to repair it (large s).
    """
    log_snr = augmentation_log_snr(level, schedule).to(x_low.device).expand(x_low.shape[0])
    return q_sample(x_low, log_snr, noise), log_snr


# ---- samplers: x at log_snrs[0] -> x at log_snrs[-1] ------------------------------------------------

def sampling_log_snrs(steps, schedule="cosine", device="cpu"):
    """lambda at t = 1, 1 - 1/steps, ..., 1/steps, then +inf: `steps` model calls, ending on the clean x0_hat."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    log_snrs = log_snr_schedule(schedule)(t)
    log_snrs[-1] = math.inf
    return log_snrs


def ancestral_variance(log_snr_t, log_snr_s):
    """sigma_s^2 c with c = 1 - exp(lambda_t - lambda_s): the variance of q(x_s | x_t, x0) for s < t."""
    _, sigma_s = alpha_sigma(log_snr_s)
    return (sigma_s ** 2 * -torch.expm1(log_snr_t - log_snr_s)).clamp(min=0)


def ddpm_step(x_t, x0_hat, log_snr_t, log_snr_s, noise):
    """Ancestral step t -> s: sample q(x_s | x_t, x0 = x0_hat), mean alpha_s (x_t (1 - c) / alpha_t + c x0_hat)."""
    alpha_t, _ = alpha_sigma(log_snr_t)
    alpha_s, _ = alpha_sigma(log_snr_s)
    c = -torch.expm1(log_snr_t - log_snr_s)
    mean = alpha_s * (x_t * (1 - c) / alpha_t + c * x0_hat)
    return mean + ancestral_variance(log_snr_t, log_snr_s).sqrt() * noise


def ddim_coefficients(log_snr_t, log_snr_s, eta=0.0):
    """(c_x, c_x0, c_noise) with ddim_step = c_x x_t + c_x0 x0_hat + c_noise z (Song et al. 2021, eq. 12).

    With eps_hat = (x_t - alpha_t x0_hat) / sigma_t and v_anc the ancestral variance:
        x_s = alpha_s x0_hat + sqrt(sigma_s^2 - eta^2 v_anc) eps_hat + eta sqrt(v_anc) z.
    eta = 0 is deterministic; eta = 1 is the ancestral (DDPM) step. Exposed so a differentiable
    sampler can read off how each step's x0_hat reaches the final image.
    """
    alpha_t, sigma_t = alpha_sigma(log_snr_t)
    alpha_s, sigma_s = alpha_sigma(log_snr_s)
    v_anc = ancestral_variance(log_snr_t, log_snr_s)
    sigma_dir = (sigma_s ** 2 - eta ** 2 * v_anc).clamp(min=0).sqrt()
    c_x = sigma_dir / sigma_t
    return c_x, alpha_s - c_x * alpha_t, eta * v_anc.sqrt()


def ddim_step(x_t, x0_hat, log_snr_t, log_snr_s, eta=0.0, noise=None):
    """One DDIM step t -> s (either direction when eta = 0: s noisier than t inverts the step)."""
    c_x, c_x0, c_noise = (expand_like(c, x_t) for c in ddim_coefficients(log_snr_t, log_snr_s, eta))
    x_s = c_x * x_t + c_x0 * x0_hat
    return x_s if eta == 0 else x_s + c_noise * noise


def sample_ddpm(denoise, x, log_snrs, generator=None):
    """Ancestral sampling (Ho et al. 2020) along `log_snrs`."""
    for log_snr_t, log_snr_s in zip(log_snrs[:-1], log_snrs[1:]):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = ddpm_step(x, denoise(x, log_snr_t), log_snr_t, log_snr_s, noise)
    return x


def sample_ddim(denoise, x, log_snrs, eta=0.0, generator=None):
    """DDIM (Song et al. 2021); eta = 0 is the deterministic probability-flow discretisation."""
    for log_snr_t, log_snr_s in zip(log_snrs[:-1], log_snrs[1:]):
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta else None
        x = ddim_step(x, denoise(x, log_snr_t), log_snr_t, log_snr_s, eta, noise)
    return x


def ddim_invert(denoise, x0, log_snrs):
    """Run deterministic DDIM backwards (clean -> noisy) along the finite, increasing `log_snrs`.

    Each step reuses `ddim_step` with the denoiser evaluated at the current, cleaner point, so
    `sample_ddim(denoise, ddim_invert(denoise, x0, ls), ls)` returns x0 up to the step error.
    """
    if not torch.isfinite(log_snrs).all():
        raise ValueError("ddim_invert needs finite log-SNRs (drop the final +inf of sampling_log_snrs)")
    x = x0
    for log_snr_s, log_snr_t in zip(log_snrs.flip(0)[:-1], log_snrs.flip(0)[1:]):
        x = ddim_step(x, denoise(x, log_snr_s), log_snr_s, log_snr_t)
    return x


def sample_dpmpp_2m(denoise, x, log_snrs):
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in half-log-SNR l = lambda / 2, h_i = l_i - l_{i-1}:

        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2},  r_i = h_{i-1} / h_i,
    first order (D = x0_hat, i.e. DDIM) on the first step and on the final step to the clean image.
    """
    x0_prev, h_prev = None, None
    for log_snr_t, log_snr_s in zip(log_snrs[:-1], log_snrs[1:]):
        x0_hat = denoise(x, log_snr_t)
        _, sigma_t = alpha_sigma(log_snr_t)
        alpha_s, sigma_s = alpha_sigma(log_snr_s)
        h = (log_snr_s - log_snr_t) / 2
        d = x0_hat
        if x0_prev is not None and torch.isfinite(log_snr_s):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_prev
        x = (sigma_s / sigma_t) * x - alpha_s * torch.expm1(-h) * d
        x0_prev, h_prev = x0_hat, h
    return x


def sample(denoise, shape, steps, sampler="ddim", schedule="cosine", eta=0.0, generator=None, device="cpu"):
    """Draw x_T ~ N(0, I) from `generator` and run `sampler` for `steps` model calls: same seed, same images."""
    log_snrs = sampling_log_snrs(steps, schedule, device)
    x = torch.randn(shape, generator=generator, device=device)
    if sampler == "ddpm":
        return sample_ddpm(denoise, x, log_snrs, generator)
    if sampler == "ddim":
        return sample_ddim(denoise, x, log_snrs, eta, generator)
    if sampler == "dpmpp2m":
        return sample_dpmpp_2m(denoise, x, log_snrs)
    raise UserError(f"unknown sampler {sampler!r}; choose ddpm, ddim or dpmpp2m")


# ---- from a UNet to a denoiser ----------------------------------------------------------------------

def dynamic_threshold(x0_hat, p=0.95):
    """Imagen's dynamic thresholding: s = max(1, quantile_p |x0_hat|) per sample; clamp to [-s, s], divide by s.

    Keeps high-guidance predictions in the data range without the saturation of a hard clip.
    """
    s = torch.quantile(x0_hat.flatten(1).abs().float(), p, dim=1).clamp(min=1.0)
    s = expand_like(s.to(x0_hat.dtype), x0_hat)
    return torch.maximum(torch.minimum(x0_hat, s), -s) / s


def make_denoiser(unet, text_tokens, text_mask, text_pooled, guidance=1.0, prediction="v", threshold=0.95,
                  **unet_kwargs):
    """denoise(x, log_snr) -> x0_hat for the UNet on these captions, with classifier-free guidance.

    Conditional and unconditional (null caption) predictions come from ONE batched call; the guided
    prediction is uncond + guidance * (cond - uncond) (Ho & Salimans 2021). Guidance 1 is the conditional
    model alone, so it makes one call on the batch instead of two. threshold: the dynamic thresholding
    percentile; 0 or None turns it off (as in the differentiable sampler of alignment). unet_kwargs: further
    per-image conditioning tensors [B, ...] (the super-resolution UNet's low-resolution image and its
    augmentation level), the same in both halves of the batch: only the caption is dropped.
    """
    b, copies = text_tokens.shape[0], 1 if guidance == 1 else 2
    drop = (torch.arange(copies * b) >= b).to(text_tokens.device)
    tokens, mask, pooled = (torch.cat([t] * copies) for t in (text_tokens, text_mask, text_pooled))
    kwargs = {k: torch.cat([v] * copies) for k, v in unet_kwargs.items()}

    def denoise(x, log_snr):
        log_snr = torch.as_tensor(log_snr, device=x.device).expand(x.shape[0])
        pred = unet(torch.cat([x] * copies), torch.cat([log_snr] * copies), tokens, mask, pooled, drop_text=drop,
                    **kwargs)
        if copies == 2:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        x0_hat, _ = x0_eps_from_pred(pred, x, log_snr, prediction)
        return dynamic_threshold(x0_hat, threshold) if threshold else x0_hat

    return denoise
