"""The GPU path without a GPU: every Triton kernel of kernels.py compiled ahead of time for sm_80, sm_89, sm_90 and
sm_100 (tests/aot_compile.py), as the launchers would launch it there: it builds, its shared memory fits, and
registers and spills are as recorded below. The table of every build is printed (`pytest tests/test_aot.py -rP`,
or `python tests/aot_compile.py` for the table alone; `--full` adds fp16, TF32 and more cases).

Default set: bf16 and fp32 on the four GPUs, for the tiny and 9B presets' text decoder (packed samples, and one
long sample) and the 9B's ViT — every tile configuration the launchers can choose (~100 s on 2 cores).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton has wheels for Linux only; the model runs without it (test_model)")
import kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "tf32": "float32"}


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    """Runs aot_compile.py once (in its own process: it needs triton without the interpreter) and returns its
    JSON: the jit functions of kernels.py, the targets, and one row per build."""
    out = tmp_path_factory.mktemp("aot") / "builds.json"
    env = {k: v for k, v in os.environ.items() if k != "AOT_COMPILE_CACHE"}
    env["TRITON_INTERPRET"] = "0"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "aot_compile.py"), "--json", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(out) as f:
        data = json.load(f)
    print(data["table"])
    print(result.stdout.splitlines()[-1])  # how many builds, how long
    return data


def failing(rows, table):
    return "\n".join(f"{r['arch']} {r['dtype']} {r['kernel']} {r['case']}: {r.get('error', '')}" for r in rows) + \
        "\n\n" + table


def test_every_kernel_builds_for_every_gpu_and_dtype(aot):
    kinds = aot["jit_functions"]
    assert all(kind == "kernel" or name.endswith("_inner") for name, kind in kinds.items()), \
        f"a @triton.jit function is neither a launched *_kernel nor an inlined *_inner helper: {kinds}"
    launched = {name for name, kind in kinds.items() if kind == "kernel"}
    errors = [r for r in aot["builds"] if "error" in r]
    assert not errors, failing(errors, aot["table"])
    for arch in aot["archs"]:
        for dtype in aot["dtypes"]:
            built = {r["kernel"] for r in aot["builds"] if r["arch"] == arch and r["dtype"] == dtype}
            assert built == launched, (arch, dtype, launched - built, aot["table"])


def test_shared_memory_fits_and_the_tile_choice_bounds_it(aot):
    """Measured shared memory within the GPU's limit, and within kernels.attention_smem_bytes, which
    attention_tiles relies on to choose tiles for GPUs with less shared memory."""
    over = [r for r in aot["builds"] if r["shared"] > r["smem_limit"]]
    assert not over, failing(over, aot["table"])
    underestimated = [r for r in aot["builds"] if r["smem_estimate"] is not None and r["shared"] > r["smem_estimate"]]
    assert not underestimated, failing(underestimated, aot["table"])


def test_launchers_launch_attention_tiles(aot):
    """What was compiled is what attention_tiles(arch, dtype, head_dim, kind, smem_limit) chooses."""
    import torch

    for r in aot["builds"]:
        if r["attention_kind"]:
            c = r["constexprs"]
            launched = (c["BLOCK_M"], c["BLOCK_N"], r["num_warps"], r["num_stages"])
            chosen = kernels.attention_tiles(r["arch"], getattr(torch, TORCH_DTYPES[r["dtype"]]), c["HEAD_DIM"],
                                             r["attention_kind"], r["smem_limit"])
            assert launched == chosen, (r["arch"], r["dtype"], r["kernel"], r["case"], launched, chosen)


def test_no_kernel_spills(aot):
    """No build spills: required at least for bf16 at head dim 128 on sm_80 and sm_90 (text decoder and ViT), and
    every build of the set meets it. (Stack without spills is allowed: libdevice's exact sin/cos keep a small local
    array for huge angles.)"""
    required = [r for r in aot["builds"] if r["arch"] in (80, 90) and r["dtype"] == "bf16"
                and r["attention_kind"] and r["constexprs"]["HEAD_DIM"] == 128]
    assert {r["case"] for r in required} >= {"9b text", "9b vit"} and len(required) >= 12, aot["table"]
    spilling = [r for r in aot["builds"] if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, failing(spilling, aot["table"])
