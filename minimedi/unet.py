"""The Imagen base UNet: a text-conditional image denoiser (Saharia et al. 2022, "Imagen", appendix F).

The network maps a noisy image x_t, its noise level and a caption to a prediction (eps or v, see
`diffusion.py`) of the same shape as x_t. The caption arrives twice, as the frozen CLIP text encoder
gives it (`CLIP.text_hidden`):

  * the pooled vector [B, E] is added to the noise-level embedding, and that sum modulates every
    residual block through FiLM (a per-channel scale and shift, Perez et al. 2018);
  * the token states [B, L, W] are attended to by cross-attention at the attention resolutions, so
    "glioma in the *left frontal* lobe" can steer *where* things appear.

The noise level is the continuous log-SNR lambda = log(alpha^2 / sigma^2) (Kingma et al. 2021, VDM),
not a step index, so any sampler and any number of steps can drive the same network.

Classifier-free guidance (Ho & Salimans 2021) needs one network that is both conditional and
unconditional. A "dropped" caption is replaced by learned null embeddings: the pooled vector by
`null_pooled`, and every text token is masked away so that cross-attention sees only `null_token`.
That null token is appended to the context of *every* sample, so no query ever faces an all-masked
row (a softmax over nothing).

Layout (improved-diffusion / Imagen): per resolution level, `num_res_blocks` Blocks (ResBlock, then
self- and cross-attention at the attention resolutions), each output kept as a skip connection; then
a middle; then the mirror image going up, each Block reading the concatenation of its input and the
matching skip scaled by 2^-1/2 (Imagen's `scale_skip_connection`: keeps the variance of the sum of
two paths near that of one). The fused ops go through `kernels` (GroupNorm+FiLM+SiLU, attention).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimedi import kernels
from minimedi.errors import UserError

SKIP_SCALE = 2 ** -0.5


def token_mask(tokens):
    """Key-padding mask from CLIP token ids [B, L]: True up to and including the end token.

    CLIP's text transformer is causal, so states after the end token (id 49407, the largest id, found
    by argmax as CLIP itself pools) only echo the caption; they are padding, not words.
    """
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return positions[None, :] <= tokens.argmax(dim=-1, keepdim=True)


def sinusoidal_embedding(log_snr, dim):
    """Transformer-style sin/cos features of the log-SNR [B] -> [B, dim] (frequencies 1 ... 1/10000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=log_snr.device) / half)
    angles = log_snr.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def zero_init(module):
    """Zero a layer's weights and bias, so a residual branch (or the whole output) starts as nothing."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class GroupNormSiLU(nn.Module):
    """The affine parameters of a GroupNorm, applied by the fused `kernels.group_norm_silu` (+ FiLM)."""

    def __init__(self, groups, channels):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, scale=None, shift=None):
        return kernels.group_norm_silu(x, self.weight, self.bias, self.groups, scale, shift)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then GroupNorm -> FiLM(cond) -> SiLU -> conv, plus a (1x1) shortcut."""

    def __init__(self, dim_in, dim_out, cond_dim, groups):
        super().__init__()
        self.norm1 = GroupNormSiLU(groups, dim_in)
        self.conv1 = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * dim_out)  # -> (scale, shift) per channel
        self.norm2 = GroupNormSiLU(groups, dim_out)
        self.conv2 = zero_init(nn.Conv2d(dim_out, dim_out, 3, padding=1))
        self.shortcut = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, cond):
        h = self.conv1(self.norm1(x))
        scale, shift = self.film(cond).chunk(2, dim=-1)
        h = self.conv2(self.norm2(h, scale, shift))
        return self.shortcut(x) + h


def split_heads(t, heads):
    """[B, L, H*D] -> [B, H, L, D]."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(t):
    """[B, H, L, D] -> [B, L, H*D]."""
    return t.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map (fused QKV projection)."""

    def __init__(self, channels, head_dim, groups):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))
        out = self.out(merge_heads(kernels.attention(q, k, v)))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class CrossAttention(nn.Module):
    """Image positions (queries) attend to the text context (keys/values); `mask` hides padding."""

    def __init__(self, channels, context_dim, head_dim, groups):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x, context, mask):
        b, c, h, w = x.shape
        q = split_heads(self.q(self.norm(x).flatten(2).transpose(1, 2)), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        out = self.out(merge_heads(kernels.attention(q, k, v, key_mask=mask)))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Block(nn.Module):
    """One step of the UNet: a ResBlock, then (at attention resolutions) self- and cross-attention.

    The base UNet attends both ways or not at all; the super-resolution UNet (`sr_unet.py`) uses
    cross-attention alone, so that it stays a convolution that can be trained on crops.
    """

    def __init__(self, dim_in, dim_out, cond_dim, context_dim, cfg, self_attend, cross_attend):
        super().__init__()
        self.res = ResBlock(dim_in, dim_out, cond_dim, cfg.groups)
        self.self_attn = SelfAttention(dim_out, cfg.head_dim, cfg.groups) if self_attend else None
        self.cross_attn = CrossAttention(dim_out, context_dim, cfg.head_dim, cfg.groups) if cross_attend else None

    def forward(self, x, cond, context, mask):
        x = self.res(x, cond)
        if self.self_attn is not None:
            x = self.self_attn(x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context, mask)
        return x


class Downsample(nn.Module):
    """Halve the side with a strided 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the side: nearest-neighbour, then a 3x3 convolution (no checkerboard artefacts).

    The convolution already narrows to the next level's width: at the higher resolution every
    channel costs four times as much.
    """

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def caption_dropout(batch, cond_drop, training, device):
    """Which captions to replace by the null caption [B]: with probability `cond_drop` in training, none in eval."""
    if not training:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.rand(batch, device=device) < cond_drop


def text_conditioning(text_tokens, text_mask, text_pooled, drop_text, null_token, null_pooled):
    """(pooled [B, P], context [B, L + 1, W], key mask [B, L + 1]) with the dropped captions nulled.

    A dropped caption's pooled vector becomes `null_pooled` and all its tokens are masked away; `null_token`
    is appended to every context and never masked, so no query faces an all-masked row.
    """
    b = text_tokens.shape[0]
    keep = ~drop_text
    pooled = torch.where(keep[:, None], text_pooled, null_pooled.to(text_pooled.dtype))
    context = torch.cat([text_tokens, null_token.to(text_tokens.dtype).expand(b, 1, -1)], dim=1)
    mask = torch.cat([text_mask & keep[:, None], keep.new_ones(b, 1)], dim=1)
    return pooled, context, mask


def check_config(cfg, image_size):
    """Refuse shapes the UNet cannot be built with, naming the flag to change."""
    levels = len(cfg.dim_mults)
    if image_size % 2 ** (levels - 1):
        raise UserError(f"image size {image_size} cannot be halved {levels - 1} times "
                        f"(--dim-mults has {levels} levels)")
    for level, mult in enumerate(cfg.dim_mults):
        width = cfg.dim * mult
        if width % cfg.groups:
            raise UserError(f"UNet width {width} is not divisible by --groups {cfg.groups}")
        attends = (image_size >> level) in cfg.attn_resolutions or level == levels - 1  # the middle attends
        if attends and width % cfg.head_dim:
            raise UserError(f"UNet width {width} is not divisible by --head-dim {cfg.head_dim}")


class UNet(nn.Module):
    """unet(x, log_snr, text_tokens, text_mask, text_pooled, drop_text=None) -> prediction shaped like x.

    x [B, C, H, W]; log_snr [B]; text_tokens [B, L, text_dim] (CLIP states after ln_final);
    text_mask bool [B, L] (`token_mask`); text_pooled [B, pooled_dim]; drop_text bool [B] replaces
    those captions by the null embeddings (None: with probability cfg.cond_drop in training, never in eval).
    """

    def __init__(self, cfg, text_dim, pooled_dim, image_channels=1, image_size=32):
        super().__init__()
        check_config(cfg, image_size)
        self.cfg = cfg
        dim, cond_dim = cfg.dim, 4 * cfg.dim
        self.time_mlp = nn.Sequential(nn.Linear(dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.pooled_mlp = nn.Sequential(nn.LayerNorm(pooled_dim), nn.Linear(pooled_dim, cond_dim))
        self.null_pooled = nn.Parameter(torch.randn(pooled_dim))
        self.null_token = nn.Parameter(torch.randn(text_dim))

        def block(dim_in, dim_out, side):
            attend = side in cfg.attn_resolutions
            return Block(dim_in, dim_out, cond_dim, text_dim, cfg, attend, attend)

        self.init_conv = nn.Conv2d(image_channels, dim, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, skip_channels, last = dim, [], len(cfg.dim_mults) - 1
        for level, mult in enumerate(cfg.dim_mults):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(ch, dim * mult, image_size >> level))
                ch = dim * mult
                skip_channels.append(ch)
            self.down.append(blocks)
            self.downsample.append(Downsample(ch) if level < last else nn.Identity())

        # The middle always attends: the lowest resolution is the cheapest place for global context.
        self.mid = nn.ModuleList([Block(ch, ch, cond_dim, text_dim, cfg, True, True),
                                  Block(ch, ch, cond_dim, text_dim, cfg, False, False)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.dim_mults))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(ch + skip_channels.pop(), dim * mult, image_size >> level))
                ch = dim * mult
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Upsample(ch, dim * cfg.dim_mults[level - 1]))
                ch = dim * cfg.dim_mults[level - 1]
            else:
                self.upsample.append(nn.Identity())

        self.out_norm = GroupNormSiLU(cfg.groups, ch)
        self.out_conv = zero_init(nn.Conv2d(ch, image_channels, 3, padding=1))

    def conditioning(self, log_snr, text_tokens, text_mask, text_pooled, drop_text):
        """FiLM conditioning [B, 4*dim], and the context (+ null token) with its key mask."""
        pooled, context, mask = text_conditioning(text_tokens, text_mask, text_pooled, drop_text,
                                                  self.null_token, self.null_pooled)
        cond = F.silu(self.time_mlp(sinusoidal_embedding(log_snr, self.cfg.dim)) + self.pooled_mlp(pooled))
        return cond, context, mask

    def forward(self, x, log_snr, text_tokens, text_mask, text_pooled, drop_text=None):
        if drop_text is None:
            drop_text = caption_dropout(x.shape[0], self.cfg.cond_drop, self.training, x.device)
        cond, context, mask = self.conditioning(log_snr, text_tokens, text_mask, text_pooled, drop_text)

        # Channels-last (NHWC) activations: oneDNN's CPU convolutions and cuDNN's tensor-core kernels work
        # in this layout natively, so no convolution reorders its input and output, and the attention
        # tokens [B, HW, C] are a view of the feature map rather than a transposed copy.
        h = self.init_conv(x.to(memory_format=torch.channels_last))
        skips = []
        for blocks, downsample in zip(self.down, self.downsample):
            for block in blocks:
                h = block(h, cond, context, mask)
                skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block(h, cond, context, mask)
        for blocks, upsample in zip(self.up, self.upsample):
            for block in blocks:
                h = block(torch.cat([h, skips.pop() * SKIP_SCALE], dim=1), cond, context, mask)
            h = upsample(h)
        return self.out_conv(self.out_norm(h)).contiguous()
