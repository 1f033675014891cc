"""Benchmarks: every speed or memory claim of this repository, each a ratio against a peer measured in the same run.

    python bench.py                 # CPU suite (a few minutes on 2 cores)
    python bench.py --gpu           # the GPU suite (needs CUDA), ending with the `pytest -m gpu` checks as rows
    python bench.py --only vision   # one section (vision, kernels, train, sample, quantize, rlcs, data, rewards)

The peer is usually the reference implementation in `transformers` (a test-only dependency, imported lazily here
and nowhere else in the project), or the plain-PyTorch path of the same operation. Every section measures with
the one timer below and reports rows of one format; the vision and training cases run in a fresh subprocess each,
so that peak memory is their own.
"""
import argparse
import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------------------------
# Measuring: one timer, one peak-memory probe, one row format
# ---------------------------------------------------------------------------------------------------------------


def timed(fn, device, repeats: int = 3, warmup: bool = True, grad_to_none=()) -> float:
    """Median seconds of `repeats` calls of fn() (after one warm-up call unless warmup=False), synchronised on CUDA.
    The .grad of `grad_to_none` is cleared before each call, so a backward writes its gradients afresh."""
    device = torch.device(device)
    times = []
    for k in range(repeats + int(warmup)):
        for x in grad_to_none:
            x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= int(warmup):
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory(fn, device) -> int:
    """Bytes fn() allocates at its peak beyond what was live before: CUDA's allocator statistics, or on a CPU the
    growth of the process's peak RSS (meaningful only in a fresh process, which is how the cases below run)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def hbm_bandwidth(device) -> float:
    """The GPU memory's nominal bandwidth in bytes/s (two transfers per clock over the bus width); 0 on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def row(name: str, ours, peer=None, ratio=None, units: str = "", **numbers) -> dict:
    """One line of the table: what was measured, our figure, the peer's, their ratio (above 1: we are better), the
    units; the numbers behind display strings ride along (printed with --json)."""
    return dict(name=name, ours=ours, peer=peer, ratio=ratio, units=units, **numbers)


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def in_subprocess(case: str, args) -> dict:
    """Run one case in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--case", case, "--device", args.device,
           "--vision-depth", str(args.vision_depth), "--train-depth", str(args.train_depth),
           "--repeats", str(args.repeats)]
    # Large CPU buffers go straight to mmap and back to the OS on free, so RSS follows live tensors (glibc's
    # default raises the threshold after frees and then keeps freed buffers resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench case {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_thread(fn):
    """Run fn() with one CPU thread: thousands of tiny ops are faster and steadier that way on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Vision encoder: 8 mixed-size images in one batch
# ---------------------------------------------------------------------------------------------------------------

# (height, width) in pixels, from 224² to 1344×336 — every image a different shape, as in real multi-image prompts
VISION_IMAGES = [(224, 224), (336, 336), (448, 448), (1344, 336), (336, 1344), (672, 448), (280, 560), (896, 224)]


def vision_case(impl: str, device: str, depth: int, repeats: int) -> dict:
    import model as M

    cfg = dataclasses.replace(M.PRESETS["9b"], vision_depth=depth)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    grid = torch.tensor([[1, h // 14, w // 14] for h, w in VISION_IMAGES])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device=device, dtype=dtype)
    with torch.device(device):
        if impl == "ours":
            encoder = M.VisionModel(cfg)
            run = lambda: encoder(pixels, grid)  # noqa: E731
        else:  # the transformers reference, with its own default (sdpa) or eager attention
            import transformers

            hf_cfg = transformers.Glm4vConfig(**cfg.to_hf()).vision_config
            hf_cfg._attn_implementation = impl.split("-")[1]
            encoder = transformers.models.glm4v.modeling_glm4v.Glm4vVisionModel(hf_cfg)
            run = lambda: encoder(pixels, grid_thw=grid.to(device))  # noqa: E731
    encoder = encoder.to(dtype).eval()
    run = no_grad(run)
    peak = peak_memory(run, device)  # also the warm-up
    return {"seconds": timed(run, device, repeats, warmup=False), "peak_bytes": peak, "patches": pixels.shape[0]}


def bench_vision(args) -> list:
    ours = in_subprocess("vision-ours", args)
    rows = []
    for peer in ("reference-sdpa", "reference-eager"):
        ref = in_subprocess(f"vision-{peer}", args)
        rows.append(row(f"vision encoder fwd, 8 images ({ours['patches']} patches, depth {args.vision_depth}) vs "
                        f"{peer}", f"{ours['seconds'] * 1e3:.0f} ms, {ours['peak_bytes'] / 2 ** 20:.0f} MiB",
                        f"{ref['seconds'] * 1e3:.0f} ms, {ref['peak_bytes'] / 2 ** 20:.0f} MiB",
                        f"{ref['seconds'] / ours['seconds']:.2f}x faster, "
                        f"{ours['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x memory"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Kernels (GPU): each Triton kernel against its peer on the same GPU
# ---------------------------------------------------------------------------------------------------------------


def kernel_row(name, ours_s, peer_s, peer_name, goal, ours_extra="", peer_extra="", ratio_extra="", **numbers):
    speedup = peer_s / ours_s
    return row(name, f"{ours_s * 1e3:.3f} ms{ours_extra}", f"{peer_s * 1e3:.3f} ms{peer_extra} ({peer_name})",
               f"{speedup:.2f}x{ratio_extra} (goal: {goal})", "ms", ours_ms=ours_s * 1e3, peer_ms=peer_s * 1e3,
               speedup=speedup, peer_name=peer_name, goal=goal, **numbers)


def sdpa_backends(device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    return {"sdpa-math": SDPBackend.MATH}


def sdpa(q, k, v, causal, backend):
    """scaled_dot_product_attention on (B, H, T, D) with one backend; GQA natively, else by repeating k and v."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        except RuntimeError:  # this backend has no native GQA
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def causal_attention_rows(device, dtype, batch, num_heads, num_kv_heads, head_dim, seq_lens, repeats) -> list:
    """Causal GQA attention, forward and backward, against the fastest of scaled_dot_product_attention's flash and
    cuDNN backends; TFLOP/s with the standard count 4·B·H·T²·D (halved for causal; backward 2.5× forward)."""
    import kernels

    rows = []
    for T in seq_lens:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, num_heads, T, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
        k = torch.randn(batch, num_kv_heads, T, head_dim, device=device, dtype=dtype, generator=g,
                        requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        do = torch.randn_like(q)
        # ours takes the batch packed: (B·T, H, D) with segment bounds
        qp, kp, vp = (x.detach().transpose(1, 2).reshape(-1, x.shape[1], head_dim).requires_grad_() for x in (q, k, v))
        dop = do.transpose(1, 2).reshape(-1, num_heads, head_dim)
        cu = torch.arange(0, (batch + 1) * T, T, dtype=torch.int32, device=device)

        def ours():
            return kernels.flash_attention_triton(qp, kp, vp, cu, causal=True, max_seqlen=T)

        out = ours()
        ours_s = (timed(no_grad(ours), device, repeats),
                  timed(lambda: out.backward(dop, retain_graph=True), device, repeats, grad_to_none=(qp, kp, vp)))
        peers = {}
        for peer_name, backend in sdpa_backends(device).items():
            try:
                fwd = timed(no_grad(lambda: sdpa(q, k, v, True, backend)), device, repeats)
                out_peer = sdpa(q, k, v, True, backend)
                bwd = timed(lambda: out_peer.backward(do, retain_graph=True), device, repeats, grad_to_none=(q, k, v))
            except RuntimeError as e:  # backend not available for this GPU / dtype / shape
                print(f"bench: {peer_name} skipped: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            peers[peer_name] = (fwd, bwd)
        flops_fwd = 4 * batch * num_heads * T * T * head_dim * 0.5
        for i, (phase, flops, goal) in enumerate((("fwd", flops_fwd, ">= 0.85x"), ("bwd", 2.5 * flops_fwd, ">= 0.6x"))):
            peer_name, times = min(peers.items(), key=lambda item: item[1][i])
            ours_tflops, peer_tflops = flops / ours_s[i] / 1e12, flops / times[i] / 1e12
            rows.append(kernel_row(f"attention causal GQA {phase} B={batch} Hq={num_heads} Hkv={num_kv_heads} "
                                   f"D={head_dim} T={T} {str(dtype).replace('torch.', '')}", ours_s[i], times[i],
                                   peer_name, goal, ours_extra=f", {ours_tflops:.0f} TFLOP/s",
                                   peer_extra=f", {peer_tflops:.0f} TFLOP/s", ours_tflops=ours_tflops,
                                   peer_tflops=peer_tflops))
    return rows


def packed_vit_attention_rows(device, dtype, grids, num_heads, head_dim, repeats) -> list:
    """Bidirectional attention within each of several images packed in one sequence (fwd + bwd), against the
    reference's loop over images and against one call with a dense block-diagonal mask; time and peak memory."""
    import kernels

    lengths = [h * w for h, w in grids]
    total = sum(lengths)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(total, num_heads, head_dim, device=device, dtype=dtype, generator=g)
                   for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    backend = next(iter(sdpa_backends(device).values()))

    def ours():
        kernels.flash_attention_triton(q, k, v, cu, causal=False, max_seqlen=max(lengths)).backward(do)

    def per_image():
        outs = [sdpa(*(x[a:b].transpose(0, 1)[None] for x in (q, k, v)), False, backend)[0].transpose(0, 1)
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        torch.cat(outs).backward(do)

    def dense_mask():
        mask = segment[:, None] == segment[None, :]  # (total, total): the memory the packed kernel avoids
        out = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask)
        out[0].transpose(0, 1).backward(do)

    def cost(fn):  # (seconds, peak MiB; NaN on a CPU, where a process-wide peak says nothing about one call)
        seconds = timed(fn, device, repeats, grad_to_none=(q, k, v))
        return seconds, peak_memory(fn, device) / 2 ** 20 if device.type == "cuda" else float("nan")

    rows = []
    name = f"packed ViT attention fwd+bwd, {len(grids)} images, {total} patches, H={num_heads} D={head_dim}"
    ours_s, ours_mib = cost(ours)
    for peer_name, peer, goal in (("per-image loop", per_image, "> 1x"),
                                  ("dense block mask", dense_mask, ">= 5x at <= 0.5x memory")):
        peer_s, peer_mib = cost(peer)
        rows.append(kernel_row(f"{name} vs {peer_name}", ours_s, peer_s, peer_name, goal,
                               ours_extra=f", {ours_mib:.0f} MiB", peer_extra=f", {peer_mib:.0f} MiB",
                               ratio_extra=f" faster, {ours_mib / peer_mib:.2f}x memory", ours_peak_mib=ours_mib,
                               peer_peak_mib=peer_mib, memory_ratio=ours_mib / peer_mib))
    return rows


def mrope_rows(device, dtype, tokens, num_heads, num_kv_heads, head_dim, section, repeats) -> list:
    """q + k M-RoPE, forward and backward, against the eager reference (cos/sin tables + elementwise ops)."""
    import kernels

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(tokens, num_heads, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(tokens, num_kv_heads, head_dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    positions = torch.randint(0, tokens, (3, tokens), device=device, generator=g)
    rotary_dim = 2 * sum(section)

    def step(rope):
        return lambda: torch.autograd.backward(rope(q, k, positions, rotary_dim, section), (dq_out, dk_out))

    ours_s = timed(step(kernels.mrope_triton), device, repeats, grad_to_none=(q, k))
    peer_s = timed(step(kernels.mrope_torch), device, repeats, grad_to_none=(q, k))
    # the unavoidable traffic: read q, k and write them rotated; read their gradients and write them back
    gbs = 4 * (q.numel() + k.numel()) * q.element_size() / 1e9 / ours_s
    hbm = gbs * 1e9 / hbm_bandwidth(device) if device.type == "cuda" else float("nan")
    return [kernel_row(f"M-RoPE q+k fwd+bwd T={tokens} Hq={num_heads} Hkv={num_kv_heads} D={head_dim} "
                       f"{str(dtype).replace('torch.', '')}", ours_s, peer_s, "eager", ">= 3x and >= 60% of HBM",
                       ours_extra=f", {gbs:.0f} GB/s = {hbm:.0%} of HBM", ours_gbs=gbs, hbm_fraction=hbm)]


def rms_norm_rows(device, dtype, n_rows, cols, repeats) -> list:
    """RMSNorm forward, and forward + backward, against eager; achieved GB/s over the tensors it must move."""
    import kernels

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_rows, cols, device=device, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(cols, device=device, dtype=dtype, generator=g, requires_grad=True)
    dy = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    out = []
    for phase, gbytes in (("fwd", 2 * nbytes / 1e9), ("fwd+bwd", 5 * nbytes / 1e9)):  # x→y; then x, dy → dx
        def run(norm):
            if phase == "fwd":
                return no_grad(lambda: norm(x, w, 1e-5))
            return lambda: norm(x, w, 1e-5).backward(dy)
        ours_s = timed(run(kernels.rms_norm_triton), device, repeats, grad_to_none=(x, w))
        peer_s = timed(run(kernels.rms_norm_torch), device, repeats, grad_to_none=(x, w))
        gbs = gbytes / ours_s
        hbm = gbs * 1e9 / hbm_bandwidth(device) if device.type == "cuda" else float("nan")
        out.append(kernel_row(f"RMSNorm {phase} {n_rows}x{cols} {str(dtype).replace('torch.', '')}", ours_s, peer_s,
                              "eager", ">= 70% of HBM", ours_extra=f", {gbs:.0f} GB/s = {hbm:.0%} of HBM",
                              ours_gbs=gbs, hbm_fraction=hbm))
    return out


def kernel_rows(device, small: bool = False) -> list:
    """Every kernel row: bf16 at the 9B's shapes on a GPU, or (small=True) tiny fp32 shapes, which run anywhere
    (through Triton's interpreter on a CPU) and check that this code works; their times say nothing."""
    device = torch.device(device)
    if small:
        return (causal_attention_rows(device, torch.float32, 1, 2, 1, 16, (32,), 2)
                + packed_vit_attention_rows(device, torch.float32, [(2, 3), (4, 4), (1, 5)], 2, 16, 2)
                + mrope_rows(device, torch.float32, 16, 2, 1, 16, (1, 1, 2), 2)
                + rms_norm_rows(device, torch.float32, 8, 24, 2))
    # 8 images from 16×16 to 64×64 patches (224 to 896 px), every one a different shape
    vit_grids = [(64, 64), (48, 64), (32, 32), (64, 32), (16, 16), (40, 56), (24, 80), (56, 40)]
    return (causal_attention_rows(device, torch.bfloat16, 2, 32, 2, 128, (2048, 8192), 20)
            + packed_vit_attention_rows(device, torch.bfloat16, vit_grids, 12, 128, 20)
            + mrope_rows(device, torch.bfloat16, 16384, 32, 2, 128, (8, 12, 12), 20)
            + rms_norm_rows(device, torch.bfloat16, 16384, 4096, 20))


def bench_kernels(args) -> list:
    import kernels

    if args.device != "cuda" or kernels.INTERPRETED:
        print("bench: the kernel benchmarks need a CUDA GPU (and no TRITON_INTERPRET); nothing measured",
              file=sys.stderr)
        return []
    return kernel_rows(args.device)


# ---------------------------------------------------------------------------------------------------------------
# Training step: tokens/s and MFU
# ---------------------------------------------------------------------------------------------------------------


def train_case(impl: str, device: str, depth: int, repeats: int) -> dict:
    """One optimizer step (forward + backward + AdamW) on one packed sequence of the synthetic world: the tiny
    preset on CPU; on GPU the 9B's widths truncated to `depth` decoder layers (and 2 ViT blocks) at 8k tokens."""
    import data
    import model as M
    import pretrain
    import rope2d
    import world

    if device == "cuda":
        cfg = dataclasses.replace(M.PRESETS["9b"], num_hidden_layers=depth, vision_depth=2)
        seq_len, dtype = 8192, torch.bfloat16
    else:
        cfg, seq_len, dtype = M.PRESETS["tiny"], 512, torch.float32
    tok = data.tiny_tokenizer()
    source = world.SyntheticSource(kind="caption", tasks=tuple(t for t in world.TASKS if t != "video_grounding"))
    batch = data.PackedLoader(source, tok, seq_len, 1).batch(0)[0]
    if device == "cuda":  # the tiny tokenizer's ids live in the 9B vocabulary too; move the specials to its ids
        ids = batch["input_ids"]
        tiny = M.PRESETS["tiny"]
        for field in ("image_token_id", "image_start_token_id", "image_end_token_id"):
            ids[ids == getattr(tiny, field)] = getattr(cfg, field)
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k != "samples"}
    torch.manual_seed(0)
    with torch.device(device):
        if impl == "ours":
            net = M.GLM4V(cfg).init_weights().to(dtype)
            step_inputs = {k: inputs[k] for k in pretrain.MODEL_INPUTS}
            loss_fn = lambda: -net(**step_inputs).float().sum() / (inputs["labels"] != -100).sum()  # noqa: E731
        else:
            import transformers

            hf_cfg = transformers.Glm4vConfig(**cfg.to_hf())
            hf_cfg._attn_implementation = "sdpa"
            net = transformers.Glm4vForConditionalGeneration(hf_cfg).to(dtype)
            ids = inputs["input_ids"]
            in_video = rope2d.in_video(ids, cfg.video_start_token_id, cfg.video_end_token_id)
            mm = (ids == cfg.image_token_id).long() * (1 + in_video.long())
            hf_inputs = dict(input_ids=ids, labels=inputs["labels"], pixel_values=inputs["pixel_values"],
                             image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=mm)
            loss_fn = lambda: net(**hf_inputs).loss  # noqa: E731
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak = peak_memory(step, device)  # also the warm-up
    seconds = timed(step, device, repeats, warmup=False)
    flops = pretrain.flops_per_token(cfg, seq_len) * seq_len
    peak_flops = pretrain.peak_flops(torch.device(device))
    return {"seconds": seconds, "peak_bytes": peak, "tokens": seq_len, "mfu": flops / seconds / peak_flops
            if peak_flops else None}


def bench_train(args) -> list:
    ours, ref = in_subprocess("train-ours", args), in_subprocess("train-reference", args)
    what = "tiny preset, 512 tokens, fp32" if args.device == "cpu" else \
        f"9B widths, {args.train_depth} layers, 8192 tokens, bf16"
    mfu = f", MFU {ours['mfu']:.1%}" if ours["mfu"] else ""
    return [row(f"training step ({what}) vs transformers", f"{ours['tokens'] / ours['seconds']:.0f} tok/s{mfu}",
                f"{ref['tokens'] / ref['seconds']:.0f} tok/s", f"{ref['seconds'] / ours['seconds']:.2f}x faster",
                "tokens/s")]


# ---------------------------------------------------------------------------------------------------------------
# Decoding (sample.py): tokens/s against transformers' generate() on the same weights
# ---------------------------------------------------------------------------------------------------------------


def decode_models(cfg, device, dtype):
    """Our model with fresh weights, and the `transformers` reference holding the same weights."""
    import model as M
    import transformers

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no full-precision copy of a 9B model
    try:
        with torch.device(device):
            ours = M.GLM4V(cfg).init_weights().eval()
            ref = transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig(**cfg.to_hf())).eval()
    finally:
        torch.set_default_dtype(default)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def decode_rates(ours, ref, batch, prompt_len, new_tokens, repeats, compile):
    """Decode tokens/s (all rows) of ours and of the reference generate(): the time for `new_tokens` minus the
    time for 1 (the prefill), best of `repeats`, the two interleaved so that both see the same machine load."""
    import sample

    device = ours.lm_head.weight.device
    ids = torch.randint(0, min(ours.cfg.vocab_size, 256), (batch, prompt_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    mask = torch.ones_like(ids)
    runs = {"ours": lambda n: sample.generate(ours, ids, n, compile=compile),
            "ref": lambda n: ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)}
    return interleaved_decode_rates(runs, device, batch, new_tokens, repeats)


def interleaved_decode_rates(runs: dict, device, batch, new_tokens, repeats) -> dict:
    """{name: decode tokens/s} of generate functions fn(n) → (batch, n) tokens, interleaved (see decode_rates)."""
    with torch.no_grad():
        for name, fn in runs.items():  # warm up (and compile)
            assert fn(new_tokens).shape[1] >= new_tokens, name
        best = {name: [float("inf"), float("inf")] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                for i, n in enumerate((1, new_tokens)):
                    best[name][i] = min(best[name][i], timed(lambda: fn(n), device, 1, warmup=False))
    return {name: batch * (new_tokens - 1) / (t[1] - t[0]) for name, t in best.items()}


def decode_row(device, models, name, cfg, dtype, batch, prompt_len, new_tokens, repeats, compile) -> dict:
    """One decode row; `models` keeps the last (ours, reference) pair for cases that share it. On a GPU at batch 1
    also the HBM roofline: every decode step must read all decoder weights (but one row of the embedding)."""
    key = (cfg.hidden_size, cfg.num_hidden_layers, dtype)
    if key not in models:
        models.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        models[key] = decode_models(cfg, device, dtype)
    ours, ref = models[key]
    rates = decode_rates(ours, ref, batch, prompt_len, new_tokens, repeats, compile)
    numbers = dict(peer_name="transformers generate()", device=str(device), batch=batch, prompt=prompt_len,
                   new_tokens=new_tokens, compile=compile, threads=torch.get_num_threads())
    if device.type == "cuda" and batch == 1:
        weights = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                      if n.startswith(("model.language_model.layers", "model.language_model.norm", "lm_head")))
        numbers.update(gpu=torch.cuda.get_device_name(device), weight_gb=round(weights / 1e9, 2),
                       roofline=round(hbm_bandwidth(device) / weights, 1),
                       roofline_fraction=round(rates["ours"] * weights / hbm_bandwidth(device), 2))
    return row(name, round(rates["ours"], 1), round(rates["ref"], 1), round(rates["ours"] / rates["ref"], 2),
               "decode tokens/s", **numbers)


def bench_sample(args) -> list:
    """Decode throughput of `sample.generate` vs the reference `generate()` on the same weights. CPU: the tiny
    preset's width (hidden 256, 4 layers), eager and compiled, one thread. CUDA: compiled + CUDA graphs, the tiny
    width, the released 9B at batch 1 and a batch-64 rollout, bf16."""
    import model as M

    device = torch.device(args.device)
    tiny = dataclasses.replace(M.PRESETS["tiny"], eos_token_ids=())  # never stop early: equal work every run
    big = dataclasses.replace(M.PRESETS["9b"], eos_token_ids=())
    # (name, config, dtype, batch, prompt tokens, new tokens, repeats, compile)
    if device.type == "cuda":
        cases = [("decode, tiny width, batch 1", tiny, torch.float32, 1, 32, 128, 3, True),
                 ("decode, 9B, bf16, batch 1", big, torch.bfloat16, 1, 128, 256, 3, True),
                 ("rollout, 9B, bf16, batch 64", big, torch.bfloat16, 64, 256, 256, 2, True)]
        models = {}
        return [decode_row(device, models, *case) for case in cases]
    cases = [("decode, tiny width (hidden 256, 4 layers), batch 1", tiny, torch.float32, 1, 32, 128, 5, False),
             ("decode, tiny width, batch 1, torch.compile", tiny, torch.float32, 1, 32, 128, 5, True),
             ("decode, tiny width, batch 8", tiny, torch.float32, 8, 32, 128, 3, False)]
    models = {}
    return one_thread(lambda: [decode_row(device, models, *case) for case in cases])


# ---------------------------------------------------------------------------------------------------------------
# Weight-only int8 (quantize.py): weight bytes, decode speed and fidelity against the unquantized model
# ---------------------------------------------------------------------------------------------------------------


def int8_pair(cfg, dtype, device):
    """Fresh weights in `dtype` (built on the meta device, no fp32 copy) and an int8 copy of them (quantize.py)."""
    import copy

    import model as M
    import quantize

    torch.manual_seed(0)
    with torch.device("meta"):
        full = M.GLM4V(cfg)
    full = full.to(dtype).to_empty(device=device).init_weights().eval().requires_grad_(False)
    return full, quantize.quantize_int8(copy.deepcopy(full))


def int8_decode_row(name, cfg, dtype, device, batch, prompt_len, new_tokens, repeats, compile) -> dict:
    """Decode tokens/s of sample.generate with int8 weights against the same weights in `dtype`, and their bytes
    (decoder linears + lm_head: what a decode step reads, but for one embedding row)."""
    import quantize
    import sample

    full, int8 = int8_pair(cfg, dtype, device)
    ids = torch.randint(0, min(cfg.vocab_size, 256), (batch, prompt_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    runs = {"int8": lambda n: sample.generate(int8, ids, n, compile=compile),
            "full": lambda n: sample.generate(full, ids, n, compile=compile)}
    rates = interleaved_decode_rates(runs, device, batch, new_tokens, repeats)
    int8_bytes, full_bytes = quantize.weight_bytes(int8), quantize.weight_bytes(full)
    return row(name, round(rates["int8"], 1), round(rates["full"], 1), round(rates["int8"] / rates["full"], 2),
               "decode tokens/s", peer_name=f"{str(dtype).replace('torch.', '')} weights", device=str(device),
               batch=batch, new_tokens=new_tokens, compile=compile, threads=torch.get_num_threads(),
               weight_mib_int8=round(int8_bytes / 2 ** 20, 2), weight_mib_peer=round(full_bytes / 2 ** 20, 2),
               weight_ratio=round(int8_bytes / full_bytes, 3))


def int8_fidelity_rows(checkpoint=None, per_task: int = 8, max_new_tokens: int = 128) -> list:
    """int8 against the unquantized model, both computing in fp32 on the CPU (so only the weights differ), on
    held-out prompts of every domain: the share of prompts whose greedy replies are token-for-token the same, and
    the largest |Δlogit| over the prompts and the unquantized model's replies, as a share of the largest |logit|.
    On `checkpoint` (a trained model; fresh tiny weights without one, whose nearly flat logits flip easily)."""
    import data
    import evaluate
    import model as M
    import quantize
    import sample
    import world

    if checkpoint:
        full, tok = sample.load(checkpoint, "cpu", torch.float32)
        int8, _ = sample.load(checkpoint, "cpu", torch.float32, quantize="int8")
    else:
        (full, int8), tok = int8_pair(M.PRESETS["tiny"], torch.float32, "cpu"), data.tiny_tokenizer()
    prompts = [it.prompt(tok) for it in evaluate.heldout_items(world.TASKS, per_task, 0)]
    replies = [sample.generate_replies(m, prompts, 1, max_new_tokens, max_new_tokens * 3 // 4, tok.force_answer_ids,
                                       temperature=0.0, batch_rows=16) for m in (full, int8)]
    same = sum(a == b for a, b in zip(*replies))
    errors, scale = [], []
    for start in range(0, len(prompts), 16):  # the prompts with the unquantized model's replies, teacher-forced
        batch = data.collate(prompts[start:start + 16], full.cfg, replies[0][start:start + 16])
        inputs = dict(attention_mask=batch["attention_mask"], **{k: batch[k] for k in data.VISION_KEYS})
        with torch.no_grad():
            ref, got = (m(batch["input_ids"], **inputs) for m in (full, int8))
        real = batch["attention_mask"].bool()
        errors.append(float((got - ref)[real].abs().max()))
        scale.append(float(ref[real].abs().max()))
    what = checkpoint or "fresh tiny weights"
    return [row(f"int8 greedy replies = fp32's ({len(prompts)} held-out prompts, {what})", same, len(prompts),
                round(same / len(prompts), 3), "prompts", max_new_tokens=max_new_tokens),
            row(f"int8 max |Δlogit| vs fp32 ({what})", round(max(errors), 4), round(max(scale), 2),
                round(max(errors) / max(scale), 4), "logit", peer_name="max |logit|",
                weight_ratio_vs_bf16=round(quantize.weight_bytes(int8) / (quantize.weight_bytes(full) / 2), 3))]


def bench_quantize(args) -> list:
    """Weight-only int8 (quantize.py) against full-precision weights. CPU, one thread: decode at the tiny width and at
    the 9B's decoder width (2 layers, the tiny vocabulary), against bf16 and fp32; fidelity on --checkpoint. CUDA:
    the 9B at batch 1, compiled, against bf16 (decoding is bound by reading the weights)."""
    import model as M

    device = torch.device(args.device)
    tiny = dataclasses.replace(M.PRESETS["tiny"], eos_token_ids=())  # never stop early: equal work every run
    wide = dataclasses.replace(M.PRESETS["9b"], num_hidden_layers=2, vocab_size=320, eos_token_ids=(), pad_token_id=0)
    if device.type == "cuda":
        big = dataclasses.replace(M.PRESETS["9b"], eos_token_ids=())
        return [int8_decode_row("decode, 9B, int8 vs bf16, batch 1", big, torch.bfloat16, device, 1, 128, 256, 3,
                                True)]
    cases = [("decode, tiny width, batch 1, int8 vs bf16", tiny, torch.bfloat16, 1, 32, 128, 5, False),
             ("decode, tiny width, batch 1, int8 vs fp32", tiny, torch.float32, 1, 32, 128, 5, False),
             ("decode, 9B width (2 layers), batch 1, int8 vs bf16", wide, torch.bfloat16, 1, 32, 16, 2, False),
             ("decode, 9B width (2 layers), batch 1, int8 vs fp32", wide, torch.float32, 1, 32, 16, 2, False)]
    rows = one_thread(lambda: [int8_decode_row(name, cfg, dtype, device, *rest)
                               for name, cfg, dtype, *rest in cases])
    return rows + one_thread(lambda: int8_fidelity_rows(args.checkpoint))


# ---------------------------------------------------------------------------------------------------------------
# One RL iteration: the time split, and the rollout against bare generation
# ---------------------------------------------------------------------------------------------------------------


def rl_iteration_rows(device) -> list:
    """The time split of one RL iteration on the tiny preset: rollout (generate + score, K·G = 64 replies of 128
    tokens), old-policy log-probs, and the GRPO update (2 optimizer steps), with fresh weights that never stop
    early (equal work every run). Peer of the rollout row: bare sample.generate on the same batch."""
    import data
    import model as M
    import pretrain
    import rlcs
    import sample

    cfg = dataclasses.replace(M.PRESETS["tiny"], eos_token_ids=())
    torch.manual_seed(0)
    policy = M.GLM4V(cfg).init_weights().to(device)
    rc = rlcs.resolve(rlcs.RLConfig(preset="tiny"))
    optimizer = pretrain.build_optimizer(policy, rc, device)
    tokenizer = data.tiny_tokenizer()
    K, G = rc.groups_per_step, rc.group_size
    pool = rlcs.synthetic_pool(rlcs.default_tasks(), 1, 0, levels=(1,))[:K]  # one prompt per domain
    prompts = [rlcs.render_prompt(item, tokenizer, 0) for item in pool]
    autocast = pretrain.autocast_for(device, 1)
    out = {}

    def do_rollout():
        out["replies"] = sample.generate_replies(policy, prompts, G, rc.max_new_tokens, rc.think_budget,
                                                 tokenizer.force_answer_ids,
                                                 generator=sample.noise_generator(device, 0))
        rlcs.score_replies(tokenizer, pool, out["replies"], G)

    def bare_generate():
        batch = data.collate([p for p in prompts for _ in range(G)], cfg)
        sample.generate(policy, batch["input_ids"], rc.max_new_tokens, 1.0, 1.0,
                        **{k: batch[k] for k in data.VISION_KEYS}, attention_mask=batch["attention_mask"],
                        generator=sample.noise_generator(device, 0), think_budget=rc.think_budget,
                        force_answer_ids=tokenizer.force_answer_ids)

    t_peer, t_rollout = timed(bare_generate, device, 2), timed(do_rollout, device, 2)
    replies = out["replies"]
    advantages = rlcs.group_advantages(torch.rand(K, G, generator=torch.Generator().manual_seed(0)).round())
    rows = [(prompts[k // G], replies[k], advantages[k // G, k % G]) for k in range(K * G)]
    halves = [rlcs.micro_batches(rows[u * len(rows) // 2:(u + 1) * len(rows) // 2], None, cfg, device)
              for u in range(2)]
    with torch.no_grad():  # as in training: the second mini-batch needs the rollout policy's log-probs
        old = [rlcs.policy_logprobs(policy, b, autocast) for b, _ in halves[1]]
        t_logprobs = timed(lambda: [rlcs.policy_logprobs(policy, b, autocast) for b, _ in halves[1]], device, 1)
    olds = [[None] * len(halves[0]), old]
    t_update = timed(lambda: [rlcs.policy_update(policy, optimizer, [(b, a, o) for (b, a), o in zip(part, old)], rc,
                                                 1, len(rows) // 2, autocast) for part, old in zip(halves, olds)],
                     device, 1, warmup=False)
    total = t_rollout + t_logprobs + t_update
    tokens = sum(len(r) for r in replies)
    common = dict(device=str(device), replies=K * G, new_tokens=rc.max_new_tokens, threads=torch.get_num_threads())
    return [row("RL iteration: rollout (generate + score)", round(t_rollout, 3), round(t_peer, 3),
                round(t_peer / t_rollout, 2), "s", peer_name="bare sample.generate", share=round(t_rollout / total, 3),
                tok_per_s=round(tokens / t_rollout, 1), **common),
            row("RL iteration: old-policy log-probs", round(t_logprobs, 3), units="s",
                share=round(t_logprobs / total, 3), **common),
            row("RL iteration: GRPO update (2 optimizer steps)", round(t_update, 3), units="s",
                share=round(t_update / total, 3), **common)]


def bench_rlcs(args) -> list:
    device = torch.device(args.device)
    return rl_iteration_rows(device) if device.type == "cuda" else one_thread(lambda: rl_iteration_rows(device))


# ---------------------------------------------------------------------------------------------------------------
# Data: the synthetic generator and the packer against what training consumes
# ---------------------------------------------------------------------------------------------------------------


def bench_data(args) -> list:
    """Throughput of the data side on the CPU: the synthetic generator, the packer feeding a tiny training run
    (peer: how many samples per second the tiny model's training step consumes, measured here), and the image
    processor on a few sizes."""
    import data
    import model as M
    import world

    torch.manual_seed(0)
    tok, rows = data.tiny_tokenizer(), []
    n_items = 400
    seconds = timed(lambda: [world.make_item(world.TASKS[i % len(world.TASKS)], i // len(world.TASKS))
                             for i in range(n_items)], "cpu", 1)
    rows.append(row("synthetic items (rendered)", round(n_items / seconds), units="items/s"))
    loader = data.PackedLoader(world.SyntheticSource("sft"), tok, seq_len=1024)
    stream = iter(loader)
    packs = [None]
    seconds = timed(lambda: packs.__setitem__(0, [next(stream)[0] for _ in range(20)]), "cpu", 1)
    packed = sum(len(p["samples"]) for p in packs[0]) / seconds
    net = M.GLM4V(M.PRESETS["tiny"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = loader.batch(0)[0]

    def train_step():
        logits = net(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                     position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
        loss = F.cross_entropy(logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    consumed = len(batch["samples"]) / timed(train_step, "cpu", 3)
    rows.append(row("packed SFT samples (1 process, seq 1024) vs tiny train step", round(packed),
                    round(consumed, 1), round(packed / consumed, 1), "samples/s",
                    peer_name="samples/s a tiny GLM4V fwd+bwd+AdamW step consumes"))
    for w, h in ((112, 112), (448, 448), (1280, 720)):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
        rate = 1 / timed(lambda: data.process_image(image), "cpu", 5)
        rows.append(row(f"process_image {w}x{h}", round(rate, 1), units="images/s"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Rewards: verifier throughput; math against SymPy deciding the same equalities
# ---------------------------------------------------------------------------------------------------------------


def reward_group(task, rng):
    """One GRPO group's truth and a function making a right or wrong rollout answer for it."""
    if task == "math":
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        forms = [f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"{a / b:.10f}", f"\\frac{{{2 * a}}}{{{2 * b}}}",
                 f"{a}\\times {b}^{{-1}}", f"${a}/{b}$"]
        return f"{a}/{b}", lambda right: rng.choice(forms) if right else f"\\frac{{{a + rng.randint(1, 9)}}}{{{b}}}"
    if task == "choice":
        letter = rng.choice("ABCD")
        forms = [letter, f"({letter})", f"{letter}."]
        return letter, lambda right: rng.choice(forms) if right else rng.choice("ABCD") + "B"
    if task == "ocr":
        text = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ") for _ in range(rng.randint(5, 30)))
        text = text.strip() or "A"
        return text, lambda right: text if right else text[:-1] + rng.choice("QXZ")
    if task == "counting":
        k = rng.randint(0, 20)
        return str(k), lambda right: str(k if right else k + rng.randint(1, 3))
    if task == "chart":
        v = rng.randint(1, 5000) / 10
        return f"{v}", lambda right: f"{v * (1 + rng.uniform(-0.02, 0.02)):.3f}" if right else f"{v * 1.1:.2f}"
    if task == "grounding":
        x, y = rng.randint(0, 800), rng.randint(0, 800)
        shift = lambda right: rng.randint(0, 20) if right else 200  # noqa: E731
        return f"[{x},{y},{x + 150},{y + 120}]", lambda right: (
            lambda d: f"[{x + d}, {y}, {x + 150 + d}, {y + 120}]")(shift(right))
    if task == "gui":
        x, y = rng.randint(0, 800), rng.randint(0, 800)
        return json.dumps({"action": "click", "box": [x, y, x + 100, y + 40]}), lambda right: (
            lambda d: json.dumps({"action": "click", "box": [x + d, y, x + 100 + d, y + 40]}))(
                rng.randint(0, 10) if right else 150)
    s = rng.randint(0, 50) / 2
    return f"[{s}, {s + 3.0}]", lambda right: (lambda d: f"[{s + d:.2f}, {s + 3.0 + d:.2f}]")(
        rng.uniform(0, 0.5) if right else 2.5)


def reward_cases(task, n, rng, group_size=8):
    """n (reply, answer) pairs: groups of 8 rollouts share a truth, about half are right, every reply has a
    1,500-character thinking part."""
    import data

    cases = []
    while len(cases) < n:
        truth, make_pred = reward_group(task, rng)
        for _ in range(group_size):
            reasoning = "Let me look at the image carefully and reason step by step. " * 25
            cases.append((data.format_reply(make_pred(rng.random() < 0.5), reasoning), truth))
    return cases[:n]


def reward_rows(n: int = 4000, seed: int = 0) -> list:
    """Verifier throughput (scores/s, one core) per task; the RL loop must never wait on scoring (goal ≥ 10,000/s
    for math). For math the peer is SymPy deciding equality on the same parses (`simplify(a − b) == 0`), which is
    what a SymPy-based verifier would do."""
    import rewards
    import rlcs

    rng = random.Random(seed)
    rows = []
    for task in rlcs.default_tasks():  # the synthetic world's domains, which reward_group knows
        cases = reward_cases(task, n, rng)
        rewards.math_readings.cache_clear()
        rewards.parse_truth.cache_clear()
        ours = n / timed(lambda: [rewards.score(task, r, a) for r, a in cases], "cpu", 1, warmup=False)
        if task != "math":
            rows.append(row(f"rewards.score[{task}]", round(ours), units="scores/s"))
            continue
        import sympy

        pairs = [(rewards.parse_math(rewards.extract_answer(r))[0], rewards.parse_math(a)[0]) for r, a in cases[:200]]
        peer = len(pairs) / timed(lambda: [sympy.simplify(rewards.to_sympy(p) - rewards.to_sympy(t)) == 0
                                           for p, t in pairs], "cpu", 1, warmup=False)
        rows.append(row(f"rewards.score[{task}]", round(ours), round(peer), round(ours / peer, 1), "scores/s",
                        peer_name="sympy.simplify(a - b) == 0"))
    return rows


def bench_rewards(args) -> list:
    return reward_rows()

# ---------------------------------------------------------------------------------------------------------------
# The GPU checks (bench.py --gpu): `pytest -m gpu` — bf16 numerics of each kernel and of the whole model against
# the torch path, CUDA-graph decoding, packed ViT attention, a 2-GPU FSDP2 step — as rows of the same table
# ---------------------------------------------------------------------------------------------------------------


def bench_gpu_checks(args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        report, junit = os.path.join(tmp, "errors.jsonl"), os.path.join(tmp, "junit.xml")
        env = {**os.environ, "GLM4V_GPU_REPORT": report}
        env.pop("TRITON_INTERPRET", None)  # the compiled kernels
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                 f"--junitxml={junit}", "tests"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        comparisons = []
        if os.path.exists(report):
            with open(report) as f:
                comparisons = [json.loads(line) for line in f]
        cases = ET.parse(junit).getroot().iter("testcase") if os.path.exists(junit) else []
        outcomes = []
        for case in cases:
            name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
            problem = next(iter(case), None)  # <failure>, <error> or <skipped>, if any
            state = "passed" if problem is None else {"skipped": "skipped"}.get(problem.tag, "FAILED")
            detail = "" if problem is None else (problem.get("message") or "").splitlines()[0][:80]
            outcomes.append((name, state, detail, float(case.get("time", 0))))

    rows = []
    for c in comparisons:
        ratio = c["ours"] / c["peer"] if c["peer"] else float("inf")
        rows.append(row(f"bf16 {c['what']} ({c['test'].split('::')[-1]})", f"{c['ours']:.2e} max error vs fp32",
                        f"{c['peer']:.2e} (torch path in bf16)",
                        f"{ratio:.2f}x error (goal: <= {c['factor']}x + {c['floor']:g})", "relative error",
                        ours_error=c["ours"], peer_error=c["peer"], error_ratio=ratio))
    for name, state, detail, secs in outcomes:
        rows.append(row(f"pytest -m gpu: {name}", f"{state} in {secs:.1f} s", detail, None, "s",
                        passed=state == "passed", seconds=secs))
    failed = sum(state == "FAILED" for _, state, _, _ in outcomes)
    rows.append(row("pytest -m gpu (the GPU checks)",
                    f"{len(outcomes) - failed}/{len(outcomes)} passed or skipped, {seconds:.0f} s",
                    "budget with the rest of bench.py --gpu: 480 s", f"{seconds / 480:.2f} of it", "s",
                    seconds=seconds, returncode=result.returncode))
    if result.returncode not in (0, 5):  # 5: nothing collected
        print(result.stdout[-4000:], file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

SECTIONS = {"vision": bench_vision, "kernels": bench_kernels, "train": bench_train, "sample": bench_sample,
            "quantize": bench_quantize, "rlcs": bench_rlcs, "data": bench_data, "rewards": bench_rewards,
            "gpucheck": bench_gpu_checks}
COLUMNS = ("name", "ours", "peer", "ratio", "units")


def print_table(rows):
    rows = [{k: ("" if r.get(k) is None else str(r[k])) for k in COLUMNS} for r in rows]
    header = {k: k for k in COLUMNS}
    widths = {k: max(len(r[k]) for r in rows + [header]) for k in COLUMNS}
    for r in [header] + rows:
        print(" | ".join(r[k].ljust(widths[k]) for k in COLUMNS))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU suite (bf16, CUDA)")
    parser.add_argument("--only", default="", help="comma-separated sections to run: " + ", ".join(SECTIONS))
    parser.add_argument("--vision-depth", type=int, default=None,
                        help="ViT depth for the vision bench (default: 24 on GPU, 2 on CPU)")
    parser.add_argument("--train-depth", type=int, default=4,
                        help="decoder layers of the depth-truncated 9B in the GPU training bench")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (median reported)")
    parser.add_argument("--json", help="also write every row, with the numbers behind it, to this JSON file")
    parser.add_argument("--checkpoint", help="the quantize section's fidelity rows: measure on this checkpoint "
                        "(default: fresh tiny weights)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    args.vision_depth = args.vision_depth or (24 if args.device == "cuda" else 2)
    if args.case:  # a single measurement in this fresh process
        section, impl = args.case.split("-", 1)
        case = vision_case if section == "vision" else train_case
        print(json.dumps(case(impl, args.device, args.vision_depth if section == "vision" else args.train_depth,
                              args.repeats)))
        return
    sections = [s for s in args.only.split(",") if s] or [s for s in SECTIONS if s != "gpucheck" or args.gpu]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    rows = [r for name in sections for r in SECTIONS[name](args)]
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
