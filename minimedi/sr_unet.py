"""The super-resolution UNet of Imagen's cascade (Saharia et al. 2022, sec. 2.5 and appendix B.1).

A cascade (Ho et al. 2021, "Cascaded Diffusion Models") draws a small image with the base model and then
enlarges it with a second diffusion model, p(x_high | x_low, caption). This network is that second model's
denoiser: it maps a noisy high-resolution image x_t to an eps or v prediction, given

  * the low-resolution image, noise-augmented (`diffusion.noise_augment`) and bicubically upsampled to the
    output size (`resize.upsample`), concatenated to x_t as a second input channel: the network only has
    to add what the low-resolution image cannot hold;
  * the caption, as in the base UNet: the pooled vector in the FiLM conditioning, and cross-attention to
    the token states, here at the low-resolution levels only (Imagen's super-resolution models attend to
    text where the feature map is small; the layout of the image is already fixed by the condition);
  * the noise level of x_t and, with an MLP of its own, the log-SNR of the augmentation; their embeddings
    are added, so every residual block's FiLM knows how far to trust the condition.

Efficient U-Net (Imagen, appendix B.1), kept where it pays on a CPU:

  * every level *starts* by halving the side (`Downsample`) and only then runs its residual blocks; on the
    way up, a level's blocks run before `Upsample`. The blocks work at half the resolution they would
    in the base UNet: 4x fewer pixels for the same widths. Only the input convolution and one residual
    block (reading the input convolution's features through a skip) run at the output resolution;
  * more residual blocks at the low-resolution levels than at the high ones (`num_res_blocks` per level);
  * skip connections scaled by 2^-1/2, as in the base UNet (`unet.SKIP_SCALE`);
  * no self-attention at all: convolutions, FiLM and cross-attention are the same function at every
    position, so the network trains on random crops of the high-resolution images and runs on the full
    image (Imagen trains its 256 -> 1024 model on 256 px crops in the same way; tests/test_sr.py checks the
    equivariance). The one non-local operation left is GroupNorm, whose statistics come from the field of
    view: the whole image's differ a little from a crop's, a small train/test gap that crops of a quarter
    of the image keep small.

The blocks (ResBlock with fused GroupNorm+FiLM+SiLU, cross-attention, up/downsampling) are the base UNet's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimedi.diffusion import LOG_SNR_MAX, LOG_SNR_MIN
from minimedi.errors import UserError
from minimedi.unet import (SKIP_SCALE, Block, Downsample, GroupNormSiLU, ResBlock, Upsample, caption_dropout,
                           sinusoidal_embedding, text_conditioning, zero_init)


def level_sides(cfg, size):
    """The feature-map side of each level for an output of side `size`: each level halves first."""
    return [size >> (level + 1) for level in range(len(cfg.dim_mults))]


def check_sr_config(cfg, low_size=None):
    """Refuse, in one line naming the flag, an `SRConfig` the network cannot be built or trained with, or
    (given `low_size`) one that cannot enlarge a base model of that side."""
    levels = len(cfg.dim_mults)
    if low_size is not None and (cfg.size <= low_size or cfg.size % low_size):
        raise UserError(f"--sr-size {cfg.size} must be a multiple of the base model's --image-size {low_size}, "
                        f"larger than it (e.g. {4 * low_size})")
    if len(cfg.num_res_blocks) != levels:
        raise UserError(f"--sr-res-blocks gives {len(cfg.num_res_blocks)} levels but --sr-dim-mults {levels}")
    for flag, side in (("--sr-size", cfg.size), ("--sr-crop", cfg.crop or cfg.size)):
        if side % 2 ** levels:
            raise UserError(f"{flag} {side} cannot be halved {levels} times (--sr-dim-mults has {levels} levels)")
    if cfg.crop > cfg.size:
        raise UserError(f"--sr-crop {cfg.crop} is larger than the image (--sr-size {cfg.size})")
    sides = level_sides(cfg, cfg.size)
    for side in cfg.attn_resolutions:
        if side not in sides:
            raise UserError(f"--sr-attn-resolutions {side}: the levels of a {cfg.size} px output have sides "
                            f"{', '.join(map(str, sides))}")
    for width in (cfg.dim, *(cfg.dim * m for m in cfg.dim_mults)):
        if width % cfg.groups:
            raise UserError(f"super-resolution UNet width {width} is not divisible by --sr-groups {cfg.groups}")
    for side, mult in zip(sides, cfg.dim_mults):
        attends = side in cfg.attn_resolutions or side == sides[-1]  # the middle cross-attends
        if attends and cfg.dim * mult % cfg.head_dim:
            raise UserError(f"super-resolution UNet width {cfg.dim * mult} is not divisible by --sr-head-dim "
                            f"{cfg.head_dim}")


def embedding_mlp(in_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class SRUNet(nn.Module):
    """sr_unet(x, log_snr, text_tokens, text_mask, text_pooled, drop_text=None, *, low_res, aug_log_snr) -> pred.

    x [B, C, H, W] the noisy high-resolution image (H, W multiples of 2^levels: the whole image or a crop);
    low_res [B, C, H, W] the noise-augmented, upsampled low-resolution image at the same positions;
    log_snr, aug_log_snr [B] the noise levels of x and of low_res (+inf: no augmentation); the text
    arguments and `drop_text` as in `unet.UNet`. Cross-attention sits at the levels whose side at the
    output size `cfg.size` is in `cfg.attn_resolutions`, and in the middle.
    """

    def __init__(self, cfg, text_dim, pooled_dim, image_channels=1):
        super().__init__()
        check_sr_config(cfg)
        self.cfg = cfg
        widths = [cfg.dim * m for m in cfg.dim_mults]
        cond_dim = 4 * widths[0]
        self.frequencies = 2 * (widths[0] // 2)  # sinusoidal features of each noise level
        self.time_mlp = embedding_mlp(self.frequencies, cond_dim)
        self.aug_mlp = embedding_mlp(self.frequencies, cond_dim)
        self.pooled_mlp = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, cond_dim))
        self.null_pooled = nn.Parameter(torch.randn(pooled_dim))
        self.null_token = nn.Parameter(torch.randn(text_dim))

        def block(dim_in, dim_out, cross_attend):
            return Block(dim_in, dim_out, cond_dim, text_dim, cfg, False, cross_attend)

        sides = level_sides(cfg, cfg.size)
        self.init_conv = nn.Conv2d(2 * image_channels, cfg.dim, 3, padding=1)
        self.downsample, self.down = nn.ModuleList(), nn.ModuleList()
        ch, skip_channels = cfg.dim, []
        for side, width, count in zip(sides, widths, cfg.num_res_blocks):
            self.downsample.append(Downsample(ch))
            blocks = nn.ModuleList()
            for _ in range(count):
                blocks.append(block(ch, width, side in cfg.attn_resolutions))
                ch = width
                skip_channels.append(ch)
            self.down.append(blocks)

        self.mid = nn.ModuleList([block(ch, ch, True), block(ch, ch, False)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks[level]):
                blocks.append(block(ch + skip_channels.pop(), widths[level], sides[level] in cfg.attn_resolutions))
                ch = widths[level]
            self.up.append(blocks)
            out = widths[level - 1] if level > 0 else cfg.dim
            self.upsample.append(Upsample(ch, out))
            ch = out

        # The one residual block at the output resolution reads the input convolution's features: x_t and
        # the condition, unblurred by any downsampling. The output convolution reads the condition itself
        # beside the normalised features (as imagen-pytorch's SR U-Net does): GroupNorm takes out each
        # image's own intensity scale, and at high noise v = -x0 is mostly -condition, a linear path.
        self.out_block = ResBlock(ch + cfg.dim, cfg.dim, cond_dim, cfg.groups)
        self.out_norm = GroupNormSiLU(cfg.groups, cfg.dim)
        self.out_conv = zero_init(nn.Conv2d(cfg.dim + image_channels, image_channels, 3, padding=1))

    def conditioning(self, log_snr, aug_log_snr, text_tokens, text_mask, text_pooled, drop_text):
        """FiLM conditioning [B, 4 * width of the first level], and the context (+ null token) with its key mask.

        +inf (no augmentation) embeds as the largest log-SNR of the schedules, its limit from below."""
        pooled, context, mask = text_conditioning(text_tokens, text_mask, text_pooled, drop_text,
                                                  self.null_token, self.null_pooled)
        aug = aug_log_snr.clamp(LOG_SNR_MIN, LOG_SNR_MAX)
        cond = (self.time_mlp(sinusoidal_embedding(log_snr, self.frequencies))
                + self.aug_mlp(sinusoidal_embedding(aug, self.frequencies)) + self.pooled_mlp(pooled))
        return F.silu(cond), context, mask

    def forward(self, x, log_snr, text_tokens, text_mask, text_pooled, drop_text=None, *, low_res, aug_log_snr):
        if drop_text is None:
            drop_text = caption_dropout(x.shape[0], self.cfg.cond_drop, self.training, x.device)
        cond, context, mask = self.conditioning(log_snr, aug_log_snr, text_tokens, text_mask, text_pooled,
                                                drop_text)
        # Channels-last activations, as in the base UNet (no layout reorders around the convolutions).
        h = self.init_conv(torch.cat([x, low_res.to(x.dtype)], dim=1).to(memory_format=torch.channels_last))
        full, skips = h, []
        for downsample, blocks in zip(self.downsample, self.down):
            h = downsample(h)
            for block in blocks:
                h = block(h, cond, context, mask)
                skips.append(h)
        for block in self.mid:
            h = block(h, cond, context, mask)
        for blocks, upsample in zip(self.up, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, skips.pop() * SKIP_SCALE], dim=1), cond, context, mask)
            h = upsample(h)
        h = self.out_block(torch.cat([h, full * SKIP_SCALE], dim=1), cond)
        return self.out_conv(torch.cat([self.out_norm(h), low_res.to(h.dtype)], dim=1)).contiguous()
