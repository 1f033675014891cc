"""The RL stage of GLM-4.1V-Thinking: GRPO with Reinforcement Learning with Curriculum Sampling (RLCS), paper §5.

    python rlcs.py --grade --init-from runs/sft            # offline difficulty: pass rate and pass@k of every pool item
    python rlcs.py --tiny --init-from runs/sft             # RL on all eight domains at once
    torchrun --nproc_per_node 8 rlcs.py --preset 9b --init-from runs/sft --data prompts.jsonl

One iteration is five named steps of `train`: **rollout** — the curriculum picks prompts from a fixed pool, each
gets G replies from `sample.generate_replies` (temperature 1, top-p 1, force answering at the thinking budget);
**score** — `rewards.score` grades every reply with its domain's strict verifier (with --reward-model, the reward
model of reward.py grades the prompts no rule can check, or those asked for: RLHF beside RLVR, paper §5.2);
**select** — groups whose G rewards are all equal give no gradient, so K·e prompts are rolled out (e, the expansion
factor, an EMA of 1 / (1 − their share)) and the K most balanced groups are kept; **update** — group-normalised
advantages and the clipped GRPO loss (clip-higher [0.8, 1.28], per-sample averaging, no KL and no entropy term),
`--updates-per-batch` optimizer steps, then the rollout weights are refreshed; **log**. Format is SFT's job: a
malformed reply scores 0.

Curriculum sampling: every pool item has a tier from its level and its offline pass rate (`--grade`); the
rollouts keep EMAs of each item's and each tier's pass rate p, and items are sampled with weight ∝ 4p(1 − p)
(raised to a floor), so what the model solves about half the time is favoured. docs/rlcs.md explains every
choice (what GRPO keeps and drops, the curriculum's formula, distributed rollouts); the README shows the runs.
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
from typing import ClassVar

import numpy as np
import torch
from tqdm import tqdm

import data
import evaluate
import lora
import model as M
import pretrain
import reward
import rewards
import sample
import world
from pretrain import _f

# ---------------------------------------------------------------------------------------------------------------
# Configuration: the trainer's RunConfig plus what only RL has
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RLConfig(pretrain.RunConfig):
    stages: ClassVar[tuple] = ("rl",)
    max_rollouts: int = _f(None, "also stop once this many replies were generated (default: no budget)")
    # prompts (--data: JSONL of {messages, images, videos, task, answer, level}; default: the synthetic world)
    pool_size: int = _f(None, "synthetic world: training items per domain and level in the pool (default: per preset)")
    # rollouts
    group_size: int = _f(None, "G: rollouts per prompt (default: per preset)")
    groups_per_step: int = _f(None, "K: groups (prompts) per update, after dynamic sampling (default: per preset)")
    max_new_tokens: int = _f(None, "the length limit of a reply in tokens (default: per preset)")
    think_budget: int = _f(None, "force answering (paper §5): after this many reply tokens without </think>, insert "
                           "</think><answer> (default: max_new_tokens minus room for the answer; 0: never)")
    temperature: float = _f(1.0, "rollout temperature (the GRPO ratio is of the temperature-1 policy)")
    top_p: float = _f(1.0, "rollout nucleus (the paper: 1, i.e. off)")
    rollout_batch: int = _f(None, "rows per generate() call (default: all of this rank's rollouts at once); on CUDA "
                            "every call is padded to it, so the compiled decode step keeps one shape")
    # the GRPO update
    clip_low: float = _f(0.2, "ε_low: the ratio is clipped below at 1 − ε_low")
    clip_high: float = _f(0.28, "ε_high: clip-higher, the ratio is clipped above at 1 + ε_high")
    kl_coef: float = _f(0.0, "β of a per-token KL penalty (k3) to a frozen copy of the starting policy; the paper "
                        "uses none (0)")
    length_norm: str = _f("sample", "sample: each reply's loss is the mean over its tokens (the paper's per-sample "
                          "averaging) | budget: the sum over its tokens / --max-new-tokens (Dr. GRPO; no length "
                          "bias)")
    updates_per_batch: int = _f(2, "optimizer steps per rollout batch, each on its own slice of the kept groups")
    micro_batch: int = _f(None, "responses per forward/backward (gradient accumulation; default: a rank's slice)")
    # dynamic sampling expansion
    expansion_ema: float = _f(0.9, "EMA decay of the oversampling factor 1 / (1 − share of all-equal groups)")
    max_expansion: float = _f(4.0, "at most this many times K prompts are rolled out")
    # the curriculum
    curriculum: str = _f("rlcs", "rlcs (curriculum sampling) | uniform (every pool item equally likely)")
    difficulty: str = _f(None, "the --grade file (default: INIT_FROM/difficulty.jsonl when it exists)")
    grade_k: int = _f(8, "--grade: samples per item")
    tier_ema: float = _f(0.8, "EMA decay of each tier's online pass rate")
    item_ema: float = _f(0.5, "EMA decay of each item's online pass rate")
    curriculum_floor: float = _f(0.05, "the smallest weight 4p(1−p) is raised to (solved and hopeless items)")
    # verifiers and evaluation
    verifier: str = _f(None, "comma-separated NAME=module:function: add the task NAME (for --data prompts), scored by "
                       "your function fn(box content, ground truth as text) -> [0, 1] (rewards.add_verifier)")
    lenient_verifier: str = _f(None, "comma-separated domains scored with the hackable lenient verifier during "
                               "training only (paper §5's collapse experiment); evaluation is always strict")
    reward_model: str = _f(None, "a reward model (reward.py's --out) for the `model` verifier (paper §5.2): it grades "
                           "prompts marked \"verifier\": \"model\", domains without a rule verifier and "
                           "--model-verifier-tasks")
    model_verifier_tasks: str = _f(None, "comma-separated domains graded by --reward-model instead of their rule "
                                   "verifier, in training only (their strict score is logged as strict_reward_<task>)")
    eval_every: int = _f(0, "held-out greedy evaluation every N iterations into metrics.jsonl (0: off)")
    eval_n: int = _f(None, "held-out items per domain for --eval-every (default: per preset)")
    grade: bool = _f(False, "write the offline difficulty (pass rate and pass@k per pool item) and exit")


# Per preset: a laptop-sized run for tiny; for the 9B our guesses at the paper's scale (it gives no numbers). The
# optimizer is ours: AdamW without weight decay at a constant rate. tiny's lr: 1e-4 and 3e-5 garble the thinking
# of the tiny SFT model within 40 iterations, 1e-5 keeps every domain within noise (README, "in miniature").
DEFAULTS = {
    "rl": dict(out="runs/rlcs", min_lr_ratio=1.0, warmup_steps=0, weight_decay=0.0, save_every=50,
               activation_checkpointing=False),
    ("tiny", "rl"): dict(max_steps=40, pool_size=40, group_size=8, groups_per_step=8, max_new_tokens=128, lr=1e-5,
                         eval_n=20),
    ("9b", "rl"): dict(max_steps=2000, pool_size=400, group_size=16, groups_per_step=64, max_new_tokens=16384,
                       lr=1e-6, eval_n=100, micro_batch=4, rollout_batch=32, activation_checkpointing=True),
}
ANSWER_ROOM = {"tiny": 32, "9b": 1024}  # tokens left after the thinking budget for the answer


def resolve(rc: RLConfig) -> RLConfig:
    """Fill the None fields with the preset's defaults and check the values."""
    pretrain.resolve_run(rc, DEFAULTS)
    if rc.think_budget is None:
        rc.think_budget = max(rc.max_new_tokens - ANSWER_ROOM[rc.preset], 3 * rc.max_new_tokens // 4)
    if rc.length_norm not in ("sample", "budget"):
        raise ValueError(f"--length-norm must be sample or budget, not {rc.length_norm!r}")
    if rc.curriculum not in ("rlcs", "uniform"):
        raise ValueError(f"--curriculum must be rlcs or uniform, not {rc.curriculum!r}")
    rewards.add_verifiers(rc.verifier)
    judged = task_list(rc.model_verifier_tasks)
    for name in ([] if rc.data else task_list(rc.tasks)) + task_list(rc.lenient_verifier) + judged:
        if name not in rewards.VERIFIERS:  # a --data file may hold domains without one: the reward model grades them
            raise ValueError(f"unknown domain {name!r} in --tasks/--lenient-verifier/--model-verifier-tasks; "
                             f"domains: {', '.join(rewards.VERIFIERS)} (--verifier NAME=module:function adds one)")
        if not rc.data and name in task_list(rc.tasks) and name not in world.TASKS:
            raise ValueError(f"the synthetic world has no domain {name!r}: its prompts come from --data")
    if judged and not rc.reward_model:
        raise ValueError("--model-verifier-tasks needs --reward-model DIR (a reward model trained with reward.py)")
    if set(judged) & set(task_list(rc.lenient_verifier)):
        raise ValueError("a domain cannot be in both --lenient-verifier and --model-verifier-tasks")
    if rc.groups_per_step < 1 or rc.updates_per_batch < 1:
        raise ValueError(f"--groups-per-step and --updates-per-batch must be at least 1, got {rc.groups_per_step} "
                         f"and {rc.updates_per_batch}")
    if rc.group_size < 2:
        raise ValueError(f"--group-size must be at least 2 (advantages are relative to the group), got {rc.group_size}")
    if not 0 <= rc.clip_low < 1 or rc.clip_high < 0:
        raise ValueError(f"need 0 <= --clip-low < 1 and --clip-high >= 0, got {rc.clip_low}, {rc.clip_high}")
    if rc.max_expansion < 1:
        raise ValueError(f"--max-expansion must be at least 1, got {rc.max_expansion}")
    if not rc.temperature > 0 or not 0 < rc.top_p <= 1:
        raise ValueError(f"rollouts need --temperature > 0 and 0 < --top-p <= 1, got {rc.temperature}, {rc.top_p}")
    return rc


def task_list(text) -> list:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def default_tasks() -> list:
    """The domains RL trains on without --tasks: every synthetic domain, in the verifier table's order."""
    return [task for task in rewards.VERIFIERS if task in world.TASKS]


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
    P(i) ∝ W_t · w_i / w̄_t with W_t = max(4·P_t(1 − P_t), floor) of tier t's pass rate and w_i the same of item
    i's (P_t for items not yet seen), w̄_t the mean of w over the tier — so a tier's share of the batch is its share
    of the pool times W_t, and its items' own pass rates redistribute it. mode "uniform": every item equally likely
    (the statistics are still kept)."""

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
    """One training prompt: its key (the grade file's join key), domain, level 1–5, ground truth, where it comes
    from (a synthetic item index, or a parsed JSONL record), and what grades it (None: its domain's rule verifier;
    rewards.MODEL_VERIFIER: the reward model)."""
    key: str
    task: str
    level: int
    answer: object
    index: int = 0
    record: dict = None
    verifier: str = None


def synthetic_pool(tasks, per_level: int, seed: int, levels=world.LEVELS) -> list:
    """per_level training items of every domain and level, the same in every process."""
    return [PoolItem(f"{task}/{level}/{i}", task, level, world.make_item(task, i, seed, "train", level,
                                                                          render=False).answer, i)
            for task in tasks for level in levels for i in range(per_level)]


def pool_record(obj, root: str) -> PoolItem:
    """One JSONL prompt {"messages", "images"/"videos", "task", "answer", "level" (1–5, default 3), "verifier"
    ("model": graded by --reward-model; absent: by the task's rule verifier)} as a pool item (its assistant messages
    dropped). A task without a rule verifier is the reward model's, and needs no answer; a model-graded prompt's
    answer, when given, gives its strict score. ValueError/FileNotFoundError say what is wrong with it."""
    record = data.parse_record(obj, root)
    if "messages" not in record:
        raise ValueError("an RL prompt needs 'messages'")
    task, level, verifier = obj.get("task"), obj.get("level", 3), obj.get("verifier")
    if not isinstance(task, str) or not task:
        raise ValueError(f"'task' must name the domain (rule verifiers: {', '.join(rewards.VERIFIERS)}), got {task!r}")
    if verifier not in (None, rewards.MODEL_VERIFIER):
        raise ValueError(f"'verifier' must be {rewards.MODEL_VERIFIER!r} (graded by --reward-model) or absent, got "
                         f"{verifier!r}")
    verifier = verifier if task in rewards.VERIFIERS else rewards.MODEL_VERIFIER
    if "answer" not in obj and verifier is None:
        raise ValueError("'answer' (the ground truth the verifier checks) is missing")
    if level not in world.LEVELS:
        raise ValueError(f"'level' must be one of {world.LEVELS}, got {level!r}")
    problem = rewards.truth_problem(task, obj["answer"]) if "answer" in obj and task in rewards.VERIFIERS else None
    if problem:
        raise ValueError(problem)
    while record["messages"] and record["messages"][-1]["role"] == "assistant":
        record["messages"].pop()
    return PoolItem("", task, level, obj.get("answer"), 0, record, verifier)


def jsonl_pool(path: str, tasks=None, max_bad_data: float = 0.05) -> list:
    """Prompts from a JSONL file (`python world.py export` writes such files). A line that is not a valid prompt,
    or whose answer its verifier cannot read, is dropped and counted (the first few printed with file:line); more
    than max_bad_data of them stops with an error."""
    root = os.path.dirname(os.path.abspath(path))
    usable, dropped, lines = data.read_jsonl(path, lambda obj: pool_record(obj, root), "prompt")
    pool = [dataclasses.replace(item, key=f"line:{lineno}", index=lineno) for lineno, _, item in usable
            if not tasks or item.task in tasks]
    for problem in dropped[:5]:
        pretrain.log(f"dropped {problem}")
    if dropped and (len(dropped) > max_bad_data * lines or not pool):
        raise ValueError(f"{path}: {len(dropped)} of {lines} prompts are unusable, more than --max-bad-data "
                         f"{max_bad_data:g} (first: {dropped[0]})")
    if dropped:
        pretrain.log(f"{path}: {len(dropped)} of {lines} prompts dropped")
    if not pool:
        raise ValueError(f"{path}: no prompts" + (f" for the domains {', '.join(tasks)}" if tasks else ""))
    return pool


def build_pool(rc: RLConfig) -> list:
    """The prompts, --model-verifier-tasks marked as graded by the reward model."""
    if rc.data:
        pool = jsonl_pool(rc.data, task_list(rc.tasks), rc.max_bad_data)
    else:
        pool = synthetic_pool(task_list(rc.tasks) or default_tasks(), rc.pool_size, rc.seed, pool_levels(rc))
    judged = set(task_list(rc.model_verifier_tasks))
    return [dataclasses.replace(item, verifier=rewards.MODEL_VERIFIER) if item.task in judged else item
            for item in pool]


def pool_levels(rc: RLConfig) -> list:
    return evaluate.parse_levels(rc.levels)


def render_prompt(item: PoolItem, tokenizer, seed: int) -> dict:
    """The chat prompt with the generation prompt, thinking on (render_chat's dict incl. the vision tensors)."""
    if item.record is None:
        return world.make_item(item.task, item.index, seed, "train", item.level).prompt(tokenizer)
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


def score_replies(tokenizer, items, replies, group_size: int, lenient=()) -> list:
    """rewards.score of reply k against items[k // G], decoded with special tokens kept; `lenient` domains get
    the hackable verifier (training only). NaN where no rule verifier can grade (a model-graded prompt of a domain
    without one, or without a ground truth)."""
    return [rewards.score(items[k // group_size].task, tokenizer.decode(reply), items[k // group_size].answer,
                          lenient=items[k // group_size].task in lenient) if rule_gradable(items[k // group_size])
            else math.nan for k, reply in enumerate(replies)]


def rule_gradable(item: PoolItem) -> bool:
    return item.task in rewards.VERIFIERS and item.answer is not None


def judge_replies(judge, tokenizer, items, prompts, replies, rule, group_size: int, batch_rows=None) -> tuple:
    """The rewards `rule` with the reward model's (rewards.model_verifier, one batched pass on its device) in place
    for the replies to model-graded items; prompts[j] is items[j]'s rendered prompt. Returns (rewards, how many of
    the reward model's scores were not finite: those replies score 0)."""
    rows = [k for k in range(len(replies)) if items[k // group_size].verifier == rewards.MODEL_VERIFIER]
    if not rows:
        return rule, 0
    judged, nonfinite = rewards.model_verifier(judge, tokenizer, [prompts[k // group_size] for k in rows],
                                               [tokenizer.decode(replies[k]) for k in rows], batch_rows)
    scores = list(rule)
    for k, score in zip(rows, judged):
        scores[k] = score
    return scores, nonfinite


def load_judge(rc: RLConfig, pool, tokenizer, device):
    """The reward model of the `model` verifier, loaded once onto the rollout device (None when no prompt needs
    it). Refused at the start: model-graded prompts without --reward-model, a checkpoint that is not a reward
    model, or one that reads other tokens than the policy."""
    judged = sorted({item.task for item in pool if item.verifier == rewards.MODEL_VERIFIER})
    if not rc.reward_model:
        if judged:
            raise ValueError(f"the prompts of {', '.join(judged)} are graded by a reward model (\"verifier\": "
                             "\"model\", or no rule verifier for the domain): pass --reward-model DIR (reward.py), or "
                             "give the domain a rule verifier with --verifier NAME=module:function")
        return None
    if not judged:
        warnings.warn(f"--reward-model {rc.reward_model}: no prompt of this run is graded by it (mark them "
                      "\"verifier\": \"model\", or name their domains in --model-verifier-tasks)")
        return None
    judge, judge_tokenizer = reward.load(rc.reward_model, device)
    if judge_tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"--reward-model {rc.reward_model} reads other tokens than the policy: its tokenizer.json "
                         f"differs from the policy's ({rc.init_from or 'the preset'}); train it from the same base")
    pretrain.log(f"the reward model {rc.reward_model} grades {', '.join(judged)} (offset {judge.offset:.3f})")
    return judge


# ---------------------------------------------------------------------------------------------------------------
# The policy update
# ---------------------------------------------------------------------------------------------------------------


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batches(rows, size, cfg: M.Config, device) -> list:
    """Rows (prompt, reply tokens, advantage) → [(batch on device, advantages (B,))] of `size` rows (None: one)."""
    size = size or len(rows)
    return [(to_device(data.collate([r[0] for r in part], cfg, [r[1] for r in part]), device),
             torch.stack([torch.as_tensor(r[2], dtype=torch.float32) for r in part]).to(device))
            for part in (rows[s:s + size] for s in range(0, len(rows), size))]


def policy_logprobs(model, batch: dict, autocast) -> torch.Tensor:
    """log p(response token) (B, T) in fp32, 0 outside the responses: the model's chunked label log-probs."""
    with autocast:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     **{k: batch[k] for k in data.VISION_KEYS}).float()


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
    for (name, p), (rname, q) in zip(lora.merged_parameters(policy), roller.named_parameters()):  # LoRA: merged
        assert name == rname, (name, rname)
        q.copy_(p)


def rollout_model(policy, cfg: M.Config, device, world: int):
    """The model that generates: the policy itself for one CPU process, or for one process with LoRA (its base is
    already bf16 on a GPU; a merged copy would cost another copy of the weights); otherwise an unsharded copy (bf16
    on a GPU, where decoding is memory-bound) refreshed by sync_weights after every update."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if world == 1 and (dtype == torch.float32 or lora.has_adapters(policy)):
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
# The training loop: rollout → score → select → update → log
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one RL run holds: the configuration, the models, the pool and the state a checkpoint keeps."""
    rc: RLConfig
    rank: int
    world: int
    device: torch.device
    cfg: M.Config
    tokenizer: data.Tokenizer
    policy: torch.nn.Module
    roller: torch.nn.Module
    reference: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pool: list
    curriculum: Curriculum
    expansion: Expansion
    autocast: object
    step: int = 0
    totals: dict = None
    judge: torch.nn.Module = None  # the reward model of the `model` verifier (--reward-model)

    def finished(self) -> bool:
        return self.step >= self.rc.max_steps or bool(self.rc.max_rollouts and
                                                      self.totals["rollouts"] >= self.rc.max_rollouts)

    def state_dict(self) -> dict:
        return {"step": self.step, "totals": self.totals, "curriculum": self.curriculum.state_dict(),
                "expansion": self.expansion.factor, "config": dataclasses.asdict(self.rc)}


def setup(rc: RLConfig) -> Run:
    """Build the policy (and its rollout copy and optional reference), optimizer, pool and curriculum; resume."""
    rank, world, device = pretrain.setup_distributed(rc.hang_timeout)
    if rc.groups_per_step % (rc.updates_per_batch * world):
        raise ValueError(f"--groups-per-step {rc.groups_per_step} must be a multiple of --updates-per-batch × "
                         f"processes ({rc.updates_per_batch} × {world}): every rank trains on the same number of "
                         "groups in every step")
    resume_from = pretrain.checkpoint_to_resume(rc)
    changes = pretrain.resume_changes(rc, resume_from) if resume_from else {}
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
    if len(pool) < rc.groups_per_step:
        raise ValueError(f"the prompt pool has {len(pool)} items, fewer than --groups-per-step {rc.groups_per_step}")
    judge = load_judge(rc, pool, tokenizer, device)
    grade_file = difficulty_path(rc)
    offline = load_difficulty(grade_file, pool) if grade_file and os.path.exists(grade_file) else None
    if rc.difficulty and offline is None:
        raise FileNotFoundError(f"--difficulty {rc.difficulty}: file not found (write it with --grade)")
    curriculum = Curriculum([item.level for item in pool], offline, rc.curriculum, rc.tier_ema, rc.item_ema,
                            rc.curriculum_floor)
    run = Run(rc, rank, world, device, cfg, tokenizer, policy, policy, reference, optimizer, pool, curriculum,
              Expansion(rc.expansion_ema, rc.max_expansion), pretrain.autocast_for(device, world),
              totals={"rollouts": 0, "rollout_tokens": 0, "optimizer_steps": 0, "skipped_updates": 0}, judge=judge)
    if resume_from:
        state = pretrain.load_training_state(policy, optimizer, resume_from, rank)
        pretrain.set_hyperparameters(optimizer, rc)  # the checkpoint's optimizer state, this run's settings
        run.step, run.totals = state["step"], state["totals"]
        curriculum.load_state_dict(state["curriculum"])
        run.expansion.factor = state["expansion"]
        pretrain.log(f"resumed from iteration {run.step}")
    run.roller = rollout_model(policy, cfg, device, world)
    if rank == 0:
        describe_run(run, grade_file if offline else None, changes)
    return run


def describe_run(run: Run, grade_file, changes: dict):
    """rl_config.json (what each segment of the run used), and one line on what this run is."""
    rc, tiers = run.rc, run.curriculum.sizes.tolist()
    pretrain.record_segment(os.path.join(rc.out, "rl_config.json"), "rl", rc, run.step, changes,
                            model=run.cfg.to_hf(), world_size=run.world, pool=len(run.pool), difficulty=grade_file,
                            tier_sizes=tiers)
    graded = f", offline grades from {grade_file}" if grade_file else ", no grade file (tiers from levels only)"
    pretrain.log(f"{sum(p.numel() for p in run.policy.parameters()):,} parameters on {run.world} × "
                 f"{run.device.type}; pool of {len(run.pool)} prompts{graded}; tiers {dict(zip(TIERS, tiers))}; "
                 f"{rc.groups_per_step} groups × {rc.group_size} rollouts per update, {rc.updates_per_batch} "
                 "optimizer step(s) per rollout batch")


def rollout_step(run: Run) -> dict:
    """Rollout and score: prompts by curriculum weight, oversampled by the expansion factor; this rank rolls out and
    scores its slice, and every rank receives all replies and rewards (so all make the same decisions)."""
    rc, G = run.rc, run.rc.group_size
    n = run.expansion.prompts(rc.groups_per_step, run.world)
    picks = run.curriculum.sample(n, np.random.default_rng([rc.seed, run.step]))
    n = len(picks) - len(picks) % run.world  # a pool smaller than n: every rank still gets the same count
    picks = picks[:n]
    mine = picks[run.rank * n // run.world:(run.rank + 1) * n // run.world]
    start = time.perf_counter()
    prompts = {i: render_prompt(run.pool[i], run.tokenizer, rc.seed) for i in mine}
    replies = sample.generate_replies(run.roller, [prompts[i] for i in mine], G, rc.max_new_tokens, rc.think_budget,
                                      run.tokenizer.force_answer_ids, temperature=rc.temperature, top_p=rc.top_p,
                                      generator=sample.noise_generator(run.device, rc.seed, run.step, run.rank),
                                      batch_rows=rc.rollout_batch)
    items = [run.pool[i] for i in mine]
    lenient = set(task_list(rc.lenient_verifier))
    rule = score_replies(run.tokenizer, items, replies, G, lenient)
    strict = score_replies(run.tokenizer, items, replies, G) if lenient else rule
    scores, nonfinite = judge_replies(run.judge, run.tokenizer, items, [prompts[i] for i in mine], replies, rule, G,
                                      rc.rollout_batch)
    think_close = run.tokenizer.special[data.THINK_CLOSE]
    forced = [rc.think_budget > 0 and len(r) > rc.think_budget and think_close not in r[:rc.think_budget]
              for r in replies]
    pretrain.heartbeat(rc.hang_timeout, f"iteration {run.step + 1}")  # every rank has rolled out its share
    parts = pretrain.gather_objects((replies, scores, strict, forced, time.perf_counter() - start, nonfinite))
    return dict(picks=picks, prompts=prompts, replies=[r for part in parts for r in part[0]],
                scores=torch.tensor([s for part in parts for s in part[1]], dtype=torch.float64).view(n, G),
                strict=torch.tensor([s for part in parts for s in part[2]], dtype=torch.float64).view(n, G),
                forced=[f for part in parts for f in part[3]], generate_seconds=max(p[4] for p in parts),
                model_nonfinite=sum(p[5] for p in parts))


def select_step(run: Run, batch: dict) -> dict:
    """Dynamic sampling expansion: keep the K most balanced groups and their advantages; update the expansion and
    curriculum EMAs with every group rolled out."""
    scores = batch["scores"]
    invalid = (scores == scores[:, :1]).all(1)
    kept = select_balanced(scores, run.rc.groups_per_step)
    selection = dict(invalid=invalid, kept=kept, advantages=group_advantages(scores[kept]).float(),
                     expansion=run.expansion.factor, tier_pass=run.curriculum.tier_pass.copy())
    run.expansion.update(float(invalid.float().mean()))
    run.curriculum.update(batch["picks"], scores.mean(1).tolist())
    return selection


def update_step(run: Run, batch: dict, selection: dict, lr: float) -> tuple:
    """The GRPO updates: global mini-batch u holds kept groups [u·K/U, (u+1)·K/U), rank r its r-th slice. The
    old-policy log-probs of the mini-batches after the first are the rollout weights', recomputed by the training
    model before the first step (the first is on-policy: old = current, detached). Then the rollout copy is
    refreshed. Returns (one result per optimizer step, update tokens, seconds of the old log-probs)."""
    rc, K, G, U = run.rc, run.rc.groups_per_step, run.rc.group_size, run.rc.updates_per_batch
    per_rank, prompts, kept = K // (U * run.world), batch["prompts"], selection["kept"]
    micro = []
    for u in range(U):
        rows = []
        for g in range(u * K // U + run.rank * per_rank, u * K // U + (run.rank + 1) * per_rank):
            i = batch["picks"][kept[g]]
            if i not in prompts:
                prompts[i] = render_prompt(run.pool[i], run.tokenizer, rc.seed)
            rows += [(prompts[i], batch["replies"][kept[g] * G + j], selection["advantages"][g, j]) for j in range(G)]
        micro.append(micro_batches(rows, rc.micro_batch, run.cfg, run.device))
    start = time.perf_counter()
    with torch.no_grad():
        olds = [[None] * len(parts) if u == 0 else [policy_logprobs(run.policy, b, run.autocast) for b, _ in parts]
                for u, parts in enumerate(micro)]
    logprob_seconds = time.perf_counter() - start
    pretrain.set_lr(run.optimizer, lr)
    updates = [policy_update(run.policy, run.optimizer, [(b, a, o) for (b, a), o in zip(parts, old)], rc, run.world,
                             K // U * G, run.autocast, run.reference) for parts, old in zip(micro, olds)]
    sync_weights(run.policy, run.roller)
    tokens = float(sum(int(b["attention_mask"].sum()) for parts in micro for b, _ in parts))
    return updates, int(pretrain.all_reduce_sum(torch.tensor(tokens, device=run.device)).item()), logprob_seconds


def metrics_row(run: Run, batch: dict, selection: dict, updates: list, lr: float, update_tokens: int,
                seconds: dict) -> dict:
    """One line of metrics.jsonl: the update, rewards per domain and tier, expansion, lengths and the time split."""
    scores, invalid, kept = batch["scores"], selection["invalid"], selection["kept"]
    lengths = [len(r) for r in batch["replies"]]
    row = {"step": run.step, "loss": float(np.mean([u["loss"] for u in updates])), "reward": float(scores.mean()),
           "lr": lr, **{key: float(np.mean([u[key] for u in updates])) for key in ("grad_norm", "clip_fraction", "kl")},
           "invalid_group_rate": float(invalid.float().mean()),
           "kept_informative": float((~invalid[kept]).float().mean()), "expansion": selection["expansion"],
           "prompts": len(batch["picks"]), "response_len": float(np.mean(lengths)),
           "forced_answer_rate": float(np.mean(batch["forced"])),
           "rollout_tok_per_s": sum(lengths) / max(batch["generate_seconds"], 1e-9),
           "update_tok_per_s": update_tokens / max(seconds["update"], 1e-9),
           **{f"time_{k}": v for k, v in seconds.items()}, **run.totals}
    row.update(domain_metrics(run, batch))
    picked_tiers = run.curriculum.tier[batch["picks"]]
    for t, name in enumerate(TIERS):
        here, key = picked_tiers == t, name.replace(" ", "_")
        row[f"tier_share_{key}"] = float(here.mean())
        row[f"pass_rate_{key}"] = float(scores[torch.from_numpy(here)].mean()) if here.any() else None
        row[f"tier_ema_{key}"] = float(selection["tier_pass"][t])
    return row


def domain_metrics(run: Run, batch: dict) -> dict:
    """reward_<task> per domain. Where a domain is graded by another than its strict verifier (--lenient-verifier,
    the reward model), its strict score strict_reward_<task> beside it, so that a policy hacking the weaker one
    shows (paper §5); per model-graded domain model_reward_<task>, and model_reward_nonfinite (replies whose reward
    model score was not finite, scored 0)."""
    scores, strict, row = batch["scores"], batch["strict"], {}
    lenient = set(task_list(run.rc.lenient_verifier))
    picked = [run.pool[i] for i in batch["picks"]]
    for task in dict.fromkeys(item.task for item in picked):
        rows_of = [k for k, item in enumerate(picked) if item.task == task]
        judged = [k for k in rows_of if picked[k].verifier == rewards.MODEL_VERIFIER]
        row[f"reward_{task}"] = float(scores[rows_of].mean())
        if judged:
            row[f"model_reward_{task}"] = float(scores[judged].mean())
        if (task in lenient or judged) and not strict[rows_of].isnan().all():
            row[f"strict_reward_{task}"] = float(strict[rows_of].nanmean())
    if lenient or run.judge is not None:
        row["strict_reward"] = None if strict.isnan().all() else float(strict.nanmean())
    if run.judge is not None:
        row["model_reward_nonfinite"] = batch["model_nonfinite"]
    return row


def count(run: Run, batch: dict, updates: list) -> int:
    """Add this iteration to the run's totals; returns how many of its updates were skipped as non-finite."""
    run.totals["rollouts"] += len(batch["replies"])
    run.totals["rollout_tokens"] += sum(len(r) for r in batch["replies"])
    bad = sum(not u["ok"] for u in updates)
    run.totals["skipped_updates"] += bad
    run.totals["optimizer_steps"] += sum(u["stepped"] for u in updates)
    return bad


def save(run: Run):
    """A training checkpoint (with the curriculum, the expansion EMA and the counters) and the HF export."""
    pretrain.save_training_state(run.policy, run.optimizer, run.state_dict(), run.rc.out, run.step, run.rank,
                                 run.rc.keep_checkpoints)
    pretrain.export_hf(run.policy, run.cfg, run.tokenizer, run.rc.out, run.rank, run.rc, run.step)


def train(rc: RLConfig):
    """The RL loop, under torchrun or not: rollout → score → select → update → log; checkpoints by
    pretrain.SaveSchedule (every save_every iterations, by time, on SIGTERM/SIGINT, at the end), but never after an
    iteration whose updates were skipped as non-finite. Returns the policy."""
    run = setup(rc)
    metrics, schedule = pretrain.Metrics(rc.out, run.rank, run.step, rc.report_to), pretrain.SaveSchedule(rc, run.device)
    bad_in_a_row = 0
    bar = tqdm(total=rc.max_steps, initial=run.step, disable=run.rank != 0, desc="rlcs", dynamic_ncols=True)
    try:
        while not run.finished():
            t0 = time.perf_counter()
            batch = rollout_step(run)
            t1 = time.perf_counter()
            selection = select_step(run, batch)
            lr = pretrain.lr_at(run.step, rc)
            updates, update_tokens, logprob_seconds = update_step(run, batch, selection, lr)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            t3 = time.perf_counter()
            run.step += 1
            bad = count(run, batch, updates)
            bad_in_a_row = bad_in_a_row + bad if bad else 0
            seconds = {"rollout": t1 - t0, "logprobs": logprob_seconds, "update": t3 - t1 - logprob_seconds}
            row = metrics_row(run, batch, selection, updates, lr, update_tokens, seconds)
            if rc.eval_every and run.step % rc.eval_every == 0:
                row.update({f"eval_{k}": v for k, v in heldout_accuracy(run).items()})
            metrics.write(row)
            if batch["model_nonfinite"]:
                pretrain.log(f"iteration {run.step}: {batch['model_nonfinite']} reward-model score(s) not finite; "
                             "those replies scored 0")
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", informative=f"{1 - row['invalid_group_rate']:.2f}",
                            rollouts=run.totals["rollouts"])
            pretrain.check_finite(not bad, bad_in_a_row, rc.max_bad_steps, f"iteration {run.step}: {bad} update(s) "
                                  "with a non-finite loss or gradient", rc.out)
            reason = schedule.due(run.step, rc.max_steps if not run.finished() else run.step)
            schedule.save_if_due(reason, not bad, lambda: save(run), run.step, rc.out)  # skipped: weights as they were
    finally:
        schedule.close()
        bar.close()
    pretrain.log(f"done: iteration {run.step}, {run.totals['rollouts']:,} rollouts; Hugging Face checkpoint in "
                 f"{rc.out}")
    pretrain.teardown_distributed()
    return run.policy


def heldout_accuracy(run: Run) -> dict:
    """--eval-every: greedy accuracy of the rollout weights on the run's own held-out items (evaluate.py), strict,
    in the run's domains that the synthetic world has (a --data domain without world items has no held-out set)."""
    rc = run.rc
    tasks = [t for t in task_list(rc.tasks) or default_tasks() if t in world.TASKS]
    if not tasks:
        return {}
    items = evaluate.heldout_items(tasks, rc.eval_n, rc.seed, pool_levels(rc))
    records = evaluate.run(run.roller, run.tokenizer, items, rc.max_new_tokens, rc.think_budget, seed=rc.seed)
    return evaluate.accuracy(records, tasks)


# ---------------------------------------------------------------------------------------------------------------
# Offline difficulty (--grade, paper §5: pass@k of the starting checkpoint)
# ---------------------------------------------------------------------------------------------------------------


def grade(rc: RLConfig):
    """k sampled replies to every pool item from the --init-from checkpoint; writes one JSON line per item {key,
    task, level, samples, pass_rate (mean reward), pass_at_k (best reward)} to the difficulty file."""
    rank, world, device = pretrain.setup_distributed()
    if not rc.init_from:
        raise ValueError("--grade needs --init-from: the checkpoint whose pass@k grades the pool")
    path = difficulty_path(rc)
    model, tokenizer = evaluate.load_for_inference(rc.init_from, device)
    pool = build_pool(rc)
    judge = load_judge(rc, pool, tokenizer, device)
    per_call = max(1, (rc.rollout_batch or 64 * rc.grade_k) // rc.grade_k)  # prompts per generate() call
    mine = list(range(rank, len(pool), world))
    results = []
    for start in tqdm(range(0, len(mine), per_call), disable=rank != 0, desc="grade", unit="batch"):
        items = [pool[i] for i in mine[start:start + per_call]]
        prompts = [render_prompt(it, tokenizer, rc.seed) for it in items]
        replies = sample.generate_replies(model, prompts, rc.grade_k, rc.max_new_tokens, rc.think_budget,
                                          tokenizer.force_answer_ids, temperature=rc.temperature, top_p=rc.top_p,
                                          generator=sample.noise_generator(device, rc.seed, start, rank, 1))
        scores, _ = judge_replies(judge, tokenizer, items, prompts, replies,
                                  score_replies(tokenizer, items, replies, rc.grade_k), rc.grade_k, rc.rollout_batch)
        for j, i in enumerate(mine[start:start + per_call]):
            s = scores[j * rc.grade_k:(j + 1) * rc.grade_k]
            results.append((i, float(np.mean(s)), float(max(s))))
    results = sorted(r for part in pretrain.gather_objects(results) for r in part)
    if rank == 0:
        lines = [json.dumps({"key": pool[i].key, "task": pool[i].task, "level": pool[i].level,
                             "samples": rc.grade_k, "pass_rate": p, "pass_at_k": best}) for i, p, best in results]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pretrain.write_atomic(path, "\n".join(lines) + "\n")
        tiers = np.bincount([tier_of(pool[i].level, p) for i, p, _ in results], minlength=len(TIERS))
        print(json.dumps({"difficulty": path, "items": len(results), "mean_pass_rate": float(np.mean(
            [p for _, p, _ in results])), "tiers": dict(zip(TIERS, tiers.tolist()))}))
    pretrain.teardown_distributed()


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    return pretrain.build_parser(RLConfig, __doc__)


def config_from_args(args) -> RLConfig:
    return pretrain.config_from_args(args, RLConfig, resolve)


def main(argv=None):
    try:
        rc = config_from_args(build_parser().parse_args(argv))
        grade(rc) if rc.grade else train(rc)
    except (OSError, ValueError, pretrain.TrainingError) as e:  # bad flags, files or data; divergence; hung rank
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
