"""Weight-only int8 (quantize.py): the round trip and its error bound, half the weight bytes of bf16, a trained
model's greedy replies and logits under int8, the int8 checkpoint, and --quantize in sample.py and evaluate.py."""
import contextlib
import io
import json

import pytest
import torch

import evaluate
import model as M
import quantize as Q
import sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_within_half_a_step_per_element(dtype):
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]).to(dtype)  # rows of any scale
    weight[3, 5] = 40.0  # an outlier stretches only its own row's step
    q, scales = Q.quantize_weight(weight)
    assert q.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (64,)
    assert int(q.abs().max()) <= 127 and (q.abs().amax(-1) >= 126).all()  # each row uses its whole range
    error = (weight.float() - q.float() * scales.float()[:, None]).abs()
    assert (error <= scales.float()[:, None] / 2 * (1 + 1e-6)).all()
    # the layer: its output is the dequantized weight's, within |x|·s/2 of the full-precision one per channel
    linear = torch.nn.Linear(96, 64, bias=True).to(dtype)
    linear.weight.data, linear.bias.data = weight, torch.randn(64, generator=g).to(dtype)
    model = torch.nn.Module()
    model.lm_head = linear
    int8 = Q.quantize_int8(model).lm_head
    assert isinstance(int8, Q.Int8Linear) and torch.equal(int8.weight, q)
    x = torch.randn(5, 96, generator=g)
    exact = torch.nn.functional.linear(x, weight.float(), linear.bias.float())
    got = int8(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, q.float() * scales.float()[:, None],
                                                               linear.bias.float()), atol=1e-4, rtol=1e-5)
    bound = x.abs().sum(-1, keepdim=True) * scales.float()[None] / 2
    assert ((got - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all()


def test_weight_memory_is_half_of_bf16():
    with torch.device("meta"):
        model = M.GLM4V(M.PRESETS["tiny"]).to(torch.bfloat16)
    bf16 = Q.weight_bytes(model)
    int8 = Q.weight_bytes(Q.quantize_int8(model))
    assert 0.5 < int8 / bf16 < 0.51  # the int8 matrices, plus one bf16 scale per output channel
    names = Q.quantized_names(model)
    assert "lm_head" in names and not any("visual" in n or "embed" in n for n in names)
    assert isinstance(model.model.visual.blocks[0].attn.qkv, torch.nn.Linear)  # the ViT stays as it is


@pytest.fixture(scope="module")
def int8_checkpoint(sft_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "int8"
    with contextlib.redirect_stdout(io.StringIO()):
        Q.main(["--checkpoint", sft_checkpoint, "--out", str(out), "--dtype", "float32"])
    return str(out)


def test_trained_model_keeps_its_greedy_replies_and_logits(sft_checkpoint):
    full, tok = sample.load(sft_checkpoint)
    int8, _ = sample.load(sft_checkpoint, quantize="int8")
    assert isinstance(int8.lm_head, Q.Int8Linear) and isinstance(int8.model.language_model.layers[0].mlp.down_proj,
                                                                 Q.Int8Linear)
    prompts = [it.prompt(tok) for it in evaluate.heldout_items(["choice"], 8, 0, [2])]
    replies = [sample.generate_replies(m, prompts, 1, 40, 32, tok.force_answer_ids, temperature=0.0)
               for m in (full, int8)]
    assert sum(a == b for a, b in zip(*replies)) >= 6  # measured: 8 of 8
    batch = sample.data.collate(prompts, full.cfg)
    with torch.no_grad():
        ref, got = (m(batch["input_ids"], attention_mask=batch["attention_mask"],
                      **{k: batch[k] for k in sample.data.VISION_KEYS}) for m in (full, int8))
    real = batch["attention_mask"].bool()
    assert (got - ref)[real].abs().max() < 0.01 * ref[real].abs().max()  # measured: 0.4%


def test_int8_checkpoint_loads_as_saved(int8_checkpoint, sft_checkpoint):
    with open(f"{int8_checkpoint}/config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == Q.QUANT_METHOD
    saved, _ = sample.load(int8_checkpoint)  # no flag needed
    on_load, _ = sample.load(sft_checkpoint, quantize="int8")
    assert isinstance(saved.lm_head, Q.Int8Linear)
    assert saved.state_dict().keys() == on_load.state_dict().keys()
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in on_load.state_dict().items())


def test_cli_quantize_flags(int8_checkpoint, sft_checkpoint, tmp_path):
    out = io.StringIO()
    sample.main(["--checkpoint", sft_checkpoint, "--quantize", "int8", "--prompt", "What is 2+2?",
                 "--max-new-tokens", "8"], out=out)
    assert out.getvalue().strip()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate.main([int8_checkpoint, "--tasks", "choice", "--n", "2", "--max-new-tokens", "40", "--quantize",
                       "int8"])
    assert 0 <= json.loads(printed.getvalue().strip().splitlines()[-1])["choice"] <= 1
    with pytest.raises(SystemExit):
        sample.parse_args(["--checkpoint", sft_checkpoint, "--quantize", "int4"])


def test_bench_rows_report_what_they_claim():
    """bench.py --only quantize at tiny sizes: the rows are there with their numbers (they say nothing of speed)."""
    import dataclasses

    import bench

    cfg = dataclasses.replace(M.PRESETS["tiny"], num_hidden_layers=1, eos_token_ids=())
    decode = bench.int8_decode_row("decode", cfg, torch.bfloat16, torch.device("cpu"), 1, 8, 4, 1, False)
    assert decode["units"] == "decode tokens/s" and decode["ratio"] == pytest.approx(decode["ours"] / decode["peer"],
                                                                                   rel=0.05, abs=0.01)
    assert 0.5 < decode["weight_ratio"] < 0.51 and decode["weight_mib_peer"] == pytest.approx(
        2 * decode["weight_mib_int8"], rel=0.02)
    agree, error = bench.int8_fidelity_rows(None, per_task=1, max_new_tokens=4)
    assert agree["peer"] == 8 and 0 <= agree["ours"] <= 8 and agree["units"] == "prompts"
    assert 0 < error["ours"] < error["peer"] and 0.5 < error["weight_ratio_vs_bf16"] < 0.51
