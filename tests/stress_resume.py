"""Kill a tiny training run with SIGKILL at random moments — mid-step, mid-save, mid-export — and resume it, again
and again; at the end its per-step losses must equal those of a run that was never interrupted. Too slow for the
suite (minutes): tests/test_reliability.py has the fast cases.

    python tests/stress_resume.py [--kills 20] [--steps 12] [--seed 0]
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--tiny", "--seq-len", "256", "--global-batch", "4", "--save-every", "2", "--save-minutes", "0"]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def launch(out, steps, resume):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "pretrain.py", *FLAGS, "--max-steps", str(steps), "--out", out,
                             *(["--resume"] if resume else [])], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="how many times to SIGKILL the run")
    p.add_argument("--steps", type=int, default=12, help="training steps of the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    args = p.parse_args()
    rng, root = random.Random(args.seed), tempfile.mkdtemp(prefix="stress_resume_")
    straight, killed = os.path.join(root, "straight"), os.path.join(root, "killed")
    start = time.time()
    assert launch(straight, args.steps, False).wait() == 0, "the uninterrupted run failed"
    per_run = (time.time() - start) / args.steps
    kills = 0
    while True:
        proc = launch(killed, args.steps, resume=os.path.isdir(killed))
        if kills < args.kills:
            try:
                proc.wait(timeout=rng.uniform(2, 2 + 4 * per_run))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                logged = len(losses(killed)) if os.path.exists(os.path.join(killed, "metrics.jsonl")) else 0
                print(f"kill {kills}: {logged} steps logged", flush=True)
                continue
        code = proc.wait()
        assert code == 0, proc.stderr.read()[-3000:]
        break
    a, b = losses(straight), losses(killed)
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert len(a) == len(b) == args.steps and worst <= 1e-4, (a, b)
    print(f"{kills} kills, resumed to the end: {args.steps} losses equal to the uninterrupted run's (worst relative "
          f"difference {worst:.1e})")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
