"""Imagen's cascade, stage two: train the super-resolution model on pairs, and run it on base samples.

Training step (Ho et al. 2021, "Cascaded Diffusion Models", sec. 4.2; Imagen, Saharia et al. 2022, sec. 2.5),
for a pair (x_low, x_high) of the same image at the base and the final resolution:

  1. draw an augmentation level s ~ U[0, s_max] per image and corrupt the low-resolution image by the
     forward process: z = alpha_s x_low + sigma_s eps'  (`diffusion.noise_augment`);
  2. upsample z to the final size (bicubic, `resize.upsample`): the condition c;
  3. crop x_high and c at the same random position: the UNet is convolutional, so it learns from crops
     and then runs on the whole image (Imagen trains its 256 -> 1024 model this way);
  4. the base model's loss (`diffusion.training_losses`) on the x_high crop, the UNet reading c and
     lambda_s beside x_t.

The corruption comes before the upsampling, so the level means what it says at the scale of the base
sample whose artefacts it must cover: white noise added after upsampling would be averaged away over each
block of output pixels. At level 0 the condition is exactly upsample(x_low).

Sampling (`super_resolve`): the base model's images, one fixed level s for all (Imagen found 0.1 to 0.3
best for 64 -> 256), the same corruption and upsampling, then any sampler of `diffusion` on the
super-resolution denoiser. Every random number comes from the caller's generator: same seed, same images.

Keeping the base image (`keep_low_frequencies`, on by default). Told that its input is noisy, the stage may
redraw it, and it does at every scale: without the projection the default stage's outputs, box-filtered back
to 32 px, were 0.107 RMS from the base samples (two renders of one slice differ by 0.055), and the base sex
classifier read 0.167 of them as female against 0.302 of the base samples (96 samples; README). So each
step's x0_hat is projected onto the images whose box filter is the base sample,

    x0_hat <- x0_hat + upsample(x_low - downsample(x0_hat))      (repeated: bicubic up is not down's inverse)

the low-pass replacement of ILVR (Choi et al. 2021, eq. 4), applied to x0_hat instead of x_t. The stage then
draws only what is finer than a base pixel: the anatomy the base model drew, and with it what alignment
tuned, passes through the cascade as it was. Noise augmentation still does its job in the condition: the
stage reads a corrupted input and learns not to copy its artefacts into the fine detail.
"""
import torch

from minimedi.diffusion import make_denoiser, noise_augment, sample, sample_t, training_losses
from minimedi.resize import downsample, upsample


def sr_condition(x_low, size, level, noise, schedule="cosine"):
    """(condition [B, C, size, size], its augmentation log-SNR [B]): x_low corrupted at `level` (a scalar or
    [B] in [0, 1]) with the standard normals `noise` (shaped like x_low), then upsampled to `size`."""
    z, aug_log_snr = noise_augment(x_low, level, noise, schedule)
    return upsample(z, size), aug_log_snr


def draw_sr_batch(batch, channels, low_size, size, crop, aug_max, cond_drop, generator=None):
    """Every random number of one training step for `batch` pairs, on the CPU, from `generator`.

    Draw the *global* batch with one generator seeded alike on every rank, then keep this rank's rows of
    each entry (as the base model's loop does): N processes then take exactly one process's steps.
    crop = 0 trains on whole images. Returns {"t": [B], "noise": [B, C, crop, crop], "aug_level": [B],
    "aug_noise": [B, C, low_size, low_size], "offsets": long [B, 2] (row, column of the crop's corner),
    "drop_text": bool [B]}.
    """
    crop = crop or size
    return {"t": sample_t(batch, generator),
            "noise": torch.randn(batch, channels, crop, crop, generator=generator),
            "aug_level": aug_max * torch.rand(batch, generator=generator),
            "aug_noise": torch.randn(batch, channels, low_size, low_size, generator=generator),
            "offsets": torch.randint(0, size - crop + 1, (batch, 2), generator=generator),
            "drop_text": torch.rand(batch, generator=generator) < cond_drop}


def crop_at(images, offsets, size):
    """The size x size window of each image [B, C, H, W] whose top-left corner is offsets[i] = (row, column)."""
    return torch.stack([x[:, r:r + size, c:c + size] for x, (r, c) in zip(images, offsets.tolist())])


def sr_training_losses(sr_unet, high, low, text_tokens, text_mask, text_pooled, draws, schedule="cosine",
                       prediction="v", min_snr_gamma=5.0):
    """Per-pair losses {"loss", "mse", "log_snr"} ([B] each, as `diffusion.training_losses`) of the
    super-resolution UNet on pairs high [B, C, H, H], low [B, C, h, h], with the randomness `draws` of
    `draw_sr_batch` (this rank's rows). The step minimises loss.mean()."""
    condition, aug_log_snr = sr_condition(low.float(), high.shape[-1], draws["aug_level"], draws["aug_noise"],
                                          schedule)
    size = draws["noise"].shape[-1]
    return training_losses(sr_unet, crop_at(high.float(), draws["offsets"], size), schedule, prediction,
                           min_snr_gamma, t=draws["t"], noise=draws["noise"], text_tokens=text_tokens,
                           text_mask=text_mask, text_pooled=text_pooled, drop_text=draws["drop_text"],
                           low_res=crop_at(condition, draws["offsets"], size), aug_log_snr=aug_log_snr)


def keep_low_frequencies(denoise, low, passes=4):
    """The denoiser whose x0_hat [B, C, H, H] box-filters to `low` [B, C, h, h] (see the module notes).

    Each pass adds the bicubic upsampling of what the box filter still misses, then clamps to the image
    range: alternating projections onto the two sets (POCS, Youla & Webb 1982), which meet, since the
    nearest-neighbour enlargement of `low` lies in both. A trained stage is close to consistent already, so
    its residual after four passes is under a grey level (0.002-0.003 RMS measured); even an untrained
    network's is under 0.05.
    """
    def projected(x, log_snr):
        x0_hat = denoise(x, log_snr)
        for _ in range(passes):
            x0_hat = (x0_hat + upsample(low - downsample(x0_hat, low.shape[-1]), x0_hat.shape[-1])).clamp(-1.0, 1.0)
        return x0_hat

    return projected


def super_resolve(sr_unet, low, text_tokens, text_mask, text_pooled, *, size, aug_level, steps, sampler="ddim",
                  eta=0.0, guidance=1.0, prediction="v", schedule="cosine", threshold=0.95, generator=None,
                  batch_size=32, keep_low=True):
    """The cascade's second stage: images [B, C, size, size] from low-resolution images `low` [B, C, h, h] in
    [-1, 1] (a base model's samples, or real images) and their captions' (tokens, mask, pooled).

    aug_level: the fixed noise conditioning augmentation level s; steps / sampler / eta / guidance /
    prediction / schedule / threshold as for the base model (`diffusion.sample`, `diffusion.make_denoiser`);
    keep_low: project every step onto the images that box-filter to `low` (`keep_low_frequencies`).
    Random numbers, in this order, from `generator` on low's device: the augmentation noise of all B images,
    then the sampler's for each chunk of `batch_size` images. Run it under `torch.inference_mode()`.
    """
    device = low.device
    noise = torch.randn(low.shape, generator=generator, device=device, dtype=low.dtype)
    condition, aug_log_snr = sr_condition(low, size, aug_level, noise, schedule)
    images = []
    for start in range(0, len(low), batch_size):
        rows = slice(start, start + batch_size)
        denoise = make_denoiser(sr_unet, text_tokens[rows], text_mask[rows], text_pooled[rows], guidance,
                                prediction, threshold, low_res=condition[rows], aug_log_snr=aug_log_snr[rows])
        if keep_low:
            denoise = keep_low_frequencies(denoise, low[rows])
        shape = (len(condition[rows]), low.shape[1], size, size)
        images.append(sample(denoise, shape, steps, sampler, schedule, eta, generator, device))
    return torch.cat(images)
