"""The trainer of GLM-4.1V-Thinking: stage 1 multimodal pretraining and stage 2 long-context continual training
(paper §3); `sft.py` and `rlcs.py` reuse its machinery.

    python pretrain.py --tiny                                   # a tiny GLM-4.1V on a laptop GPU or a CPU, minutes
    python pretrain.py --tiny --stage long --init-from runs/pretrain   # stage 2: longer sequences, video on
    torchrun --nproc_per_node 8 pretrain.py --preset 9b --init-from DIR   # the 9B, FSDP2 over 8 GPUs
    python pretrain.py --preset 9b --dry-run --world-size 64    # parameters, FLOPs/token and memory per GPU

What the paper fixes (§3) and the presets use for the 9B: all parameters trained, sequence packing,
sequence length 8,192 and global batch 1,536 for 120k steps without video in stage 1; 32,768 tokens for +10k steps
with video and long interleaved data in stage 2. Choices that are ours (the paper does not give them): AdamW
(β 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay to 10% of the peak learning rate,
gradient clipping at 1.0, and the global batch counted in packed sequences.

Distributed training is done the torchtitan way: `torchrun`, one process per device (nccl on GPU, gloo on CPU),
FSDP2 `fully_shard` per ViT block and decoder layer then the root, a bf16/fp32 `MixedPrecisionPolicy` on GPU and
no autocast under FSDP. The data order depends only on the global step, so 1 and N processes see the same global
batches and produce the same losses. Training state is checkpointed with `torch.distributed.checkpoint` into a
temporary directory that is renamed into place only when complete, so a crash mid-save never harms the previous
checkpoint; a complete Hugging Face model directory (weights, config, generation config, tokenizer, chat
template, processor configs, model card) is exported at the top of --out.
"""
import argparse
import dataclasses
import datetime
import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import lora
import world
import model as M

# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def _f(default, help):  # a dataclass field that carries its command-line help
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """What every training stage shares: the run, the model, the optimizer and the checkpoints. A field left None
    takes the default of its preset and stage (DEFAULTS here, rlcs.DEFAULTS for RL)."""
    stages: ClassVar[tuple] = ()  # the stages this kind of run can be; the first is the default
    # the run
    preset: str = _f("tiny", "model preset from model.PRESETS (tiny | 9b); with --init-from only its defaults apply")
    stage: str = _f(None, "pretrain (stage 1) | long (stage 2: long context + video) | sft; rl in rlcs.py, reward "
                           "in reward.py")
    out: str = _f(None, "output directory (metrics.jsonl, checkpoints, HF export); default runs/<stage>")
    init_from: str = _f(None, "start from this Hugging Face-format checkpoint directory (e.g. the released 9B)")
    num_layers: int = _f(None, "decoder layers of a model built from the preset, without --init-from (default: the "
                               "preset's)")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --out (refuses changed flags, see "
                             "--allow-changes)")
    allow_changes: str = _f(None, "--resume: comma-separated fields that may differ from the checkpoint's run and "
                                  "then apply (e.g. weight_decay,beta2); --max-steps and --lr may always change")
    max_steps: int = _f(None, "optimizer steps (RL: iterations) (default: per preset and stage)")
    seed: int = _f(0, "seed for weight init, the data order and sampling")
    # the data
    data: str = _f(None, "JSONL file of records (conversations, caption pairs or RL prompts); default: the "
                         "synthetic world")
    tasks: str = _f(None, "synthetic world: comma-separated domains (default: all of the stage's)")
    parse_special_tokens: bool = _f(False, "trusted data: special-token strings typed in message text are the "
                                           "control tokens they name, as transformers' template reads them "
                                           "(default: plain text, so text cannot inject control tokens)")
    levels: str = _f(None, "synthetic world: comma-separated difficulty levels 1-5 (default: all)")
    # the optimizer
    lr: float = _f(None, "peak learning rate (default: per preset and stage)")
    vision_lr_ratio: float = _f(1.0, "the ViT and projector learn at lr × this (the decoder at lr)")
    min_lr_ratio: float = _f(None, "cosine decay ends at lr × this (1: constant)")
    warmup_steps: int = _f(None, "linear warm-up steps (default: 5%% of max_steps; RL: none)")
    weight_decay: float = _f(None, "AdamW weight decay on matrices (norms, biases and the position table: none)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    max_bad_data: float = _f(0.05, "stop when more than this share of the samples read so far was unusable "
                                   "(unreadable images, too long, ...); fewer are skipped and counted")
    # the model while training
    freeze_vision: bool = _f(False, "freeze the ViT (the projector stays trainable)")
    freeze_llm: bool = _f(False, "freeze the language model and lm_head")
    activation_checkpointing: bool = _f(None, "recompute each layer in the backward pass (saves memory; default: "
                                              "on for the 9B)")
    compile: bool = _f(False, "torch.compile each ViT block and decoder layer")
    # LoRA (lora.py): train low-rank adapters on a frozen base instead of every weight
    lora_rank: int = _f(0, "LoRA rank r: freeze the whole model and train rank-r adapters on the --lora-targets "
                           "linears (0: full fine-tuning); LoRA wants a higher --lr than full training, e.g. 1e-4")
    lora_alpha: float = _f(None, "LoRA alpha: the adapters' update is scaled by alpha / r (default: 2r)")
    lora_targets: str = _f("q,k,v,o,gate_up,down", "comma-separated linears of every decoder layer that get adapters")
    lora_vision: bool = _f(False, "LoRA: adapters on the ViT blocks' linears too (q,k,v: the fused qkv; o: proj)")
    lora_export: str = _f("merged", "LoRA export: merged (full Hugging Face weights with the adapters folded in) | "
                                    "peft (adapter_config.json + adapter_model.safetensors for peft)")
    # checkpoints
    save_every: int = _f(None, "checkpoint every N steps (0: only by time, on a signal and at the end; default: per "
                               "preset and stage)")
    save_minutes: float = _f(30.0, "also checkpoint when this many minutes passed since the last one (0: never by "
                                   "time); SIGTERM/SIGINT always save before the run stops")
    keep_checkpoints: int = _f(2, "how many training checkpoints to keep")
    hang_timeout: float = _f(600.0, "under torchrun: seconds a rank may fall behind the others before the job ends "
                                    "with an error naming it")
    report_to: str = _f(None, "also log every metrics.jsonl row to tensorboard (OUT/tensorboard) or wandb (needs "
                              "that package; default: metrics.jsonl only)")


@dataclass
class TrainConfig(RunConfig):
    """Pretraining, long-context training and SFT: this trainer (pretrain.py, sft.py)."""
    stages: ClassVar[tuple] = ("pretrain", "long", "sft")
    seq_len: int = _f(None, "tokens per packed sequence (default: per preset and stage)")
    global_batch: int = _f(None, "packed sequences per optimizer step, across all processes (default: per preset)")
    no_think_share: float = _f(None, "SFT: share of conversations trained with an empty <think></think>, on the "
                                     "synthetic world and on --data records without a 'thinking' field (makes "
                                     "--no-think work; default 0.1)")
    num_workers: int = _f(0, "DataLoader workers rendering batches in the background")
    dry_run: bool = _f(False, "build on the meta device, print parameters, FLOPs/token and memory per GPU, exit")
    world_size: int = _f(None, "--dry-run: plan for this many GPUs (default: the current world size)")


# The defaults of the None fields: per stage, then per (preset, stage) — the paper's numbers for the 9B (paper §3),
# a laptop-sized version of them for tiny. The optimizer and schedule are ours: AdamW (β 0.9/0.95, weight decay
# 0.1 on matrices), linear warm-up, cosine decay to 10% of the peak.
DEFAULTS = {
    "pretrain": dict(min_lr_ratio=0.1, weight_decay=0.1, activation_checkpointing=False),
    "long": dict(min_lr_ratio=0.1, weight_decay=0.1, activation_checkpointing=False),
    "sft": dict(min_lr_ratio=0.1, weight_decay=0.1, activation_checkpointing=False, no_think_share=0.1),
    ("9b", "pretrain"): dict(seq_len=8192, global_batch=1536, max_steps=120_000, lr=2e-4, save_every=1000,
                             activation_checkpointing=True),
    ("9b", "long"): dict(seq_len=32768, global_batch=384, max_steps=10_000, lr=5e-5, save_every=500,
                         activation_checkpointing=True),
    ("9b", "sft"): dict(seq_len=32768, global_batch=32, max_steps=3000, lr=1e-5, save_every=500,
                        activation_checkpointing=True),
    # tiny: 1e-3, not 2e-3, at which the from-scratch ViT collapses (README, "Train")
    ("tiny", "pretrain"): dict(seq_len=512, global_batch=8, max_steps=300, lr=1e-3, save_every=100),
    ("tiny", "long"): dict(seq_len=1024, global_batch=4, max_steps=50, lr=5e-4, save_every=25),
    ("tiny", "sft"): dict(seq_len=512, global_batch=8, max_steps=300, lr=5e-4, save_every=100),
}


def resolve_run(cfg: RunConfig, defaults: dict) -> RunConfig:
    """Check the fields every stage shares and fill the None ones from `defaults` (see DEFAULTS)."""
    cfg.stage = cfg.stage or cfg.stages[0]
    if cfg.stage not in cfg.stages:
        raise ValueError(f"--stage must be one of {', '.join(cfg.stages)}, not {cfg.stage!r}")
    if cfg.preset not in M.PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(M.PRESETS)}, not {cfg.preset!r}")
    for key, value in {**defaults.get(cfg.stage, {}), **defaults.get((cfg.preset, cfg.stage), {})}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.num_layers is not None and cfg.init_from:
        raise ValueError("--num-layers builds a model from the preset; a model from --init-from keeps its layers")
    if cfg.num_layers is not None and cfg.num_layers < 1:
        raise ValueError(f"--num-layers must be positive, got {cfg.num_layers}")
    for f in dataclasses.fields(cfg):  # a NaN slips through every comparison below
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= cfg.max_bad_data <= 1:
        raise ValueError(f"--max-bad-data is a share between 0 and 1, got {cfg.max_bad_data}")
    if cfg.report_to not in (None, "tensorboard", "wandb"):
        raise ValueError(f"--report-to must be tensorboard or wandb, not {cfg.report_to!r}")
    if cfg.vision_lr_ratio <= 0:
        raise ValueError(f"--vision-lr-ratio must be positive (--freeze-vision freezes the ViT), "
                         f"got {cfg.vision_lr_ratio}")
    check_lora(cfg)
    cfg.out = cfg.out or os.path.join("runs", cfg.stage)
    return cfg


def check_lora(cfg: RunConfig):
    """Check the LoRA flags; --lora-alpha defaults to 2r (LLaMA-Factory's default)."""
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {cfg.lora_rank}")
    if not cfg.lora_rank:
        return
    lora.parse_targets(cfg.lora_targets)
    cfg.lora_alpha = cfg.lora_alpha or 2.0 * cfg.lora_rank
    if cfg.lora_export not in ("merged", "peft"):
        raise ValueError(f"--lora-export must be merged or peft, not {cfg.lora_export!r}")
    if cfg.lora_export == "peft" and not cfg.init_from:
        raise ValueError("--lora-export peft needs --init-from: a PEFT adapter names the base checkpoint it applies to")


def resolve(tc: TrainConfig) -> TrainConfig:
    if tc.no_think_share is not None and (tc.stage or tc.stages[0]) != "sft":
        raise ValueError("--no-think-share shapes SFT replies; it does nothing for --stage "
                         f"{tc.stage or tc.stages[0]} (use sft.py or --stage sft)")
    resolve_run(tc, DEFAULTS)
    if tc.no_think_share is not None and not 0 <= tc.no_think_share <= 1:
        raise ValueError(f"--no-think-share must be within [0, 1], got {tc.no_think_share}")
    if tc.warmup_steps is None:
        tc.warmup_steps = max(1, tc.max_steps // 20)
    return tc


def build_parser(config_class, description: str, defaults: dict = None) -> argparse.ArgumentParser:
    """One --kebab-case flag per field of `config_class`, typed from its annotation, with its help string;
    `defaults` overrides field defaults (sft.py: --stage sft)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="shorthand for --preset tiny")
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.type, default=default, help=f.metadata["help"])
    parser.add_argument("--config", dest="preset", help="alias of --preset")
    return parser


def config_from_args(args, config_class=None, resolve_fn=None):
    """The parsed flags as a resolved config (TrainConfig by default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class or TrainConfig)}
    if args.tiny:
        values["preset"] = "tiny"
    return (resolve_fn or resolve)((config_class or TrainConfig)(**values))


# ---------------------------------------------------------------------------------------------------------------
# Distributed setup, model, optimizer
# ---------------------------------------------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """A run that must stop, with a message for the user (divergence, a hung rank, too much bad data)."""


_monitor_group = None  # a gloo group for heartbeats, which can name the rank that is missing


def setup_distributed(hang_timeout: float = 600.0):
    """(rank, world, device). Under torchrun: one process per device, nccl on GPU, gloo on CPU; a collective that
    waits longer than hang_timeout seconds fails instead of waiting for the default half hour."""
    global _monitor_group
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timeout = datetime.timedelta(seconds=hang_timeout)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timeout)
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        device = torch.device("cpu")
    _monitor_group = dist.new_group(backend="gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def heartbeat(hang_timeout: float, where: str):
    """Every rank checks in before a step: a rank that hangs (in its data, on its GPU) is named within
    hang_timeout seconds and the job ends, instead of the others waiting in their next collective."""
    if _monitor_group is None or not dist.is_initialized():
        return
    try:
        dist.monitored_barrier(group=_monitor_group, timeout=datetime.timedelta(seconds=hang_timeout))
    except RuntimeError as e:  # gloo says e.g. "Rank 1 failed to pass monitoredBarrier in 10000 ms"
        raise TrainingError(f"{where}: {str(e).splitlines()[0]} — that rank hung for more than {hang_timeout:g} s "
                            "(--hang-timeout); stopping the job") from e


def teardown_distributed():
    """Leave the process group together: without the barrier a 2-process gloo run on CPU now and then aborted at
    exit ("terminate called without an active exception") after finishing its work."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def log(*args, rank=None):
    if (rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)) == 0:
        print(*args, flush=True)


def preset_config(run: RunConfig) -> M.Config:
    """The preset's model config, with --num-layers decoder layers when given."""
    cfg = M.PRESETS[run.preset]
    return dataclasses.replace(cfg, num_hidden_layers=run.num_layers) if run.num_layers else cfg


def initial_state(run: RunConfig, rank: int):
    """(model Config, full state dict on rank 0 — {} on other ranks — and the tokenizer)."""
    if run.init_from:
        M.check_checkpoint_dir(run.init_from)
        cfg = M.Config.from_hf(run.init_from)
        tokenizer_path = os.path.join(run.init_from, "tokenizer.json")
        if not os.path.exists(tokenizer_path):
            raise FileNotFoundError(f"{tokenizer_path} is missing: a checkpoint directory must carry its tokenizer")
        tokenizer = data.load_tokenizer(tokenizer_path)
        tokenizer.parse_special_tokens = run.parse_special_tokens
        state = M.GLM4V.from_pretrained(run.init_from, dtype=torch.float32).state_dict() if rank == 0 else {}
        return cfg, state, tokenizer
    cfg = preset_config(run)
    if run.preset != "tiny":
        raise ValueError(f"training the {run.preset} preset from scratch needs its tokenizer: pass --init-from DIR "
                         "(a checkpoint directory with tokenizer.json, e.g. the released GLM-4.1V-9B-Thinking)")
    tokenizer = data.tiny_tokenizer()
    tokenizer.parse_special_tokens = run.parse_special_tokens
    if rank != 0:
        return cfg, {}, tokenizer
    torch.manual_seed(run.seed)
    return cfg, M.GLM4V(cfg).init_weights().state_dict(), tokenizer


def build_model(run: RunConfig, cfg: M.Config, state: dict, device, world: int, model_class=M.GLM4V):
    """The model (a GLM4V, or reward.RewardModel) on `device`, frozen parts marked, FSDP2-sharded when world > 1,
    holding `state`."""
    with torch.device("meta"):
        model = model_class(cfg)
    if run.freeze_vision:  # the ViT; the projector (downsample + merger) keeps learning
        for name, p in model.model.visual.named_parameters():
            p.requires_grad = name.startswith(("downsample", "merger"))
    if run.freeze_llm:
        for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]:
            p.requires_grad = False
    if run.lora_rank:  # the whole base frozen (bf16 on a GPU), adapters added; their start values join the state
        lora.add_adapters(model, run.lora_rank, run.lora_alpha, run.lora_targets, run.lora_vision)
        if device.type == "cuda":
            lora.cast_frozen(model, torch.bfloat16)
        state = {**state, **lora.initial_adapter_state(model, run.seed)} if state else state
    blocks = [*model.model.visual.blocks, *model.model.language_model.layers]
    for block in blocks:
        block.activation_checkpointing = run.activation_checkpointing
        if run.compile:
            block.compile()
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        # our forward returns views of its packed outputs; nothing modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute with fp32 master weights and fp32 gradient reduction on GPU; plain fp32 on CPU
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
            else MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device=device)
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.to_empty(device=device)
        model.load_state_dict(state)
    return model


def build_optimizer(model, run: RunConfig, device):
    """AdamW in four groups: {decoder, ViT + projector} × {matrices (weight decay), the rest}; each group's
    `lr_scale` multiplies the scheduled learning rate (set_lr)."""
    groups = []
    for vision in (False, True):
        for decay in (True, False):
            params = [p for n, p in model.named_parameters() if p.requires_grad and ("visual" in n) == vision
                      and (p.dim() >= 2 and "position_embedding" not in n) == decay]
            if params:
                groups.append({"params": params, "decay": decay, "vision": vision})
    optimizer = torch.optim.AdamW(groups, lr=run.lr, fused=device.type == "cuda")
    set_hyperparameters(optimizer, run)
    return optimizer


def set_hyperparameters(optimizer, run: RunConfig):
    """Weight decay, betas and each group's lr_scale from the config: at the start, and again after a resume has
    loaded the checkpoint's optimizer state (so that --allow-changes weight_decay,... really applies)."""
    for group in optimizer.param_groups:
        group.update(weight_decay=run.weight_decay if group["decay"] else 0.0, betas=(run.beta1, run.beta2),
                     lr_scale=run.vision_lr_ratio if group["vision"] else 1.0)


def set_lr(optimizer, lr: float):
    """The scheduled learning rate, times each group's lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_at(step: int, run: RunConfig) -> float:
    """Linear warm-up, then cosine decay to lr × min_lr_ratio at max_steps."""
    if step < run.warmup_steps:
        return run.lr * (step + 1) / run.warmup_steps
    progress = min(1.0, (step - run.warmup_steps) / max(1, run.max_steps - run.warmup_steps))
    return run.lr * (run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and memory (for MFU and --dry-run)
# ---------------------------------------------------------------------------------------------------------------

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "4090": 165e12}


def peak_flops(device) -> float:
    """Dense bf16 peak of this device (0 on CPU or an unknown GPU: no MFU then)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)


def flops_per_token(cfg: M.Config, seq_len: int, frozen: bool = False) -> float:
    """Training FLOPs per text token: 6 × (decoder matmul parameters + lm_head) plus causal attention
    (6 · layers · seq_len · heads · head_dim, i.e. 12·L·T·H·D halved for causality). Vision adds per patch
    6 × ViT parameters + 12 · depth · patches_per_image · hidden, reported separately. `frozen` (LoRA): the base
    weights get no weight gradients, 4 × instead of 6 × (the small adapters are not counted)."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    per_layer = h * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2) \
        + 3 * h * cfg.intermediate_size
    return (4 if frozen else 6) * (L * per_layer + h * cfg.vocab_size) \
        + 6 * L * seq_len * cfg.num_attention_heads * cfg.head_dim


def memory_plan(cfg: M.Config, tc: TrainConfig, world: int) -> dict:
    """Estimated GiB per GPU under FSDP2 full sharding with bf16 compute and fp32 master weights + AdamW; with LoRA
    a frozen bf16 base and fp32 adapters (gradients and AdamW moments only for those), unsharded on one GPU."""
    with torch.device("meta"):
        m = M.GLM4V(cfg)
    params = sum(p.numel() for p in m.parameters())
    layer = max(sum(p.numel() for p in b.parameters()) for b in m.model.language_model.layers)
    T, h, inter = tc.seq_len, cfg.hidden_size, cfg.intermediate_size
    gib = 2 ** 30
    if tc.activation_checkpointing:  # each layer keeps its bf16 input; one layer is live in the backward pass
        acts = cfg.num_hidden_layers * T * h * 2 + T * (10 * h + 5 * inter) * 2
    else:  # ~10 hidden-wide and ~5 intermediate-wide bf16 tensors saved per token and layer
        acts = cfg.num_hidden_layers * T * (10 * h + 5 * inter) * 2
    if tc.lora_rank:
        adapters = lora_parameters(m, tc)
        plan = {"frozen base (bf16" + (", sharded)" if world > 1 else ")"): 2 * params / world / gib,
                f"LoRA adapters r={tc.lora_rank}: {adapters / 1e6:.1f}M × fp32 weights, gradients, AdamW":
                    16 * adapters / world / gib}
    else:
        plan = {"parameters (fp32, sharded)": 4 * params / world / gib,
                "gradients (fp32, sharded)": 4 * params / world / gib,
                "AdamW moments (fp32, sharded)": 8 * params / world / gib}
    if world > 1 or not tc.lora_rank:
        plan["gathered bf16 layers (current + prefetch)"] = 2 * 2 * layer / gib
    plan.update({f"activations ({T} tokens per micro-batch)": acts / gib,
                 "logits chunk (4096 × vocab, fp32, fwd + bwd)": 2 * 4096 * cfg.vocab_size * 4 / gib})
    plan["total"] = sum(plan.values())
    return plan


def lora_parameters(meta_model, run: RunConfig) -> int:
    """The trainable parameters of run's LoRA adapters on a meta-device model (which gains them)."""
    lora.add_adapters(meta_model, run.lora_rank, run.lora_alpha, run.lora_targets, run.lora_vision)
    return sum(p.numel() for p in meta_model.parameters() if p.requires_grad)


def dry_run(tc: TrainConfig, world: int):
    cfg = M.Config.from_hf(tc.init_from) if tc.init_from else preset_config(tc)
    with torch.device("meta"):
        m = M.GLM4V(cfg)
    total = sum(p.numel() for p in m.parameters())
    vision = sum(p.numel() for p in m.model.visual.parameters())
    print(f"model: {tc.preset if not tc.init_from else tc.init_from}  parameters {total:,} "
          f"(vision {vision:,}, language {total - vision:,})")
    if tc.lora_rank:
        print(f"LoRA r={tc.lora_rank} alpha={tc.lora_alpha:g} on {tc.lora_targets}{' + ViT' if tc.lora_vision else ''}:"
              f" {lora_parameters(m, tc):,} trainable parameters, the rest frozen")
    flops = flops_per_token(cfg, tc.seq_len, bool(tc.lora_rank))
    print(f"training FLOPs per text token at seq_len {tc.seq_len}: {flops / 1e9:.1f} GFLOP")
    tokens = tc.global_batch * tc.seq_len
    print(f"global batch {tc.global_batch} × {tc.seq_len} = {tokens:,} tokens/step; {tc.max_steps:,} steps = "
          f"{tokens * tc.max_steps / 1e9:.1f}B tokens")
    sharding = "FSDP2 full sharding" if world > 1 else "one process, no sharding"
    print(f"memory per GPU, world size {world}, {sharding}, activation checkpointing "
          f"{'on' if tc.activation_checkpointing else 'off'}:")
    for key, gib in memory_plan(cfg, tc, world).items():
        print(f"  {key:60s} {gib:8.1f} GiB")
    print(f"each process runs {tc.global_batch // max(1, world)} packed sequences per step (gradient accumulation)")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: sharded training state (DCP, atomic) and the Hugging Face export
# ---------------------------------------------------------------------------------------------------------------


def is_complete(path: str) -> bool:
    """A training checkpoint that was written to the end: DCP's metadata and the trainer state are there."""
    try:
        with open(os.path.join(path, "trainer_rank0.json")) as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return os.path.exists(os.path.join(path, ".metadata"))


def latest_checkpoint(out: str):
    """The newest complete checkpoint in out/checkpoints: the `latest` pointer's, or — when it points at a missing
    or broken one — the newest complete step_N (said so); None when there is none."""
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return None
    pointer, named = os.path.join(root, "latest"), None
    if os.path.exists(pointer):
        with open(pointer) as f:
            named = os.path.join(root, f.read().strip())
        if is_complete(named):
            return named
    steps = sorted((d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")), reverse=True)
    newest = next((os.path.join(root, d) for d in steps if is_complete(os.path.join(root, d))), None)
    if named and newest:
        log(f"warning: {pointer} names {os.path.basename(named)}, which is missing or incomplete; using "
            f"{os.path.basename(newest)}, the newest complete checkpoint")
    return newest


def write_atomic(path: str, text: str):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise disk_error(e, path) from e


def disk_error(e: OSError, path: str) -> OSError:
    """One line for a failed write; "no space left" names the directory."""
    if getattr(e, "errno", None) == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on the device of {os.path.dirname(os.path.abspath(path))}: "
                                     "nothing was written there (earlier checkpoints are intact)")
    return e


def weights_finite(model) -> bool:
    """True when every parameter (this rank's shards, under FSDP every rank's) is finite."""
    bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
              for p in model.parameters())
    device = next(model.parameters()).device
    return int(all_reduce_sum(torch.tensor(float(bad), device=device)).item()) == 0


def save_training_state(model, optimizer, trainer_state: dict, out: str, step: int, rank: int, keep: int):
    """Model + optimizer shards via torch.distributed.checkpoint, plus the trainer's own state (step, data
    position, RNG, the run's config) as JSON, written to a temporary directory that becomes `step_N` — and the
    `latest` pointer — only once every rank has finished. A crash at any moment leaves the previous checkpoint
    usable; weights that are not finite are never written, and a full disk removes the partial directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if not weights_finite(model):
        raise TrainingError(f"step {step}: the weights are not finite; not saving them (last checkpoint: "
                            f"{latest_checkpoint(out) or 'none'})")
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    model_state = lora.trainable_state_dict(model, model_state)  # LoRA: only the adapters
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: that is intended
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        with open(os.path.join(tmp, f"trainer_rank{rank}.json"), "w") as f:
            json.dump({**trainer_state, "rng": rng_state()}, f)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as ENOSPC or as torch's "unexpected pos"
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ENOSPC
        raise disk_error(OSError(errno.ENOSPC, str(e)) if full else e, tmp) from e
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_atomic(os.path.join(root, "latest"), os.path.basename(final))
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()


def load_training_state(model, optimizer, path: str, rank: int) -> dict:
    """The checkpoint at `path` into model and optimizer (all of it, or an error listing what does not match —
    never a partial load), this rank's RNG restored; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    model_state = lora.trainable_state_dict(model, model_state)  # LoRA: the adapters only
    stored = {k[len("model."):] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
              if k.startswith("model.")}
    missing, unexpected = sorted(set(model_state) - stored), sorted(stored - set(model_state))
    if missing or unexpected:
        raise ValueError(f"{path} holds a different model: {len(missing)} tensors missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); resume with the "
                         "flags that made it, or start a new --out")
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # DCP reports a shape mismatch (or a damaged shard) as a CheckpointException
        raise ValueError(f"{path} does not fit this model ({str(e).splitlines()[0][:300]})") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=not lora.has_adapters(model)))
    own = os.path.join(path, f"trainer_rank{rank}.json")
    with open(own if os.path.exists(own) else os.path.join(path, "trainer_rank0.json")) as f:
        trainer_state = json.load(f)
    if os.path.exists(own):  # same world size: each rank gets its RNG back
        set_rng_state(trainer_state["rng"])
    return trainer_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# What an --init-from directory brings that the export keeps unchanged: how its tokenizer, chat template, processor
# and generation defaults were released (the legacy names too, which transformers still reads).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                 "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                 "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


def export_hf(model, cfg: M.Config, tokenizer, out: str, rank: int, run: RunConfig = None, step: int = None):
    """A complete Hugging Face model directory at the top of `out`, laid out like the released one: config.json,
    generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
    preprocessor_config.json, video_preprocessor_config.json and a README.md model card. The files of
    CARRIED_FILES that `run.init_from` has are copied unchanged; the rest are ours. Everything is written next to
    the old files and moved over them one by one, config.json last, so a reader never sees a half-written file. A LoRA
    model's adapters are merged into full weights, or with --lora-export peft written alone as a PEFT adapter of
    `run.init_from`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0 and lora.has_adapters(model):
        if run is not None and run.lora_export == "peft":  # adapter_config.json, adapter_model.safetensors, tokenizer
            lora.save_peft(model, state, out, run.init_from)
            tokenizer.save(out)
            barrier()
            return
        state = lora.merged_state_dict(model, state)
    if rank == 0:
        tmp = os.path.join(out, ".export.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            M.write_hf_checkpoint(tmp, cfg, state)
            data.save_hf_files(tmp, tokenizer, cfg.max_position_embeddings)
        except OSError as e:  # a full disk: no half-written export beside the last complete one
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_error(e, tmp) from e
        source = run.init_from if run is not None and run.init_from else None
        carried = [n for n in CARRIED_FILES if source and os.path.isfile(os.path.join(source, n))]
        for name in carried:
            shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
        if "chat_template.json" in carried and "chat_template.jinja" not in carried:
            os.remove(os.path.join(tmp, "chat_template.jinja"))  # the released template, not ours beside it
        if run is not None:
            write_atomic(os.path.join(tmp, "README.md"), model_card(run, step, out, carried))
        for stale in os.listdir(out):  # shards (or a template) of an earlier export that this one does not have
            shard = stale.startswith("model") and stale.endswith((".safetensors", ".json"))
            if (shard or stale == "chat_template.jinja") and not os.path.exists(os.path.join(tmp, stale)):
                os.remove(os.path.join(out, stale))
        for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config last
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()


def model_card(run: RunConfig, step: int, out: str, carried) -> str:
    """README.md of an export: what was trained, from what, on which data, for how many steps, and its held-out
    accuracy when `evaluate.py` has written an eval.json into the directory."""
    data_text = f"`{os.path.basename(run.data)}`" if run.data else \
        f"the synthetic world (domains: {run.tasks or 'all'}; levels: {run.levels or 'all'})"
    start = f"`{run.init_from}`" if run.init_from else f"random weights (preset `{run.preset}`)"
    script = {"rl": "rlcs.py", "sft": "sft.py"}.get(run.stage, "pretrain.py")
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [glm4v]", "---", "",
             f"# GLM-4.1V-Thinking: {run.stage}", "", f"- stage: {run.stage} ({script})",
             f"- started from: {start}", f"- data: {data_text}",
             f"- steps: {step if step is not None else '?'} of {run.max_steps}",
             f"- files kept from the starting directory: {', '.join(carried) if carried else 'none'}"]
    evaluation = os.path.join(out, "eval.json")
    if os.path.exists(evaluation):
        with open(evaluation) as f:
            result = json.load(f)
        scores = {k: v for k, v in result.items() if k not in ("n_per_domain", "seed", "temperature")
                  and isinstance(v, float)}
        lines.append(f"- held-out accuracy (eval.json, {result.get('n_per_domain')} items per domain): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    lines += ["", "Load it with `transformers` (`Glm4vForConditionalGeneration`, `AutoProcessor`) or with "
              "`model.GLM4V.from_pretrained` / `sample.py --checkpoint` of this repository.", ""]
    return "\n".join(lines)


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def data_source(tc: TrainConfig):
    """The stage's data: the --data file (JSONL or a JSON array; SFT's no-think share applies to it too) when
    given, else the synthetic world — captions for pretraining (no video in stage 1, paper §3.2), reasoning
    conversations for SFT."""
    if tc.data:
        return data.JsonlSource(tc.data, no_think_share=tc.no_think_share or 0.0, seed=tc.seed)
    levels = tuple(int(x) for x in tc.levels.split(",")) if tc.levels else world.LEVELS
    if tc.tasks:
        tasks = tuple(tc.tasks.split(","))
    else:
        tasks = world.TASKS if tc.stage != "pretrain" else tuple(t for t in world.TASKS if t != "video_grounding")
    if tc.stage == "sft":
        return world.SyntheticSource(kind="sft", split="train", seed=tc.seed, tasks=tasks, levels=levels,
                                    no_think_share=tc.no_think_share)
    return world.SyntheticSource(kind="caption", split="train", seed=tc.seed, tasks=tasks, levels=levels)


MODEL_INPUTS = ("input_ids", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "labels")


def to_device(batch: dict, device) -> dict:
    return {k: (batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None) for k in MODEL_INPUTS}


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl, one JSON object per step; on resume, lines after the resumed step are dropped, and a line a
    crash tore in half is dropped with a warning. With report_to ("tensorboard" | "wandb") every row's numbers also
    go to that tracker, at the row's step."""

    def __init__(self, out: str, rank: int, resume_step: int, report_to: str = None):
        self.path, self.rank, self.log_to = os.path.join(out, "metrics.jsonl"), rank, None
        if rank == 0:
            kept = []
            if resume_step and os.path.exists(self.path):
                with open(self.path) as f:
                    for lineno, line in enumerate(f, 1):
                        try:
                            if line.strip() and json.loads(line)["step"] <= resume_step:
                                kept.append(line.rstrip("\n") + "\n")
                        except (ValueError, KeyError, TypeError):
                            log(f"warning: {self.path}:{lineno}: dropping a torn or foreign line ({line[:60]!r})")
            write_atomic(self.path, "".join(kept))
            if report_to:
                self.log_to = tracker(report_to, out)

    def write(self, row: dict):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.log_to:
                self.log_to({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                             and not isinstance(v, bool)}, row["step"])


def tracker(name: str, out: str):
    """A function (numbers, step) that logs to TensorBoard (event files in OUT/tensorboard) or Weights & Biases
    (a run named after OUT, configured with the run's *_config.json); the package is imported only here."""
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
        else:
            import wandb
    except ImportError as e:
        raise ImportError(f"--report-to {name} needs the {name} package: pip install {name}") from e
    if name == "tensorboard":
        writer = SummaryWriter(os.path.join(out, "tensorboard"))

        def log(numbers, step):
            for key, value in numbers.items():
                writer.add_scalar(key, value, step)
            writer.flush()  # a crash loses no step the metrics file has
        return log
    config = {}
    for file in ("train_config.json", "rl_config.json"):
        if os.path.exists(os.path.join(out, file)):
            with open(os.path.join(out, file)) as f:
                config.update(json.load(f))
    run = wandb.init(project="glm4v", name=os.path.basename(os.path.abspath(out)), dir=out, config=config)
    return lambda numbers, step: run.log(numbers, step=step)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value)
    return value


def train_step(model, optimizer, batches, device, world: int, autocast, grad_clip: float, before_update=None):
    """Forward + backward over this rank's packed sequences (gradient accumulation), then clip and step.
    The loss is the mean over every label token of the *global* batch, so any split across processes and
    micro-batches gives the same update. before_update(ok) runs while the weights are still the step's inputs.
    Returns (loss, grad_norm, tokens, ok) — ok False: a non-finite loss or gradient, the update skipped."""
    local_targets = sum(int((b["labels"] != -100).sum()) for b in batches)
    n_targets = int(all_reduce_sum(torch.tensor(float(local_targets), device=device)).item())
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(batches) - 1)
        with autocast:
            logprobs = model(**to_device(batch, device))
        nll = -logprobs.float().sum()
        # FSDP averages gradients over ranks; × world turns that into the sum over the global batch
        (nll * world / max(n_targets, 1)).backward()
        loss_sum += nll.detach()
    loss = all_reduce_sum(loss_sum) / max(n_targets, 1)
    grad_norm, ok = clip_and_step(model, optimizer, grad_clip, bool(torch.isfinite(loss)), before_update)
    tokens = sum(int(b["cu_seqlens"][-1]) for b in batches)
    return float(loss), grad_norm, tokens, ok


def clip_and_step(model, optimizer, grad_clip: float, loss_ok: bool, before_update=None):
    """Clip the global gradient norm (0: only measure it), then step unless the loss or the norm is not finite;
    the gradients are cleared either way. before_update(ok) runs first. Returns (grad_norm, ok)."""
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    ok = loss_ok and bool(torch.isfinite(grad_norm))
    if before_update is not None:
        before_update(ok)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), ok


# Fields that a resumed run may change without saying so: how long it runs, the learning rate, how it saves,
# logs and uses the machine. Every other difference from the checkpoint's run needs --allow-changes.
FREE_TO_CHANGE = {"max_steps", "lr", "resume", "allow_changes", "out", "save_every", "save_minutes",
                  "keep_checkpoints", "num_workers", "compile", "activation_checkpointing", "max_bad_steps",
                  "max_bad_data", "hang_timeout", "dry_run", "world_size", "report_to", "eval_every", "eval_n",
                  "max_rollouts", "rollout_batch", "micro_batch"}
DATA_FIELDS = {"stage", "data", "tasks", "levels", "seed", "no_think_share", "seq_len", "global_batch", "pool_size"}


def checkpoint_to_resume(run: RunConfig):
    """The checkpoint --resume continues from (None: a fresh run); a fresh run never overwrites an earlier one."""
    if os.path.exists(run.out) and not os.path.isdir(run.out):
        raise NotADirectoryError(f"--out {run.out} is a file; it must be a directory")
    os.makedirs(run.out, exist_ok=True)
    latest = latest_checkpoint(run.out)
    if latest and not run.resume:
        raise FileExistsError(f"{run.out} already holds a training checkpoint: pass --resume to continue it, or "
                              "choose another --out")
    if run.resume:
        log(f"resuming from {latest}" if latest else f"no checkpoint in {run.out}, starting fresh")
    return latest if run.resume else None


def resume_changes(run: RunConfig, checkpoint: str) -> dict:
    """{field: (old, new)} between the checkpoint's run and this one. Refused, with the list, unless every changed
    field is free to change (FREE_TO_CHANGE) or named in --allow-changes; the changes are printed."""
    with open(os.path.join(checkpoint, "trainer_rank0.json")) as f:
        before = json.load(f).get("config")
    now = dataclasses.asdict(run)
    allowed = {name.strip() for name in (run.allow_changes or "").split(",") if name.strip()}
    unknown = sorted(allowed - set(now))
    if unknown:
        raise ValueError(f"--allow-changes names {', '.join(unknown)}, which are not fields of this run")
    if before is None:  # a checkpoint written before runs recorded their config
        log(f"warning: {checkpoint} does not record its run's flags; resuming without comparing them")
        return {}
    changes = {k: (before.get(k), v) for k, v in now.items() if k in before and before[k] != v}
    refused = [k for k in changes if k not in FREE_TO_CHANGE | allowed]
    if refused:
        raise ValueError("--resume would change what the checkpoint's run used: " + "; ".join(
            f"--{k.replace('_', '-')} {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
            + f". Pass --allow-changes {','.join(refused)} to apply them, or start a new --out")
    for k, (old, new) in changes.items():
        if k not in ("resume", "allow_changes"):
            log(f"resume: --{k.replace('_', '-')} {old!r} -> {new!r}")
    return changes


def record_segment(path: str, key: str, run: RunConfig, step: int, changes: dict, **extra):
    """Append this (re)start to the run's config file: what each segment of the run used, from which step."""
    segments = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                segments = json.load(f).get("segments", [])
        except (OSError, ValueError, AttributeError):
            log(f"warning: {path} is unreadable; starting its list of segments anew")
    segments.append({"from_step": step, key: dataclasses.asdict(run),
                     "changes": {k: list(v) for k, v in changes.items()}, **extra})
    write_atomic(path, json.dumps({"segments": segments}, indent=2))


class SaveSchedule:
    """When to checkpoint: every save_every steps, at least every save_minutes, at the end, and at once on SIGTERM or
    SIGINT (a cluster sends SIGTERM before it kills a preempted job; a second Ctrl-C interrupts). Every rank takes
    the same decision: a signal or the clock of any rank counts for all."""

    def __init__(self, run: RunConfig, device):
        self.every, self.minutes, self.device = run.save_every, run.save_minutes, device
        self.last, self.signal, self.previous = time.monotonic(), None, {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def due(self, step: int, last_step: int):
        """"signal", "end", "every", "time" or None for the step just finished."""
        late = bool(self.minutes) and time.monotonic() - self.last > 60 * self.minutes
        flags = all_reduce_sum(torch.tensor([float(self.signal is not None), float(late)], device=self.device))
        if flags[0] > 0:
            return "signal"
        if step >= last_step:
            return "end"
        if self.every and step % self.every == 0:
            return "every"
        return "time" if flags[1] > 0 else None

    def saved(self):
        self.last = time.monotonic()

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def stop_message(self, step: int, out: str) -> str:
        return (f"stopped by {signal.Signals(self.signal).name} after step {step}; checkpoint "
                f"{latest_checkpoint(out)} saved — continue with --resume")

    def save_if_due(self, reason, ok: bool, save, step: int, out: str):
        """save() when `reason` (from due) asks for it: at the end and on a signal always, otherwise only after a
        step whose update was not skipped as non-finite; on a signal the job then stops (SystemExit)."""
        if reason in ("signal", "end") or (reason and ok):
            save()
            self.saved()
        if reason == "signal":
            teardown_distributed()
            raise SystemExit(self.stop_message(step, out))


def autocast_for(device, world: int):
    """bf16 autocast on a single GPU; under FSDP the MixedPrecisionPolicy casts instead, and a CPU trains in fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=world == 1)
    return torch.autocast("cpu", enabled=False)


@dataclass
class Trainer:
    """What one pretraining/SFT run holds between steps."""
    tc: TrainConfig
    rank: int
    world: int
    device: torch.device
    cfg: M.Config
    tokenizer: data.Tokenizer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: data.PackedLoader
    step: int = 0
    render_skipped: dict = field(default_factory=dict)  # reason -> count of samples that failed when rendered

    def save(self):
        """A training checkpoint of the current weights and the HF export beside it."""
        running, self.loader.step = self.loader.step, self.step  # the data position of the step after this one
        state = {"step": self.step, "data": self.loader.state_dict(), "render_skipped": self.render_skipped,
                 "config": dataclasses.asdict(self.tc)}
        self.loader.step = running  # the iterator (or its workers) has already moved on
        save_training_state(self.model, self.optimizer, state, self.tc.out, self.step, self.rank,
                            self.tc.keep_checkpoints)
        export_hf(self.model, self.cfg, self.tokenizer, self.tc.out, self.rank, self.tc, self.step)


def setup(tc: TrainConfig) -> Trainer:
    """Build the model, optimizer and data of a run, or restore them from its checkpoint (--resume)."""
    rank, world, device = setup_distributed(tc.hang_timeout)
    if tc.global_batch % world:
        raise ValueError(f"--global-batch {tc.global_batch} must be a multiple of the number of processes ({world})")
    resume_from = checkpoint_to_resume(tc)
    changes = resume_changes(tc, resume_from) if resume_from else {}
    cfg, state, tokenizer = initial_state(tc, rank)
    model = build_model(tc, cfg, state, device, world)
    del state
    optimizer = build_optimizer(model, tc, device)
    loader = data.PackedLoader(data_source(tc), tokenizer, tc.seq_len, tc.global_batch, rank=rank, world=world,
                               seed=tc.seed, num_workers=tc.num_workers)
    run = Trainer(tc, rank, world, device, cfg, tokenizer, model, optimizer, loader)
    if resume_from:
        trainer_state = load_training_state(model, optimizer, resume_from, rank)
        set_hyperparameters(optimizer, tc)  # the checkpoint's optimizer state, this run's (allowed) settings
        run.step, run.render_skipped = trainer_state["step"], trainer_state.get("render_skipped", {})
        if DATA_FIELDS & set(changes):  # new data: its stream starts at its beginning
            loader.step, loader._starts = run.step, {run.step * tc.global_batch: 0}
        else:
            loader.load_state_dict(trainer_state["data"])
        log(f"resumed from step {run.step}")
    if rank == 0:
        record_segment(os.path.join(tc.out, "train_config.json"), "train", tc, run.step, changes,
                       model=cfg.to_hf(), world_size=world)
        log(f"{sum(p.numel() for p in model.parameters()):,} parameters on {world} × {device.type}; "
            f"{tc.global_batch} × {tc.seq_len} tokens per step")
    return run


def data_report(run: Trainer, batches: list) -> dict:
    """{reason: count} of the samples skipped so far (every rank agrees); stops the run when they are more than
    --max-bad-data of the samples read, once an epoch or 100 samples give the share some meaning."""
    for batch in batches:
        for reason in batch.get("skipped", ()):
            run.render_skipped[reason] = run.render_skipped.get(reason, 0) + 1
    counts, examined = run.loader.bad_data(run.step - 1)
    for part in gather_objects(run.render_skipped):
        for reason, n in part.items():
            counts[reason] = counts.get(reason, 0) + n
    bad, size = sum(counts.values()), run.loader.source.size
    if bad and examined >= min(100, size or 100) and bad / examined > run.tc.max_bad_data:
        raise TrainingError(f"{bad} of the {examined} samples read so far could not be used ("
                            + ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) + f"): more than "
                            f"--max-bad-data {run.tc.max_bad_data:g}; fix the data (the first are printed above)")
    return counts


def train(tc: TrainConfig):
    """Stage 1/2 pretraining or SFT, under torchrun or not: train_step until max_steps, a metrics row per step.
    Checkpoints (SaveSchedule) are validated: one that falls due is written during the next step, once its weights
    gave a finite loss, so a diverging run never saves or rotates away good weights. Returns the model."""
    if tc.dry_run:
        rank, world, _ = setup_distributed(tc.hang_timeout)
        if rank == 0:
            dry_run(tc, tc.world_size or world)
        return None
    run = setup(tc)
    metrics, schedule = Metrics(tc.out, run.rank, run.step, tc.report_to), SaveSchedule(tc, run.device)
    autocast = autocast_for(run.device, run.world)
    flops, peak = flops_per_token(run.cfg, tc.seq_len, bool(tc.lora_rank)), peak_flops(run.device) * run.world
    total_tokens, bad_in_a_row, skipped, pending, loss = 0, 0, 0, None, float("nan")
    run.model.train()
    bar = tqdm(total=tc.max_steps, initial=run.step, disable=run.rank != 0, desc=tc.stage, dynamic_ncols=True)
    batches_iter = iter(run.loader)

    def save_if_good(ok: bool):  # called inside the step, while the weights are the ones a save fell due for
        nonlocal pending
        if pending is not None and ok:
            run.step, pending = pending, None
            run.save()
            schedule.saved()
            run.step += 1
        elif pending is not None:
            log(f"the weights of step {pending} gave a non-finite loss at step {pending + 1}: not saved")
            pending = None

    try:
        while run.step < tc.max_steps:
            start = time.perf_counter()
            batches = next(batches_iter)
            heartbeat(tc.hang_timeout, f"step {run.step + 1}")  # before the step's first collective
            lr = lr_at(run.step, tc)
            set_lr(run.optimizer, lr)
            run.step += 1  # save_if_good steps back to the pending step while it saves
            loss, grad_norm, local_tokens, ok = train_step(run.model, run.optimizer, batches, run.device, run.world,
                                                           autocast, tc.grad_clip, before_update=save_if_good)
            tokens = int(all_reduce_sum(torch.tensor(float(local_tokens), device=run.device)).item())
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            total_tokens += tokens
            bad_in_a_row, skipped = (0, skipped) if ok else (bad_in_a_row + 1, skipped + 1)
            bad_data = data_report(run, batches)
            row = {"step": run.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": total_tokens,
                   "tok_per_s": tokens / seconds, "mfu": flops * tokens / seconds / peak if peak else None,
                   "skipped_steps": skipped, "bad_data": bad_data, "seconds": seconds}
            metrics.write(row)
            check_finite(ok, bad_in_a_row, tc.max_bad_steps, f"step {run.step}: non-finite loss ({loss}) or "
                                                               f"gradient norm ({grad_norm})", tc.out)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tok_per_s']:.0f}", **(
                {"mfu": f"{row['mfu']:.1%}"} if peak else {}), **({"bad": sum(bad_data.values())} if bad_data else {}))
            reason = schedule.due(run.step, tc.max_steps)
            if reason in ("signal", "end"):  # no next step to validate the weights: saved if they are finite
                run.save()
                if reason == "signal":
                    teardown_distributed()
                    raise SystemExit(schedule.stop_message(run.step, tc.out))
            elif reason and ok:
                pending = run.step
    finally:
        schedule.close()
        bar.close()
    log(f"done: step {run.step}, loss {loss:.4f}; Hugging Face checkpoint in {tc.out}")
    teardown_distributed()
    return run.model


def check_finite(ok: bool, bad_in_a_row: int, max_bad_steps: int, what: str, out: str):
    """The NaN/inf guard: a skipped update is logged; max_bad_steps of them in a row stop the run."""
    if ok:
        return
    log(f"{what}; update skipped")
    if bad_in_a_row >= max_bad_steps:
        raise TrainingError(f"{bad_in_a_row} steps in a row had a non-finite loss or gradient ({what}); stopping. "
                            f"The last good checkpoint: {latest_checkpoint(out) or 'none'} (its weights are also "
                            "the export). Lower --lr, check the data, or --resume from it.")


def main(argv=None, stage_defaults: dict = None, description: str = __doc__):
    args = build_parser(TrainConfig, description, stage_defaults).parse_args(argv)
    try:
        train(config_from_args(args))
    except (OSError, ValueError, TrainingError) as e:  # bad flags, files or data; divergence; a hung rank
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
