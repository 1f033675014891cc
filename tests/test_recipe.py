"""The README's "Reproduce the paper in miniature" recipe, every command of it, with a handful of steps per stage: the
pipeline pretrain → SFT → grade → RLCS → eval → compare cannot silently break, and the README cannot drift from the
flags the scripts take."""
import os
import re
import runpy
import shlex
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION = "## Reproduce the paper in miniature"
# appended to each command (argparse: the last value of a flag wins), so every stage does a few steps of its work
SMOKE = {
    "pretrain.py": ["--max-steps", "2", "--seq-len", "256", "--global-batch", "2"],
    "sft.py": ["--max-steps", "2", "--seq-len", "256", "--global-batch", "2"],
    "rlcs.py": ["--max-steps", "2", "--pool-size", "2", "--levels", "1", "--grade-k", "2", "--group-size", "2",
                "--groups-per-step", "2", "--max-new-tokens", "24", "--eval-n", "1", "--eval-every", "1"],
    "evaluate.py": ["--n", "1", "--levels", "1", "--max-new-tokens", "24"],
    "world.py": ["--n", "2"],
}


def recipe_commands():
    """The `python ...` lines of the section's code blocks, comments dropped, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("python "):
                commands.append(shlex.split(line))
    return commands


def test_the_readme_recipe_runs_end_to_end(tmp_path, monkeypatch):
    commands = recipe_commands()
    scripts = [c[1] for c in commands]
    for stage in ("pretrain.py", "sft.py", "rlcs.py"):
        assert stage in scripts, f"the recipe has no {stage} step"
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for command in commands:  # each as `python script.py ...` would run it, in this process (no import per step)
            # every path the recipe writes (runs/…, docs/…) goes under tmp_path instead
            args = [re.sub(r"(^|,)(runs|docs)/", lambda m: f"{m.group(1)}{tmp_path}/{m.group(2)}/", a)
                    for a in command[1:]]
            # --compare too: it reads the --eval records of the smoke flags' --levels
            extra = [] if "--plot" in args else SMOKE.get(args[0], [])
            monkeypatch.setattr(sys, "argv", [*args, *extra])
            try:
                runpy.run_path(os.path.join(ROOT, args[0]), run_name="__main__")
            except SystemExit as e:  # the scripts exit with "error: ..." on bad flags or files
                assert e.code in (None, 0), f"{shlex.join(command)}: {e.code}"
    finally:
        torch.set_num_threads(threads)
    outputs = [a for c in commands for a in c if a.startswith("docs/")]
    for out in outputs:  # --compare's charts and table
        assert os.path.exists(tmp_path / out / "table.md"), out
        assert os.path.exists(tmp_path / out / "heldout.png"), out
