"""The few operations where speed lives: packed attention, the two RoPEs and RMSNorm.

Each operation has a plain-PyTorch version (the readable reference) and a Triton kernel that must give the same
numbers. `GLM4V_KERNELS=torch|triton` picks the implementation the model uses (default: triton on CUDA tensors,
torch elsewhere). The model files call only the dispatching functions at the bottom of each section:
`flash_attention`, `rms_norm`, `rope_vision`, `mrope`.

Algorithmic choices:
- **Attention is FlashAttention-2** (Dao, 2023). The (T×T) score matrix never exists: each program holds one block
  of queries and walks over blocks of keys with an *online softmax* (a running max and sum rescale the partial
  output). Packed variable-length batches: a program reads its segment's bounds from `cu_seqlens`, so images or
  samples of any size share one launch and attend only within themselves. GQA: query head h reads kv head
  h // (Hq / Hkv). Any head_dim up to 256: tiles are padded to the next power of two and the padding is masked.
  Inputs in fp32/bf16/fp16, accumulation in fp32. In the forward and dQ kernels the causal mask is applied only
  on blocks that cross the diagonal; blocks below it take a mask-free path.
- **Attention backward** recomputes the probabilities block by block from the saved logsumexp (no T×T storage):
  a preprocess computes delta = rowsum(dO·O); one kernel owns a block of keys and accumulates dK, dV over the
  query heads of its GQA group (so no atomics; one loop, masked throughout when causal, to stay within the
  registers); another owns a block of queries and accumulates dQ.
- **Tiles per GPU**: `attention_tiles(arch, dtype, head_dim, kind, smem_limit)` picks block sizes, warps and
  pipeline stages; `tests/test_aot.py` compiles every kernel for sm_80/89/90/100 without a GPU and checks shared
  memory, registers and spills of what the launchers would launch.
- **One RoPE kernel for both RoPEs**: both rotate pairs of dims by angle position·inv_freq, where each frequency
  takes its position from one row of a small position table (M-RoPE: t/h/w by `mrope_section`; ViT: row/col).
  Only the pairing differs (interleaved (2i, 2i+1) for M-RoPE, halves (i, i+D/2) for the ViT). cos/sin are
  computed in the kernel from the positions; q and k heads are rows of one launch. The backward of a rotation
  is the inverse rotation: the same kernel with the angle negated.
- **RMSNorm**: one row per program with fp32 statistics, rounded like the reference (normalise in fp32, cast to
  x's dtype, then multiply by the weight); the backward reduces the weight gradient through per-program
  partial sums, then one sum over programs.
- Decoding (a few queries against a KV cache) stays on `scaled_dot_product_attention` in model.py.

Triton on a CPU: compiled Triton needs a GPU, but its interpreter runs the same kernel source on CPU tensors
(slowly, in numpy), which is how the tests check the kernels. The interpreter must be switched on before triton
is imported (triton decorates its own library functions at import), so on a machine without a GPU this module
sets TRITON_INTERPRET=1 before importing triton. If something imported triton earlier, set TRITON_INTERPRET=1
in the environment yourself. Without the triton package (it has no macOS or Windows wheels) everything runs on the
torch paths.
"""
import functools
import math
import os
import sys
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F

import rope2d

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    HAS_TRITON = True
except ImportError:  # no Triton wheels for macOS or Windows: the kernels below are defined but never launched
    HAS_TRITON = False
    triton = tl = types.SimpleNamespace(jit=lambda fn=None, **options: fn or (lambda f: f), constexpr=None)

# True when Triton runs kernels in its interpreter (on any tensor, CPU included).
INTERPRETED = HAS_TRITON and not isinstance(tl.sum, triton.runtime.JITFunction)


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels should handle tensor `x` (see `GLM4V_KERNELS` in the module docstring)."""
    choice = os.environ.get("GLM4V_KERNELS", "").lower()
    if choice not in ("", "torch", "triton"):
        raise ValueError(f"GLM4V_KERNELS must be 'torch' or 'triton', not {choice!r}")
    if choice == "torch" or (choice == "" and not x.is_cuda):
        return False
    if not HAS_TRITON:
        if choice == "triton":
            raise ValueError("GLM4V_KERNELS=triton, but the triton package is not installed (pip install triton; "
                             "it has wheels for Linux only)")
        return False  # CUDA without Triton: the torch paths
    if torch.compiler.is_compiling():  # inductor generates its own fused kernels from the torch paths
        return False
    if not x.is_cuda and not INTERPRETED:
        raise ValueError("GLM4V_KERNELS=triton on CPU tensors runs Triton's interpreter, which must be switched on "
                         "before triton is imported: set TRITON_INTERPRET=1 in the environment")
    return True


class GpuLimits(NamedTuple):
    """The facts about a GPU that launch parameters depend on."""
    arch: int  # compute capability as 10·major + minor: 80 (A100), 89 (L40S, RTX 4090), 90 (H100/H200), 100 (B200)
    smem_per_block: int  # bytes of shared memory one program may use (the opt-in maximum, which Triton checks)
    sm_count: int  # streaming multiprocessors


def gpu_limits(device: torch.device) -> "GpuLimits | None":
    """The limits of the GPU holding tensors on `device`; None where the kernels run in Triton's interpreter.
    Every launch parameter that depends on the hardware is derived from this (the ahead-of-time compile test
    substitutes the limits of each target GPU here)."""
    if device.type != "cuda" or INTERPRETED:
        return None
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)  # a GPU's properties do not change while the process runs
def _cuda_limits(index: int) -> GpuLimits:
    props = torch.cuda.get_device_properties(index)
    # the opt-in maximum per block is the multiprocessor's shared memory less the 1 KB the driver reserves
    smem = getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_multiprocessor - 1024)
    return GpuLimits(10 * props.major + props.minor, smem, props.multi_processor_count)


def _num_programs_for_reduction(device: torch.device, n_rows: int) -> int:
    """How many programs share a row reduction: enough to fill a GPU, few in the interpreter."""
    limits = gpu_limits(device)
    return min(n_rows, 4 * limits.sm_count if limits else 4)


# ---------------------------------------------------------------------------------------------------------------
# Packed variable-length attention
# ---------------------------------------------------------------------------------------------------------------


def attention_torch(q, k, v, cu_seqlens=None, causal=False):
    """Attention within each segment of a packed batch: q (total, Hq, D), k/v (total, Hkv, D).

    Segments of equal length are batched into one scaled_dot_product_attention call, so memory grows with
    Σ nᵢ², never (Σ nᵢ)², and the number of calls with the number of distinct lengths."""
    total = q.shape[0]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, total], device=q.device)
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    outputs, order = [], []
    for length in torch.unique(lengths[lengths > 0]).tolist():
        index = starts[lengths == length, None] + torch.arange(length, device=q.device)  # (n, L)
        qs, ks, vs = (x[index].transpose(1, 2) for x in (q, k, v))  # (n, H, L, D)
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=qs.shape[1] != ks.shape[1])
        outputs.append(out.transpose(1, 2).reshape(-1, *q.shape[1:]))
        order.append(index.flatten())
    if not outputs:
        return torch.zeros_like(q)
    out = torch.cat(outputs)
    inverse = torch.empty(total, dtype=torch.long, device=q.device)
    inverse[torch.cat(order)] = torch.arange(total, device=q.device)
    return out[inverse]


# Scores live in base-2 units (s · log2(e) / sqrt(D)) so the softmax uses exp2, the GPU's native exponential; the
# saved logsumexp is in the same units.


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, lo, hi, qk_scale,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into the running output of one query block (online softmax)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        n_mask = n < seq_len
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N)
        if MASKED:  # only the blocks at the segment's end or across the diagonal pay for the mask
            valid = n_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= n[None, :])
            s = tl.where(valid, s, float("-inf"))
        # online softmax: raise the running max, rescale what was accumulated under the old one
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block_inner(CU_SEQLENS, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The segment, query head, segment start and length, and first query of this program's block of queries."""
    # causal: the last query blocks see the most keys, so schedule them first (less idle tail)
    block_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    segment, head = tl.program_id(1), tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + segment).to(tl.int64)
    seq_len = (tl.load(CU_SEQLENS + segment + 1) - seq_start).to(tl.int32)
    return segment, head, seq_start, seq_len, block_m * BLOCK_M


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_SEQLENS, qk_scale, total,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = one block of BLOCK_M queries of one segment and one query head."""
    segment, head, seq_start, seq_len, start_m = _query_block_inner(CU_SEQLENS, CAUSAL, BLOCK_M)
    if start_m >= seq_len:  # the grid is sized for the longest segment
        return
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    d_mask = offs_d < HEAD_DIM
    q_base = Q + seq_start * stride_qt + head * stride_qh
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - max)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys [0, unmasked_end) are valid for every query of the block; [unmasked_end, end) need the mask
    if CAUSAL:
        unmasked_end = start_m  # BLOCK_M is a multiple of BLOCK_N, so this is a block boundary
        end = tl.minimum(start_m + BLOCK_M, seq_len)
    else:
        unmasked_end = (seq_len // BLOCK_N) * BLOCK_N
        end = seq_len
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len,
                                    0, unmasked_end, qk_scale, HEAD_DIM, CAUSAL, False, BLOCK_N, BLOCK_D,
                                    DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len,
                                    unmasked_end, end, qk_scale, HEAD_DIM, CAUSAL, True, BLOCK_N, BLOCK_D,
                                    DOT_PRECISION)
    # key 0 is visible to every query, so l_i > 0 for every row
    out = acc / l_i[:, None]
    tl.store(O + seq_start * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(LSE + head * total + seq_start + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh,
                           HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO · O) per (head, token): the softmax-backward term shared by the dK/dV and dQ kernels."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < total)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_t.to(tl.int64)[:, None]
    o = tl.load(O + rows * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * total + offs_t, delta, mask=offs_t < total)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, seq_start, total, first_head, n_heads, stride_qt,
                         stride_qh, stride_dot, stride_doh, offs_n, seq_len, lo, qk_scale, HEAD_DIM: tl.constexpr,
                         MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, seq_len) of query heads first_head ...
    first_head + n_heads - 1. Pᵀ and dPᵀ have keys as rows.

    One flat loop over (head, query block), with the causal mask (MASKED) on every block. Nested loops (heads,
    then query blocks) or a second, mask-free loop for the blocks below the diagonal (as in the forward) cost
    registers this kernel, holding dK and dV, does not have: compiled for sm_90/sm_100 at 32×128 tiles they
    spilled 24-440 bytes per thread, the flat loop none (tests/test_aot.py). The mask is one compare and select
    per score, against 4·D multiply-adds on the tensor cores. Query rows past the segment's end load as zeros
    (q, dO, lse, delta), which makes their terms exactly zero."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    n_blocks = tl.cdiv(seq_len - lo, BLOCK_M)
    for i in range(n_heads * n_blocks):
        head = first_head + i // n_blocks
        q_base = Q + seq_start * stride_qt + head * stride_qh
        do_base = DO + seq_start * stride_dot + head * stride_doh
        row_base = head * total + seq_start  # of this head's lse and delta
        m = lo + (i % n_blocks) * BLOCK_M + offs_m
        m_mask = m < seq_len
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + m[:, None] * stride_qt + offs_d[None, :], mask=qd_mask, other=0.0)  # (M, D)
        lse = tl.load(LSE + row_base + m, mask=m_mask, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])  # Pᵀ (N, M)
        if MASKED:
            p_t = tl.where(m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_base + m[:, None] * stride_dot + offs_d[None, :], mask=qd_mask, other=0.0)  # (M, D)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dPᵀ = V dOᵀ (N, M)
        delta = tl.load(DELTA + row_base + m, mask=m_mask, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P ∘ (dP − delta)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


# `splits` depends on the sequence lengths, so it is a plain argument (not a constexpr, and not specialised on
# its value): one build serves every split count, and the ahead-of-time test compiles what launches.
@triton.jit(do_not_specialize=["splits"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, qk_scale, sm_scale, total, splits,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                          stride_dk_split, stride_dkt, stride_dkh, stride_dv_split, stride_dvt, stride_dvh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """One program = one block of BLOCK_N keys of one segment and one kv head; it loops over the query heads that
    share this kv head, so dK and dV are summed in registers instead of with atomics. When that grid would be too
    small to fill the GPU (short sequences, few kv heads), the GROUP query heads are split over `splits` programs,
    each writing its partial sums to its own slice of DK/DV (summed afterwards)."""
    segment = tl.program_id(1)
    kv_head, split = tl.program_id(2) // splits, tl.program_id(2) % splits
    seq_start = tl.load(CU_SEQLENS + segment).to(tl.int64)
    seq_len = (tl.load(CU_SEQLENS + segment + 1) - seq_start).to(tl.int32)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= seq_len:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + (seq_start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + (seq_start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    heads_per_split = GROUP // splits
    # causal: queries before start_n never see these keys
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, seq_start, total,
                                  kv_head * GROUP + split * heads_per_split, heads_per_split, stride_qt, stride_qh,
                                  stride_dot, stride_doh, offs_n, seq_len, start_n if CAUSAL else 0, qk_scale,
                                  HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_D, DOT_PRECISION)
    dk *= sm_scale  # S = scale · QKᵀ, so dK = scale · dSᵀQ
    dk_base = DK + split * stride_dk_split + kv_head * stride_dkh
    dv_base = DV + split * stride_dv_split + kv_head * stride_dvh
    tl.store(dk_base + (seq_start + offs_n[:, None]) * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_base + (seq_start + offs_n[:, None]) * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, lo, hi,
                       qk_scale, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi). Keys past the segment's end load as zeros and
    add exactly zero (dQ += dS · K), so only the causal diagonal needs a mask."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        kv_mask = (n < seq_len)[:, None] & d_mask[None, :]
        k = tl.load(k_base + n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        v = tl.load(v_base + n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)  # (N, D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])  # (M, N)
        if MASKED:
            p = tl.where(offs_m[:, None] >= n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS, qk_scale, sm_scale, total,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        stride_dqt, stride_dqh,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program = one block of BLOCK_M queries of one segment and one query head."""
    segment, head, seq_start, seq_len, start_m = _query_block_inner(CU_SEQLENS, CAUSAL, BLOCK_M)
    if start_m >= seq_len:
        return
    kv_head = head // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = seq_start + offs_m[:, None]
    q = tl.load(Q + rows * stride_qt + head * stride_qh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(LSE + head * total + seq_start + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + head * total + seq_start + offs_m, mask=m_mask, other=0.0)
    k_base = K + seq_start * stride_kt + kv_head * stride_kh
    v_base = V + seq_start * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:  # keys before start_m: no mask; [start_m, start_m + BLOCK_M): the diagonal (BLOCK_M % BLOCK_N == 0)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, 0,
                                start_m, qk_scale, HEAD_DIM, False, BLOCK_N, BLOCK_D, DOT_PRECISION)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len,
                                start_m, tl.minimum(start_m + BLOCK_M, seq_len), qk_scale, HEAD_DIM, True, BLOCK_N,
                                BLOCK_D, DOT_PRECISION)
    else:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, seq_len, 0,
                                seq_len, qk_scale, HEAD_DIM, False, BLOCK_N, BLOCK_D, DOT_PRECISION)
    dq *= sm_scale
    tl.store(DQ + rows * stride_dqt + head * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


ATTENTION_KERNELS = ("fwd", "dkdv", "dq")


def _attention_candidates(arch: int, dtype: torch.dtype, block_d: int) -> dict:
    """Per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages) in order of preference. Chosen by compiling for
    sm_80/89/90/100 (tests/test_aot.py prints the table): the first of each list neither spills nor, where it
    fits, leaves shared memory unused; the later ones only serve GPUs with less shared memory."""
    if dtype == torch.float32:
        # fp32 dots ("ieee") run on the FMA units, which hold a thread's rows of both operands, the whole head
        # dim of them, in registers: at most 2 scores per thread (BLOCK_M·BLOCK_N ≤ 2·32·num_warps) or it spills
        return dict(fwd=[(32, 16, 8, 2)], dkdv=[(16, 16, 8, 2)], dq=[(32, 16, 8, 2)])
    if block_d > 128:  # head_dim 129..256: no preset has one; small tiles that fit every GPU (not tuned)
        return dict(fwd=[(64, 32, 4, 2)], dkdv=[(16, 64, 4, 2)], dq=[(64, 16, 4, 2)])
    # dK/dV holds two (BLOCK_N × D) fp32 accumulators. Before Hopper the MMA's first operand also lives in
    # registers, which at D = 128 leaves no room for 128 keys per program (it spills on sm_80 even with 16
    # queries); Hopper's wgmma reads it from shared memory.
    dkdv_keys = 128 if arch >= 90 or block_d <= 64 else 64
    return dict(fwd=[(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2)],
                dkdv=[(32, dkdv_keys, 8, 2), (32, 64, 8, 2), (16, 64, 4, 2)],
                dq=[(128, 32, 8, 2), (64, 32, 4, 2)])


def attention_smem_bytes(kind: str, arch: int, block_d: int, element_size: int, tiles: tuple) -> int:
    """An upper bound of the shared memory an attention kernel takes with these tiles: the tiles its loop streams,
    once per pipeline stage, plus the tiles it keeps (MMA operands; twice from sm_100 on, where the compiled
    kernels measured up to 15 KB more than one copy), plus 2 KB (barriers, reductions). tests/test_aot.py checks it
    against every compiled build."""
    block_m, block_n, _, stages = tiles
    row = block_d * element_size
    copies = 2 if arch >= 100 else 1
    if kind == "fwd":  # streams K, V (N × D); keeps Q (M × D)
        tile_bytes = stages * 2 * block_n * row + copies * block_m * row
    elif kind == "dkdv":  # streams Q, dO (M × D) and lse, delta (M); keeps K, V (N × D)
        tile_bytes = stages * block_m * (2 * row + 8) + copies * 2 * block_n * row
    else:  # dq: streams K, V (N × D); keeps Q, dO (M × D) and lse, delta (M)
        tile_bytes = stages * 2 * block_n * row + copies * block_m * (2 * row + 8)
    return tile_bytes + 2048


def attention_tiles(arch: int, dtype: torch.dtype, head_dim: int, kind: str, smem_limit: int) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of attention kernel `kind` ("fwd", "dkdv" or "dq") on a GPU of
    compute capability `arch` (80 for sm_80) whose programs may use `smem_limit` bytes of shared memory: the first
    preferred tiles that fit. BLOCK_M counts queries, BLOCK_N keys; in the forward and dQ kernels BLOCK_M is a
    multiple of BLOCK_N (their causal loops split at a block boundary)."""
    if kind not in ATTENTION_KERNELS:
        raise ValueError(f"kind must be one of {ATTENTION_KERNELS}, not {kind!r}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    element_size = dtype.itemsize
    candidates = _attention_candidates(arch, dtype, block_d)[kind]
    fitting = [t for t in candidates if attention_smem_bytes(kind, arch, block_d, element_size, t) <= smem_limit]
    return (fitting or candidates[-1:])[0]


# small tiles in the interpreter (ratios as on the GPU, so the tests cover the same loop bounds)
_INTERPRETER_TILES = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))


def _attention_tiles(head_dim: int, dtype: torch.dtype, device: torch.device, kind: str) -> tuple:
    """attention_tiles for the GPU holding `device`'s tensors, or the interpreter's tiles."""
    limits = gpu_limits(device)
    if limits is None:
        return _INTERPRETER_TILES[kind]
    return attention_tiles(limits.arch, dtype, head_dim, kind, limits.smem_per_block)


def _group_splits(group: int, programs: int, device: torch.device) -> int:
    """Over how many programs the dK/dV kernel spreads one GQA group: the smallest divisor of the group that gives
    at least two programs per streaming multiprocessor (a small target in the interpreter, so tests cover it)."""
    limits = gpu_limits(device)
    target = 2 * limits.sm_count if limits else 16
    return next((d for d in range(1, group + 1) if group % d == 0 and programs * d >= target), group)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32 unless torch allows TF32 matmuls (as scaled_dot_product_attention does)."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, sm_scale):
        total, num_heads, head_dim = q.shape
        group = num_heads // k.shape[1]
        o = torch.empty_like(q)
        lse = torch.empty(num_heads, total, dtype=torch.float32, device=q.device)  # base-2 logsumexp per row
        block_m, block_n, warps, stages = _attention_tiles(head_dim, q.dtype, q.device, "fwd")
        grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.numel() - 1, num_heads)
        _attn_fwd_kernel[grid](
            q, k, v, o, lse, cu_seqlens, sm_scale * math.log2(math.e), total,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
            GROUP=group, HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.sm_scale = max_seqlen, causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        total, num_heads, head_dim = q.shape
        num_kv_heads = k.shape[1]
        do = do if do.stride(-1) == 1 else do.contiguous()
        block_d = max(16, triton.next_power_of_2(head_dim))
        precision = _dot_precision(q.dtype)
        qk_scale = ctx.sm_scale * math.log2(math.e)
        num_segments = cu_seqlens.numel() - 1

        delta = torch.empty_like(lse)
        block_t = 32
        _attn_bwd_delta_kernel[(triton.cdiv(total, block_t), num_heads)](
            o, do, delta, total, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
            HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=block_d)

        block_m, block_n, warps, stages = _attention_tiles(head_dim, q.dtype, q.device, "dkdv")
        group = num_heads // num_kv_heads
        programs = triton.cdiv(ctx.max_seqlen, block_n) * num_segments * num_kv_heads
        splits = _group_splits(group, programs, q.device)
        if splits == 1:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dk_parts, dv_parts = dk[None], dv[None]
        else:  # fp32 partial sums, one slice per split of the group
            dk_parts = torch.empty(splits, *k.shape, dtype=torch.float32, device=k.device)
            dv_parts = torch.empty_like(dk_parts)
        _attn_bwd_dkdv_kernel[(triton.cdiv(ctx.max_seqlen, block_n), num_segments, num_kv_heads * splits)](
            q, k, v, do, dk_parts, dv_parts, lse, delta, cu_seqlens, qk_scale, ctx.sm_scale, total, splits,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            *dk_parts.stride()[:3], *dv_parts.stride()[:3],
            GROUP=group, HEAD_DIM=head_dim, CAUSAL=ctx.causal, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=warps, num_stages=stages)
        if splits > 1:
            dk, dv = dk_parts.sum(0).to(k.dtype), dv_parts.sum(0).to(v.dtype)

        dq = torch.empty_like(q)
        block_m, block_n, warps, stages = _attention_tiles(head_dim, q.dtype, q.device, "dq")
        _attn_bwd_dq_kernel[(triton.cdiv(ctx.max_seqlen, block_m), num_segments, num_heads)](
            q, k, v, do, dq, lse, delta, cu_seqlens, qk_scale, ctx.sm_scale, total,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1),
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, CAUSAL=ctx.causal, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None, None, None


def flash_attention_triton(q, k, v, cu_seqlens=None, causal=False, max_seqlen=None, sm_scale=None):
    """The Triton path of `flash_attention` (same arguments)."""
    total, num_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != total or k.shape[2] != head_dim or num_heads % k.shape[1]:
        raise ValueError(f"flash_attention needs q (total, Hq, D) and k, v (total, Hkv, D) with Hq a multiple of "
                         f"Hkv; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if head_dim > 256:
        raise ValueError(f"flash_attention supports head_dim up to 256, got {head_dim}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"flash_attention needs q, k, v of one dtype among fp32/bf16/fp16; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=q.device)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if max_seqlen is None:  # one host sync (and a check of cu_seqlens); callers that know it can pass it
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != total or min(lengths, default=0) < 0:
            raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {total}; got {bounds}")
        max_seqlen = max(lengths, default=0)
    if total == 0:
        return q.clone()
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    return _FlashAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), float(sm_scale))


def flash_attention(q, k, v, cu_seqlens=None, causal=False, max_seqlen=None):
    """Packed attention over variable-length segments given by `cu_seqlens` (n+1,) int32; differentiable.
    q (total, Hq, D), k/v (total, Hkv, D). `max_seqlen` (the longest segment) saves the Triton path a host sync."""
    if use_triton(q):
        return flash_attention_triton(q, k, v, cu_seqlens, causal, max_seqlen)
    return attention_torch(q, k, v, cu_seqlens, causal)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x); statistics in fp32, rounded to x's dtype before the weight (as the reference)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK_C: tl.constexpr):
    """One program = one row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(X.dtype.element_ty)  # rounded to x's dtype before the weight, like the reference
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(X, W, DY, DX, RSTD, DW_PARTIAL, stride_x, stride_dy, stride_dx, n_rows, n_cols,
                         rows_per_program, BLOCK_C: tl.constexpr):
    """One program = a run of rows. dx = rstd·(g − x̂·mean(g·x̂)) with g = dy·w and x̂ = x·rstd; the program's
    share of dw = Σ dy·x̂ goes to its own row of DW_PARTIAL, summed over programs afterwards (no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    first = pid * rows_per_program
    x_ptr = X + first.to(tl.int64) * stride_x + cols  # 64-bit row offsets, advanced row by row
    dy_ptr = DY + first.to(tl.int64) * stride_dy + cols
    dx_ptr = DX + first.to(tl.int64) * stride_dx + cols
    for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
        x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)  # the weight saw the rounded x̂
        g = (dy * w).to(X.dtype.element_ty).to(tl.float32)  # the gradient reaching the cast, in x's dtype
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / n_cols))
        tl.store(dx_ptr, dx.to(DX.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _row_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, n_cols = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n_cols)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        if x2.shape[0]:
            _rms_norm_fwd_kernel[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                                 BLOCK_C=block, num_warps=_row_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
        dx = torch.empty_like(x2)
        programs = max(1, _num_programs_for_reduction(x2.device, n_rows))
        dw_partial = torch.zeros(programs, n_cols, dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(n_cols)
        if n_rows:
            _rms_norm_bwd_kernel[(programs,)](x2, weight, dy2, dx, rstd, dw_partial, x2.stride(0), dy2.stride(0),
                                              dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, programs),
                                              BLOCK_C=block, num_warps=_row_warps(block))
        return dx.view(dy.shape), dw_partial.sum(0).to(weight.dtype), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, float(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim (the decoder has four per layer, the ViT two per block)."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


# ---------------------------------------------------------------------------------------------------------------
# The two RoPEs: one fused kernel (paper §2)
# ---------------------------------------------------------------------------------------------------------------


# One build serves the forward and the backward (sin_sign ±1 is a plain float) and a decode step's single token
# (n_tokens and the position stride are not specialised on being 1).
@triton.jit(do_not_specialize=["n_tokens", "stride_pos_row"])
def _rope_kernel(Q, K, Q_OUT, K_OUT, POS, INV_FREQ, n_tokens, sin_sign,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_pos_row, stride_pos_t, section_0, section_1,
                 NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, NUM_POS_ROWS: tl.constexpr,
                 HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                 ROUND_TERMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rotate BLOCK_R rows — (token, head) pairs, all q heads of all tokens first, then all k heads — so q and k
    share one launch. Pair f (of ROTARY_DIM/2) turns by angle pos·inv_freq[f], where pos comes from position row 0
    for f < section_0, row 1 for f < section_0 + section_1 and row 2 beyond. Dims past ROTARY_DIM are copied.
    sin_sign = -1 rotates back (the backward)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n_q_rows = n_tokens * NUM_Q_HEADS
    is_q = rows < n_q_rows
    is_k = (rows >= n_q_rows) & (rows < n_q_rows + n_tokens * NUM_K_HEADS)
    k_rows = rows - n_q_rows
    token = tl.where(is_q, rows // NUM_Q_HEADS, k_rows // NUM_K_HEADS).to(tl.int64)
    head = tl.where(is_q, rows % NUM_Q_HEADS, k_rows % NUM_K_HEADS)
    q_in = Q + token * stride_qt + head * stride_qh  # (BLOCK_R,) row starts
    k_in = K + token * stride_kt + head * stride_kh
    q_out = Q_OUT + rows.to(tl.int64) * HEAD_DIM
    k_out = K_OUT + k_rows.to(tl.int64) * HEAD_DIM

    # angles, computed here from the positions instead of read from cos/sin tables
    f = tl.arange(0, BLOCK_F)
    f_mask = f < ROTARY_DIM // 2
    inv_freq = tl.load(INV_FREQ + f, mask=f_mask, other=0.0)
    row_mask = is_q | is_k
    pos_ptr = POS + token * stride_pos_t
    pos_0 = tl.load(pos_ptr, mask=row_mask, other=0)
    pos_1 = tl.load(pos_ptr + stride_pos_row, mask=row_mask, other=0)
    if NUM_POS_ROWS == 3:
        pos_2 = tl.load(pos_ptr + 2 * stride_pos_row, mask=row_mask, other=0)
    else:  # the ViT's (row, col): no third row, and no frequency uses it
        pos_2 = pos_1
    pos = tl.where(f[None, :] < section_0, pos_0[:, None],
                   tl.where(f[None, :] < section_0 + section_1, pos_1[:, None], pos_2[:, None]))
    angle = pos.to(tl.float32) * inv_freq[None, :]  # (BLOCK_R, BLOCK_F), the same fp32 product as the reference
    cos = tl.cos(angle)
    sin = tl.sin(angle) * sin_sign  # exact: the sign is ±1
    out_dtype = Q_OUT.dtype.element_ty
    if ROUND_TERMS:  # the M-RoPE reference works in the activation dtype: cos/sin and each product are rounded
        cos = cos.to(out_dtype).to(tl.float32)
        sin = sin.to(out_dtype).to(tl.float32)

    if INTERLEAVED:  # M-RoPE pairs (x[2f], x[2f+1])
        dim_a = 2 * f
        dim_b = 2 * f + 1
    else:  # ViT rotate-half pairs (x[f], x[f + D/2])
        dim_a = f
        dim_b = f + ROTARY_DIM // 2
    q_mask = is_q[:, None] & f_mask[None, :]
    k_mask = is_k[:, None] & f_mask[None, :]
    x_a = tl.where(is_q[:, None], tl.load(q_in[:, None] + dim_a[None, :], mask=q_mask, other=0.0),
                   tl.load(k_in[:, None] + dim_a[None, :], mask=k_mask, other=0.0)).to(tl.float32)
    x_b = tl.where(is_q[:, None], tl.load(q_in[:, None] + dim_b[None, :], mask=q_mask, other=0.0),
                   tl.load(k_in[:, None] + dim_b[None, :], mask=k_mask, other=0.0)).to(tl.float32)
    a_cos, b_sin, b_cos, a_sin = x_a * cos, x_b * sin, x_b * cos, x_a * sin
    if ROUND_TERMS:
        a_cos, b_sin = a_cos.to(out_dtype).to(tl.float32), b_sin.to(out_dtype).to(tl.float32)
        b_cos, a_sin = b_cos.to(out_dtype).to(tl.float32), a_sin.to(out_dtype).to(tl.float32)
    out_a = (a_cos - b_sin).to(out_dtype)
    out_b = (b_cos + a_sin).to(out_dtype)
    tl.store(q_out[:, None] + dim_a[None, :], out_a, mask=q_mask)
    tl.store(q_out[:, None] + dim_b[None, :], out_b, mask=q_mask)
    tl.store(k_out[:, None] + dim_a[None, :], out_a, mask=k_mask)
    tl.store(k_out[:, None] + dim_b[None, :], out_b, mask=k_mask)

    if ROTARY_DIM < HEAD_DIM:  # partial rotary: the rest of the head passes through
        d = ROTARY_DIM + tl.arange(0, BLOCK_P)
        d_mask = d < HEAD_DIM
        q_mask = is_q[:, None] & d_mask[None, :]
        k_mask = is_k[:, None] & d_mask[None, :]
        x = tl.where(is_q[:, None], tl.load(q_in[:, None] + d[None, :], mask=q_mask, other=0.0),
                     tl.load(k_in[:, None] + d[None, :], mask=k_mask, other=0.0))
        tl.store(q_out[:, None] + d[None, :], x, mask=q_mask)
        tl.store(k_out[:, None] + d[None, :], x, mask=k_mask)


def rope_tiles(head_dim: int, rotary_dim: int) -> tuple:
    """(BLOCK_R rows, BLOCK_F pairs, BLOCK_P pass-through dims, num_warps) of the RoPE kernel, the same on every
    GPU. About 4 pairs per thread: with 32 (BLOCK_R = 64 and 4 warps, as before) the exact sin/cos took 224-248
    registers at the 9B's head dim on sm_80/sm_90, i.e. few warps per multiprocessor to hide memory latency; with
    8, 47-72 and (fp32) a 4-byte spill; with 4, 34-45 (tests/test_aot.py)."""
    block_f = triton.next_power_of_2(rotary_dim // 2)
    block_p = triton.next_power_of_2(max(head_dim - rotary_dim, 1))
    block_r = max(8, min(128, 1024 // max(block_f, block_p)))
    return block_r, block_f, block_p, 8


def _rope_launch(q, k, positions, inv_freq, sections, interleaved, round_terms, inverse):
    """Rotate q (*S, Hq, D) and k (*S, Hkv, D) in one launch; positions (R, n_tokens) with R = 2 or 3 rows."""
    head_dim = q.shape[-1]
    rotary_dim = 2 * inv_freq.numel()
    q3 = q.reshape(-1, q.shape[-2], head_dim)
    k3 = k.reshape(-1, k.shape[-2], head_dim)
    q3, k3 = (x if x.stride(-1) == 1 else x.contiguous() for x in (q3, k3))
    n_tokens, num_q_heads, num_k_heads = q3.shape[0], q3.shape[1], k3.shape[1]
    q_out, k_out = torch.empty(q3.shape, dtype=q.dtype, device=q.device), torch.empty(k3.shape, dtype=k.dtype,
                                                                                      device=k.device)
    block_r, block_f, block_p, warps = rope_tiles(head_dim, rotary_dim)
    n_rows = n_tokens * (num_q_heads + num_k_heads)
    if n_rows:
        _rope_kernel[(triton.cdiv(n_rows, block_r),)](
            q3, k3, q_out, k_out, positions, inv_freq, n_tokens, -1.0 if inverse else 1.0,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), positions.stride(0), positions.stride(1),
            sections[0], sections[1],
            NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, NUM_POS_ROWS=positions.shape[0],
            HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim,
            INTERLEAVED=interleaved, ROUND_TERMS=round_terms,
            BLOCK_R=block_r, BLOCK_F=block_f, BLOCK_P=block_p, num_warps=warps)
    return q_out.view(q.shape), k_out.view(k.shape)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, inv_freq, sections, interleaved, round_terms):
        ctx.save_for_backward(positions, inv_freq)
        ctx.config = (sections, interleaved, round_terms)
        return _rope_launch(q, k, positions, inv_freq, sections, interleaved, round_terms, inverse=False)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _rope_launch(dq_out, dk_out, positions, inv_freq, *ctx.config, inverse=True)
        return dq, dk, None, None, None, None, None


@functools.lru_cache(maxsize=None)  # a few floats per (dim, theta, device), never written
def _vision_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """(head_dim/2,): the head_dim/4 frequencies of rope2d.vision_rope_cos_sin, once for rows and once for cols."""
    with torch.inference_mode(False):  # cached: a first call during generation must not leave an inference tensor
        inv_freq = rope2d.vision_inv_freq(head_dim, theta, device)
        return torch.cat([inv_freq, inv_freq])


@functools.lru_cache(maxsize=None)  # a few floats per (dim, theta, device), never written
def _mrope_inv_freq(rotary_dim: int, theta: float, device) -> torch.Tensor:
    """(rotary_dim/2,): the frequencies of rope2d.mrope_cos_sin."""
    with torch.inference_mode(False):
        return rope2d.mrope_inv_freq(rotary_dim, theta, device)


def rope_vision_torch(q, k, coords, theta=10000.0):
    cos, sin = rope2d.vision_rope_cos_sin(coords, q.shape[-1], theta)
    return rope2d.apply_rope_vision(q, k, cos, sin)


def rope_vision_triton(q, k, coords, theta=10000.0):
    head_dim = q.shape[-1]
    if head_dim % 4:
        raise ValueError(f"vision 2D-RoPE needs head_dim divisible by 4, got {head_dim}")
    sections = (head_dim // 4, head_dim // 4)  # frequencies [0, D/4) turn with the row, [D/4, D/2) with the col
    return _Rope.apply(q, k, coords.T, _vision_inv_freq(head_dim, theta, q.device), sections, False, False)


def rope_vision_setup(coords, head_dim: int, theta: float = 10000.0) -> dict:
    """What every ViT block's 2D-RoPE shares, made once per forward: the patch coords for the Triton kernel (it
    computes cos/sin in registers), plus the cos/sin tables when the torch path will run."""
    rope = dict(coords=coords, theta=theta)
    if not use_triton(coords):
        rope["cos"], rope["sin"] = rope2d.vision_rope_cos_sin(coords, head_dim, theta)
    return rope


def rope_vision(q, k, rope: dict):
    """Vision 2D-RoPE for q, k (N, H, D), `rope` from rope_vision_setup."""
    if "cos" not in rope:
        return rope_vision_triton(q, k, rope["coords"], rope["theta"])
    return rope2d.apply_rope_vision(q, k, rope["cos"], rope["sin"])


def mrope_torch(q, k, position_ids, rotary_dim, mrope_section, theta=10000.0):
    cos, sin = rope2d.mrope_cos_sin(position_ids, rotary_dim, mrope_section, theta, dtype=q.dtype)
    return rope2d.apply_mrope(q, k, cos, sin)


def mrope_triton(q, k, position_ids, rotary_dim, mrope_section, theta=10000.0):
    if sum(mrope_section) != rotary_dim // 2 or len(mrope_section) != 3:
        raise ValueError(f"mrope_section {tuple(mrope_section)} must be 3 numbers summing to {rotary_dim // 2}")
    if rotary_dim % 2 or rotary_dim > q.shape[-1]:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {q.shape[-1]}")
    positions = position_ids.reshape(3, -1)  # (3, n_tokens), tokens in the order of q.reshape(-1, H, D)
    return _Rope.apply(q, k, positions, _mrope_inv_freq(rotary_dim, theta, q.device), tuple(mrope_section[:2]),
                       True, True)


def mrope_setup(position_ids, rotary_dim: int, mrope_section, theta: float = 10000.0) -> dict:
    """What every decoder layer's M-RoPE shares, made once per forward: the positions (3, *S) for the Triton kernel
    (it computes cos/sin in registers), plus fp32 cos/sin tables when the torch path will run — building those
    once instead of once per layer is most of a CPU decode step's RoPE cost."""
    rope = dict(position_ids=position_ids, rotary_dim=rotary_dim, mrope_section=tuple(mrope_section), theta=theta)
    if not use_triton(position_ids):
        rope["cos"], rope["sin"] = rope2d.mrope_cos_sin(position_ids, rotary_dim, mrope_section, theta)
    return rope


def mrope(q, k, rope: dict):
    """Text 3D M-RoPE for q, k (*S, H, D), `rope` from mrope_setup. Like the reference, the tables are rounded to
    the activation dtype before they multiply."""
    if "cos" not in rope:
        return mrope_triton(q, k, rope["position_ids"], rope["rotary_dim"], rope["mrope_section"], rope["theta"])
    return rope2d.apply_mrope(q, k, rope["cos"].to(q.dtype), rope["sin"].to(q.dtype))
