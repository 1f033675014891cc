"""Compile every Triton kernel of kernels.py ahead of time for real GPUs, on a machine without one.

    python tests/aot_compile.py              # sm_80, sm_89, sm_90, sm_100 × bf16, fp32: a table (~100 s, 2 cores)
    python tests/aot_compile.py --full       # + fp16, fp32 with TF32, the tiny ViT, long tiny samples (~10 min)
    python tests/aot_compile.py --arch 80,90 --dtype bf16 --json out.json

How it knows what would launch: the real launchers (`flash_attention_triton` forward and backward, the RoPEs,
RMSNorm) run on empty CPU tensors shaped as the model's calls make them, for the tiny and 9B presets (text decoder
and ViT), while
- `kernels.gpu_limits` answers with the target GPU's limits (so the tile, warp and stage choices, and the GQA
  split of the dK/dV kernel, are the ones that GPU would get), and
- `JITFunction.run` records each launch instead of running it.
Triton's own binder then specialises each recorded launch as a launch on a GPU would be (argument types, which
pointers and integers are multiples of 16, integers equal to 1), and `triton.compile` builds it for
`GPUTarget("cuda", arch, 32)`: PTX, then a cubin with the ptxas shipped in the triton wheel. The cubin's resource
usage (`cuobjdump --dump-resource-usage`, also shipped) gives registers and stack per thread; the compile's
metadata gives the dynamic shared memory.

This must run in a process where triton was imported without its interpreter (TRITON_INTERPRET=0): the
interpreter replaces the kernels by Python functions, which cannot be compiled. tests/test_aot.py runs it so.
It uses Triton 3.9's launcher internals (`create_function_from_signature`, `JITFunction._pack_args`).
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_compile.py needs triton without its interpreter: run it with TRITON_INTERPRET=0")
os.environ["TRITON_INTERPRET"] = "0"  # kernels.py would switch the interpreter on without a GPU
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # every build runs ptxas (its report is read), none comes from a cache
if "AOT_COMPILE_CACHE" not in os.environ:  # one scratch cache for this run and its workers, removed at the end
    os.environ["AOT_COMPILE_CACHE"] = os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot-compile-")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import kernels  # noqa: E402
import model as M  # noqa: E402

assert not kernels.INTERPRETED

# Stand-ins for the GPUs of each architecture: the limits kernels.gpu_limits would read from the driver.
# smem_per_block is cudaDevAttrMaxSharedMemoryPerBlockOptin.
TARGETS = {
    80: ("A100", kernels.GpuLimits(80, 166912, 108)),
    89: ("L40S", kernels.GpuLimits(89, 101376, 142)),
    90: ("H100", kernels.GpuLimits(90, 232448, 132)),
    100: ("B200", kernels.GpuLimits(100, 232448, 148)),
}
# "tf32": fp32 tensors with torch.backends.cuda.matmul.allow_tf32 on (the attention's dots then use TF32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ATTENTION_KINDS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def jit_functions() -> dict:
    """Every @triton.jit function of kernels.py: name -> "kernel" (launched, named *_kernel) or "helper"."""
    return {name: "kernel" if name.endswith("_kernel") else "helper" for name, obj in vars(kernels).items()
            if isinstance(obj, JITFunction)}


# ---------------------------------------------------------------------------------------------------------------
# What the model launches: its calls into kernels.py, on empty tensors of the presets' shapes
# ---------------------------------------------------------------------------------------------------------------

TEXT_SEGMENTS = [1000, 1037]  # two packed samples; 2037 tokens, not a multiple of 16 (the general case)
# One long sample: enough key blocks × kv heads to fill any of the GPUs below, so the dK/dV kernel does not split
# the GQA group (the short samples above make it split: a build with fp32 partial sums)
LONG_SEGMENTS = [20001]
VIT_GRIDS = [(32, 32), (16, 40), (14, 42)]  # three images of different sizes: 2252 patches


def _empty(*shape, dtype, grad=False):
    return torch.empty(*shape, dtype=dtype).requires_grad_(grad)


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def text_layer(cfg, dtype):
    """model.Attention.forward (packed) and a decoder layer's RMSNorm, forward and backward; then one decode step
    (batch 1: M-RoPE and RMSNorm on a single token; its attention is scaled_dot_product_attention)."""
    n, d = sum(TEXT_SEGMENTS), cfg.head_dim
    x = _empty(n, cfg.hidden_size, dtype=dtype, grad=True)
    h = kernels.rms_norm_triton(x, torch.ones(cfg.hidden_size, dtype=dtype), cfg.rms_norm_eps)
    q = _empty(n, cfg.num_attention_heads, d, dtype=dtype, grad=True)  # q_proj(x).view(N, Hq, D)
    k = _empty(n, cfg.num_key_value_heads, d, dtype=dtype, grad=True)
    v = _empty(n, cfg.num_key_value_heads, d, dtype=dtype, grad=True)
    positions = torch.zeros(3, n, dtype=torch.long)
    q, k = kernels.mrope_triton(q, k, positions, cfg.rotary_dim, cfg.mrope_section, cfg.rope_theta)
    out = kernels.flash_attention_triton(q, k, v, _cu_seqlens(TEXT_SEGMENTS), causal=True,
                                         max_seqlen=max(TEXT_SEGMENTS))
    (out.sum() + h.sum()).backward()
    with torch.no_grad():  # decode: x (B=1, T=1, C), q (1, 1, Hq, D)
        kernels.rms_norm_triton(_empty(1, 1, cfg.hidden_size, dtype=dtype), torch.ones(cfg.hidden_size, dtype=dtype),
                                cfg.rms_norm_eps)
        kernels.mrope_triton(_empty(1, 1, cfg.num_attention_heads, d, dtype=dtype),
                             _empty(1, 1, cfg.num_key_value_heads, d, dtype=dtype),
                             torch.zeros(3, 1, 1, dtype=torch.long), cfg.rotary_dim, cfg.mrope_section, cfg.rope_theta)


def text_attention_long(cfg, dtype):
    """The decoder's attention on one long sample (the dK/dV kernel without the GQA split)."""
    n, d = sum(LONG_SEGMENTS), cfg.head_dim
    q = _empty(n, cfg.num_attention_heads, d, dtype=dtype, grad=True)
    k, v = (_empty(n, cfg.num_key_value_heads, d, dtype=dtype, grad=True) for _ in range(2))
    kernels.flash_attention_triton(q, k, v, _cu_seqlens(LONG_SEGMENTS), causal=True,
                                   max_seqlen=max(LONG_SEGMENTS)).sum().backward()


def vit_block(cfg, dtype):
    """vision.VisionAttention.forward on three packed images, and a block's RMSNorm, forward and backward."""
    lengths = [h * w for h, w in VIT_GRIDS]
    n, heads = sum(lengths), cfg.vision_num_heads
    d = cfg.vision_hidden_size // heads
    x = _empty(n, cfg.vision_hidden_size, dtype=dtype, grad=True)
    h = kernels.rms_norm_triton(x, torch.ones(cfg.vision_hidden_size, dtype=dtype), cfg.vision_rms_norm_eps)
    qkv = _empty(n, 3 * heads * d, dtype=dtype, grad=True)
    q, k, v = qkv.view(n, 3, heads, d).unbind(1)  # strided views of one projection, as in vision.py
    coords = torch.zeros(n, 2, dtype=torch.long)
    q, k = kernels.rope_vision_triton(q, k, coords, cfg.vision_rope_theta)
    out = kernels.flash_attention_triton(q, k, v, _cu_seqlens(lengths), causal=False, max_seqlen=max(lengths))
    (out.sum() + h.sum()).backward()


# (name, preset, function): every place the model enters kernels.py, per preset
CASES = [(f"{preset} {part}", preset, fn) for preset in ("tiny", "9b")
         for part, fn in (("text", text_layer), ("long", text_attention_long), ("vit", vit_block))]
# The default set (tests/test_aot.py): every kernel at every tile configuration the launchers choose, since the
# tiles depend on the GPU, the dtype and the head dim only (tiny: 64, 9B: 128), with both the text decoder and
# the ViT at head dim 128. The tiny preset's ViT and long samples add builds with tiles the set already has.
QUICK_CASES = ("tiny text", "9b text", "9b long", "9b vit")


@contextlib.contextmanager
def recording_launches():
    """Within: kernel[grid](...) appends (kernel, args, kwargs) to the yielded list instead of launching."""
    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def pretending_gpu(limits: kernels.GpuLimits):
    """Within: the launchers choose their parameters for a GPU with these limits."""
    original = kernels.gpu_limits
    kernels.gpu_limits = lambda device: limits
    try:
        yield
    finally:
        kernels.gpu_limits = original


@contextlib.contextmanager
def tf32_matmuls(allowed: bool):
    original = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = original


def launches_for(arch: int, dtype_name: str, cases=QUICK_CASES) -> list:
    """The distinct kernel builds the model's calls would launch on GPU `arch` in `dtype_name` (a key of DTYPES):
    a list of dicts with the kernel's name, the case that launches it, its launch options and its Triton
    specialisation."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jobs = {}
    for case, preset, fn in CASES:
        if case not in cases:
            continue
        with pretending_gpu(TARGETS[arch][1]), recording_launches() as launches, tf32_matmuls(dtype_name == "tf32"):
            fn(M.PRESETS[preset], DTYPES[dtype_name])
        for kernel, args, kwargs in launches:
            # what JITFunction.run does before compiling: bind, specialise, split options from constexprs
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
            key = repr((kernel.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()), opts))
            if key in jobs:
                continue
            consts = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
            kind = ATTENTION_KINDS.get(kernel.__name__)
            estimate = None if kind is None else kernels.attention_smem_bytes(
                kind, arch, consts["BLOCK_D"], DTYPES[dtype_name].itemsize,
                (consts["BLOCK_M"], consts["BLOCK_N"], opts.num_warps, opts.num_stages))
            jobs[key] = dict(kernel=kernel.__name__, case=case, arch=arch, dtype=dtype_name,
                             num_warps=opts.num_warps, num_stages=opts.num_stages, constexprs=consts,
                             attention_kind=kind, smem_estimate=estimate,
                             signature=signature, constexpr_paths=constexprs, attrs=attrs,
                             options={k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs})
    return list(jobs.values())


# ---------------------------------------------------------------------------------------------------------------
# Compiling and measuring
# ---------------------------------------------------------------------------------------------------------------


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory per thread, and static shared memory, from the wheel's cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    reg, stack, static_shared, local = map(int, found.groups())
    return dict(registers=reg, stack=stack, local=local, static_shared=static_shared)


def spills(ptxas_log: str) -> dict:
    """Stack frame and spill bytes per thread from ptxas -v (the stack also holds local arrays, e.g. the slow path
    of libdevice's sin/cos, which are not spills)."""
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if not found:
        raise RuntimeError(f"no spill counts in the ptxas log:\n{ptxas_log}")
    frame, stores, loads = map(int, found.groups())
    return dict(spill_stores=stores, spill_loads=loads)


def compile_job(job: dict) -> dict:
    """Build one job for its GPU; returns the job's description with the measurements (or the error)."""
    start = time.perf_counter()
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: captured below
    target = GPUTarget("cuda", job["arch"], 32)
    kernel = getattr(kernels, job["kernel"])
    source = ASTSource(kernel, job["signature"], job["constexpr_paths"], job["attrs"])
    options = make_backend(target).parse_options(job["options"]).__dict__
    result = {k: v for k, v in job.items() if k not in ("signature", "constexpr_paths", "attrs", "options")}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=target, options=options)
    except Exception as e:  # reported, and the test fails on it
        return dict(result, error=f"{type(e).__name__}: {str(e)[:2000]}", seconds=time.perf_counter() - start)
    usage = dict(resource_usage(compiled.asm["cubin"]), **spills(log.getvalue()))
    smem = compiled.metadata.shared + usage["static_shared"]
    limit = TARGETS[job["arch"]][1].smem_per_block
    return dict(result, **usage, shared=smem, smem_limit=limit, seconds=time.perf_counter() - start)


def compile_all(archs, dtypes, cases, workers: int) -> list:
    jobs = [job for arch in archs for dtype in dtypes for job in launches_for(arch, dtype, cases)]
    # the big attention kernels first, so the pool's last jobs are short
    jobs.sort(key=lambda j: not j["kernel"].startswith(("_attn_fwd_kernel", "_attn_bwd_dkdv", "_attn_bwd_dq")))
    if workers <= 1:
        return [compile_job(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_job, jobs))


def tiles_of(row: dict) -> str:
    c = row["constexprs"]
    if "BLOCK_M" in c:
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}"
    return "x".join(str(c[k]) for k in ("BLOCK_T", "BLOCK_R", "BLOCK_C") if k in c)


def table(rows: list) -> str:
    """One line per build: GPU, dtype, kernel, case, tiles/warps/stages, registers, spills, shared memory."""
    lines = [f"{'gpu':<6} {'dtype':<8} {'kernel':<24} {'case':<9} {'head':>4} {'tiles':>7} {'w':>2} {'s':>1} "
             f"{'regs':>4} {'stack':>5} {'spill':>5} {'smem KB':>12}  {'secs':>4}"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["dtype"], r["kernel"], r["case"])):
        head = r["constexprs"].get("HEAD_DIM", "")
        start = (f"sm_{r['arch']:<3} {r['dtype']:<8} {r['kernel'].strip('_'):<24} {r['case']:<9} {head:>4} "
                 f"{tiles_of(r):>7} {r['num_warps']:>2} {r['num_stages']:>1} ")
        if "error" in r:
            lines.append(start + "FAILED: " + r["error"].splitlines()[0][:100])
            continue
        lines.append(start + f"{r['registers']:>4} {r['stack']:>5} {r['spill_stores']:>5} "
                     f"{r['shared'] / 1024:>5.1f} / {r['smem_limit'] / 1024:<4.0f}  {r['seconds']:>4.1f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--dtype", default="bf16,fp32", help="bf16, fp16, fp32, tf32 (fp32 with TF32 dots)")
    parser.add_argument("--full", action="store_true",
                        help="every dtype and every case (the tiny ViT, long samples for both presets)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel compiles")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        dtypes, cases = (list(DTYPES), [c[0] for c in CASES]) if args.full else (args.dtype.split(","), QUICK_CASES)
        archs = [int(a) for a in args.arch.split(",")]
        rows = compile_all(archs, dtypes, cases, args.workers)
    finally:
        shutil.rmtree(os.environ["AOT_COMPILE_CACHE"], ignore_errors=True)
    print(table(rows))
    print(f"{len(rows)} builds in {time.perf_counter() - start:.0f} s with {args.workers} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(jit_functions=jit_functions(), archs=archs, dtypes=dtypes, cases=list(cases),
                           table=table(rows), builds=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
