"""The fused Triton GroupNorm -> FiLM -> SiLU kernel against `minimedi/kernels/reference.py`, forward and backward.

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1, so these run the real kernels in Triton's
interpreter (slow: shapes stay tiny). The reference runs in float64 on the same (already rounded)
inputs, so the comparison measures only the kernel's own error; tolerances follow Liger-Kernel's per-dtype
choices and cover one rounding of the output to the input dtype.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from minimedi import kernels
from minimedi.kernels import reference
from minimedi.kernels.group_norm import GroupNormSiLU, group_norm_silu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2},
}
NAMES = ("x", "weight", "bias", "scale", "shift")


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    monkeypatch.setenv("MINIMEDI_KERNELS", "triton")


def make_inputs(shape, dtype, film=("scale", "shift"), mean=0.0, std=1.0, seed=0):
    """x, weight, bias, scale, shift (scale/shift None unless named in `film`), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    tensors = {
        "x": mean + std * torch.randn(shape, generator=gen, dtype=torch.float64),
        "weight": 1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64),
        "bias": 0.5 * torch.randn(c, generator=gen, dtype=torch.float64),
        "scale": 0.5 * torch.randn(n, c, generator=gen, dtype=torch.float64),
        "shift": 0.5 * torch.randn(n, c, generator=gen, dtype=torch.float64),
    }
    return [tensors[k].to(DEVICE, dtype).requires_grad_() if k in ("x", "weight", "bias") or k in film else None
            for k in NAMES]


def check_against_reference(fn, inputs, groups, channels_last=False, seed=1):
    """Run fn forward and backward and compare output and every gradient with the float64 reference."""
    x = inputs[0]
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        inputs = [x] + inputs[1:]
    leaves = [t for t in inputs if t is not None]
    y = fn(x, inputs[1], inputs[2], groups, inputs[3], inputs[4])
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, x.dtype)
    grads = torch.autograd.grad(y, leaves, dy)

    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref_leaves = [t for t in ref_inputs if t is not None]
    y_ref = reference.group_norm_silu(ref_inputs[0], ref_inputs[1], ref_inputs[2], groups, *ref_inputs[3:])
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy.double())

    tol = TOL[x.dtype]
    torch.testing.assert_close(y.double(), y_ref, **tol, msg=lambda m: f"output: {m}")
    names = [name for name, t in zip(NAMES, inputs) if t is not None]
    for name, leaf, g, g_ref in zip(names, leaves, grads, grads_ref):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        torch.testing.assert_close(g.double(), g_ref, **tol, msg=lambda m, name=name: f"d{name}: {m}")


# (N, C, H, W), groups. Tiles are BLOCK_C = next_pow2(C/G) by BLOCK_HW = min(next_pow2(H*W), 4096/BLOCK_C).
SHAPES = {
    "one_group": ((2, 4, 3, 5), 1),
    "channels_equal_groups": ((2, 6, 4, 4), 6),
    "odd_hw_batch_1": ((1, 8, 5, 7), 4),  # 35 pixels: a single, partly masked tile
    "group_over_block": ((1, 16, 17, 17), 1),  # 16 x 256 tiles over 289 pixels: a second, ragged tile
    "hw_over_block": ((2, 8, 50, 50), 4),  # 2 x 2048 tiles over 2500 pixels
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES)
def test_shapes_through_dispatcher(case, dtype):
    shape, groups = SHAPES[case]
    check_against_reference(kernels.group_norm_silu, make_inputs(shape, dtype), groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("film", [(), ("scale",), ("shift",), ("scale", "shift")], ids="+".join)
def test_film_variants_direct(film, dtype):
    check_against_reference(group_norm_silu, make_inputs((2, 8, 5, 7), dtype, film), groups=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last(dtype):
    # The incoming gradient is contiguous NCHW while x is channels-last: the kernel reads both layouts.
    check_against_reference(kernels.group_norm_silu, make_inputs((2, 8, 6, 6), dtype), 4, channels_last=True)


def test_large_mean_breaks_one_pass_variance_but_not_the_kernel():
    inputs = make_inputs((2, 8, 5, 7), torch.float32, mean=1000.0, std=0.01)
    xg = inputs[0].detach().view(2, 4, -1)
    one_pass = (xg * xg).mean(-1) - xg.mean(-1) ** 2
    true_var = xg.double().var(-1, unbiased=False)
    assert ((one_pass.double() - true_var).abs() > true_var).any()  # the input really is adversarial
    check_against_reference(group_norm_silu, inputs, groups=4)


def test_weight_and_bias_may_be_none_like_f_group_norm():
    x = make_inputs((2, 8, 5, 7), torch.float32)[0]
    torch.testing.assert_close(group_norm_silu(x, None, None, 4), F.silu(F.group_norm(x, 4)), atol=1e-5, rtol=1e-4)


def test_scale_and_shift_broadcast_like_the_reference():
    x, w, b, scale, shift = make_inputs((2, 8, 5, 7), torch.float32)
    scale1, shift1 = (t[:1].detach().requires_grad_() for t in (scale, shift))
    y = group_norm_silu(x, w, b, 4, scale1, shift1)
    torch.testing.assert_close(y, reference.group_norm_silu(x, w, b, 4, scale1, shift1), atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert scale1.grad.shape == (1, 8) and shift1.grad.shape == (1, 8)


def test_dispatcher_runs_the_kernel_not_the_reference(monkeypatch):
    if DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"

    def no_fallback(*args, **kwargs):
        raise AssertionError("dispatcher fell back to the PyTorch reference")

    monkeypatch.setattr(reference, "group_norm_silu", no_fallback)
    x, w, b, scale, shift = make_inputs((1, 4, 3, 3), torch.float32)
    y = kernels.group_norm_silu(x, w, b, 2, scale, shift)
    assert type(y.grad_fn).__name__ == GroupNormSiLU.__name__ + "Backward"


def test_bad_groups_and_rank():
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    w, b = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        group_norm_silu(x, w, b, 4)
    with pytest.raises(ValueError, match="N, C, H, W"):
        group_norm_silu(x[0], w, b, 2)
