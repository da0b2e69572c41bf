"""Fused GroupNorm -> FiLM -> SiLU (Triton) against PyTorch eager and torch.compile of the same ops.

    python benchmarks/bench_group_norm.py [--preset default|paper|all] [--peak-gbs 3350]

The op is memory-bound, so beside milliseconds it reports effective bandwidth over the minimal traffic
(forward: read x, write y; backward: read x and dy, write dx; the [C] and [N, C] parameters are noise)
and that as a fraction of the GPU's peak bandwidth, from a table by device name or --peak-gbs.
Shapes are GroupNorm inputs of the `default` and `paper` UNets (minimedi/config.py): the widest,
highest-resolution level and the deepest level of each, with the presets' batch sizes and groups.
`benchmarks/bench_kernels.py` calls `main`; `bench_case`, `print_header` and `print_rows` serve
other drivers.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimedi.kernels import reference  # noqa: E402

# label: (N, C, H, W), groups
SHAPES = {
    "default": {
        "default 32x32 (level 1)": ((64, 64, 32, 32), 8),
        "default 8x8 (level 3)": ((64, 128, 8, 8), 8),
    },
    "paper": {
        "paper 64x64 (level 1)": ((256, 128, 64, 64), 32),
        "paper 8x8 (level 4)": ((256, 512, 8, 8), 32),
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Peak DRAM bandwidth in GB/s by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_GBS = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600),
    ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("T4", 320),
]


def peak_bandwidth_gbs(device_name):
    """The table's peak bandwidth for this GPU, or None when it is not listed."""
    for key, gbs in PEAK_GBS:
        if key in device_name:
            return gbs
    return None


def make_inputs(shape, dtype, requires_grad, device="cuda"):
    """x, weight, bias, scale, shift as the UNet's second GroupNorm of a residual block sees them."""
    n, c = shape[:2]
    tensors = [torch.randn(shape), 1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c),
               0.1 * torch.randn(n, c), 0.1 * torch.randn(n, c)]
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in tensors]


def implementations():
    """name -> function with the signature of kernels.reference.group_norm_silu."""
    from minimedi.kernels.group_norm import group_norm_silu
    torch._dynamo.reset()  # a fresh compile per case: the recompile limit would silently fall back to eager
    return {
        "eager": reference.group_norm_silu,
        "torch.compile": torch.compile(reference.group_norm_silu, dynamic=False),
        "triton": group_norm_silu,
    }


def time_ms(fn, inputs, groups, backward):
    """Median milliseconds of a forward (or forward + backward into every input) call."""
    from triton.testing import do_bench
    x, weight, bias, scale, shift = inputs
    if not backward:
        return do_bench(lambda: fn(x, weight, bias, groups, scale, shift), return_mode="median")
    dy = torch.randn_like(x)
    return do_bench(lambda: torch.autograd.grad(fn(x, weight, bias, groups, scale, shift), inputs, dy),
                    return_mode="median")


def forward_error(shape, groups, dtype_name, device="cuda"):
    """max |triton - eager| of the forward output: a sanity check that the timed kernel is the right one."""
    from minimedi.kernels.group_norm import group_norm_silu
    x, weight, bias, scale, shift = make_inputs(shape, DTYPES[dtype_name], requires_grad=False, device=device)
    fused = group_norm_silu(x, weight, bias, groups, scale, shift).float()
    return (fused - reference.group_norm_silu(x, weight, bias, groups, scale, shift).float()).abs().max().item()


def bench_case(label, shape, groups, dtype_name, peak_gbs, device="cuda"):
    """Rows (dicts) of ms, GB/s, fraction of peak and triton's speed-up, per pass and implementation."""
    impls = implementations()
    rows = []
    for pass_name, backward, traffic in (("fwd", False, 2), ("fwd+bwd", True, 5)):
        inputs = make_inputs(shape, DTYPES[dtype_name], requires_grad=backward, device=device)
        x_bytes = inputs[0].numel() * inputs[0].element_size()
        ms = {name: time_ms(fn, inputs, groups, backward) for name, fn in impls.items()}
        for name, t in ms.items():
            gbs = traffic * x_bytes / t / 1e6
            rows.append({"shape": label, "NCHW": "x".join(map(str, shape)), "dtype": dtype_name,
                         "pass": pass_name, "impl": name, "ms": t, "GB/s": gbs,
                         "peak": gbs / peak_gbs if peak_gbs else None, "triton speed-up": t / ms["triton"]})
    return rows


def print_header():
    print(f"{'shape':<24}{'N x C x H x W':<17}{'dtype':<6}{'pass':<9}{'impl':<15}"
          f"{'ms':>9}{'GB/s':>9}{'% peak':>8}{'triton x':>10}")


def print_rows(rows):
    for r in rows:
        peak = f"{100 * r['peak']:.0f}%" if r["peak"] is not None else "-"
        print(f"{r['shape']:<24}{r['NCHW']:<17}{r['dtype']:<6}{r['pass']:<9}{r['impl']:<15}"
              f"{r['ms']:>9.3f}{r['GB/s']:>9.0f}{peak:>8}{r['triton speed-up']:>10.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("default", "paper", "all"), default="all")
    parser.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth, overrides the table")
    args, _ = parser.parse_known_args(argv)  # bench_kernels.py passes one argv to every benchmark
    if not torch.cuda.is_available():
        print("bench_group_norm: needs a CUDA GPU; none found, nothing measured.")
        return
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    peak_gbs = args.peak_gbs or peak_bandwidth_gbs(name)
    print(f"GroupNorm -> FiLM -> SiLU on {name}, peak bandwidth "
          f"{f'{peak_gbs:.0f} GB/s' if peak_gbs else 'unknown (pass --peak-gbs)'}; "
          "'triton x' = that row's time / triton's time")
    print_header()
    presets = ("default", "paper") if args.preset == "all" else (args.preset,)
    for preset in presets:
        for label, (shape, groups) in SHAPES[preset].items():
            for dtype_name in DTYPES:
                print_rows(bench_case(label, shape, groups, dtype_name, peak_gbs))
                print(f"  max |triton - eager| of the forward output: "
                      f"{forward_error(shape, groups, dtype_name):.2e}")


if __name__ == "__main__":
    main()
