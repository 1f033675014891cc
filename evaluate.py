"""Evaluation of GLM-4.1V-Thinking checkpoints: held-out accuracy per domain, public benchmarks, comparisons of runs,
training charts.

    python evaluate.py runs/sft --n 200                     # held-out greedy accuracy per domain → runs/sft/eval.json
    python evaluate.py runs/sft --bench mathvista.jsonl     # a benchmark file → table, results.json, replies.jsonl
    python evaluate.py --compare runs/sft,runs/rlcs --out docs/rl_helps   # their records as a table + charts
    python evaluate.py --plot runs/rlcs                     # reward.png, tiers.png, tier_pass.png of an RL run

The core is one pipeline — items in → batched generation → verifier → records out: `run` takes evaluation items
(benchmarks.EvalItem: task, ground truth, conversation; the synthetic world's held-out items or the records of a
benchmark file that benchmarks.py reads), generates the replies in batches with `sample.generate_replies`
(greedy, force answering at the thinking budget), scores each with `rewards.score`, and returns one record per
item; `accuracy` turns records into the mean score per task. Under torchrun the items are split over the ranks and
the records gathered after every batch, which --bench appends to replies.jsonl: a killed run resumes where it
stopped. `rlcs.py --eval-every` calls the same `run` during training. Charts are drawn with PIL: no plotting
library.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import benchmarks
import pretrain
import rewards
import sample
import world

# ---------------------------------------------------------------------------------------------------------------
# The core: items → batched generation → verifier → records
# ---------------------------------------------------------------------------------------------------------------


def parse_levels(text) -> list:
    """'1,2' → [1, 2]; empty → every level of the synthetic world."""
    levels = [int(v) for v in (text or "").split(",") if v.strip()] or list(world.LEVELS)
    if any(v not in world.LEVELS for v in levels):
        raise ValueError(f"--levels must list levels from {world.LEVELS}, got {text!r}")
    return levels


def synthetic_tasks(text) -> list:
    """'math,ocr' → ['math', 'ocr']; empty → every domain of the synthetic world, in the verifier table's order."""
    return [t for t in (text or "").split(",") if t] or [t for t in rewards.VERIFIERS if t in world.TASKS]


def heldout_items(tasks, n: int, seed: int, levels=world.LEVELS) -> list:
    """n held-out items of every domain, the levels in turn: item i of a domain is at levels[i % len(levels)]."""
    levels = list(levels)
    return [benchmarks.synthetic_item(world.make_item(task, i, seed, "heldout", levels[i % len(levels)]))
            for task in tasks for i in range(n)]


def score_batch(model, tokenizer, batch, max_new_tokens: int, think_budget: int, temperature: float, generator):
    """(records, generated tokens) of a batch of items; an item whose prompt cannot be made (a missing or
    unreadable image) gets a record with its "error" and score None instead of a reply."""
    prompts, errors = [], []
    for it in batch:
        try:
            prompts.append(it.prompt(tokenizer))
            errors.append(None)
        except (OSError, ValueError) as e:
            errors.append(str(e))
    replies = iter(sample.generate_replies(model, prompts, 1, max_new_tokens, think_budget, tokenizer.force_answer_ids,
                                           temperature=temperature, generator=generator) if prompts else [])
    records, tokens = [], 0
    for it, error in zip(batch, errors):
        record = {"key": it.key, "benchmark": it.benchmark, "category": it.category, "task": it.task,
                  "index": it.index, "level": it.level, "question": it.question, "answer": it.answer}
        record.update({"alternatives": list(it.alternatives)} if it.alternatives else {})
        if error is not None:
            records.append({**record, "reply": None, "score": None, "error": error})
            continue
        reply = next(replies)
        text, tokens = tokenizer.decode(reply), tokens + len(reply)
        records.append({**record, "reply": text, "score": max(rewards.score(it.task, text, answer)
                                                               for answer in (it.answer, *it.alternatives))})
    return records, tokens


@torch.no_grad()
def run(model, tokenizer, items, max_new_tokens: int, think_budget: int, batch_size: int = 64,
        temperature: float = 0.0, seed: int = 0, progress: bool = False, done=None, on_records=None) -> list:
    """One record {key, benchmark, category, task, index, level, question, answer, reply, score} per item
    (benchmarks.EvalItem), in item order, on every rank; see score_batch for items that cannot be rendered.
    Items whose key is in `done` (key -> record) are not generated again: their records are returned as they are.
    Under torchrun each rank generates every world-th remaining item, and after every batch the records of all
    ranks are gathered and handed to on_records on rank 0 (a results file appends them: a killed run loses one
    batch at most). temperature 0 is greedy; above 0 one reply is sampled per item with noise seeded by (seed,
    batch, rank)."""
    rank, world_size = pretrain.rank_world()
    done = done or {}
    todo = [k for k, it in enumerate(items) if it.key not in done]
    mine = todo[rank::world_size]
    steps = math.ceil(math.ceil(len(todo) / world_size) / batch_size)  # every rank gathers as often
    device = model.lm_head.weight.device
    new, tokens, began = {}, 0, time.perf_counter()
    bar = tqdm(total=len(todo), disable=not progress or rank != 0, desc="eval", unit="item")
    for step in range(steps):
        start = step * batch_size
        batch = mine[start:start + batch_size]
        records, n = score_batch(model, tokenizer, [items[k] for k in batch], max_new_tokens, think_budget,
                                 temperature, sample.noise_generator(device, seed, start, rank, 2))
        parts = pretrain.gather_objects((list(zip(batch, records)), n))
        gathered = [kr for part, _ in parts for kr in part]
        new.update(gathered)
        tokens += sum(n for _, n in parts)
        if on_records is not None and rank == 0:
            on_records([r for _, r in sorted(gathered, key=lambda kr: kr[0])])
        bar.update(len(gathered))
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - began):.0f} tok/s", refresh=False)
    bar.close()
    return [new[k] if k in new else done[it.key] for k, it in enumerate(items)]


def accuracy(records, tasks) -> dict:
    """{task: mean score, "mean": the mean over tasks} (a task without records scores 0; records without a
    score — items that could not be rendered — do not count)."""
    scores = {task: [r["score"] for r in records if r["task"] == task and r["score"] is not None] for task in tasks}
    result = {task: float(np.mean(s)) if s else 0.0 for task, s in scores.items()}
    return {**result, "mean": float(np.mean(list(result.values())))}


def load_for_inference(path: str, device, quantize=None):
    """(model, tokenizer) from a checkpoint directory, bf16 on a GPU; quantize="int8": weight-only int8 decoder."""
    return sample.load(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32, quantize)


def eval_file(levels, temperature: float) -> str:
    """The name of a checkpoint's evaluation record: eval.json for all levels, greedy; a subset of levels or a
    sampling temperature is in the name (eval_levels1,2_t1.json), so that no record overwrites another."""
    name = "eval" if list(levels) == list(world.LEVELS) else "eval_levels" + ",".join(map(str, levels))
    return name + (f"_t{temperature:g}" if temperature else "") + ".json"


def evaluate_checkpoint(args) -> dict:
    """Held-out accuracy of one checkpoint, printed as one JSON line and written next to its weights (eval.json,
    and every reply with its score in eval_replies.jsonl)."""
    rank, _, device = pretrain.setup_distributed()
    model, tokenizer = load_for_inference(args.checkpoint, device, args.quantize)
    tasks = synthetic_tasks(args.tasks)
    levels = parse_levels(args.levels)
    records = run(model, tokenizer, heldout_items(tasks, args.n, args.seed, levels), args.max_new_tokens,
                  args.think_budget, args.batch_size, args.temperature, args.seed, progress=True)
    result = {"checkpoint": args.checkpoint, "n_per_domain": args.n, "seed": args.seed, "levels": levels,
              "temperature": args.temperature, **accuracy(records, tasks)}
    if rank == 0:
        print(json.dumps(result))
        try:  # next to the weights, for --compare; a read-only checkpoint directory only loses the record
            name = eval_file(levels, args.temperature)
            pretrain.write_atomic(os.path.join(args.checkpoint, name), json.dumps(result, indent=1) + "\n")
            pretrain.write_atomic(os.path.join(args.checkpoint, name.replace(".json", "_replies.jsonl")),
                                  "".join(json.dumps(r) + "\n" for r in records))
        except OSError as e:
            warnings.warn(f"could not write the evaluation into {args.checkpoint}: {e}")
    pretrain.teardown_distributed()
    return result


# ---------------------------------------------------------------------------------------------------------------
# --bench: public benchmark files (benchmarks.py) and the synthetic world, resumable
# ---------------------------------------------------------------------------------------------------------------

# GLM-V's trans_infer_bench.py: the answer is forced after 8,192 thinking tokens, then up to 8,192 more follow
GLMV_BENCH = dict(think_budget=8192, max_new_tokens=16384)


def read_benches(args) -> list:
    """[{name, format, file, items, skipped}] of --bench: comma-separated benchmark files, folders of them, or
    `synthetic` (the held-out world: --tasks, --levels and --n items per domain)."""
    benches = []
    for spec in [s for s in args.bench.split(",") if s]:
        if spec == "synthetic":
            items = heldout_items(synthetic_tasks(args.tasks), args.synthetic_n, args.seed, parse_levels(args.levels))
            benches.append(dict(name="synthetic", format="synthetic", file=None, items=items, skipped=[]))
            continue
        for path in benchmarks.bench_files(spec):
            name, fmt, items, skipped = benchmarks.read_benchmark(path, args.format, args.n,
                                                                   required=not os.path.isdir(spec))
            if fmt is None:
                warnings.warn(f"{path}: not a benchmark file these readers know; skipped")
                continue
            benches.append(dict(name=name, format=fmt, file=path, items=items, skipped=skipped))
    names = [b["name"] for b in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"--bench: two benchmarks with the same name in {names}; rename one file")
    if not any(b["items"] for b in benches):
        raise ValueError(f"--bench {args.bench}: no items to evaluate")
    return benches


def load_replies(path: str) -> dict:
    """key -> record of the replies.jsonl an earlier (perhaps killed) run wrote. A torn last line — the kill came
    mid-write — is dropped with a warning and cut from the file, so that appending continues cleanly."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        warnings.warn(f"{path}: dropping a torn last line ({len(raw) - end} bytes) that a killed run left")
        with open(path, "r+b") as f:
            f.truncate(end)
    done = {}
    for lineno, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                done[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a reply record ({e!r})") from e
    return done


def check_settings(out: str, settings: dict):
    """settings.json of a results folder: written by its first run; a rerun with other settings is refused (its
    replies would not be comparable with those already there)."""
    path = os.path.join(out, "settings.json")
    if not os.path.exists(path):
        pretrain.write_atomic(path, json.dumps(settings, indent=1) + "\n")
        return
    with open(path) as f:
        before = json.load(f)
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
    if changed:
        raise ValueError(f"{out} holds an evaluation with other settings (before, now: {changed}); rerun with "
                         "those, or give another --out")


def append_records(f, records):
    """Append the scored records to replies.jsonl and flush them to disk; records without a score (an image that
    could not be read) are not kept, so a rerun tries them again."""
    for r in records:
        if r["score"] is not None:
            f.write(json.dumps(r) + "\n")
    f.flush()
    os.fsync(f.fileno())


def mean_score(records) -> dict:
    return {"items": len(records), "score": float(np.mean([r["score"] for r in records])) if records else None}


def summarize(bench: dict, records) -> dict:
    """One benchmark's entry of results.json: its mean score, per category and per verifier task, and what was
    skipped (records a reader could not use, items whose images could not be read) with a few examples."""
    scored = [r for r in records if r["score"] is not None]
    skipped = bench["skipped"] + [f"{r['key']}: {r['error']}" for r in records if r["score"] is None]
    skipped = [why if len(why) <= 200 else why[:197] + "..." for why in skipped]
    return {"file": bench["file"], "format": bench["format"], **mean_score(scored), "skipped": len(skipped),
            "skipped_examples": skipped[:5],
            "categories": {c: mean_score([r for r in scored if r["category"] == c])
                           for c in sorted({r["category"] for r in scored})},
            "tasks": {t: mean_score([r for r in scored if r["task"] == t])
                      for t in sorted({r["task"] for r in scored})}}


def bench_table(result: dict) -> str:
    """Markdown: each benchmark's score, then its categories; then the score of each verifier task overall."""
    def pct(entry):
        return "-" if entry["score"] is None else f"{100 * entry['score']:.1f}"

    lines = ["| benchmark | category | items | score (%) |", "|---|---|---|---|"]
    for name, b in result["benchmarks"].items():
        lines.append(f"| **{name}** | all | {b['items']} | **{pct(b)}** |")
        if len(b["categories"]) > 1:
            lines += [f"| | {c} | {e['items']} | {pct(e)} |" for c, e in b["categories"].items()]
    lines += ["", "| verifier | items | score (%) |", "|---|---|---|"]
    lines += [f"| {t} | {e['items']} | {pct(e)} |" for t, e in result["tasks"].items()]
    for name, b in result["benchmarks"].items():
        if b["skipped"]:
            lines.append(f"\n{name}: {b['skipped']} skipped (unreadable records or images), e.g. "
                         + "; ".join(b["skipped_examples"][:2]))
    return "\n".join(lines)


def bench_out(args) -> str:
    """--out, or CHECKPOINT/bench_<the --bench names>."""
    names = [os.path.splitext(os.path.basename(os.path.normpath(s)))[0] for s in args.bench.split(",") if s]
    return args.out or os.path.join(args.checkpoint, "bench_" + "+".join(names))


def evaluate_bench(args) -> dict:
    """Scores on benchmark files: a table printed, results.json and every reply with its score in replies.jsonl
    (in --out). A rerun with the same --out resumes: the items already in replies.jsonl are not generated again."""
    rank, _, device = pretrain.setup_distributed()
    benches, out = read_benches(args), bench_out(args)
    settings = {"checkpoint": os.path.realpath(args.checkpoint), "max_new_tokens": args.max_new_tokens,
                "think_budget": args.think_budget, "temperature": args.temperature, "seed": args.seed}
    replies, done = os.path.join(out, "replies.jsonl"), None
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        check_settings(out, settings)
        done = load_replies(replies)
    done = pretrain.gather_objects(done)[0]  # rank 0's, on every rank
    model, tokenizer = load_for_inference(args.checkpoint, device)
    items = [it for b in benches for it in b["items"]]
    log = open(replies, "a", encoding="utf-8") if rank == 0 else None
    try:
        records = run(model, tokenizer, items, args.max_new_tokens, args.think_budget, args.batch_size,
                      args.temperature, args.seed, progress=True, done=done,
                      on_records=(lambda rs: append_records(log, rs)) if log else None)
    finally:
        if log is not None:
            log.close()
    result = {"checkpoint": args.checkpoint, "settings": settings,
              "benchmarks": {b["name"]: summarize(b, [r for r in records if r["benchmark"] == b["name"]])
                             for b in benches},
              "tasks": {t: mean_score([r for r in records if r["task"] == t and r["score"] is not None])
                        for t in sorted({r["task"] for r in records})}}
    if rank == 0:
        print(bench_table(result))
        pretrain.write_atomic(os.path.join(out, "results.json"), json.dumps(result, indent=1) + "\n")
        print(f"results: {os.path.join(out, 'results.json')}; replies: {replies}")
    pretrain.teardown_distributed()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Charts: PIL line, stacked-area and grouped-bar charts
# ---------------------------------------------------------------------------------------------------------------

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
TIER_COLORS = ((120, 190, 120), (170, 215, 120), (245, 200, 90), (240, 140, 80), (200, 70, 70))  # easy → hard


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


def _canvas(title: str, size, right: int):
    """A white image with its title; returns (image, draw, font, the plot box (left, top, right, bottom))."""
    W, H = size
    image = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(image)
    d.text((58, 8), title, fill="black", font=ImageFont.load_default(size=14))
    return image, d, ImageFont.load_default(size=12), (58, 48, W - right, H - 44)


def _legend(d, font, box, series):
    for k, (name, _, color, *_) in enumerate(series):
        ly = box[1] + 4 + 18 * k
        d.rectangle([box[2] + 12, ly, box[2] + 24, ly + 12], fill=color)
        d.text((box[2] + 30, ly + 6), name, fill="black", font=font, anchor="lm")


def chart(title: str, xs, series, y_label: str, y_max: float = 1.0, stacked: bool = False,
          size=(820, 440), x_label: str = "iteration"):
    """A line chart (or a stacked area chart) of series [(name, values, colour)] over xs (the x range; a line
    series may give its own x values: (name, values, colour, xs)), legend on the right."""
    image, d, font, (left, top, right, bottom) = _canvas(title, size, 170)
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (right - left),
                bottom - min(max(y, 0.0), y_max) / y_max * (bottom - top))

    for k in range(5):  # horizontal grid and y labels
        _, py = px(x0, y_max * k / 4)
        d.line([(left, py), (right, py)], fill=(225, 225, 225))
        d.text((left - 6, py), f"{y_max * k / 4:g}", fill="black", font=font, anchor="rm")
    step = _nice_step(x1 - x0)
    tick = math.ceil(x0 / step) * step
    while tick <= x1 + 1e-9:
        qx, _ = px(tick, 0)
        d.line([(qx, bottom), (qx, bottom + 4)], fill="black")
        d.text((qx, bottom + 6), f"{tick:g}", fill="black", font=font, anchor="mt")
        tick += step
    d.text(((left + right) / 2, size[1] - 14), x_label, fill="black", font=font, anchor="mm")
    d.text((8, top - 20), y_label, fill="black", font=font)
    base = [0.0] * len(xs)
    for name, values, color, *own_xs in series:
        if stacked:
            top_line = [b + (v or 0.0) for b, v in zip(base, values)]
            polygon = [px(x, y) for x, y in zip(xs, top_line)] + [px(x, y) for x, y in zip(xs[::-1], base[::-1])]
            if len(polygon) >= 3:
                d.polygon(polygon, fill=color)
            base = top_line
            continue
        segment = []  # a series may bring its own x values as a 4th element (runs of different lengths)
        for x, v in zip(own_xs[0] if own_xs else xs, values):
            if v is None:
                segment = []
                continue
            segment.append(px(x, v))
            if len(segment) >= 2:
                d.line(segment[-2:], fill=color, width=2)
    d.rectangle([left, top, right, bottom], outline="black")
    _legend(d, font, (left, top, right, bottom), series)
    return image


def bar_chart(title: str, groups, series, y_label: str, y_max: float = 1.0, size=(900, 420)):
    """Grouped bars: for each name in groups, one bar per series [(name, values, colour)], legend on the right."""
    image, d, font, (left, top, right, bottom) = _canvas(title, size, 190)
    for k in range(5):
        y = bottom - k / 4 * (bottom - top)
        d.line([(left, y), (right, y)], fill=(225, 225, 225))
        d.text((left - 6, y), f"{y_max * k / 4:g}", fill="black", font=font, anchor="rm")
    slot = (right - left) / max(len(groups), 1)
    bar = slot * 0.8 / max(len(series), 1)
    for g, group in enumerate(groups):
        x = left + g * slot + slot * 0.1
        for name, values, color in series:
            v = min(max(values[g], 0.0), y_max)
            d.rectangle([x, bottom - v / y_max * (bottom - top), x + bar - 1, bottom], fill=color)
            x += bar
        d.text((left + (g + 0.5) * slot, bottom + 6), group.replace("video_grounding", "video"),
               fill="black", font=font, anchor="mt")
    d.text((8, top - 20), y_label, fill="black", font=font)
    d.rectangle([left, top, right, bottom], outline="black")
    _legend(d, font, (left, top, right, bottom), series)
    return image


def save_png(image, path: str):
    image.quantize(64).save(path, optimize=True)  # a small palette PNG: tens of KB


def read_metrics(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(out: str) -> list:
    """reward.png (mean reward per domain over iterations), tiers.png (the share of sampled prompts per tier) and
    tier_pass.png (each tier's pass rate) from out/metrics.jsonl of an RL run, moving averages over ~2% of the run.
    Returns the paths written."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --plot needs the directory of an RL run")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} is empty")
    xs = [r["step"] for r in rows]
    window = max(1, len(rows) // 50)
    logged = dict.fromkeys(k[len("reward_"):] for r in rows for k in r if k.startswith("reward_"))
    tasks = [t for t in rewards.VERIFIERS if t in logged] + [t for t in logged if t not in rewards.VERIFIERS]
    series = [(t, smooth([r.get(f"reward_{t}") for r in rows], window), PALETTE[k % len(PALETTE)])
              for k, t in enumerate(tasks)] + [("all", smooth([r["reward"] for r in rows], window), (0, 0, 0))]
    keys = [k[len("tier_share_"):] for k in rows[0] if k.startswith("tier_share_")]  # the tiers, easy first
    tier_shares = [(k.replace("_", " "), smooth([r.get(f"tier_share_{k}") for r in rows], window), c)
                   for k, c in zip(keys, TIER_COLORS)]
    tier_pass = [(k.replace("_", " "), smooth([r.get(f"pass_rate_{k}") for r in rows], window), c)
                 for k, c in zip(keys, TIER_COLORS)]
    smoothing = f" (moving average of {window})" if window > 1 else ""
    written = []
    for name, image in (("reward.png", chart("Mean reward per domain" + smoothing, xs, series, "reward")),
                        ("tiers.png", chart("Sampled prompts per curriculum tier" + smoothing, xs,
                                            tier_shares[::-1], "share", stacked=True)),
                        ("tier_pass.png", chart("Pass rate per curriculum tier" + smoothing, xs, tier_pass,
                                                "mean reward"))):
        save_png(image, os.path.join(out, name))
        written.append(os.path.join(out, name))
    return written


# ---------------------------------------------------------------------------------------------------------------
# --compare: the held-out table of several runs and their training curves
# ---------------------------------------------------------------------------------------------------------------


def load_records(runs, levels, temperature: float) -> list:
    """Each run's evaluation record for these levels and temperature; refuses records of different held-out items."""
    subset = ",".join(map(str, levels)) if list(levels) != list(world.LEVELS) else ""
    flags = (f" --levels {subset}" if subset else "") + (f" --temperature {temperature:g}" if temperature else "")
    results = []
    for path in (os.path.join(r, eval_file(levels, temperature)) for r in runs):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: run `python evaluate.py {os.path.dirname(path)}{flags}` first")
        with open(path) as f:
            results.append(json.load(f))
    for key in ("seed", "n_per_domain"):  # a Δ means something only between scores on the same held-out items
        seen = {json.dumps(r.get(key)): run for run, r in zip(runs, results)}
        if len(seen) > 1:
            raise ValueError(f"the runs were evaluated on different held-out items ({key}: "
                             + ", ".join(f"{v} in {run}" for v, run in seen.items())
                             + f"): re-run `python evaluate.py RUN{flags}` with the same --n and --seed for each")
    return results


def heldout_table(names, results, tasks, levels, temperature: float) -> str:
    """Markdown: one row per domain (and the mean), the runs' accuracies, then Δ against the first run."""
    header = ["domain"] + names + [f"Δ {n}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in tasks:
        cells = [f"{100 * r[t]:.1f}" for r in results] + [f"{100 * (r[t] - results[0][t]):+.1f}" for r in results[1:]]
        lines.append(f"| {'**mean**' if t == 'mean' else t} | " + " | ".join(cells) + " |")
    kind = f"mean reward of one reply sampled at T = {temperature:g}" if temperature else "greedy accuracy"
    subset = ",".join(map(str, levels)) if list(levels) != list(world.LEVELS) else ""
    lines.append(f"\nheld-out {kind} (%), {results[0]['n_per_domain']} items per domain"
                 + (f", levels {subset}" if subset else ""))
    return "\n".join(lines)


def reward_curves(curves) -> tuple:
    """The training reward of RL runs [(name, rows, colour)] against rollouts, with, for a run with
    --lenient-verifier, its strict reward and its lenient domains (lighter). Returns (chart, lenient domains)."""
    xs = [0] + [r["rollouts"] for _, rows, _ in curves for r in rows]  # the x range
    window = max(1, max(len(rows) for _, rows, _ in curves) // 10)
    series = [(name, smooth([r["reward"] for r in rows], window), c, [r["rollouts"] for r in rows])
              for name, rows, c in curves]
    lenient = {name: sorted({k[len("strict_reward_"):] for r in rows for k in r if k.startswith("strict_reward_")})
               for name, rows, _ in curves}
    for name, rows, c in curves:
        if lenient[name]:
            dark, light, x = tuple(v // 2 for v in c), tuple((v + 255) // 2 for v in c), [r["rollouts"] for r in rows]
            series.append((name + " (strict)", smooth([r.get("strict_reward") for r in rows], window), dark, x))
            series += [(f"{name}: {t}", smooth([r.get(f"reward_{t}") for r in rows], window), light, x)
                       for t in lenient[name]]
    return chart(f"Training reward (moving average of {window})", xs, series, "reward",
                 y_max=1.0 if any(lenient.values()) else 0.5, x_label="rollouts"), lenient


def heldout_curves(curves, baseline_name, baseline, lenient):
    """The --eval-every accuracy of RL runs against rollouts, the first compared run's accuracy as a flat line."""
    evaluated = [(name, [r for r in rows if "eval_mean" in r], c) for name, rows, c in curves]
    if not any(rows for _, rows, _ in evaluated):
        return None
    end = max(r["rollouts"] for _, rows, _ in curves for r in rows)
    series = [(f"{baseline_name} (mean)", [baseline["mean"]] * 2, (0, 0, 0), [0, end])]
    series += [(name, [r["eval_mean"] for r in rows], c, [r["rollouts"] for r in rows]) for name, rows, c in evaluated
               if rows]
    for t in sorted({t for ts in lenient.values() for t in ts if t in baseline}):
        series.append((f"{baseline_name}: {t}", [baseline[t]] * 2, (150, 150, 150), [0, end]))
    for name, rows, c in evaluated:
        light = tuple((v + 255) // 2 for v in c)
        series += [(f"{name}: {t}", [r.get(f"eval_{t}") for r in rows], light, [r["rollouts"] for r in rows])
                   for t in lenient[name] if rows]
    return chart("Held-out greedy accuracy during training (--eval-every)", [0, end], series, "accuracy", y_max=0.5,
                 x_label="rollouts")


def compare(runs, out: str, levels=world.LEVELS, temperature: float = 0.0) -> str:
    """The held-out table of several runs (each one's evaluation record for these levels and temperature) as
    Markdown, the first run the baseline of the Δ columns, also written to out/table.md; draws out/heldout.png
    (bars per domain) and, for RL runs, out/reward.png (training reward against rollouts) and
    out/heldout_curve.png (the --eval-every accuracy)."""
    results = load_records(runs, levels, temperature)
    tasks = [t for t in rewards.VERIFIERS if all(t in r for r in results)] + ["mean"]
    names = [os.path.basename(os.path.normpath(run)) for run in runs]
    table = heldout_table(names, results, tasks, levels, temperature)
    os.makedirs(out, exist_ok=True)
    colors = [PALETTE[k % len(PALETTE)] for k in range(len(runs))]
    kind = f"mean reward of one reply sampled at T = {temperature:g}" if temperature else "greedy accuracy"
    highest = max(r[t] for r in results for t in tasks)
    save_png(bar_chart(f"Held-out {kind} per domain", tasks, [(nm, [r[t] for t in tasks], c) for nm, r, c in
                                                               zip(names, results, colors)],
                       "accuracy", y_max=0.5 if highest <= 0.5 else 1.0), os.path.join(out, "heldout.png"))
    curves = []
    for run_dir, name, color in zip(runs, names, colors):
        path = os.path.join(run_dir, "metrics.jsonl")
        rows = read_metrics(path) if os.path.exists(path) else []
        if rows and "rollouts" in rows[0]:  # an RL run (a pretrain/SFT metrics.jsonl has no rollouts)
            curves.append((name, rows, color))
    if curves:
        image, lenient = reward_curves(curves)
        save_png(image, os.path.join(out, "reward.png"))
        image = heldout_curves(curves, names[0], results[0], lenient)
        if image is not None:
            save_png(image, os.path.join(out, "heldout_curve.png"))
    pretrain.write_atomic(os.path.join(out, "table.md"), table + "\n")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="the checkpoint directory to evaluate")
    p.add_argument("--bench", help="benchmark files to evaluate on: a file, a folder of them, `synthetic` (the "
                   "held-out world), or several, comma-separated; formats: " + ", ".join(benchmarks.FORMATS))
    p.add_argument("--format", help="--bench: read every file in this format instead of detecting it from the fields")
    p.add_argument("--verifier", help="comma-separated NAME=module:function: add the task NAME, scored by your "
                   "function fn(box content, ground truth as text) -> [0, 1] (rewards.add_verifier)")
    p.add_argument("--compare", help="comma-separated run directories: print their held-out table and draw "
                   "heldout.png and training curves into --out")
    p.add_argument("--plot", help="draw reward.png, tiers.png and tier_pass.png from DIR/metrics.jsonl of an RL run")
    p.add_argument("--out", help="--compare: where the table and charts go (default: runs/compare); --bench: the "
                   "results folder, which a rerun resumes (default: CHECKPOINT/bench_NAME)")
    p.add_argument("--preset", default="tiny", help="whose RL settings give the defaults of --n, --max-new-tokens and "
                   "--think-budget (tiny | 9b)")
    p.add_argument("--tasks", help="comma-separated domains (default: all eight)")
    p.add_argument("--levels", help="comma-separated levels 1–5 of the held-out items (default: all, in turn)")
    p.add_argument("--n", "--num-items", dest="n", type=int, help="held-out items per domain (default: the preset's "
                   "rlcs.py --eval-n); --bench: the first N items of each file (default: all); under torchrun "
                   "write --num-items, which its own flags do not shadow")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out items and of sampling")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: the mean reward of one reply "
                   "sampled at this temperature per item (the quantity RL optimises)")
    p.add_argument("--max-new-tokens", type=int, help="the length limit of a reply (default: per preset)")
    p.add_argument("--think-budget", type=int, help="force answering after this many reply tokens without </think> "
                   "(default: per preset; --bench with the 9b preset: 8192 of 16384, as GLM-V; 0: never)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate() call")
    sample.add_quantize_flag(p)
    return p


def fill_defaults(args):
    """--n, --max-new-tokens and --think-budget default to what RL on the preset uses for --eval-every; with
    --bench, the 9B's to GLM-V's benchmark settings and --n to every item of a file (`synthetic`: --eval-n)."""
    import rlcs  # imported here: rlcs.py imports this file

    rc = rlcs.resolve(rlcs.RLConfig(preset=args.preset))
    defaults = {"max_new_tokens": rc.max_new_tokens, "think_budget": rc.think_budget}
    defaults.update(GLMV_BENCH if args.bench and args.preset == "9b" else {})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.synthetic_n = args.n or rc.eval_n
    args.n = args.n if args.bench else args.synthetic_n


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.checkpoint, args.compare, args.plot)) != 1:
        parser.error("give one of: a CHECKPOINT to evaluate, --compare A,B or --plot DIR")
    if args.bench and not args.checkpoint:
        parser.error("--bench needs the CHECKPOINT to evaluate")
    if args.batch_size < 1 or args.temperature < 0 or not math.isfinite(args.temperature):
        parser.error("--batch-size must be at least 1, --temperature a finite number >= 0")
    try:
        rewards.add_verifiers(args.verifier)
        fill_defaults(args)
        if args.n is not None and args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        if args.plot:
            print("\n".join(plot(args.plot)))
        elif args.compare:
            print(compare([r for r in args.compare.split(",") if r], args.out or "runs/compare",
                          parse_levels(args.levels), args.temperature))
        elif args.bench:
            evaluate_bench(args)
        else:
            evaluate_checkpoint(args)
    except (OSError, ValueError) as e:  # missing or unwritable files, bad flags or data: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
