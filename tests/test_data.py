"""data.py: processor parity with `transformers`, video layout, tokenizer, chat format and loss masks, datasets,
packing (boundaries, positions, no cross-sample attention, determinism across processes, resume), the quality
pipeline (tests/test_world.py has the synthetic world)."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import model as M
import quality as Q
import world as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
        return image if mode == "I;16" else image.convert("I")
    if mode == "F":
        return Image.fromarray(rng.random((h, w), dtype=np.float32) * 300)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P+transparency":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 3
        return image
    return rgba.convert(mode)


# ---------------------------------------------------------------------------------------------------------------
# Image processor: bit-for-bit parity with the reference (PIL backend)
# ---------------------------------------------------------------------------------------------------------------

SIZES = [(1, 1), (5, 300), (27, 27), (28, 28), (56, 56), (100, 37), (112, 112), (113, 251), (640, 480),
         (3000, 20), (1001, 999)]
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "1", "CMYK", "I;16", "I", "F", "YCbCr", "LAB", "HSV"]


@pytest.fixture(scope="module")
def ref_image_processor():
    pytest.importorskip("transformers")
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    return Glm4vImageProcessorPil()


def test_process_image_matches_reference_on_sizes_and_modes(ref_image_processor):
    cases = [(m, s) for m in ("RGB", "RGBA", "L", "P") for s in SIZES] + \
            [(m, s) for m in MODES[4:] for s in ((1, 1), (113, 251), (640, 480))]
    for mode, (w, h) in cases:
        image = rand_image(w, h, mode, seed=w * 7 + h)
        ref = ref_image_processor(images=[image], return_tensors="pt")
        pixels, grid = D.process_image(image)
        assert torch.equal(grid, ref["image_grid_thw"]), (mode, w, h)
        assert pixels.dtype == torch.float32 and torch.equal(pixels, ref["pixel_values"]), (mode, w, h)


def test_process_image_pixel_bounds_match_reference(ref_image_processor):
    image = rand_image(300, 200)
    for lo, hi in ((56 * 56, 28 * 28 * 40), (112 * 112 * 4, 28 * 28 * 15000), (28 * 28, 28 * 28 * 2)):
        ref = ref_image_processor(images=[image], size={"shortest_edge": lo, "longest_edge": hi}, return_tensors="pt")
        pixels, grid = D.process_image(image, min_pixels=lo, max_pixels=hi)
        assert torch.equal(grid, ref["image_grid_thw"]) and torch.equal(pixels, ref["pixel_values"])


def test_process_image_token_counts_and_errors(tmp_path):
    assert D.process_image(rand_image(112, 112))[1].tolist() == [[1, 8, 8]]  # 64 patches = 16 tokens
    assert D.process_image(rand_image(224, 224))[1].prod() // 4 == 64
    with pytest.raises(ValueError, match="aspect ratio"):
        D.process_image(rand_image(4020, 20))
    D.process_image(rand_image(2000, 20))  # 100:1 is fine
    with pytest.raises(FileNotFoundError, match="nope.png"):
        D.process_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="bad.png"):
        D.process_image(tmp_path / "bad.png")
    buf = io.BytesIO()
    rand_image(200, 200).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        D.process_image(tmp_path / "cut.png")
    with pytest.raises(TypeError):
        D.process_image(np.zeros((10, 10, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Video: sampling, resize targets, patch order, timestamps and the prompt layout against the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref_video_processor():
    pytest.importorskip("transformers")
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    return Glm4vVideoProcessor()


def test_frame_sampling_matches_reference(ref_video_processor):
    from transformers.video_utils import VideoMetadata
    cases = [(7, 2.0, 2.0), (30, 30.0, 2.0), (100, 24.0, 1.0), (9, 2.0, 2.0), (1, 2.0, 2.0), (700, 1.0, 2.0),
             (20000, 30.0, 2.0), (61, 29.97, 2.0), (45, 10.0, 3.0)]
    for total, src, fps in cases:
        for duration in (None, total / src):
            ref = ref_video_processor.sample_frames(VideoMetadata(total_num_frames=total, fps=src, duration=duration),
                                                    fps=fps).tolist()
            assert D.sample_frame_indices(total, src, fps, duration) == ref, (total, src, fps, duration)
    assert len(D.sample_frame_indices(1000, 30.0, 2.0, max_frames=10)) == 10  # our frame cap


def test_video_resize_and_patch_order_match_reference(ref_video_processor):
    from transformers.models.glm4v.video_processing_glm4v import smart_resize
    for n, h, w in ((4, 84, 84), (16, 720, 1280), (2, 30, 30), (600, 1080, 1920), (8, 50, 700)):
        assert D.smart_resize(n, h, w, D.VIDEO_MIN_PIXELS, D.VIDEO_MAX_PIXELS) == smart_resize(
            n, h, w, 2, 28, D.VIDEO_MIN_PIXELS, D.VIDEO_MAX_PIXELS)
    frames = np.random.default_rng(0).standard_normal((6, 56, 84, 3)).astype(np.float32)
    ref, gt, gh, gw = ref_video_processor.patchify(torch.from_numpy(frames).permute(0, 3, 1, 2)[None], 14, 2, 2)
    assert (gt, gh, gw) == (3, 4, 6)
    assert np.array_equal(D._patchify(frames), ref[0].numpy())


def hf_processor(tok):
    """The reference Glm4vProcessor around our tiny tokenizer (its class check needs torchvision; skipped)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    original = Glm4vProcessor.check_argument_for_proper_class
    Glm4vProcessor.check_argument_for_proper_class = lambda *a, **k: None
    try:
        return Glm4vProcessor(image_processor=Glm4vImageProcessorPil(), tokenizer=hf_tok,
                              video_processor=Glm4vVideoProcessor())
    finally:
        Glm4vProcessor.check_argument_for_proper_class = original


def frames_of(n, w=84, h=56, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def test_video_layout_and_timestamps_match_reference(tok):
    from transformers.video_utils import VideoMetadata
    proc = hf_processor(tok)
    for n, src, fps in ((8, 2.0, 2.0), (7, 2.0, 2.0), (30, 10.0, 2.0), (13, 3.0, 1.0)):
        video = D.process_video(frames_of(n), fps=fps, source_fps=src)
        indices = D.sample_frame_indices(n, src, fps, n / src)
        assert video.frame_times == [i / src for i in indices]
        assert video.timestamps == video.frame_times[::2]
        assert video.video_grid_thw.tolist() == [[len(indices) // 2, 4, 6]]
        assert video.pixel_values_videos.shape == (len(indices) // 2 * 24, 1176)
        md = VideoMetadata(total_num_frames=n, fps=src, frames_indices=indices)
        ref = proc.replace_video_token({"video_grid_thw": video.video_grid_thw, "video_metadata": [md]}, 0)
        ours = D._video_text(video.video_grid_thw[0], video.timestamps)
        assert ours == "<|begin_of_video|>" + ref + "<|end_of_video|>", (n, src, fps)
        assert ours.count("<|begin_of_image|>") == video.video_grid_thw[0, 0]
        assert ours.count("<|image|>") == video.video_grid_thw.prod() // 4


def test_odd_frame_count_repeats_the_last_frame():
    frames = frames_of(3)
    video = D.process_video(frames)
    assert video.video_grid_thw.tolist() == [[2, 4, 6]] and video.frame_times == [0.0, 0.5, 1.0, 1.0]
    last_pair = video.pixel_values_videos[-24:].view(24, 3, 2, 14 * 14)  # (patch, channel, frame, pixels)
    assert torch.equal(last_pair[:, :, 0], last_pair[:, :, 1])
    first_pair = video.pixel_values_videos[:24].view(24, 3, 2, 14 * 14)
    assert not torch.equal(first_pair[:, :, 0], first_pair[:, :, 1])


def test_video_from_folder_gif_and_errors(tmp_path):
    frames = frames_of(6, seed=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):  # natural order: 2 before 10
        f.save(folder / f"f{[0, 1, 2, 3, 10, 11][i]}.png")
    from_list = D.process_video(frames)
    assert torch.equal(D.process_video(folder).pixel_values_videos, from_list.pixel_values_videos)
    gif_frames = [Image.new("RGB", (84, 56), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0))]
    gif_frames[0].save(tmp_path / "v.gif", save_all=True, append_images=gif_frames[1:], duration=250, loop=0)
    gif = D.process_video(tmp_path / "v.gif", fps=2.0)  # 4 fps source sampled at 2 fps: frames 0 and 2
    assert gif.frame_times == [0.0, 0.5] and gif.timestamps == [0.0]
    slow = [Image.new("RGB", (56, 56), c) for c in ((255, 0, 0), (0, 255, 0))]  # 1.5 s red, then 0.5 s green
    slow[0].save(tmp_path / "s.gif", save_all=True, append_images=slow[1:], duration=[1500, 500], loop=0)
    video = D.process_video(tmp_path / "s.gif", fps=2.0)
    assert video.frame_times == [0.0, 0.5, 1.0, 1.5]
    red = video.pixel_values_videos.view(-1, 3, 2, 196)[:, 0]  # red channel, both frames of each pair
    assert (red[:16] > 1).all() and (red[16:, 0] > 1).all() and (red[16:, 1] < 0).all()
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        D.process_video(tmp_path / "missing.mp4")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    try:
        import av  # noqa: F401
        with pytest.raises(ValueError, match="clip.mp4"):
            D.process_video(tmp_path / "clip.mp4")
    except ImportError:
        with pytest.raises(ImportError, match="PyAV"):
            D.process_video(tmp_path / "clip.mp4")
    with pytest.raises(ValueError, match="differ in size"):
        D.process_video([Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56))])


def test_mp4_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 112, 84, "yuv420p"
        for i in range(35):
            frame = np.zeros((84, 112, 3), np.uint8)
            frame[:, :, 0] = i * 7
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = D.process_video(path, fps=2.0)  # 3.5 s at 10 fps: frames 0, 5, … 30, the last repeated
    assert video.frame_times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0] and video.timestamps == [0, 1, 2, 3]
    assert video.video_grid_thw.tolist() == [[4, 6, 8]]
    frames, fps, _ = D.load_frames(path)
    assert fps == 10 and len(frames) == 35 and sum(f is not None for f in frames) == 7  # only kept frames decoded


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_ids_are_the_tiny_presets(tok, tmp_path):
    assert tok.vocab_size == 320
    for i, s in enumerate(M.TINY_SPECIAL_TOKENS):
        assert tok.token_to_id(s) == 256 + i
    assert (tok.image_token_id, tok.video_token_id, tok.image_start_token_id, tok.image_end_token_id,
            tok.video_start_token_id, tok.video_end_token_id, tok.eos_token_ids, tok.pad_token_id) == (
        270, 271, 266, 267, 268, 269, (256, 263, 265), 256)
    cfg = M.PRESETS["tiny"]  # the model's config names the same ids
    assert all(getattr(tok, name) == getattr(cfg, name) for name in (*D.TOKEN_ID_FIELDS, "eos_token_ids",
                                                                      "pad_token_id"))
    assert tok.force_answer_ids == tok.encode(D.FORCE_ANSWER) == [273, 274]
    text = "héllo ✓ 42\n\t<think>x</think>"
    ids = tok.encode(text)
    assert ids[:3] == [104, 195, 169] and ids[-3:] == [272, 120, 273]  # raw UTF-8 bytes, specials as one id
    assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == "héllo ✓ 42\n\tx"
    assert tok.decode(torch.tensor([276, 52, 50, 277])) == "<|begin_of_box|>42<|end_of_box|>"
    path = tok.save(tmp_path / "ckpt")
    again = D.load_tokenizer(tmp_path / "ckpt")
    assert os.path.basename(path) == "tokenizer.json" and again.encode(text) == ids and again.vocab_size == 320
    assert D.load_tokenizer(path).special == tok.special


def test_load_tokenizer_looks_specials_up_by_string(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(s, special=True) for s in reversed(D.REQUIRED_TOKENS)])
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = D.load_tokenizer(tmp_path)
    assert loaded.special == {s: backend.token_to_id(s) for s in D.REQUIRED_TOKENS}
    assert loaded.image_token_id == backend.token_to_id("<|image|>") != 270
    assert loaded.eos_token_ids == tuple(backend.token_to_id(s) for s in ("<|endoftext|>", "<|user|>",
                                                                          "<|observation|>"))
    incomplete = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    incomplete.save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"bad.json.*lacks"):
        D.load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        D.load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="junk.json"):
        D.load_tokenizer(tmp_path / "junk.json")


# ---------------------------------------------------------------------------------------------------------------
# Chat format and loss masks
# ---------------------------------------------------------------------------------------------------------------


def masked_text(tok, enc):
    return tok.decode(enc["input_ids"][enc["loss_mask"]])


def test_render_chat_exact_text_and_loss_mask(tok):
    image = rand_image(112, 112)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    enc = D.render_chat(msgs, tok, images=[image])
    block = "<|begin_of_image|>" + "<|image|>" * 16 + "<|end_of_image|>"
    assert enc["text"] == f"[gMASK]<sop><|user|>\n{block}What?<|assistant|>\n"
    assert tok.decode(enc["input_ids"]) == enc["text"] and not enc["loss_mask"].any()
    assert enc["image_grid_thw"].tolist() == [[1, 8, 8]] and enc["pixel_values"].shape == (64, 1176)
    assert enc["pixel_values_videos"] is None and enc["video_grid_thw"] is None
    off = D.render_chat(msgs, tok, images=[image], thinking=False)
    assert off["text"].endswith("<|assistant|>\n<think></think>")

    reply = "<think>r</think><answer><|begin_of_box|>7<|end_of_box|></answer>"
    convo = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "n?"}]},
             {"role": "assistant", "content": reply}]
    enc = D.render_chat(convo, tok, images=[image])
    assert enc["text"] == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nhi<|assistant|>\nhello<|user|>\n" + block +
                           "n?<|assistant|>\n" + reply + "<|endoftext|>")
    # the loss covers each reply plus the token that ends it: the next <|user|>, or <|endoftext|> at the end
    assert masked_text(tok, enc) == "hello<|user|>" + reply + "<|endoftext|>"
    ids, mask = enc["input_ids"], enc["loss_mask"]
    assert not mask[0] and mask[-1] and ids[-1] == 256
    no_think = D.render_chat(convo, tok, images=[image], thinking=False)
    assert "<|assistant|>\n<think></think><answer>" in no_think["text"]
    assert masked_text(tok, no_think) == "hello<|user|><answer><|begin_of_box|>7<|end_of_box|></answer><|endoftext|>"
    meta = D.render_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "metadata": "m"}],
                         tok)
    assert meta["text"] == "[gMASK]<sop><|user|>\nq<|assistant|>m\na<|endoftext|>"


def test_render_chat_matches_reference_processor(tok):
    proc = hf_processor(tok)
    images = [rand_image(140, 84, seed=1), rand_image(300, 200, "RGBA", seed=2)]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                         {"type": "image"}, {"type": "text", "text": " them."}]}]
    enc = D.render_chat(msgs, tok, images=images)
    collapsed = re.sub(r"(<\|image\|>)+", "<|image|>", enc["text"])  # what the template writes
    ref = proc(text=[collapsed], images=images, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref["input_ids"][0])
    assert torch.equal(enc["pixel_values"], ref["pixel_values"])
    assert torch.equal(enc["image_grid_thw"], ref["image_grid_thw"])


def test_render_chat_with_video_and_bad_input(tok):
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When?"}]}]
    enc = D.render_chat(msgs, tok, videos=[frames_of(8)])
    assert enc["video_grid_thw"].tolist() == [[4, 4, 6]]
    body = "".join("<|begin_of_image|>" + "<|image|>" * 6 + f"<|end_of_image|>{t}" for t in range(4))
    assert enc["text"] == f"[gMASK]<sop><|user|>\n<|begin_of_video|>{body}<|end_of_video|>When?<|assistant|>\n"
    with pytest.raises(ValueError, match="more images"):
        D.render_chat([{"role": "user", "content": [{"type": "image"}]}], tok)
    with pytest.raises(ValueError, match="1 images"):
        D.render_chat([{"role": "user", "content": "no image here"}], tok, images=[rand_image(50, 50)])
    with pytest.raises(ValueError, match="unknown role"):
        D.render_chat([{"role": "robot", "content": "x"}], tok)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        D.render_chat([{"content": "x"}], tok)


def test_earlier_replies_keep_only_their_answer(tok):
    """An earlier reply appears as the released client keeps it (the <answer> body, else what follows </think>);
    one that lost its reasoning is context only, a plain one is still learned."""
    assert D.history_reply("<think>r</think><answer>It is <|begin_of_box|>7<|end_of_box|>.</answer><|user|>") == \
        "It is <|begin_of_box|>7<|end_of_box|>."
    assert D.history_reply("<think>r</think> plain") == " plain" and D.history_reply("hello") == "hello"
    reply = "<think>r</think><answer>A</answer>"
    convo = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": reply},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "plain"},
             {"role": "user", "content": "q3"}]
    enc = D.render_chat(convo, tok)
    assert enc["text"] == ("[gMASK]<sop><|user|>\nq1<|assistant|>\nA<|user|>\nq2<|assistant|>\nplain<|user|>\nq3"
                           "<|assistant|>\n")
    assert masked_text(tok, enc) == "plain<|user|>"
    assert D.render_chat(convo + [{"role": "assistant", "content": reply}], tok)["text"].endswith(
        "q3<|assistant|>\n" + reply + "<|endoftext|>")


def test_render_caption(tok):
    enc = D.render_caption("A red circle.", tok, image=rand_image(112, 112))
    assert enc["text"].startswith("[gMASK]<sop><|begin_of_image|>") and enc["text"].endswith(
        "<|end_of_image|>A red circle.<|endoftext|>")
    assert masked_text(tok, enc) == "A red circle.<|endoftext|>"


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_source_formats_and_lengths(tmp_path, tok):
    rand_image(112, 112).save(tmp_path / "a.png")
    rand_image(168, 112, seed=3).save(tmp_path / "b.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A."}],
         "images": ["a.png"]},
        "",
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.png"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "B."}], "thinking": False},
        {"image": "a.png", "text": "a caption"},
        {"messages": [{"role": "user", "content": "<video>When?"}, {"role": "assistant", "content": "Now."}],
         "videos": [["f/0.png", "f/1.png", "f/2.png"]]},
        {"video": "f", "text": "three frames"},
    ])
    (tmp_path / "f").mkdir()
    for i, frame in enumerate(frames_of(3, seed=4)):
        frame.save(tmp_path / "f" / f"{i}.png")
    src = D.JsonlSource(path)
    assert src.size == 5 and src.where(2).endswith("d.jsonl:4")
    for i in range(5):
        enc = src.encode(i, tok)
        assert src.length(i, tok) == len(enc["input_ids"])
    first = src.encode(0, tok)
    assert "<|end_of_image|>What is it?<|assistant|>\nA.<|endoftext|>" in first["text"]
    assert "<think></think>B." in src.encode(1, tok)["text"]
    assert masked_text(tok, src.encode(2, tok)) == "a caption<|endoftext|>"
    assert src.encode(3, tok)["video_grid_thw"].tolist() == [[2, 4, 6]]
    assert torch.equal(src.encode(4, tok)["pixel_values_videos"], src.encode(3, tok)["pixel_values_videos"])


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ({"text": "no image"}, "d.jsonl:2: the record fits none of the accepted forms: \"messages\" .*ShareGPT.*"
                           "caption pair.*keys \\['text'\\]"),
    ({"image": "missing.png", "text": "x"}, "d.jsonl:2: file not found: missing.png"),
    ({"messages": [{"role": "user", "content": "<image><image>x"}], "images": ["a.png"]}, "d.jsonl:2: .*2 images"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "d.jsonl:2: .*unknown role"),
    ({"messages": [{"role": "user"}]}, "d.jsonl:2: .*'role' and 'content'"),
    ([1, 2], "d.jsonl:2: expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    rand_image(64, 64).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "text": "fine"}, line])
    with pytest.raises(ValueError, match=message):
        D.JsonlSource(path)


def test_record_forms_of_llama_factory_sharegpt_and_openai(tmp_path, tok):
    """One .json array (LLaMA-Factory's dataset files) holding every accepted form; each renders like the
    OpenAI-form record of the same conversation."""
    import base64
    rand_image(112, 112).save(tmp_path / "a.png")
    png = io.BytesIO()
    rand_image(112, 112).save(png, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    openai = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "<image>What is it?"},
                           {"role": "assistant", "content": "A."}], "images": ["a.png"]}
    records = [
        openai,
        {"conversations": [{"from": "human", "value": "<image>What is it?"}, {"from": "gpt", "value": "A."}],
         "system": "Be brief.", "images": ["a.png"]},  # ShareGPT, the system prompt in its own column
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>What is it?"},
                           {"from": "gpt", "value": "A."}], "image": "a.png"},  # LLaVA: one "image"
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                                   {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]},  # OpenAI parts
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
            {"type": "image", "path": "a.png"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A."}]},  # Hugging Face parts
        {"instruction": "<image>What is it?", "output": "A.", "system": "Be brief.", "images": ["a.png"]},  # alpaca
        {"image": data_url, "text": "a caption"},
    ]
    path, text = tmp_path / "d.json", json.dumps(records, indent=2)
    path.write_text(text)
    src = D.JsonlSource(path)
    starts = [n for n, line in enumerate(text.split("\n"), 1) if line == "  {"]  # where each record begins
    assert [src.where(i) for i in range(src.size)] == [f"{path}:{n}" for n in starts] and len(starts) == len(records)
    expected = src.encode(0, tok)
    for i in range(1, len(records) - 1):
        enc = src.encode(i, tok)
        assert enc["text"] == expected["text"] and torch.equal(enc["loss_mask"], expected["loss_mask"]), i
        assert torch.equal(enc["pixel_values"], expected["pixel_values"]), i
        assert src.length(i, tok) == len(enc["input_ids"])
    assert masked_text(tok, src.encode(len(records) - 1, tok)) == "a caption<|endoftext|>"
    alpaca = D.parse_record({"instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]]})
    assert [m["content"] for m in alpaca["messages"]] == ["hi", "hello", "Add\n2 and 3", "5"]


@pytest.mark.parametrize("text, message", [
    ('[\n  {"image": "a.png", "text": "fine"},\n  {"image": "a.png", "text": \n  oops}\n]',
     r"d.json:4: not valid JSON \(Expecting value at column 3\)"),
    ('[\n  {"image": "a.png", "text": "fine"}\n  {"image": "a.png", "text": "x"}\n]', "d.json:3: not valid JSON"),
    ('[{"image": "a.png", "text": "fine"},\n {"caption": "x"}]', "d.json:2: the record fits none of the accepted"),
    ('[{"conversations": [{"from": "observation", "value": "x"}]}]', "d.json:1: .*'from' must be one of human"),
    ('[{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}]}]',
     "d.json:1: https://x/y.png: URLs are not downloaded"),
    ('[{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}]', "d.json:1: .*image_url or video"),
    ('[{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}], "images": ["a.png"]}]',
     "d.json:1: images are given both"),
])
def test_json_array_errors_name_file_and_line(tmp_path, text, message):
    rand_image(64, 64).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        D.JsonlSource(tmp_path / "d.json")


def test_no_think_share_applies_to_data_and_is_refused_where_it_does_nothing(tmp_path, tok):
    import pretrain
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content":
                                                                   "<think>r</think><answer>a</answer>"}]}
             for i in range(200)] + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content":
                                                                                         "<think>r</think>a"}],
                                      "thinking": True}] * 20
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    tc = pretrain.resolve(pretrain.TrainConfig(stage="sft", data=str(path), no_think_share=0.5))
    src = pretrain.data_source(tc)
    thinking = [src.sample(i).get("thinking", True) for i in range(src.size)]
    assert 70 < sum(thinking[:200]) < 130 and all(thinking[200:])
    off = next(i for i in range(200) if not thinking[i])
    assert "<|assistant|>\n<think></think><answer>a</answer>" in src.encode(off, tok)["text"]
    assert pretrain.resolve(pretrain.TrainConfig(stage="sft")).no_think_share == 0.1
    assert all(D.JsonlSource(path).sample(i).get("thinking", True) for i in range(200))
    with pytest.raises(ValueError, match="--no-think-share"):
        pretrain.resolve(pretrain.TrainConfig(stage="pretrain", data=str(path), no_think_share=0.2))


def test_a_corrupt_image_is_skipped_with_its_file_and_line(tmp_path, tok, capsys):
    (tmp_path / "a.png").write_bytes(b"garbage")
    Image.new("RGB", (56, 56)).save(tmp_path / "b.png")
    src = D.JsonlSource(write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "text": "x"},
                                                            {"image": "b.png", "text": "y"}]))
    with pytest.raises(D.BadData, match=r"a.png: unreadable") as e:
        src.encode(0, tok)
    assert e.value.reason == "unreadable_image"
    loader = D.PackedLoader(src, tok, seq_len=128)
    assert {loader.index(s) for s in loader.batch(0)[0]["samples"]} == {1}  # every epoch's good sample
    assert f"skipped {tmp_path / 'd.jsonl'}:1: " in capsys.readouterr().err
    counts, examined = loader.bad_data(0)
    assert set(counts) == {"unreadable_image"} and counts["unreadable_image"] in (examined // 2, (examined + 1) // 2)


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------


class ListSource:
    """A finite in-memory source of given samples."""

    def __init__(self, samples):
        self.samples, self.size = samples, len(samples)

    def sample(self, i):
        return self.samples[i]

    def length(self, i, tokenizer):
        return len(D.encode_sample(self.samples[i], tokenizer, sizes_only=True)["input_ids"])

    def encode(self, i, tokenizer):
        return D.encode_sample(self.samples[i], tokenizer)


def test_pack_boundaries_positions_labels_and_vision(tok):
    import rope2d
    src = W.SyntheticSource("sft")
    loader = D.PackedLoader(src, tok, seq_len=700, packs_per_step=2)
    packs = loader.batch(0) + loader.batch(1)
    assert [p["samples"][0] for p in packs[1:]] == [p["samples"][-1] + 1 for p in packs[:-1]]  # stream order
    for pack in packs:
        T = pack["input_ids"].shape[1]
        assert T == 700 and pack["labels"].shape == (1, T) and pack["position_ids"].shape == (3, 1, T)
        cu = pack["cu_seqlens"].tolist()
        assert pack["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == T
        images, videos = [], []
        for k, s in enumerate(pack["samples"]):
            enc = src.encode(s, tok)
            a, b = cu[k], cu[k + 1]
            assert torch.equal(pack["input_ids"][0, a:b], enc["input_ids"])
            labels = pack["labels"][0, a:b]
            assert labels[0] == -100  # a sample never learns its first token: the shift cannot cross samples
            assert torch.equal(labels[enc["loss_mask"]], enc["input_ids"][enc["loss_mask"]])
            assert (labels[~enc["loss_mask"]] == -100).all()
            alone, _ = rope2d.get_rope_index(enc["input_ids"][None], enc["image_grid_thw"], enc["video_grid_thw"],
                                             **tok.rope_index_kwargs())
            assert torch.equal(pack["position_ids"][:, :, a:b], alone) and pack["position_ids"][0, 0, a] == 0
            images += [enc["pixel_values"]] if enc["pixel_values"] is not None else []
            videos += [enc["pixel_values_videos"]] if enc["pixel_values_videos"] is not None else []
        if len(cu) - 1 > len(pack["samples"]):  # the padding tail
            tail = slice(cu[-2], cu[-1])
            assert (pack["input_ids"][0, tail] == tok.pad_token_id).all() and (pack["labels"][0, tail] == -100).all()
        assert torch.equal(pack["pixel_values"], torch.cat(images))
        if videos:
            assert torch.equal(pack["pixel_values_videos"], torch.cat(videos))
        else:
            assert pack["pixel_values_videos"] is None and pack["video_grid_thw"] is None


def test_no_attention_across_packed_samples(tok, one_thread):
    """The tiny model gives every sample the same logits inside the pack as alone."""
    import model as M
    torch.manual_seed(0)
    net = M.GLM4V(M.PRESETS["tiny"]).eval()
    loader = D.PackedLoader(W.SyntheticSource("sft", tasks=("counting", "video_grounding", "ocr")), tok, seq_len=400)
    pack = loader.batch(0)[0]
    assert len(pack["samples"]) >= 2 and pack["pixel_values_videos"] is not None
    with torch.no_grad():
        packed = net(pack["input_ids"], pixel_values=pack["pixel_values"], image_grid_thw=pack["image_grid_thw"],
                     pixel_values_videos=pack["pixel_values_videos"], video_grid_thw=pack["video_grid_thw"],
                     position_ids=pack["position_ids"], cu_seqlens=pack["cu_seqlens"])
        cu = pack["cu_seqlens"].tolist()
        for k, s in enumerate(pack["samples"]):
            enc = loader.source.encode(s, tok)
            alone = net(enc["input_ids"][None], pixel_values=enc["pixel_values"],
                        image_grid_thw=enc["image_grid_thw"], pixel_values_videos=enc["pixel_values_videos"],
                        video_grid_thw=enc["video_grid_thw"])
            torch.testing.assert_close(packed[0, cu[k]:cu[k + 1]], alone[0], atol=2e-4, rtol=1e-4)


def test_packing_skips_overlong_samples_and_shuffles_finite_sources(tok):
    samples = [{"messages": [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a"}]}
               for n in (5, 300, 7, 9, 11, 13)]
    loader = D.PackedLoader(ListSource(samples), tok, seq_len=64, seed=3)
    seen = []
    for g in range(6):
        seen += [loader.index(s) for s in loader.batch(g)[0]["samples"]]
    assert 1 not in seen and len(loader.skipped) >= 1  # the 300-char sample never fits in 64 tokens
    first_epoch = [loader.index(s) for s in range(6)]
    assert sorted(first_epoch) == list(range(6)) and first_epoch != [loader.index(s) for s in range(6, 12)]
    with pytest.raises(ValueError, match="no sample of the data can be packed"):
        D.PackedLoader(ListSource(samples[1:2]), tok, seq_len=16).batch(0)


def test_world_sizes_see_the_same_global_batches_and_resume(tok):
    src = W.SyntheticSource("caption")
    one = D.PackedLoader(src, tok, seq_len=300, packs_per_step=4)
    ranks = [D.PackedLoader(src, tok, seq_len=300, packs_per_step=4, rank=r, world=2) for r in range(2)]
    for g in (0, 2, 1):  # random access in any order
        global_batch = one.batch(g)
        assert [p["samples"] for p in global_batch] == [p["samples"] for r in ranks for p in r.batch(g)]
    it = iter(one)
    for _ in range(3):
        next(it)
    state = one.state_dict()
    assert state["step"] == 3
    expected = next(it)
    resumed = D.PackedLoader(src, tok, seq_len=300, packs_per_step=4, rank=1, world=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    got = next(iter(resumed))
    assert [p["samples"] for p in got] == [p["samples"] for p in expected[2:]]
    assert torch.equal(got[0]["input_ids"], expected[2]["input_ids"])
    with pytest.raises(ValueError, match="before the resume point"):
        resumed.batch(0)
    with pytest.raises(ValueError, match="seq_len"):
        D.PackedLoader(src, tok, seq_len=100, packs_per_step=4).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of the world size"):
        D.PackedLoader(src, tok, seq_len=300, packs_per_step=3, world=2)


def test_worker_processes_give_the_same_batches(tok):
    src = W.SyntheticSource("sft", tasks=("math", "chart"))
    plain = D.PackedLoader(src, tok, seq_len=400)
    workers = D.PackedLoader(src, tok, seq_len=400, num_workers=2)
    stream = iter(workers)
    for g in range(3):
        a, b = plain.batch(g), next(stream)
        assert a[0]["samples"] == b[0]["samples"] and torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])
    stream.close()
    plain.pack(3)
    assert workers.step == 3 and workers.state_dict()["position"] == plain._starts[3]


def pack_hashes(loader, steps=2) -> list:
    """A sha256 of every pack of the first global steps: what must agree between processes."""
    import hashlib

    out = []
    for g in range(steps):
        for pack in loader.batch(g):
            h = hashlib.sha256()
            for key in ("input_ids", "labels", "position_ids", "pixel_values", "pixel_values_videos"):
                if pack[key] is not None:
                    h.update(pack[key].numpy().tobytes())
            out.append(h.hexdigest())
    return out


PROCESS_SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import data as D
import world as W
from test_data import pack_hashes
loader = D.PackedLoader(W.SyntheticSource("sft", no_think_share=0.3), D.tiny_tokenizer(), seq_len=500,
                        packs_per_step=2, rank={rank}, world=2)
print(json.dumps(pack_hashes(loader)))
"""


def test_processes_agree_with_one_process(tok):
    """Two ranks in fresh processes (their own str hash salts) reproduce the global batches of one process."""
    script = PROCESS_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), rank="{rank}")
    procs = [subprocess.Popen([sys.executable, "-c", script.format(rank=r)], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONHASHSEED": str(17 + r)}) for r in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    expected = pack_hashes(D.PackedLoader(W.SyntheticSource("sft", no_think_share=0.3), tok, seq_len=500,
                                          packs_per_step=2))
    assert [outs[0][0], outs[1][0], outs[0][1], outs[1][1]] == expected


# ---------------------------------------------------------------------------------------------------------------
# The quality pipeline
# ---------------------------------------------------------------------------------------------------------------


def colour_scorer(image, text):
    """A stand-in for CLIP: 1 when the caption names the image's dominant colour, else 0."""
    r, g, b = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    name = max((("red", r - g - b), ("green", g - r - b), ("blue", b - r - g)), key=lambda kv: kv[1])[0]
    return 1.0 if name in text.lower() else 0.0


def shout(image, text):
    return text.upper() + f" ({image.width}x{image.height})"


def textured(colour, seed, size=(96, 96)):
    """A colour-dominated image with texture (not solid, distinct perceptual hash per seed)."""
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float32)
    noise = rng.integers(0, 40, (size[1] // 8, size[0] // 8, 1)).repeat(8, 0).repeat(8, 1)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_quality_filter_counts_every_drop(tmp_path, monkeypatch):
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    lines = []
    for i in range(6):
        name = list(colours)[i % 3]
        textured(colours[name], seed=i).save(tmp_path / f"ok{i}.png")
        lines.append({"image": f"ok{i}.png", "text": f"a {name} square number {i}"})
    Image.open(tmp_path / "ok1.png").save(tmp_path / "copy1.png")  # identical pixels, another file
    lines.append({"image": "copy1.png", "text": "a green square again"})
    Image.open(tmp_path / "ok2.png").resize((90, 90)).save(tmp_path / "near2.jpg", quality=90)
    lines.append({"image": "near2.jpg", "text": "a blue square, recompressed"})
    textured(colours["red"], 50, (20, 20)).save(tmp_path / "small.png")
    lines.append({"image": "small.png", "text": "a red dot"})
    textured(colours["red"], 51, (700, 33)).save(tmp_path / "wide.png")
    lines.append({"image": "wide.png", "text": "a red banner"})
    Image.new("RGB", (96, 96), (10, 200, 10)).save(tmp_path / "solid.png")
    lines.append({"image": "solid.png", "text": "green"})
    textured(colours["blue"], 52).save(tmp_path / "mismatch.png")
    lines.append({"image": "mismatch.png", "text": "a red square"})  # the scorer disagrees
    (tmp_path / "corrupt.png").write_bytes(os.urandom(300))
    lines.append({"image": "corrupt.png", "text": "a red thing"})
    buf = io.BytesIO()
    textured(colours["red"], 53).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:400])
    lines.append({"image": "cut.jpg", "text": "a red cut"})
    textured(colours["red"], 54, (200, 200)).save(tmp_path / "bomb.png")  # over the (lowered) pixel limit
    lines.append({"image": "bomb.png", "text": "a red bomb"})
    lines.append({"image": "gone.png", "text": "a red ghost"})
    lines.append("{broken json")
    lines.append({"video": "ok0.png"})
    lines.append({"image": "ok3.png", "text": "x"})  # too short a text (not a duplicate: text is checked first)
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    summary = Q.quality_filter(src, out, scorer=colour_scorer, max_image_pixels=30_000, rejects=str(rejects),
                               recaption=shout, progress=False)
    reasons = ("exact_duplicate", "near_duplicate", "too_small", "aspect_ratio", "solid_color", "low_relevance",
               "unreadable", "truncated", "decompression_bomb", "missing_file", "bad_json", "bad_record",
               "text_length")
    assert summary == {"read": len(lines), "kept": 6, "dropped": {r: 1 for r in reasons}}
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [k["image"] for k in kept] == [f"ok{i}.png" for i in range(6)]
    assert kept[0]["text"] == "A RED SQUARE NUMBER 0 (96x96)" and kept[0]["original_text"] == "a red square number 0"
    assert len(rejects.read_text().splitlines()) == len(lines) - 6


def test_concept_balancing_thins_head_concepts_only(tmp_path):
    lines = []
    for i in range(60):
        textured((120, 120, 120), seed=100 + i).save(tmp_path / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": "a cat" if i < 56 else f"a rare okapi {i}"})
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    summary = Q.quality_filter(src, tmp_path / "out.jsonl", balance_t=5, concepts=["cat", "okapi"], progress=False)
    kept = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sum("okapi" in t for t in kept) == 4  # the long tail (below t) stays whole
    assert 1 <= sum(t == "a cat" for t in kept) <= 15  # the head is cut to about t = 5
    assert summary["dropped"]["resampled_out"] == 60 - len(kept)
    again = Q.quality_filter(src, tmp_path / "out2.jsonl", balance_t=5, concepts=["cat", "okapi"], progress=False)
    assert again == summary and (tmp_path / "out2.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()


def test_filter_cli_with_plugged_scorer(tmp_path, capsys, monkeypatch):
    textured((200, 30, 30), 1).save(tmp_path / "a.png")
    textured((30, 30, 200), 2).save(tmp_path / "b.png")
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": "a.png", "text": "red"}, {"image": "b.png", "text": "red"}])
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    summary = Q.main([str(src), str(tmp_path / "out.jsonl"), "--scorer", "test_data:colour_scorer"])
    assert summary["kept"] == 1 and summary["dropped"] == {"low_relevance": 1}
    assert "low_relevance" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cannot load"):
        Q.main([str(src), str(tmp_path / "o.jsonl"), "--scorer", "no_such_module:f"])


def test_phash_near_duplicate_index():
    a = Q.phash(textured((200, 30, 30), 7))
    b = Q.phash(textured((200, 30, 30), 7).resize((80, 80)))
    c = Q.phash(textured((200, 30, 30), 8))
    assert bin(a ^ b).count("1") <= 4 < bin(a ^ c).count("1")
    index = Q.NearDuplicateIndex(4)
    index.add(a)
    assert index.find(b) == a and index.find(c) is None
