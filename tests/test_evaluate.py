"""evaluate.py: the held-out record and its replies, sampled and level-subset records, the same record from two
processes, --compare's table and its refusals, --plot's charts. The RL run they read is conftest.py's."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import data
import evaluate
import rewards
import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL = ["--tasks", "choice,counting", "--n", "3", "--max-new-tokens", "40"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluated(rl_run):
    """The RL run evaluated greedily on 3 held-out items of two domains: (its directory, the printed record)."""
    import contextlib
    import io

    _, out, _ = rl_run
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate.main([str(out), *EVAL])
    return out, json.loads(printed.getvalue().strip().splitlines()[-1])


def test_the_record_and_every_reply_with_its_score(evaluated):
    out, result = evaluated
    assert set(result) >= {"choice", "counting", "mean", "checkpoint"} and result["n_per_domain"] == 3
    assert 0 <= result["choice"] <= 1 and result["mean"] == pytest.approx((result["choice"] + result["counting"]) / 2)
    assert json.load(open(out / "eval.json")) == result and result["levels"] == [1, 2, 3, 4, 5]
    replies = [json.loads(line) for line in open(out / "eval_replies.jsonl")]  # what it answered, item by item
    assert [(r["task"], r["index"], r["level"]) for r in replies] == [
        (t, i, i + 1) for t in ("choice", "counting") for i in range(3)]
    for r in replies:
        item = world.make_item(r["task"], r["index"], 0, "heldout", r["level"])
        assert (r["question"], r["answer"]) == (item.question, item.answer) and r["reply"]
        assert r["score"] == rewards.score(r["task"], r["reply"], item.answer)
    assert result["choice"] == pytest.approx(sum(r["score"] for r in replies[:3]) / 3)


def test_a_sampled_record_on_some_levels_has_its_own_file(evaluated):
    out, result = evaluated
    evaluate.main([str(out), "--tasks", "choice", "--n", "2", "--max-new-tokens", "40", "--levels", "2",
                   "--temperature", "1"])
    sampled = json.load(open(out / "eval_levels2_t1.json"))
    assert sampled["temperature"] == 1.0 and sampled["levels"] == [2] and json.load(open(out / "eval.json")) == result
    assert evaluate.eval_file([1, 3], 0.0) == "eval_levels1,3.json"
    assert evaluate.eval_file(range(1, 6), 0.7) == "eval_t0.7.json"


def test_two_processes_give_the_same_record(sft_checkpoint, tmp_path):
    """torchrun: the items split across two ranks, the records gathered — the record and replies of one process."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(sft_checkpoint, checkpoint, ignore=shutil.ignore_patterns("checkpoints"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = ["evaluate.py", str(checkpoint), "--tasks", "choice,counting", "--num-items", "3", "--max-new-tokens",
               "24"]  # (torchrun reads a bare --n as an abbreviation of its own --nnodes)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    two = (json.load(open(checkpoint / "eval.json")), (checkpoint / "eval_replies.jsonl").read_text())
    subprocess.run([sys.executable, *command], cwd=ROOT, env=env, check=True, capture_output=True)
    assert two == (json.load(open(checkpoint / "eval.json")), (checkpoint / "eval_replies.jsonl").read_text())
    assert len(two[1].splitlines()) == 6


def test_compare_prints_the_table_and_draws_the_charts(evaluated, tmp_path, capsys):
    out, _ = evaluated
    capsys.readouterr()
    evaluate.main(["--compare", f"{out},{out}", "--out", str(tmp_path / "cmp")])
    table = capsys.readouterr().out
    assert "| choice |" in table and "| **mean** |" in table and f"Δ {out.name}" in table
    assert table.strip().endswith("held-out greedy accuracy (%), 3 items per domain")
    for name in ("heldout.png", "reward.png", "heldout_curve.png", "table.md"):
        assert (tmp_path / "cmp" / name).exists() and (tmp_path / "cmp" / name).stat().st_size < 200_000, name


def test_compare_reads_the_record_its_flags_name(evaluated, tmp_path, capsys):
    out, _ = evaluated
    evaluate.main([str(out), "--tasks", "choice", "--n", "2", "--max-new-tokens", "40", "--levels", "2",
                   "--temperature", "1"])
    capsys.readouterr()
    evaluate.main(["--compare", f"{out},{out}", "--levels", "2", "--temperature", "1", "--out", str(tmp_path)])
    table = capsys.readouterr().out  # the records of --levels 2 --temperature 1: choice only
    assert "| choice |" in table and "| counting |" not in table and "T = 1" in table and "levels 2" in table


def test_compare_refuses_missing_or_different_records(evaluated, tmp_path):
    out, result = evaluated
    with pytest.raises(SystemExit, match="eval.json not found"):
        evaluate.main(["--compare", f"{tmp_path / 'nowhere'},{out}", "--out", str(tmp_path / "cmp")])
    with pytest.raises(SystemExit, match=r"eval_levels1,2.json not found: run `python evaluate.py .* --levels 1,2`"):
        evaluate.main(["--compare", f"{out},{out}", "--levels", "1,2", "--out", str(tmp_path / "cmp")])
    (tmp_path / "fewer").mkdir()  # the same run scored on fewer items: not the same questions
    (tmp_path / "fewer" / "eval.json").write_text(json.dumps({**result, "n_per_domain": 2}))
    with pytest.raises(SystemExit, match=r"different held-out items \(n_per_domain: 3 in .*, 2 in"):
        evaluate.main(["--compare", f"{out},{tmp_path / 'fewer'}", "--out", str(tmp_path / "cmp")])


def test_plot_draws_three_charts(rl_run, tmp_path, capsys):
    _, out, _ = rl_run
    evaluate.main(["--plot", str(out)])
    for name in ("reward.png", "tiers.png", "tier_pass.png"):
        assert (out / name).stat().st_size < 200_000
        with Image.open(out / name) as image:
            assert image.size == (820, 440)
    with pytest.raises(SystemExit, match="--plot"):
        evaluate.main(["--plot", str(tmp_path)])
    with pytest.raises(SystemExit):
        evaluate.main([])
    assert "give one of: a CHECKPOINT" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# --bench: benchmark files (tests/bench_samples.py writes one in each public format), resuming, user verifiers
# ---------------------------------------------------------------------------------------------------------------

BENCH = ["--max-new-tokens", "24", "--batch-size", "4"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    from bench_samples import write_samples

    folder = tmp_path_factory.mktemp("bench")
    return folder, write_samples(folder, 2)


def replies_of(out):
    return [json.loads(line) for line in open(out / "replies.jsonl")]


def test_bench_prints_the_table_and_writes_results_and_replies(sft_checkpoint, bench_dir, tmp_path, capsys):
    folder, expected = bench_dir
    (folder / "notes.txt").write_text("not a benchmark\n")  # a folder's other files are skipped
    with pytest.warns(UserWarning, match="notes.txt: not a benchmark file"):
        evaluate.main([sft_checkpoint, "--bench", str(folder), "--out", str(tmp_path), *BENCH])
    printed = capsys.readouterr().out
    result = json.load(open(tmp_path / "results.json"))
    assert set(result["benchmarks"]) == set(expected)
    replies = replies_of(tmp_path)
    assert len(replies) == sum(map(len, expected.values())) == sum(b["items"] for b in result["benchmarks"].values())
    for name, b in result["benchmarks"].items():
        assert f"| **{name}** | all | {b['items']} | **{100 * b['score']:.1f}** |" in printed
        mine = [r for r in replies if r["benchmark"] == name]
        assert b["score"] == pytest.approx(sum(r["score"] for r in mine) / len(mine)) and b["skipped"] == 0
    for r in replies:
        assert r["score"] == max(rewards.score(r["task"], r["reply"], a) for a in [r["answer"], *r.get("alternatives",
                                                                                                      [])])
    assert "| verifier | items | score (%) |" in printed and "| video_grounding | 2 |" in printed
    assert json.load(open(tmp_path / "settings.json"))["max_new_tokens"] == 24


def test_a_killed_bench_run_resumes_without_scoring_anything_twice(sft_checkpoint, bench_dir, tmp_path, monkeypatch):
    import sample

    folder, expected = bench_dir
    bench = ["--bench", f"{folder / 'mathvista.json'},{folder / 'refcoco_val.jsonl'}", "--out", str(tmp_path), *BENCH]
    total = len(expected["mathvista"]) + len(expected["refcoco_val"])  # 8 items: two batches of 4
    real, calls = sample.generate_replies, []

    def dies_after(k):
        def generate(*args, **kwargs):
            if len(calls) == k:
                raise RuntimeError("killed")
            calls.append(len(args[1]))
            return real(*args, **kwargs)
        return generate

    monkeypatch.setattr(sample, "generate_replies", dies_after(1))
    with pytest.raises(RuntimeError, match="killed"):
        evaluate.main([sft_checkpoint, *bench])
    first = replies_of(tmp_path)
    assert calls == [4] and len(first) == 4  # the first batch was kept
    with open(tmp_path / "replies.jsonl", "a") as f:
        f.write('{"key": "mathvista/3", "sco')  # the kill came mid-write
    monkeypatch.setattr(sample, "generate_replies", dies_after(10))
    with pytest.warns(UserWarning, match="dropping a torn last line"):
        evaluate.main([sft_checkpoint, *bench])
    replies = replies_of(tmp_path)
    assert calls == [4, 4] and replies[:4] == first and len({r["key"] for r in replies}) == len(replies) == total
    evaluate.main([sft_checkpoint, *bench])  # all done: nothing is generated
    assert calls == [4, 4] and json.load(open(tmp_path / "results.json"))["benchmarks"]["refcoco_val"]["items"] == 4
    with pytest.raises(SystemExit, match=r"other settings .*'max_new_tokens': \(24, 30\)"):
        evaluate.main([sft_checkpoint, *bench, "--max-new-tokens", "30"])


def test_a_missing_image_is_counted_not_fatal(sft_checkpoint, bench_dir, tmp_path, capsys):
    folder, _ = bench_dir
    rows = json.load(open(folder / "countbench.json"))
    rows[1]["image"] = "images/nowhere.png"
    (tmp_path / "countbench.json").write_text(json.dumps([{**r, "image": str(folder / r["image"])} for r in rows]))
    evaluate.main([sft_checkpoint, "--bench", str(tmp_path / "countbench.json"), "--out", str(tmp_path / "o"), *BENCH])
    result = json.load(open(tmp_path / "o" / "results.json"))["benchmarks"]["countbench"]
    assert (result["items"], result["skipped"]) == (1, 1) and "image not found" in result["skipped_examples"][0]
    assert len(replies_of(tmp_path / "o")) == 1 and "countbench: 1 skipped" in capsys.readouterr().out


def test_bench_synthetic_is_the_held_out_evaluation(evaluated, tmp_path):
    out, result = evaluated
    evaluate.main([str(out), "--bench", "synthetic", *EVAL, "--out", str(tmp_path)])
    bench = json.load(open(tmp_path / "results.json"))["benchmarks"]["synthetic"]
    assert {t: bench["categories"][t]["score"] for t in ("choice", "counting")} == {
        t: pytest.approx(result[t]) for t in ("choice", "counting")}
    held_out = [json.loads(line) for line in open(out / "eval_replies.jsonl")]
    assert [(r["key"], r["reply"]) for r in replies_of(tmp_path)] == [(r["key"], r["reply"]) for r in held_out]


def test_verifier_adds_a_task_from_a_user_module(sft_checkpoint, bench_dir, tmp_path, user_module):
    folder, _ = bench_dir
    lines = [json.loads(line) for line in open(folder / "generic.jsonl")][:2]  # counting items
    (tmp_path / "parity.jsonl").write_text("".join(json.dumps({**r, "task": "parity", "images": [
        str(folder / r["images"][0])]}) + "\n" for r in lines))
    bench = [sft_checkpoint, "--bench", str(tmp_path / "parity.jsonl"), "--out", str(tmp_path / "o"), *BENCH]
    with pytest.raises(SystemExit, match="unknown task parity; tasks: math, choice.*--verifier NAME=module:function"):
        evaluate.main(bench)
    evaluate.main([*bench, "--verifier", user_module])
    result = json.load(open(tmp_path / "o" / "results.json"))
    assert list(result["tasks"]) == ["parity"] and result["tasks"]["parity"]["items"] == 2
    for r in replies_of(tmp_path / "o"):  # the user function saw the box content (a non-number: it raised, 0)
        box = data.parse_reply(r["reply"])[0]
        assert r["score"] == float(box is not None and box.strip().isdigit() and int(box) % 2 == int(r["answer"]) % 2)
    assert rewards.score("parity", data.format_reply("7"), 3) == 1.0 and rewards.score("parity", "7", 3) == 0.0
