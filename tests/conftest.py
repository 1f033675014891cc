import os
import sys

import pytest
import torch

# Tests import the flat project files (model.py, data.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU the Triton kernels run in Triton's interpreter, which must be on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, which only spin against whatever else shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok():
    """The tiny preset's byte-level tokenizer."""
    import data

    return data.tiny_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# The micro policy and the runs that several test files share (rlcs.py's and evaluate.py's tests)
# ---------------------------------------------------------------------------------------------------------------

def _micro_config():
    import dataclasses

    import model as M

    # a smaller tiny: ~0.6M parameters, so that SFT + RL fit in a test on a shared CPU
    return dataclasses.replace(M.PRESETS["tiny"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, vision_depth=1, vision_hidden_size=64,
                               vision_num_heads=1, vision_intermediate_size=128, out_hidden_size=128)


MICRO = _micro_config()


def micro_checkpoint(path, seed=0):
    import data
    import model as M

    torch.manual_seed(seed)
    M.GLM4V(MICRO).init_weights().save_pretrained(path)
    data.tiny_tokenizer().save(path)
    return str(path)


def metrics(out):
    import json

    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rl_config(out, init_from, *flags):
    import rlcs

    base = ["--init-from", str(init_from), "--out", str(out), "--tasks", "choice", "--levels", "2", "--pool-size",
            "64", "--groups-per-step", "4", "--group-size", "4", "--max-new-tokens", "40", "--think-budget", "32",
            "--save-every", "0"]
    return rlcs.config_from_args(rlcs.build_parser().parse_args([*base, *flags]))


class Stop(Exception):
    """The process "dies" right after a checkpoint (see stop_after_first_save)."""


def stop_after_first_save(monkeypatch, train, config):
    """train(config) until its first training checkpoint is written, then stop as if killed; the real
    pretrain.save_training_state is put back, ready for a --resume."""
    import pretrain

    save = pretrain.save_training_state

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(pretrain, "save_training_state", save_then_stop)
    with pytest.raises(Stop):
        train(config)
    monkeypatch.setattr(pretrain, "save_training_state", save)


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """A short SFT run from scratch on one easy domain (multiple choice, level 2: "What shape is this? A. … B. …").
    80 steps teach the reply format well enough that greedy replies are well formed, while at temperature 1 most
    are not — the room RL has to improve the mean reward of its own samples."""
    import pretrain
    import world

    root = tmp_path_factory.mktemp("sft")
    jsonl = world.export_world(root / "world", tasks=("choice",), n=256, kind="sft", split="train", level=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = pretrain.build_parser(pretrain.TrainConfig, "sft").parse_args([
            "--stage", "sft", "--init-from", micro_checkpoint(root / "init"), "--data", jsonl, "--seq-len", "192",
            "--global-batch", "8", "--max-steps", "80", "--lr", "3e-3", "--no-think-share", "0",
            "--out", str(root / "sft")])
        pretrain.train(pretrain.config_from_args(args))
    finally:
        torch.set_num_threads(threads)
    return str(root / "sft")


RL_RUN_FLAGS = ["--tasks", "choice", "--levels", "1,2", "--pool-size", "4", "--max-new-tokens", "40",
                "--think-budget", "32"]


@pytest.fixture(scope="session")
def rl_run(sft_checkpoint, tmp_path_factory):
    """The RL commands of the README at smoke size: --grade the SFT checkpoint's pool, then 3 iterations from it
    with that grade file and --eval-every 3. Returns (grade file, run directory, what --grade printed)."""
    import contextlib
    import io

    import rlcs

    root = tmp_path_factory.mktemp("rl")
    grades, out, printed = root / "difficulty.jsonl", root / "run", io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            rlcs.main(["--grade", "--init-from", sft_checkpoint, "--difficulty", str(grades), "--grade-k", "4",
                       *RL_RUN_FLAGS])
        rlcs.main(["--init-from", sft_checkpoint, "--difficulty", str(grades), "--out", str(out),
                   "--groups-per-step", "4", "--group-size", "4", "--max-steps", "3", "--eval-every", "3",
                   "--eval-n", "2", "--curriculum", "uniform", *RL_RUN_FLAGS])
    finally:
        torch.set_num_threads(threads)
    return grades, out, printed.getvalue()


USER_VERIFIER = '''
def parity(box, answer):
    """1 when the boxed number has the parity of the truth (answer: the ground truth as text)."""
    return float(int(box) % 2 == int(answer) % 2)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's verifier module on sys.path; returns its --verifier flag value. What a test adds to
    rewards.VERIFIERS is gone after it."""
    import rewards

    (tmp_path / "myverifiers.py").write_text(USER_VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(rewards, "VERIFIERS", dict(rewards.VERIFIERS))
    rewards.parse_truth.cache_clear()
    return "parity=myverifiers:parity"


@pytest.fixture
def generate_prompts(monkeypatch):
    """The prompt ids (row 0) of every sample.generate_stream call the test makes; the real function still runs."""
    import sample

    prompts = []
    real = sample.generate_stream

    def spy(model, input_ids, *args, **kwargs):
        prompts.append(input_ids[0].tolist())
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(sample, "generate_stream", spy)
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# The verifiers' tests (test_rewards.py, test_verifier_holes.py)
# ---------------------------------------------------------------------------------------------------------------

def cpu_seconds(fn):
    """Best of three CPU times of fn(), with the verifier caches emptied so that every run does the full work."""
    import time

    import rewards

    best = float("inf")
    for _ in range(3):
        rewards.math_readings.cache_clear()
        rewards.parse_truth.cache_clear()
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


@pytest.fixture
def verifier_safety_net():
    """The catch-all in rewards.score() hides bugs from RL; in the tests it must never fire."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"rewards: .* verifier failed")
        yield


@pytest.fixture
def no_code_runs(monkeypatch):
    """eval, exec and SymPy's parsers refuse to run while the test scores model text; afterwards none was called."""
    import builtins

    import sympy
    import sympy.parsing.sympy_parser

    called = []

    def trap(name):
        def refuse(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} called on model text")
        return refuse

    for owner, name in ((builtins, "eval"), (builtins, "exec"), (sympy, "sympify"),
                        (sympy.parsing.sympy_parser, "parse_expr")):
        monkeypatch.setattr(owner, name, trap(name))
    yield
    assert not called
