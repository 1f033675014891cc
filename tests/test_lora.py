"""LoRA (lora.py) in the trainer: only adapters train, step 0 is the base, merged and PEFT exports give the adapter
model's logits, resume is exact, FSDP2 over 2 processes matches 1."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
import model as M
import pretrain
import sample
from conftest import MICRO, micro_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 4


SFT_FLAGS = ["--stage", "sft", "--tasks", "choice", "--levels", "2", "--seq-len", "128", "--global-batch", "2",
             "--max-steps", "4", "--lr", "1e-2", "--lora-rank", str(RANK), "--activation-checkpointing"]


def sft_config(out, init_from, *flags):
    args = [*SFT_FLAGS, "--init-from", str(init_from), "--out", str(out), *flags]
    return pretrain.config_from_args(pretrain.build_parser(pretrain.TrainConfig, "test").parse_args(args))


def adapter_parameters(cfg: M.Config, rank: int) -> int:
    """r · (in + out) summed over q, k, v, o, gate_up and down of every decoder layer."""
    h, kv, inter = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, 2 * inter), (inter, h)]
    return cfg.num_hidden_layers * sum(rank * (i + o) for i, o in shapes)


def logits(m, ids):
    with torch.no_grad():
        return m(ids).float()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return micro_checkpoint(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def test_only_adapters_train_and_step_zero_is_the_base(base, ids, tmp_path, one_thread):
    run = sft_config(tmp_path, base)
    cfg, state, _ = pretrain.initial_state(run, 0)
    model = pretrain.build_model(run, cfg, state, torch.device("cpu"), 1)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(trainable.values()) == adapter_parameters(cfg, RANK)
    optimizer = pretrain.build_optimizer(model, run, torch.device("cpu"))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == adapter_parameters(cfg, RANK)
    assert torch.equal(logits(model, ids), logits(M.GLM4V.from_pretrained(base), ids))  # B = 0: exactly the base
    vision = lora.add_adapters(M.GLM4V(MICRO), RANK, 8.0, "q,o", vision=True)
    assert sorted({n.split(".", 4)[-1] for n in lora.lora_modules(vision)}) == \
        ["attn.proj", "attn.qkv", "self_attn.o_proj", "self_attn.q_proj"]
    with pytest.raises(ValueError, match="--lora-targets"):
        sft_config(tmp_path / "bad", base, "--lora-targets", "q,up")


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """A 4-step LoRA SFT run with checkpoints at steps 2 and 4, and the same run stopped after step 2 and resumed."""
    root = tmp_path_factory.mktemp("lora_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = pretrain.train(sft_config(root / "straight", base, "--save-every", "2"))
        save = pretrain.save_training_state

        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            raise Stop

        pretrain.save_training_state = save_then_stop
        try:
            with pytest.raises(Stop):
                pretrain.train(sft_config(root / "resumed", base, "--save-every", "2"))
        finally:
            pretrain.save_training_state = save
        pretrain.train(sft_config(root / "resumed", base, "--save-every", "2", "--resume"))
    finally:
        torch.set_num_threads(threads)
    return root, straight


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_checkpoints_hold_adapters_and_resume_is_exact(lora_run, base):
    import torch.distributed.checkpoint as dcp

    root, straight = lora_run
    saved = dcp.FileSystemReader(pretrain.latest_checkpoint(str(root / "straight"))).read_metadata()
    model_keys = [k for k in saved.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)
    assert len(model_keys) == 2 * len(lora.lora_modules(straight))
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg") for k in saved.state_dict_metadata)
    one, two = losses(root / "straight"), losses(root / "resumed")
    assert len(one) == len(two) == 4 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-6)
    # the base stayed frozen; the adapters moved
    frozen = load_file(os.path.join(base, "model.safetensors"))
    state = straight.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(state[f"{n}.lora_B.weight"].abs().sum() > 0 for n in lora.lora_modules(straight))


def test_merged_export_gives_the_adapter_models_logits(lora_run, ids):
    root, straight = lora_run
    merged = M.GLM4V.from_pretrained(root / "straight")  # the default export: plain full weights
    assert not lora.has_adapters(merged)
    torch.testing.assert_close(logits(merged, ids), logits(straight, ids), atol=1e-5, rtol=1e-5)
    resumed = M.GLM4V.from_pretrained(root / "resumed")
    torch.testing.assert_close(logits(resumed, ids), logits(straight, ids), atol=1e-5, rtol=1e-5)


def test_peft_loads_the_adapter_export(lora_run, base, ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root, straight = lora_run
    out = tmp_path / "adapter"
    os.makedirs(out)
    run = pretrain.TrainConfig(stage="sft", init_from=str(base), lora_rank=4, lora_export="peft")
    pretrain.export_hf(straight, straight.cfg, sample.data.tiny_tokenizer(), str(out), 0, run)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    reference = transformers.Glm4vForConditionalGeneration.from_pretrained(base)
    adapted = peft.PeftModel.from_pretrained(reference, str(out)).eval()
    loaded = {n for n, m in adapted.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(loaded) == len(lora.lora_modules(straight))
    expected = logits(straight, ids)
    with torch.no_grad():
        theirs = adapted(input_ids=ids).logits.float()
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)
    ours, _ = sample.load(str(out))  # our import: the base it names, the adapters merged in
    assert not lora.has_adapters(ours)
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-5)


def test_two_processes_fsdp2_match_one(lora_run, base, tmp_path):
    """LoRA under FSDP2 over gloo with activation checkpointing: the same losses and merged weights as 1 process."""
    root, _ = lora_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    result = subprocess.run([*launcher, "sft.py", *SFT_FLAGS, "--init-from", base, "--out", str(tmp_path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert losses(tmp_path) == pytest.approx(losses(root / "straight"), rel=1e-5)
    one, two = (load_file(d / "model.safetensors") for d in (root / "straight", tmp_path))
    assert one.keys() == two.keys() and not any(".lora_" in k for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-5, msg=name)


def test_rl_trains_adapters_and_rolls_out_with_merged_weights(sft_checkpoint, tmp_path, ids, one_thread):
    """rlcs.py with --lora-rank: one GRPO iteration moves only the adapters; the rollout / reference copy a
    multi-process or GPU run makes (rlcs.frozen_copy) holds the merged weights, so it generates as the policy."""
    import rlcs
    from conftest import rl_config

    policy = rlcs.train(rl_config(tmp_path, sft_checkpoint, "--lora-rank", str(RANK), "--max-steps", "1",
                                  "--lr", "1e-3"))
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["optimizer_steps"] > 0
    assert all(policy.get_parameter(f"{n}.lora_B.weight").abs().sum() > 0 for n in lora.lora_modules(policy))
    start = load_file(os.path.join(sft_checkpoint, "model.safetensors"))
    assert all(torch.equal(policy.get_parameter(k), v) for k, v in start.items())
    copy = rlcs.frozen_copy(policy, policy.cfg, torch.device("cpu"), torch.float32)
    assert not lora.has_adapters(copy)
    torch.testing.assert_close(logits(copy, ids), logits(policy, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(M.GLM4V.from_pretrained(tmp_path), ids), logits(policy, ids), atol=1e-5,
                               rtol=1e-5)


def test_peft_loads_vision_adapters_on_an_image_prompt(base, tmp_path, tok):
    """--lora-vision's adapters (the ViT's fused qkv, proj, gate/up/down) under PEFT's names: its logits on an image."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from PIL import Image

    import data
    from reference import mm_token_type_ids

    ours = lora.add_adapters(M.GLM4V.from_pretrained(base), RANK, 8.0, vision=True)
    torch.manual_seed(0)
    for m in lora.lora_modules(ours).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    lora.save_peft(ours, ours.state_dict(), str(tmp_path), base)
    theirs = peft.PeftModel.from_pretrained(transformers.Glm4vForConditionalGeneration.from_pretrained(base),
                                            str(tmp_path)).eval()
    assert sum(hasattr(m, "lora_A") and "default" in m.lora_A for m in theirs.modules()) == \
        len(lora.lora_modules(ours)) == MICRO.num_hidden_layers * 6 + MICRO.vision_depth * 5
    image = data.process_image(Image.new("RGB", (56, 56), (200, 30, 30)))
    prompt = data.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                              tok, images=[image])
    batch = data.collate([prompt], MICRO)
    vision = {k: batch[k] for k in data.VISION_KEYS}
    with torch.no_grad():
        expected = ours(batch["input_ids"], attention_mask=batch["attention_mask"], **vision)
        got = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     mm_token_type_ids=mm_token_type_ids(MICRO, batch["input_ids"]), **vision).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
