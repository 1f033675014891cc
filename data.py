"""Data for GLM-4.1V-Thinking (arXiv 2507.01006): the image and video processor, the tokenizer, the chat format,
datasets, sample packing, the paper's data-quality pipeline, and a synthetic world of verifiable tasks that is the
default data for pretraining, SFT and RL (no download needed).

    PIL image ──process_image──► pixel_values (N, 3·2·14·14), image_grid_thw (1, 3)
    frames | folder | GIF | mp4 ──process_video──► Video(pixel_values_videos, video_grid_thw, timestamps)
    messages + images/videos ──render_chat──► input_ids, loss_mask + the vision tensors
    JSONL | synthetic world ──PackedLoader──► fixed-length packs (input_ids, labels, positions, cu_seqlens)
    python data.py filter IN.jsonl OUT.jsonl   the quality pipeline (paper §3.1)
    python data.py show --domain grounding --n 8 --out grid.png   a contact sheet of the synthetic world

Choices made here, where the paper and the reference implementation leave room:
- Images are processed exactly like the `transformers` Glm4v image processor (PIL backend), bit for bit. Videos
  follow its video processor for frame sampling, resize targets, patch order and the prompt layout; frames are
  resized with PIL bicubic like still images (the reference video path uses torchvision, which differs by
  interpolation round-off).
- The rendered text is exactly the released chat template. Its assistant turns have no end token (the next
  `<|user|>` ends them), so for training the loss covers each assistant reply *and the token that ends it*: the
  following `<|user|>`, or an appended `<|endoftext|>` after the last reply. Both are stop tokens of the model.
  `thinking=False` prefills `<think></think>` (outside the loss), which makes "no thinking" a real switch.
- Caption pairs (pretraining) are rendered without chat roles: `[gMASK]<sop>` image caption `<|endoftext|>`,
  loss on the caption and the end token.
- Packs hold whole samples, greedily in stream order (a sample that does not fit starts the next pack; one longer
  than the pack is skipped and counted). Labels are *not* shifted (`labels[t]` is the target of position t-1's
  logits, the Hugging Face convention); every sample starts with `[gMASK]`, outside the loss, so a shift never
  leaks across samples.
- The order depends only on the global sample position: finite sources are shuffled per epoch from (seed, epoch),
  the synthetic world is indexed directly. Global step g holds packs g·P … g·P+P-1 and rank r of w takes a
  contiguous 1/w of them, so any world size sees the same global batches.
- The synthetic world decides each item's split from a hash of its content (the expression, the string, the
  scene), so train and held-out items can never coincide: a held-out item is one whose content hashes there.
"""
import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import os
import random
import re
import sys
import time
import warnings
from fractions import Fraction
from functools import lru_cache

import numpy as np
import tokenizers
import torch
from PIL import Image, ImageDraw, ImageFont, ImageSequence
from tqdm import tqdm

import rope2d

# ---------------------------------------------------------------------------------------------------------------
# The image processor (paper §2: native resolution, 2×2 merge, temporal patch of 2)
# ---------------------------------------------------------------------------------------------------------------

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # both sides become multiples of 28
IMAGE_MIN_PIXELS = 112 * 112
IMAGE_MAX_PIXELS = 28 * 28 * 15000
VIDEO_MIN_PIXELS = 112 * 112
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000
VIDEO_MAX_DURATION = 300.0  # seconds; longer videos are sampled uniformly instead of at `fps`
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 values per patch


def smart_resize(num_frames: int, height: int, width: int, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS, factor: int = FACTOR, temporal_factor: int = TEMPORAL_PATCH_SIZE):
    """The (height, width) an image or video is resized to: both multiples of `factor`, close to the original
    aspect, with num_frames·h·w inside [min_pixels, max_pixels] (a still image counts as 2 frames). Sides below
    `factor` are scaled up first; an aspect ratio above 200 is a ValueError."""
    if num_frames < temporal_factor:
        raise ValueError(f"need at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_ASPECT_RATIO}:1 "
                         f"({width}x{height}); crop or pad the image first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited onto white (what the reference does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path) -> Image.Image:
    """Open and fully decode an image file; missing, corrupt or truncated files raise errors naming the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: refusing a decompression bomb ({e})") from e
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable, corrupt or truncated image ({e})") from e
    return image


def _normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 CLIP-normalised, with the reference's rounding: ×1/255 in float64, then
    (x - mean) / std in float32."""
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)


def _patchify(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) with T even -> (T/2 · H/14 · W/14, C·2·14·14), ordered so that every 4 consecutive rows are
    one 2×2 merge window, row-major over windows, and each row is (channel, frame, y, x)."""
    T, H, W, C = frames.shape
    p, m, tp = PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE
    gt, gh, gw = T // tp, H // p, W // p
    x = frames.reshape(gt, tp, gh // m, m, p, gw // m, m, p, C)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, C * tp * p * p)


def process_image(image, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS):
    """One image (PIL image of any mode, or a path) -> (pixel_values (N, 1176) float32, image_grid_thw (1, 3)
    long), identical to the reference Glm4v image processor (PIL backend). N = h·w patches of 14 px; the LLM sees
    N/4 tokens. The still image is repeated to 2 frames for the temporal patch."""
    if not isinstance(image, Image.Image):
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"process_image expects a PIL image or a path, got {type(image).__name__}")
        image = open_image(image)
    rgb = to_rgb(image)
    h, w = smart_resize(TEMPORAL_PATCH_SIZE, rgb.height, rgb.width, min_pixels, max_pixels)
    pixels = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC))  # (h, w, 3) uint8
    x = _normalize(pixels)[None].repeat(TEMPORAL_PATCH_SIZE, axis=0)  # (2, h, w, 3)
    grid = torch.tensor([[1, h // PATCH_SIZE, w // PATCH_SIZE]], dtype=torch.long)
    return torch.from_numpy(_patchify(x)), grid


def image_grid(size, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS):
    """The (1, h, w) patch grid `process_image` gives an image of size (width, height), without touching pixels."""
    h, w = smart_resize(TEMPORAL_PATCH_SIZE, size[1], size[0], min_pixels, max_pixels)
    return torch.tensor([[1, h // PATCH_SIZE, w // PATCH_SIZE]], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Video (paper §2: frame pairs fold into one temporal patch; a timestamp follows every pair)
# ---------------------------------------------------------------------------------------------------------------

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


@dataclasses.dataclass
class Video:
    """A processed video. `pixel_values_videos` (t·h·w, 1176) and `video_grid_thw` (1, 3) = (t, h, w) with t frame
    pairs; `timestamps[k]` is the time in seconds of pair k's first frame (the prompt shows int(timestamp));
    `frame_times` are the times of all sampled frames (even count: an odd count repeats the last frame)."""
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    timestamps: list
    frame_times: list


def sample_frame_indices(total_frames: int, source_fps: float, fps: float = 2.0, duration: float = None,
                         max_frames: int = None, max_duration: float = VIDEO_MAX_DURATION):
    """Indices of the frames to keep from a video of `total_frames` at `source_fps`: one every 1/fps seconds (the
    reference rule, rounding up), or `max_frames` (default fps·max_duration) spread uniformly when there would be
    more; duplicates dropped, and an odd count padded by repeating the last index (frames pair up)."""
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    last = total_frames - 1
    duration = duration or round(last / source_fps) + 1
    n = max(int(math.floor(duration * fps)), 1)
    cap = int(max_duration * fps) if max_frames is None else max_frames
    if duration <= max_duration and n <= max(cap, 1):
        indices = [min(last, int(math.ceil(i * source_fps / fps))) for i in range(n)]
    else:
        num = min(cap, int(max_duration * fps)) if duration > max_duration else cap
        if num >= total_frames:
            indices = list(range(total_frames))
        else:
            indices = [min(last, int(math.ceil(t * source_fps))) for t in np.linspace(0, duration, max(num, 1))]
    indices = list(dict.fromkeys(indices))
    if len(indices) % 2:
        indices.append(indices[-1])
    return indices


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(folder) -> list:
    """The image files of a folder of video frames, in natural order (frame2 before frame10)."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
    if not names:
        raise ValueError(f"{folder}: folder holds no frames ({', '.join(FRAME_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def _read_pyav(path: str, pick):
    """Frames of a video file with PyAV (an optional dependency) -> (frames, fps, duration). Only the frames that
    `pick(total, fps, duration)` names are decoded into images; the others stay None (long videos stay cheap)."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyAV (`pip install av`); without it pass a list of frames, a "
                          "folder of frames or an animated GIF") from e
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            duration = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / 1e6 if container.duration else None)
            total = stream.frames  # 0 when the container does not say: then decode everything
            keep = set(pick(total, fps, duration)) if total else None
            frames = []
            for i, frame in enumerate(container.decode(stream)):
                frames.append(frame.to_image() if keep is None or i in keep else None)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: unreadable video ({e})") from e
    return frames, fps, duration


def load_frames(video, source_fps: float = None, default_fps: float = 2.0, max_frames: int = None):
    """The frames of a video given as a list of PIL images (or image paths), a folder of image files (natural sort
    order), an animated GIF/WebP/PNG (frame durations honoured) or a video file (PyAV) -> (frames at a constant
    rate, source_fps, duration). A list or folder has no timing of its own: its frames are 1/source_fps apart
    (default: `default_fps`). Of a video file only the frames sampling at default_fps keeps are decoded (the
    others are None)."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("a video needs at least one frame")
        frames = [f if isinstance(f, Image.Image) else open_image(f) for f in video]
        fps = source_fps or default_fps
        return frames, fps, len(frames) / fps
    path = os.fspath(video)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    if os.path.isdir(path):
        files = frame_files(path)
        fps = source_fps or default_fps
        return [open_image(f) for f in files], fps, len(files) / fps
    if path.lower().endswith(VIDEO_EXTENSIONS):
        frames, fps, duration = _read_pyav(path, lambda total, fps, duration: sample_frame_indices(
            total, source_fps or fps, default_fps, duration, max_frames))
        if not frames:
            raise ValueError(f"{path}: the video has no frames")
        return frames, source_fps or fps, duration
    # an animated image: frames last different times (encoders merge repeated frames into one long one), so lay
    # them on a uniform clock of `tick` ms, fine enough for every duration and for sampling at default_fps (the
    # gcd, at least 10 ms), repeating the longer frames
    image = open_image(path)
    frames, durations = [], []
    for frame in ImageSequence.Iterator(image):
        frames.append(frame.copy())
        durations.append(int(frame.info.get("duration") or 100))  # no delay: 10 fps, as browsers do
    tick = max(10, math.gcd(*durations, round(1000 / default_fps)))
    timeline = [f for f, d in zip(frames, durations) for _ in range(max(1, round(d / tick)))]
    fps = source_fps or 1000 / tick
    return timeline, fps, len(timeline) / fps


def process_video(video, fps: float = 2.0, max_frames: int = None, min_pixels: int = VIDEO_MIN_PIXELS,
                  max_pixels: int = VIDEO_MAX_PIXELS, source_fps: float = None) -> Video:
    """A video (list of PIL frames, folder of frames, animated GIF, or mp4/mkv/… via the optional PyAV) -> Video.
    Frames are sampled at `fps` (at most `max_frames`, default fps·300 s), paired for the temporal patch (an odd
    count repeats the last frame), resized together to one size with t·h·w within [min_pixels, max_pixels], and
    keep their timestamps. `source_fps` is the spacing of a frame list or folder (default: `fps`, i.e. every
    frame is kept) or overrides a file's own frame rate."""
    frames, src_fps, duration = load_frames(video, source_fps, default_fps=fps, max_frames=max_frames)
    indices = sample_frame_indices(len(frames), src_fps, fps, duration, max_frames)
    sizes = {frames[i].size for i in indices}
    if len(sizes) > 1:
        raise ValueError(f"video frames differ in size {sorted(sizes)}; resize them to one size first")
    width, height = frames[indices[0]].size
    h, w = smart_resize(len(indices), height, width, min_pixels, max_pixels)
    cache = {}  # repeated indices (odd padding) are resized once
    for i in indices:
        if i not in cache:
            cache[i] = np.asarray(to_rgb(frames[i]).resize((w, h), Image.Resampling.BICUBIC))
    x = _normalize(np.stack([cache[i] for i in indices]))  # (T, h, w, 3)
    grid = torch.tensor([[len(indices) // 2, h // PATCH_SIZE, w // PATCH_SIZE]], dtype=torch.long)
    times = [i / src_fps for i in indices]
    return Video(torch.from_numpy(_patchify(x)), grid, times[::2], times)


def video_layout(num_frames: int, size, fps: float = 2.0, source_fps: float = None, max_frames: int = None,
                 min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS):
    """(video_grid_thw (1, 3), timestamps) that `process_video` gives `num_frames` frames of size (width, height)
    spaced 1/source_fps apart, without touching pixels."""
    src_fps = source_fps or fps
    indices = sample_frame_indices(num_frames, src_fps, fps, num_frames / src_fps, max_frames)
    h, w = smart_resize(len(indices), size[1], size[0], min_pixels, max_pixels)
    grid = torch.tensor([[len(indices) // 2, h // PATCH_SIZE, w // PATCH_SIZE]], dtype=torch.long)
    return grid, [i / src_fps for i in indices][::2]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: any released tokenizer.json, or the tiny byte-level one
# ---------------------------------------------------------------------------------------------------------------

# the tiny preset's special tokens, ids 256… in this order (CONTRACT.md); 278–319 are reserved
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                       "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>",
                       "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>")
TINY_VOCAB_SIZE = 320
# every special token the chat format, the processor and the rewards rely on, looked up by string
REQUIRED_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                   "<|endoftext|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                   "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>",
                   "<|begin_of_box|>", "<|end_of_box|>")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the GLM special-token ids. `encode` never adds tokens of its own (the chat
    format writes `[gMASK]<sop>` itself); `decode(ids, skip_special_tokens=False)` keeps special tokens as strings,
    so rewards can see `<|begin_of_box|>`. Attributes: vocab_size, image_token_id, video_token_id, image_start_id,
    image_end_id, video_start_id, video_end_id, eos_token_ids (<|endoftext|>, <|user|>, <|observation|>),
    pad_token_id, special (string -> id for REQUIRED_TOKENS)."""

    def __init__(self, backend, source: str = "<in memory>"):
        missing = [s for s in REQUIRED_TOKENS if backend.token_to_id(s) is None]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.special = {s: backend.token_to_id(s) for s in REQUIRED_TOKENS}
        self.vocab_size = backend.get_vocab_size()
        self.image_token_id = self.special["<|image|>"]
        self.video_token_id = self.special["<|video|>"]
        self.image_start_id = self.special["<|begin_of_image|>"]
        self.image_end_id = self.special["<|end_of_image|>"]
        self.video_start_id = self.special["<|begin_of_video|>"]
        self.video_end_id = self.special["<|end_of_video|>"]
        self.eos_token_ids = (self.special["<|endoftext|>"], self.special["<|user|>"], self.special["<|observation|>"])
        self.pad_token_id = self.special["<|endoftext|>"]

    def encode(self, text: str) -> list:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str):
        """(ids, offsets): offsets[i] = (start, end) character span of token i in `text`."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.backend.token_to_id(token)

    def rope_index_kwargs(self, spatial_merge_size: int = MERGE_SIZE) -> dict:
        """The keyword arguments `rope2d.get_rope_index` needs, from this tokenizer's ids."""
        return dict(image_token_id=self.image_token_id, video_start_token_id=self.video_start_id,
                    video_end_token_id=self.video_end_id, spatial_merge_size=spatial_merge_size)

    def save(self, directory) -> str:
        """Write `tokenizer.json` into `directory` (so a checkpoint directory is self-contained); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        self.backend.save(path)
        return path


def load_tokenizer(path) -> Tokenizer:
    """A released `tokenizer.json` (or a directory holding one, e.g. a checkpoint) -> Tokenizer; special tokens are
    looked up by string, so the 9B's ids and the tiny preset's both come out right."""
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
    return Tokenizer(backend, source=file)


def _bytes_to_unicode() -> dict:
    """The byte-level BPE alphabet: byte b -> one printable unicode character (printable ASCII/Latin-1 map to
    themselves, the rest to code points from 256 up), so every byte string is a string of vocabulary symbols."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tiny_tokenizer() -> Tokenizer:
    """The tiny preset's tokenizer: ids 0–255 are raw UTF-8 bytes (every character costs its byte count), 256–277
    the GLM special tokens in CONTRACT.md order, 278–319 reserved; vocab 320."""
    symbols = _bytes_to_unicode()
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    reserved = [f"<|reserved_{i}|>" for i in range(256 + len(TINY_SPECIAL_TOKENS), TINY_VOCAB_SIZE)]
    backend.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                                for s in TINY_SPECIAL_TOKENS + tuple(reserved)])
    assert backend.get_vocab_size() == TINY_VOCAB_SIZE and backend.token_to_id("<|endoftext|>") == 256
    return Tokenizer(backend, source="tiny byte-level tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# The chat format (the released template) and caption pairs
# ---------------------------------------------------------------------------------------------------------------


def _image_text(num_tokens: int) -> str:
    return "<|begin_of_image|>" + "<|image|>" * num_tokens + "<|end_of_image|>"


def _video_text(grid, timestamps) -> str:
    """<|begin_of_video|> then, per frame pair, an image block followed by int(timestamp) as text."""
    t, h, w = (int(v) for v in grid.reshape(-1))
    per_pair = h * w // MERGE_SIZE ** 2
    stamps = list(timestamps[:t]) + [timestamps[-1] if timestamps else 0] * (t - len(timestamps))
    return "<|begin_of_video|>" + "".join(_image_text(per_pair) + str(int(s)) for s in stamps) + "<|end_of_video|>"


def _split_reply(reply: str):
    """'<think>r</think>rest' -> (r, rest); a reply without a think block -> (None, reply)."""
    if reply.startswith("<think>") and "</think>" in reply:
        reasoning, rest = reply[len("<think>"):].split("</think>", 1)
        return reasoning, rest
    return None, reply


def _tokenize_pieces(pieces, tokenizer: Tokenizer):
    """pieces [(text, in_loss)] -> (input_ids (T,) long, loss_mask (T,) bool, text). The whole text is tokenized at
    once (as the reference does); a token is in the loss when its first character is."""
    text = "".join(p for p, _ in pieces)
    char_loss = np.zeros(len(text) + 1, dtype=bool)
    at = 0
    for piece, in_loss in pieces:
        char_loss[at:at + len(piece)] = in_loss
        at += len(piece)
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([o[0] for o in offsets], dtype=np.int64)
    return (torch.tensor(ids, dtype=torch.long), torch.from_numpy(char_loss[starts].copy()), text)


def _chat_pieces(messages, image_tokens, videos, thinking: bool, add_generation_prompt):
    """The released template as (text, in_loss) pieces. image_tokens: merged-token count per image; videos:
    (grid, timestamps) per video, both in order of appearance."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1].get("role") != "assistant"
    pieces = [("[gMASK]<sop>", False)]
    n_images = n_videos = 0
    previous = None
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role == "system":
            if not isinstance(content, str):
                raise ValueError(f"message {k}: system content must be a string")
            pieces.append(("<|system|>\n" + content, False))
        elif role == "user":
            pieces.append(("<|user|>", previous == "assistant"))  # it ends the assistant turn before it
            pieces.append(("\n", False))
            for item in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
                if not isinstance(item, dict):
                    raise ValueError(f"message {k}: content items must be dicts, got {item!r:.80}")
                if item.get("type") == "video" or "video" in item:
                    if n_videos >= len(videos):
                        raise ValueError(f"messages use more videos than the {len(videos)} given")
                    pieces.append((_video_text(*videos[n_videos]), False))
                    n_videos += 1
                elif item.get("type") == "image" or "image" in item:
                    if n_images >= len(image_tokens):
                        raise ValueError(f"messages use more images than the {len(image_tokens)} given")
                    pieces.append((_image_text(image_tokens[n_images]), False))
                    n_images += 1
                elif item.get("type") == "text":
                    pieces.append((str(item.get("text", "")), False))
                else:
                    raise ValueError(f"message {k}: unknown content item type {item.get('type')!r}")
        elif role == "assistant":
            if not isinstance(content, str):
                raise ValueError(f"message {k}: assistant content must be a string")
            pieces.append((f"<|assistant|>{msg.get('metadata') or ''}\n", False))
            if thinking:
                pieces.append((content, True))
            else:  # no-think: an empty think block is part of the prompt, the answer is learned
                pieces.append(("<think></think>", False))
                pieces.append((_split_reply(content)[1], True))
        else:
            raise ValueError(f"message {k}: unknown role {role!r} (system, user or assistant)")
        previous = role
    if n_images != len(image_tokens) or n_videos != len(videos):
        raise ValueError(f"messages use {n_images} images and {n_videos} videos, but {len(image_tokens)} images and "
                         f"{len(videos)} videos were given")
    if add_generation_prompt:
        pieces.append(("<|assistant|>\n" + ("" if thinking else "<think></think>"), False))
    elif previous == "assistant":
        pieces.append(("<|endoftext|>", True))  # the last reply must learn to stop too
    return pieces


def _cat(tensors, dim: int = 0):
    """torch.cat done by numpy: single-threaded, so data work never contends with the trainer's OpenMP threads
    (on a busy CPU a threaded cat of a few MB can take 100× longer)."""
    return torch.from_numpy(np.concatenate([t.numpy() for t in tensors], axis=dim))


def _vision_tensors(images, videos, image_kw, video_kw):
    """Process images / videos (PIL, paths, already processed) -> the four vision tensors (None when absent) plus
    the token counts and video layouts the text needs."""
    pixel_values, image_grids = [], []
    for image in images:
        pv, grid = image if isinstance(image, tuple) else process_image(image, **image_kw)
        pixel_values.append(pv)
        image_grids.append(grid.reshape(1, 3))
    processed = [v if isinstance(v, Video) else process_video(v, **video_kw) for v in videos]
    tensors = dict(
        pixel_values=_cat(pixel_values) if pixel_values else None,
        image_grid_thw=_cat(image_grids) if image_grids else None,
        pixel_values_videos=_cat([v.pixel_values_videos for v in processed]) if processed else None,
        video_grid_thw=_cat([v.video_grid_thw for v in processed]) if processed else None)
    tokens = [int(g.prod()) // MERGE_SIZE ** 2 for g in image_grids]
    layouts = [(v.video_grid_thw, v.timestamps) for v in processed]
    return tensors, tokens, layouts


def render_chat(messages, tokenizer: Tokenizer, images=(), videos=(), thinking: bool = True,
                add_generation_prompt: bool = None, *, min_pixels: int = IMAGE_MIN_PIXELS,
                max_pixels: int = IMAGE_MAX_PIXELS, video_fps: float = 2.0, video_max_frames: int = None,
                video_min_pixels: int = VIDEO_MIN_PIXELS, video_max_pixels: int = VIDEO_MAX_PIXELS) -> dict:
    """A conversation -> model inputs, rendered exactly like the released GLM-4.1V chat template:
    `[gMASK]<sop>` then `<|system|>\\n…`, `<|user|>\\n…`, `<|assistant|>\\n…` per message, and `<|assistant|>\\n`
    as the generation prompt (default: when the last message is not the assistant's).

    messages: [{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"} | {"type": "video"} |
    {"type": "text", "text": str}]}]. `images` / `videos` fill the image / video items in order: PIL images or
    paths (or (pixel_values, grid) pairs), and whatever `process_video` takes (or Video objects). Each image is
    `<|begin_of_image|>` + one `<|image|>` per merged patch + `<|end_of_image|>`; a video is `<|begin_of_video|>`,
    per frame pair an image block followed by its int(timestamp), then `<|end_of_video|>`.
    thinking=False: `<think></think>` is prefilled after `<|assistant|>\\n` (and replaces any reasoning in replies).

    Returns dict(input_ids (T,) long, loss_mask (T,) bool, pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw (None when absent), text). loss_mask covers every assistant reply plus the token that ends it:
    the next `<|user|>`, or an appended `<|endoftext|>` after a final reply."""
    tensors, tokens, layouts = _vision_tensors(
        images, videos, dict(min_pixels=min_pixels, max_pixels=max_pixels),
        dict(fps=video_fps, max_frames=video_max_frames, min_pixels=video_min_pixels, max_pixels=video_max_pixels))
    input_ids, loss_mask, text = _tokenize_pieces(
        _chat_pieces(messages, tokens, layouts, thinking, add_generation_prompt), tokenizer)
    return dict(input_ids=input_ids, loss_mask=loss_mask, **tensors, text=text)


def _caption_pieces(text: str, image_tokens, videos):
    vision = "".join(_image_text(n) for n in image_tokens) + "".join(_video_text(*v) for v in videos)
    return [("[gMASK]<sop>" + vision, False), (text + "<|endoftext|>", True)]


def render_caption(text: str, tokenizer: Tokenizer, image=None, video=None, *, min_pixels: int = IMAGE_MIN_PIXELS,
                   max_pixels: int = IMAGE_MAX_PIXELS, video_fps: float = 2.0) -> dict:
    """A caption pair for pretraining (paper §3.1) -> `[gMASK]<sop>` + image (or video) block + text +
    `<|endoftext|>`, with the loss on the text and the end token. Same return dict as `render_chat`."""
    tensors, tokens, layouts = _vision_tensors([image] if image is not None else [],
                                               [video] if video is not None else [],
                                               dict(min_pixels=min_pixels, max_pixels=max_pixels), dict(fps=video_fps))
    input_ids, loss_mask, full = _tokenize_pieces(_caption_pieces(text, tokens, layouts), tokenizer)
    return dict(input_ids=input_ids, loss_mask=loss_mask, **tensors, text=full)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic world (SPEC §4): eight domains of verifiable tasks, each item deterministic from (seed, index)
# ---------------------------------------------------------------------------------------------------------------
# Every item has a question about a small PIL-rendered image (or a few video frames), a ground-truth answer in the
# CONTRACT.md format (what the RL verifiers score, paper §5), a short reasoning for the SFT reply
# `<think>…</think><answer><|begin_of_box|>X<|end_of_box|></answer>` (paper §4) and a caption for pretraining.
# Level 1 is one large object / a short string and a single step; level 5 crowds the scene, shrinks the text and
# needs several steps, so a tiny model learns the low levels and the high ones stay hard. Level 1 is sized for the
# tiny preset, which after minutes of training tells big shapes and positions apart but reads little: a word, the
# digits 1–4, a chart on a fixed scale, a big shape or button, a choice whose options never move — so that SFT
# leaves more domains with items RL can work on (README, Finding 1). Sides are multiples of 28 (no resize by the
# processor); a 112×112 image is 16 visual tokens, 224×168 is 48.

TASKS = ("math", "ocr", "counting", "chart", "grounding", "gui", "video_grounding", "choice")
LEVELS = (1, 2, 3, 4, 5)
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10  # one content hash in ten belongs to the held-out split
VIDEO_FPS = 2.0
COLORS = {"red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 90, 220), "yellow": (230, 190, 20),
          "purple": (140, 60, 180), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
OCR_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/1, O/0: unambiguous at low levels
WORDS = ("CAT", "DOG", "SUN", "MOON", "STAR", "TREE", "FISH", "BIRD", "BOOK", "LAMP", "RAIN", "SNOW", "WIND",
         "FIRE", "ROCK", "SHIP", "KING", "GOLD", "BLUE", "HELLO", "WORLD", "APPLE", "RIVER", "HOUSE", "LIGHT",
         "MUSIC", "PAPER", "TIGER", "ZEBRA", "CLOUD")
BUTTONS = ("Save", "Open", "Close", "Help", "Edit", "Copy", "Paste", "Print", "Undo", "Redo", "Find", "Send",
           "Share", "Delete", "Next", "Back", "Play", "Stop", "Menu", "Home")
WINDOW_TITLES = ("Editor", "Mail", "Files", "Music", "Photos", "Notes", "Chat", "Maps")
TYPE_WORDS = ("cat", "dog", "sun", "tea", "car", "pen", "map", "box", "hat", "cup")
LETTERS = "ABCD"


@dataclasses.dataclass
class Item:
    """One synthetic task instance. `image` (PIL) for image tasks, `frames` (PIL list at `fps`) for video; both
    None when made with render=False (then `size` and `num_frames` still give the token count). `answer` is the
    ground truth (CONTRACT.md format), `reasoning` the short chain of thought, `caption` the pretraining text,
    `key` the content that decides the split, `facts` what was drawn (boxes, colours, visible frames…)."""
    task: str
    level: int
    split: str
    seed: int
    index: int
    question: str
    answer: str
    reasoning: str
    caption: str
    key: str
    size: tuple  # (width, height)
    image: object = None
    frames: list = None
    num_frames: int = 0
    fps: float = VIDEO_FPS
    facts: dict = dataclasses.field(default_factory=dict)

    def reply(self, thinking: bool = True) -> str:
        """The SFT target: `<think>reasoning</think><answer><|begin_of_box|>answer<|end_of_box|></answer>`."""
        think = f"<think>{self.reasoning}</think>" if thinking else "<think></think>"
        return f"{think}<answer><|begin_of_box|>{self.answer}<|end_of_box|></answer>"

    def messages(self, with_reply: bool = True, thinking: bool = True) -> list:
        """The conversation: the image (or video) then the question; plus the reply when `with_reply`."""
        media = {"type": "video"} if self.num_frames else {"type": "image"}
        msgs = [{"role": "user", "content": [media, {"type": "text", "text": self.question}]}]
        if with_reply:
            msgs.append({"role": "assistant", "content": self.reply(thinking)})
        return msgs

    def media(self) -> dict:
        """{"images": [...], "videos": [...]} for render_chat; unrendered items give size-only stand-ins."""
        if self.num_frames:
            video = self.frames if self.frames is not None else Unrendered(self.size, self.num_frames, self.fps)
            return {"images": [], "videos": [video]}
        return {"images": [self.image if self.image is not None else Unrendered(self.size)], "videos": []}

    def prompt(self, tokenizer: Tokenizer, thinking: bool = True) -> dict:
        """render_chat of the question with the generation prompt (what RL rollouts start from)."""
        return render_chat(self.messages(with_reply=False), tokenizer, **self.media(), thinking=thinking)


@dataclasses.dataclass(frozen=True)
class Unrendered:
    """Stands in for an image (num_frames=0) or video whose pixels are not needed, only its size: used to measure
    a sample's token count cheaply while planning packs."""
    size: tuple  # (width, height)
    num_frames: int = 0
    fps: float = VIDEO_FPS


class _Retry(Exception):
    """A generator drew an impossible scene (e.g. objects that do not fit): try the next attempt."""


def _digest(*parts) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def split_of(key: str) -> str:
    """The split an item with content `key` belongs to. A function of the content alone, so no content can be in
    both splits."""
    return "heldout" if _digest("split", key) % HELDOUT_EVERY == 0 else "train"


@lru_cache(maxsize=None)
def _font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's embedded font: the same pixels on every machine


def _text_width(text: str, size: int) -> int:
    left, _, right, _ = _font(size).getbbox(text)
    return right - left


def _round_up(x: float, multiple: int = FACTOR) -> int:
    return int(math.ceil(x / multiple) * multiple)


def _draw_shape(draw, kind: str, box, color):
    """Fill `kind` inside the inclusive pixel box (x0, y0, x1, y1); its pixels span exactly that box."""
    x0, y0, x1, y1 = box
    mx, my = (x0 + x1) // 2, (y0 + y1) // 2
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (mx, y0)], fill=color)
    else:  # diamond
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=color)


def _place(rng, n: int, width: int, height: int, smin: int, smax: int, gap: int = 3, top: int = 0):
    """n square boxes of side smin..smax that neither overlap nor touch (gap px apart), inside the canvas."""
    boxes = []
    for _ in range(n):
        for _ in range(200):
            s = rng.randint(smin, smax)
            x0, y0 = rng.randint(2, width - 2 - s), rng.randint(top + 2, height - 2 - s)
            box = (x0, y0, x0 + s - 1, y0 + s - 1)
            if all(box[0] > b[2] + gap or box[2] < b[0] - gap or box[1] > b[3] + gap or box[3] < b[1] - gap
                   for b in boxes):
                boxes.append(box)
                break
        else:
            raise _Retry
    return boxes


def norm_box(box, width: int, height: int) -> list:
    """Inclusive pixel box -> [x1, y1, x2, y2] in 0–1000 image coordinates (the paper's grounding format)."""
    x0, y0, x1, y1 = box
    return [round(1000 * x0 / width), round(1000 * y0 / height), round(1000 * (x1 + 1) / width),
            round(1000 * (y1 + 1) / height)]


def _box_text(box) -> str:
    return "[" + ",".join(str(v) for v in box) + "]"


def _where(box, width: int, height: int) -> str:
    """Coarse place of a box: 'top left', 'middle right', 'center'…"""
    cx, cy = (box[0] + box[2] + 1) / 2 / width, (box[1] + box[3] + 1) / 2 / height
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def _num(x) -> str:
    """An exact number as the shortest decimal string: 42, -3, 3.5, 0.75."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{float(x):.6f}".rstrip("0").rstrip(".")


def _fraction(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _plural(kind: str, n: int = 2) -> str:
    return kind if n == 1 else kind + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _colors(rng, light: bool):
    """(text, background) colours: black on white at low levels, random dark on random light when `light`."""
    if not light:
        return (0, 0, 0), (255, 255, 255)
    return (tuple(rng.randint(0, 90) for _ in range(3)), tuple(rng.randint(190, 255) for _ in range(3)))


def _text_image(rng, text: str, size: int, light: bool, height: int = 56, noise: int = 0):
    """Spec of a one-line text image: returns (width, height, draw-fn, text box)."""
    width = max(112, _round_up(_text_width(text, size) + 20))
    fg, bg = _colors(rng, light)
    slack = width - _text_width(text, size) - 8
    x = 4 + rng.randint(0, max(0, slack))
    y = height // 2 + rng.randint(-(height // 2 - size // 2 - 2) // 2, (height // 2 - size // 2 - 2) // 2)
    specks = [(rng.randrange(width), rng.randrange(height), tuple(rng.randint(0, 255) for _ in range(3)))
              for _ in range(noise)]

    def draw():
        image = Image.new("RGB", (width, height), bg)
        d = ImageDraw.Draw(image)
        for sx, sy, c in specks:
            d.point((sx, sy), fill=c)
        d.text((x, y), text, font=_font(size), fill=fg, anchor="lm")
        return image
    return width, height, draw, _font(size).getbbox(text, anchor="lm")


def _gen_math(rng, level):
    """STEM: an arithmetic problem rendered as text; answers like 12, -3, 1/2, 0.75."""
    r = rng.randint
    steps = []
    if level <= 2:  # level 1: four digits to tell apart, drawn large
        a, b = (r(1, 4), r(1, 4)) if level == 1 else (r(0, 9), r(0, 9))
        expr, value = f"{a}+{b}", Fraction(a + b)
    elif level == 3:
        a, b, op = r(10, 49), r(1, 29), rng.choice("+-")
        expr, value = f"{a}{op}{b}", Fraction(a + b if op == "+" else a - b)
    elif level == 4:
        a, b, c, form = r(2, 12), r(2, 12), r(1, 30), rng.randrange(3)
        if form == 0:
            expr, value, steps = f"{a}*{b}+{c}", Fraction(a * b + c), [f"{a * b}+{c}"]
        elif form == 1:
            expr, value, steps = f"{a}*{b}-{c}", Fraction(a * b - c), [f"{a * b}-{c}"]
        else:
            c = c % 8 + 2
            expr, value, steps = f"({a}+{b})*{c}", Fraction((a + b) * c), [f"{a + b}*{c}"]
    else:
        op = rng.choice("+-")
        if rng.random() < 0.6:  # fractions with small denominators
            b, d = rng.choice((2, 3, 4, 5, 6)), rng.choice((2, 3, 4, 5, 6))
            a, c = r(1, b - 1), r(1, d - 1)
            x, y = Fraction(a, b), Fraction(c, d)
            lcm = b * d // math.gcd(b, d)
            expr = f"{a}/{b}{op}{c}/{d}"
            steps = [f"{a * lcm // b}/{lcm}{op}{c * lcm // d}/{lcm}"] if b != d else []
            value = x + y if op == "+" else x - y
        else:  # quarter decimals
            x, y = Fraction(r(1, 40), 4), Fraction(r(1, 40), 4)
            expr, value = f"{_num(x)}{op}{_num(y)}", (x + y if op == "+" else x - y)
    answer = _num(value) if "." in expr else _fraction(value)
    shown = re.sub(r"(?<=[\d)])([+\-*])", r" \1 ", expr) + " = ?"
    width, height, draw, box = _text_image(rng, shown, {1: 32, 2: 28, 3: 24, 4: 20, 5: 18}[level], level >= 4)
    return dict(question="What is the answer to the problem in the image?", answer=answer,
                reasoning="=".join([expr] + steps + [answer]), caption=f"A math problem: {expr}=?", key=expr,
                size=(width, height), draw=draw, facts={"expression": expr, "text_box": box})


def _gen_ocr(rng, level):
    """OCR: a rendered string in varied size, colour and background (level 1: one of 30 words, whose shape is
    enough; then random characters, a word and a number, three words in noise)."""
    if level == 1:
        text = rng.choice(WORDS)
    elif level == 2:
        text = "".join(rng.choice(OCR_CHARS) for _ in range(rng.randint(2, 3)))
    elif level == 3:
        text = "".join(rng.choice(OCR_CHARS) for _ in range(rng.randint(4, 5)))
    elif level == 4:
        text = f"{rng.choice(WORDS)} {rng.randint(10, 99)}"
    else:
        text = f"{rng.choice(WORDS)} {rng.choice(WORDS).lower()} {rng.randint(100, 999)}"
    size = {1: 28, 2: 28, 3: 24, 4: 20, 5: 14}[level]
    width, height, draw, box = _text_image(rng, text, size, level >= 4, noise=0 if level < 5 else 40)
    return dict(question="What text is written in the image?", answer=text, reasoning=f"It reads {text}.",
                caption=f"The text in the image reads: {text}", key=text, size=(width, height), draw=draw,
                facts={"text": text, "text_box": box})


def _gen_counting(rng, level):
    """Counting: how many objects of a kind (and colour) — with distractors from level 3 on."""
    side, (lo, hi), (dlo, dhi), (smin, smax) = {
        1: (112, (1, 3), (0, 0), (22, 34)), 2: (112, (1, 5), (0, 0), (16, 26)), 3: (140, (2, 6), (1, 3), (14, 24)),
        4: (168, (2, 8), (2, 4), (14, 22)), 5: (168, (3, 10), (3, 6), (12, 18))}[level]
    n, d = rng.randint(lo, hi), rng.randint(dlo, dhi)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    boxes = _place(rng, n + d, side, side, smin, smax)
    objects = [(kind, color)] * n
    for _ in range(d):
        if level == 3:  # another kind, any colour
            objects.append((rng.choice([s for s in SHAPES if s != kind]), rng.choice(list(COLORS))))
        else:  # shares the kind or the colour, never both
            other_kind, other_color = rng.choice([s for s in SHAPES if s != kind]), rng.choice(
                [c for c in COLORS if c != color])
            objects.append(rng.choice([(kind, other_color), (other_kind, color), (other_kind, other_color)]))
    target = f"{color} {_plural(kind)}" if level >= 4 else _plural(kind)
    groups = {}
    for k, c in objects:
        groups[(c, k)] = groups.get((c, k), 0) + 1
    caption = "There " + ("is " if list(groups.values())[0] == 1 else "are ") + _join(
        f"{m} {c} {_plural(k, m)}" for (c, k), m in groups.items()) + "."
    bg = (240, 240, 240) if level == 5 else (255, 255, 255)

    def draw():
        image = Image.new("RGB", (side, side), bg)
        d_ = ImageDraw.Draw(image)
        for (k, c), box in zip(objects, boxes):
            _draw_shape(d_, k, box, COLORS[c])
        return image
    return dict(question=f"How many {target} are there?", answer=str(n),
                reasoning=f"I count the {target}: " + " ".join(str(i) for i in range(1, n + 1)) + ".",
                caption=caption, key=f"{target}|{sorted(zip(objects, boxes))}", size=(side, side), draw=draw,
                facts={"objects": objects, "boxes": boxes, "target": (kind, color if level >= 4 else None)})


def _gen_chart(rng, level):
    """Charts: a bar chart with labelled values; read one value (level 1: two bars on a fixed 0–10 scale, so a bar's
    height is its value), add two, or find the maximum, its year or the total."""
    if level <= 3:
        width, height, k = 168, 112, (2 if level <= 2 else rng.randint(3, 4))
    else:
        width, height, k = 224, 168, rng.randint(3, 4) if level == 4 else 5
    if level == 5:
        start = rng.randint(1950, 2015)
        labels = [str(start + i) for i in range(k)]
    else:
        labels = list("ABCDE"[:k])
    values = [Fraction(rng.randint(1, {1: 9, 2: 20, 3: 50, 4: 50, 5: 60}[level])) for _ in range(k)]
    val = dict(zip(labels, values))

    def named(lab):
        return f"{lab}={_num(val[lab])}"
    form = rng.randrange(2)
    if level <= 3:  # read one value
        a = rng.choice(labels)
        question, answer, reasoning = f"What is the value of bar {a}?", _num(val[a]), named(a)
    elif level == 4 and form == 0:  # add two values
        a, b = sorted(rng.sample(labels, 2))
        question, answer = f"What is {a} plus {b}?", _num(val[a] + val[b])
        reasoning = f"{named(a)}, {named(b)}, {_num(val[a])}+{_num(val[b])}={answer}"
    elif level == 4 or form == 0:  # the maximum (level 5: its year)
        if values.count(max(values)) > 1:
            raise _Retry
        a = max(labels, key=val.get)
        question = "What is the largest value?" if level == 4 else "Which year has the highest value?"
        answer, reasoning = (_num(val[a]) if level == 4 else a), f"max is {named(a)}"
    else:  # level 5: the total
        question, answer = "What is the total of all values?", _num(sum(values))
        reasoning = "+".join(_num(v) for v in values) + f"={answer}"
    font = {1: 14, 2: 11, 3: 11, 4: 10, 5: 10}[level]
    base, top = height - 16, 16  # bar baseline and the highest bar's top
    slot = (width - 8) / k
    bar_w = int(slot * 0.6)
    vmax = Fraction(10) if level == 1 else max(values)  # level 1: a fixed 0–10 scale
    bars = []
    for i, v in enumerate(values):
        x0 = int(4 + i * slot + (slot - bar_w) / 2)
        h = max(2, round(float(v / vmax) * (base - top)))
        bars.append((x0, base - h, x0 + bar_w - 1, base - 1))
    color = COLORS[rng.choice(list(COLORS))]

    def draw():
        image = Image.new("RGB", (width, height), (255, 255, 255))
        d = ImageDraw.Draw(image)
        d.line((2, base, width - 3, base), fill=(0, 0, 0))
        for (x0, y0, x1, y1), v, lab in zip(bars, values, labels):
            d.rectangle((x0, y0, x1, y1), fill=color)
            d.text(((x0 + x1 + 1) / 2, y0 - 2), _num(v), font=_font(font), fill=(0, 0, 0), anchor="md")
            d.text(((x0 + x1 + 1) / 2, base + 2), lab, font=_font(font), fill=(0, 0, 0), anchor="mt")
        return image
    return dict(question=question, answer=answer, reasoning=reasoning,
                caption="A bar chart: " + ", ".join(f"{lab}={_num(v)}" for lab, v in zip(labels, values)) + ".",
                key=f"{labels}|{[_num(v) for v in values]}|{question}", size=(width, height), draw=draw,
                facts={"labels": labels, "values": [_num(v) for v in values], "bars": bars, "color": color})


def _gen_grounding(rng, level):
    """Grounding: find the described shape; answer its box in 0–1000 coordinates (two boxes at level 5)."""
    side, (lo, hi), (smin, smax) = {1: (112, (1, 1), (56, 84)), 2: (112, (1, 1), (28, 60)),
                                    3: (112, (2, 2), (24, 44)), 4: (168, (4, 6), (18, 36)),
                                    5: (168, (5, 7), (16, 30))}[level]
    n = rng.randint(lo, hi)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    targets = 2 if level == 5 else 1
    objects = [(kind, color)] * targets
    while len(objects) < n:
        k, c = rng.choice(SHAPES), rng.choice(list(COLORS))
        if level == 3 and (k == kind or c == color):
            continue
        if level >= 4 and rng.random() < 0.6:  # hard distractors share the kind or the colour
            k, c = rng.choice([(kind, c), (k, color)])
        if (k, c) != (kind, color):
            objects.append((k, c))
    boxes = _place(rng, n, side, side, smin, smax, gap=4)
    desc = kind if level <= 2 else f"{color} {kind}"
    found = sorted(boxes[:targets])
    normed = [norm_box(b, side, side) for b in found]
    if targets == 1:
        question, answer = f"Find the {desc}.", _box_text(normed[0])
        reasoning = f"The {desc} is at the {_where(found[0], side, side)}."
    else:
        question, answer = f"Find every {desc}.", "[" + ",".join(_box_text(b) for b in normed) + "]"
        reasoning = f"Two {_plural(desc)}: {_where(found[0], side, side)} and {_where(found[1], side, side)}."
    caption = "Objects: " + "; ".join(f"{c} {k} {_box_text(norm_box(b, side, side))}"
                                      for (k, c), b in zip(objects, boxes)) + "."

    def draw():
        image = Image.new("RGB", (side, side), (255, 255, 255))
        d = ImageDraw.Draw(image)
        for (k, c), box in zip(objects, boxes):
            _draw_shape(d, k, box, COLORS[c])
        return image
    return dict(question=question, answer=answer, reasoning=reasoning, caption=caption,
                key=f"{question}|{sorted(zip(objects, boxes))}", size=(side, side), draw=draw,
                facts={"objects": objects, "boxes": boxes, "targets": found, "target": (kind, color)})


def _gen_gui(rng, level):
    """GUI: a window of labelled buttons; click the named one (answer its box), or at level 5 follow the
    instruction written in the window, which may ask to type a word instead. Level 1: two big buttons."""
    width, height, n, font = {1: (168, 112, 2, 13), 2: (168, 112, 2, 13), 3: (168, 112, 3, 12),
                              4: (224, 168, 4, 12), 5: (224, 168, rng.randint(4, 6), 11)}[level]
    labels = rng.sample(BUTTONS, n)
    title = rng.choice(WINDOW_TITLES)
    top = 20 if level < 5 else 36  # title bar (+ the instruction line at level 5)
    cols = n if level <= 3 else 2 if n == 4 else 3
    rows = math.ceil(n / cols)
    cell_w, cell_h = (width - 8) / cols, (height - top - 4) / rows
    cells = rng.sample(range(cols * rows), n)
    boxes = []
    for lab, cell in zip(labels, cells):
        bw, bh = min(int(cell_w) - 6, _text_width(lab, font) + rng.randint(10, 18)), rng.randint(font + 6, font + 12)
        if level == 1:  # each button fills most of its half of the window
            bw, bh = int(cell_w) - 12, int(cell_h) - 24
        if bw < _text_width(lab, font) + 6:  # the label must fit inside its button
            raise _Retry
        r_, c_ = divmod(cell, cols)
        x0 = int(4 + c_ * cell_w + rng.randint(2, max(2, int(cell_w) - bw - 2)))
        y0 = int(top + 2 + r_ * cell_h + rng.randint(0, max(0, int(cell_h) - bh - 2)))
        boxes.append((x0, y0, x0 + bw - 1, y0 + bh - 1))
    i = rng.randrange(n)
    action = "type" if level == 5 and rng.random() < 0.3 else "click"
    word = rng.choice(TYPE_WORDS)
    note = (f"Type: {word}" if action == "type" else f"Click {labels[i]}") if level == 5 else None
    target = norm_box(boxes[i], width, height)
    if action == "click":
        answer = json.dumps({"action": "click", "box": target}, separators=(",", ":"))
        reasoning = f"{labels[i]} is at the {_where(boxes[i], width, height)}."
    else:
        answer = json.dumps({"action": "type", "text": word}, separators=(",", ":"))
        reasoning = f"The window asks to type {word}."
    question = "Do what the window says." if level == 5 else f"Click the {labels[i]} button."
    caption = f'A "{title}" window with buttons ' + ", ".join(
        f"{lab} {_box_text(norm_box(b, width, height))}" for lab, b in zip(labels, boxes)) + (
        f'; it says "{note}".' if note else ".")

    def draw():
        image = Image.new("RGB", (width, height), (236, 236, 236))
        d = ImageDraw.Draw(image)
        d.rectangle((0, 0, width - 1, 17), fill=(50, 70, 120))
        d.text((6, 9), title, font=_font(11), fill=(255, 255, 255), anchor="lm")
        if note:
            d.text((6, 27), note, font=_font(12), fill=(0, 0, 0), anchor="lm")
        for lab, (x0, y0, x1, y1) in zip(labels, boxes):
            d.rectangle((x0, y0, x1, y1), fill=(250, 250, 250), outline=(120, 120, 120))
            d.text(((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2), lab, font=_font(font), fill=(0, 0, 0), anchor="mm")
        return image
    return dict(question=question, answer=answer, reasoning=reasoning, caption=caption,
                key=f"{question}|{title}|{note}|{list(zip(labels, boxes))}", size=(width, height), draw=draw,
                facts={"labels": labels, "boxes": boxes, "target": i, "action": action, "note": note})


def _gen_video(rng, level):
    """Video temporal grounding: a few small frames at 2 fps; when is the object visible? Answer [start, end] in
    seconds (end = the time the object is gone). Intervals follow frame pairs (whole seconds) up to level 4."""
    side = 84
    n_frames = {1: 8, 2: rng.choice((8, 10, 12)), 3: 12, 4: 16, 5: 16}[level]
    step = 1 if level == 5 else 2  # level 5: any frame; else whole frame pairs
    while True:
        f0, f1 = sorted(rng.sample(range(0, n_frames + 1, step), 2))
        if f1 - f0 >= (4 if level == 1 else 2) and f1 - f0 < n_frames:
            break
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    s = rng.randint(26, 36) if level <= 2 else rng.randint(18, 28)
    start_box, end_box = _place(rng, 2, side, side, s, s, gap=-side)  # where it enters / leaves (may overlap)
    moving = level >= 3
    distractors = []
    if level >= 2:  # a static object of another kind, always visible
        k = rng.choice([x for x in SHAPES if x != kind])
        distractors.append((k, rng.choice(list(COLORS)), _place(rng, 1, side, side, 18, 26)[0], 0, n_frames))
    if level >= 4:  # another object of the same kind, another colour, visible at other times
        g0, g1 = sorted(rng.sample(range(0, n_frames + 1, step), 2))
        distractors.append((kind, rng.choice([c for c in COLORS if c != color]),
                            _place(rng, 1, side, side, 18, 26)[0], g0, g1))

    def where(f):  # the target's box in frame f
        if not moving or f1 - f0 <= 1:
            return start_box
        a = (f - f0) / (f1 - f0 - 1)
        return tuple(round(p + a * (q - p)) for p, q in zip(start_box, end_box))
    start, end = f0 / VIDEO_FPS, f1 / VIDEO_FPS
    if level <= 4:
        reasoning = "Seen at " + " ".join(str(t) for t in range(f0 // 2, f1 // 2)) + "."
    else:
        reasoning = f"First seen at {start:.1f}, last at {(f1 - 1) / VIDEO_FPS:.1f}."
    caption = f"{_a(color).capitalize()} {kind} is visible from {start:.1f} s to {end:.1f} s." + "".join(
        f" {_a(c).capitalize()} {k} is visible from {g0 / VIDEO_FPS:.1f} s to {g1 / VIDEO_FPS:.1f} s."
        for k, c, _, g0, g1 in distractors)

    def draw():
        frames = []
        for f in range(n_frames):
            image = Image.new("RGB", (side, side), (255, 255, 255))
            d = ImageDraw.Draw(image)
            for k, c, box, g0, g1 in distractors:
                if g0 <= f < g1:
                    _draw_shape(d, k, box, COLORS[c])
            if f0 <= f < f1:  # the target is drawn last: on top
                _draw_shape(d, kind, where(f), COLORS[color])
            frames.append(image)
        return frames
    return dict(question=f"When is the {color} {kind} visible? Answer in seconds.",
                answer=f"[{start:.1f}, {end:.1f}]", reasoning=reasoning, caption=caption,
                key=f"{n_frames}|{kind}|{color}|{f0}|{f1}|{start_box}|{end_box}|{distractors}", size=(side, side),
                draw=draw, num_frames=n_frames,
                facts={"visible": list(range(f0, f1)), "target": (kind, color), "distractors": distractors})


def _gen_choice(rng, level):
    """Multiple choice: the shape or colour of an object, or which shape sits just left/right of another; the
    answer is one letter. Level 1 lists every shape in one fixed order, so a shape's letter never changes; from
    level 2 on the options are shuffled and the letter must be looked up."""
    if level <= 3:
        side = 112
        objects = [(rng.choice(SHAPES), rng.choice(list(COLORS)))]
        boxes = _place(rng, 1, side, side, 44, 70)
        kind, color = objects[0]
        if level <= 2:
            question, correct, pool, why = "What shape is this?", kind, SHAPES, f"It is a {kind}"
        else:
            question, correct, pool, why = "What color is this shape?", color, tuple(COLORS), f"It is {color}"
        options_n = {1: len(SHAPES), 2: 2, 3: 3}[level]
        caption = f"{_a(color).capitalize()} {kind}."
    elif level == 4:
        side = 140
        objects = [(k, rng.choice(list(COLORS))) for k in rng.sample(SHAPES, rng.randint(2, 3))]
        boxes = _place(rng, len(objects), side, side, 26, 40, gap=6)
        kind, color = objects[0]
        question, correct, pool, why = f"What color is the {kind}?", color, tuple(COLORS), f"The {kind} is {color}"
        options_n = 4
        caption = _join(f"{_a(c)} {k}" for k, c in objects).capitalize() + "."
    else:  # three shapes in a row; ask for the immediate neighbour, never the one beyond it
        side, s = 168, rng.randint(24, 36)
        objects = [(k, rng.choice(list(COLORS))) for k in rng.sample(SHAPES, 3)]  # left to right
        slot = (side - 8) // 3
        boxes = []
        for j in range(3):
            x, y = 4 + j * slot + rng.randint(0, slot - s - 2), rng.randint(10, side - s - 10)
            boxes.append((x, y, x + s - 1, y + s - 1))
        anchor = rng.randrange(3)
        direction = "right" if anchor == 0 else "left" if anchor == 2 else rng.choice(("left", "right"))
        other = anchor + (1 if direction == "right" else -1)
        beyond = {0, 1, 2} - {anchor, other}
        (ak, ac), ok = objects[anchor], objects[other][0]
        question, correct, why = f"What shape is just {direction} of the {ac} {ak}?", ok, \
            f"Just {direction} of the {ak} is a {ok}"
        pool = tuple(k for k in SHAPES if k not in {objects[j][0] for j in beyond})
        options_n = 3
        caption = _join(f"{_a(c)} {k}" for k, c in objects).capitalize() + ", from left to right."
    if level == 1:
        options = list(SHAPES)
    else:
        options = rng.sample([p for p in pool if p != correct], options_n - 1)
        options.insert(rng.randrange(options_n), correct)
    letter = LETTERS[options.index(correct)]
    question += "".join(f"\n{LETTERS[j]}. {o}" for j, o in enumerate(options))
    bg = (255, 255, 255)

    def draw():
        image = Image.new("RGB", (side, side), bg)
        d = ImageDraw.Draw(image)
        for (k, c), box in zip(objects, boxes):
            _draw_shape(d, k, box, COLORS[c])
        return image
    return dict(question=question, answer=letter, reasoning=f"{why}, so {letter}.", caption=caption,
                key=f"{question}|{list(zip(objects, boxes))}", size=(side, side), draw=draw,
                facts={"objects": objects, "boxes": boxes, "options": options, "correct": correct})


GENERATORS = {"math": _gen_math, "ocr": _gen_ocr, "counting": _gen_counting, "chart": _gen_chart,
              "grounding": _gen_grounding, "gui": _gen_gui, "video_grounding": _gen_video, "choice": _gen_choice}


def make_item(task: str, index: int, seed: int = 0, split: str = "train", level: int = None,
              render: bool = True) -> Item:
    """Item `index` of `task` in `split` ("train" or "heldout"): the same for the same arguments in any process.
    level: 1 (easy) … 5 (hard); default cycles with the index. render=False skips drawing (sizes stay known)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    level = LEVELS[index % len(LEVELS)] if level is None else level
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    for attempt in range(10_000):  # draw until the content hashes into the requested split
        rng = random.Random(_digest("item", seed, task, split, index, level, attempt))
        try:
            spec = GENERATORS[task](rng, level)
        except _Retry:
            continue
        key = f"{task}|{level}|{spec['key']}"
        if split_of(key) == split:
            break
    else:
        raise RuntimeError(f"could not draw a {split} item for {task} level {level}")
    item = Item(task=task, level=level, split=split, seed=seed, index=index, question=spec["question"],
                answer=spec["answer"], reasoning=spec["reasoning"], caption=spec["caption"], key=key,
                size=spec["size"], num_frames=spec.get("num_frames", 0), facts=spec["facts"])
    if render:
        drawn = spec["draw"]()
        if item.num_frames:
            item.frames = drawn
        else:
            item.image = drawn
    return item


def answer_boxes(item: Item) -> list:
    """The 0–1000 boxes an item's answer names (grounding, GUI clicks); [] for other answers."""
    if item.task == "grounding":
        boxes = json.loads(item.answer)
        return boxes if isinstance(boxes[0], list) else [boxes]
    if item.task == "gui":
        action = json.loads(item.answer)
        return [action["box"]] if action["action"] == "click" else []
    return []


def contact_sheet(items, columns: int = 4, tile: int = 240) -> Image.Image:
    """A grid of items a person can check at a glance: the image (video frames in a strip), the task, level,
    question and answer; grounding and GUI targets are outlined in magenta."""
    text_h, font = 100, _font(11)
    rows = math.ceil(len(items) / columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_h)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for n, item in enumerate(items):
        x, y = (n % columns) * tile, (n // columns) * (tile + text_h)
        if item.num_frames:
            per_row = 4
            small = (tile - 8) // per_row
            for f, frame in enumerate(item.frames):
                fx, fy = x + 4 + (f % per_row) * small, y + 4 + (f // per_row) * small
                sheet.paste(frame.resize((small - 2, small - 2), Image.Resampling.NEAREST), (fx, fy))
                d.text((fx + 2, fy + 1), f"{f / item.fps:.1f}", font=_font(9), fill=(120, 120, 120))
        else:
            image = item.image.copy()
            for box in answer_boxes(item):  # drawn from the answer string itself, so the sheet checks it
                x0, y0, x1, y1 = (v * s / 1000 for v, s in zip(box, image.size * 2))
                ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 0, 255))
            fit = min((tile - 8) / image.width, (tile - 8) / image.height)
            scale = min(2, math.floor(fit)) if fit >= 1 else fit  # whole-pixel zoom keeps small text legible
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
            sheet.paste(image, (x + 4, y + 4))
        lines = [f"{item.task} L{item.level} {item.split} #{item.index}"]
        for line in item.question.split("\n"):
            while line:
                cut = len(line) if _text_width(line, 11) < tile - 8 else max(
                    k for k in range(1, len(line) + 1) if _text_width(line[:k], 11) < tile - 8)
                lines.append(line[:cut])
                line = line[cut:]
        lines = lines[:7] + [f"= {item.answer}"]
        for k, line in enumerate(lines):
            d.text((x + 4, y + tile + 1 + k * 12), line, font=font, fill=(180, 0, 0) if line.startswith("=") else 0)
        d.rectangle((x, y, x + tile - 1, y + tile + text_h - 1), outline=(200, 200, 200))
    return sheet


# ---------------------------------------------------------------------------------------------------------------
# Datasets: JSONL (conversations or caption pairs) and the synthetic world
# ---------------------------------------------------------------------------------------------------------------
# A *sample* is a dict: a conversation {"messages", "images", "videos", "thinking"} or a caption pair
# {"image" | "video", "text"}. A *source* maps an index to a sample (`sample(i)`) and to its token count
# (`length(i, tokenizer)`, cheap: no pixels), and says how many samples it has (`size`, None = endless).


def _image_size(image):
    """(width, height) of an image, stand-in or file, without decoding the pixels."""
    if isinstance(image, (Image.Image, Unrendered)):
        return image.size
    path = os.fspath(image)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable image ({e})") from e


def _sized_layout(images, videos, fps: float = VIDEO_FPS):
    """Token counts of images and (grid, timestamps) of videos, from sizes alone where possible."""
    tokens = []
    for image in images:
        grid = image[1] if isinstance(image, tuple) else image_grid(_image_size(image))
        tokens.append(int(grid.prod()) // MERGE_SIZE ** 2)
    layouts = []
    for video in videos:
        if isinstance(video, Video):
            layouts.append((video.video_grid_thw, video.timestamps))
        elif isinstance(video, Unrendered):
            layouts.append(video_layout(video.num_frames, video.size, fps=fps, source_fps=video.fps))
        elif isinstance(video, (list, tuple)):  # frames (images or paths), 1/fps apart
            layouts.append(video_layout(len(video), _image_size(video[0]), fps=fps))
        elif os.path.isdir(video):
            files = frame_files(video)
            layouts.append(video_layout(len(files), _image_size(files[0]), fps=fps))
        else:  # a GIF or video file: decoding is the only sure way to know its frames and timing
            processed = process_video(video, fps=fps)
            layouts.append((processed.video_grid_thw, processed.timestamps))
    return tokens, layouts


def encode_sample(sample: dict, tokenizer: Tokenizer, sizes_only: bool = False) -> dict:
    """A sample -> the `render_chat` / `render_caption` dict. With sizes_only, only input_ids and loss_mask are
    made (images are sized, not processed), which is how packs are planned."""
    if "messages" in sample:
        images, videos = sample.get("images") or [], sample.get("videos") or []
        thinking = sample.get("thinking", True)
        if not sizes_only:
            return render_chat(sample["messages"], tokenizer, images=images, videos=videos, thinking=thinking)
        tokens, layouts = _sized_layout(images, videos)
        input_ids, loss_mask, text = _tokenize_pieces(
            _chat_pieces(sample["messages"], tokens, layouts, thinking, None), tokenizer)
        return dict(input_ids=input_ids, loss_mask=loss_mask, text=text)
    if "text" in sample and ("image" in sample or "video" in sample):
        if not sizes_only:
            return render_caption(sample["text"], tokenizer, image=sample.get("image"), video=sample.get("video"))
        tokens, layouts = _sized_layout([sample["image"]] if sample.get("image") is not None else [],
                                        [sample["video"]] if sample.get("video") is not None else [])
        input_ids, loss_mask, text = _tokenize_pieces(_caption_pieces(sample["text"], tokens, layouts), tokenizer)
        return dict(input_ids=input_ids, loss_mask=loss_mask, text=text)
    raise ValueError(f"a sample needs 'messages' or 'image'/'video' + 'text', got keys {sorted(sample)}")


_MEDIA_TAG = re.compile(r"(<image>|<video>)")


def _resolve(p, root: str):
    """A media path (or a list of frame paths) from a JSONL line -> absolute; missing files raise."""
    if isinstance(p, (list, tuple)):
        return [_resolve(x, root) for x in p]
    if not isinstance(p, str):
        raise ValueError(f"media paths must be strings, got {p!r:.60}")
    full = p if os.path.isabs(p) else os.path.join(root, p)
    if not os.path.exists(full):
        raise FileNotFoundError(f"file not found: {p}")
    return full


def parse_record(obj, root: str = ".") -> dict:
    """One decoded JSONL object (see JsonlSource) -> a normalised sample with paths made absolute against `root`.
    Raises ValueError / FileNotFoundError describing the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        if isinstance(obj.get("text"), str) and ("image" in obj or "video" in obj):
            key = "image" if "image" in obj else "video"
            return {key: _resolve(obj[key], root), "text": obj["text"]}
        raise ValueError(f"expected 'messages' (a conversation) or 'image' + 'text' (a caption pair), got keys "
                         f"{sorted(obj)}")
    messages = []
    images = [_resolve(p, root) for p in obj.get("images") or []]
    videos = [_resolve(p, root) for p in obj.get("videos") or []]
    inline_images, inline_videos = [], []
    if not isinstance(obj["messages"], list) or not obj["messages"]:
        raise ValueError("'messages' must be a non-empty list")
    for k, msg in enumerate(obj["messages"]):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"messages[{k}] needs 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{k}]: unknown role {role!r} (system, user or assistant)")
        if role == "user" and isinstance(content, str) and _MEDIA_TAG.search(content):
            content = [{"type": part[1:-1]} if part in ("<image>", "<video>") else {"type": "text", "text": part}
                       for part in _MEDIA_TAG.split(content) if part]
        if isinstance(content, list):
            if role != "user":
                raise ValueError(f"messages[{k}]: only user messages may hold images or videos")
            for item in content:
                if not isinstance(item, dict) or item.get("type") not in ("image", "video", "text"):
                    raise ValueError(f"messages[{k}]: content items must be {{'type': 'image'|'video'|'text'}}")
                if item["type"] == "image" and isinstance(item.get("image"), str):
                    inline_images.append(_resolve(item["image"], root))
                if item["type"] == "video" and isinstance(item.get("video"), (str, list)):
                    inline_videos.append(_resolve(item["video"], root))
            content = [{"type": i["type"], "text": i["text"]} if i["type"] == "text" else {"type": i["type"]}
                       for i in content]
        elif not isinstance(content, str):
            raise ValueError(f"messages[{k}]: content must be a string or a list of items")
        messages.append({**{key: v for key, v in msg.items() if key == "metadata"}, "role": role,
                         "content": content})
    images, videos = images or inline_images, videos or inline_videos
    used = [sum(1 for m in messages if isinstance(m["content"], list) for i in m["content"] if i["type"] == t)
            for t in ("image", "video")]
    if used != [len(images), len(videos)]:
        raise ValueError(f"the messages place {used[0]} images and {used[1]} videos but the line gives "
                         f"{len(images)} images and {len(videos)} videos")
    return {"messages": messages, "images": images, "videos": videos, "thinking": bool(obj.get("thinking", True))}


class JsonlSource:
    """Samples from a JSONL file, one JSON object per line:
    - a conversation {"messages": [{"role": "system"|"user"|"assistant", "content": ...}], "images": [path…],
      "videos": [path | [frame paths]…], "thinking": bool (optional)}, where user content is a string with
      `<image>` / `<video>` tags where the media go, or a list of {"type": "image"|"video"|"text", …} items
      (an item may carry its own path as "image": path / "video": path);
    - a caption pair {"image": path, "text": str} (or {"video": path, "text": str}).
    Relative paths are relative to the file's folder. Every line is checked when the file is opened (fields,
    roles, media counts, that paths exist): problems raise ValueError naming the file and line."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"dataset not found: {self.path}")
        self.root = os.path.dirname(os.path.abspath(self.path))
        self.records, self.lines = [], []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = parse_record(json.loads(line), self.root)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
                except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
                    raise ValueError(f"{self.path}:{lineno}: {e}") from e
                self.records.append(record)
                self.lines.append(lineno)
        if not self.records:
            raise ValueError(f"{self.path}: no samples")
        self.size = len(self.records)

    def where(self, i: int) -> str:
        return f"{self.path}:{self.lines[i]}"

    def sample(self, i: int) -> dict:
        return self.records[i]

    def length(self, i: int, tokenizer: Tokenizer) -> int:
        try:
            return len(encode_sample(self.records[i], tokenizer, sizes_only=True)["input_ids"])
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.where(i)}: {e}") from e

    def encode(self, i: int, tokenizer: Tokenizer) -> dict:
        try:
            return encode_sample(self.records[i], tokenizer)
        except (ValueError, OSError) as e:
            raise ValueError(f"{self.where(i)}: {e}") from e


class SyntheticSource:
    """The synthetic world as an endless source: sample i is item i // len(tasks) of tasks[i % len(tasks)] (a
    round-robin over domains) at level levels[(i // len(tasks)) % len(levels)].
    kind="sft": the conversation with its reasoning reply (a `no_think_share` of samples get an empty think block,
    paper §4, so `--no-think` works later); kind="caption": the image (or video) and its caption (pretraining)."""
    size = None

    def __init__(self, kind: str = "sft", split: str = "train", seed: int = 0, tasks=TASKS, levels=LEVELS,
                 no_think_share: float = 0.0):
        if kind not in ("sft", "caption"):
            raise ValueError(f"kind must be 'sft' or 'caption', got {kind!r}")
        unknown = [t for t in tasks if t not in GENERATORS]
        if unknown or not tasks:
            raise ValueError(f"unknown tasks {unknown}; tasks are {', '.join(TASKS)}")
        self.kind, self.split, self.seed = kind, split, seed
        self.tasks, self.levels, self.no_think_share = tuple(tasks), tuple(levels), no_think_share

    def item(self, i: int, render: bool = True) -> Item:
        j = i // len(self.tasks)
        return make_item(self.tasks[i % len(self.tasks)], j, self.seed, self.split,
                         self.levels[j % len(self.levels)], render)

    def sample(self, i: int, render: bool = True) -> dict:
        item = self.item(i, render)
        media = item.media()
        if self.kind == "caption":
            return ({"video": media["videos"][0]} if item.num_frames else {"image": media["images"][0]}) | {
                "text": item.caption}
        thinking = _digest("think", self.seed, i) % 10_000 >= self.no_think_share * 10_000
        return {"messages": item.messages(thinking=thinking), **media, "thinking": thinking}

    def length(self, i: int, tokenizer: Tokenizer) -> int:
        return len(encode_sample(self.sample(i, render=False), tokenizer, sizes_only=True)["input_ids"])

    def encode(self, i: int, tokenizer: Tokenizer) -> dict:
        return encode_sample(self.sample(i), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Packing (paper §3.2: sample packing): fixed-length sequences, a global order, resumable
# ---------------------------------------------------------------------------------------------------------------


class PackedLoader:
    """Fixed-length packed batches in an order that depends only on the global sample position.

    The stream: position s is sample s of `source` (endless sources), or sample perm_e[s mod N] of epoch e =
    s // N with perm_e a permutation seeded by (seed, e). Packs: greedy in stream order — a sample that does not fit
    starts the next pack; a sample longer than `seq_len` is skipped (recorded in `self.skipped`). Global step g is
    packs g·P … g·P+P-1 (P = packs_per_step); rank r of `world` gets the contiguous packs g·P + r·P/w …, one batch
    dict per pack, so any world size sees the same global batches. Planning needs only token counts
    (`source.length`); only a rank's own packs are rendered.

    A batch (one pack) is a dict: input_ids (1, T) long; labels (1, T) long, = input_ids where the loss applies and
    -100 elsewhere, NOT shifted (the logits at t-1 predict labels[t]); position_ids (3, 1, T) — each sample's own
    3D positions from `rope2d.get_rope_index`, restarting at 0; cu_seqlens (n+1,) int32 — sample boundaries, the
    padding tail (pad id, no loss) being one more segment; pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw of the pack's samples in order (None when absent); samples — the stream positions packed.

    Use: `loader.batch(g)` (this rank's packs of global step g), or iterate (steps `loader.step`, +1 …);
    `state_dict()` / `load_state_dict()` resume at the next step, also with another world size. num_workers > 0
    renders batches in DataLoader worker processes."""

    def __init__(self, source, tokenizer: Tokenizer, seq_len: int, packs_per_step: int = 1, *, rank: int = 0,
                 world: int = 1, seed: int = 0, num_workers: int = 0):
        if packs_per_step % world:
            raise ValueError(f"packs_per_step ({packs_per_step}) must be a multiple of the world size ({world})")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.source, self.tokenizer, self.seq_len = source, tokenizer, seq_len
        self.packs_per_step, self.rank, self.world, self.seed = packs_per_step, rank, world, seed
        self.num_workers = num_workers
        self.rope_kwargs = tokenizer.rope_index_kwargs()
        self.step = 0
        self.skipped = set()  # stream positions of samples longer than seq_len
        self._starts = {0: 0}  # pack index -> stream position where it starts
        self._lengths = {}
        self._perm = (None, None)

    # --- the plan: which samples go into which pack -----------------------------------------------------------

    def index(self, s: int) -> int:
        """The source index at stream position s."""
        n = self.source.size
        if n is None:
            return s
        epoch, k = divmod(s, n)
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(n))
        return int(self._perm[1][k])

    def _length(self, s: int) -> int:
        if s not in self._lengths:
            if len(self._lengths) > 200_000:
                self._lengths.clear()
            self._lengths[s] = self.source.length(self.index(s), self.tokenizer)
        return self._lengths[s]

    def pack(self, p: int) -> list:
        """Stream positions of the samples in pack p (global pack index)."""
        if p in self._starts:
            q = p
        else:
            known = [q for q in self._starts if q <= p]
            if not known:
                raise ValueError(f"pack {p} lies before the resume point (pack {min(self._starts)})")
            q = max(known)
        while True:
            s, used, members, misses = self._starts[q], 0, [], 0
            while True:
                length = self._length(s)
                if length > self.seq_len:
                    self.skipped.add(s)
                    misses += 1
                    if self.source.size is not None and misses > self.source.size:
                        raise ValueError(f"no sample fits in seq_len={self.seq_len}")
                    s += 1
                    continue
                if used + length > self.seq_len:
                    break
                members.append(s)
                used += length
                s += 1
            self._starts[q + 1] = s
            if len(self._starts) > 100_000:  # keep the plan's memory bounded: forget the oldest half
                for old in sorted(self._starts)[:50_000]:
                    del self._starts[old]
            if q == p:
                return members
            q += 1

    # --- rendering a pack --------------------------------------------------------------------------------------

    def render(self, members: list) -> dict:
        """Samples (stream positions) -> one packed batch dict (see the class docstring)."""
        ids, labels, positions, cu = [], [], [], [0]
        vision = {k: [] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
        for s in members:
            enc = self.source.encode(self.index(s), self.tokenizer)
            n = len(enc["input_ids"])
            if n != self._length(s):
                raise RuntimeError(f"sample {self.index(s)}: planned {self._length(s)} tokens but rendered {n}")
            pos, _ = rope2d.get_rope_index(enc["input_ids"][None], enc["image_grid_thw"], enc["video_grid_thw"],
                                           **self.rope_kwargs)
            ids.append(enc["input_ids"])
            labels.append(torch.where(enc["loss_mask"], enc["input_ids"], torch.full_like(enc["input_ids"], -100)))
            positions.append(pos)
            cu.append(cu[-1] + n)
            for k in vision:
                if enc[k] is not None:
                    vision[k].append(enc[k])
        pad = self.seq_len - cu[-1]
        if pad:  # the tail is one more segment: pad tokens, no loss, positions from 0
            ids.append(torch.full((pad,), self.tokenizer.pad_token_id, dtype=torch.long))
            labels.append(torch.full((pad,), -100, dtype=torch.long))
            positions.append(torch.arange(pad).view(1, 1, pad).repeat(3, 1, 1))
            cu.append(self.seq_len)
        return dict(input_ids=_cat(ids)[None], labels=_cat(labels)[None],
                    position_ids=_cat(positions, dim=2), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                    **{k: _cat(v) if v else None for k, v in vision.items()}, samples=list(members))

    def batch(self, g: int) -> list:
        """This rank's packs of global step g: a list of packs_per_step / world batch dicts."""
        share = self.packs_per_step // self.world
        first = g * self.packs_per_step + self.rank * share
        return [self.render(self.pack(p)) for p in range(first, first + share)]

    # --- iteration and resuming --------------------------------------------------------------------------------

    def __iter__(self):
        if self.num_workers == 0:
            while True:
                out = self.batch(self.step)
                self.step += 1
                yield out
        loader = torch.utils.data.DataLoader(_StepDataset(self), batch_size=None, num_workers=self.num_workers,
                                             sampler=range(self.step, 2 ** 62), collate_fn=_identity)
        for g, out, next_start in loader:
            self._starts[(g + 1) * self.packs_per_step] = next_start
            self.step = g + 1
            yield out

    def state_dict(self) -> dict:
        """Where to resume: the next global step and the stream position where its first pack starts."""
        p = self.step * self.packs_per_step
        if p not in self._starts:
            self.pack(p)
        return dict(step=self.step, pack=p, position=self._starts[p], seq_len=self.seq_len,
                    packs_per_step=self.packs_per_step, seed=self.seed, skipped=len(self.skipped))

    def load_state_dict(self, state: dict):
        for key in ("seq_len", "packs_per_step", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: {key} was {state[key]}, now {getattr(self, key)}")
        self.step = state["step"]
        self._starts = {state["pack"]: state["position"]}
        self._lengths.clear()


def _identity(x):
    return x


class _StepDataset(torch.utils.data.Dataset):
    """Global step g -> (g, this rank's batch, stream position after the step) for DataLoader workers."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader

    def __getitem__(self, g):
        out = self.loader.batch(g)
        end = (g + 1) * self.loader.packs_per_step
        self.loader.pack(end - 1)  # makes sure the start of the next step is known
        return g, out, self.loader._starts[end]


# ---------------------------------------------------------------------------------------------------------------
# The quality pipeline (paper §3.1): heuristic filters, de-duplication, relevance, concept balance, recaptioning
# ---------------------------------------------------------------------------------------------------------------
# Streams a JSONL file (the JsonlSource formats) to a cleaned one. Nothing is dropped silently: every dropped line
# is counted by reason (and written to `rejects` with its reason when asked), and broken images never stop the run.

STOPWORDS = frozenset("a an the and or but of in on at to with for from by as is are was were be been this that "
                      "these those it its there here image picture photo shows showing shown".split())


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: the signs of the 8×8 lowest DCT frequencies of a 32×32 grey thumbnail against their
    median. Re-encoding, small resizes and mild colour changes keep it within a few bits."""
    grey = np.asarray(to_rgb(image).convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    n = np.arange(32)
    basis = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64)  # DCT-II rows: basis[k, x]
    low = (basis @ grey @ basis.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term (mean brightness) does not vote on the threshold
    return int("".join("1" if b else "0" for b in bits), 2)


class NearDuplicateIndex:
    """Perceptual hashes kept so far. Two hashes within Hamming distance d agree on at least one of d+1 bands
    (pigeonhole), so a lookup compares only against hashes sharing a band instead of against all."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(64 * i / bands) for i in range(bands + 1)]
        self.masks = [(((1 << (b - a)) - 1) << a, a) for a, b in zip(edges[:-1], edges[1:])]
        self.buckets = [dict() for _ in self.masks]

    def find(self, h: int):
        """A kept hash within max_distance of h, or None."""
        for (mask, _), bucket in zip(self.masks, self.buckets):
            for other in bucket.get(h & mask, ()):
                if bin(h ^ other).count("1") <= self.max_distance:
                    return other
        return None

    def add(self, h: int):
        for (mask, _), bucket in zip(self.masks, self.buckets):
            bucket.setdefault(h & mask, []).append(h)


def _load_for_filter(path: str, max_image_pixels: int):
    """(image, None) or (None, reason) — never raises on a bad file."""
    if not os.path.exists(path):
        return None, "missing_file"
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_image_pixels  # PIL refuses above 2× this; the warning above 1× becomes an error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
        return image, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "decompression_bomb"
    except (OSError, SyntaxError, ValueError) as e:
        return None, "truncated" if "truncated" in str(e).lower() else "unreadable"
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _record_text(sample: dict) -> str:
    """The text a record pairs with its images: the caption, or every message of a conversation."""
    if "messages" not in sample:
        return sample["text"]
    return "\n".join(m["content"] if isinstance(m["content"], str) else " ".join(
        i.get("text", "") for i in m["content"]) for m in sample["messages"])


def concepts_of(text: str, vocabulary=None) -> set:
    """The concepts a text mentions: entries of `vocabulary` (words or phrases) found in it, or without one its
    content words (lower-case, 3+ letters, no stop words)."""
    lower = text.lower()
    if vocabulary is not None:
        words = set(re.findall(r"[a-z0-9]+", lower))
        return {c for c in vocabulary if (c in words if " " not in c else c in lower)}
    return {w for w in re.findall(r"[a-z]{3,}", lower) if w not in STOPWORDS}


def import_callable(spec: str):
    """'package.module:function' -> the function (for the pluggable scorer and recaptioner)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec}: {e}") from e


def quality_filter(in_path, out_path, *, min_side: int = 32, max_aspect: float = 20.0, min_text_chars: int = 2,
                   max_text_chars: int = 20_000, solid_std: float = 2.0, dedup: bool = True,
                   phash_distance: int = 4, scorer=None, min_score: float = 0.3, balance_t: int = None,
                   concepts=None, recaption=None, max_image_pixels: int = 89_478_485, rejects=None, seed: int = 0,
                   progress: bool = True) -> dict:
    """Filter a JSONL dataset (paper §3.1) and write the kept lines, in order, to `out_path`:
    1. heuristics — images at least `min_side` px on the short side, aspect ratio at most `max_aspect`, not one
       solid colour (grey std < `solid_std`), text length within [min_text_chars, max_text_chars];
    2. de-duplication — exact (identical pixels) and near (perceptual hash within `phash_distance` bits);
    3. relevance — `scorer(image, text) -> float` (e.g. a CLIP similarity), keep when ≥ `min_score`;
    4. concept-balanced resampling (MetaCLIP-style) when `balance_t` is set — a concept mentioned by n > t kept
       lines selects each of them with probability t/n, and a line stays if any of its concepts selects it, so
       head concepts are thinned and long-tail ones kept whole (lines with no concept stay);
    5. recaptioning — `recaption(image, text) -> str` rewrites caption pairs' text (the old one is kept as
       "original_text").
    Unparseable lines, missing, unreadable, truncated or decompression-bomb images are dropped and counted.
    Returns {"read", "kept", "dropped": {reason: count}}; `rejects` (a path) receives every dropped line with its
    reason."""
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    if not os.path.exists(in_path):
        raise FileNotFoundError(f"input not found: {in_path}")
    root = os.path.dirname(os.path.abspath(in_path))
    vocabulary = None if concepts is None else {c.strip().lower() for c in concepts if c.strip()}
    dropped, kept = {}, []  # kept: (lineno, object, sample, concepts)
    exact_seen, near = set(), NearDuplicateIndex(phash_distance)
    reject_file = open(rejects, "w", encoding="utf-8") if rejects else None

    def drop(lineno, raw, reason, detail=""):
        dropped[reason] = dropped.get(reason, 0) + 1
        if reject_file:
            reject_file.write(json.dumps({"line": lineno, "reason": reason, "detail": detail, "raw": raw}) + "\n")

    with open(in_path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())
    read = 0
    with open(in_path, encoding="utf-8") as f, tqdm(total=total, desc="filter", unit="line",
                                                    disable=not progress) as bar:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            read += 1
            bar.update(1)
            raw = raw.rstrip("\n")
            try:
                obj = json.loads(raw)
                sample = parse_record(obj, root)
            except json.JSONDecodeError as e:
                drop(lineno, raw, "bad_json", e.msg)
                continue
            except FileNotFoundError as e:
                drop(lineno, raw, "missing_file", str(e))
                continue
            except (ValueError, TypeError, KeyError) as e:
                drop(lineno, raw, "bad_record", str(e))
                continue
            paths = sample.get("images") or ([sample["image"]] if "image" in sample else [])
            text = _record_text(sample)
            images, reason = [], None
            for path in paths:
                image, reason = _load_for_filter(path, max_image_pixels)
                if reason:
                    break
                w, h = image.size
                if min(w, h) < min_side:
                    reason = "too_small"
                elif max(w, h) / min(w, h) > max_aspect:
                    reason = "aspect_ratio"
                elif np.asarray(to_rgb(image).convert("L"), dtype=np.float32).std() < solid_std:
                    reason = "solid_color"
                if reason:
                    break
                images.append(image)
            if not reason and not min_text_chars <= len(text.strip()) <= max_text_chars:
                reason = "text_length"
            exact = hashes = None
            if not reason and dedup:
                exact = hashlib.blake2b(b"".join(im.mode.encode() + str(im.size).encode() + im.tobytes()
                                                 for im in images) or text.encode(), digest_size=16).digest()
                hashes = [phash(im) for im in images]
                if exact in exact_seen:
                    reason = "exact_duplicate"
                elif any(near.find(h) is not None for h in hashes):
                    reason = "near_duplicate"
            if not reason and scorer is not None and images:
                try:
                    score = min(float(scorer(im, text)) for im in images)
                except Exception as e:  # a broken scorer must not lose the run; the line is counted
                    drop(lineno, raw, "scorer_error", repr(e))
                    continue
                if score < min_score:
                    reason = "low_relevance"
            if reason:
                drop(lineno, raw, reason)
                continue
            if dedup:
                exact_seen.add(exact)
                for h in hashes:
                    near.add(h)
            kept.append((lineno, obj, sample, concepts_of(text, vocabulary)))
    if balance_t is not None:
        counts = {}
        for *_, cs in kept:
            for c in cs:
                counts[c] = counts.get(c, 0) + 1
        balanced = []
        for entry in kept:
            lineno, obj, _, cs = entry
            rng = random.Random(_digest("balance", seed, lineno))
            if not cs or any(rng.random() < balance_t / counts[c] for c in sorted(cs)):
                balanced.append(entry)
            else:
                drop(lineno, json.dumps(obj), "resampled_out")
        kept = balanced
    with open(out_path, "w", encoding="utf-8") as out:
        for lineno, obj, sample, _ in kept:
            if recaption is not None and "image" in sample and "messages" not in sample:
                try:
                    new = recaption(open_image(sample["image"]), sample["text"])
                    obj = {**obj, "text": str(new), "original_text": sample["text"]}
                except Exception as e:  # keep the line with its old caption, but say so
                    dropped["recaption_failed_kept"] = dropped.get("recaption_failed_kept", 0) + 1
                    if reject_file:
                        reject_file.write(json.dumps({"line": lineno, "reason": "recaption_failed_kept",
                                                      "detail": repr(e)}) + "\n")
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    if reject_file:
        reject_file.close()
    return {"read": read, "kept": len(kept), "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1]))}


# ---------------------------------------------------------------------------------------------------------------
# Command line: filter | show | export
# ---------------------------------------------------------------------------------------------------------------


def export_world(out_dir, tasks=TASKS, n: int = 100, kind: str = "sft", split: str = "train", level: int = None,
                 seed: int = 0, start: int = 0) -> str:
    """Write n items per task as a JSONL dataset (images as PNG, videos as 2-fps GIFs) into out_dir; returns the
    JSONL path. Conversations carry their task, answer and level so they double as RL prompts."""
    os.makedirs(os.path.join(out_dir, "media"), exist_ok=True)
    path = os.path.join(out_dir, f"{kind}_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            for i in tqdm(range(start, start + n), desc=f"export {task}", unit="item"):
                item = make_item(task, i, seed, split, level)
                stem = f"media/{task}_{split}_{seed}_{i}"
                if item.num_frames:
                    media = stem + ".gif"
                    item.frames[0].save(os.path.join(out_dir, media), save_all=True, append_images=item.frames[1:],
                                        duration=int(1000 / item.fps), loop=0)
                else:
                    media = stem + ".png"
                    item.image.save(os.path.join(out_dir, media))
                tag, key = ("<video>", "videos") if item.num_frames else ("<image>", "images")
                if kind == "caption":
                    record = {key[:-1]: media, "text": item.caption}
                else:
                    record = {"messages": [{"role": "user", "content": tag + item.question},
                                           {"role": "assistant", "content": item.reply()}], key: [media],
                              "task": task, "answer": item.answer, "level": item.level}
                f.write(json.dumps(record) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="GLM-4.1V data tools: the quality pipeline (paper §3.1) and the "
                                                 "synthetic task world.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("filter", help="clean a JSONL dataset: heuristics, de-duplication, relevance, concept "
                                      "balance, recaptioning")
    f.add_argument("input", help="input JSONL (conversations or {image, text} caption pairs)")
    f.add_argument("output", help="where the kept lines go")
    f.add_argument("--min-side", type=int, default=32, help="drop images whose short side is below this (px)")
    f.add_argument("--max-aspect", type=float, default=20.0, help="drop images with a longer aspect ratio")
    f.add_argument("--min-text-chars", type=int, default=2, help="drop lines with less text")
    f.add_argument("--max-text-chars", type=int, default=20_000, help="drop lines with more text")
    f.add_argument("--solid-std", type=float, default=2.0, help="drop images whose grey std is below this")
    f.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    f.add_argument("--phash-distance", type=int, default=4, help="near duplicate: perceptual hashes within this "
                                                                 "many bits")
    f.add_argument("--scorer", help="relevance scorer module:function(image, text) -> float, e.g. a CLIP score")
    f.add_argument("--min-score", type=float, default=0.3, help="keep lines the scorer rates at least this")
    f.add_argument("--balance-t", type=int, help="concept-balanced resampling: at most about this many lines per "
                                                 "concept")
    f.add_argument("--concepts", help="concept vocabulary file, one word or phrase per line (default: content "
                                      "words)")
    f.add_argument("--recaption", help="recaption hook module:function(image, text) -> new caption")
    f.add_argument("--max-image-pixels", type=int, default=89_478_485, help="decompression-bomb limit (pixels)")
    f.add_argument("--rejects", help="write every dropped line with its reason to this JSONL")
    f.add_argument("--seed", type=int, default=0, help="seed of the concept resampling")
    s = sub.add_parser("show", help="write a contact sheet of synthetic items")
    s.add_argument("--domain", default="all", help=f"one of {', '.join(TASKS)}, or all")
    s.add_argument("--n", type=int, default=8, help="items per domain")
    s.add_argument("--out", default="grid.png", help="PNG to write")
    s.add_argument("--level", type=int, choices=LEVELS, help="difficulty (default: cycles 1–5)")
    s.add_argument("--split", default="train", choices=SPLITS, help="which split")
    s.add_argument("--seed", type=int, default=0, help="world seed")
    s.add_argument("--start", type=int, default=0, help="first item index")
    s.add_argument("--columns", type=int, default=4, help="tiles per row")
    e = sub.add_parser("export", help="write synthetic items as a JSONL dataset with image files")
    e.add_argument("out_dir", help="output folder")
    e.add_argument("--domain", default="all", help=f"one of {', '.join(TASKS)}, or all")
    e.add_argument("--n", type=int, default=100, help="items per domain")
    e.add_argument("--kind", default="sft", choices=("sft", "caption"), help="conversations or caption pairs")
    e.add_argument("--level", type=int, choices=LEVELS, help="difficulty (default: cycles 1–5)")
    e.add_argument("--split", default="train", choices=SPLITS, help="which split")
    e.add_argument("--seed", type=int, default=0, help="world seed")
    args = parser.parse_args(argv)

    if args.command == "filter":
        concepts = None
        if args.concepts:
            with open(args.concepts, encoding="utf-8") as fh:
                concepts = fh.read().splitlines()
        summary = quality_filter(
            args.input, args.output, min_side=args.min_side, max_aspect=args.max_aspect,
            min_text_chars=args.min_text_chars, max_text_chars=args.max_text_chars, solid_std=args.solid_std,
            dedup=not args.no_dedup, phash_distance=args.phash_distance,
            scorer=import_callable(args.scorer) if args.scorer else None, min_score=args.min_score,
            balance_t=args.balance_t, concepts=concepts,
            recaption=import_callable(args.recaption) if args.recaption else None,
            max_image_pixels=args.max_image_pixels, rejects=args.rejects, seed=args.seed)
        print(f"read {summary['read']} lines, kept {summary['kept']}, dropped "
              f"{summary['read'] - summary['kept']}")
        for reason, count in summary["dropped"].items():
            print(f"  {reason:<24}{count}")
        return summary
    tasks = TASKS if args.domain == "all" else (args.domain,)
    if any(t not in TASKS for t in tasks):
        parser.error(f"--domain must be one of {', '.join(TASKS)} or all")
    if args.command == "show":
        items = [make_item(t, i, args.seed, args.split, args.level) for t in tasks
                 for i in range(args.start, args.start + args.n)]
        contact_sheet(items, columns=args.columns).save(args.out)
        print(f"wrote {args.out}: {len(items)} items")
        return args.out
    path = export_world(args.out_dir, tasks, args.n, args.kind, args.split, args.level, args.seed)
    print(f"wrote {path}")
    return path


# --- benchmarks (called by bench.py) ---


def bench_data(device="cpu"):
    """Throughput of the data side on the CPU: the synthetic generator, the packer feeding a tiny training run
    (peer: how many samples per second the tiny model's training step consumes, measured here), and the image
    processor on a few sizes."""
    import model as M

    torch.manual_seed(0)
    tok, rows = tiny_tokenizer(), []

    def rate(fn, min_time=1.0):
        fn()  # warm up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_time:
            n += fn()
        return n / (time.perf_counter() - start)

    counter = iter(range(10 ** 9))

    def one_item():
        i = next(counter)
        make_item(TASKS[i % len(TASKS)], i // len(TASKS))
        return 1
    items = rate(one_item)
    rows.append(dict(name="synthetic items (rendered)", ours=round(items), peer=None, ratio=None, units="items/s"))
    loader = PackedLoader(SyntheticSource("sft"), tok, seq_len=1024)
    stream = iter(loader)
    packed = rate(lambda: len(next(stream)[0]["samples"]))
    cfg = M.PRESETS["tiny"]
    net = M.GLM4V(cfg).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = loader.batch(0)[0]

    def train_step():
        b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = net(b["input_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                     pixel_values_videos=b["pixel_values_videos"], video_grid_thw=b["video_grid_thw"],
                     position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"])
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), b["labels"][0, 1:], ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return len(batch["samples"])
    consumed = rate(train_step, min_time=2.0)
    rows.append(dict(name="packed SFT samples (1 process, seq 1024) vs tiny train step", ours=round(packed),
                     peer=round(consumed, 1), ratio=round(packed / consumed, 1), units="samples/s",
                     peer_name="samples/s a tiny GLM4V fwd+bwd+AdamW step consumes"))
    for w, h in ((112, 112), (448, 448), (1280, 720)):
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
        rows.append(dict(name=f"process_image {w}x{h}", ours=round(rate(lambda: process_image(image) and 1), 1),
                         peer=None, ratio=None, units="images/s"))
    return rows


if __name__ == "__main__":
    main()
