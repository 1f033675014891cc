"""Benchmarks: every speed or memory claim of this repository, each a ratio against a peer measured in the same run.

    python bench.py                 # CPU suite (a few minutes on 2 cores)
    python bench.py --gpu           # the GPU suite (needs CUDA)
    python bench.py --only vision   # one section

The peer is usually the reference implementation in `transformers` (a test-only dependency, imported lazily here
and nowhere else in the project). Each case runs in a fresh subprocess so that peak memory is its own.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn, device: str, repeats: int):
    """(median seconds, peak extra memory in bytes) of fn(); the first call is both warm-up and memory probe."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = current_rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak


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


# ---------------------------------------------------------------------------------------------------------------
# Vision encoder: 8 mixed-size images in one batch (issue 2)
# ---------------------------------------------------------------------------------------------------------------

# (height, width) in pixels, from 224² to 1344×336 — every image a different shape, as in real multi-image prompts
VISION_IMAGES = [(224, 224), (336, 336), (448, 448), (1344, 336), (336, 1344), (672, 448), (280, 560), (896, 224)]


def vision_case(impl: str, device: str, depth: int, repeats: int) -> dict:
    import model as M

    cfg = M.Config(**{**M.PRESETS["9b"].__dict__, "vision_depth": depth})
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
    with torch.no_grad():
        seconds, peak = measure(run, device, repeats)
    return {"seconds": seconds, "peak_bytes": peak, "patches": pixels.shape[0]}


def bench_vision(args) -> list:
    ours = in_subprocess("vision-ours", args)
    rows = []
    for peer in ("reference-sdpa", "reference-eager"):
        ref = in_subprocess(f"vision-{peer}", args)
        rows.append({"name": f"vision encoder fwd, 8 images ({ours['patches']} patches, depth {args.vision_depth}) "
                             f"vs {peer}",
                     "ours": f"{ours['seconds'] * 1e3:.0f} ms, {ours['peak_bytes'] / 2 ** 20:.0f} MiB",
                     "peer": f"{ref['seconds'] * 1e3:.0f} ms, {ref['peak_bytes'] / 2 ** 20:.0f} MiB",
                     "ratio": f"{ref['seconds'] / ours['seconds']:.2f}x faster, "
                              f"{ours['peak_bytes'] / max(ref['peak_bytes'], 1):.2f}x memory"})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Training step: tokens/s and MFU (issue 6)
# ---------------------------------------------------------------------------------------------------------------


def train_case(impl: str, device: str, depth: int, repeats: int) -> dict:
    """One optimizer step (forward + backward + AdamW) on one packed sequence of the synthetic world: the tiny
    preset on CPU; on GPU the 9B's widths truncated to `depth` decoder layers (and 2 ViT blocks) at 8k tokens."""
    import data
    import model as M
    import pretrain

    if device == "cuda":
        cfg = M.Config(**{**M.PRESETS["9b"].__dict__, "num_hidden_layers": depth, "vision_depth": 2})
        seq_len, dtype = 8192, torch.bfloat16
    else:
        cfg, seq_len, dtype = M.PRESETS["tiny"], 512, torch.float32
    tok = data.tiny_tokenizer()
    source = data.SyntheticSource(kind="caption", tasks=tuple(t for t in data.TASKS if t != "video_grounding"))
    batch = data.PackedLoader(source, tok, seq_len, 1).batch(0)[0]
    if device == "cuda":  # the tiny tokenizer's ids live in the 9B vocabulary too; move the specials to its ids
        ids = batch["input_ids"]
        for ours, theirs in ((270, cfg.image_token_id), (266, cfg.image_start_token_id), (267, cfg.image_end_token_id)):
            ids[ids == ours] = theirs
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
            in_video = (ids == cfg.video_start_token_id).cumsum(-1) > (ids == cfg.video_end_token_id).cumsum(-1)
            mm = (ids == cfg.image_token_id).long() * (1 + in_video.long())
            hf_inputs = dict(input_ids=ids, labels=inputs["labels"], pixel_values=inputs["pixel_values"],
                             image_grid_thw=inputs["image_grid_thw"], mm_token_type_ids=mm)
            loss_fn = lambda: net(**hf_inputs).loss  # noqa: E731
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device == "cuda")

    def step():
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = measure(step, device, repeats)
    flops = pretrain.flops_per_token(cfg, seq_len) * seq_len
    peak_flops = pretrain.peak_flops(torch.device(device))
    return {"seconds": seconds, "peak_bytes": peak, "tokens": seq_len, "mfu": flops / seconds / peak_flops
            if peak_flops else None}


def bench_train(args) -> list:
    ours, ref = in_subprocess("train-ours", args), in_subprocess("train-reference", args)
    what = "tiny preset, 512 tokens, fp32" if args.device == "cpu" else \
        f"9B widths, {args.train_depth} layers, 8192 tokens, bf16"
    mfu = f", MFU {ours['mfu']:.1%}" if ours["mfu"] else ""
    return [{"name": f"training step ({what}) vs transformers",
             "ours": f"{ours['tokens'] / ours['seconds']:.0f} tok/s{mfu}",
             "peer": f"{ref['tokens'] / ref['seconds']:.0f} tok/s",
             "ratio": f"{ref['seconds'] / ours['seconds']:.2f}x faster", "units": "tokens/s"}]


def bench_rewards(args) -> list:
    import rewards

    return rewards.bench_rewards(args.device)


def bench_data(args) -> list:
    import data

    return data.bench_data(args.device)


def bench_kernels(args) -> list:
    import kernels

    return kernels.bench_kernels(args.device)


def bench_sample(args) -> list:
    import sample

    return sample.bench_sample(args.device)


def bench_rlcs(args) -> list:
    import rlcs

    return rlcs.bench_rlcs(args.device)


SECTIONS = {"vision": bench_vision, "kernels": bench_kernels, "train": bench_train, "sample": bench_sample,
            "rlcs": bench_rlcs, "data": bench_data, "rewards": bench_rewards}
COLUMNS = ("name", "ours", "peer", "ratio", "units")


def print_table(rows):
    rows = [{k: ("" if r.get(k) is None else str(r[k])) for k in COLUMNS} for r in rows]
    header = {k: k for k in COLUMNS}
    widths = {k: max(len(r[k]) for r in rows + [header]) for k in COLUMNS}
    for r in [header] + rows:
        print(" | ".join(r[k].ljust(widths[k]) for k in COLUMNS))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the GPU suite (bf16, CUDA)")
    parser.add_argument("--only", default="", help="comma-separated sections to run: " + ", ".join(SECTIONS))
    parser.add_argument("--vision-depth", type=int, default=None,
                        help="ViT depth for the vision bench (default: 24 on GPU, 2 on CPU)")
    parser.add_argument("--train-depth", type=int, default=4,
                        help="decoder layers of the depth-truncated 9B in the GPU training bench")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (median reported)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    args.vision_depth = args.vision_depth or (24 if args.device == "cuda" else 2)
    if args.case:  # a single measurement in this fresh process
        section, impl = args.case.split("-", 1)
        if section == "vision":
            result = vision_case(impl, args.device, args.vision_depth, args.repeats)
        else:
            result = train_case(impl, args.device, args.train_depth, args.repeats)
        print(json.dumps(result))
        return
    sections = [s for s in args.only.split(",") if s] or list(SECTIONS)
    rows = []
    for name in sections:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        rows += SECTIONS[name](args)
    print_table(rows)


if __name__ == "__main__":
    main()
