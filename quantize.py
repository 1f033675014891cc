"""Weight-only int8 quantization of the GLM-4 decoder, gpt-fast style: half the weight bytes of bf16 for inference.

    python quantize.py --checkpoint DIR --out DIR-int8          # write an int8 checkpoint (bf16 scales by default)
    python sample.py --checkpoint DIR-int8 --prompt "..."       # loads it as it is (evaluate.py too)
    python sample.py --checkpoint DIR --quantize int8           # or quantize while loading (evaluate.py: the same)

Every decoder linear (q, k, v, o, gate_up, down) and the lm_head keeps its weight W (out, in) as int8 with one scale
per output channel, s = max|W_row| / 127 and W_int8 = round(W / s), so that |W − s·W_int8| ≤ s/2 for every element.
The product is (x · W_int8ᵀ) · s: on a GPU the int8 matrix is converted to the activations' dtype inside the matmul,
which torch.compile fuses into the matmul's loads (sample.py compiles the decode step on CUDA) — decoding, bound by
reading every weight once per token, then reads half the bytes; on a CPU a bf16 decode step uses PyTorch's fused
int8-weight matmul (`torch._weight_int8pack_mm`) instead, as converting the whole matrix first costs more than the
matmul itself. The ViT, the projector, the embedding and the norms stay as they are: the ViT runs once per
image, and the rest is small or (the embedding) read one row per token.

The checkpoint format is a Hugging Face-style directory: config.json is the model's with a "quantization_config"
{"quant_method": "int8_weight_only", ...} added, model.safetensors holds `<linear>.weight` as int8 (out, in) and
`<linear>.scales` (out,) in the compute dtype for each quantized linear, every other tensor (biases included) as
before, and tokenizer.json. It is this repository's format, not one `transformers` reads: transformers 5.24 warns
about the unknown quant_method and would load the int8 weights without their scales.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M

QUANT_METHOD = "int8_weight_only"


def quantize_weight(weight: torch.Tensor):
    """(int8 weight (out, in), scales (out,) in weight's dtype): symmetric, one scale per output channel. W is
    divided by the scale as stored, so |W − s·W_int8| ≤ s/2 holds for the scales the model uses."""
    scales = (weight.detach().float().abs().amax(-1) / 127).clamp(min=1e-12).to(weight.dtype)
    q = torch.round(weight.detach().float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = (x · W_int8ᵀ) · s + b: a linear whose weight is int8 with per-output-channel scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def forward(self, x):
        rows = x.numel() // self.in_features
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and rows <= CPU_FUSED_ROWS:
            # decoding on a CPU: PyTorch's fused int8-weight matmul, which never writes out a full-width weight
            out = torch._weight_int8pack_mm(x.reshape(rows, self.in_features), self.weight, self.scales.to(x.dtype))
            out = out.view(*x.shape[:-1], self.out_features)
        else:  # gpt-fast's form: on a GPU torch.compile fuses the conversion into the matmul's loads
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)


# Rows up to which the CPU uses the fused kernel: it is fast for a few bf16 rows (a decode step), slower than
# converting the weight once for a prefill's many rows, and slow for fp32 at any size (bench.py --only quantize).
CPU_FUSED_ROWS = 32


def quantized_names(model) -> list:
    """The linears that become (or are) int8: every one in the decoder layers, and the lm_head."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Int8Linear)) and name.startswith("model.language_model.layers.")] + ["lm_head"]


@torch.no_grad()
def quantize_int8(model):
    """Replace the decoder linears and the lm_head by Int8Linear, in place, one at a time (each bf16 weight is freed
    as its int8 copy appears). On the meta device this only changes the structure, as loading an int8 checkpoint
    needs. Returns the model."""
    for name in quantized_names(model):
        old = model.get_submodule(name)
        new = Int8Linear(old.in_features, old.out_features, False, device="meta")
        new.weight, new.scales = quantize_weight(old.weight)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def is_int8_checkpoint(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        return (json.load(f).get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_int8(path: str, dtype=None, device="cpu"):
    """A GLM4V from an int8 checkpoint: built on the meta device, made int8, then each tensor read into place (the
    full-precision weights never exist). dtype: the compute dtype (default: the checkpoint's, of its scales)."""
    with open(os.path.join(path, "config.json")) as f:
        saved = getattr(torch, json.load(f).get("torch_dtype", "float32"))
    return M.GLM4V.from_pretrained(path, dtype=dtype or saved, device=device, prepare=quantize_int8)


def save_int8(model, path: str):
    """Write a quantized model (quantize_int8) as an int8 checkpoint: config.json + model.safetensors."""
    state = model.state_dict()
    compute = next(t.dtype for t in state.values() if t.is_floating_point())
    M.write_hf_checkpoint(path, model.cfg, state)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["torch_dtype"] = str(compute).replace("torch.", "")
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "scales": "per output channel",
                                     "modules": "decoder linears and lm_head"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def weight_bytes(model) -> int:
    """Bytes of the quantizable linears' weights (and scales): what decoding reads per token, but the embedding."""
    return sum(t.numel() * t.element_size() for name in quantized_names(model)
               for t in (model.get_submodule(name).weight, getattr(model.get_submodule(name), "scales", None))
               if t is not None)


def main(argv=None):
    import data

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Hugging Face-format checkpoint directory to quantize")
    p.add_argument("--out", required=True, help="where the int8 checkpoint goes")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the compute dtype: of the scales and of every tensor that stays unquantized")
    args = p.parse_args(argv)
    try:
        model = M.GLM4V.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype))
        before = weight_bytes(model)
        save_int8(quantize_int8(model), args.out)
        data.load_tokenizer(args.checkpoint).save(args.out)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: decoder linears + lm_head {before / 2 ** 20:.2f} MiB in {args.dtype} → "
          f"{weight_bytes(model) / 2 ** 20:.2f} MiB int8 + scales")


if __name__ == "__main__":
    main()
