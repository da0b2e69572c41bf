"""Flash attention (minimedi/kernels/flash_attention.py) vs torch's scaled_dot_product_attention at the model's shapes.

    python benchmarks/bench_attention.py [--dtype fp16 bf16] [--mode fwd fwd+bwd] [--shapes default paper clip]

For each shape, dtype and mode it prints the median time of both (`triton.testing.do_bench`), the
throughput in TFLOP/s and the ratio SDPA time / our time (> 1: ours is faster). The peer is SDPA used at its
best: `is_causal=True` for causal attention (its flash backend), a broadcast boolean mask for key padding.
FLOPs are counted the usual FlashAttention way: 4 B H Lq Lk D for the forward (half of it when causal), and
2.5 times that for the backward, whatever each implementation actually recomputes.
Needs a CUDA GPU; on a machine without one it says so and exits 0.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    lq: int
    lk: int
    head_dim: int
    causal: bool = False
    key_padding: bool = False


# UNet widths per resolution: `default` (32x32 images) dim 64, mults (1, 2, 2), head_dim 32, batch 64;
# `paper` (64x64) dim 128, mults (1, 2, 3, 4), head_dim 64, batch 256. Cross-attention sees 77 CLIP tokens
# plus the learned null token. CLIP text: 77 causal tokens, heads = width // 64.
SHAPES = {
    "default": [
        Shape("unet self 16x16  w128", 64, 4, 256, 256, 32),
        Shape("unet self 8x8    w128", 64, 4, 64, 64, 32),
        Shape("unet cross 16x16 w128", 64, 4, 256, 78, 32, key_padding=True),
    ],
    "paper": [
        Shape("unet self 32x32  w256", 256, 4, 1024, 1024, 64),
        Shape("unet self 16x16  w384", 256, 6, 256, 256, 64),
        Shape("unet self 8x8    w512", 256, 8, 64, 64, 64),
        Shape("unet cross 16x16 w384", 256, 6, 256, 78, 64, key_padding=True),
    ],
    "clip": [
        Shape("clip text w256 b128", 128, 4, 77, 77, 64, causal=True),
        Shape("clip text w512 b512", 512, 8, 77, 77, 64, causal=True),
    ],
}


def make_inputs(shape, dtype, requires_grad):
    """q, k, v and, for cross-attention, a key-padding mask with a different caption length per sample."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape.batch, shape.heads, n, shape.head_dim, device="cuda", dtype=dtype, generator=g)
               .requires_grad_(requires_grad) for n in (shape.lq, shape.lk, shape.lk))
    key_mask = None
    if shape.key_padding:
        lengths = torch.randint(2, shape.lk + 1, (shape.batch, 1), device="cuda", generator=g)
        key_mask = torch.arange(shape.lk, device="cuda") < lengths
    return q, k, v, key_mask


def sdpa(q, k, v, key_mask, causal):
    if causal and key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flops(shape, mode):
    fwd = 4 * shape.batch * shape.heads * shape.lq * shape.lk * shape.head_dim * (0.5 if shape.causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def time_ms(attention, shape, dtype, mode):
    """Median milliseconds of one forward (or forward + backward) of `attention` at `shape`."""
    import triton.testing

    q, k, v, key_mask = make_inputs(shape, dtype, requires_grad=mode != "fwd")
    if mode == "fwd":
        def step():
            with torch.no_grad():
                attention(q, k, v, key_mask, shape.causal)
    else:
        do = torch.randn_like(q)

        def step():
            torch.autograd.grad(attention(q, k, v, key_mask, shape.causal), (q, k, v), do)
    step()  # compile and autotune outside the timed region
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def bench_shape(shape, dtype, mode):
    """One row: times, throughputs and the speed ratio of ours against SDPA."""
    from minimedi.kernels.flash_attention import attention as flash_attention  # needs Triton, so only once there is a GPU

    ms_ours, ms_sdpa = time_ms(flash_attention, shape, dtype, mode), time_ms(sdpa, shape, dtype, mode)
    return dict(shape=shape.name, dtype=str(dtype).removeprefix("torch."), mode=mode, ms_ours=ms_ours,
                ms_sdpa=ms_sdpa, tflops_ours=flops(shape, mode) / ms_ours * 1e-9,
                tflops_sdpa=flops(shape, mode) / ms_sdpa * 1e-9, speedup=ms_sdpa / ms_ours)


def print_rows(rows):
    print(f"{'shape':24s} {'dtype':9s} {'mode':8s} {'ours ms':>8s} {'sdpa ms':>8s} {'ours TF/s':>9s} "
          f"{'sdpa TF/s':>9s} {'sdpa/ours':>9s}")
    for r in rows:
        print(f"{r['shape']:24s} {r['dtype']:9s} {r['mode']:8s} {r['ms_ours']:8.3f} {r['ms_sdpa']:8.3f} "
              f"{r['tflops_ours']:9.1f} {r['tflops_sdpa']:9.1f} {r['speedup']:9.2f}")


def run(dtypes=tuple(DTYPES), modes=MODES, presets=tuple(SHAPES)):
    """Benchmark every (preset shape, dtype, mode); returns the rows (also what `print_rows` shows)."""
    return [bench_shape(shape, DTYPES[d], mode) for preset in presets for shape in SHAPES[preset]
            for d in dtypes for mode in modes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args, _ = parser.parse_known_args(argv)  # bench_kernels.py passes one argv to every benchmark
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU; none found, nothing measured.")
        return 0
    print(f"attention on {torch.cuda.get_device_name()}: ours (Triton FlashAttention-2) vs "
          f"F.scaled_dot_product_attention, median of triton.testing.do_bench")
    print_rows(run(args.dtype, args.mode, args.shapes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
