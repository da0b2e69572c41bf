"""Fused scaled dot-product attention in Triton: FlashAttention-2 forward and backward.

Attention is O = softmax(S) V with S = Q K^T / sqrt(D). Materialising the [Lq, Lk] matrices S and
P = softmax(S) costs O(L^2) memory traffic; FlashAttention (Dao et al. 2022; FA2: Dao 2023) never writes
them. Each program owns BLOCK_M query rows, keeps them in registers and streams over the keys in blocks
of BLOCK_N, so only Q, K, V, O (and one float per row) ever touch global memory.

Forward: the online softmax (Milakov & Gimelshein 2018; FA2 Algorithm 1). For one query row, after the
key blocks 1..j have been seen it keeps a running max m, a running normaliser l = sum exp(s - m) and an
unnormalised output acc = sum exp(s - m) v. A new block with scores s_j updates them as

    m' = max(m, max s_j),   alpha = exp(m - m'),
    l' = alpha * l + sum exp(s_j - m'),   acc' = alpha * acc + exp(s_j - m') V_j,

and at the end O = acc / l. Subtracting the running max keeps every exponent <= 0 (no overflow in
fp16/bf16 scores), and rescaling by alpha fixes up everything accumulated under an older max. FA2 divides
by l once at the end rather than per block. We work in base 2 (scores pre-multiplied by log2(e), exp2 is a
single instruction) and accumulate in fp32 whatever the input dtype; P is cast to the input dtype only to
feed the tensor cores for P V, and O is written back in the input dtype.

Why save LSE = m + log2(l) (one fp32 per query row): the backward needs P again. With LSE it recomputes
the exact, already normalised P = exp2(S - LSE) block by block, without a second online-softmax pass and
without storing P.

Masking. One score tile helper, `_scores`, sets s = -inf wherever a key must not be seen: key tails beyond
Lk (the last block is partly outside the sequence), keys hidden by `key_mask`, and, when `causal`, keys
j > i (top-left aligned, as `torch.ones(Lq, Lk).tril()`). Causal programs also skip key blocks wholly above
the diagonal. Query tails beyond Lq load zeros and are simply not stored. A row that sees no key at all
(a `key_mask` with no True) would give 0/0; like `scaled_dot_product_attention` it returns 0, with
LSE = +inf so that its P, and hence all its gradients, are 0 in the backward.

Backward (FA2 Algorithm 2). With dP = dO V^T and D_i = rowsum(dO * O) = sum_j P_ij dP_ij,

    dV = P^T dO,   dS = P * (dP - D_i),   dQ = dS K / sqrt(D),   dK = dS^T Q / sqrt(D).

A preprocessing kernel computes D_i (called `delta`). Then two kernels: one program per key block that
loops over query blocks and accumulates dK, dV in registers, and one program per query block that loops
over key blocks and accumulates dQ. FA2's single-kernel variant instead adds each block's dQ contribution
into global memory with atomics; we chose the split because it is atomic-free, hence bitwise
deterministic (same seed, same images, exact resume) and needs no fp32 dQ scratch buffer, at the cost of
recomputing Q K^T and dO V^T once more (7 block matmuls instead of 5).

Inputs may be any strided views (e.g. q, k, v split off one fused QKV projection): every kernel takes
element strides instead of asking for contiguous copies. Head dims up to 128 are supported (any size;
tiles are padded to a power of two >= 16, the smallest tensor-core tile). fp16/bf16 products run on the
tensor cores; fp32 inputs use IEEE fp32 dots, to match PyTorch's default fp32 matmul precision.
"""
import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 128
LOG2_E = 1.4426950408889634
PREPROCESS_BLOCK_M = 64


# Small autotuning spaces: (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages). The loop-invariant
# tile (queries in the forward and dQ kernels, keys in the dK/dV kernel) is the larger one, as in FA2; the
# dK/dV kernel keeps four [BLOCK_N, D] tiles live, hence its extra 8-warp configs that do not spill at
# D = 128. The first config is the one the CPU interpreter runs: small tiles keep multi-block loops tested.
def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


FWD_CONFIGS = _configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4)])
DKDV_CONFIGS = _configs([(32, 64, 4, 3), (32, 64, 8, 2), (64, 64, 8, 3), (32, 128, 8, 3), (32, 32, 4, 3)])
DQ_CONFIGS = _configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)])
TUNING_KEY = ["Lq", "Lk", "BLOCK_D", "CAUSAL", "HAS_KEY_MASK"]


def _prune(configs, named_args, **kwargs):
    """Under TRITON_INTERPRET timing configs means nothing (and is slow): run the first one only."""
    return configs[:1] if triton.knobs.runtime.interpret else configs


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b accumulated in fp32. fp32 operands get IEEE products (PyTorch's default fp32 matmul, not TF32)."""
    a, b = a.to(DOT_DTYPE), b.to(DOT_DTYPE)
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q, k, offs_m, offs_n, key_ok, qk_scale, CAUSAL: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile of log2-scaled scores, -inf where query offs_m may not see key offs_n."""
    s = _dot(q, tl.trans(k), DOT_DTYPE) * qk_scale
    visible = tl.broadcast_to(key_ok[None, :], s.shape)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _key_ok(KM, stride_kmb, stride_kmn, b, offs_n, Lk, HAS_KEY_MASK: tl.constexpr):
    """Which keys of this block exist (offs_n < Lk) and are let through by `key_mask`, if there is one."""
    ok = offs_n < Lk
    if HAS_KEY_MASK:
        ok = ok & (tl.load(KM + b * stride_kmb + offs_n * stride_kmn, mask=ok, other=0) != 0)
    return ok


@triton.autotune(FWD_CONFIGS, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KM,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_kmb, stride_kmn,
              H, Lq, Lk, D, qk_scale,
              CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block of one (batch, head): the online softmax over key blocks, then O and LSE."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(Lk, start_m + BLOCK_M) if CAUSAL else Lk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        key_ok = _key_ok(KM, stride_kmb, stride_kmn, b, offs_n, Lk, HAS_KEY_MASK)
        s = _scores(q, k, offs_m, offs_n, key_ok, qk_scale, CAUSAL, DOT_DTYPE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only hidden keys so far has m_new = -inf; shift by 0 there to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_DTYPE)
        m_i = m_new

    seen = l_i > 0
    o = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         H, Lq, D, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = rowsum(dO * O) = sum_j P_ij dP_ij, the softmax-Jacobian term of dS."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.autotune(DKDV_CONFIGS, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KM,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_kmb, stride_kmn,
                   H, Lq, Lk, D, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block: dV = sum over query blocks of P^T dO, dK = sum of dS^T Q (times the softmax scale)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    key_ok = _key_ok(KM, stride_kmb, stride_kmn, b, offs_n, Lk, HAS_KEY_MASK)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Causal: queries before this key block's first key cannot see it; start at the block holding query start_n.
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(lo, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                     + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        p = tl.exp2(_scores(q, k, offs_m, offs_n, key_ok, qk_scale, CAUSAL, DOT_DTYPE) - lse[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_DTYPE)
        dp = _dot(do, tl.trans(v), DOT_DTYPE)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_DTYPE)

    # DK and DV are fresh contiguous tensors shaped like k.
    out_ptrs = bh * Lk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(DQ_CONFIGS, key=TUNING_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KM,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_kmb, stride_kmn,
                 H, Lq, Lk, D, qk_scale, sm_scale,
                 CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block: dQ = sum over key blocks of dS K (times the softmax scale)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(Lk, start_m + BLOCK_M) if CAUSAL else Lk
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
        k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        key_ok = _key_ok(KM, stride_kmb, stride_kmn, b, offs_n, Lk, HAS_KEY_MASK)
        p = tl.exp2(_scores(q, k, offs_m, offs_n, key_ok, qk_scale, CAUSAL, DOT_DTYPE) - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_DTYPE)

    tl.store(DQ + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

def _check(q, k, v, key_mask):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention wants q [B, H, Lq, D] and k, v [B, H, Lk, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel supports head dims up to {MAX_HEAD_DIM}, not {q.shape[3]}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one dtype of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_mask must be bool [B, Lk] = {(k.shape[0], k.shape[2])}; got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")


def _mask_args(key_mask):
    """The key mask as a uint8 view of the same bytes (no copy) and its two strides; None when there is none."""
    if key_mask is None:
        return None, 0, 0
    km = key_mask.view(torch.uint8)
    return km, km.stride(0), km.stride(1)


def _dot_dtype(dtype):
    """The tensor-core operand type: the input dtype. The CPU interpreter keeps bf16 as raw uint16 bits and
    cannot multiply them (triton-lang/triton#11584), so there bf16 operands, already rounded to bf16, are
    widened to fp32 for the product."""
    if dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _meta(q, key_mask, causal):
    """The compile-time switches shared by the forward, dK/dV and dQ kernels."""
    return dict(CAUSAL=causal, HAS_KEY_MASK=key_mask is not None, DOT_DTYPE=_dot_dtype(q.dtype),
                BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])))


def _forward(q, k, v, key_mask, causal):
    """O and the per-row LSE (base 2, fp32, [B, H, Lq])."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    km, *km_strides = _mask_args(key_mask)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd[grid](q, k, v, o, lse, km, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *km_strides,
                    H, Lq, Lk, D, D ** -0.5 * LOG2_E, **_meta(q, key_mask, causal))
    return o, lse


def _backward(do, q, k, v, o, lse, key_mask, causal):
    """dQ, dK, dV: the delta preprocess, then the dK/dV kernel over key blocks and the dQ kernel over query blocks."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    meta = _meta(q, key_mask, causal)
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(Lq, PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=PREPROCESS_BLOCK_M)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    km, *km_strides = _mask_args(key_mask)
    shared = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *km_strides, H, Lq, Lk, D, D ** -0.5 * LOG2_E,
              D ** -0.5)
    dkdv_grid = lambda m: (triton.cdiv(Lk, m["BLOCK_N"]), B * H)  # noqa: E731
    _attn_bwd_dkdv[dkdv_grid](q, k, v, do, lse, delta, dk, dv, km, *shared, **meta)
    dq_grid = lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq[dq_grid](q, k, v, do, lse, delta, dq, km, *shared, **meta)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, causal):
        o, lse = _forward(q, k, v, key_mask, causal)
        ctx.save_for_backward(q, k, v, o, lse, key_mask)
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, key_mask, ctx.causal)
        return dq, dk, dv, None, None


def attention(q, k, v, key_mask=None, causal=False):
    """softmax(q k^T / sqrt(D)) v, as `kernels.reference.attention`, computed by the kernels above.

    q [B, H, Lq, D], k and v [B, H, Lk, D] (any strides), D <= 128; `key_mask` bool [B, Lk], True where a key
    takes part; `causal` lets query i see keys j <= i. Returns [B, H, Lq, D] in the input dtype.
    """
    _check(q, k, v, key_mask)
    return FlashAttention.apply(q, k, v, key_mask, bool(causal))
