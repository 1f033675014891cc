"""evaluate.py: the held-out record and its replies, sampled and level-subset records, the same record from two
processes, --compare's table and its refusals, --plot's charts. The RL run they read is conftest.py's."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

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
