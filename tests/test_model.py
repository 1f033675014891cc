"""model.py / vision.py / rope2d.py against the `transformers` reference, checkpoint I/O, and input checks."""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import rope2d
import reference as R

transformers = pytest.importorskip("transformers")

# Several small configs that differ in every dimension parity could hide behind.
CONFIGS = {
    "tiny": M.PRESETS["tiny"],
    "gqa4_hd32": M.Config(vocab_size=300, hidden_size=128, intermediate_size=200, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, mrope_section=(2, 3, 3),
                          vision_depth=2, vision_hidden_size=64, vision_num_heads=2, vision_intermediate_size=96,
                          out_hidden_size=128, image_size=56, **{k: getattr(M.PRESETS["tiny"], k) for k in (
                              "image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                              "video_start_token_id", "video_end_token_id", "eos_token_ids", "pad_token_id")}),
    "mha_hd48_full_rotary": M.Config(vocab_size=290, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=2, partial_rotary_factor=1.0,
                                     mrope_section=(4, 10, 10), rope_theta=500.0, vision_depth=1,
                                     vision_hidden_size=80, vision_num_heads=2, vision_intermediate_size=64,
                                     out_hidden_size=96, image_size=84, vision_rope_theta=1000.0,
                                     **{k: getattr(M.PRESETS["tiny"], k) for k in (
                                         "image_token_id", "video_token_id", "image_start_token_id",
                                         "image_end_token_id", "video_start_token_id", "video_end_token_id",
                                         "eos_token_ids", "pad_token_id")}),
}


def text(s):
    return list(s.encode())


def pair(name, seed=0):
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    ours = R.random_weights_(M.GLM4V(cfg).eval(), seed)
    return cfg, ours, R.hf_model(cfg, ours)


def assert_close_logits(ours, ref, mask=None):
    if mask is not None:
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max |Δlogit| {err:.3g} at logit scale {scale:.3g}"


def run_both(cfg, ours, ref, input_ids, attention_mask=None, **vision):
    with torch.no_grad():
        a = ours(input_ids, attention_mask=attention_mask, **vision)
        b = ref(input_ids=input_ids, attention_mask=attention_mask,
                mm_token_type_ids=R.mm_token_type_ids(cfg, input_ids), **vision).logits
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# Logit parity, fp32
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_text_and_one_image(name):
    cfg, ours, ref = pair(name)
    ids = torch.tensor([text("The quick brown fox jumps over the lazy dog.")])
    assert_close_logits(*run_both(cfg, ours, ref, ids))
    grid = torch.tensor([[1, 6, 10]])
    ids = torch.tensor([text("Look: ") + R.image_tokens(cfg, 1, 6, 10) + text(" what is it?")])
    assert_close_logits(*run_both(cfg, ours, ref, ids, pixel_values=R.patches(cfg, grid), image_grid_thw=grid))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_images_with_extreme_aspect_ratios(name):
    cfg, ours, ref = pair(name, seed=1)
    grid = torch.tensor([[1, 2, 100], [1, 100, 2], [1, 8, 8]])  # 1:50, 50:1 and a square
    ids = [text("a ")]
    for t, h, w in grid.tolist():
        ids.append(R.image_tokens(cfg, t, h, w) + text(" and "))
    ids = torch.tensor([sum(ids, [])])
    assert_close_logits(*run_both(cfg, ours, ref, ids, pixel_values=R.patches(cfg, grid, 1), image_grid_thw=grid))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_video_with_timestamps(name):
    cfg, ours, ref = pair(name, seed=2)
    grid = torch.tensor([[3, 4, 6]])  # three frame pairs, each its own "image" followed by its timestamp
    ids = torch.tensor([text("Clip: ") + R.video_tokens(cfg, 3, 4, 6, [0, 2, 14], text) + text(" when?")])
    assert_close_logits(*run_both(cfg, ours, ref, ids, pixel_values_videos=R.patches(cfg, grid, 2),
                                  video_grid_thw=grid))


@pytest.mark.parametrize("side", ["left", "right"])
def test_parity_padded_batch(side):
    cfg, ours, ref = pair("tiny", seed=3)
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    rows = [text("short ") + R.image_tokens(cfg, 1, 4, 4),
            text("a much longer first prompt ") + R.image_tokens(cfg, 1, 2, 6) + text(" ok"),
            text("text only row")]
    T = max(map(len, rows))
    pad = [[cfg.pad_token_id] * (T - len(r)) for r in rows]
    ids = torch.tensor([p + r if side == "left" else r + p for r, p in zip(rows, pad)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
                         for r, p in zip(rows, pad)])
    a, b = run_both(cfg, ours, ref, ids, mask, pixel_values=R.patches(cfg, grid, 3), image_grid_thw=grid)
    assert_close_logits(a, b, mask)
    assert (a[~mask.bool()] == 0).all()


def test_packed_samples_match_separate_forwards():
    """Two samples packed into one row with cu_seqlens give the logits of two separate forwards."""
    cfg, ours, _ = pair("tiny", seed=4)
    grid = torch.tensor([[1, 4, 4]])
    s1 = torch.tensor([text("first ") + R.image_tokens(cfg, 1, 4, 4)])
    s2 = torch.tensor([text("second sample")])
    pv = R.patches(cfg, grid, 4)
    pos1, _ = rope2d.get_rope_index(s1, grid, **cfg.rope_index_kwargs())
    pos2, _ = rope2d.get_rope_index(s2, **cfg.rope_index_kwargs())
    packed = torch.cat([s1, s2], 1)
    cu = torch.tensor([0, s1.shape[1], packed.shape[1]], dtype=torch.int32)
    with torch.no_grad():
        together = ours(packed, pixel_values=pv, image_grid_thw=grid, position_ids=torch.cat([pos1, pos2], -1),
                        cu_seqlens=cu)
        apart = torch.cat([ours(s1, pixel_values=pv, image_grid_thw=grid), ours(s2)], 1)
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)


def test_cached_prefill_and_decode_match_full_forward():
    """The static-KV-cache path (prefill a left-padded batch, then decode) equals one full forward."""
    cfg, ours, _ = pair("tiny", seed=5)
    grid = torch.tensor([[1, 4, 4]])
    rows = [text("hi ") + R.image_tokens(cfg, 1, 4, 4) + text(" go"), text("a text prompt that is long")]
    T = max(map(len, rows))
    ids = torch.tensor([[cfg.pad_token_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    new = torch.randint(0, 256, (2, 3))
    pv = R.patches(cfg, grid, 5)
    with torch.no_grad():
        full = ours(torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1), pixel_values=pv,
                    image_grid_thw=grid)
        pos, deltas = rope2d.get_rope_index(ids, grid, attention_mask=mask, **cfg.rope_index_kwargs())
        ours.setup_caches(2, T + 8)
        x = ours.embed(ids, pv, grid)
        logits = [ours.forward_cached(x, pos, torch.arange(T), mask.bool())[:, -1]]
        for k in range(3):
            step_pos = (mask.sum(-1, keepdim=True) + k + deltas)[None].expand(3, 2, 1)
            x = ours.embed(new[:, k:k + 1])
            logits.append(ours.forward_cached(x, step_pos, torch.tensor([T + k]))[:, -1])
    torch.testing.assert_close(torch.stack(logits, 1), full[:, T - 1:T + 3], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Positions (rope2d) spelled out by hand
# ---------------------------------------------------------------------------------------------------------------


def test_position_ids_by_hand():
    cfg = M.PRESETS["tiny"]
    # 2 text tokens, a 2×3 merged image (grid 4×6), 1 text token
    ids = torch.tensor([text("ab") + [cfg.image_token_id] * 6 + text("c")])
    pos, delta = rope2d.get_rope_index(ids, torch.tensor([[1, 4, 6]]), **cfg.rope_index_kwargs())
    expected = torch.tensor([[0, 1, 2, 2, 2, 2, 2, 2, 5],
                             [0, 1, 2, 2, 2, 3, 3, 3, 5],
                             [0, 1, 2, 3, 4, 2, 3, 4, 5]])
    assert torch.equal(pos[:, 0], expected)
    assert delta.item() == 6 - 9  # next token at 9 + delta = 6 = max + 1


def test_vision_patch_coords_follow_merge_windows():
    coords = rope2d.vision_patch_coords(torch.tensor([[1, 2, 4]]), 2)
    assert coords.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]


# ---------------------------------------------------------------------------------------------------------------
# The released architecture and config.json
# ---------------------------------------------------------------------------------------------------------------


def test_9b_on_meta_has_the_released_tensors():
    with torch.device("meta"):
        m = M.GLM4V(M.PRESETS["9b"])
    sd = m.state_dict()
    assert len(sd) == 704
    assert sum(t.numel() for t in sd.values()) == 10_292_777_472
    with torch.device("meta"):
        ref = transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig(**M.PRESETS["9b"].to_hf()))
    assert {n: tuple(t.shape) for n, t in sd.items()} == {n: tuple(t.shape) for n, t in ref.state_dict().items()}


RELEASED_CONFIG = {  # the layout of the released GLM-4.1V-9B-Thinking config.json
    "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "attention_bias": True,
    "attention_dropout": 0.0, "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338],
    "image_start_token_id": 151339, "image_end_token_id": 151340, "video_start_token_id": 151341,
    "video_end_token_id": 151342, "image_token_id": 151343, "video_token_id": 151344, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 65536,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 151552,
    "partial_rotary_factor": 0.5,
    "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
    "vision_config": {"hidden_size": 1536, "depth": 24, "num_heads": 12, "attention_bias": False,
                      "intermediate_size": 13696, "hidden_act": "silu", "hidden_dropout_prob": 0.0,
                      "initializer_range": 0.02, "image_size": 336, "patch_size": 14, "out_hidden_size": 4096,
                      "rms_norm_eps": 1e-05, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def test_config_round_trips():
    assert M.Config.from_hf(RELEASED_CONFIG) == M.PRESETS["9b"]
    for cfg in CONFIGS.values():
        assert M.Config.from_hf(cfg.to_hf()) == cfg
        # and through the reference's own parsing and re-serialisation
        assert M.Config.from_hf(transformers.Glm4vConfig(**cfg.to_hf()).to_dict()) == cfg


def test_invalid_config_is_explained():
    with pytest.raises(ValueError, match="mrope_section"):
        M.Config(mrope_section=(8, 8, 8))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        M.Config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="glm4v"):
        M.Config.from_hf({"model_type": "llama"})


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint I/O
# ---------------------------------------------------------------------------------------------------------------


def test_save_then_reference_load(tmp_path):
    cfg, ours, _ = pair("gqa4_hd32", seed=6)
    ours.save_pretrained(tmp_path)
    ref, info = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref_sd = ref.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(ref_sd[name], t), name


def test_reference_save_then_our_load(tmp_path):
    cfg, _, ref = pair("mha_hd48_full_rotary", seed=7)
    ref.save_pretrained(tmp_path)
    ours = M.GLM4V.from_pretrained(tmp_path)
    assert ours.cfg == cfg
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([text("x ") + R.image_tokens(cfg, 1, 4, 4) + text(" y")])
    assert_close_logits(*run_both(cfg, ours, ref, ids, pixel_values=R.patches(cfg, grid), image_grid_thw=grid))


def test_sharded_checkpoint_round_trip(tmp_path):
    cfg, ours, _ = pair("tiny", seed=8)
    ours.save_pretrained(tmp_path, max_shard_bytes=4 * 1024 ** 2)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    loaded = M.GLM4V.from_pretrained(tmp_path)
    for name, t in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    ref = transformers.Glm4vForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(ref.lm_head.weight, ours.lm_head.weight)


def test_load_in_bfloat16(tmp_path):
    cfg, ours, _ = pair("tiny", seed=9)
    ours.save_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = M.GLM4V.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert M.GLM4V.from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32
    logits = loaded(torch.tensor([text("bf16 works")]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    cfg, ours, _ = pair("tiny", seed=10)
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.language_model.layers.0.mlp.down_proj.weight"]
    tensors["model.language_model.layers.9.extra.weight"] = torch.zeros(2)
    tensors["lm_head.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as err:
        M.GLM4V.from_pretrained(tmp_path)
    message = str(err.value)
    assert "layers.0.mlp.down_proj.weight" in message and "layers.9.extra.weight" in message
    assert "lm_head.weight: checkpoint (3, 3)" in message


def test_missing_checkpoint_files(tmp_path):
    M.PRESETS["tiny"].to_hf()
    with open(tmp_path / "config.json", "w") as f:
        json.dump(M.PRESETS["tiny"].to_hf(), f)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickled"):
        M.GLM4V.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        M.GLM4V.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs get clear errors
# ---------------------------------------------------------------------------------------------------------------


def test_bad_vision_inputs_are_explained():
    cfg = M.PRESETS["tiny"]
    m = M.GLM4V(cfg).eval()
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([text("x ") + R.image_tokens(cfg, 1, 4, 4)])
    with pytest.raises(ValueError, match="do not match"):  # one placeholder too many
        m(torch.cat([ids, torch.tensor([[cfg.image_token_id]])], 1), pixel_values=R.patches(cfg, grid),
          image_grid_thw=grid)
    with pytest.raises(ValueError, match="patches but the grids"):
        m(ids, pixel_values=R.patches(cfg, grid)[:-1], image_grid_thw=grid)
    with pytest.raises(ValueError, match="divisible by the merge size"):
        m(ids, pixel_values=R.patches(cfg, [[1, 3, 4]]), image_grid_thw=torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match="were not given"):
        m(ids)
    with pytest.raises(ValueError, match=r"pixel_values must be \(num_patches, 1176\)"):
        m(ids, pixel_values=torch.zeros(16, 100), image_grid_thw=grid)


# ---------------------------------------------------------------------------------------------------------------
# Training-side outputs: label log-probs and activation checkpointing
# ---------------------------------------------------------------------------------------------------------------


def reference_logprobs(logits, labels, mask=None):
    """log_softmax of the previous position's logits at each label; 0 where labels == -100 or no previous token."""
    out = torch.zeros(labels.shape)
    logp = logits.log_softmax(-1)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100 and (mask is None or (mask[b, t - 1] and mask[b, t])):
                out[b, t] = logp[b, t - 1, labels[b, t]]
    return out


def test_label_logprobs_match_logits_padded_and_packed(monkeypatch):
    cfg, ours, _ = pair("tiny", seed=11)
    monkeypatch.setattr(M, "token_logprobs", functools.partial(M.token_logprobs, chunk_size=3))  # many chunks
    rows = [text("left padded row"), text("a longer row with more text in it")]
    T = max(map(len, rows))
    ids = torch.tensor([[cfg.pad_token_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :5] = -100
    with torch.no_grad():
        logits = ours(ids, mask)
        lp = ours(ids, mask, labels=labels)
    torch.testing.assert_close(lp, reference_logprobs(logits, labels, mask), atol=1e-5, rtol=1e-5)
    # packed: the first token of the second sample must not be predicted from the first sample
    packed = torch.tensor([text("first") + text("second")])
    cu = torch.tensor([0, 5, 11], dtype=torch.int32)
    pos = torch.cat([torch.arange(5), torch.arange(6)]).expand(3, 1, -1)
    with torch.no_grad():
        lp = ours(packed, position_ids=pos, cu_seqlens=cu, labels=packed)
        first = ours(packed[:, :5], labels=packed[:, :5])
        second = ours(packed[:, 5:], labels=packed[:, 5:])
    torch.testing.assert_close(lp, torch.cat([first, second], 1), atol=1e-5, rtol=1e-5)
    assert lp[0, 5] == 0 and lp[0, 0] == 0


def test_activation_checkpointing_gives_the_same_gradients():
    cfg, ours, _ = pair("tiny", seed=12)
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.tensor([text("grad ") + R.image_tokens(cfg, 1, 4, 4) + text(" check")])
    pv = R.patches(cfg, grid)

    def grads():
        ours.zero_grad()
        (-ours(ids, pixel_values=pv, image_grid_thw=grid, labels=ids).sum()).backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    for module in ours.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = True
    recomputed = grads()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


NO_TRITON_SCRIPT = """
import os, sys
sys.modules["triton"] = None  # `import triton` now raises ImportError, as on a Mac
import torch
import kernels, model as M, sample
assert not kernels.HAS_TRITON
torch.manual_seed(0)
m = M.GLM4V(M.PRESETS["tiny"]).init_weights()
ids = torch.randint(0, 256, (2, 16))
logprobs = m(ids, labels=ids)
(-logprobs.sum()).backward()
assert all(p.grad is not None for p in m.model.language_model.parameters())
with torch.no_grad():
    assert sample.generate(m.eval(), ids[:1], 4).shape[1] >= 1
os.environ["GLM4V_KERNELS"] = "triton"
try:
    kernels.use_triton(ids)
except ValueError as e:
    print("error:", e)
"""


def test_the_model_trains_and_decodes_without_triton():
    """Triton has no macOS or Windows wheels: without it the model must still import, take gradients and decode
    on the torch paths, and asking for the Triton kernels must name what is missing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("GLM4V_KERNELS", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "the triton package is not installed" in result.stdout
