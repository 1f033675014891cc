"""The trainer (pretrain.py / sft.py): loss falls, 1 vs 2 processes, exact resume, crash-safe checkpoints, export."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import world
import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--tiny", "--seq-len", "256", "--global-batch", "4"]


def config(out, *flags):
    return pretrain.config_from_args(pretrain.build_parser(pretrain.TrainConfig, "test").parse_args([*SMALL, "--out", str(out), *flags]))


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def run(*args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_tiny_loss_falls(tmp_path):
    pretrain.train(config(tmp_path, "--max-steps", "25", "--lr", "3e-3"))
    curve = losses(tmp_path)
    assert len(curve) == 25
    assert sum(curve[-5:]) / 5 < 0.7 * curve[0], curve


def test_two_processes_match_one(tmp_path):
    """FSDP2 over gloo with 2 processes: the same per-step losses and the same weights (i.e. the same gradients)."""
    flags = [*SMALL, "--max-steps", "3"]
    run("pretrain.py", *flags, "--out", str(tmp_path / "one"))
    run("pretrain.py", *flags, "--out", str(tmp_path / "two"), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * abs(a), (one, two)
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-4, rtol=1e-4, msg=name)


class Stop(Exception):
    pass


def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    pretrain.train(config(tmp_path / "straight", "--max-steps", "6", "--save-every", "3"))
    save = pretrain.save_training_state

    def save_then_stop(*args, **kwargs):  # the process "dies" right after the step-3 checkpoint
        save(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(pretrain, "save_training_state", save_then_stop)
    with pytest.raises(Stop):
        pretrain.train(config(tmp_path / "resumed", "--max-steps", "6", "--save-every", "3"))
    monkeypatch.setattr(pretrain, "save_training_state", save)
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrite a run
        pretrain.train(config(tmp_path / "resumed", "--max-steps", "6", "--save-every", "3"))
    pretrain.train(config(tmp_path / "resumed", "--max-steps", "6", "--save-every", "3", "--resume"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(resumed) == 6
    for a, b in zip(straight, resumed):
        assert abs(a - b) <= 1e-4 * abs(a), (straight, resumed)


KILL_DURING_SAVE = """
import os, sys
import torch.distributed.checkpoint as dcp
import pretrain
real_save = dcp.save
def save(state, checkpoint_id):
    if checkpoint_id.endswith("step_00000004.tmp"):
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"half a checkpoint")
        os._exit(137)  # what kill -9 does: no cleanup, no exception handlers
    return real_save(state, checkpoint_id=checkpoint_id)
dcp.save = save
pretrain.main(sys.argv[1:])
"""


def test_kill_during_checkpointing_leaves_the_previous_one(tmp_path):
    flags = [*SMALL, "--max-steps", "4", "--save-every", "2", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert pretrain.latest_checkpoint(str(tmp_path)).endswith("step_00000002")
    assert os.path.isdir(tmp_path / "checkpoints" / "step_00000004.tmp")  # the half-written one, never "latest"
    run("pretrain.py", *flags, "--resume")  # resumes from step 2 and finishes
    assert len(losses(tmp_path)) == 4
    assert pretrain.latest_checkpoint(str(tmp_path)).endswith("step_00000004")


def test_export_loads_everywhere_and_sft_trains_on_assistant_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    import model as M

    pretrain.train(config(tmp_path / "pre", "--max-steps", "2"))
    ref, info = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path / "pre", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = M.GLM4V.from_pretrained(tmp_path / "pre")
    assert torch.equal(ours.lm_head.weight, ref.lm_head.weight)
    assert data.load_tokenizer(tmp_path / "pre").encode("abc") == data.tiny_tokenizer().encode("abc")

    tc = config(tmp_path / "sft", "--stage", "sft", "--max-steps", "2", "--init-from", str(tmp_path / "pre"))
    tok = data.tiny_tokenizer()
    batch = data.PackedLoader(pretrain.data_source(tc), tok, tc.seq_len, 1).batch(0)[0]
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assistant = tok.token_to_id("<|assistant|>")
    ends = set(tok.eos_token_ids)
    for start, end in zip(batch["cu_seqlens"][:-1].tolist(), batch["cu_seqlens"][1:].tolist()):
        inside, expected = False, []
        for t in range(start, end):  # the loss covers what follows <|assistant|>\n up to and incl. the stop token
            expected.append(inside and ids[t - 1] != assistant)
            if ids[t] == assistant:
                inside = True
            elif inside and int(ids[t]) in ends:
                inside = False
        assert ((labels[start:end] != -100).tolist()) == expected
    pretrain.train(tc)
    assert len(losses(tmp_path / "sft")) == 2


def test_nan_guard_skips_then_stops(tmp_path, monkeypatch):
    step = pretrain.train_step

    def poisoned(model, optimizer, batches, *args, **kwargs):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return step(model, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(pretrain, "train_step", poisoned)
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        pretrain.train(config(tmp_path, "--max-steps", "10", "--max-bad-steps", "3"))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3]


def test_dry_run_plans_the_9b():
    out = run("pretrain.py", "--preset", "9b", "--dry-run", "--world-size", "64").stdout
    assert "10,292,777,472" in out and "GiB" in out


def test_pretraining_learns_to_use_the_images(tmp_path):
    """Captions of shapes and colours can only be predicted from the pixels: after a short run the held-out loss
    must be clearly worse with blank images (a collapsed ViT, as at too high a learning rate, gives no gap)."""
    import model as M

    pretrain.train(config(tmp_path, "--tasks", "choice", "--levels", "1", "--max-steps", "60", "--lr", "5e-4"))
    net = M.GLM4V.from_pretrained(tmp_path)
    source = world.SyntheticSource(kind="caption", split="heldout", tasks=("choice",), levels=(1,))
    batch = data.PackedLoader(source, data.tiny_tokenizer(), 256, 1).batch(0)[0]
    inputs = {k: batch[k] for k in pretrain.MODEL_INPUTS}
    n = (batch["labels"] != -100).sum()
    with torch.no_grad():
        real = -net(**inputs).sum() / n
        blank = -net(**{**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}).sum() / n
    assert blank - real > 0.3, (float(real), float(blank))


def test_vision_lr_ratio_scales_only_the_vit_and_projector():
    """--vision-lr-ratio: the ViT and projector groups follow the schedule × the ratio, the decoder the schedule;
    weight decay stays on matrices only; by default the whole model learns at one rate."""
    import model as M

    assert pretrain.resolve(pretrain.TrainConfig()).vision_lr_ratio == 1.0
    with pytest.raises(ValueError, match="vision-lr-ratio"):
        pretrain.resolve(pretrain.TrainConfig(vision_lr_ratio=0.0))
    net = M.GLM4V(M.PRESETS["tiny"]).init_weights()
    optimizer = pretrain.build_optimizer(net, pretrain.resolve(pretrain.TrainConfig(vision_lr_ratio=0.25)),
                                         torch.device("cpu"))
    pretrain.set_lr(optimizer, 1e-3)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in net.parameters())
    for name, p in net.named_parameters():
        group = group_of[id(p)]
        assert group["lr"] == pytest.approx(2.5e-4 if name.startswith("model.visual.") else 1e-3), name
        assert group["weight_decay"] == (0.1 if p.dim() >= 2 and "position_embedding" not in name else 0.0), name


def test_num_layers_builds_a_deeper_tiny_model(tmp_path):
    """--num-layers changes only the decoder depth of a model built from the preset; the export's config carries it,
    so a later stage (--init-from) trains the same depth; with --init-from it is refused."""
    import model as M

    pretrain.train(config(tmp_path / "deep", "--num-layers", "5", "--max-steps", "1"))
    cfg = M.Config.from_hf(tmp_path / "deep")
    assert cfg.num_hidden_layers == 5 and cfg.hidden_size == M.PRESETS["tiny"].hidden_size
    net = M.GLM4V.from_pretrained(tmp_path / "deep")
    assert len(net.model.language_model.layers) == 5
    tc = pretrain.resolve(pretrain.TrainConfig(init_from=str(tmp_path / "deep")))
    assert pretrain.initial_state(tc, 0)[0].num_hidden_layers == 5
    with pytest.raises(ValueError, match="--num-layers"):
        pretrain.resolve(pretrain.TrainConfig(init_from=str(tmp_path / "deep"), num_layers=5))
