"""The RL stage of GLM-4.1V-Thinking: GRPO with Reinforcement Learning with Curriculum Sampling (RLCS), paper §5.

    python rlcs.py --grade --init-from runs/sft            # offline difficulty: pass@k of every pool item
    python rlcs.py --tiny --init-from runs/sft             # RL on all eight domains at once
    python rlcs.py --eval runs/rlcs                        # held-out greedy accuracy per domain, one JSON line
    python rlcs.py --plot runs/rlcs                        # reward per domain and the tier distribution, as PNGs
    python rlcs.py --compare runs/sft,runs/rlcs --out docs/rl_helps   # held-out table and charts of several runs
    torchrun --nproc_per_node 8 rlcs.py --preset 9b --init-from runs/sft --data prompts.jsonl

One iteration: the curriculum picks prompts from a fixed training pool → every prompt gets G rollouts from
`sample.generate` (temperature 1, top-p 1, force answering at the length limit) → `rewards.score` grades each
reply with its domain's verifier → groups are normalised into advantages and the most balanced ones kept → one
or more GRPO optimizer steps → the rollout weights are refreshed. Everything runs on every domain at once.

What we keep from GRPO and what we drop (the paper's choices, most of them DAPO's):
- kept: G rollouts per prompt and group-normalised advantages (r − mean) / (std + 1e-6) instead of a value
  network; the PPO clipped ratio against the old policy, i.e. the weights that produced the rollouts (its
  log-probs are recomputed by the training model before the first optimizer step, for the mini-batches after the
  first; the first step is on-policy, ratio exactly 1).
- dropped: the KL penalty (no reference model is loaded at all) and the entropy bonus. `--kl-coef β` puts the
  KL back as an experiment (not the paper's recipe): β · k3 per token against a frozen copy of the starting policy,
  k3 = exp(ref − logp) − (ref − logp) − 1, averaged like the surrogate.
- changed: clip-higher — the ratio is clipped to [1 − ε_low, 1 + ε_high] = [0.8, 1.28], so unlikely tokens with
  a positive advantage can grow further before the clip stops them (keeps entropy up); per-sample loss averaging —
  each response's token-mean loss, then the mean over responses (long replies do not outweigh short ones, but a
  token of a long reply is pushed less than one of a short reply; `--length-norm budget` divides each token sum
  by the length limit instead, Dr. GRPO's fix, as an experiment); top-p 1 at rollout; larger batches; **dynamic
  sampling expansion** (below); **force answering** — a rollout that reaches the thinking budget without
  `</think>` gets `</think><answer>` inserted and still answers (sample.generate does it, `--think-budget`);
  format is learned in SFT, so there is no format reward: a malformed reply scores 0.
- ours (the paper does not say): AdamW without weight decay at a constant learning rate after an optional warm-up;
  gradient clipping at 1; `--updates-per-batch` optimizer steps per rollout batch, each on its own slice of the
  kept groups (2 by default, so the clip matters); advantages use the population std of the group.

Dynamic sampling expansion (paper §5): a group whose G rewards are all equal has zero advantage and gives no
gradient. We track the share of such groups and roll out K · e prompts (rounded), e an EMA (decay `--expansion-ema`)
of 1 / (1 − that share), capped at `--max-expansion`; of those groups the K with the largest reward std (the most
balanced) are kept, so every update sees K·G responses (a fixed total), as many of them informative as the batch
allowed. Rollouts are counted (`rollouts` in metrics.jsonl; `--max-rollouts` stops at a budget) so that runs with
and without the curriculum can be compared at an equal rollout budget.

Curriculum sampling (RLCS, paper §5). The pool is fixed (the synthetic world: `--pool-size` items per domain and
level; or `--data` JSONL). Offline, `--grade` writes each item's pass rate (mean reward) and pass@k over k samples
of the starting checkpoint. Each item gets a tier from its generator level ℓ ∈ 1..5 and its offline pass rate q:
    hardness s = ((ℓ − 1)/4 + (1 − q)) / 2    (s = (ℓ − 1)/4 without a grade file),  tier = min(4, ⌊5·s⌋)
i.e. very easy, easy, medium, hard, very hard. Online, every rollout group updates an EMA of its item's pass rate
p_i (decay `--item-ema`) and of its tier's pass rate P_t (decay `--tier-ema`; starts at the tier's mean q, or 0.5).
Each iteration the sampling probability of item i in tier t is recomputed as
    P(i) ∝ W_t · w_i / w̄_t,   W_t = max(4·P_t·(1 − P_t), floor),   w_i = max(4·p_i·(1 − p_i), floor)
with p_i = P_t for items not yet seen, w̄_t the mean of w_j over tier t and floor = `--curriculum-floor` (0.05):
the tier's weight sets how much its items are worth on average (so a tier's share of the batch is its share of the
pool times W_t, and a tier of a few items is not drilled over and over), the item's own pass rate redistributes
that within the tier. 4p(1 − p) is 1 at p = ½ and 0 at p ∈ {0, 1}: it favours what the model solves about half the
time (where a group of G most likely mixes right and wrong replies) and pushes solved and hopeless tiers and items
down to the floor, never to zero, so a tier that starts to become learnable (or forgotten) is noticed.
`--curriculum uniform` samples the pool uniformly (the statistics are still kept and logged).

Scale (torchrun, one process per GPU): every rank rolls out 1/W of the iteration's prompts with a full, unsharded
copy of the weights (bf16 on GPU) that is refreshed from the FSDP2-sharded policy after each update one tensor at a
time (`DTensor.full_tensor()`), so the peak extra memory is one full copy plus one tensor — 20 GB for the 9B next
to its ~21 GB/GPU of fp32 shards + Adam state on 8 GPUs, plus the KV cache of `--rollout-batch` rows (40 KB per
token: 32 rows × 17k tokens ≈ 22 GB). Rewards and response tokens are all-gathered, so every rank makes the
same expansion, selection and curriculum decisions; each rank then trains on 1/W of the kept groups (re-rendering
their prompts from the pool) with FSDP2 gradient reduction. Checkpoints are the trainer's
(atomic DCP shards + JSON state, here with the curriculum, the expansion EMA and the rollout counters); prompt
picks and sampling noise are seeded by (seed, iteration, rank), so a resumed run continues exactly.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as M
import pretrain
import rewards
import sample
from pretrain import _f

# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RLConfig:
    # run
    preset: str = _f("tiny", "preset whose defaults apply (tiny | 9b); the model itself comes from --init-from")
    init_from: str = _f("", "the SFT checkpoint to start from (Hugging Face format directory)")
    out: str = _f("runs/rlcs", "output directory (metrics.jsonl, checkpoints, the Hugging Face export)")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    max_steps: int = _f(0, "RL iterations: one rollout batch and its updates each (default: per preset)")
    max_rollouts: int = _f(0, "also stop once this many replies were generated (0: no budget)")
    seed: int = _f(0, "seed of the pool, the prompt picks, the sampling noise and --eval's held-out items")
    # prompts
    data: str = _f("", "JSONL of prompts {messages, images, videos, task, answer, level}; default: synthetic world")
    tasks: str = _f("", "comma-separated domains to train on (default: all eight)")
    pool_size: int = _f(0, "synthetic world: training items per domain and level in the pool (default: per preset)")
    levels: str = _f("", "synthetic world: comma-separated levels 1–5 in the pool (default: all)")
    # rollouts
    group_size: int = _f(0, "G: rollouts per prompt (default: per preset)")
    groups_per_step: int = _f(0, "K: groups (prompts) per update, after dynamic sampling (default: per preset)")
    max_new_tokens: int = _f(0, "the length limit of a reply in tokens (default: per preset)")
    think_budget: int = _f(-1, "force answering (paper §5): after this many reply tokens without </think>, insert "
                           "</think><answer> (default: max_new_tokens minus room for the answer; 0: never)")
    temperature: float = _f(1.0, "rollout temperature (the GRPO ratio is of the temperature-1 policy)")
    top_p: float = _f(1.0, "rollout nucleus (the paper: 1, i.e. off)")
    rollout_batch: int = _f(0, "rows per generate() call (0: all of this rank's rollouts at once); on CUDA every "
                            "call is padded to it, so the compiled decode step keeps one shape")
    # GRPO update
    lr: float = _f(0.0, "learning rate (default: per preset)")
    min_lr_ratio: float = _f(1.0, "cosine decay to lr × this at max_steps (1: constant)")
    warmup_steps: int = _f(0, "linear warm-up iterations")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    clip_low: float = _f(0.2, "ε_low: the ratio is clipped below at 1 − ε_low")
    clip_high: float = _f(0.28, "ε_high: clip-higher, the ratio is clipped above at 1 + ε_high")
    kl_coef: float = _f(0.0, "β of a per-token KL penalty (k3) to a frozen copy of the starting policy; the paper "
                        "uses none (0)")
    length_norm: str = _f("sample", "sample: each reply's loss is the mean over its tokens (the paper's per-sample "
                          "averaging) | budget: the sum over its tokens / --max-new-tokens (Dr. GRPO; no length "
                          "bias)")
    updates_per_batch: int = _f(2, "optimizer steps per rollout batch, each on its own slice of the kept groups")
    micro_batch: int = _f(0, "responses per forward/backward (gradient accumulation; 0: a rank's whole slice)")
    # dynamic sampling expansion
    expansion_ema: float = _f(0.9, "EMA decay of the oversampling factor 1 / (1 − share of all-equal groups)")
    max_expansion: float = _f(4.0, "at most this many times K prompts are rolled out")
    # curriculum
    curriculum: str = _f("rlcs", "rlcs (curriculum sampling) | uniform (every pool item equally likely)")
    difficulty: str = _f("", "the --grade file (default: INIT_FROM/difficulty.jsonl when it exists)")
    grade_k: int = _f(8, "--grade: samples per item")
    tier_ema: float = _f(0.8, "EMA decay of each tier's online pass rate")
    item_ema: float = _f(0.5, "EMA decay of each item's online pass rate")
    curriculum_floor: float = _f(0.05, "the smallest weight 4p(1−p) is raised to (solved and hopeless items)")
    # verifiers
    lenient_verifier: str = _f("", "comma-separated domains scored with the hackable lenient verifier during "
                               "training only (paper §5's collapse experiment); evaluation is always strict")
    # evaluation
    eval_every: int = _f(0, "held-out greedy evaluation every N iterations into metrics.jsonl (0: off)")
    eval_n: int = _f(0, "held-out items per domain for --eval and --eval-every (default: per preset)")
    eval_temperature: float = _f(0.0, "--eval: 0 is greedy; above 0, the mean reward of one reply sampled at this "
                                 "temperature per item (the quantity RL optimises)")
    # checkpoints and the model
    save_every: int = _f(50, "checkpoint every N iterations (0: only at the end)")
    keep_checkpoints: int = _f(2, "how many training checkpoints to keep")
    freeze_vision: bool = _f(False, "freeze the ViT (the projector stays trainable)")
    freeze_llm: bool = _f(False, "freeze the language model and lm_head")
    activation_checkpointing: bool = _f(False, "recompute each layer in the backward pass (saves memory)")
    compile: bool = _f(False, "torch.compile each ViT block and decoder layer of the training model")
    max_bad_steps: int = _f(5, "stop after this many consecutive updates with a non-finite loss or gradient")
    # the other commands
    grade: bool = _f(False, "write the offline difficulty (pass rate and pass@k per pool item) and exit")
    eval: str = _f("", "print the held-out greedy accuracy per domain of this checkpoint as JSON (also written to "
                   "DIR/eval.json; with --levels or --eval-temperature, to eval_levels1,2_t1.json) and exit")
    plot: str = _f("", "draw reward.png, tiers.png and tier_pass.png from DIR/metrics.jsonl and exit")
    compare: str = _f("", "comma-separated run directories: print their held-out table (each one's --eval record "
                      "for --levels and --eval-temperature) and draw heldout.png and training curves into --out, "
                      "then exit")


# Per preset: a laptop-sized run for tiny; for the 9B our guesses at the paper's scale (it gives no numbers).
# tiny lr: measured from the tiny SFT checkpoint (README, "in miniature") — at 1e-4 and 3e-5 the thinking shrinks to
# a few garbled words and held-out OCR falls 10.8% → 0.1% / 3.0%; 1e-5 keeps every domain within noise.
DEFAULTS = {
    "tiny": dict(max_steps=40, pool_size=40, group_size=8, groups_per_step=8, max_new_tokens=128, lr=1e-5,
                 eval_n=20, answer_room=32),
    "9b": dict(max_steps=2000, pool_size=400, group_size=16, groups_per_step=64, max_new_tokens=16384, lr=1e-6,
               eval_n=100, answer_room=1024, micro_batch=4, rollout_batch=32, activation_checkpointing=True),
}


def resolve(rc: RLConfig) -> RLConfig:
    """Fill the zeros with the preset's defaults and check the values."""
    if rc.preset not in DEFAULTS:
        raise ValueError(f"--preset must be one of {', '.join(DEFAULTS)}, not {rc.preset!r}")
    defaults = dict(DEFAULTS[rc.preset])
    answer_room = defaults.pop("answer_room")
    for key, value in defaults.items():
        if key == "activation_checkpointing":
            rc.activation_checkpointing = rc.activation_checkpointing or value
        elif not getattr(rc, key):
            setattr(rc, key, value)
    if rc.think_budget < 0:
        rc.think_budget = max(rc.max_new_tokens - answer_room, 3 * rc.max_new_tokens // 4)
    if rc.length_norm not in ("sample", "budget"):
        raise ValueError(f"--length-norm must be sample or budget, not {rc.length_norm!r}")
    if rc.curriculum not in ("rlcs", "uniform"):
        raise ValueError(f"--curriculum must be rlcs or uniform, not {rc.curriculum!r}")
    for name in task_list(rc.tasks) + task_list(rc.lenient_verifier):
        if name not in rewards.TASKS:
            raise ValueError(f"unknown domain {name!r} in --tasks/--lenient-verifier; domains: "
                             f"{', '.join(rewards.TASKS)}")
    if rc.groups_per_step < 1 or rc.updates_per_batch < 1:
        raise ValueError(f"--groups-per-step and --updates-per-batch must be at least 1, got {rc.groups_per_step} "
                         f"and {rc.updates_per_batch}")
    if rc.group_size < 2:
        raise ValueError(f"--group-size must be at least 2 (advantages are relative to the group), got {rc.group_size}")
    if not 0 <= rc.clip_low < 1 or rc.clip_high < 0:
        raise ValueError(f"need 0 <= --clip-low < 1 and --clip-high >= 0, got {rc.clip_low}, {rc.clip_high}")
    if rc.max_expansion < 1:
        raise ValueError(f"--max-expansion must be at least 1, got {rc.max_expansion}")
    if rc.temperature <= 0 or not 0 < rc.top_p <= 1:
        raise ValueError(f"rollouts need --temperature > 0 and 0 < --top-p <= 1, got {rc.temperature}, {rc.top_p}")
    return rc


def task_list(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    return pretrain.build_parser(__doc__, config_class=RLConfig)


def config_from_args(args) -> RLConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)}
    if args.tiny:
        values["preset"] = "tiny"
    return resolve(RLConfig(**values))


# ---------------------------------------------------------------------------------------------------------------
# GRPO: advantages and the clipped, per-sample-averaged loss (paper §5)
# ---------------------------------------------------------------------------------------------------------------


def group_advantages(group_rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(r − group mean) / (group std + eps) for rewards (groups, G). A group whose rewards are all equal gets exactly
    0 (no gradient), also where float rounding would leave a tiny difference."""
    mean = group_rewards.mean(1, keepdim=True)
    std = group_rewards.std(1, keepdim=True, unbiased=False)
    advantages = (group_rewards - mean) / (std + eps)
    all_equal = (group_rewards == group_rewards[:, :1]).all(1, keepdim=True)
    return advantages.masked_fill(all_equal, 0.0)


def grpo_loss(logprobs, old_logprobs, advantages, mask, clip_low: float = 0.2, clip_high: float = 0.28,
              length_norm: int = 0):
    """The clipped surrogate with clip-higher, averaged per sample (paper §5; DAPO's ε).

    logprobs / old_logprobs (B, T) of the response tokens under the current / rollout policy, advantages (B,),
    mask (B, T) the response tokens. Per token: −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) with ρ = exp(logp −
    old); per response: the mean over its tokens, or with length_norm > 0 their sum / length_norm (Dr. GRPO's
    constant, so a token's weight does not depend on its reply's length). No KL and no entropy term. Returns (loss
    per response (B,), clipped (B, T): tokens where the clip is active, i.e. that give no gradient)."""
    mask = mask.bool()
    ratio = torch.exp((logprobs - old_logprobs).masked_fill(~mask, 0.0))
    a = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    token_loss = -torch.minimum(unclipped, clipped)
    per_sample = (token_loss * mask).sum(1) / (length_norm or mask.sum(1).clamp(min=1))
    return per_sample, (clipped < unclipped) & mask


# ---------------------------------------------------------------------------------------------------------------
# Dynamic sampling expansion (paper §5)
# ---------------------------------------------------------------------------------------------------------------


class Expansion:
    """How many prompts to roll out so that K informative groups survive: an EMA of 1 / (1 − invalid share)."""

    def __init__(self, ema: float = 0.9, max_factor: float = 4.0):
        self.ema, self.max_factor, self.factor = ema, max_factor, 1.0

    def prompts(self, groups: int, world: int = 1) -> int:
        """K · factor rounded to the nearest integer, then up to a multiple of the number of ranks (each rolls out
        the same count). Rounding, not ceil: the EMA only approaches 1, and K + 1 prompts forever would be waste."""
        n = math.floor(groups * min(self.factor, self.max_factor) + 0.5)
        return -(-n // world) * world

    def update(self, invalid_share: float):
        target = 1.0 / max(1.0 - invalid_share, 1.0 / self.max_factor)
        self.factor = self.ema * self.factor + (1 - self.ema) * target


def select_balanced(group_rewards: torch.Tensor, k: int) -> list:
    """Indices of the k groups (rows of (n, G) rewards) with the largest reward std — the most balanced mix of
    right and wrong; all-equal groups (std 0) come last. Ties keep the order of the rows."""
    std = group_rewards.std(1, unbiased=False)
    std = std.masked_fill((group_rewards == group_rewards[:, :1]).all(1), -1.0)
    return torch.argsort(-std, stable=True)[:k].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Curriculum sampling (RLCS, paper §5)
# ---------------------------------------------------------------------------------------------------------------

TIERS = ("very easy", "easy", "medium", "hard", "very hard")


def tier_of(level: int, offline_pass=None) -> int:
    """Offline difficulty merged with the generator level: hardness s = ((ℓ − 1)/4 + (1 − q)) / 2 (or (ℓ − 1)/4
    without a grade), tier = min(4, ⌊5·s⌋)."""
    hardness = (min(max(level, 1), 5) - 1) / 4
    if offline_pass is not None:
        hardness = (hardness + 1 - offline_pass) / 2
    return min(len(TIERS) - 1, int(hardness * len(TIERS)))


def middle_weight(p, floor: float):
    """4p(1 − p), raised to `floor`: 1 for items solved half the time, `floor` for solved and hopeless ones."""
    return np.maximum(4 * p * (1 - p), floor)


class Curriculum:
    """Sampling weights over the pool, recomputed every iteration from offline tiers and online pass rates:
    P(i) ∝ W_t · w_i / w̄_t (the module docstring explains it). mode "uniform": every item equally likely (the
    statistics are still kept)."""

    def __init__(self, levels, offline=None, mode: str = "rlcs", tier_ema: float = 0.8, item_ema: float = 0.5,
                 floor: float = 0.05):
        offline = offline if offline is not None else [None] * len(levels)
        self.mode, self.tier_ema, self.item_ema, self.floor = mode, tier_ema, item_ema, floor
        self.tier = np.array([tier_of(lv, q) for lv, q in zip(levels, offline)], dtype=np.int64)
        self.sizes = np.bincount(self.tier, minlength=len(TIERS))
        graded = np.array([np.nan if q is None else q for q in offline], dtype=np.float64)
        self.tier_pass = np.full(len(TIERS), 0.5)  # the prior without a grade: every tier looks learnable
        for t in range(len(TIERS)):
            known = graded[(self.tier == t) & ~np.isnan(graded)]
            if known.size:
                self.tier_pass[t] = known.mean()
        self.item_pass = np.full(len(levels), np.nan)  # online EMA; NaN until the item is rolled out

    def __len__(self):
        return len(self.tier)

    def probabilities(self) -> np.ndarray:
        n = len(self.tier)
        if self.mode == "uniform":
            return np.full(n, 1.0 / n)
        p_item = np.where(np.isnan(self.item_pass), self.tier_pass[self.tier], self.item_pass)
        w_item = middle_weight(p_item, self.floor)
        w_tier = middle_weight(self.tier_pass, self.floor)
        mean_in_tier = np.bincount(self.tier, weights=w_item, minlength=len(TIERS)) / np.maximum(self.sizes, 1)
        weight = w_tier[self.tier] * w_item / mean_in_tier[self.tier]
        return weight / weight.sum()

    def sample(self, n: int, rng: np.random.Generator) -> list:
        """n distinct pool indices drawn by the current probabilities (all of the pool when it is smaller)."""
        p = self.probabilities()
        return rng.choice(len(p), size=min(n, len(p)), replace=False, p=p / p.sum()).tolist()

    def update(self, indices, pass_rates):
        """Fold this iteration's groups (pool index, mean reward of its G rollouts) into the EMAs."""
        for i, r in zip(indices, pass_rates):
            old = self.item_pass[i]
            self.item_pass[i] = r if np.isnan(old) else self.item_ema * old + (1 - self.item_ema) * r
        tiers = self.tier[np.asarray(indices, dtype=np.int64)]
        for t in range(len(TIERS)):
            seen = [r for r, tt in zip(pass_rates, tiers) if tt == t]
            if seen:
                self.tier_pass[t] = self.tier_ema * self.tier_pass[t] + (1 - self.tier_ema) * float(np.mean(seen))

    def state_dict(self) -> dict:
        return {"tier_pass": self.tier_pass.tolist(),
                "item_pass": [None if np.isnan(p) else float(p) for p in self.item_pass]}

    def load_state_dict(self, state: dict):
        if len(state["item_pass"]) != len(self.item_pass):
            raise ValueError(f"the checkpoint's curriculum covers {len(state['item_pass'])} pool items but this run's "
                             f"pool has {len(self.item_pass)}: resume with the same --tasks/--pool-size/--data")
        self.tier_pass = np.array(state["tier_pass"], dtype=np.float64)
        self.item_pass = np.array([np.nan if p is None else p for p in state["item_pass"]], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# The prompt pool: the synthetic world or a JSONL file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PoolItem:
    """One training prompt: its key (the grade file's join key), domain, level 1–5, ground truth, and where it
    comes from (a synthetic item index, or a parsed JSONL record)."""
    key: str
    task: str
    level: int
    answer: object
    index: int = 0
    record: dict = None


def synthetic_pool(tasks, per_level: int, seed: int, levels=data.LEVELS) -> list:
    """per_level training items of every domain and level, the same in every process."""
    return [PoolItem(f"{task}/{level}/{i}", task, level, data.make_item(task, i, seed, "train", level,
                                                                         render=False).answer, i)
            for task in tasks for level in levels for i in range(per_level)]


def jsonl_pool(path: str, tasks=None) -> list:
    """Prompts from JSONL lines {"messages", "images"/"videos", "task", "answer", "level" (1–5, default 3)} —
    `python data.py export` writes such files; assistant messages are ignored. Errors name the file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    root, pool = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                record = data.parse_record(obj, root)
                if "messages" not in record:
                    raise ValueError("an RL prompt needs 'messages'")
                task, level = obj.get("task"), obj.get("level", 3)
                if task not in rewards.TASKS:
                    raise ValueError(f"'task' must be one of {', '.join(rewards.TASKS)}, got {task!r}")
                if "answer" not in obj:
                    raise ValueError("'answer' (the ground truth the verifier checks) is missing")
                if level not in data.LEVELS:
                    raise ValueError(f"'level' must be one of {data.LEVELS}, got {level!r}")
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            except (ValueError, TypeError, FileNotFoundError) as e:
                raise ValueError(f"{path}:{lineno}: {e}") from e
            while record["messages"] and record["messages"][-1]["role"] == "assistant":
                record["messages"].pop()
            if not tasks or task in tasks:
                pool.append(PoolItem(f"line:{lineno}", task, level, obj["answer"], lineno, record))
    if not pool:
        raise ValueError(f"{path}: no prompts" + (f" for the domains {', '.join(tasks)}" if tasks else ""))
    return pool


def build_pool(rc: RLConfig) -> list:
    if rc.data:
        return jsonl_pool(rc.data, task_list(rc.tasks))
    return synthetic_pool(task_list(rc.tasks) or list(rewards.TASKS), rc.pool_size, rc.seed, pool_levels(rc))


def pool_levels(rc: RLConfig) -> list:
    levels = [int(v) for v in task_list(rc.levels)] or list(data.LEVELS)
    if any(v not in data.LEVELS for v in levels):
        raise ValueError(f"--levels must list levels from {data.LEVELS}, got {rc.levels!r}")
    return levels


def render_prompt(item: PoolItem, tokenizer, seed: int) -> dict:
    """The chat prompt with the generation prompt, thinking on (render_chat's dict incl. the vision tensors)."""
    if item.record is None:
        return data.make_item(item.task, item.index, seed, "train", item.level).prompt(tokenizer)
    r = item.record
    return data.render_chat(r["messages"], tokenizer, images=r["images"], videos=r["videos"],
                            add_generation_prompt=True)


def load_difficulty(path: str, pool) -> list:
    """The offline pass rate of every pool item from a --grade file (None where the file has no line for it)."""
    graded = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    graded[row["key"]] = float(row["pass_rate"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: not a difficulty line ({e!r})") from e
    return [graded.get(item.key) for item in pool]


def difficulty_path(rc: RLConfig) -> str:
    return rc.difficulty or (os.path.join(rc.init_from, "difficulty.jsonl") if rc.init_from else "")


# ---------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(rows, cfg: M.Config, responses=None) -> dict:
    """Right-padded batch of prompts (render_chat dicts), each followed by its response tokens when given:
    input_ids / attention_mask (B, T), labels (B, T) = the response tokens, -100 elsewhere (the model's label
    convention), and the vision tensors of the rows concatenated in row order.

    A reply can contain vision marker tokens (`<|image|>`…): generation reads them as plain text, but the model's
    forward would take them for image slots, so in the *inputs* they become the pad token; the labels keep them."""
    vision_ids = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.image_start_token_id,
                               cfg.image_end_token_id, cfg.video_start_token_id, cfg.video_end_token_id])
    T = max(len(r["input_ids"]) + (len(responses[i]) if responses else 0) for i, r in enumerate(rows))
    input_ids = torch.full((len(rows), T), cfg.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        start = len(r["input_ids"])
        input_ids[i, :start] = r["input_ids"]
        attention_mask[i, :start] = 1
        if responses and responses[i]:
            reply = torch.tensor(responses[i], dtype=torch.long)
            end = start + len(reply)
            labels[i, start:end] = reply
            input_ids[i, start:end] = reply.masked_fill(torch.isin(reply, vision_ids), cfg.pad_token_id)
            attention_mask[i, start:end] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels if responses else None)
    for key in VISION_KEYS:
        parts = [r[key] for r in rows if r.get(key) is not None]
        batch[key] = torch.cat(parts) if parts else None
    return batch


def cut_at_end(tokens, end_ids) -> list:
    """A generated row up to and including its first end token (generate pads ended rows with an end token)."""
    for j, t in enumerate(tokens):
        if t in end_ids:
            return tokens[:j + 1]
    return tokens


@torch.no_grad()
def rollout(model, prompts, group_size: int, max_new_tokens: int, think_budget: int, force_ids, *,
            temperature: float = 1.0, top_p: float = 1.0, generator=None, rollout_batch: int = 0) -> list:
    """group_size replies to each prompt (render_chat dicts) with sample.generate; reply j of prompt i is element
    i·G + j, a list of token ids cut after its end token. Force answering after `think_budget` tokens (0: never)."""
    device = model.lm_head.weight.device
    rows = [p for p in prompts for _ in range(group_size)]
    chunk = rollout_batch or len(rows)
    pad_rows = device.type == "cuda" and rollout_batch > 0  # one shape for the compiled, CUDA-graphed decode step
    end_ids, out = set(model.cfg.eos_token_ids), []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        n = len(part)
        if pad_rows:
            part = part + [part[0]] * (chunk - n)
        batch = collate(part, model.cfg)
        tokens = sample.generate(model, batch["input_ids"], max_new_tokens, temperature, top_p,
                                 **{k: batch[k] for k in VISION_KEYS}, attention_mask=batch["attention_mask"],
                                 generator=generator, think_budget=think_budget or None,
                                 force_answer_ids=force_ids if think_budget else None)
        out += [cut_at_end(row, end_ids) for row in tokens[:n].tolist()]
    return out


def score_replies(tokenizer, items, replies, group_size: int, lenient=()) -> list:
    """rewards.score of reply k against items[k // G], decoded with special tokens kept; `lenient` domains get
    the hackable verifier (training only)."""
    return [rewards.score(items[k // group_size].task, tokenizer.decode(reply), items[k // group_size].answer,
                          lenient=items[k // group_size].task in lenient) for k, reply in enumerate(replies)]


# ---------------------------------------------------------------------------------------------------------------
# The policy update
# ---------------------------------------------------------------------------------------------------------------


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batches(rows, size: int, cfg: M.Config, device) -> list:
    """Rows (prompt, reply tokens, advantage) → [(batch on device, advantages (B,))] of `size` rows (0: one)."""
    size = size or len(rows)
    return [(to_device(collate([r[0] for r in part], cfg, [r[1] for r in part]), device),
             torch.stack([torch.as_tensor(r[2], dtype=torch.float32) for r in part]).to(device))
            for part in (rows[s:s + size] for s in range(0, len(rows), size))]


def policy_logprobs(model, batch: dict, autocast) -> torch.Tensor:
    """log p(response token) (B, T) in fp32, 0 outside the responses: the model's chunked label log-probs."""
    with autocast:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     **{k: batch[k] for k in VISION_KEYS}).float()


def kl_k3(logprobs, ref_logprobs, mask):
    """Per-response mean over its tokens of k3 = exp(ref − logp) − (ref − logp) − 1, an unbiased, non-negative
    estimate of KL(policy ‖ reference) from the policy's own samples (B,)."""
    mask = mask.bool()
    delta = (ref_logprobs - logprobs).masked_fill(~mask, 0.0)
    k3 = torch.exp(delta) - delta - 1
    return (k3 * mask).sum(1) / mask.sum(1).clamp(min=1)


def policy_update(model, optimizer, parts, rc: RLConfig, world: int, n_responses: int, autocast,
                  reference=None) -> dict:
    """One optimizer step on this rank's micro-batches `parts` [(batch, advantages (B,), old log-probs (B, T) or
    None)]. The loss is the mean over all n_responses responses of the global mini-batch (per-sample averaging), so
    any split across ranks and micro-batches gives the same step. old None: on-policy, old = current (ratio 1).
    With a reference model, rc.kl_coef × its k3 KL is added per response. Without a single nonzero advantage in the
    global mini-batch the step is skipped: the gradient is zero, and Adam's momentum alone must not move the
    weights."""
    device = next(model.parameters()).device
    loss_sum, clipped, tokens, kl_sum = (torch.zeros((), device=device) for _ in range(4))
    informative = torch.tensor(float(any(bool((a != 0).any()) for _, a, _ in parts)), device=device)
    for i, (batch, advantages, old) in enumerate(parts):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter after the last micro-batch only
            model.set_requires_gradient_sync(i == len(parts) - 1)
        logprobs = policy_logprobs(model, batch, autocast)
        mask = batch["labels"] != -100
        per_sample, is_clipped = grpo_loss(logprobs, logprobs.detach() if old is None else old, advantages, mask,
                                           rc.clip_low, rc.clip_high,
                                           rc.max_new_tokens if rc.length_norm == "budget" else 0)
        if reference is not None:
            with torch.no_grad():
                ref_logprobs = policy_logprobs(reference, batch, autocast)
            kl = kl_k3(logprobs, ref_logprobs, mask)
            per_sample = per_sample + rc.kl_coef * kl
            kl_sum += kl.detach().sum()
        # FSDP averages gradients over ranks; × world turns that into the mean over the global mini-batch
        (per_sample.sum() * world / n_responses).backward()
        loss_sum += per_sample.detach().sum()
        clipped += is_clipped.sum()
        tokens += mask.sum()
    stats = pretrain.all_reduce_sum(torch.stack([loss_sum, clipped, tokens, informative, kl_sum]))
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, rc.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss = float(stats[0]) / n_responses
    ok = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
    stepped = ok and bool(stats[3] > 0)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss, grad_norm=float(grad_norm), clip_fraction=float(stats[1] / stats[2].clamp(min=1)), ok=ok,
                stepped=stepped, kl=float(stats[4]) / n_responses)


@torch.no_grad()
def sync_weights(policy, roller):
    """Copy the policy's weights into the rollout model: FSDP2 shards are all-gathered one tensor at a time
    (every rank calls full_tensor() in the same order), then cast to the rollout dtype."""
    if roller is policy:
        return
    for (name, p), (rname, q) in zip(policy.named_parameters(), roller.named_parameters()):
        assert name == rname, (name, rname)
        q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


def rollout_model(policy, cfg: M.Config, device, world: int):
    """The model that generates: the policy itself for one CPU process; otherwise an unsharded copy (bf16 on a GPU,
    where decoding is memory-bound) refreshed by sync_weights after every update."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if world == 1 and dtype == torch.float32:
        return policy
    return frozen_copy(policy, cfg, device, dtype)


def frozen_copy(policy, cfg: M.Config, device, dtype):
    """An unsharded, gradient-free copy of the policy's current weights in dtype."""
    with torch.device("meta"):
        copy = M.GLM4V(cfg)
    copy = copy.to(dtype).to_empty(device=device).eval()
    for p in copy.parameters():
        p.requires_grad_(False)
    sync_weights(policy, copy)
    return copy


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------------------------


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without torch.distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def noise_generator(device, *parts) -> torch.Generator:
    """A torch.Generator seeded from (seed, iteration, rank, ...): sampling noise that a resumed run repeats."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------------------------


def train(rc: RLConfig):
    """The RL loop of the module docstring, under torchrun or not; returns the policy."""
    rank, world, device = pretrain.setup_distributed()
    K, G, U = rc.groups_per_step, rc.group_size, rc.updates_per_batch
    if K % (U * world):
        raise ValueError(f"--groups-per-step {K} must be a multiple of --updates-per-batch × processes "
                         f"({U} × {world}): every rank trains on the same number of groups in every step")
    os.makedirs(rc.out, exist_ok=True)
    resume_from = pretrain.latest_checkpoint(rc.out) if rc.resume else None
    if not rc.resume and pretrain.latest_checkpoint(rc.out):
        raise FileExistsError(f"{rc.out} already holds a training checkpoint: pass --resume to continue it, or "
                              "choose another --out")
    if not rc.init_from:
        warnings.warn("rlcs.py without --init-from starts from random weights: RL needs an SFT checkpoint that "
                      "already answers in the <think>/<answer> format (run sft.py first)")
    cfg, state, tokenizer = pretrain.initial_state(rc, rank)
    policy = pretrain.build_model(rc, cfg, state, device, world)
    del state
    # --kl-coef: the starting policy, frozen before any resume (for the 9B one more unsharded bf16 copy per GPU)
    reference = frozen_copy(policy, cfg, device, torch.bfloat16 if device.type == "cuda" else torch.float32) \
        if rc.kl_coef > 0 else None
    optimizer = pretrain.build_optimizer(policy, rc, device)
    pool = build_pool(rc)
    if len(pool) < K:
        raise ValueError(f"the prompt pool has {len(pool)} items, fewer than --groups-per-step {K}")
    grade_file = difficulty_path(rc)
    offline = load_difficulty(grade_file, pool) if grade_file and os.path.exists(grade_file) else None
    if rc.difficulty and offline is None:
        raise FileNotFoundError(f"--difficulty {rc.difficulty}: file not found (write it with --grade)")
    curriculum = Curriculum([item.level for item in pool], offline, rc.curriculum, rc.tier_ema, rc.item_ema,
                            rc.curriculum_floor)
    expansion = Expansion(rc.expansion_ema, rc.max_expansion)
    step, totals = 0, {"rollouts": 0, "rollout_tokens": 0, "optimizer_steps": 0, "skipped_updates": 0}
    if resume_from:
        trainer_state = pretrain.load_training_state(policy, optimizer, resume_from, rank)
        step, totals = trainer_state["step"], trainer_state["totals"]
        curriculum.load_state_dict(trainer_state["curriculum"])
        expansion.factor = trainer_state["expansion"]
        pretrain.log(f"resumed from {resume_from} at iteration {step}")
    roller = rollout_model(policy, cfg, device, world)
    if rank == 0:
        with open(os.path.join(rc.out, "rl_config.json"), "w") as f:
            json.dump({"rl": dataclasses.asdict(rc), "model": cfg.to_hf(), "world_size": world,
                       "pool": len(pool), "difficulty": grade_file if offline else None,
                       "tier_sizes": curriculum.sizes.tolist()}, f, indent=2)
        graded = f", offline grades from {grade_file}" if offline else ", no grade file (tiers from levels only)"
        pretrain.log(f"{sum(p.numel() for p in policy.parameters()):,} parameters on {world} × {device.type}; "
                     f"pool of {len(pool)} prompts{graded}; tiers {dict(zip(TIERS, curriculum.sizes.tolist()))}; "
                     f"{K} groups × {G} rollouts per update, {U} optimizer step(s) per rollout batch")
    metrics = pretrain.Metrics(rc.out, rank, step)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=world == 1) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    force_ids = tokenizer.encode("</think><answer>")
    think_close = tokenizer.special["</think>"]
    lenient = set(task_list(rc.lenient_verifier))
    bad_in_a_row = 0
    bar = tqdm(total=rc.max_steps, initial=step, disable=rank != 0, desc="rlcs", dynamic_ncols=True)
    while step < rc.max_steps and not (rc.max_rollouts and totals["rollouts"] >= rc.max_rollouts):
        t0 = time.perf_counter()
        # 1. prompts by curriculum weight, oversampled by the expansion factor; this rank rolls out its slice
        n = expansion.prompts(K, world)
        picks = curriculum.sample(n, np.random.default_rng([rc.seed, step]))
        n = len(picks) - len(picks) % world  # a pool smaller than n: every rank still gets the same count
        picks = picks[:n]
        mine = picks[rank * n // world:(rank + 1) * n // world]
        prompts = {i: render_prompt(pool[i], tokenizer, rc.seed) for i in mine}
        replies = rollout(roller, [prompts[i] for i in mine], G, rc.max_new_tokens, rc.think_budget, force_ids,
                          temperature=rc.temperature, top_p=rc.top_p, generator=noise_generator(device, rc.seed, step,
                                                                                                 rank),
                          rollout_batch=rc.rollout_batch)
        items = [pool[i] for i in mine]
        scores = score_replies(tokenizer, items, replies, G, lenient)
        strict = score_replies(tokenizer, items, replies, G) if lenient else scores
        forced = [rc.think_budget > 0 and len(r) > rc.think_budget and think_close not in r[:rc.think_budget]
                  for r in replies]
        seconds_local = time.perf_counter() - t0
        parts = gather_objects((replies, scores, strict, forced, seconds_local))
        replies = [r for part in parts for r in part[0]]
        scores = torch.tensor([s for part in parts for s in part[1]], dtype=torch.float64).view(n, G)
        strict = torch.tensor([s for part in parts for s in part[2]], dtype=torch.float64).view(n, G)
        forced = [f for part in parts for f in part[3]]
        t1 = time.perf_counter()

        # 2. dynamic sampling expansion: keep the K most balanced groups; update the EMAs
        invalid = (scores == scores[:, :1]).all(1)
        kept = select_balanced(scores, K)
        advantages = group_advantages(scores[kept]).float()  # (K, G)
        expansion_used = expansion.factor
        expansion.update(float(invalid.float().mean()))
        tiers_before = curriculum.tier_pass.copy()
        curriculum.update(picks, scores.mean(1).tolist())

        # 3. this rank's rows: global mini-batch u = kept groups [u·K/U, (u+1)·K/U), rank r its r-th slice
        per_rank = K // (U * world)
        batches = []
        for u in range(U):
            rows = []
            for g in range(u * K // U + rank * per_rank, u * K // U + (rank + 1) * per_rank):
                i = picks[kept[g]]
                if i not in prompts:
                    prompts[i] = render_prompt(pool[i], tokenizer, rc.seed)
                rows += [(prompts[i], replies[kept[g] * G + j], advantages[g, j]) for j in range(G)]
            batches.append(micro_batches(rows, rc.micro_batch, cfg, device))

        # 4. old-policy log-probs: the rollout weights, recomputed by the training model before the first step for
        #    the mini-batches that come after it (the first one is on-policy: old = current, detached)
        with torch.no_grad():
            olds = [[None] * len(micro) if u == 0 else [policy_logprobs(policy, b, autocast) for b, _ in micro]
                    for u, micro in enumerate(batches)]
        t2 = time.perf_counter()

        # 5. GRPO updates, then the rollout copy is refreshed
        lr = pretrain.lr_at(step, rc)
        pretrain.set_lr(optimizer, lr)
        updates = [policy_update(policy, optimizer, [(b, a, o) for (b, a), o in zip(micro, old)], rc, world,
                                 K // U * G, autocast, reference) for micro, old in zip(batches, olds)]
        sync_weights(policy, roller)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t3 = time.perf_counter()

        # 6. bookkeeping
        step += 1
        lengths = [len(r) for r in replies]
        totals["rollouts"] += len(replies)
        totals["rollout_tokens"] += sum(lengths)
        bad = sum(not u["ok"] for u in updates)
        totals["skipped_updates"] += bad
        totals["optimizer_steps"] += sum(u["stepped"] for u in updates)
        bad_in_a_row = bad_in_a_row + bad if bad else 0
        update_tokens = int(pretrain.all_reduce_sum(torch.tensor(
            float(sum(int(b["attention_mask"].sum()) for micro in batches for b, _ in micro)), device=device)).item())
        row = {"step": step, "loss": float(np.mean([u["loss"] for u in updates])),
               "reward": float(scores.mean()), "lr": lr,
               "grad_norm": float(np.mean([u["grad_norm"] for u in updates])),
               "clip_fraction": float(np.mean([u["clip_fraction"] for u in updates])),
               "kl": float(np.mean([u["kl"] for u in updates])),
               "invalid_group_rate": float(invalid.float().mean()),
               "kept_informative": float((~invalid[kept]).float().mean()),
               "expansion": expansion_used, "prompts": n,
               "response_len": float(np.mean(lengths)), "forced_answer_rate": float(np.mean(forced)),
               "rollout_tok_per_s": sum(lengths) / max(max(p[4] for p in parts), 1e-9),
               "update_tok_per_s": update_tokens / max(t3 - t2, 1e-9),
               "time_rollout": t1 - t0, "time_logprobs": t2 - t1, "time_update": t3 - t2, **totals}
        picked_tasks = [pool[i].task for i in picks]
        for task in dict.fromkeys(picked_tasks):
            rows_of = [k for k, t in enumerate(picked_tasks) if t == task]
            row[f"reward_{task}"] = float(scores[rows_of].mean())
            if task in lenient:
                row[f"strict_reward_{task}"] = float(strict[rows_of].mean())
        if lenient:
            row["strict_reward"] = float(strict.mean())
        picked_tiers = curriculum.tier[picks]
        for t, name in enumerate(TIERS):
            here = picked_tiers == t
            key = name.replace(" ", "_")
            row[f"tier_share_{key}"] = float(here.mean())
            row[f"pass_rate_{key}"] = float(scores[torch.from_numpy(here)].mean()) if here.any() else None
            row[f"tier_ema_{key}"] = float(tiers_before[t])
        if rc.eval_every and step % rc.eval_every == 0:
            row.update({f"eval_{k}": v for k, v in evaluate(roller, tokenizer, task_list(rc.tasks) or rewards.TASKS,
                                                              rc.eval_n, rc.seed, rc.max_new_tokens,
                                                              rc.think_budget, levels=pool_levels(rc)).items()})
        metrics.write(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", informative=f"{1 - row['invalid_group_rate']:.2f}",
                        rollouts=totals["rollouts"])
        if bad:
            pretrain.log(f"iteration {step}: {bad} update(s) with a non-finite loss or gradient were skipped")
            if bad_in_a_row >= rc.max_bad_steps:
                raise RuntimeError(f"{bad_in_a_row} updates in a row had a non-finite loss or gradient; stopping. "
                                   "Lower --lr or resume from the last checkpoint.")
        done = step >= rc.max_steps or (rc.max_rollouts and totals["rollouts"] >= rc.max_rollouts)
        if done or (rc.save_every and step % rc.save_every == 0):
            state = {"step": step, "totals": totals, "curriculum": curriculum.state_dict(),
                     "expansion": expansion.factor}
            pretrain.save_training_state(policy, optimizer, state, rc.out, step, rank, rc.keep_checkpoints)
            pretrain.export_hf(policy, cfg, tokenizer, rc.out, rank)
    bar.close()
    pretrain.log(f"done: iteration {step}, {totals['rollouts']:,} rollouts; Hugging Face checkpoint in {rc.out}")
    pretrain.teardown_distributed()
    return policy


# ---------------------------------------------------------------------------------------------------------------
# Offline difficulty (--grade) and held-out evaluation (--eval)
# ---------------------------------------------------------------------------------------------------------------


def load_for_inference(path: str, device):
    """(model, tokenizer) from a checkpoint directory, bf16 on a GPU."""
    return sample.load(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def grade(rc: RLConfig):
    """Offline difficulty (paper §5): k sampled replies to every pool item from the --init-from checkpoint; writes
    one JSON line per item {key, task, level, samples, pass_rate (mean reward), pass_at_k (best reward)}."""
    rank, world, device = pretrain.setup_distributed()
    if not rc.init_from:
        raise ValueError("--grade needs --init-from: the checkpoint whose pass@k grades the pool")
    path = difficulty_path(rc)
    model, tokenizer = load_for_inference(rc.init_from, device)
    pool = build_pool(rc)
    force_ids = tokenizer.encode("</think><answer>")
    per_call = max(1, (rc.rollout_batch or 64 * rc.grade_k) // rc.grade_k)  # prompts per generate() call
    mine = list(range(rank, len(pool), world))
    results = []
    for start in tqdm(range(0, len(mine), per_call), disable=rank != 0, desc="grade", unit="batch"):
        idx = mine[start:start + per_call]
        items = [pool[i] for i in idx]
        replies = rollout(model, [render_prompt(it, tokenizer, rc.seed) for it in items], rc.grade_k,
                          rc.max_new_tokens, rc.think_budget, force_ids, temperature=rc.temperature, top_p=rc.top_p,
                          generator=noise_generator(device, rc.seed, start, rank, 1))
        scores = score_replies(tokenizer, items, replies, rc.grade_k)
        for j, i in enumerate(idx):
            s = scores[j * rc.grade_k:(j + 1) * rc.grade_k]
            results.append((i, float(np.mean(s)), float(max(s))))
    results = sorted(r for part in gather_objects(results) for r in part)
    if rank == 0:
        lines = [json.dumps({"key": pool[i].key, "task": pool[i].task, "level": pool[i].level,
                             "samples": rc.grade_k, "pass_rate": p, "pass_at_k": best}) for i, p, best in results]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pretrain.write_atomic(path, "\n".join(lines) + "\n")
        tiers = np.bincount([tier_of(pool[i].level, p) for i, p, _ in results], minlength=len(TIERS))
        print(json.dumps({"difficulty": path, "items": len(results), "mean_pass_rate": float(np.mean(
            [p for _, p, _ in results])), "tiers": dict(zip(TIERS, tiers.tolist()))}))
    pretrain.teardown_distributed()


@torch.no_grad()
def evaluate(model, tokenizer, tasks, n: int, seed: int, max_new_tokens: int, think_budget: int,
             batch_size: int = 64, progress: bool = False, levels=data.LEVELS, temperature: float = 0.0,
             records: list = None) -> dict:
    """Greedy accuracy (mean strict reward) on n held-out items per domain (the levels in turn), batched and, under
    torchrun, split across ranks; temperature > 0: the mean reward of one sampled reply per item instead (what RL
    optimises). Returns {domain: accuracy, "mean": mean over domains}; `records`, if a list, receives this rank's
    {task, index, level, question, answer, reply, score} per item."""
    rank, world = rank_world()
    levels = list(levels)
    jobs = [(task, i) for task in tasks for i in range(n)][rank::world]
    force_ids = tokenizer.encode("</think><answer>")
    sums = torch.zeros(len(tasks), 2, dtype=torch.float64)  # (score sum, count) per domain
    for start in tqdm(range(0, len(jobs), batch_size), disable=not progress or rank != 0, desc="eval", unit="batch"):
        items = [data.make_item(task, i, seed, "heldout", levels[i % len(levels)])
                 for task, i in jobs[start:start + batch_size]]
        replies = rollout(model, [it.prompt(tokenizer) for it in items], 1, max_new_tokens, think_budget, force_ids,
                          temperature=temperature, generator=noise_generator(model.lm_head.weight.device, seed, start,
                                                                             rank, 2))
        for (task, index), it, reply in zip(jobs[start:start + batch_size], items, replies):
            text = tokenizer.decode(reply)
            score = rewards.score(task, text, it.answer)
            sums[list(tasks).index(task)] += torch.tensor([score, 1.0], dtype=torch.float64)
            if records is not None:
                records.append({"task": task, "index": index, "level": it.level, "question": it.question,
                                "answer": it.answer, "reply": text, "score": score})
    if dist.is_initialized():
        dist.all_reduce(sums)
    accuracy = {task: float(s / max(c, 1)) for task, (s, c) in zip(tasks, sums.tolist())}
    return {**accuracy, "mean": float(np.mean(list(accuracy.values())))}


def eval_file(levels, temperature: float) -> str:
    """The name of --eval's record: eval.json for all levels, greedy; a subset of levels or a sampling temperature
    is in the name (eval_levels1,2_t1.json), so that no record overwrites another."""
    name = "eval" if list(levels) == list(data.LEVELS) else "eval_levels" + ",".join(map(str, levels))
    return name + (f"_t{temperature:g}" if temperature else "") + ".json"


def run_eval(rc: RLConfig):
    rank, world, device = pretrain.setup_distributed()
    model, tokenizer = load_for_inference(rc.eval, device)
    tasks = task_list(rc.tasks) or list(rewards.TASKS)
    levels = pool_levels(rc)
    records = []
    accuracy = evaluate(model, tokenizer, tasks, rc.eval_n, rc.seed, rc.max_new_tokens, rc.think_budget,
                        progress=True, levels=levels, temperature=rc.eval_temperature, records=records)
    if dist.is_initialized():
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, records)
        records = sorted((r for part in every_rank for r in part), key=lambda r: (tasks.index(r["task"]), r["index"]))
    if rank == 0:
        result = {"checkpoint": rc.eval, "n_per_domain": rc.eval_n, "seed": rc.seed, "levels": levels,
                  "temperature": rc.eval_temperature, **accuracy}
        print(json.dumps(result))
        try:  # next to the weights, for --compare; a read-only checkpoint directory only loses the record
            name = eval_file(levels, rc.eval_temperature)
            pretrain.write_atomic(os.path.join(rc.eval, name), json.dumps(result, indent=1) + "\n")
            pretrain.write_atomic(os.path.join(rc.eval, name.replace(".json", "_replies.jsonl")),
                                  "".join(json.dumps(r) + "\n" for r in records))  # what it answered, to read
        except OSError as e:
            warnings.warn(f"could not write the evaluation into {rc.eval}: {e}")
    pretrain.teardown_distributed()
    return accuracy


# ---------------------------------------------------------------------------------------------------------------
# Charts (--plot): PIL line and stacked-area charts, no plotting library
# ---------------------------------------------------------------------------------------------------------------

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
TIER_COLORS = ((120, 190, 120), (170, 215, 120), (245, 200, 90), (240, 140, 80), (200, 70, 70))


def smooth(values, window: int) -> list:
    """Trailing moving average that skips missing values (None)."""
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1):i + 1] if v is not None]
        out.append(sum(seen) / len(seen) if seen else None)
    return out


def _nice_step(span: float, ticks: int = 6) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def chart(title: str, xs, series, y_label: str, y_max: float = 1.0, stacked: bool = False,
          size=(820, 440), x_label: str = "iteration"):
    """A line chart (or a stacked area chart) of series [(name, values, colour)] over xs (the x range; a line
    series may give its own x values: (name, values, colour, xs)), legend on the right."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 58, 170, 48, 44
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    font, bold = ImageFont.load_default(size=12), ImageFont.load_default(size=14)
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - min(max(y, 0.0), y_max) / y_max * (H - top - bottom))

    d.text((left, 8), title, fill="black", font=bold)
    for k in range(5):  # horizontal grid and y labels
        y = y_max * k / 4
        _, py = px(x0, y)
        d.line([(left, py), (W - right, py)], fill=(225, 225, 225))
        d.text((left - 6, py), f"{y:g}", fill="black", font=font, anchor="rm")
    step = _nice_step(x1 - x0)
    tick = math.ceil(x0 / step) * step
    while tick <= x1 + 1e-9:
        qx, _ = px(tick, 0)
        d.line([(qx, H - bottom), (qx, H - bottom + 4)], fill="black")
        d.text((qx, H - bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
        tick += step
    d.text(((left + W - right) / 2, H - 14), x_label, fill="black", font=font, anchor="mm")
    d.text((8, top - 20), y_label, fill="black", font=font)
    base = [0.0] * len(xs)
    own_xs = {entry[0]: entry[3] for entry in series if len(entry) > 3}
    for name, values, color, *_ in series:
        if stacked:
            top_line = [b + (v or 0.0) for b, v in zip(base, values)]
            polygon = [px(x, y) for x, y in zip(xs, top_line)] + [px(x, y) for x, y in zip(xs[::-1], base[::-1])]
            if len(polygon) >= 3:
                d.polygon(polygon, fill=color)
            base = top_line
        else:  # a series may bring its own x values as a 4th element (runs of different lengths)
            segment = []
            for x, v in zip(own_xs.get(name, xs), values):
                if v is None:
                    segment = []
                    continue
                segment.append(px(x, v))
                if len(segment) >= 2:
                    d.line(segment[-2:], fill=color, width=2)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k, (name, _, color, *_) in enumerate(series):  # legend
        ly = top + 4 + 18 * k
        d.rectangle([W - right + 12, ly, W - right + 24, ly + 12], fill=color)
        d.text((W - right + 30, ly + 6), name, fill="black", font=font, anchor="lm")
    return image


def plot(out: str) -> list:
    """reward.png (mean reward per domain over iterations), tiers.png (the share of sampled prompts per tier) and
    tier_pass.png (each tier's pass rate) from out/metrics.jsonl, moving averages over ~2% of the run. Returns
    the paths written."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --plot needs the directory of an RL run")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    xs = [r["step"] for r in rows]
    window = max(1, len(rows) // 50)
    tasks = [t for t in rewards.TASKS if any(f"reward_{t}" in r for r in rows)]
    series = [(t, smooth([r.get(f"reward_{t}") for r in rows], window), PALETTE[k % len(PALETTE)])
              for k, t in enumerate(tasks)] + [("all", smooth([r["reward"] for r in rows], window), (0, 0, 0))]
    keys = [name.replace(" ", "_") for name in TIERS]
    tier_shares = [(name, smooth([r.get(f"tier_share_{k}") for r in rows], window), c)
                   for name, k, c in zip(TIERS, keys, TIER_COLORS)]
    tier_pass = [(name, smooth([r.get(f"pass_rate_{k}") for r in rows], window), c)
                 for name, k, c in zip(TIERS, keys, TIER_COLORS)]
    smoothing = f" (moving average of {window})" if window > 1 else ""
    written = []
    for name, image in (("reward.png", chart("Mean reward per domain" + smoothing, xs, series, "reward")),
                        ("tiers.png", chart("Sampled prompts per curriculum tier" + smoothing, xs,
                                            tier_shares[::-1], "share", stacked=True)),
                        ("tier_pass.png", chart("Pass rate per curriculum tier" + smoothing, xs, tier_pass,
                                                "mean reward"))):
        target = os.path.join(out, name)
        image.quantize(64).save(target, optimize=True)  # a small palette PNG: tens of KB
        written.append(target)
    return written


def bar_chart(title: str, groups, series, y_label: str, y_max: float = 1.0, size=(900, 420)):
    """Grouped bars: for each name in groups, one bar per series [(name, values, colour)], legend on the right."""
    from PIL import Image, ImageDraw, ImageFont

    W, H = size
    left, right, top, bottom = 58, 190, 48, 44
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    font, bold = ImageFont.load_default(size=12), ImageFont.load_default(size=14)
    plot_h = H - top - bottom
    d.text((left, 8), title, fill="black", font=bold)
    for k in range(5):
        y = H - bottom - k / 4 * plot_h
        d.line([(left, y), (W - right, y)], fill=(225, 225, 225))
        d.text((left - 6, y), f"{y_max * k / 4:g}", fill="black", font=font, anchor="rm")
    slot = (W - left - right) / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for g, group in enumerate(groups):
        x = left + g * slot + slot * 0.1
        for name, values, color in series:
            v = min(max(values[g], 0.0), y_max)
            d.rectangle([x, H - bottom - v / y_max * plot_h, x + bar - 1, H - bottom], fill=color)
            x += bar
        d.text((left + (g + 0.5) * slot, H - bottom + 6), group.replace("video_grounding", "video"),
               fill="black", font=font, anchor="mt")
    d.text((8, top - 20), y_label, fill="black", font=font)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k, (name, _, color) in enumerate(series):
        ly = top + 4 + 18 * k
        d.rectangle([W - right + 12, ly, W - right + 24, ly + 12], fill=color)
        d.text((W - right + 30, ly + 6), name, fill="black", font=font, anchor="lm")
    return image


def compare(runs, out: str, levels=data.LEVELS, temperature: float = 0.0) -> str:
    """The held-out table of several runs (each directory's record from --eval with these levels and temperature) as
    Markdown, the first run the baseline of the Δ columns; draws out/heldout.png (bars per domain) and, for runs with
    a metrics.jsonl, out/reward.png (training reward against rollouts) and out/heldout_curve.png (the --eval-every
    accuracy)."""
    results = []
    subset = ",".join(map(str, levels)) if list(levels) != list(data.LEVELS) else ""
    flags = (f" --levels {subset}" if subset else "") + (f" --eval-temperature {temperature:g}" if temperature else "")
    for run in runs:
        path = os.path.join(run, eval_file(levels, temperature))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run `python rlcs.py --eval {run}{flags}` first")
        with open(path) as f:
            results.append(json.load(f))
    for key in ("seed", "n_per_domain"):  # a Δ means something only between scores on the same held-out items
        seen = {json.dumps(r.get(key)): run for run, r in zip(runs, results)}
        if len(seen) > 1:
            raise ValueError(f"the runs were evaluated on different held-out items ({key}: "
                             + ", ".join(f"{v} in {run}" for v, run in seen.items())
                             + f"): re-run `python rlcs.py --eval RUN{flags}` with the same --eval-n and --seed "
                             "for each")
    tasks = [t for t in rewards.TASKS if all(t in r for r in results)] + ["mean"]
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    header = ["domain"] + names + [f"Δ {n}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tasks:
        cells = [f"{100 * r[t]:.1f}" for r in results] + [f"{100 * (r[t] - results[0][t]):+.1f}" for r in results[1:]]
        lines.append(f"| {'**mean**' if t == 'mean' else t} | " + " | ".join(cells) + " |")
    kind = f"mean reward of one reply sampled at T = {temperature:g}" if temperature else "greedy accuracy"
    lines.append(f"\nheld-out {kind} (%), {results[0]['n_per_domain']} items per domain"
                 + (f", levels {subset}" if subset else ""))
    os.makedirs(out, exist_ok=True)
    colors = [PALETTE[k % len(PALETTE)] for k in range(len(runs))]
    highest = max(r[t] for r in results for t in tasks)
    images = {"heldout.png": bar_chart(f"Held-out {kind} per domain", tasks,
                                       [(nm, [r[t] for t in tasks], c) for nm, r, c in zip(names, results, colors)],
                                       "accuracy", y_max=0.5 if highest <= 0.5 else 1.0)}
    curves = []
    for run, name, color in zip(runs, names, colors):
        path = os.path.join(run, "metrics.jsonl")
        if os.path.exists(path):  # an RL run (a pretrain/SFT metrics.jsonl has no rollouts)
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if rows and "rollouts" in rows[0]:
                curves.append((name, rows, color))
    if curves:
        xs = [0] + [r["rollouts"] for _, rows, _ in curves for r in rows]  # the x range
        window = max(1, max(len(rows) for _, rows, _ in curves) // 10)
        series = [(name, smooth([r["reward"] for r in rows], window), c, [r["rollouts"] for r in rows])
                  for name, rows, c in curves]
        # a run with --lenient-verifier: also its strict reward, and the lenient domains on their own (lighter)
        lenient = {name: sorted({k[len("strict_reward_"):] for r in rows for k in r if k.startswith("strict_reward_")})
                   for name, rows, _ in curves}
        for name, rows, c in curves:
            if lenient[name]:
                dark, light = tuple(v // 2 for v in c), tuple((v + 255) // 2 for v in c)
                series.append((name + " (strict)", smooth([r.get("strict_reward") for r in rows], window), dark,
                               [r["rollouts"] for r in rows]))
                series += [(f"{name}: {t}", smooth([r.get(f"reward_{t}") for r in rows], window), light,
                            [r["rollouts"] for r in rows]) for t in lenient[name]]
        images["reward.png"] = chart(f"Training reward (moving average of {window})", xs, series, "reward",
                                     y_max=1.0 if any(lenient.values()) else 0.5, x_label="rollouts")
        evaluated = [(name, [r for r in rows if "eval_mean" in r], c) for name, rows, c in curves]
        if any(rows for _, rows, _ in evaluated):
            base = [(f"{names[0]} (mean)", [results[0]["mean"]] * 2, (0, 0, 0), [0, max(xs)])]
            series = base + [(name, [r["eval_mean"] for r in rows], c, [r["rollouts"] for r in rows])
                             for name, rows, c in evaluated if rows]
            for t in sorted({t for ts in lenient.values() for t in ts if t in results[0]}):
                series.append((f"{names[0]}: {t}", [results[0][t]] * 2, (150, 150, 150), [0, max(xs)]))
            for name, rows, c in evaluated:
                light = tuple((v + 255) // 2 for v in c)
                series += [(f"{name}: {t}", [r.get(f"eval_{t}") for r in rows], light, [r["rollouts"] for r in rows])
                           for t in lenient[name] if rows]
            images["heldout_curve.png"] = chart("Held-out greedy accuracy during training (--eval-every)", xs, series,
                                                "accuracy", y_max=0.5, x_label="rollouts")
    for name, image in images.items():
        image.quantize(64).save(os.path.join(out, name), optimize=True)
    table = "\n".join(lines)
    pretrain.write_atomic(os.path.join(out, "table.md"), table + "\n")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    rc = config_from_args(build_parser().parse_args(argv))
    try:
        if rc.plot:
            print("\n".join(plot(rc.plot)))
        elif rc.compare:
            print(compare(task_list(rc.compare), rc.out, pool_levels(rc), rc.eval_temperature))
        elif rc.eval:
            run_eval(rc)
        elif rc.grade:
            grade(rc)
        else:
            train(rc)
    except (OSError, ValueError) as e:  # missing or unwritable files, bad flags or data: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()


# --- benchmarks (called by bench.py) ---


def bench_rlcs(device="cpu"):
    """The time split of one RL iteration on the tiny preset: rollout (generate + score, K·G = 64 replies of 128
    tokens), old-policy log-probs, and the GRPO update (2 optimizer steps), with fresh weights that never stop early
    (equal work every run). Peer of the rollout row: bare sample.generate on the same batch, i.e. what sample.py
    allows; ratio = generate time / rollout time (1.0: no overhead)."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # thousands of tiny ops: one thread is steadier on a busy machine (as bench_sample)
        torch.set_num_threads(1)
    try:
        return _bench_iteration(device)
    finally:
        torch.set_num_threads(threads)


def _bench_iteration(device):
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    cfg = dataclasses.replace(M.PRESETS["tiny"], eos_token_ids=())
    torch.manual_seed(0)
    policy = M.GLM4V(cfg).init_weights().to(device)
    roller = rollout_model(policy, cfg, device, 1)
    rc = resolve(RLConfig(preset="tiny"))
    optimizer = pretrain.build_optimizer(policy, rc, device)
    tokenizer = data.tiny_tokenizer()
    K, G = rc.groups_per_step, rc.group_size
    pool = synthetic_pool(rewards.TASKS, 1, 0, levels=(1,))[:K]  # one prompt per domain
    prompts = [render_prompt(item, tokenizer, 0) for item in pool]
    force_ids = tokenizer.encode("</think><answer>")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)

    def do_rollout():
        replies = rollout(roller, prompts, G, rc.max_new_tokens, rc.think_budget, force_ids,
                          generator=noise_generator(device, 0))
        return replies, score_replies(tokenizer, pool, replies, G)

    def bare_generate():
        batch = collate([p for p in prompts for _ in range(G)], cfg)
        return sample.generate(roller, batch["input_ids"], rc.max_new_tokens, 1.0, 1.0,
                               **{k: batch[k] for k in VISION_KEYS}, attention_mask=batch["attention_mask"],
                               generator=noise_generator(device, 0), think_budget=rc.think_budget,
                               force_answer_ids=force_ids)

    do_rollout(), bare_generate()  # warm up
    t_peer = min(timed(bare_generate)[0] for _ in range(2))
    t_rollout, (replies, _) = min((timed(do_rollout) for _ in range(2)), key=lambda r: r[0])
    advantages = group_advantages(torch.rand(K, G, generator=torch.Generator().manual_seed(0)).round())
    rows = [(prompts[k // G], replies[k], advantages[k // G, k % G]) for k in range(K * G)]
    halves = [micro_batches(rows[u * len(rows) // 2:(u + 1) * len(rows) // 2], 0, cfg, device) for u in range(2)]
    with torch.no_grad():  # as in train(): the second mini-batch needs the rollout policy's log-probs
        t_logprobs, second = timed(lambda: [policy_logprobs(policy, b, autocast) for b, _ in halves[1]])
    olds = [[None] * len(halves[0]), second]
    t_update, _ = timed(lambda: [policy_update(policy, optimizer, [(b, a, o) for (b, a), o in zip(part, old)], rc, 1,
                                               len(rows) // 2, autocast) for part, old in zip(halves, olds)])
    total = t_rollout + t_logprobs + t_update
    tokens = sum(len(r) for r in replies)
    common = dict(units="s", device=str(device), replies=K * G, new_tokens=rc.max_new_tokens,
                  threads=torch.get_num_threads())
    return [dict(name="RL iteration: rollout (generate + score)", ours=round(t_rollout, 3), peer=round(t_peer, 3),
                 ratio=round(t_peer / t_rollout, 2), peer_name="bare sample.generate",
                 share=round(t_rollout / total, 3),
                 tok_per_s=round(tokens / t_rollout, 1), **common),
            dict(name="RL iteration: old-policy log-probs", ours=round(t_logprobs, 3), peer=None, ratio=None,
                 share=round(t_logprobs / total, 3), **common),
            dict(name="RL iteration: GRPO update (2 optimizer steps)", ours=round(t_update, 3), peer=None, ratio=None,
                 share=round(t_update / total, 3), **common)]
