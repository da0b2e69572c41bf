"""Real images re-rendered by the base model (SDEdit, Meng et al. 2022): the generator's rendering, the real
image's labels.

A classifier trained on real images alone can take a trait of how the generator renders for a subgroup cue.
On the phantom the tuning classifier reads 0.64 of the base model's T1 images as female where their head
sizes fit 0.29, and the check classifier reads 0.36. Noised to a middle level of a DDIM chain and denoised by
the base model with its own caption, a real image keeps its global anatomy, which the skipped low-SNR steps
would have decided (its head size), and takes on the generator's texture. Re-rendered real T1 men are called
female more often by the tuning classifier (0.12 -> 0.22), not by the check classifier (0.13 -> 0.13), with
their head areas unchanged: the re-rendering carries the trait. Trained on such images too, under the real
image's label, the classifier has no use for it.
"""
import torch
from tqdm import tqdm

from minimedi import diffusion


@torch.inference_mode()
def rerender(generator, images, captions, start=0.4, steps=10, guidance=3.0, seed=0, batch_size=128):
    """images [N >= 1, 1, S, S] in [-1, 1] and their captions -> [N, 1, S, S]: each image noised (`q_sample`) to
    the log-SNR at step round(start * steps) of a `steps`-step DDIM chain (start 0: pure noise, the full
    chain; 1: the image itself), then denoised along the rest of the chain by the generator's UNet with
    its caption and classifier-free guidance. The same seed gives the same images."""
    log_snrs = diffusion.sampling_log_snrs(steps, generator.diffusion.schedule, generator.device)[round(start * steps):]
    g = torch.Generator().manual_seed(seed)
    out = []
    for first in tqdm(range(0, len(images), batch_size), desc="re-render", leave=False, disable=None):
        x0 = images[first:first + batch_size].float().to(generator.device)
        denoise = generator.denoiser(captions[first:first + batch_size], guidance)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        x = diffusion.q_sample(x0, log_snrs[0].expand(len(x0)), noise)
        out.append(diffusion.sample_ddim(denoise, x, log_snrs).cpu())
    return torch.cat(out)
