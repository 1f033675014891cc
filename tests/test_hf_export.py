"""Every export is a complete Hugging Face model directory: transformers loads the export of each stage (pretrain,
SFT, RL) with AutoTokenizer, AutoImageProcessor, GenerationConfig and Glm4vForConditionalGeneration; the exported
chat template (the released one) and data.render_chat give the same token ids on every kind of conversation; the
processor's apply_chat_template gives our prompt and pixels, transformers' greedy generate our tokens. A directory
in the released layout keeps its files through `sft.py --init-from`, trained on a ShareGPT .json array."""
import importlib
import json
import os
import runpy
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model as M
import pretrain
import sample as S
import world
from conftest import MICRO, metrics, micro_checkpoint

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json", "README.md"}
RELEASED_TEMPLATE = data.CHAT_TEMPLATE.replace(  # the released file, without our enable_thinking switch
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}", "")


def picture(w=140, h=90, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def processor(directory):
    """transformers' Glm4vProcessor on an export: AutoProcessor itself needs torchvision for its video part, which has
    no CPU build for torch 2.13 (README, "Hugging Face"); without it the image processor and tokenizer are loaded
    with their Auto classes and the class check (which looks the video processor up) is skipped."""
    try:
        importlib.import_module("torchvision")
        return transformers.AutoProcessor.from_pretrained(directory)
    except (ImportError, RuntimeError):
        pass
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    check, Glm4vProcessor.check_argument_for_proper_class = Glm4vProcessor.check_argument_for_proper_class, \
        lambda *a, **k: None
    try:
        return Glm4vProcessor(image_processor=transformers.AutoImageProcessor.from_pretrained(directory),
                              tokenizer=tok, video_processor=Glm4vVideoProcessor(), chat_template=tok.chat_template)
    finally:
        Glm4vProcessor.check_argument_for_proper_class = check


@pytest.fixture(scope="module")
def pretrain_export(tmp_path_factory):
    """Two pretraining steps of the micro model on captions."""
    root = tmp_path_factory.mktemp("pretrain")
    pretrain.train(pretrain.config_from_args(pretrain.build_parser(pretrain.TrainConfig, "").parse_args([
        "--init-from", micro_checkpoint(root / "init"), "--tasks", "choice", "--levels", "2", "--seq-len", "192",
        "--global-batch", "2", "--max-steps", "2", "--out", str(root / "run")])))
    return str(root / "run")


@pytest.fixture(params=["pretrain", "sft", "rl"])
def export(request):
    """The export of each stage: the pretraining run above, conftest's SFT checkpoint and RL run."""
    if request.param == "pretrain":
        return request.getfixturevalue("pretrain_export")
    if request.param == "sft":
        return request.getfixturevalue("sft_checkpoint")
    return str(request.getfixturevalue("rl_run")[1])


def test_every_stage_exports_what_transformers_loads(export, one_thread):
    assert EXPORT_FILES <= set(os.listdir(export))
    cfg = M.Config.from_hf(export)
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    assert tok.chat_template == data.CHAT_TEMPLATE and tok.model_max_length == cfg.max_position_embeddings
    batch = tok(["a", "longer text"], padding=True)
    assert batch["input_ids"][0][0] == cfg.pad_token_id and batch["attention_mask"][0][0] == 0
    generation = transformers.GenerationConfig.from_pretrained(export)
    assert generation.eos_token_id == list(cfg.eos_token_ids) and generation.pad_token_id == cfg.pad_token_id
    assert json.load(open(os.path.join(export, "config.json")))["dtype"] == "float32"
    assert "started from" in open(os.path.join(export, "README.md")).read()

    item = world.make_item("choice", 3, 0, "heldout", 2)  # a question like the SFT data's, so replies are real
    image = item.image
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": item.question}]}]
    ref = processor(export).apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True,
                                                return_tensors="pt")
    ours = data.render_chat(messages, data.load_tokenizer(export), images=[image])
    assert torch.equal(ref["input_ids"][0], ours["input_ids"])
    assert torch.equal(ref["pixel_values"], ours["pixel_values"])
    assert torch.equal(ref["image_grid_thw"], ours["image_grid_thw"])

    hf, info = transformers.Glm4vForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs = hf.eval().generate(**ref, max_new_tokens=16, do_sample=False)[0, ref["input_ids"].shape[1]:]
    model, _ = S.load(export)
    new = S.generate(model, ours["input_ids"][None], 16, pixel_values=ours["pixel_values"],
                     image_grid_thw=ours["image_grid_thw"])[0]
    assert new.tolist() == theirs.tolist() and len(new) > 0


def video_text(proc, video, n_frames):
    """What the processor puts in place of the template's `<|video|>`, for our sampled frames and their times."""
    from transformers.video_utils import VideoMetadata
    indices = data.sample_frame_indices(n_frames, data.VIDEO_FPS, data.VIDEO_FPS, n_frames / data.VIDEO_FPS)
    metadata = VideoMetadata(total_num_frames=n_frames, fps=data.VIDEO_FPS, frames_indices=indices)
    return proc.replace_video_token({"video_grid_thw": video.video_grid_thw, "video_metadata": [metadata]}, 0)


def test_template_and_render_chat_give_the_same_ids(sft_checkpoint, one_thread):
    """transformers' rendering of the exported template (images and videos expanded by its processor) is the oracle
    for text, images, a video with timestamps, a system turn, several turns, metadata and no-think. An earlier
    reply with reasoning appears in its history form (data.history_reply) in both."""
    proc, tok = processor(sft_checkpoint), data.load_tokenizer(sft_checkpoint)
    images = [picture(140, 90, 1), picture(60, 300, 2)]
    frames = [picture(84, 56, s) for s in range(6)]
    video = data.process_video(frames)
    reply = "<think>I look.</think><answer>A <|begin_of_box|>cat<|end_of_box|>.</answer>"
    image_then_text = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    cases = {  # name: (messages, images, videos, render_chat keywords)
        "text": ([{"role": "user", "content": "Hi there."}], [], [], {}),
        "images and system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "."}]}],
            images, [], {}),
        "video": ([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When?"}]}], [], [video],
                  {}),
        "multi-turn": ([{"role": "user", "content": image_then_text}, {"role": "assistant", "content": reply},
                        {"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": reply}],
                       images[:1], [], {}),
        "metadata": ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "metadata": "m"}],
                     [], [], {}),
        "no-think prompt": ([{"role": "user", "content": "Quick: 2+2?"}], [], [], {"thinking": False}),
        "no-think reply": ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content":
                            "<think></think><answer>4</answer>"}], [], [], {"thinking": False}),
    }
    for name, (messages, imgs, vids, kw) in cases.items():
        ours = data.render_chat(messages, tok, images=imgs, videos=vids, **kw)
        shown = [{**m, "content": data.history_reply(m["content"])}  # what a client sends of earlier replies
                 if m["role"] == "assistant" and k < len(messages) - 1 else m for k, m in enumerate(messages)]
        text = proc.tokenizer.apply_chat_template(shown, tokenize=False,
                                                  add_generation_prompt=messages[-1]["role"] != "assistant",
                                                  enable_thinking=kw.get("thinking", True))
        if messages[-1]["role"] == "assistant":
            text += "<|endoftext|>"  # our training render ends the last reply with its stop token
        if vids:  # the processor's video half needs torchvision: its prompt text, then the tokenizer
            ref = proc.tokenizer([text.replace("<|video|>", video_text(proc, video, len(frames)))])
        else:
            ref = proc(text=[text], images=imgs or None)
        assert ours["input_ids"].tolist() == ref["input_ids"][0], name
        if imgs:
            assert torch.equal(ours["pixel_values"], torch.as_tensor(ref["pixel_values"])), name
    multi = data.render_chat(cases["multi-turn"][0], tok, images=images[:1])
    learned = tok.decode(multi["input_ids"][multi["loss_mask"]])
    assert learned == reply + "<|endoftext|>"  # the earlier reply lost its reasoning: context, not a target


def released_layout(directory, tok):
    """A directory as zai-org/GLM-4.1V-9B-Thinking lays it out, written by transformers: a random micro Glm4v, a
    tokenizer.json with the released special tokens, tokenizer_config.json, the released chat_template.jinja,
    the processor configs and the released sampling defaults in generation_config.json."""
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    torch.manual_seed(0)
    transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig(**MICRO.to_hf())).save_pretrained(directory)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token="<|endoftext|>",
                                                  pad_token="<|endoftext|>", padding_side="left")
    hf_tok.chat_template = RELEASED_TEMPLATE
    hf_tok.save_pretrained(directory)
    Glm4vImageProcessorPil(size={"shortest_edge": 12544, "longest_edge": 9633792}).save_pretrained(directory)
    Glm4vVideoProcessor().save_pretrained(directory)
    transformers.GenerationConfig(do_sample=True, temperature=0.8, top_p=0.6, top_k=2, pad_token_id=MICRO.pad_token_id,
                                  eos_token_id=list(MICRO.eos_token_ids)).save_pretrained(directory)
    return {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)
            if name in EXPORT_FILES - {"config.json", "model.safetensors", "README.md"}}


def test_sft_from_the_released_layout_keeps_its_files_and_trains_on_sharegpt(tmp_path, tok, monkeypatch, one_thread):
    released = released_layout(tmp_path / "released", tok)
    assert set(released) == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                             "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json"}
    picture(112, 112).save(tmp_path / "cat.png")
    records = [{"conversations": [{"from": "human", "value": "<image>What is this?"},
                                  {"from": "gpt", "value": "<think>Fur, whiskers.</think><answer>A cat.</answer>"}],
                "system": "Answer briefly.", "images": ["cat.png"]},
               {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}]
    (tmp_path / "train.json").write_text(json.dumps(records, indent=2))
    logged = []  # --report-to wandb, with a stand-in for the wandb package
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(log=lambda row, step: logged.append(
        (step, row))))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(sys, "argv", ["sft.py", "--init-from", str(tmp_path / "released"), "--data",
                                      str(tmp_path / "train.json"), "--seq-len", "256", "--global-batch", "2",
                                      "--max-steps", "2", "--out", str(tmp_path / "out"), "--report-to", "wandb"])
    runpy.run_path(os.path.join(ROOT, "sft.py"), run_name="__main__")
    out = tmp_path / "out"
    for name, content in released.items():
        assert (out / name).read_bytes() == content, name
    rows = metrics(out)
    assert len(rows) == 2 and [step for step, _ in logged] == [1, 2]
    assert [row["loss"] for _, row in logged] == [r["loss"] for r in rows]
    card = (out / "README.md").read_text()
    assert str(tmp_path / "released") in card and "train.json" in card and "steps: 2 of 2" in card
    hf = transformers.Glm4vForConditionalGeneration.from_pretrained(out)
    assert torch.equal(hf.lm_head.weight, M.GLM4V.from_pretrained(out).lm_head.weight)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == RELEASED_TEMPLATE


def test_a_hub_id_is_answered_with_how_to_download_it():
    hub = "zai-org/GLM-4.1V-9B-Thinking"
    for load in (M.GLM4V.from_pretrained, S.load, data.load_tokenizer, M.Config.from_hf):
        with pytest.raises(FileNotFoundError, match=f"hf download {hub} --local-dir GLM-4.1V-9B-Thinking"):
            load(hub)


def test_report_to_tensorboard(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = pretrain.Metrics(str(tmp_path), 0, 0, "tensorboard")
    for step in (1, 2):
        log.write({"step": step, "loss": 1.0 / step, "mfu": None, "note": "text"})
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5)]


def test_report_to_is_checked_for_every_stage(tmp_path):
    import rlcs
    from conftest import rl_config
    assert rl_config(tmp_path, tmp_path, "--report-to", "tensorboard").report_to == "tensorboard"
    with pytest.raises(ValueError, match="--report-to must be tensorboard or wandb"):
        pretrain.resolve(pretrain.TrainConfig(report_to="mlflow"))
    with pytest.raises(ValueError, match="--report-to"):
        rlcs.resolve(rlcs.RLConfig(report_to="csv"))
