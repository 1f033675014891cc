"""Every Triton kernel against its plain-PyTorch reference, forward and gradients, and the whole model on both.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (fp32, small shapes). The interpreter must
be switched on before triton is imported, so this module sets TRITON_INTERPRET=1 first thing; if another test
module imported triton earlier in this pytest process (torch._dynamo does, e.g. through transformers), the tests
here are skipped and `test_in_fresh_process` runs this file again in a new process. With a GPU the same tests
run the compiled kernels on CUDA tensors, and a few more check bf16.
"""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede `import triton` (inside kernels)

pytest.importorskip("triton", reason="Triton has wheels for Linux only; the model runs without it (test_model)")
import kernels  # noqa: E402
import model as M  # noqa: E402
import reference as R  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"
RUN_HERE = DEVICE == "cuda" or kernels.INTERPRETED
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def triton_usable_here(request):
    if not RUN_HERE and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; test_in_fresh_process runs this file")


@pytest.mark.skipif(RUN_HERE, reason="the kernel tests run in this process")
def test_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def assert_close(ours, ref, tol=1e-4, what=""):
    """|ours − ref| ≤ tol, relative to the reference's scale when that is above 1."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (what, ours.shape, ref.shape, ours.dtype, ref.dtype)
    scale = max(ref.abs().max().item(), 1.0) if ref.numel() else 1.0
    err = (ours.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def grads(outputs, inputs, seed=0):
    """Gradients of a fixed random projection of `outputs` with respect to `inputs`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_()


def cu_seqlens_of(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


# ---------------------------------------------------------------------------------------------------------------
# Packed attention
# ---------------------------------------------------------------------------------------------------------------

ATTENTION_CASES = {  # segment lengths, Hq, Hkv, head_dim
    "odd_lengths_gqa2_hd24": ([1, 37, 5, 64], 4, 2, 24),
    "one_segment_mha_hd64": ([70], 3, 3, 64),
    "gqa4_hd40_len1": ([17, 1, 33], 4, 1, 40),
    "empty_segment_gqa3_hd16": ([3, 0, 20], 3, 1, 16),
    "hd160_not_pow2": ([9, 26], 2, 1, 160),
    "gqa8_group_split_in_dkdv": ([33, 34], 8, 1, 16),  # the dK/dV kernel splits the 8 heads over 4 programs
}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_attention_matches_torch(case, causal):
    lengths, hq, hkv, d = ATTENTION_CASES[case]
    total = sum(lengths)
    q, k, v = randn(total, hq, d, seed=1), randn(total, hkv, d, seed=2), randn(total, hkv, d, seed=3)
    cu = cu_seqlens_of(lengths)
    out = kernels.flash_attention_triton(q, k, v, cu, causal)
    assert type(out.grad_fn).__name__.startswith("_FlashAttention")
    ref = kernels.attention_torch(q, k, v, cu, causal)
    assert_close(out, ref, what="output")
    for name, a, b in zip("qkv", grads([out], (q, k, v)), grads([ref], (q, k, v))):
        assert_close(a, b, what=f"d{name}")


def test_flash_attention_strided_inputs_and_default_segments():
    """The ViT hands over q, k, v as views of one qkv projection; no cu_seqlens means one segment."""
    n, h, d = 45, 2, 32
    qkv = randn(n, 3 * h * d, seed=4)
    q, k, v = qkv.view(n, 3, h, d).unbind(1)
    out = kernels.flash_attention_triton(q, k, v)
    ref = kernels.attention_torch(q, k, v)
    assert_close(out, ref, what="output")
    assert_close(grads([out], qkv)[0], grads([ref], qkv)[0], what="dqkv")


def test_flash_attention_rejects_bad_inputs():
    q, k = randn(10, 4, 16), randn(10, 3, 16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernels.flash_attention_triton(q, k, k)
    k = randn(10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.flash_attention_triton(q, k, k, cu_seqlens_of([4, 4]))
    with pytest.raises(ValueError, match="head_dim up to 256"):
        kernels.flash_attention_triton(randn(4, 1, 288), randn(4, 1, 288), randn(4, 1, 288))


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7, 40), (3, 1000), (1, 64), (130, 24)])
def test_rms_norm_matches_torch(shape):
    x = randn(*shape, seed=5)
    w = (1 + 0.1 * randn(shape[-1], seed=6)).detach().requires_grad_()
    out = kernels.rms_norm_triton(x, w, 1e-5)
    ref = kernels.rms_norm_torch(x, w, 1e-5)
    assert_close(out, ref, what="output")
    for name, a, b in zip(("dx", "dw"), grads([out], (x, w)), grads([ref], (x, w))):
        assert_close(a, b, what=name)


# ---------------------------------------------------------------------------------------------------------------
# The two RoPEs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,h,d", [(37, 3, 24), (64, 2, 64), (10, 1, 40)])
def test_rope_vision_matches_torch(n, h, d):
    qkv = randn(n, 3 * h * d, seed=7)
    q, k, _ = qkv.view(n, 3, h, d).unbind(1)  # strided, as in vision.py
    coords = torch.randint(0, 60, (n, 2), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = kernels.rope_vision_triton(q, k, coords, 10000.0)
    ref = kernels.rope_vision_torch(q, k, coords, 10000.0)
    for a, b, name in zip(out, ref, "qk"):
        assert_close(a, b, what=name)
    assert_close(grads(out, qkv)[0], grads(ref, qkv)[0], what="dqkv")
    # only q reaches the loss: the backward must still work
    out = kernels.rope_vision_triton(q, k, coords, 10000.0)
    ref = kernels.rope_vision_torch(q, k, coords, 10000.0)
    assert_close(grads(out[:1], qkv)[0], grads(ref[:1], qkv)[0], what="dqkv (q only)")


MROPE_CASES = {  # *S, Hq, Hkv, head_dim, rotary_dim, mrope_section, theta
    "packed_hd40_partial": ((29,), 4, 2, 40, 20, (2, 4, 4), 10000.0),
    "batched_hd64_gqa4": ((2, 13), 4, 1, 64, 32, (4, 6, 6), 10000.0),
    "full_rotary_hd24": ((7,), 3, 1, 24, 24, (4, 4, 4), 500.0),
    "glm_9b_head": ((9,), 2, 1, 128, 64, (8, 12, 12), 10000.0),
}


@pytest.mark.parametrize("case", list(MROPE_CASES))
def test_mrope_matches_torch(case):
    shape, hq, hkv, d, rotary_dim, section, theta = MROPE_CASES[case]
    q, k = randn(*shape, hq, d, seed=8), randn(*shape, hkv, d, seed=9)
    # positions up to 60k (long contexts): the kernel's angles must be the reference's fp32 products
    positions = torch.randint(0, 60000, (3, *shape), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = kernels.mrope_triton(q, k, positions, rotary_dim, section, theta)
    assert type(out[0].grad_fn).__name__.startswith("_Rope")
    ref = kernels.mrope_torch(q, k, positions, rotary_dim, section, theta)
    for a, b, name in zip(out, ref, "qk"):
        assert_close(a, b, what=name)
    for a, b, name in zip(grads(out, (q, k)), grads(ref, (q, k)), ("dq", "dk")):
        assert_close(a, b, what=name)


def test_ropes_train_after_a_first_call_in_inference_mode():
    """Generation (inference_mode) then training in one process, as in RL: the cached frequencies must not be
    inference tensors. A theta no other test uses makes this the first call for its cache entry."""
    q, k = randn(6, 2, 16), randn(6, 1, 16)
    positions, coords = torch.zeros(3, 6, dtype=torch.long, device=DEVICE), torch.zeros(6, 2, dtype=torch.long,
                                                                                         device=DEVICE)
    with torch.inference_mode():
        kernels.mrope_triton(q, k, positions, 8, (1, 1, 2), 1234.5)
        kernels.rope_vision_triton(q, k, coords, 1234.5)
    assert grads(kernels.mrope_triton(q, k, positions, 8, (1, 1, 2), 1234.5), (q,))[0].shape == q.shape
    assert grads(kernels.rope_vision_triton(q, k, coords, 1234.5), (q,))[0].shape == q.shape


def test_mrope_rejects_bad_sections():
    q = randn(4, 2, 16)
    with pytest.raises(ValueError, match="mrope_section"):
        kernels.mrope_triton(q, q, torch.zeros(3, 4, dtype=torch.long, device=DEVICE), 8, (1, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Dispatch and the whole model
# ---------------------------------------------------------------------------------------------------------------


def test_dispatch_follows_glm4v_kernels(monkeypatch):
    x = randn(3, 8)
    monkeypatch.setenv("GLM4V_KERNELS", "triton")
    assert kernels.use_triton(x)
    assert type(kernels.rms_norm(x, torch.ones(8, device=DEVICE), 1e-5).grad_fn).__name__.startswith("_RMSNorm")
    monkeypatch.setenv("GLM4V_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.delenv("GLM4V_KERNELS")
    assert kernels.use_triton(x) == x.is_cuda  # default: triton on CUDA, torch elsewhere
    monkeypatch.setenv("GLM4V_KERNELS", "cuda")
    with pytest.raises(ValueError, match="GLM4V_KERNELS"):
        kernels.use_triton(x)
    monkeypatch.setenv("GLM4V_KERNELS", "triton")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kernels.use_triton(torch.zeros(1))


def test_whole_model_triton_matches_torch(monkeypatch):
    """Logits and every parameter's gradient of a (shrunk) tiny GLM4V, with an image and a padded batch, on both
    kernel paths, and with activation checkpointing on the Triton path."""
    cfg = dataclasses.replace(M.PRESETS["tiny"], num_hidden_layers=2, vision_depth=2)
    torch.manual_seed(0)
    model = R.random_weights_(M.GLM4V(cfg), seed=0).to(DEVICE)
    grid = torch.tensor([[1, 6, 10]])
    rows = [list(b"Look: ") + R.image_tokens(cfg, 1, 6, 10) + list(b" what is it?"), list(b"no image here")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [cfg.pad_token_id] * (width - len(r)) for r in rows], device=DEVICE)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=DEVICE)
    pixels = R.patches(cfg, grid).to(DEVICE)
    projection = torch.randn(2, width, cfg.vocab_size, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(which, checkpointing=False):
        monkeypatch.setenv("GLM4V_KERNELS", which)
        for module in model.modules():  # recompute layers/blocks in the backward (the kernels run twice)
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)
        (logits * projection).sum().backward()
        return logits.detach(), {name: p.grad for name, p in model.named_parameters()}

    ref_logits, grads_torch = run("torch")
    for checkpointing in (False, True):
        logits, grads_triton = run("triton", checkpointing)
        assert_close(logits, ref_logits, what="logits")
        for name, ref in grads_torch.items():
            assert ref is not None and grads_triton[name] is not None, name
            assert_close(grads_triton[name], ref, what=f"grad {name} (checkpointing={checkpointing})")


# ---------------------------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter truncates fp32 -> bf16 instead of rounding, so bf16 is checked on the GPU)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_bf16_kernels_on_gpu():
    q, k, v = randn(300, 8, 128, dtype=torch.bfloat16), randn(300, 2, 128, dtype=torch.bfloat16, seed=1), \
        randn(300, 2, 128, dtype=torch.bfloat16, seed=2)
    cu = cu_seqlens_of([100, 1, 199])
    for causal in (False, True):
        out = kernels.flash_attention_triton(q, k, v, cu, causal)
        ref = kernels.attention_torch(q, k, v, cu, causal)
        assert_close(out, ref, tol=2e-2, what="bf16 attention")
        for a, b in zip(grads([out], (q, k, v)), grads([ref], (q, k, v))):
            assert_close(a, b, tol=5e-2, what="bf16 attention grads")
    x, w = randn(64, 4096, dtype=torch.bfloat16), randn(4096, dtype=torch.bfloat16, seed=3)
    assert_close(kernels.rms_norm_triton(x, w, 1e-5), kernels.rms_norm_torch(x, w, 1e-5), tol=1e-2, what="rmsnorm")
    positions = torch.randint(0, 4000, (3, 300), device=DEVICE)
    out = kernels.mrope_triton(q, k, positions, 64, (8, 12, 12))
    ref = kernels.mrope_torch(q, k, positions, 64, (8, 12, 12))
    for a, b in zip(out, ref):
        assert (a == b).float().mean() > 0.99  # same roundings as the eager bf16 reference
