"""The few operations where speed lives: packed attention, the two RoPEs and RMSNorm.

Each operation has a plain-PyTorch version (the readable reference) and, on CUDA, a Triton kernel that must
give the same numbers. `GLM4V_KERNELS=torch|triton` picks the implementation the model uses
(default: triton on CUDA, torch elsewhere).
"""
import os

import torch
import torch.nn.functional as F

import rope2d


def use_triton(x: torch.Tensor) -> bool:
    choice = os.environ.get("GLM4V_KERNELS", "").lower()
    if choice not in ("", "torch", "triton"):
        raise ValueError(f"GLM4V_KERNELS must be 'torch' or 'triton', not {choice!r}")
    if choice == "triton":
        return True
    return choice == "" and x.is_cuda


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


def flash_attention(q, k, v, cu_seqlens=None, causal=False):
    """Packed attention over variable-length segments given by `cu_seqlens` (n+1,) int32; differentiable."""
    return attention_torch(q, k, v, cu_seqlens, causal)


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm and the two RoPEs
# ---------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x); statistics in fp32, rounded to x's dtype before the weight (as the reference)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_vision(q, k, coords, theta=10000.0):
    """Vision 2D-RoPE for q, k (N, H, D) at patch coords (N, 2)."""
    cos, sin = rope2d.vision_rope_cos_sin(coords, q.shape[-1], theta)
    return rope2d.apply_rope_vision(q, k, cos, sin)


def mrope(q, k, position_ids, rotary_dim, mrope_section, theta=10000.0):
    """Text 3D M-RoPE for q, k (*S, H, D) at positions (3, *S)."""
    cos, sin = rope2d.mrope_cos_sin(position_ids, rotary_dim, mrope_section, theta, dtype=q.dtype)
    return rope2d.apply_mrope(q, k, cos, sin)
