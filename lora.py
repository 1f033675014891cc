"""LoRA (Hu et al., arXiv 2106.09685) for GLM-4.1V: fine-tune the 9B on one GPU by training small adapters on a frozen
base — the way most users adapt the released model (LLaMA-Factory, PEFT).

    python sft.py --preset 9b --init-from GLM-4.1V-9B-Thinking --data sft.jsonl --lora-rank 16 --lr 1e-4
    python sft.py ... --lora-rank 16 --lora-export peft     # write a PEFT adapter instead of merged weights

Each chosen linear y = x·Wᵀ + b becomes y = x·Wᵀ + b + (α/r)·x·Aᵀ·Bᵀ with A (r, in) and B (out, r) trainable and W,
b frozen; B starts at zero, so step 0 is exactly the base model. Everything else — embeddings, norms, lm_head, the
ViT and projector — is frozen too. The adapter tensors are named as PEFT names them (`<linear>.lora_A.weight`,
`<linear>.lora_B.weight`), and the base keeps the released tensor names, so a checkpoint's tensors load unchanged.
This file holds the adapter linear, adding adapters to a GLM4V by target name, merging them into full weights, and
the PEFT adapter files (export and import).
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# --lora-targets names → the linears they select in every decoder layer, and with --lora-vision in every ViT block
# (whose attention has one fused qkv, and whose MLP a separate gate and up projection)
DECODER_TARGETS = {"q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
                   "o": ("self_attn.o_proj",), "gate_up": ("mlp.gate_up_proj",), "down": ("mlp.down_proj",)}
VISION_TARGETS = {"q": ("attn.qkv",), "k": ("attn.qkv",), "v": ("attn.qkv",), "o": ("attn.proj",),
                  "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
PEFT_PREFIX = "base_model.model."  # PEFT's names: its wrapper around transformers.Glm4vForConditionalGeneration
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus the trainable low-rank update (α/r)·B·A (LoRA, §4.1 of the paper above)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.scaling = alpha / rank

    def forward(self, x):
        # the adapters may be fp32 beside a bf16 base; outside autocast they follow the input's dtype
        update = F.linear(F.linear(x, self.lora_A.weight.to(x.dtype)), self.lora_B.weight.to(x.dtype))
        return super().forward(x) + update * self.scaling


def parse_targets(text: str) -> list:
    """'q,v' → ['q', 'v'], with a one-line error for an unknown name."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    unknown = [t for t in names if t not in DECODER_TARGETS]
    if unknown or not names:
        raise ValueError(f"--lora-targets must list some of {','.join(DECODER_TARGETS)}, got {text!r}")
    return names


def target_names(model, targets: str, vision: bool) -> list:
    """The names of the linears that --lora-targets (and --lora-vision) select, in module order."""
    keys = parse_targets(targets)
    scopes = {"model.language_model.layers": DECODER_TARGETS}
    if vision:
        scopes["model.visual.blocks"] = VISION_TARGETS
    names = []
    for scope, table in scopes.items():
        chosen = {suffix for key in keys for suffix in table[key]}
        for i, block in enumerate(model.get_submodule(scope)):
            names += [f"{scope}.{i}.{suffix}" for suffix, _ in block.named_modules() if suffix in chosen]
    return names


def add_adapters(model, rank: int, alpha: float, targets: str = "q,k,v,o,gate_up,down", vision: bool = False,
                 names=None):
    """Put a LoRALinear in place of each selected linear (`names`, or those `targets` / `vision` select), keeping
    its weight and bias, and freeze everything but the adapters. On the meta device this is free; on a real one
    the new adapters start as PEFT's (A uniform in ±1/√in, B zero). Returns the model."""
    for name in names if names is not None else target_names(model, targets, vision):
        old = model.get_submodule(name)
        new = LoRALinear(old.in_features, old.out_features, old.bias is not None, rank, alpha, device="meta")
        new.weight, new.bias = old.weight, old.bias
        for adapter in (new.lora_A, new.lora_B):
            adapter.to_empty(device=old.weight.device)
            adapter.weight.data = adapter.weight.data.float()
        if old.weight.device.type != "meta":
            new.lora_A.weight.data.copy_(initial_A(new.lora_A.weight.shape))
            new.lora_B.weight.data.zero_()
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, new)
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return model


def initial_A(shape, generator=None) -> torch.Tensor:
    """PEFT's default A: kaiming-uniform with a = √5, i.e. uniform in ±1/√fan_in (fp32)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(shape[1])


def lora_modules(model) -> dict:
    """{name: LoRALinear} of the model (empty: no adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_adapters(model) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def initial_adapter_state(model, seed: int) -> dict:
    """The starting values of every adapter, by state-dict name: A seeded from `seed`, B zero (fp32, CPU). The
    trainer adds them to the state it loads, so 1 and N processes start from the same adapters."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = initial_A(m.lora_A.weight.shape, generator)
        state[f"{name}.lora_B.weight"] = torch.zeros(m.lora_B.weight.shape)
    return state


def cast_frozen(model, dtype):
    """Store the frozen base in `dtype` (bf16 on a GPU: half the memory of fp32); the adapters stay fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def trainable_state_dict(model, state: dict) -> dict:
    """What a training checkpoint keeps of the model's state dict: with adapters only them (on resume the frozen
    base is rebuilt from --init-from), otherwise everything."""
    return {k: v for k, v in state.items() if ".lora_" in k} if has_adapters(model) else state


# ---------------------------------------------------------------------------------------------------------------
# Merging: the adapters folded into full weights
# ---------------------------------------------------------------------------------------------------------------


def merge_weight(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """W + (α/r)·B·A, computed in fp32, in W's dtype."""
    return (weight.float() + scaling * (lora_B.float() @ lora_A.float())).to(weight.dtype)


def merged_state_dict(model, state: dict) -> dict:
    """A full state dict of `model` (get_model_state_dict) with every adapter folded into its weight and the adapter
    tensors dropped: the plain GLM4V's tensors, as the released checkpoint names them."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, m in lora_modules(model).items():
        merged[f"{name}.weight"] = merge_weight(state[f"{name}.weight"], state[f"{name}.lora_A.weight"],
                                                state[f"{name}.lora_B.weight"], m.scaling)
    return merged


def merged_parameters(model):
    """(name, full tensor) for each parameter of the plain model, in order, adapters folded in; FSDP2 shards are
    gathered one tensor at a time, so every rank must iterate together (RL's rollout-weight refresh)."""
    def full(p):
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    adapted = lora_modules(model)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        module = adapted.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if module is None:
            yield name, full(p)
        else:
            yield name, merge_weight(full(p), full(module.lora_A.weight), full(module.lora_B.weight), module.scaling)


@torch.no_grad()
def merge_adapters(model):
    """Fold every adapter into its linear in place, leaving plain nn.Linear modules (for inference). Returns it."""
    for name, m in lora_modules(model).items():
        plain = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
        plain.weight = nn.Parameter(merge_weight(m.weight, m.lora_A.weight, m.lora_B.weight, m.scaling),
                                    requires_grad=False)
        plain.bias = m.bias
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, plain)
    return model


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapter files: adapter_config.json + adapter_model.safetensors
# ---------------------------------------------------------------------------------------------------------------


def name_pattern(name: str) -> str:
    """A module name as a regular expression that matches it in every layer: layers.3.mlp → layers\\.\\d+\\.mlp."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def save_peft(model, state: dict, path: str, base_model: str = None):
    """The adapters of a full state dict of `model` as a PEFT LoRA adapter directory, which
    `peft.PeftModel.from_pretrained(Glm4vForConditionalGeneration..., path)` loads: tensors
    base_model.model.<linear>.lora_A.weight (r, in) and .lora_B.weight (out, r), and a config whose
    target_modules is a regular expression PEFT matches against whole module names."""
    from safetensors.torch import save_file

    adapted = lora_modules(model)
    if not adapted:
        raise ValueError("the model has no LoRA adapters to save")
    first = next(iter(adapted.values()))
    rank = first.lora_A.out_features
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": rank,
              "lora_alpha": first.scaling * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None,
              "target_modules": "|".join(sorted({name_pattern(name) for name in adapted}))}
    tensors = {PEFT_PREFIX + k: v.detach().float().contiguous().cpu() for k, v in state.items() if ".lora_" in k}
    os.makedirs(path, exist_ok=True)
    weights, config_file = os.path.join(path, PEFT_WEIGHTS), os.path.join(path, PEFT_CONFIG)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})  # renamed into place: never half-written
    with open(config_file + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(config_file + ".tmp", config_file)


def is_peft_adapter(path: str) -> bool:
    return os.path.exists(os.path.join(path, PEFT_CONFIG))


def read_peft_config(path: str) -> dict:
    """adapter_config.json, checked: plain LoRA (no DoRA, rsLoRA, biases or fully trained modules)."""
    with open(os.path.join(path, PEFT_CONFIG)) as f:
        config = json.load(f)
    unsupported = [key for key, plain in (("peft_type", "LORA"), ("use_dora", False), ("use_rslora", False),
                                          ("bias", "none"), ("modules_to_save", None), ("fan_in_fan_out", False))
                   if config.get(key, plain) != plain]
    if unsupported or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}/{PEFT_CONFIG}: only plain LoRA adapters are supported, this one sets "
                         f"{', '.join(unsupported) or 'rank_pattern/alpha_pattern'}")
    return config


@torch.no_grad()
def load_peft(model, path: str):
    """Add the adapters of a PEFT LoRA directory to `model` (a GLM4V holding the adapter's base weights), on the
    linears its tensors name. Returns the model; merge_adapters(model) then folds them in for inference."""
    from safetensors.torch import load_file

    config = read_peft_config(path)
    tensors = load_file(os.path.join(path, PEFT_WEIGHTS))
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), nn.Linear)]
    if missing or not names:
        raise ValueError(f"{path}: adapter tensors for linears this model does not have: {missing[:5]}")
    add_adapters(model, config["r"], config["lora_alpha"], names=names)
    state = {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in state or state[key].shape != getattr(m, part).weight.shape:
                raise ValueError(f"{path}: {PEFT_PREFIX}{key} is missing or misshaped")
            getattr(m, part).weight.copy_(state[key])
    return model
