"""minimedi's UNet against imagen-pytorch's `Unet` and diffusers' `UNet2DConditionModel` on the CPU.

    python benchmarks/bench_unet.py [--threads 2] [--repeats 7] [--train-batch 64] [--compile]
    python benchmarks/bench_unet.py --sr [--threads 2] [--repeats 7] [--sr-train-batch 16]

Run it with the benchmark venv, made once from the repository root (the peers need packages the
library does not):

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 torchvision==0.28.0
    .venv-bench/bin/pip install -e . imagen-pytorch diffusers
    .venv-bench/bin/pip uninstall -y torchvision
    .venv-bench/bin/python benchmarks/bench_unet.py

(PyPI's torchvision wheels are CUDA builds whose compiled ops cannot load against the CPU torch, and
imagen-pytorch imports `torchvision.transforms` only to turn samples into PIL images; see `import_peers`.)

Two workloads, at the `default` preset (32x32, dim 32, dim_mults (1, 2, 4), one res block per level,
attention at 8x8, head_dim 32, 8 groups, text width 128 = the default small CLIP):
  * one denoising step: batch 16 with classifier-free guidance, i.e. one UNet call on batch 32, with
    77 x 128 text context, under `torch.inference_mode`;
  * one training step: forward + backward + AdamW on batch --train-batch.

The same two for the super-resolution stage (`--sr`), our `SRUNet` at the `default` preset (32 -> 128:
each level halving first, cross-attention at 16 px and in the middle, no self-attention) against
imagen-pytorch's `Unet(lowres_cond=True, memory_efficient=True)` at the same widths, levels, block counts
(its `num_resnet_blocks` counts blocks beyond each level's first), attention placement, 3x3 input
convolution and final residual block: a denoising step on 16 images at 128 px (guidance 1, the SR
default: one UNet call on batch 16) and a training step on --sr-train-batch crops of 64 px.

The peers are configured to the same widths, depth, attention resolution and text context, and then
to matched FLOPs (+-10%) where their design adds work: diffusers' up path has two resnets per level and
its transformer blocks a GEGLU feed-forward, so at our widths it costs ~1.8x our FLOPs; its
FLOP-matched row uses widths (24, 48, 96). FLOPs are counted by `torch.utils.flop_counter`
(matmuls, convolutions, attention). A large fp32 matmul is timed in the same rounds to give this
machine's peak. Every model is timed round-robin (A, B, C, A, B, C, ...) after a warm-up round and
the medians are reported, so background load hits all of them alike. Ratios > 1: ours is faster.
"""
import argparse
import importlib.machinery
import os
import statistics
import sys
import time
import types
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimedi.config import make_config  # noqa: E402
from minimedi.sr_unet import SRUNet, level_sides  # noqa: E402
from minimedi.unet import UNet  # noqa: E402

SIZE, CONTEXT, TEXT_WIDTH, POOLED_WIDTH, STEP_BATCH = 32, 77, 128, 128, 32
SR_SIZE, SR_CROP, SR_STEP_BATCH = 128, 64, 16
PEAK_N = 2048  # the matmul that measures this machine's peak: 2 N^3 FLOPs


def import_peers():
    """(imagen_pytorch.Unet, diffusers.UNet2DConditionModel), importable offline on a CPU-only torch.

    imagen-pytorch imports torchvision.transforms at module level (only `Imagen.sample` uses it, for PIL
    output), so an empty stand-in module takes its place; and its `Unet` signature's default text
    width reads the T5 config from the Hugging Face Hub at import, so that one lookup is answered
    locally with t5-v1_1-base's width (we always pass text_embed_dim).
    """
    import transformers  # first, so it records torchvision as absent before the stand-in exists
    from diffusers import UNet2DConditionModel

    for name in ("torchvision", "torchvision.transforms"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__, module.__path__ = importlib.machinery.ModuleSpec(name, None), []
            sys.modules[name] = module
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    from_pretrained = transformers.T5Config.from_pretrained
    transformers.T5Config.from_pretrained = classmethod(lambda cls, name, **kw: cls(d_model=768))
    try:
        from imagen_pytorch import Unet as ImagenUnet
    finally:
        transformers.T5Config.from_pretrained = from_pretrained
    return ImagenUnet, UNet2DConditionModel


def inputs(batch):
    """x, a noise level, and text (tokens, key mask with captions of 8 to 76 tokens, pooled) for `batch` images."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(batch, CONTEXT, TEXT_WIDTH, generator=g)
    mask = torch.arange(CONTEXT)[None, :] < torch.randint(8, CONTEXT, (batch, 1), generator=g)
    return (torch.randn(batch, 1, SIZE, SIZE, generator=g), torch.randn(batch, generator=g), tokens, mask,
            torch.randn(batch, POOLED_WIDTH, generator=g))


def ours(compile_unet=False):
    """Our UNet and its call(x, t) on `batch` captions, half of them dropped (the guidance batch)."""
    unet = UNet(make_config("default").unet, TEXT_WIDTH, POOLED_WIDTH, image_channels=1, image_size=SIZE)
    if compile_unet:
        unet.compile()

    def call(x, t, tokens, mask, pooled):
        drop = torch.arange(x.shape[0]) >= x.shape[0] // 2
        return unet(x, t, tokens, mask, pooled, drop_text=drop)
    return unet, call


def imagen(ImagenUnet):
    """imagen-pytorch: its `num_resnet_blocks` counts resnets beyond each level's first, so 0 = our depth."""
    unet = ImagenUnet(dim=32, dim_mults=(1, 2, 4), channels=1, text_embed_dim=TEXT_WIDTH, cond_dim=TEXT_WIDTH,
                      num_resnet_blocks=0, attn_heads=4, attn_dim_head=32, layer_attns=(False, False, True),
                      layer_cross_attns=(False, False, True), max_text_len=CONTEXT)

    def call(x, t, tokens, mask, pooled):
        return unet(x, t.sigmoid(), text_embeds=tokens, text_mask=mask)
    return unet, call


def diffusers_unet(UNet2DConditionModel, widths):
    """diffusers: cross-attention (transformer) blocks at the 8x8 level and the middle, as ours."""
    unet = UNet2DConditionModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=widths, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=widths[-1] // 32, norm_num_groups=8)  # diffusers' `attention_head_dim` is the head count

    def call(x, t, tokens, mask, pooled):
        return unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask.float()).sample
    return unet, call


def sr_inputs(batch, size):
    """x, a noise level, the upsampled low-resolution image and its augmentation level, and text."""
    g = torch.Generator().manual_seed(2)
    x, t, tokens, mask, pooled = inputs(batch)
    return (torch.randn(batch, 1, size, size, generator=g), t, torch.randn(batch, 1, size, size, generator=g),
            torch.rand(batch, generator=g), tokens, mask, pooled)


def ours_sr():
    """Our SR UNet at the default preset; its call never drops a caption (SR guidance 1 by default)."""
    unet = SRUNet(make_config("default").sr, TEXT_WIDTH, POOLED_WIDTH)

    def call(x, t, low_res, aug, tokens, mask, pooled):
        return unet(x, t, tokens, mask, pooled, drop_text=torch.zeros(x.shape[0], dtype=torch.bool),
                    low_res=low_res, aug_log_snr=aug)
    return unet, call


def imagen_sr(ImagenUnet):
    """imagen-pytorch's SR U-Net at our default's widths and levels: `memory_efficient` downsamples before each
    level's blocks; its `num_resnet_blocks` counts the blocks after each level's first."""
    c = make_config("default").sr
    heads = c.dim * c.dim_mults[-1] // c.head_dim  # our heads at the lowest level
    unet = ImagenUnet(dim=c.dim, dim_mults=c.dim_mults, channels=1, text_embed_dim=TEXT_WIDTH, cond_dim=TEXT_WIDTH,
                      num_resnet_blocks=tuple(n - 1 for n in c.num_res_blocks), attn_heads=heads,
                      attn_dim_head=c.head_dim, layer_attns=False,
                      layer_cross_attns=tuple(side in c.attn_resolutions for side in level_sides(c, c.size)),
                      attend_at_middle=False, lowres_cond=True, memory_efficient=True, init_cross_embed=False,
                      init_conv_kernel_size=3, max_text_len=CONTEXT)

    def call(x, t, low_res, aug, tokens, mask, pooled):
        return unet(x, t.sigmoid(), lowres_cond_img=low_res, lowres_noise_times=aug, text_embeds=tokens,
                    text_mask=mask)
    return unet, call


def denoise_step(call, batch=STEP_BATCH, make_inputs=inputs):
    args = make_inputs(batch)

    def step():
        with torch.inference_mode():
            call(*args)
    return step


def train_step(unet, call, batch, make_inputs=inputs, size=SIZE):
    args, target = make_inputs(batch), torch.randn(batch, 1, size, size)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def step():
        loss = (call(*args) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def peak_matmul():
    a, b = torch.randn(PEAK_N, PEAK_N), torch.randn(PEAK_N, PEAK_N)
    return lambda: a @ b


def gflops(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def count_flops(steps):
    """GFLOPs of each step; the compiled UNet does the eager one's work (and is not traced under the counter)."""
    flops = {name: gflops(fn) for name, fn in steps.items() if name != "ours (compiled)"}
    if "ours (compiled)" in steps:
        flops["ours (compiled)"] = flops["ours"]
    return flops


def round_robin(fns, repeats):
    """Median seconds per call of each fn, timed A, B, C, A, B, C, ... after one untimed warm-up round."""
    times = {name: [] for name in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title, rows, seconds, flops, params, peak):
    print(f"\n{title}  (peak: {peak:.1f} GFLOP/s, fp32 {PEAK_N}x{PEAK_N} matmul in the same rounds)")
    print(f"| model | params (M) | GFLOP/call | FLOPs vs ours | ms/call | GFLOP/s | % of peak | ours' speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name in rows:
        rate = flops[name] / seconds[name]
        print(f"| {name} | {params[name]:.2f} | {flops[name]:.2f} | {flops[name] / flops['ours']:.2f}x | "
              f"{seconds[name] * 1e3:.0f} | {rate:.1f} | {100 * rate / peak:.0f}% | "
              f"{seconds[name] / seconds['ours']:.2f}x |")
    if "ours (compiled)" in rows:
        print(f"torch.compile speed-up of ours: {seconds['ours'] / seconds['ours (compiled)']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads [2]")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up round [7]")
    parser.add_argument("--train-batch", type=int, default=64, help="training-step batch (the default preset's) [64]")
    parser.add_argument("--compile", action="store_true", help="also time our UNet under torch.compile")
    parser.add_argument("--sr", action="store_true", help="the super-resolution U-Nets instead of the base ones")
    parser.add_argument("--sr-train-batch", type=int, default=16, help="SR training-step batch of 64 px crops [16]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    ImagenUnet, UNet2DConditionModel = import_peers()
    if args.sr:
        return bench_sr(ImagenUnet, args)

    torch.manual_seed(0)
    builders = {"ours": ours, "imagen-pytorch": lambda: imagen(ImagenUnet),
                "diffusers (same widths)": lambda: diffusers_unet(UNet2DConditionModel, (32, 64, 128)),
                "diffusers (matched FLOPs)": lambda: diffusers_unet(UNet2DConditionModel, (24, 48, 96))}
    if args.compile:
        builders["ours (compiled)"] = lambda: ours(compile_unet=True)
    models = {name: build() for name, build in builders.items()}
    params = {name: sum(p.numel() for p in unet.parameters()) / 1e6 for name, (unet, _) in models.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; step batch {STEP_BATCH}, "
          f"train batch {args.train_batch}, text context {CONTEXT} x {TEXT_WIDTH}")

    for unet, _ in models.values():
        unet.eval()
    steps = {name: denoise_step(call) for name, (_, call) in models.items()}
    flops = count_flops(steps)
    seconds = round_robin({**steps, "peak": peak_matmul()}, args.repeats)
    peak = 2 * PEAK_N ** 3 / 1e9 / seconds.pop("peak")
    table("Denoising step (UNet batch 32, inference_mode)", list(models), seconds, flops, params, peak)

    for unet, _ in models.values():
        unet.train()
    steps = {name: train_step(unet, call, args.train_batch) for name, (unet, call) in models.items()}
    flops = count_flops(steps)
    seconds = round_robin({**steps, "peak": peak_matmul()}, args.repeats)
    peak = 2 * PEAK_N ** 3 / 1e9 / seconds.pop("peak")
    table(f"Training step (batch {args.train_batch}, forward + backward + AdamW)", list(models), seconds, flops,
          params, peak)


def bench_sr(ImagenUnet, args):
    """The two workloads of the super-resolution stage, ours against imagen-pytorch's SR U-Net."""
    torch.manual_seed(0)
    models = {"ours": ours_sr(), "imagen-pytorch": imagen_sr(ImagenUnet)}
    params = {name: sum(p.numel() for p in unet.parameters()) / 1e6 for name, (unet, _) in models.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; SR step batch {SR_STEP_BATCH} "
          f"at {SR_SIZE} px, train batch {args.sr_train_batch} crops of {SR_CROP} px")
    for unet, _ in models.values():
        unet.eval()
    steps = {name: denoise_step(call, SR_STEP_BATCH, lambda b: sr_inputs(b, SR_SIZE))
             for name, (_, call) in models.items()}
    flops = count_flops(steps)
    seconds = round_robin({**steps, "peak": peak_matmul()}, args.repeats)
    peak = 2 * PEAK_N ** 3 / 1e9 / seconds.pop("peak")
    table(f"SR denoising step ({SR_STEP_BATCH} images at {SR_SIZE} px, inference_mode)", list(models), seconds,
          flops, params, peak)
    for unet, _ in models.values():
        unet.train()
    steps = {name: train_step(unet, call, args.sr_train_batch, lambda b: sr_inputs(b, SR_CROP), SR_CROP)
             for name, (unet, call) in models.items()}
    flops = count_flops(steps)
    seconds = round_robin({**steps, "peak": peak_matmul()}, args.repeats)
    peak = 2 * PEAK_N ** 3 / 1e9 / seconds.pop("peak")
    table(f"SR training step (batch {args.sr_train_batch} crops of {SR_CROP} px, forward + backward + AdamW)",
          list(models), seconds, flops, params, peak)


if __name__ == "__main__":
    main()
