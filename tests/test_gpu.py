"""The GPU suite: `pytest -m gpu` on a machine with CUDA (a few minutes on one H100/H200; skipped without a GPU).

bf16 is checked the way FlashAttention's tests check it: against an fp32 ground truth, our bf16 error may be at
most a small multiple of the error of the torch path run in bf16 (the peer), plus a floor. The interpreter
(the CPU suite) runs the kernels in fp32 only, so this is where bf16, the compiled kernels and CUDA graphs are
checked:
- every kernel (packed attention forward and backward for the text decoder and the ViT at the tiny and 9B head
  dims, RMSNorm, M-RoPE, vision 2D-RoPE) against its torch reference;
- the whole model's logits (9B widths, 2 decoder layers, 2 ViT blocks, one image, a padded batch);
- greedy decoding with the CUDA-graphed decode step against the eager one;
- the ViT's packed attention on images of mixed sizes against one image at a time;
- one FSDP2 training step on 2 GPUs against 1 (when two exist).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import kernels
import model as M
import reference as R
import sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU suite: pytest -m gpu)"),
    pytest.mark.skipif(kernels.INTERPRETED, reason="TRITON_INTERPRET is set: the compiled kernels do not run"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda"


def error(x, truth) -> float:
    """max |x − truth| relative to truth's scale (when above 1)."""
    truth = truth.float()
    return (x.float() - truth).abs().max().item() / max(truth.abs().max().item(), 1.0)


# bench.py --gpu sets this: each comparison's errors are appended there (JSON lines) for its table
REPORT = os.environ.get("GLM4V_GPU_REPORT")


def assert_like_peer(ours, peer, truth, what, factor=2.0, floor=1e-3):
    """Our error against the fp32 truth is at most `factor` × the peer's (the torch path in the same dtype)."""
    ours_err, peer_err = error(ours, truth), error(peer, truth)
    if REPORT:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(REPORT, "a") as f:
            f.write(json.dumps(dict(test=test, what=what, ours=ours_err, peer=peer_err, factor=factor,
                                    floor=floor)) + "\n")
    assert ours_err <= factor * peer_err + floor, f"{what}: ours {ours_err:.3g}, torch {peer_err:.3g} (vs fp32)"
    return ours_err, peer_err


def randn(*shape, seed, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (scale * torch.randn(*shape, device=DEVICE, generator=g)).to(dtype)


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def value_and_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of <fn(*inputs), grad_out> with respect to the inputs."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, inputs, grad_out if isinstance(grad_out, tuple) else (grad_out,))
    return outs, grads


def compare(triton_fn, torch_fn, inputs, grad_out, what, factor=2.0, floor=1e-3):
    """Triton in bf16 vs torch in bf16, both against torch in fp32: outputs and input gradients."""
    ours = value_and_grads(triton_fn, inputs, grad_out)
    peer = value_and_grads(torch_fn, inputs, grad_out)
    to32 = lambda xs: tuple(x.float() for x in xs)  # noqa: E731
    truth = value_and_grads(torch_fn, to32(inputs), to32(grad_out if isinstance(grad_out, tuple) else (grad_out,)))
    for part, (a, b, c) in (("out", (ours[0], peer[0], truth[0])), ("grad", (ours[1], peer[1], truth[1]))):
        for i, (x, y, z) in enumerate(zip(a, b, c)):
            assert_like_peer(x, y, z, f"{what} {part}[{i}]", factor, floor)


# ---------------------------------------------------------------------------------------------------------------
# Every kernel in bf16
# ---------------------------------------------------------------------------------------------------------------

ATTENTION = {  # segment lengths, Hq, Hkv, head_dim, causal
    "9b_text": ([700, 1, 2048, 333], 32, 2, 128, True),
    "9b_vit": ([1024, 640, 588, 4096, 64], 12, 12, 128, False),
    "tiny_text": ([500, 1037], 4, 2, 64, True),
    "tiny_vit": ([256, 100, 784], 3, 3, 64, False),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_bf16(case):
    lengths, hq, hkv, d, causal = ATTENTION[case]
    n, cu = sum(lengths), cu_seqlens_of(lengths)
    q, k, v = randn(n, hq, d, seed=1), randn(n, hkv, d, seed=2), randn(n, hkv, d, seed=3)
    do = randn(n, hq, d, seed=4)
    compare(lambda q, k, v: kernels.flash_attention_triton(q, k, v, cu, causal, max(lengths)),
            lambda q, k, v: kernels.attention_torch(q, k, v, cu, causal), (q, k, v), do, f"attention {case}")


@pytest.mark.parametrize("rows,cols", [(4096, 4096), (2252, 1536), (300, 256)])
def test_rms_norm_bf16(rows, cols):
    x, w = randn(rows, cols, seed=5), randn(cols, seed=6, scale=0.1) + 1
    compare(lambda x, w: kernels.rms_norm_triton(x, w, 1e-5), lambda x, w: kernels.rms_norm_torch(x, w, 1e-5),
            (x, w), randn(rows, cols, seed=7), f"RMSNorm {rows}x{cols}")


def test_mrope_bf16():
    n, section = 4000, (8, 12, 12)
    q, k = randn(n, 32, 128, seed=8), randn(n, 2, 128, seed=9)
    positions = torch.randint(0, 60000, (3, n), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    ours = kernels.mrope_triton(q, k, positions, 64, section)
    peer = kernels.mrope_torch(q, k, positions, 64, section)
    for a, b in zip(ours, peer):  # the kernel rounds where the eager bf16 reference rounds
        assert (a == b).float().mean() > 0.99
    compare(lambda q, k: kernels.mrope_triton(q, k, positions, 64, section),
            lambda q, k: kernels.mrope_torch(q, k, positions, 64, section), (q, k),
            (randn(n, 32, 128, seed=10), randn(n, 2, 128, seed=11)), "M-RoPE")


def test_rope_vision_bf16():
    n = 2252
    qkv = randn(n, 3 * 12 * 128, seed=12)
    coords = torch.randint(0, 64, (n, 2), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    split = lambda qkv: qkv.view(n, 3, 12, 128).unbind(1)[:2]  # noqa: E731  (strided views, as in vision.py)
    compare(lambda qkv: kernels.rope_vision_triton(*split(qkv), coords),
            lambda qkv: kernels.rope_vision_torch(*split(qkv), coords), (qkv,),
            (randn(n, 12, 128, seed=13), randn(n, 12, 128, seed=14)), "vision RoPE")


# ---------------------------------------------------------------------------------------------------------------
# The whole model, decoding, the ViT, FSDP2
# ---------------------------------------------------------------------------------------------------------------

def small_9b():
    """The 9B's widths, head dims and vocabulary, 2 decoder layers and 2 ViT blocks, random weights, on the GPU."""
    cfg = dataclasses.replace(M.PRESETS["9b"], num_hidden_layers=2, vision_depth=2)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = M.GLM4V(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layernorm" in name):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p))
    return model.eval()


def test_model_logits_bf16(monkeypatch):
    """Logits of one image + text and a padded text row: the Triton path in bf16 is as close to fp32 as the torch
    path in bf16."""
    model = small_9b()
    cfg = model.cfg
    grid = torch.tensor([[1, 16, 24]])
    rows = [list(range(1000, 1050)) + R.image_tokens(cfg, 1, 16, 24) + list(range(2000, 2100)),
            list(range(3000, 3200))]
    width = max(map(len, rows))
    ids = torch.tensor([r + [cfg.pad_token_id] * (width - len(r)) for r in rows], device=DEVICE)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=DEVICE)
    pixels = R.patches(cfg, grid).to(DEVICE)

    def logits(kernel_path, dtype):
        monkeypatch.setenv("GLM4V_KERNELS", kernel_path)
        with torch.no_grad():
            return model.to(dtype)(ids, attention_mask=mask, pixel_values=pixels.to(dtype),
                                   image_grid_thw=grid)[mask.bool()].float()

    truth = logits("torch", torch.float32)
    peer = logits("torch", torch.bfloat16)
    ours = logits("triton", torch.bfloat16)
    assert_like_peer(ours, peer, truth, "logits", factor=1.5)


def test_decode_with_cuda_graphs_matches_eager():
    """Greedy decoding of the tiny preset (fp32, random weights): the compiled, CUDA-graphed decode step gives the
    eager step's tokens and log-probs."""
    cfg = M.PRESETS["tiny"]
    model = R.random_weights_(M.GLM4V(cfg), seed=0).to(DEVICE).eval()
    ids = torch.tensor([list(b"Describe the image:"), list(b"What is 3 + 4? ....")], device=DEVICE)  # 19 each
    eager, eager_lp = sample.generate(model, ids, 48, compile=False, return_logprobs=True)
    graphed, graphed_lp = sample.generate(model, ids, 48, compile=True, return_logprobs=True)
    assert torch.equal(graphed, eager)
    torch.testing.assert_close(graphed_lp, eager_lp, atol=1e-3, rtol=1e-3)


def test_vit_packed_mixed_sizes_matches_one_image_at_a_time(monkeypatch):
    """Five images of different shapes encoded in one packed call (Triton, bf16) against each image alone (torch):
    as close to the fp32 truth as the torch path in bf16."""
    visual = small_9b().model.visual
    grids = torch.tensor([[1, 32, 32], [1, 16, 40], [1, 14, 42], [1, 64, 64], [1, 2, 2]])
    pixels = R.patches(visual.cfg, grids).to(DEVICE)
    sizes = grids.prod(-1).tolist()

    def encode(kernel_path, dtype, packed):
        monkeypatch.setenv("GLM4V_KERNELS", kernel_path)
        v, x = visual.to(dtype), pixels.to(dtype)
        with torch.no_grad():
            if packed:
                return v.encode(x, grids.to(DEVICE))
            return torch.cat([v.encode(p, g[None].to(DEVICE)) for p, g in zip(x.split(sizes), grids)])

    truth = encode("torch", torch.float32, packed=False)
    assert_like_peer(encode("triton", torch.bfloat16, packed=True), encode("torch", torch.bfloat16, packed=False),
                     truth, "ViT features")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp2_step_on_two_gpus_matches_one(tmp_path):
    """The trainer on 2 GPUs (FSDP2, nccl, bf16 parameters) against 1 GPU (bf16 autocast): the same losses within
    bf16 rounding."""
    flags = ["--tiny", "--seq-len", "256", "--global-batch", "4", "--max-steps", "3"]
    env = {**os.environ, "PYTHONPATH": ROOT}

    def run(out, nproc):
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
        result = subprocess.run([*launcher, "pretrain.py", *flags, "--out", str(out)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        with open(out / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 2e-2 * abs(a), (one, two)
