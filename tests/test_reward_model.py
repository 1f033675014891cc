"""reward.py and the `model` verifier: a reward model trained on the synthetic world's (right, wrong) pairs ranks
held-out pairs, its export loads back with its head (and is a Glm4v for transformers), its training resumes exactly;
RLCS mixes it with the rule verifiers in one run, logs the strict score beside it, resumes exactly, refuses a
checkpoint that does not fit at the start, and scores a non-finite reward 0 and counts it."""
import json
import math
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import model as M
import reward
import rewards
import rlcs
import world
from conftest import metrics, micro_checkpoint, rl_config, stop_after_first_save

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # thousands of tiny ops on a shared 2-core machine

# choice and counting questions of levels 1-2, each against the answer to the other domain's item
PAIRS = ["--tasks", "choice,counting", "--levels", "1,2", "--wrong", "foreign", "--pairs-per-step", "16",
         "--eval-pairs", "40", "--lr", "1e-3", "--save-every", "0"]


def reward_config(out, init_from, *flags):
    return reward.config_from_args(reward.build_parser().parse_args(
        ["--init-from", str(init_from), "--out", str(out), *PAIRS, *flags]))


@pytest.fixture(scope="module")
def reward_checkpoint(sft_checkpoint, tmp_path_factory, one_thread):
    """40 steps of 16 pairs (640 pairs, ~15 s here) from the SFT checkpoint, held-out accuracy every 20 steps."""
    out = tmp_path_factory.mktemp("reward") / "rm"
    reward.train(reward_config(out, sft_checkpoint, "--max-steps", "40", "--eval-every", "20"))
    return str(out)


# ---------------------------------------------------------------------------------------------------------------
# The reward model
# ---------------------------------------------------------------------------------------------------------------


def test_world_pairs_are_a_right_reply_against_a_wrong_one(tok):
    pairs = reward.WorldPairs(reward_config("unused", "unused", "--wrong", "foreign,swapped"), tok)
    for i in range(16):
        p = pairs.train(i)
        j = i // 2
        item = world.make_item(p.task, j, 0, "train", (1, 2)[j % 2])
        assert p.task == ("choice", "counting")[i % 2] and p.kind == ("foreign", "swapped")[j // 2 % 2]
        assert p.prompt["input_ids"].tolist() == item.prompt(tok)["input_ids"].tolist()
        assert rewards.score(p.task, p.chosen, item.answer) == 1.0
        assert rewards.score(p.task, p.rejected, item.answer) < 1.0
        wrong = rewards.extract_answer(p.rejected)
        assert wrong.isdigit() == (p.task == "choice" if p.kind == "foreign" else p.task == "counting"), p
    assert {p.task for p in pairs.heldout()} == {"choice", "counting"} and len(pairs.heldout()) == 80
    with pytest.raises(ValueError, match="at least two --tasks"):
        reward.WorldPairs(reward_config("unused", "unused", "--tasks", "choice"), tok)
    # what the model reads: prompt, then the answer part as a no-think reply renders, whatever the reply's ending
    reply = data.format_reply("B", "It is a square, so B.") + "<|user|>"
    assert tok.decode(reward.answer_tokens(tok, reply)) == \
        "<think></think><answer><|begin_of_box|>B<|end_of_box|></answer><|endoftext|>"
    conversation = [*world.make_item("choice", 0).messages(with_reply=False), {"role": "assistant", "content": reply}]
    rendered = data.render_chat(conversation[:1], tok, images=[world.make_item("choice", 0).image])
    batch = reward.inputs(M.PRESETS["tiny"], tok, [rendered], [reply], CPU)
    no_think = data.render_chat([conversation[0], {"role": "assistant", "content": data.format_reply("B")}], tok,
                                images=[world.make_item("choice", 0).image], thinking=False)
    assert batch["input_ids"][0].tolist() == no_think["input_ids"].tolist()


def test_reward_model_ranks_heldout_pairs(reward_checkpoint):
    """The held-out pairs are a choice or counting question of the world's held-out split, its right answer, and the
    answer to the same-index item of the other domain (a count for a shape question, a letter for a count). That
    an answer is of the asked kind shows in the text, but only together with the question: a scorer that ignores
    the prompt ranks letters above digits (or below) in both domains, so its two per-domain accuracies sum to 1.
    Both at ≥ 0.7 means the model reads the question. (Measured: 1.0 and 0.4 at step 20 — letters preferred almost
    everywhere — then 1.0 and 1.0 at step 40. The swapped pairs, which need the image, stay at chance for this
    model: README.)"""
    rows = metrics(reward_checkpoint)
    last = rows[-1]
    assert [r["step"] for r in rows] == list(range(1, 41)) and last["pairs"] == 640
    assert [r["step"] for r in rows if "heldout_accuracy" in r] == [20, 40]
    assert last["heldout_pairs"] == 80
    assert last["heldout_accuracy_choice"] >= 0.7 and last["heldout_accuracy_counting"] >= 0.7, last
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]]) - 0.3
    calibration = json.load(open(os.path.join(reward_checkpoint, "reward.json")))
    assert calibration["step"] == 40
    assert calibration["offset"] == last["offset"] and calibration["heldout_accuracy"] == last["heldout_accuracy"]


def test_export_loads_back_with_its_head(reward_checkpoint, tok):
    transformers = pytest.importorskip("transformers")
    import reference as R

    rm, rm_tok = reward.load(reward_checkpoint, CPU)
    assert rm.offset == json.load(open(os.path.join(reward_checkpoint, "reward.json")))["offset"]
    assert rm_tok.backend.get_vocab() == tok.backend.get_vocab()
    pairs = reward.WorldPairs(reward_config("unused", "unused"), tok).heldout()
    prompts = [p.prompt for p in pairs]
    chosen = np.array(reward.rewards_of(rm, tok, prompts, [p.chosen for p in pairs], batch_rows=24))
    rejected = np.array(reward.rewards_of(rm, tok, prompts, [p.rejected for p in pairs]))
    last = metrics(reward_checkpoint)[-1]
    assert float(np.mean(chosen > rejected)) == last["heldout_accuracy"]
    assert (chosen.mean() + rejected.mean()) / 2 == pytest.approx(last["offset"], rel=1e-4, abs=1e-4)
    # our Glm4v loader refuses it (one tensor too many); transformers loads the body, score.weight left over
    with pytest.raises(ValueError, match="unexpected \\(1\\):\n    score.weight"):
        M.GLM4V.from_pretrained(reward_checkpoint)
    ref, info = transformers.Glm4vForConditionalGeneration.from_pretrained(reward_checkpoint,
                                                                           output_loading_info=True)
    assert not info["missing_keys"] and list(info["unexpected_keys"]) == ["score.weight"]
    # and its last hidden state at the last token, times score.weight, is our reward
    batch = reward.inputs(rm.cfg, tok, prompts[:1], [pairs[0].chosen], CPU)
    with torch.no_grad():
        hidden = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           mm_token_type_ids=R.mm_token_type_ids(rm.cfg, batch["input_ids"]),
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]).last_hidden_state
    assert float(hidden[0, -1] @ rm.score.weight[0]) == pytest.approx(chosen[0], rel=1e-4, abs=1e-4)


def pairs_file(tmp_path) -> str:
    """24 choice questions with the right reply against another letter, plus three unusable lines."""
    path = world.export_world(tmp_path / "world", tasks=("choice",), n=24, kind="sft", split="train", level=2)
    lines = []
    for line in open(path):
        obj = json.loads(line)
        wrong = "B" if obj["answer"] == "A" else "A"
        lines.append({**obj, "chosen": obj["messages"][1]["content"], "rejected": data.format_reply(wrong)})
    lines[3] = {**lines[3], "rejected": lines[3]["chosen"]}
    lines[5] = {**lines[5], "images": ["media/missing.png"]}
    lines[7] = {**lines[7], "chosen": data.format_reply("A" * 600)}
    out = tmp_path / "world" / "pairs.jsonl"  # beside the media its lines name
    out.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return str(out)


def test_jsonl_pairs_train_and_resume_exactly(tmp_path, monkeypatch, tok):
    path = pairs_file(tmp_path)
    init = micro_checkpoint(tmp_path / "init")

    def config(out, *flags):
        return reward_config(out, init, "--data", path, "--tasks", "", "--pairs-per-step", "4", "--heldout-share",
                             "0.25", "--max-bad-data", "0.2", "--max-steps", "4", "--save-every", "2", *flags)

    with pytest.raises(ValueError, match=r"pairs.jsonl: 3 of 24 pairs are unusable.*pairs.jsonl:4: 'chosen' and"):
        reward.JsonlPairs(reward_config("unused", init, "--data", path, "--tasks", ""), tok)
    pairs = reward.JsonlPairs(config("unused"), tok)
    assert pairs.dropped == 3 and len(pairs.lines) + len(pairs.held) == 21 and pairs.held and pairs.lines
    reward.train(config(tmp_path / "straight"))
    stop_after_first_save(monkeypatch, reward.train, config(tmp_path / "resumed"))
    reward.train(config(tmp_path / "resumed", "--resume"))
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert set(a) == set(b)
        for key in ("loss", "accuracy", "margin", "grad_norm", "heldout_accuracy", "offset"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    assert "heldout_accuracy_choice" in straight[-1] and straight[-1]["heldout_pairs"] == len(pairs.held)


def test_two_processes_match_one(sft_checkpoint, tmp_path):
    """torchrun: FSDP2 shards the model with its head (lm_head frozen in the root group), the held-out pairs are
    dealt over the ranks; losses, the held-out accuracy and the calibration match one process."""
    flags = ["--init-from", sft_checkpoint, *PAIRS, "--pairs-per-step", "8", "--eval-pairs", "3", "--max-steps", "2"]
    reward.main([*flags, "--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             "reward.py", *flags, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2] and two[-1]["heldout_pairs"] == 6
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "accuracy", "heldout_accuracy", "offset"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)
    assert reward.load(str(tmp_path / "two"), CPU)[0].offset == pytest.approx(two[-1]["offset"])


# ---------------------------------------------------------------------------------------------------------------
# The `model` verifier in RLCS
# ---------------------------------------------------------------------------------------------------------------


def test_model_verifier_maps_rewards_to_unit_interval_and_counts_nonfinite(monkeypatch, tok):
    raw = iter([[2.5, float("nan"), float("inf"), 1e6]])
    monkeypatch.setattr(reward, "rewards_of", lambda model, tokenizer, prompts, replies, batch_rows=None: next(raw))
    good = data.format_reply("3", "I count 1 2 3.")
    judge = types.SimpleNamespace(offset=0.5)
    scores, nonfinite = rewards.model_verifier(judge, tok, [{}] * 5, [good, good, "3", good, good])
    assert scores == [pytest.approx(1 / (1 + math.exp(-2.0))), 0.0, 0.0, 0.0, 1.0] and nonfinite == 2


def test_rl_mixes_model_and_rule_verifiers_and_resumes_exactly(sft_checkpoint, reward_checkpoint, tmp_path,
                                                               monkeypatch):
    flags = ["--tasks", "choice,counting", "--model-verifier-tasks", "counting", "--reward-model", reward_checkpoint,
             "--max-steps", "4", "--save-every", "2", "--lr", "3e-4"]
    rlcs.train(rl_config(tmp_path / "straight", sft_checkpoint, *flags))
    stop_after_first_save(monkeypatch, rlcs.train, rl_config(tmp_path / "resumed", sft_checkpoint, *flags))
    rlcs.train(rl_config(tmp_path / "resumed", sft_checkpoint, *flags, "--resume"))
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert any("reward_counting" in r for r in straight) and any("reward_choice" in r for r in straight)
    for a, b in zip(straight, resumed):
        logged = {k for k in a if "reward" in k}
        assert logged == {k for k in b if "reward" in k}
        for key in ("loss", "rollouts", "grad_norm", *logged):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
        assert a["model_reward_nonfinite"] == 0
        assert not {"model_reward_choice", "strict_reward_choice"} & logged  # a rule domain: its verifier only
        if "reward_counting" in a:  # the model's score, its strict score beside it
            assert a["model_reward_counting"] == a["reward_counting"] and 0 <= a["reward_counting"] <= 1
            assert 0 <= a["strict_reward_counting"] <= 1


def test_a_domain_without_rule_verifier_is_the_reward_models(sft_checkpoint, reward_checkpoint, tmp_path, tok):
    path = world.export_world(tmp_path / "world", tasks=("choice", "counting"), n=8, kind="sft", split="train",
                              level=2)
    lines = [json.loads(line) for line in open(path)]
    for obj in lines[8:]:  # counting questions as an open-ended domain: no rule verifier, no ground truth
        obj["task"] = "open_count"
        del obj["answer"]
    lines[0]["verifier"] = "model"
    prompts = tmp_path / "world" / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    pool = rlcs.jsonl_pool(str(prompts))
    assert [p.verifier for p in pool] == ["model"] + [None] * 7 + ["model"] * 8
    root = str(tmp_path / "world")
    with pytest.raises(ValueError, match="'verifier' must be 'model'"):
        rlcs.pool_record({**lines[1], "verifier": "judge"}, root)
    with pytest.raises(ValueError, match="'answer'"):
        rlcs.pool_record({k: v for k, v in lines[1].items() if k != "answer"}, root)

    def run(out, judge, steps):
        rlcs.train(rl_config(out, sft_checkpoint, "--data", str(prompts), "--tasks", "choice,open_count",
                             "--reward-model", judge, "--max-steps", str(steps), "--temperature", "0.3"))
        return metrics(out)

    rows = run(tmp_path / "rl", reward_checkpoint, 2)
    logged = {k for r in rows for k in r}
    assert {"reward_open_count", "model_reward_open_count"} <= logged and "strict_reward_open_count" not in logged
    assert all(r["model_reward_nonfinite"] == 0 for r in rows)
    # a reward model whose score is not finite: those replies score 0 and are counted; the run goes on
    broken = tmp_path / "nan_reward_model"
    shutil.copytree(reward_checkpoint, broken, ignore=shutil.ignore_patterns("checkpoints"))
    weights = load_file(broken / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    rows = run(tmp_path / "rl_nan", str(broken), 2)
    assert sum(r["model_reward_nonfinite"] for r in rows) > 0, rows
    assert all(r.get(key, 0.0) == 0.0 for r in rows for key in ("reward_open_count", "model_reward_choice")), rows


def test_a_reward_model_that_does_not_fit_is_refused_at_start(sft_checkpoint, reward_checkpoint, tmp_path):
    flags = ["--tasks", "choice,counting", "--model-verifier-tasks", "counting", "--max-steps", "1"]
    with pytest.raises(ValueError, match="--model-verifier-tasks needs --reward-model"):
        rl_config(tmp_path / "none", sft_checkpoint, *flags)
    with pytest.raises(ValueError, match="not a reward model .*no score.weight"):
        rlcs.train(rl_config(tmp_path / "sft", sft_checkpoint, *flags, "--reward-model", sft_checkpoint))
    other = tmp_path / "other_tokens"
    shutil.copytree(reward_checkpoint, other, ignore=shutil.ignore_patterns("checkpoints"))
    tokenizer = data.tiny_tokenizer()
    tokenizer.backend.add_tokens(["<|other|>"])
    tokenizer.save(other)
    with pytest.raises(ValueError, match="reads other tokens than the policy"):
        rlcs.train(rl_config(tmp_path / "other", sft_checkpoint, *flags, "--reward-model", str(other)))
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        rlcs.train(rl_config(tmp_path / "missing", sft_checkpoint, *flags, "--reward-model", str(tmp_path / "no")))
    for out in ("sft", "other", "missing"):  # refused before the first rollout
        assert not os.path.exists(tmp_path / out / "metrics.jsonl")
    with pytest.raises(SystemExit, match="^error: .* is not a reward model"):
        rlcs.main(["--init-from", sft_checkpoint, "--out", str(tmp_path / "cli"), *flags, "--reward-model",
                   sft_checkpoint])
