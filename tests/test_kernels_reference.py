"""The kernel API and its PyTorch references, against torch.nn.functional written out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from minimedi import kernels
from minimedi.kernels import reference


def test_group_norm_silu_matches_separate_ops():
    torch.manual_seed(0)
    x = torch.randn(3, 12, 5, 7, dtype=torch.float64)
    w, b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    scale, shift = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    xg = x.view(3, 4, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + 1e-5)).view_as(x) * w[:, None, None] + b[:, None, None]
    y = y * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    expected = y * torch.sigmoid(y)
    torch.testing.assert_close(reference.group_norm_silu(x, w, b, 4, scale, shift), expected)
    torch.testing.assert_close(kernels.group_norm_silu(x, w, b, 4), F.silu(F.group_norm(x, 4, w, b)))


def test_attention_matches_softmax_formula_with_masks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for n in (5, 9, 9))
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[0, 1:] = False  # all but one key hidden
    scores = q @ k.transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(kernels.attention(q, k, v, key_mask), expected)
    torch.testing.assert_close(kernels.attention(q, k, v, key_mask)[0], v[0, :, :1].expand(3, 5, 16))


def test_causal_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(kernels.attention(q, k, v, causal=True), scores.softmax(-1) @ v)


def test_dispatch_switch(monkeypatch):
    x = torch.randn(2, 4, 3, 3)
    monkeypatch.setenv("MINIMEDI_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("MINIMEDI_KERNELS", "auto")
    assert not kernels.use_triton(x)  # CPU tensors take the reference under auto
    monkeypatch.setenv("MINIMEDI_KERNELS", "triton")
    assert kernels.use_triton(x)
    monkeypatch.setenv("MINIMEDI_KERNELS", "fast")
    with pytest.raises(ValueError):
        kernels.use_triton(x)
