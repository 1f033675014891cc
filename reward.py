"""The reward model of GLM-4.1V-Thinking's RL: the RLHF half of its reward system (paper §5.2, Table 1), for the
answers no rule can check — open-ended VQA, long documents, GeoGuess, video — read by the `model` verifier of
rewards.py when rlcs.py runs with --reward-model.

    python reward.py --tiny --init-from runs/sft --out runs/reward           # on (right, wrong) pairs of the world
    python reward.py --init-from runs/sft --data pairs.jsonl --out runs/reward   # on your preference pairs
    torchrun --nproc_per_node 8 reward.py --preset 9b --init-from runs/sft --data pairs.jsonl
    python rlcs.py --tiny --init-from runs/sft --reward-model runs/reward --model-verifier-tasks counting

The model: GLM4V whose decoder's final hidden state at the last token goes through a scalar head `score`
(Linear(hidden, 1) in fp32, named like the heads of transformers' *ForSequenceClassification), trained with the
Bradley–Terry loss −log σ(r_chosen − r_rejected) on preference pairs. It reads the answer part of a reply, the way
a no-think reply renders: the prompt, `<think></think>`, the text after `</think>`, `<|endoftext|>` — the thinking
is not judged, only what the policy answers, and the score is always read at the same token.

Pairs come from a JSONL file of {"messages", "images", "videos", "chosen", "rejected", "task" (optional: accuracy
per domain)}, of which a share of the lines (by a hash of their content) is held out, or by default from the
synthetic world, with no model needed to write them: an item's right reply against a wrong one (`--wrong`):
  foreign — the answer to an item of another of the run's domains (a count for a multiple-choice question). Which
            answer is right shows in the text, but only together with the question: with the domains balanced, a
            scorer that ignores the prompt ranks half of these pairs right on average, so accuracy above 0.5 is
            reading it (answers of the same kind, a count for an arithmetic question, need the image).
  swapped — the answer of another item of the same domain and level: plausible, right for another image; only a
            model that perceives the image can rank these (the real reward model's job).
A rejected reply always scores below 1 on the domain's strict verifier (the chosen one scores 1). Held-out pairs
come from the world's held-out split.

The training machinery is the trainer's (pretrain.py): FSDP2, checkpoints by SaveSchedule, --resume, metrics.jsonl,
the Hugging Face export. The export is a Glm4v checkpoint with one more tensor, score.weight (transformers'
Glm4vForConditionalGeneration loads it and lists that tensor as unexpected); reward.json beside it holds the
calibration offset by which the `model` verifier maps a reward r to σ(r − offset), and the held-out accuracy of
these weights.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
import pretrain
import rewards
import world
from pretrain import _f

# ---------------------------------------------------------------------------------------------------------------
# Configuration: the trainer's RunConfig plus what only the reward model has
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RewardConfig(pretrain.RunConfig):
    stages: ClassVar[tuple] = ("reward",)
    pairs_per_step: int = _f(None, "preference pairs per optimizer step, across all processes (default: per preset)")
    micro_batch: int = _f(None, "pairs per forward/backward (gradient accumulation; default: a rank's share)")
    wrong: str = _f("foreign,swapped", "synthetic world: the wrong replies of its pairs, in turn — foreign (the "
                    "answer to another domain's item) and/or swapped (another item's answer, same domain and level)")
    eval_pairs: int = _f(None, "synthetic world: held-out pairs per domain for the pairwise accuracy (default: per "
                         "preset)")
    heldout_share: float = _f(0.05, "--data: share of the lines held out for the pairwise accuracy (by a hash of "
                              "each line)")
    max_len: int = _f(None, "--data: pairs whose prompt + answer exceed this many tokens are dropped when the file "
                      "is read, and counted (default: per preset)")
    eval_every: int = _f(0, "held-out pairwise accuracy every N steps (it is also measured before every save)")


# Ours (the paper gives no numbers for its reward model): AdamW without weight decay, warm-up then cosine decay.
DEFAULTS = {
    "reward": dict(out="runs/reward", min_lr_ratio=0.1, weight_decay=0.0, save_every=100,
                   activation_checkpointing=False),
    ("tiny", "reward"): dict(max_steps=200, pairs_per_step=16, lr=3e-4, eval_pairs=50, max_len=512),
    ("9b", "reward"): dict(max_steps=2000, pairs_per_step=128, lr=5e-6, eval_pairs=200, max_len=8192, micro_batch=4,
                           save_every=500, activation_checkpointing=True),
}
WRONG = ("foreign", "swapped")  # the kinds of wrong replies of the world's pairs


def names(text) -> list:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def levels(rc: RewardConfig) -> list:
    """--levels as a list (default: every level of the world)."""
    chosen = [int(v) for v in names(rc.levels)] if rc.levels else list(world.LEVELS)
    if any(v not in world.LEVELS for v in chosen):
        raise ValueError(f"--levels must list levels from {world.LEVELS}, got {rc.levels!r}")
    return chosen


def resolve(rc: RewardConfig) -> RewardConfig:
    """Fill the None fields with the preset's defaults and check the values."""
    pretrain.resolve_run(rc, DEFAULTS)
    if rc.warmup_steps is None:
        rc.warmup_steps = max(1, rc.max_steps // 20)
    if not names(rc.wrong) or set(names(rc.wrong)) - set(WRONG):
        raise ValueError(f"--wrong must list kinds from {', '.join(WRONG)}, got {rc.wrong!r}")
    if not 0 < rc.heldout_share < 1:
        raise ValueError(f"--heldout-share is a share between 0 and 1, got {rc.heldout_share}")
    if rc.pairs_per_step < 1 or rc.eval_pairs < 1:
        raise ValueError(f"--pairs-per-step and --eval-pairs must be positive, got {rc.pairs_per_step}, "
                         f"{rc.eval_pairs}")
    levels(rc)
    unknown = [t for t in names(rc.tasks) if t not in world.TASKS]
    if unknown and not rc.data:
        raise ValueError(f"unknown domain {unknown[0]!r} in --tasks; the world's domains: {', '.join(world.TASKS)}")
    return rc


# ---------------------------------------------------------------------------------------------------------------
# The model: GLM4V with a scalar head
# ---------------------------------------------------------------------------------------------------------------


class RewardModel(M.GLM4V):
    """GLM4V + `score`, a Linear(hidden, 1) on the decoder's final hidden state at each row's last token. Its
    checkpoint is a Glm4v checkpoint plus score.weight; `offset` is the calibration the `model` verifier uses."""

    def __init__(self, cfg: M.Config):
        super().__init__(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.lm_head.requires_grad_(False)  # unused by the reward; kept, so the checkpoint stays a Glm4v
        self.offset = 0.0

    def forward(self, input_ids, attention_mask, **vision) -> torch.Tensor:
        """The reward r (B,) in fp32 of right-padded rows (data.collate): the head on each row's last real token."""
        hidden = super().forward(input_ids, attention_mask=attention_mask, return_hidden=True, **vision)  # (B, T, C)
        last = attention_mask.sum(1) - 1
        end = hidden[torch.arange(len(last), device=hidden.device), last]  # (B, C)
        with torch.autocast(end.device.type, enabled=False):  # the head in fp32, also under bf16 autocast
            return F.linear(end.float(), self.score.weight.float()).squeeze(-1)


def head_weight(path: str):
    """score.weight of a checkpoint directory, read in its stored precision, or None when it has no head."""
    from safetensors import safe_open

    for file in M.checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            if "score.weight" in f.keys():
                return f.get_tensor("score.weight")
    return None


def load(path: str, device):
    """(reward model, tokenizer) for the `model` verifier: frozen, bf16 on a GPU (the head fp32), fp32 on a CPU, its
    offset from reward.json. A checkpoint without the head is refused with one line."""
    M.check_checkpoint_dir(path)
    head = head_weight(path)
    if head is None:
        raise ValueError(f"{path} is not a reward model (its checkpoint has no score.weight): train one with "
                         "reward.py and pass the --out directory it wrote")
    model = RewardModel.from_pretrained(path, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                        device=device)
    model.score.float().weight.data.copy_(head)  # the head keeps its stored fp32 precision
    model.requires_grad_(False)
    calibration = os.path.join(path, "reward.json")
    if os.path.exists(calibration):
        try:
            with open(calibration) as f:
                model.offset = float(json.load(f)["offset"])
        except (ValueError, KeyError, TypeError) as e:  # not JSON, no offset, or not a number
            raise ValueError(f"{calibration}: no readable calibration offset ({e!r})") from e
    else:
        pretrain.log(f"warning: {calibration} is missing; the `model` verifier maps rewards with σ(r), offset 0")
    if not math.isfinite(model.offset):
        raise ValueError(f"{calibration}: the offset {model.offset} is not finite")
    return model, data.load_tokenizer(path)


# ---------------------------------------------------------------------------------------------------------------
# What the model reads: the answer part of a reply after its prompt
# ---------------------------------------------------------------------------------------------------------------


def answer_tokens(tokenizer, reply: str) -> list:
    """The tokens after the prompt: the reply as a no-think reply renders (data.render_chat, thinking=False) —
    `<think></think>`, the text after `</think>` without its end-of-turn token, `<|endoftext|>`."""
    answer = data.split_reply(reply.lstrip())[1].strip()
    for end in M.END_OF_TURN:
        answer = answer[:-len(end)].rstrip() if answer.endswith(end) else answer
    return tokenizer.encode(data.THINK_OPEN + data.THINK_CLOSE + answer + M.END_OF_TURN[0])


def inputs(cfg: M.Config, tokenizer, prompts, replies, device) -> dict:
    """Rendered prompts (render_chat dicts, generation prompt on) and their replies as the model's inputs."""
    batch = data.collate(prompts, cfg, [answer_tokens(tokenizer, r) for r in replies])
    return {k: batch[k].to(device) if batch[k] is not None else None
            for k in ("input_ids", "attention_mask", *data.VISION_KEYS)}


@torch.no_grad()
def rewards_of(model, tokenizer, prompts, replies, batch_rows: int = None) -> list:
    """The reward r of each (rendered prompt, decoded reply), batch_rows rows per forward (None: all at once), on
    the model's device; the `model` verifier of rewards.py maps them to [0, 1]."""
    device, out = model.lm_head.weight.device, []
    size = batch_rows or max(1, len(prompts))
    for start in range(0, len(prompts), size):
        out += model(**inputs(model.cfg, tokenizer, prompts[start:start + size], replies[start:start + size],
                              device)).tolist()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs: the synthetic world's (right, wrong) or a JSONL file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    prompt: dict  # render_chat of the conversation with the generation prompt, vision tensors included
    chosen: str
    rejected: str
    task: str = ""
    kind: str = ""  # how the world made the rejected reply (WRONG); "" for JSONL pairs


def wrong_answer(item: world.Item, kind: str, tasks, seed: int) -> str:
    """An answer the item's strict verifier scores below 1: the answer to the same-index item of another domain of
    `tasks` (foreign; the domain picked by a hash), or of the next item of its own domain and level (swapped)."""
    if kind == "foreign":
        others = [t for t in tasks if t != item.task]
        task = others[data.stable_hash("foreign", seed, item.task, item.index) % len(others)]
    else:
        task = item.task
    for step in range(int(kind == "swapped"), 100):
        answer = world.make_item(task, item.index + step, seed, item.split, item.level, render=False).answer
        if rewards.score(item.task, data.format_reply(answer), item.answer) < 1:
            return answer
    raise RuntimeError(f"no wrong {kind} answer found for {item.task} item {item.index}")


class WorldPairs:
    """Pair i of the training stream: domain tasks[i % n], item j = i // n at level levels[j % L], its wrong reply of
    kind kinds[j // L % K] (so kind and level vary independently); the held-out pairs are the first eval_pairs
    items per domain of the held-out split, made the same way."""

    def __init__(self, rc: RewardConfig, tokenizer):
        self.tasks, self.levels, self.kinds = names(rc.tasks) or list(world.TASKS), levels(rc), names(rc.wrong)
        if "foreign" in self.kinds and len(self.tasks) < 2:
            raise ValueError("--wrong foreign answers a question with another domain's answer: it needs at least two "
                             "--tasks (or use --wrong swapped)")
        self.seed, self.eval_pairs, self.tokenizer = rc.seed, rc.eval_pairs, tokenizer

    def pair(self, task: str, j: int, split: str) -> Pair:
        level = self.levels[j % len(self.levels)]
        kind = self.kinds[j // len(self.levels) % len(self.kinds)]
        item = world.make_item(task, j, self.seed, split, level)
        wrong = wrong_answer(item, kind, self.tasks, self.seed)
        return Pair(item.prompt(self.tokenizer), item.reply(), data.format_reply(wrong, item.reasoning), task, kind)

    def train(self, i: int) -> Pair:
        return self.pair(self.tasks[i % len(self.tasks)], i // len(self.tasks), "train")

    def heldout(self) -> list:
        return [self.pair(task, j, "heldout") for task in self.tasks for j in range(self.eval_pairs)]

    def describe(self) -> str:
        return (f"synthetic world pairs ({', '.join(self.kinds)}) of {', '.join(self.tasks)}, levels "
                f"{','.join(map(str, self.levels))}; {self.eval_pairs} held out per domain")


class JsonlPairs:
    """Pairs {"messages", "images", "videos", "chosen", "rejected", "task"} from a JSONL file; a line whose hash
    falls in --heldout-share is held out. Unusable lines (bad fields, missing media, too long) are dropped and
    counted, the first few printed with file:line; more than --max-bad-data of them stop with an error. The
    training order is a permutation of the lines per epoch, seeded by (seed, epoch)."""

    def __init__(self, rc: RewardConfig, tokenizer):
        path, self.tokenizer, self.seed = rc.data, tokenizer, rc.seed
        root, tasks = os.path.dirname(os.path.abspath(path)), names(rc.tasks)
        usable, dropped, seen = data.read_jsonl(path, lambda obj: self.parse(obj, root, rc.max_len), "pair")
        self.lines, self.held = [], []
        for _, line, record in usable:
            if not tasks or record["task"] in tasks:
                held = data.stable_hash("heldout", line.strip()) % 10_000 < rc.heldout_share * 10_000
                (self.held if held else self.lines).append(record)
        for problem in dropped[:5]:
            pretrain.log(f"dropped {problem}")
        if dropped and len(dropped) > rc.max_bad_data * seen:
            raise ValueError(f"{path}: {len(dropped)} of {seen} pairs are unusable, more than --max-bad-data "
                             f"{rc.max_bad_data:g} (first: {dropped[0]})")
        if not self.lines or not self.held:
            raise ValueError(f"{path}: {len(self.lines)} training and {len(self.held)} held-out pairs; both are "
                             "needed (more lines, or another --heldout-share)")
        self.path, self.dropped = path, len(dropped)

    def parse(self, obj, root: str, max_len: int) -> dict:
        record = data.parse_record(obj, root)
        if "messages" not in record:
            raise ValueError("a preference pair needs 'messages'")
        while record["messages"] and record["messages"][-1]["role"] == "assistant":
            record["messages"].pop()  # the replies are "chosen" and "rejected"
        for key in ("chosen", "rejected"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise ValueError(f"'{key}' must be a non-empty string (a reply)")
        if obj["chosen"] == obj["rejected"]:
            raise ValueError("'chosen' and 'rejected' are the same reply")
        prompt = data.encode_sample({**record, "thinking": True}, self.tokenizer, sizes_only=True)["input_ids"]
        if len(prompt) + max(len(answer_tokens(self.tokenizer, obj[k])) for k in ("chosen", "rejected")) > max_len:
            raise ValueError(f"prompt + answer are longer than --max-len {max_len} tokens")
        return {**record, "chosen": obj["chosen"], "rejected": obj["rejected"], "task": str(obj.get("task", ""))}

    def pair(self, record: dict) -> Pair:
        prompt = data.render_chat(record["messages"], self.tokenizer, images=record["images"],
                                  videos=record["videos"], add_generation_prompt=True)
        return Pair(prompt, record["chosen"], record["rejected"], record["task"])  # thinking on, as RL renders it

    def train(self, i: int) -> Pair:
        epoch, n = i // len(self.lines), len(self.lines)
        return self.pair(self.lines[np.random.default_rng([self.seed, epoch]).permutation(n)[i % n]])

    def heldout(self) -> list:
        return [self.pair(record) for record in self.held]

    def describe(self) -> str:
        return (f"{self.path}: {len(self.lines)} training and {len(self.held)} held-out pairs"
                + (f", {self.dropped} dropped" if self.dropped else ""))


# ---------------------------------------------------------------------------------------------------------------
# Training: Bradley–Terry on the trainer's machinery
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RewardRun:
    """What one reward-model run holds between steps: what it trains, on which pairs, then where."""
    rc: RewardConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pairs: object  # WorldPairs or JsonlPairs
    cfg: M.Config
    tokenizer: data.Tokenizer
    rank: int
    world: int
    device: torch.device
    autocast: object
    step: int = 0
    calibration: dict = field(default_factory=dict)  # the last held-out evaluation (offset, accuracies)


def initial_state(rc: RewardConfig, rank: int):
    """(Config, full state dict on rank 0, tokenizer). A reward model's checkpoint continues as it is; a Glm4v
    (the SFT model, the usual start) or the preset from scratch gets a new head, normal(0, initializer_range)
    seeded by --seed."""
    if rc.init_from and head_weight(rc.init_from) is not None:
        state = RewardModel.from_pretrained(rc.init_from, dtype=torch.float32).state_dict() if rank == 0 else {}
        return M.Config.from_hf(rc.init_from), state, data.load_tokenizer(rc.init_from)
    cfg, state, tokenizer = pretrain.initial_state(rc, rank)
    if rank == 0:
        generator = torch.Generator().manual_seed(rc.seed)
        state["score.weight"] = torch.randn(1, cfg.hidden_size, generator=generator) * cfg.initializer_range
    return cfg, state, tokenizer


def setup(rc: RewardConfig) -> RewardRun:
    """Build the reward model, optimizer and pairs, or restore them from the run's checkpoint (--resume)."""
    rank, world_size, device = pretrain.setup_distributed(rc.hang_timeout)
    if rc.pairs_per_step % world_size:
        raise ValueError(f"--pairs-per-step {rc.pairs_per_step} must be a multiple of the number of processes "
                         f"({world_size})")
    resume_from = pretrain.checkpoint_to_resume(rc)
    changes = pretrain.resume_changes(rc, resume_from) if resume_from else {}
    cfg, state, tokenizer = initial_state(rc, rank)
    model = pretrain.build_model(rc, cfg, state, device, world_size, RewardModel)
    del state
    optimizer = pretrain.build_optimizer(model, rc, device)
    pairs = JsonlPairs(rc, tokenizer) if rc.data else WorldPairs(rc, tokenizer)
    run = RewardRun(rc, model, optimizer, pairs, cfg, tokenizer, rank, world_size, device,
                    pretrain.autocast_for(device, world_size))
    if resume_from:
        state = pretrain.load_training_state(model, optimizer, resume_from, rank)
        pretrain.set_hyperparameters(optimizer, rc)  # the checkpoint's optimizer state, this run's settings
        run.step, run.calibration = state["step"], state.get("calibration", {})
        pretrain.log(f"resumed from step {run.step}")
    if rank == 0:
        pretrain.record_segment(os.path.join(rc.out, "train_config.json"), "reward", rc, run.step, changes,
                                model=cfg.to_hf(), world_size=world_size)
        pretrain.log(f"{sum(p.numel() for p in model.parameters()):,} parameters on {world_size} × {device.type}; "
                     f"{pairs.describe()}; {rc.pairs_per_step} pairs per step")
    return run


def pair_rewards(run: RewardRun, pairs) -> torch.Tensor:
    """(r_chosen (B,), r_rejected (B,)) of pairs: one batch of 2B rows, the chosen replies first."""
    batch = inputs(run.cfg, run.tokenizer, [p.prompt for p in pairs] * 2,
                   [p.chosen for p in pairs] + [p.rejected for p in pairs], run.device)
    with run.autocast:
        r = run.model(**batch)
    return r[:len(pairs)], r[len(pairs):]


def train_step(run: RewardRun, pairs) -> dict:
    """One optimizer step on this rank's share of the step's pairs: the Bradley–Terry loss −log σ(r_chosen −
    r_rejected) (paper §5.2's reward model), the mean over the global step's pairs, so any split over ranks and
    micro-batches gives the same update. Returns loss, accuracy (share with r_chosen > r_rejected), mean margin,
    grad_norm and ok (False: non-finite, the update skipped)."""
    rc, model = run.rc, run.model
    size = rc.micro_batch or len(pairs)
    parts = [pairs[s:s + size] for s in range(0, len(pairs), size)]
    stats = torch.zeros(3, device=run.device)
    for i, part in enumerate(parts):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter after the last micro-batch only
            model.set_requires_gradient_sync(i == len(parts) - 1)
        chosen, rejected = pair_rewards(run, part)
        margin = chosen - rejected
        loss = -F.logsigmoid(margin)
        # FSDP averages gradients over ranks; × world turns that into the mean over the global step's pairs
        (loss.sum() * run.world / rc.pairs_per_step).backward()
        stats += torch.stack([loss.detach().sum(), (margin > 0).sum(), margin.detach().sum()])
    stats = pretrain.all_reduce_sum(stats) / rc.pairs_per_step
    grad_norm, ok = pretrain.clip_and_step(model, run.optimizer, rc.grad_clip, bool(torch.isfinite(stats).all()))
    return dict(loss=float(stats[0]), accuracy=float(stats[1]), margin=float(stats[2]), grad_norm=grad_norm, ok=ok)


@torch.no_grad()
def evaluate(run: RewardRun) -> dict:
    """Pairwise accuracy on the held-out pairs (the share with r_chosen > r_rejected) overall, per domain and per
    kind of wrong reply; the mean margin; and the calibration offset, halfway between the mean reward of the chosen
    and of the rejected replies, where the `model` verifier's σ(r − offset) is 0.5. Every rank runs the same number
    of forwards (FSDP needs it): the pairs are dealt round-robin, the last round padded with pair 0, dropped."""
    pairs = run.pairs.heldout()
    rounds, size = -(-len(pairs) // run.world), run.rc.micro_batch or run.rc.pairs_per_step // run.world
    mine = [run.rank + run.world * k for k in range(rounds)]
    results = []
    for start in range(0, rounds, size):
        index = mine[start:start + size]
        part = [pairs[i] if i < len(pairs) else pairs[0] for i in index]
        chosen, rejected = pair_rewards(run, part)
        results += [(i, p.task, p.kind, float(c), float(r)) for i, p, c, r in zip(index, part, chosen, rejected)
                    if i < len(pairs)]
    return pairwise_report(sorted(r for part in pretrain.gather_objects(results) for r in part))


def pairwise_report(rows) -> dict:
    """rows (index, task, kind, r_chosen, r_rejected) → heldout_accuracy[_<task>|_<kind>], heldout_margin, offset."""
    chosen, rejected = np.array([r[3] for r in rows]), np.array([r[4] for r in rows])
    right, finite = chosen > rejected, np.isfinite(chosen) & np.isfinite(rejected)
    offset = (chosen[finite].mean() + rejected[finite].mean()) / 2 if finite.any() else 0.0
    report = {"heldout_accuracy": float(right.mean()), "heldout_margin": float((chosen - rejected)[finite].mean()),
              "offset": float(offset), "heldout_pairs": len(rows)}
    for column in (1, 2):  # per domain, per kind of wrong reply
        for name in dict.fromkeys(r[column] for r in rows if r[column]):
            report[f"heldout_accuracy_{name}"] = float(right[[r[column] == name for r in rows]].mean())
    return report


def save(run: RewardRun):
    """A training checkpoint, the HF export, and reward.json (the calibration of these weights) beside it."""
    state = {"step": run.step, "calibration": run.calibration, "config": dataclasses.asdict(run.rc)}
    pretrain.save_training_state(run.model, run.optimizer, state, run.rc.out, run.step, run.rank,
                                 run.rc.keep_checkpoints)
    pretrain.export_hf(run.model, run.cfg, run.tokenizer, run.rc.out, run.rank)
    if run.rank == 0:
        pretrain.write_atomic(os.path.join(run.rc.out, "reward.json"), json.dumps(
            {"mapping": "sigmoid(r - offset)", "step": run.step, **run.calibration}, indent=1) + "\n")


def step_pairs(run: RewardRun) -> list:
    """This rank's share of the step's pairs: global pair indices depend only on the step (resume needs no state)."""
    per_rank = run.rc.pairs_per_step // run.world
    first = run.step * run.rc.pairs_per_step + run.rank * per_rank
    return [run.pairs.train(i) for i in range(first, first + per_rank)]


def train(rc: RewardConfig):
    """Bradley–Terry training, under torchrun or not: a metrics row per step; before every save (SaveSchedule: every
    save_every steps, by time, on SIGTERM/SIGINT, at the end) and every --eval-every steps the held-out pairwise
    accuracy and the calibration; no save after a skipped (non-finite) update but at the end or on a signal.
    Returns the model."""
    run = setup(rc)
    metrics, schedule = pretrain.Metrics(rc.out, run.rank, run.step), pretrain.SaveSchedule(rc, run.device)
    bad_in_a_row, skipped = 0, 0
    bar = tqdm(total=rc.max_steps, initial=run.step, disable=run.rank != 0, desc="reward", dynamic_ncols=True)
    try:
        while run.step < rc.max_steps:
            start = time.perf_counter()
            pairs = step_pairs(run)
            pretrain.heartbeat(rc.hang_timeout, f"step {run.step + 1}")  # before the step's first collective
            lr = pretrain.lr_at(run.step, rc)
            pretrain.set_lr(run.optimizer, lr)
            result = train_step(run, pairs)
            run.step += 1
            bad_in_a_row, skipped = (0, skipped) if result["ok"] else (bad_in_a_row + 1, skipped + 1)
            seconds = time.perf_counter() - start
            row = {"step": run.step, **{k: v for k, v in result.items() if k != "ok"}, "lr": lr,
                   "pairs": run.step * rc.pairs_per_step, "pairs_per_s": rc.pairs_per_step / seconds,
                   "skipped_steps": skipped, "seconds": seconds}
            reason = schedule.due(run.step, rc.max_steps)
            if reason or (rc.eval_every and run.step % rc.eval_every == 0):
                run.calibration = evaluate(run)
                row.update(run.calibration)
            metrics.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}", **(
                {"heldout": f"{row['heldout_accuracy']:.2f}"} if "heldout_accuracy" in row else {}))
            pretrain.check_finite(result["ok"], bad_in_a_row, rc.max_bad_steps, f"step {run.step}: non-finite loss "
                                  f"({result['loss']}) or gradient norm ({result['grad_norm']})", rc.out)
            schedule.save_if_due(reason, result["ok"], lambda: save(run), run.step, rc.out)
    finally:
        schedule.close()
        bar.close()
    pretrain.log(f"done: step {run.step}, held-out pairwise accuracy {run.calibration.get('heldout_accuracy', 0):.3f}"
                 f"; reward model in {rc.out}")
    pretrain.teardown_distributed()
    return run.model


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def build_parser():
    return pretrain.build_parser(RewardConfig, __doc__)


def config_from_args(args) -> RewardConfig:
    return pretrain.config_from_args(args, RewardConfig, resolve)


def main(argv=None):
    try:
        train(config_from_args(build_parser().parse_args(argv)))
    except (OSError, ValueError, pretrain.TrainingError) as e:  # bad flags, files or data; divergence; hung rank
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
