"""The two fused operations the models call, and the switch that picks their implementation.

`MINIMEDI_KERNELS` (read at every call, so tests can flip it):
  auto   (default) Triton for CUDA tensors when Triton imports, else the PyTorch reference
  torch  always the PyTorch reference (`minimedi/kernels/reference.py`)
  triton always Triton; with TRITON_INTERPRET=1 this runs the real kernels on CPU tensors
Importing this package never needs Triton.
"""
import os

from minimedi.kernels import reference

_MODES = ("auto", "torch", "triton")


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x):
    """Whether a call on tensor `x` goes to the Triton kernels under the current MINIMEDI_KERNELS."""
    mode = os.environ.get("MINIMEDI_KERNELS", "auto")
    if mode not in _MODES:
        raise ValueError(f"MINIMEDI_KERNELS={mode!r}; expected one of {', '.join(_MODES)}")
    if mode == "auto":
        return x.is_cuda and triton_available()
    return mode == "triton"


def group_norm_silu(x, weight, bias, groups, scale=None, shift=None, eps=1e-5):
    """SiLU(GroupNorm(x) * (1 + scale) + shift). x [N, C, H, W]; weight, bias [C]; scale, shift [N, C] or None."""
    if use_triton(x):
        from minimedi.kernels.group_norm import group_norm_silu as fused
        return fused(x, weight, bias, groups, scale, shift, eps)
    return reference.group_norm_silu(x, weight, bias, groups, scale, shift, eps)


def attention(q, k, v, key_mask=None, causal=False):
    """Scaled dot-product attention, q [B, H, Lq, D], k/v [B, H, Lk, D]; key_mask bool [B, Lk] (True = attend)."""
    if use_triton(q):
        from minimedi.kernels.flash_attention import attention as fused
        return fused(q, k, v, key_mask, causal)
    return reference.attention(q, k, v, key_mask, causal)
