"""Data for GLM-4.1V-Thinking (arXiv 2507.01006): the image and video processor, the tokenizer, the chat and reply
format, datasets and sample packing. (The synthetic task world that is the default data is world.py; the
paper's data-quality pipeline is quality.py.)

    PIL image ──process_image──► pixel_values (N, 3·2·14·14), image_grid_thw (1, 3)
    frames | folder | GIF | mp4 ──process_video──► Video(pixel_values_videos, video_grid_thw, timestamps)
    messages + images/videos ──render_chat──► input_ids, loss_mask + the vision tensors
    JSONL / .json (OpenAI, ShareGPT, alpaca) | world.SyntheticSource ──PackedLoader──► fixed-length packs
    tokenizer + processor constants ──save_hf_files──► the Hugging Face files next to exported weights

Choices made here, where the paper and the reference implementation leave room:
- Images are processed exactly like the `transformers` Glm4v image processor (PIL backend), bit for bit. Videos
  follow its video processor for frame sampling, resize targets, patch order and the prompt layout; frames are
  resized with PIL bicubic like still images (the reference video path uses torchvision, which differs by
  interpolation round-off).
- The rendered text is exactly the released chat template (CHAT_TEMPLATE, which every export carries). Its
  assistant turns have no end token (the next `<|user|>` ends them), so for training the loss covers each assistant
  reply *and the token that ends it*: the following `<|user|>`, or an appended `<|endoftext|>` after the last
  reply. Both are stop tokens of the model. `thinking=False` prefills `<think></think>` (outside the loss; the
  template's `enable_thinking=False`), which makes "no thinking" a real switch.
- Earlier turns' replies are shown as the released model's client shows them, by their answer alone
  (`history_reply`), in training as in chat; one that lost its reasoning that way is context, not a target.
- Datasets come as users bring them: JSONL or a JSON array, in the OpenAI / LLaMA-Factory, ShareGPT or alpaca
  form, or caption pairs (`parse_record`).
- Caption pairs (pretraining) are rendered without chat roles: `[gMASK]<sop>` image caption `<|endoftext|>`,
  loss on the caption and the end token.
- Packs hold whole samples, greedily in stream order (a sample that does not fit starts the next pack; one longer
  than the pack is skipped and counted). Labels are *not* shifted (`labels[t]` is the target of position t-1's
  logits, the Hugging Face convention); every sample starts with `[gMASK]`, outside the loss, so a shift never
  leaks across samples.
- The order depends only on the global sample position: finite sources are shuffled per epoch from (seed, epoch),
  endless ones (the synthetic world) are indexed directly. Global step g holds packs g·P … g·P+P-1 and rank r of
  w takes a contiguous 1/w of them, so any world size sees the same global batches.
"""
import base64
import dataclasses
import hashlib
import importlib
import io
import json
import math
import os
import re
import sys
import warnings

import numpy as np
import tokenizers
import torch
from PIL import Image, ImageSequence

import model as M
import rope2d

# ---------------------------------------------------------------------------------------------------------------
# The image processor (paper §2: native resolution, 2×2 merge, temporal patch of 2)
# ---------------------------------------------------------------------------------------------------------------

PATCH_SIZE = M.Config.patch_size  # 14: the ViT's patch geometry is the model's (config.json vision_config)
TEMPORAL_PATCH_SIZE = M.Config.temporal_patch_size  # 2 frames fold into one patch
MERGE_SIZE = M.Config.spatial_merge_size  # 2×2 patches become one visual token
FACTOR = PATCH_SIZE * MERGE_SIZE  # both sides become multiples of 28
IMAGE_MIN_PIXELS = 112 * 112
IMAGE_MAX_PIXELS = 28 * 28 * 12288  # the released preprocessor_config.json (transformers' class default: 28·28·15000)
VIDEO_MIN_PIXELS = 112 * 112
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000
VIDEO_MAX_DURATION = 300.0  # seconds; longer videos are sampled uniformly instead of at `fps`
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176 values per patch
VIDEO_FPS = 2.0  # frames sampled per second of video


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
        raise BadData("aspect_ratio", f"aspect ratio {max(height, width) / min(height, width):.1f} is above "
                                      f"{MAX_ASPECT_RATIO}:1 ({width}x{height}); crop or pad the image first")
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


def bad_reason(error) -> str:
    """The reason a sample is counted under when reading it raised `error`."""
    if isinstance(error, BadData):
        return error.reason
    return "missing_file" if isinstance(error, FileNotFoundError) else "bad_sample"


class BadData(ValueError):
    """A sample that cannot be used, and why (`reason`): the packer skips and counts it instead of stopping."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def open_image(path, decode: bool = True) -> Image.Image:
    """Open (and with decode, fully decode) an image file; missing, corrupt or truncated files and decompression
    bombs (more pixels than PIL's MAX_IMAGE_PIXELS) raise errors naming the path."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():  # PIL only warns up to twice its limit; such an image is a bomb too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if decode:
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadData("decompression_bomb", f"{path}: refusing a decompression bomb ({e})") from e
    except (OSError, SyntaxError) as e:
        raise BadData("unreadable_image", f"{path}: unreadable, corrupt or truncated image ({e})") from e
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

# every special token the chat format, the processor and the rewards rely on, looked up by string
REQUIRED_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                   "<|endoftext|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                   "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>",
                   "<|begin_of_box|>", "<|end_of_box|>")
# the ids a model config names (config.json's field -> its token), the same names on the tokenizer
TOKEN_ID_FIELDS = {"image_token_id": "<|image|>", "video_token_id": "<|video|>",
                   "image_start_token_id": "<|begin_of_image|>", "image_end_token_id": "<|end_of_image|>",
                   "video_start_token_id": "<|begin_of_video|>", "video_end_token_id": "<|end_of_video|>"}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the GLM special-token ids. `encode` never adds tokens of its own (the chat
    format writes `[gMASK]<sop>` itself); `decode(ids, skip_special_tokens=False)` keeps special tokens as strings,
    so rewards can see `<|begin_of_box|>`. Attributes: vocab_size, special (string -> id for REQUIRED_TOKENS), the
    TOKEN_ID_FIELDS ids under the names a model config uses (image_token_id, image_start_token_id, ...),
    eos_token_ids (model.END_OF_TURN), pad_token_id and force_answer_ids (the ids of FORCE_ANSWER).

    parse_special_tokens (False by default) says how special-token strings typed in message text are encoded: as
    plain text, so that a user who writes `<|user|>` or `<think>` cannot inject control tokens, or — for trusted
    data — as the control tokens they name (what `transformers`' template does)."""

    def __init__(self, backend, source: str = "<in memory>"):
        missing = [s for s in REQUIRED_TOKENS if backend.token_to_id(s) is None]
        if missing:
            raise ValueError(f"{source}: tokenizer lacks the special tokens {missing}")
        self.backend = backend
        self.special = {s: backend.token_to_id(s) for s in REQUIRED_TOKENS}
        self.vocab_size = backend.get_vocab_size()
        for name, token in TOKEN_ID_FIELDS.items():
            setattr(self, name, self.special[token])
        self.eos_token_ids = tuple(self.special[s] for s in M.END_OF_TURN)
        self.pad_token_id = self.eos_token_ids[0]
        self.force_answer_ids = self.encode(FORCE_ANSWER)
        self.parse_special_tokens = False
        specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        self.special_pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))

    def encode(self, text: str) -> list:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, plain: bool = False):
        """(ids, offsets): offsets[i] = (start, end) character span of token i in `text`. plain=True encodes
        special-token strings as the text they are."""
        self.backend.encode_special_tokens = plain
        try:
            enc = self.backend.encode(text, add_special_tokens=False)
        finally:
            self.backend.encode_special_tokens = False
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.backend.token_to_id(token)

    def rope_index_kwargs(self, spatial_merge_size: int = MERGE_SIZE) -> dict:
        """The keyword arguments `rope2d.get_rope_index` needs, from this tokenizer's ids."""
        return dict(image_token_id=self.image_token_id, video_start_token_id=self.video_start_token_id,
                    video_end_token_id=self.video_end_token_id, spatial_merge_size=spatial_merge_size)

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
    if not os.path.exists(path):
        raise FileNotFoundError(M.not_found(path, "tokenizer"))
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
    """The tiny preset's tokenizer: ids 0–255 are raw UTF-8 bytes (every character costs its byte count), then the
    GLM special tokens of model.TINY_SPECIAL_TOKENS in order, the rest of the preset's vocabulary reserved."""
    symbols = _bytes_to_unicode()
    vocab_size = M.PRESETS["tiny"].vocab_size
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={symbols[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    reserved = [f"<|reserved_{i}|>" for i in range(256 + len(M.TINY_SPECIAL_TOKENS), vocab_size)]
    backend.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False)
                                for s in M.TINY_SPECIAL_TOKENS + tuple(reserved)])
    assert backend.get_vocab_size() == vocab_size
    return Tokenizer(backend, source="tiny byte-level tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face files next to the weights: tokenizer, chat template, image and video processor
# ---------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json as the released model has it: eos and pad `<|endoftext|>`, left padding (batched
    generation), the special tokens by id. `PreTrainedTokenizerFast` loads in transformers 4 and 5 alike."""
    specials = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                         "single_word": t.single_word, "special": t.special}
                for i, t in sorted(tokenizer.backend.get_added_tokens_decoder().items())}
    pad = tokenizer.backend.id_to_token(tokenizer.pad_token_id)
    return {"added_tokens_decoder": specials, "clean_up_tokenization_spaces": False, "eos_token": pad,
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": model_max_length,
            "pad_token": pad, "padding_side": "left", "tokenizer_class": "PreTrainedTokenizerFast"}


def processor_configs() -> dict:
    """preprocessor_config.json and video_preprocessor_config.json: this processor's constants in the released
    files' fields (`size` holds the pixel budgets: shortest_edge = min pixels, longest_edge = max pixels)."""
    common = {"do_rescale": True, "patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE,
              "merge_size": MERGE_SIZE, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
              "processor_class": "Glm4vProcessor"}
    image = {"size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS}, **common,
             "image_processor_type": "Glm4vImageProcessor"}
    video = {"size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS}, **common, "fps": VIDEO_FPS,
             "video_processor_type": "Glm4vVideoProcessor"}
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def save_hf_files(directory, tokenizer: Tokenizer, model_max_length: int) -> list:
    """Write what transformers' AutoTokenizer / AutoProcessor read next to the weights: tokenizer.json,
    tokenizer_config.json, chat_template.jinja, preprocessor_config.json, video_preprocessor_config.json. Returns
    the file names."""
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(directory)
    files = {"tokenizer_config.json": tokenizer_config(tokenizer, model_max_length), **processor_configs()}
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(json.dumps(content, indent=2) + "\n")
    with open(os.path.join(directory, CHAT_TEMPLATE_FILE), "w") as f:
        f.write(CHAT_TEMPLATE)
    return ["tokenizer.json", *files, CHAT_TEMPLATE_FILE]


# ---------------------------------------------------------------------------------------------------------------
# The chat format (the released template) and caption pairs
# ---------------------------------------------------------------------------------------------------------------

# The reply format (paper §4): `<think>reasoning</think><answer>…<|begin_of_box|>final answer<|end_of_box|>…</answer>`
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
BOX_OPEN, BOX_CLOSE = "<|begin_of_box|>", "<|end_of_box|>"
REPLY_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, BOX_OPEN, BOX_CLOSE, ANSWER_CLOSE)  # in their required order
FORCE_ANSWER = THINK_CLOSE + ANSWER_OPEN  # inserted at the thinking budget so the model still answers (paper §5)
_REPLY_TAG = re.compile("|".join(re.escape(tag) for tag in REPLY_TAGS))


def format_reply(answer: str, reasoning: str = "", thinking: bool = True) -> str:
    """The reply a model should write: the reasoning (empty with thinking=False), then the boxed answer."""
    return (f"{THINK_OPEN}{reasoning if thinking else ''}{THINK_CLOSE}"
            f"{ANSWER_OPEN}{BOX_OPEN}{answer}{BOX_CLOSE}{ANSWER_CLOSE}")


def parse_reply(reply: str):
    """(box content, None) for a well-formed reply, else (None, what is wrong). Well-formed: optional whitespace,
    `<think>…</think>`, optional whitespace, `<answer>…</answer>`, optional whitespace and at most one end-of-turn
    token; the six tags occur exactly once each, in REPLY_TAGS order, so nesting, a second box or a box in the
    thinking are all malformed. One regex pass finds the tags: a 1 MB reply costs < 1 ms."""
    if not isinstance(reply, str):
        return None, f"reply is a {type(reply).__name__}, not a str"
    found = []
    for m in _REPLY_TAG.finditer(reply):
        if len(found) == len(REPLY_TAGS):
            return None, f"more than {len(REPLY_TAGS)} format tags"
        found.append(m)
    if [m.group() for m in found] != list(REPLY_TAGS):
        return None, f"format tags {''.join(m.group() for m in found) or 'missing'}; expected {''.join(REPLY_TAGS)}"
    think_open, think_close, answer_open, box_open, box_close, answer_close = found
    if reply[:think_open.start()].strip():
        return None, "text before <think>"
    if reply[think_close.end():answer_open.start()].strip():
        return None, "text between </think> and <answer>"
    tail = reply[answer_close.end():].strip()
    if tail and tail not in M.END_OF_TURN:
        return None, "text after </answer>"
    return reply[box_open.end():box_close.start()], None


def split_reply(reply: str):
    """'<think>r</think>rest' -> (r, rest); a reply without a think block -> (None, reply)."""
    if reply.startswith(THINK_OPEN) and THINK_CLOSE in reply:
        reasoning, rest = reply[len(THINK_OPEN):].split(THINK_CLOSE, 1)
        return reasoning, rest
    return None, reply


def history_reply(reply: str) -> str:
    """What a reply leaves in the context of later turns, as the released model's own client keeps it: the body of
    `<answer>…</answer>` when there is one, else what follows `</think>`, else the reply; end-of-turn tokens
    removed. The reasoning is never carried into later turns (GLM-V keeps `<think>` content out of the history)."""
    for token in M.END_OF_TURN:
        reply = reply.replace(token, "")
    if ANSWER_OPEN in reply and ANSWER_CLOSE in reply.split(ANSWER_OPEN, 1)[1]:
        return reply.split(ANSWER_OPEN, 1)[1].split(ANSWER_CLOSE, 1)[0]
    return reply.split(THINK_CLOSE, 1)[1] if THINK_CLOSE in reply else reply


# The released GLM-4.1V chat template (zai-org/GLM-4.1V-9B-Thinking, chat_template.jinja) with one addition of ours:
# `enable_thinking=False` prefills `<think></think>` after the generation prompt. transformers renders it with
# trim_blocks and lstrip_blocks; `render_chat` writes the same text, and every export carries this file.
CHAT_TEMPLATE = r"""[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"""


def _image_text(num_tokens: int) -> str:
    return "<|begin_of_image|>" + "<|image|>" * num_tokens + "<|end_of_image|>"


def _video_text(grid, timestamps) -> str:
    """<|begin_of_video|> then, per frame pair, an image block followed by int(timestamp) as text."""
    t, h, w = (int(v) for v in grid.reshape(-1))
    per_pair = h * w // MERGE_SIZE ** 2
    stamps = list(timestamps[:t]) + [timestamps[-1] if timestamps else 0] * (t - len(timestamps))
    return "<|begin_of_video|>" + "".join(_image_text(per_pair) + str(int(s)) for s in stamps) + "<|end_of_video|>"


def _control_spans(pieces, tokenizer: Tokenizer) -> list:
    """(start, end) of every control token in the joined text of pieces [(text, in_loss) or (text, in_loss, kind)]:
    in the template's own pieces every special token; in message text (kind "text") none, and in an assistant
    reply (kind "reply") its format tags only — unless tokenizer.parse_special_tokens trusts the data."""
    spans, at = [], 0
    for text, _, *kind in pieces:
        kind = kind[0] if kind and not tokenizer.parse_special_tokens else "control"
        pattern = {"control": tokenizer.special_pattern, "reply": _REPLY_TAG}.get(kind)
        if pattern is not None:
            spans += [(at + m.start(), at + m.end()) for m in pattern.finditer(text)]
        at += len(text)
    return spans


def _check_trusted_text(pieces):
    """Trusted data parses special tokens in message text, so a vision placeholder typed there would take an
    image's slot: such a sample is bad data (skipped and counted by the packer)."""
    for text, _, *kind in pieces:
        if kind:
            for token in TOKEN_ID_FIELDS.values():
                if token in text:
                    raise BadData("vision_token_in_text", f"the message text holds {token!r}, a vision placeholder "
                                                          "(with --parse-special-tokens it would take an image's place)")


def _tokenize_pieces(pieces, tokenizer: Tokenizer):
    """pieces [(text, in_loss) or (text, in_loss, kind)] -> (input_ids (T,) long, loss_mask (T,) bool, text). The
    control tokens (_control_spans) become their ids and the text between them is tokenized with special tokens as
    plain text — what tokenizing the whole text at once gives when the messages hold no special-token strings (the
    tokenizer splits at special tokens first). A token is in the loss when its first character is."""
    if tokenizer.parse_special_tokens:
        _check_trusted_text(pieces)
    text = "".join(p[0] for p in pieces)
    char_loss = np.zeros(len(text) + 1, dtype=bool)
    at = 0
    for piece, in_loss, *_ in pieces:
        char_loss[at:at + len(piece)] = in_loss
        at += len(piece)
    ids, starts, at = [], [], 0
    for start, end in _control_spans(pieces, tokenizer) + [(len(text), len(text))]:
        if start > at:
            run_ids, offsets = tokenizer.encode_with_offsets(text[at:start], plain=True)
            ids += run_ids
            starts += [at + o[0] for o in offsets]
        if end > start:
            ids.append(tokenizer.token_to_id(text[start:end]))
            starts.append(start)
        at = end
    return (torch.tensor(ids, dtype=torch.long), torch.from_numpy(char_loss[np.array(starts, dtype=np.int64)].copy()),
            text)


def _user_pieces(k: int, content, image_tokens, videos, used: dict) -> list:
    """A user turn's content as pieces (none in the loss); `used` counts the images and videos placed so far."""
    pieces = []
    for item in ([{"type": "text", "text": content}] if isinstance(content, str) else content):
        if not isinstance(item, dict):
            raise ValueError(f"message {k}: content items must be dicts, got {item!r:.80}")
        if item.get("type") == "video" or "video" in item:  # the template checks video first, then image
            if used["videos"] >= len(videos):
                raise ValueError(f"messages use more videos than the {len(videos)} given")
            pieces.append((_video_text(*videos[used["videos"]]), False))
            used["videos"] += 1
        elif item.get("type") == "image" or "image" in item:
            if used["images"] >= len(image_tokens):
                raise ValueError(f"messages use more images than the {len(image_tokens)} given")
            pieces.append((_image_text(image_tokens[used["images"]]), False))
            used["images"] += 1
        elif item.get("type") == "text":
            pieces.append((str(item.get("text", "")), False, "text"))
        else:
            raise ValueError(f"message {k}: unknown content item type {item.get('type')!r}")
    return pieces


def _chat_pieces(messages, image_tokens, videos, thinking: bool, add_generation_prompt):
    """The released template as (text, in_loss) pieces. image_tokens: merged-token count per image; videos:
    (grid, timestamps) per video, both in order of appearance."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {msg!r:.80}")
    if add_generation_prompt is None:
        add_generation_prompt = messages[-1]["role"] != "assistant"
    last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=-1)
    pieces, used = [("[gMASK]<sop>", False)], {"images": 0, "videos": 0}
    learned = False  # whether the reply before this turn is learned: then so is the <|user|> that ends it
    for k, msg in enumerate(messages):
        role, content = msg["role"], msg["content"]
        if role == "system":
            if not isinstance(content, str):
                raise ValueError(f"message {k}: system content must be a string")
            pieces += [("<|system|>\n", False), (content, False, "text")]
        elif role == "user":
            pieces += [("<|user|>", learned), ("\n", False)] + _user_pieces(k, content, image_tokens, videos, used)
            learned = False
        elif role == "assistant":
            if not isinstance(content, str):
                raise ValueError(f"message {k}: assistant content must be a string")
            pieces += [("<|assistant|>", False), (msg.get("metadata") or "", False, "text"), ("\n", False)]
            if k < last_user:  # an earlier reply, as the released client keeps it; learned only if that is all of it
                shown = history_reply(content)
                learned = shown == content
                pieces.append((shown, learned, "reply"))
            elif thinking:
                pieces.append((content, True, "reply"))
                learned = True
            else:  # no-think: an empty think block is part of the prompt, the answer is learned
                pieces += [("<think></think>", False), (split_reply(content)[1], True, "reply")]
                learned = True
        else:
            raise ValueError(f"message {k}: unknown role {role!r} (system, user or assistant)")
    if used["images"] != len(image_tokens) or used["videos"] != len(videos):
        raise ValueError(f"messages use {used['images']} images and {used['videos']} videos, but "
                         f"{len(image_tokens)} images and {len(videos)} videos were given")
    if add_generation_prompt:
        pieces.append(("<|assistant|>\n" + ("" if thinking else "<think></think>"), False))
    elif messages[-1]["role"] == "assistant":
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
    """A conversation -> model inputs, rendered exactly like the released GLM-4.1V chat template (CHAT_TEMPLATE):
    `[gMASK]<sop>` then `<|system|>\\n…`, `<|user|>\\n…`, `<|assistant|>\\n…` per message, and `<|assistant|>\\n`
    as the generation prompt (default: when the last message is not the assistant's).

    messages: [{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"} | {"type": "video"} |
    {"type": "text", "text": str}]}]. `images` / `videos` fill the image / video items in order: PIL images or
    paths (or (pixel_values, grid) pairs), and whatever `process_video` takes (or Video objects). Each image is
    `<|begin_of_image|>` + one `<|image|>` per merged patch + `<|end_of_image|>`; a video is `<|begin_of_video|>`,
    per frame pair an image block followed by its int(timestamp), then `<|end_of_video|>` (the processor's expansion
    of the template's single `<|image|>` / `<|video|>`).
    Earlier replies (those a later user turn follows) appear as `history_reply` keeps them, without their reasoning,
    as the released model's client sends them; the template renders that same conversation identically.
    thinking=False: `<think></think>` is prefilled after the last `<|assistant|>\\n` (the template's
    enable_thinking=False) and replaces the reasoning of a final reply.

    Returns dict(input_ids (T,) long, loss_mask (T,) bool, pixel_values, image_grid_thw, pixel_values_videos,
    video_grid_thw (None when absent), text). loss_mask covers the final reply and every earlier one that lost
    nothing to the history form, each plus the token that ends it: the next `<|user|>`, or an appended
    `<|endoftext|>` after the last reply. (An earlier reply without its reasoning is context only: learning it would
    teach the model to answer a first turn without thinking.)"""
    tensors, tokens, layouts = _vision_tensors(
        images, videos, dict(min_pixels=min_pixels, max_pixels=max_pixels),
        dict(fps=video_fps, max_frames=video_max_frames, min_pixels=video_min_pixels, max_pixels=video_max_pixels))
    input_ids, loss_mask, text = _tokenize_pieces(
        _chat_pieces(messages, tokens, layouts, thinking, add_generation_prompt), tokenizer)
    return dict(input_ids=input_ids, loss_mask=loss_mask, **tensors, text=text)


def _caption_pieces(text: str, image_tokens, videos):
    vision = "".join(_image_text(n) for n in image_tokens) + "".join(_video_text(*v) for v in videos)
    return [("[gMASK]<sop>" + vision, False), (text, True, "text"), ("<|endoftext|>", True)]


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
# Datasets: JSONL (conversations or caption pairs); world.py adds the synthetic world
# ---------------------------------------------------------------------------------------------------------------
# A *sample* is a dict: a conversation {"messages", "images", "videos", "thinking"} or a caption pair
# {"image" | "video", "text"}. A *source* maps an index to a sample (`sample(i)`) and to its token count
# (`length(i, tokenizer)`, cheap: no pixels), and says how many samples it has (`size`, None = endless).


@dataclasses.dataclass(frozen=True)
class Unrendered:
    """Stands in for an image (num_frames=0) or video whose pixels are not needed, only its size: used to measure
    a sample's token count cheaply while planning packs."""
    size: tuple  # (width, height)
    num_frames: int = 0
    fps: float = VIDEO_FPS


def stable_hash(*parts) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "big")



def _image_size(image):
    """(width, height) of an image, stand-in or file, without decoding the pixels."""
    if isinstance(image, (Image.Image, Unrendered)):
        return image.size
    with open_image(image, decode=False) as im:  # the header only
        return im.size


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
RECORD_FORMS = ('"messages" (OpenAI / LLaMA-Factory), "conversations" of "from" / "value" turns (ShareGPT), '
                '"instruction" + "output" (alpaca), "image" or "video" + "text" (a caption pair)')
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _media(p, root: str):
    """A media reference from a record -> what the processor reads: a path made absolute against `root` (missing
    files raise), a list of frames, or the image of a base64 `data:image/…` URL (decoded lazily, like a file)."""
    if isinstance(p, (list, tuple)):
        return [_media(x, root) for x in p]
    if not isinstance(p, str):
        raise ValueError(f"media must be paths or data: URLs, got {p!r:.60}")
    if p.startswith("data:"):
        header, _, payload = p.partition(",")
        if not (header.startswith("data:image/") and header.endswith(";base64")):
            raise ValueError(f"only base64 image data: URLs are read, got {header[:40]!r}")
        try:
            return Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        except (ValueError, OSError) as e:  # bad base64 is a ValueError, bytes PIL cannot identify an OSError
            raise ValueError(f"a data: URL that holds no readable image ({e})") from e
    if p.startswith(("http://", "https://")):
        raise ValueError(f"{p[:80]}: URLs are not downloaded (nothing here reads the network); save the file and "
                         "give its path")
    full = p if os.path.isabs(p) else os.path.join(root, p)
    if not os.path.exists(full):
        raise FileNotFoundError(f"file not found: {p}")
    return full


def _part(item, k: int, root: str, inline: dict) -> dict:
    """One content part -> {"type": "text", "text"} | {"type": "image"} | {"type": "video"}. Parts as OpenAI and
    Hugging Face write them: text, image / video (the file under "image" / "video", "url" or "path", or none: then
    it comes from the record's "images" / "videos"), image_url ({"url": …} or a string); carried media go to
    `inline`."""
    if not isinstance(item, dict):
        raise ValueError(f"messages[{k}]: content parts must be objects, got {item!r:.60}")
    kind = item.get("type") or next((key for key in ("video", "image", "text") if key in item), None)
    if kind == "text":
        return {"type": "text", "text": str(item.get("text", ""))}
    if kind == "image_url":
        url = item.get("image_url")
        kind, ref = "image", url.get("url") if isinstance(url, dict) else url
    elif kind in ("image", "video"):
        ref = next((item[key] for key in (kind, "url", "path") if item.get(key) is not None), None)
    else:
        raise ValueError(f"messages[{k}]: content parts have type text, image, image_url or video, got {kind!r}")
    if ref is not None:
        inline[kind + "s"].append(_media(ref, root))
    return {"type": kind}


def _message(msg, k: int, root: str, inline: dict) -> dict:
    """One message -> {"role", "content"(, "metadata")}: user text with `<image>` / `<video>` placeholders becomes
    parts, parts of system and assistant messages (text only) become one string."""
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise ValueError(f"messages[{k}] needs 'role' and 'content'")
    role, content = msg["role"], msg["content"]
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"messages[{k}]: unknown role {role!r} (system, user or assistant)")
    if role == "user" and isinstance(content, str) and _MEDIA_TAG.search(content):
        content = [{"type": part[1:-1]} if part in ("<image>", "<video>") else {"type": "text", "text": part}
                   for part in _MEDIA_TAG.split(content) if part]
    if isinstance(content, list):
        content = [_part(item, k, root, inline) for item in content]
        if role != "user":
            if any(p["type"] != "text" for p in content):
                raise ValueError(f"messages[{k}]: only user messages may hold images or videos")
            content = "".join(p["text"] for p in content)
    elif not isinstance(content, str):
        raise ValueError(f"messages[{k}]: content must be a string or a list of parts")
    return {**({"metadata": msg["metadata"]} if msg.get("metadata") else {}), "role": role, "content": content}


def _turns(obj: dict) -> list:
    """The record's conversation as [{"role", "content"}] in the OpenAI form, from any of the chat forms."""
    if "messages" in obj:
        turns = obj["messages"]
    elif "conversations" in obj:
        turns = obj["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list")
        for k, t in enumerate(turns):
            speaker = t.get("from", t.get("role")) if isinstance(t, dict) else None
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"conversations[{k}]: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got "
                                 f"{speaker!r}")
        turns = [{"role": SHAREGPT_ROLES[t.get("from", t.get("role"))], "content": t.get("value", t.get("content"))}
                 for t in turns]
    else:  # alpaca: earlier (query, reply) pairs, then the instruction (and its input) and the output
        history = obj.get("history") or []
        if not isinstance(history, list) or any(not isinstance(p, list) or len(p) != 2 for p in history):
            raise ValueError("'history' must be a list of [query, reply] pairs")
        turns = [{"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)]
        query = "\n".join(str(obj[key]) for key in ("instruction", "input") if obj.get(key))
        turns.append({"role": "user", "content": query})
        if "output" in obj:  # an RL prompt has none
            turns.append({"role": "assistant", "content": obj["output"]})
    if not isinstance(turns, list) or not turns:
        raise ValueError("the conversation must be a non-empty list of messages")
    system = obj.get("system")
    if isinstance(system, str) and system and not (isinstance(turns[0], dict) and turns[0].get("role") == "system"):
        turns = [{"role": "system", "content": system}] + turns
    return turns


def parse_record(obj, root: str = ".") -> dict:
    """One decoded record (see JsonlSource) -> a normalised sample, its media paths made absolute against `root`:
    {"messages", "images", "videos"(, "thinking")} or a caption pair {"image" | "video", "text"}. Raises ValueError /
    FileNotFoundError describing the problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not any(key in obj for key in ("messages", "conversations", "instruction")):
        if isinstance(obj.get("text"), str) and ("image" in obj or "video" in obj):
            key = "image" if "image" in obj else "video"
            return {key: _media(obj[key], root), "text": obj["text"]}
        raise ValueError(f"the record fits none of the accepted forms: {RECORD_FORMS}; it has the keys {sorted(obj)}")
    inline = {"images": [], "videos": []}
    messages = [_message(msg, k, root, inline) for k, msg in enumerate(_turns(obj))]
    media = {}
    for key in ("images", "videos"):
        listed = obj.get(key) or ([obj[key[:-1]]] if isinstance(obj.get(key[:-1]), str) else [])  # LLaVA: "image"
        if listed and inline[key]:
            raise ValueError(f"{key} are given both in '{key}' and inside the content parts; give them in one place")
        media[key] = [_media(p, root) for p in listed] or inline[key]
    used = [sum(1 for m in messages if isinstance(m["content"], list) for i in m["content"] if i["type"] == t)
            for t in ("image", "video")]
    if used != [len(media["images"]), len(media["videos"])]:
        raise ValueError(f"the messages place {used[0]} images and {used[1]} videos but the record gives "
                         f"{len(media['images'])} images and {len(media['videos'])} videos")
    sample = {"messages": messages, **media}
    if "thinking" in obj:
        sample["thinking"] = bool(obj["thinking"])
    return sample


def read_records(path):
    """(line, raw text, decoded object) for each record of a JSONL file (one JSON value a line; blank lines are
    skipped) or of a JSON array file (LLaMA-Factory's .json datasets; the line is where the record starts). A record
    that is not valid JSON comes with the json.JSONDecodeError in place of the object; a broken array ends there."""
    with open(path, encoding="utf-8-sig") as f:
        if not f.read(4096).lstrip().startswith("["):
            f.seek(0)
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield lineno, line.rstrip("\n"), json.loads(line)
                    except json.JSONDecodeError as e:
                        yield lineno, line.rstrip("\n"), e
            return
        f.seek(0)
        text = f.read()
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    at, line, counted = text.index("[") + 1, 1, 0
    while True:
        at = space.match(text, at).end()
        if text.startswith("]", at):
            return
        line, counted = line + text.count("\n", counted, at), at
        try:
            obj, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            yield e.lineno, text[at:at + 200], e
            return
        yield line, text[at:end], obj
        at = space.match(text, end).end()
        if text.startswith(",", at):
            at += 1
        elif not text.startswith("]", at):
            e = json.JSONDecodeError("expected ',' or ']' after a record", text, at)
            yield e.lineno, text[at:at + 200], e
            return


def no_think(seed: int, i: int, share: float) -> bool:
    """Whether sample i is one of the `share` of conversations trained with an empty think block (SFT's
    --no-think-share), the same in every process."""
    return stable_hash("think", seed, i) % 10_000 < share * 10_000


def read_jsonl(path: str, parse, what: str = "data"):
    """(usable, dropped, lines) of a JSONL file whose bad lines are skipped and counted (RL prompts, preference
    pairs): usable [(lineno, line, parse(obj))]; dropped ["file:line: why"] for each line that is not JSON or that
    parse refuses (ValueError, TypeError, FileNotFoundError); lines, the count of non-empty lines."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    usable, dropped, lines = [], [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                usable.append((lineno, line, parse(json.loads(line))))
            except json.JSONDecodeError as e:
                dropped.append(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
            except (ValueError, TypeError, FileNotFoundError) as e:
                dropped.append(f"{path}:{lineno}: {e}")
    return usable, dropped, lines


class JsonlSource:
    """Samples from a dataset file: JSONL (one record a line) or a JSON array (a .json file, as LLaMA-Factory
    writes them). A record is a conversation in any of these forms (parse_record):
    - OpenAI / LLaMA-Factory {"messages": [{"role": "system"|"user"|"assistant", "content": ...}], "images":
      [path…], "videos": [path | [frame paths]…], "thinking": bool (optional)}: user content is a string with
      `<image>` / `<video>` placeholders where the media go, or a list of parts {"type":
      "text"|"image"|"image_url"|"video"} (a part may carry its own file or base64 data: URL);
    - ShareGPT {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system", "images", "videos"};
    - alpaca {"instruction", "input", "output", "history": [[query, reply]…], "system", "images"};
    or a caption pair {"image": path, "text": str} (or {"video": path, "text": str}) for pretraining.
    Relative paths are relative to the file's folder. Every record is checked when the file is opened (fields,
    roles, media counts, that paths exist): problems raise ValueError naming the file and line.
    no_think_share: that share of the conversations that do not set "thinking" themselves train with an empty
    think block (SFT's --no-think-share)."""

    def __init__(self, path, no_think_share: float = 0.0, seed: int = 0):
        self.path, self.no_think_share, self.seed = os.fspath(path), no_think_share, seed
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"dataset not found: {self.path}")
        self.root = os.path.dirname(os.path.abspath(self.path))
        self.records, self.lines = [], []
        for lineno, _, obj in read_records(self.path):
            if isinstance(obj, json.JSONDecodeError):
                raise ValueError(f"{self.path}:{lineno}: not valid JSON ({obj.msg} at column {obj.colno})")
            try:
                record = parse_record(obj, self.root)
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
        record = self.records[i]
        if "messages" in record and "thinking" not in record and no_think(self.seed, i, self.no_think_share):
            return {**record, "thinking": False}
        return record

    def length(self, i: int, tokenizer: Tokenizer) -> int:
        return len(encode_sample(self.sample(i), tokenizer, sizes_only=True)["input_ids"])

    def encode(self, i: int, tokenizer: Tokenizer) -> dict:
        return encode_sample(self.sample(i), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# Packing (paper §3.2: sample packing): fixed-length sequences, a global order, resumable
# ---------------------------------------------------------------------------------------------------------------


class PackedLoader:
    """Fixed-length packed batches in an order that depends only on the global sample position.

    The stream: position s is sample s of `source` (endless sources), or sample perm_e[s mod N] of epoch e =
    s // N with perm_e a permutation seeded by (seed, e). Packs: greedy in stream order — a sample that does not fit
    starts the next pack; a sample longer than `seq_len`, or one that cannot be read (a corrupt image, ...), is
    skipped and counted by reason (`bad_data()`; the first few are printed with their file:line). Global step g is
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
        self.skipped = {}  # stream position -> reason, for samples skipped while planning (the same on every rank)
        self.counted_before = ({}, 0)  # (reason -> count, samples examined) before the resume point
        self._reported = 0
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

    def _length(self, s: int):
        """The token count of the sample at stream position s, or None when it cannot be read (counted)."""
        if s not in self._lengths:
            if len(self._lengths) > 200_000:
                self._lengths.clear()
            try:
                self._lengths[s] = self.source.length(self.index(s), self.tokenizer)
            except (ValueError, OSError) as e:
                self._lengths[s] = None
                self._skip(s, e)
        return self._lengths[s]

    def where(self, s: int) -> str:
        """file:line of the sample at stream position s (or its index in the source)."""
        i = self.index(s)
        return self.source.where(i) if hasattr(self.source, "where") else f"sample {i}"

    def _skip(self, s: int, error):
        """Count a sample that is skipped; print the first few (planning is the same on every rank: rank 0 says it)."""
        if isinstance(error, str):
            reason, error = error, f"longer than seq_len={self.seq_len}"
        else:
            reason = bad_reason(error)
        self.skipped[s] = reason
        if self._reported < 5 and self.rank == 0:
            self._reported += 1
            print(f"skipped {self.where(s)}: {error} ({reason})" + (" — further skips are only counted"
                                                                    if self._reported == 5 else ""),
                  file=sys.stderr, flush=True)

    def bad_data(self, g: int) -> tuple:
        """({reason: count}, samples examined) up to the end of global step g, as planning found them (the same on
        every rank). Samples that fail only when rendered are listed in each pack's "skipped"."""
        end = (g + 1) * self.packs_per_step
        self.pack(end - 1)
        counts, examined = dict(self.counted_before[0]), self.counted_before[1]
        first = min(self._starts)
        examined += self._starts[end] - self._starts[first]
        for s, reason in self.skipped.items():
            if self._starts[first] <= s < self._starts[end]:
                counts[reason] = counts.get(reason, 0) + 1
        return counts, examined

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
                if length is None or length > self.seq_len:
                    if length is not None and s not in self.skipped:
                        self._skip(s, "too_long")
                    misses += 1  # in a row: a whole epoch of them means no sample can ever be packed
                    if self.source.size is not None and misses > self.source.size:
                        raise ValueError(f"no sample of the data can be packed: every one is longer than "
                                         f"seq_len={self.seq_len} or unreadable ({self._summary()})")
                    s += 1
                    continue
                misses = 0
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
        ids, labels, positions, cu, skipped = [], [], [], [0], []
        vision = {k: [] for k in VISION_KEYS}
        members = list(members)
        for s in list(members):
            try:
                enc = self.source.encode(self.index(s), self.tokenizer)
            except (ValueError, OSError) as e:  # readable when sized, broken when decoded (a truncated image)
                members.remove(s)
                skipped.append(bad_reason(e))
                print(f"skipped {self.where(s)}: {e} ({skipped[-1]})", file=sys.stderr, flush=True)
                continue
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
                    **{k: _cat(v) if v else None for k, v in vision.items()}, samples=members, skipped=skipped)

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
        skipped, examined = self.bad_data(self.step - 1) if self.step else self.counted_before
        return dict(step=self.step, pack=p, position=self._starts[p], seq_len=self.seq_len,
                    packs_per_step=self.packs_per_step, seed=self.seed, skipped=skipped, examined=examined)

    def load_state_dict(self, state: dict):
        for key in ("seq_len", "packs_per_step", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: {key} was {state[key]}, now {getattr(self, key)}")
        self.step = state["step"]
        self._starts = {state["pack"]: state["position"]}
        self._lengths.clear()
        self.skipped.clear()
        self.counted_before = (dict(state.get("skipped") or {}), state.get("examined", 0))

    def _summary(self) -> str:
        counts = {}
        for reason in self.skipped.values():
            counts[reason] = counts.get(reason, 0) + 1
        return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(rows, cfg, responses=None) -> dict:
    """Right-padded batch of rendered prompts (render_chat dicts), each followed by its response tokens when given
    (RL, evaluation): input_ids / attention_mask (B, T), labels (B, T) = the response tokens and -100 elsewhere,
    and the vision tensors of the rows concatenated in row order. `cfg` (a model.Config) gives the token ids.

    A reply can contain vision marker tokens (`<|image|>`…): generation reads them as plain text, but the model's
    forward would take them for image slots, so in the *inputs* they become the pad token; the labels keep them."""
    vision_ids = torch.tensor([getattr(cfg, name) for name in TOKEN_ID_FIELDS])
    T = max(len(r["input_ids"]) + (len(responses[i]) if responses else 0) for i, r in enumerate(rows))
    input_ids = torch.full((len(rows), T), cfg.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        start = len(r["input_ids"])
        input_ids[i, :start] = r["input_ids"]
        attention_mask[i, :start] = 1
        if responses and responses[i]:
            reply = torch.tensor(responses[i], dtype=torch.long)
            end = start + len(reply)
            labels[i, start:end] = reply
            input_ids[i, start:end] = reply.masked_fill(torch.isin(reply, vision_ids), cfg.pad_token_id)
            attention_mask[i, start:end] = 1
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels if responses else None)
    for key in VISION_KEYS:
        parts = [r[key] for r in rows if r.get(key) is not None]
        batch[key] = torch.cat(parts) if parts else None
    return batch


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
# Plugging in user code (a relevance scorer, a recaptioner, a verifier)
# ---------------------------------------------------------------------------------------------------------------


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
