"""The Triton flash-attention kernels (minimedi/kernels/flash_attention.py) against the PyTorch reference.

Outputs and dq, dk, dv are compared with `kernels.reference.attention` evaluated in fp32 on the same
(rounded) inputs. Without a GPU the real kernels run on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so shapes are small and B * H <= 2.
"""
import pytest
import torch

from minimedi import kernels
from minimedi.kernels import reference
from minimedi.kernels.flash_attention import attention as flash_attention

REFERENCE = reference.attention  # kept: the dispatcher tests replace `reference.attention` with a trap
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Per-dtype tolerances against the fp32 reference (Liger-Kernel style): fp16 keeps 10 mantissa bits, bf16 7.
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}


def make_qkv(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype).requires_grad_() for n in (lq, lk, lk))


def make_key_mask(kind, b, lk):
    """None; "pad": batch 0 sees every key, the others a prefix (text padding); "one": only key lk // 2."""
    if kind is None:
        return None
    mask = torch.zeros(b, lk, dtype=torch.bool, device=DEVICE)
    if kind == "pad":
        mask[0] = True
        mask[1:, : max(1, lk // 3)] = True
    else:
        mask[:, lk // 2] = True
    return mask


def reference_and_grads(q, k, v, key_mask, causal, do):
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = REFERENCE(qf, kf, vf, key_mask, causal)
    return out, torch.autograd.grad(out, (qf, kf, vf), do.float())


def assert_matches_reference(fn, q, k, v, key_mask=None, causal=False):
    out = fn(q, k, v, key_mask, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    expected, expected_grads = reference_and_grads(q, k, v, key_mask, causal, do)
    tol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.float(), expected, **tol)
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        torch.testing.assert_close(grad.float(), expected_grad, **tol, msg=lambda m: f"{name}: {m}")
    return out, grads


@pytest.fixture
def triton_dispatch(monkeypatch):
    """MINIMEDI_KERNELS=triton, with the reference booby-trapped so a silent fallback fails the test."""
    def trap(*args, **kwargs):
        raise AssertionError("kernels.attention fell back to the PyTorch reference")

    monkeypatch.setenv("MINIMEDI_KERNELS", "triton")
    monkeypatch.setattr(reference, "attention", trap)


def dispatched(q, k, v, key_mask, causal):
    return kernels.attention(q, k, v, key_mask=key_mask, causal=causal)


@pytest.mark.parametrize("b, h, lq, lk, d, causal, mask", [
    (1, 1, 1, 1, 32, False, None),      # one query, one key
    (1, 2, 7, 7, 16, True, None),       # the tiny preset's head dim, causal
    (2, 1, 77, 77, 64, True, "pad"),    # CLIP text: causal plus padding
    (2, 1, 80, 77, 16, True, "pad"),    # causal with Lq > Lk
    (2, 1, 7, 80, 128, False, "one"),   # cross-attention, all keys but one hidden
    (2, 1, 257, 78, 32, False, "pad"),  # UNet cross-attention to 77 tokens + null token, odd map size
    (1, 1, 257, 257, 64, False, None),  # self-attention, several blocks with tails on both axes
    (1, 2, 80, 1, 32, False, None),     # a single key
])
def test_matches_reference_through_dispatcher(triton_dispatch, b, h, lq, lk, d, causal, mask):
    q, k, v = make_qkv(b, h, lq, lk, d)
    assert_matches_reference(dispatched, q, k, v, make_key_mask(mask, b, lk), causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lq, lk, d, causal, mask", [
    (77, 78, 32, False, "pad"), (77, 77, 64, True, None), (65, 80, 128, False, "one"), (7, 7, 16, True, None),
])
def test_dtypes_direct(dtype, lq, lk, d, causal, mask):
    q, k, v = make_qkv(2, 1, lq, lk, d, dtype)
    assert_matches_reference(flash_attention, q, k, v, make_key_mask(mask, 2, lk), causal)


def test_dispatcher_runs_the_kernel_every_call(triton_dispatch):
    q, k, v = make_qkv(1, 1, 7, 7, 16)
    for _ in range(2):  # the second call catches `kernels.attention` being shadowed by a submodule import
        out = kernels.attention(q, k, v)
        assert type(out.grad_fn).__name__ == "FlashAttentionBackward"


def test_views_of_fused_projections_without_copies():
    """q, k, v split off fused QKV / KV projections (strided views, even a non-unit head-dim stride), a
    strided key mask, and an upstream gradient arriving through the head merge (also strided)."""
    g = torch.Generator().manual_seed(0)
    b, h, lq, lk, d = 2, 1, 33, 20, 32
    qkv = torch.randn(b, lq, 3 * h * 2 * d, generator=g).to(DEVICE).requires_grad_()
    kv = torch.randn(b, lk, 2, h, 2 * d, generator=g).to(DEVICE).requires_grad_()
    mask = (torch.arange(2 * lk, device=DEVICE) < 2 * lk - 9).expand(b, -1).clone()
    mask[1, 16:] = False
    key_mask = mask[:, ::2]
    w = torch.randn(b, lq, h * d, generator=g).to(DEVICE)

    def loss(fn):
        q = qkv.chunk(3, dim=-1)[0].unflatten(-1, (h, 2 * d)).transpose(1, 2)[..., 1::2]
        k, v = (t.transpose(1, 2)[..., ::2] for t in kv.unbind(2))
        assert not (q.is_contiguous() or k.is_contiguous() or key_mask.is_contiguous())
        out = fn(q, k, v, key_mask, False)
        return (out.transpose(1, 2).flatten(2) * w).sum()

    ours = torch.autograd.grad(loss(flash_attention), (qkv, kv))
    theirs = torch.autograd.grad(loss(REFERENCE), (qkv, kv))
    for grad, expected in zip(ours, theirs):
        torch.testing.assert_close(grad, expected, **TOLERANCES[torch.float32])


def test_a_row_with_no_visible_key_gives_zeros():
    """Like scaled_dot_product_attention: output 0 and no gradient for a batch whose keys are all hidden."""
    q, k, v = make_qkv(2, 1, 9, 40, 16)
    key_mask = make_key_mask("pad", 2, 40)
    key_mask[1] = False
    out, grads = assert_matches_reference(flash_attention, q, k, v, key_mask)
    assert torch.all(out[1] == 0)
    assert all(torch.all(grad[1] == 0) for grad in grads)


@pytest.mark.parametrize("shapes, mask, match", [
    (((1, 1, 4, 256), (1, 1, 4, 256)), None, "head dims up to 128"),
    (((1, 1, 4, 16), (1, 2, 4, 16)), None, r"q \[B, H, Lq, D\]"),
    (((1, 1, 4, 16), (1, 1, 5, 16)), torch.ones(1, 5), "key_mask must be bool"),
])
def test_rejects_what_it_cannot_compute(shapes, mask, match):
    q, k = (torch.zeros(s, device=DEVICE) for s in shapes)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, mask)
