"""Generation for GLM-4.1V-Thinking: a static KV cache, one forward per token, images and video, thinking on/off.

    python sample.py --checkpoint DIR --prompt "What is in the picture?" --image cat.png
    python sample.py --checkpoint DIR                      # interactive multi-turn chat

Choices made here (gpt-fast style, no framework):
- **Static KV cache.** `model.setup_caches(B, S)` preallocates every layer's keys/values for S slots (S rounded
  up to 256 so that later calls reuse them). The prompt is prefilled in forwards of up to 2048 tokens (vision
  encoded once, its features in place of the placeholders); then each decode step feeds one token per row at
  slot T + k. Eagerly, attention reads only the filled slots. Compiled, decode shapes never change (attention
  covers the whole cache, masked), so the step is CUDA-graphed (`torch.compile(mode="reduce-overhead")`, on by
  default on CUDA); on a GPU the host asks "have all rows ended?" only every 8 steps so that it can queue work
  ahead. On a CPU compiling is opt-in (~25 s once per shape) and makes a batch-1 tiny decode ~3× the reference's.
- **Batches are left-padded.** Rows of any padding side (or holes) are re-packed so that every row's real tokens
  end at the last column; the new tokens of all rows then share one cache slot per step. Padding slots are masked.
- **3D positions continue from each row's prompt** (paper §2): the prefill positions come from
  `rope2d.get_rope_index`, and the k-th new token of a row with L real prompt tokens sits at L + k + delta on all
  three axes (t, h, w), i.e. right after the prompt's largest position.
- **Sampling.** temperature 0 is greedy (argmax, the same tokens as `transformers` `generate(do_sample=False)`).
  Otherwise softmax(logits / temperature), top-p keeps the smallest set of most likely tokens whose mass reaches
  top_p, and the token is drawn with the exponential race argmax(p / E), E ~ Exp(1) — an exact draw from p with
  no host sync, reproducible with a seeded `torch.Generator`.
- **Per-row stopping.** A row ends at any of `cfg.eos_token_ids` (the eos token is kept); afterwards it is filled
  with `cfg.pad_token_id`. Generation stops when every row has ended, so the result is (B, n) with n ≤
  max_new_tokens the longest row, as in `transformers`.
- **Force answering** (paper §5): with `think_budget`, a row that has generated that many tokens without closing
  `</think>` gets `force_answer_ids` (the ids of `</think><answer>`) appended, one per step, and then answers.
- **Log-probs** (for RL): optionally the log-prob of every chosen token under the temperature-scaled distribution
  (before top-p truncation; temperature 0 counts as 1); forced tokens get the model's log-prob too.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import data
import lora
import model as M
import quantize as Q
import rope2d

# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus: keep a token when the mass of the tokens more likely than it is still
    below top_p (so the most likely token is always kept). probs (B, V), rows sum to 1."""
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Next token of each row (B,) from fp32 logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    # exponential race: P(argmax_i p_i / E_i = j) = p_j for E_i ~ Exp(1); no torch.multinomial host sync
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# Prompts and the decode step
# ---------------------------------------------------------------------------------------------------------------


def left_pad(input_ids: torch.Tensor, attention_mask, pad_token_id: int):
    """Move each row's real tokens (attention_mask 1) to the right end, keeping their order; drop columns that are
    padding in every row. Returns ids (B, T) and the real-token mask (B, T) bool."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}")
    keep = attention_mask.bool()
    lengths = keep.sum(-1)
    if (lengths == 0).any():
        raise ValueError(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} of the batch have no tokens "
                         "(attention_mask is all 0)")
    order = keep.to(torch.int8).sort(dim=-1, stable=True).indices  # padding first, real tokens after, in order
    keep = keep.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(~keep, pad_token_id)
    T = int(lengths.max())
    return ids[:, -T:], keep[:, -T:]


def decode_step(model: M.GLM4V, tokens: torch.Tensor, position_ids: torch.Tensor, input_pos: torch.Tensor,
                kv_len=None):
    """One new token per row: tokens (B, 1) at 3D positions (3, B, 1) into cache slot input_pos (1,) → fp32
    logits (B, V). Generated tokens are plain text to the model (never vision placeholders), as in the reference.
    kv_len: attend to that many cache slots (eager), or to the whole static cache (None, compiled)."""
    x = model.model.language_model.embed_tokens(tokens)
    return model.forward_cached(x, position_ids, input_pos, kv_len=kv_len)[:, -1].float()


_compiled_decode_steps = {}


def compiled_decode_step(device_type: str):
    """decode_step compiled once per process and device type (gpt-fast). On a GPU, CUDA graphs remove the launch
    overhead of ~20 kernels per layer, most of a batch-1 step's time. On a CPU, where there are no graphs, the
    Python code that calls the compiled kernels becomes C++ instead (inductor's `cpp_wrapper`), which removes most
    of the per-kernel overhead that remains (README, Benchmarks)."""
    if device_type not in _compiled_decode_steps:
        options = dict(mode="reduce-overhead") if device_type == "cuda" else dict(options={"cpp_wrapper": True})
        _compiled_decode_steps[device_type] = torch.compile(decode_step, fullgraph=True, dynamic=False, **options)
    return _compiled_decode_steps[device_type]


CACHE_ROUNDING = 256  # cache lengths are rounded up, so calls with similar lengths reuse buffers and graphs
PREFILL_CHUNK = 2048  # prompt tokens per prefill forward
STOP_CHECK_EVERY = {"cpu": 1, "cuda": 8}  # decode steps between "have all rows ended?" host syncs


# ---------------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------------


def check_generate_args(input_ids, temperature, top_p, think_budget, force_answer_ids):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if think_budget is not None and not force_answer_ids:
        raise ValueError("think_budget needs force_answer_ids: the token ids of '</think><answer>' to insert")
    if think_budget is not None and think_budget < 0:
        raise ValueError(f"think_budget must be >= 0, got {think_budget}")


def prefill(model: M.GLM4V, ids, keep, S: int, vision: tuple):
    """Set up a static cache of S slots, encode the images/videos once and write the prompt ids (B, T) into the cache
    in chunks (they bound the (T × S) attention scores of a long prompt). Returns (the last position's logits (B, V)
    fp32, the position of each row's first new token (B,))."""
    cfg, device = model.cfg, ids.device
    B, T = ids.shape
    model.setup_caches(B, S)
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw = (None if t is None else t.to(device)
                                                                         for t in vision)
    x = model.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    position_ids, deltas = rope2d.get_rope_index(ids, image_grid_thw, video_grid_thw, keep,
                                                 **cfg.rope_index_kwargs())
    for start in range(0, T, PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, T)
        logits = model.forward_cached(x[:, start:end], position_ids[..., start:end],
                                      torch.arange(start, end, device=device), keep[:, start:end], last_only=True,
                                      kv_len=end)
    return logits[:, -1].float(), keep.sum(-1) + deltas[:, 0]


@torch.no_grad()
def generate_stream(model: M.GLM4V, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                    pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                    attention_mask=None, *, generator=None, think_budget=None, force_answer_ids=None,
                    return_logprobs=False, compile=None, max_seq_len=None):
    """Like `generate`, but yields each step as it comes: (tokens (B,), logprobs (B,) or None). Stops after the
    step in which the last row ended (on a GPU up to STOP_CHECK_EVERY - 1 all-padding steps later)."""
    cfg = model.cfg
    device = model.lm_head.weight.device
    check_generate_args(input_ids, temperature, top_p, think_budget, force_answer_ids)
    ids, keep = left_pad(input_ids.to(device), None if attention_mask is None else attention_mask.to(device),
                         cfg.pad_token_id)
    B, T = ids.shape
    max_seq_len = max_seq_len or cfg.max_position_embeddings
    if T >= max_seq_len:
        raise ValueError(f"the prompt has {T} tokens but the context holds {max_seq_len} "
                         "(max_position_embeddings or --max-seq-len): shorten it, or use fewer or smaller images")
    max_new_tokens = min(max_new_tokens, max_seq_len - T)
    if max_new_tokens <= 0:
        return
    compile = device.type == "cuda" if compile is None else compile
    step = compiled_decode_step(device.type) if compile else decode_step
    S = min(-(-(T + max_new_tokens) // CACHE_ROUNDING) * CACHE_ROUNDING, max_seq_len)
    logits, first_position = prefill(model, ids, keep, S, (pixel_values, image_grid_thw, pixel_values_videos,
                                                           video_grid_thw))
    # decode state, all on the device; the host only reads `done`
    positions = first_position.view(1, B, 1).expand(3, B, 1).clone()  # (3, B, 1), the same on t, h and w
    input_pos = torch.tensor([T], device=device)
    is_eos = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)  # a lookup: one op per step, not isin
    is_eos[list(cfg.eos_token_ids)] = True
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # "have all rows ended?" waits for the device; on a GPU ask every few steps so it can run ahead
    check_every = STOP_CHECK_EVERY.get(device.type, 1)
    if think_budget is not None:  # paper §5 force answering
        forced_ids = torch.tensor(list(force_answer_ids), device=device)
        thinking = torch.ones(B, dtype=torch.bool, device=device)  # no </think> yet
        force_at = torch.zeros(B, dtype=torch.long, device=device)  # index into forced_ids of the next forced token
    for k in range(max_new_tokens):
        tokens = sample_tokens(logits, temperature, top_p, generator)
        if think_budget is not None:
            forcing = (thinking & (k >= think_budget)) | (force_at > 0)
            tokens = torch.where(forcing, forced_ids[force_at], tokens)
            force_at = torch.where(forcing, (force_at + 1) % len(forced_ids), force_at)
            thinking &= tokens != forced_ids[0]
        tokens = tokens.masked_fill(done, cfg.pad_token_id)
        logprobs = None
        if return_logprobs:
            logprobs = F.log_softmax(logits / (temperature or 1.0), -1).gather(-1, tokens[:, None])[:, 0]
            logprobs = logprobs.masked_fill(done, 0.0)
        done |= is_eos[tokens]
        yield tokens, logprobs
        if k + 1 == max_new_tokens or ((k + 1) % check_every == 0 and bool(done.all())):
            return
        if compile:
            logits = step(model, tokens[:, None], positions, input_pos)
            if device.type == "cuda":  # a CUDA graph's output buffer is overwritten by the next replay: copy it
                logits = logits.clone()
        else:
            logits = step(model, tokens[:, None], positions, input_pos, T + k + 1)
        input_pos += 1
        positions += 1


def generate(model: M.GLM4V, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
             attention_mask=None, *, generator=None, think_budget=None, force_answer_ids=None,
             return_logprobs=False, compile=None, max_seq_len=None):
    """New tokens (B, n), n ≤ max_new_tokens, for a batch of prompts input_ids (B, T) with optional padding
    (attention_mask, either side) and the vision inputs of `model(...)`.

    temperature 0 = greedy; otherwise sampled with top_p, reproducibly when `generator` (a torch.Generator on the
    model's device) is given. Rows end at cfg.eos_token_ids and are then filled with cfg.pad_token_id.
    think_budget + force_answer_ids: force answering after that many tokens without `</think>` (paper §5).
    return_logprobs: also return (B, n) fp32 log-probs of the chosen tokens (0 after a row's end).
    compile: torch.compile the decode step (default: on CUDA). max_seq_len: the context (default
    cfg.max_position_embeddings); a longer prompt is an error and max_new_tokens is capped to what fits."""
    steps = list(generate_stream(model, input_ids, max_new_tokens, temperature, top_p, pixel_values, image_grid_thw,
                                 pixel_values_videos, video_grid_thw, attention_mask, generator=generator,
                                 think_budget=think_budget, force_answer_ids=force_answer_ids,
                                 return_logprobs=return_logprobs, compile=compile, max_seq_len=max_seq_len))
    B, device = input_ids.shape[0], model.lm_head.weight.device
    tokens = torch.stack([t for t, _ in steps], 1) if steps else torch.zeros(B, 0, dtype=torch.long, device=device)
    ended = torch.isin(tokens, torch.tensor(model.cfg.eos_token_ids, device=device))
    n = int(torch.where(ended.any(1), ended.int().argmax(1) + 1, tokens.shape[1]).max()) if steps else 0
    tokens = tokens[:, :n]  # up to the end of the longest row
    if not return_logprobs:
        return tokens
    logprobs = torch.stack([lp for _, lp in steps], 1)[:, :n] if steps else torch.zeros(B, 0, device=device)
    return tokens, logprobs


def noise_generator(device, *parts) -> torch.Generator:
    """A torch.Generator seeded from (seed, iteration, rank, ...): sampling noise that a resumed run repeats."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]))


def cut_at_end(tokens, end_ids) -> list:
    """A generated row up to and including its first end token (generate pads ended rows with an end token)."""
    for j, t in enumerate(tokens):
        if t in end_ids:
            return tokens[:j + 1]
    return tokens


@torch.no_grad()
def generate_replies(model: M.GLM4V, prompts, n: int, max_new_tokens: int, think_budget: int, force_answer_ids, *,
                     temperature: float = 1.0, top_p: float = 1.0, generator=None, batch_rows: int = None) -> list:
    """n replies to each rendered prompt (render_chat dicts; RL rollouts, grading and evaluation): reply j of prompt i
    is element i·n + j, a list of token ids cut after its end token. Force answering after `think_budget` tokens
    (0: never). batch_rows: rows per generate() call (None: all); on CUDA every call is padded to it, so the
    compiled, CUDA-graphed decode step keeps one shape."""
    device = model.lm_head.weight.device
    rows = [p for p in prompts for _ in range(n)]
    chunk = batch_rows or len(rows)
    pad_rows = device.type == "cuda" and batch_rows is not None
    end_ids, out = set(model.cfg.eos_token_ids), []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        count = len(part)
        if pad_rows:
            part = part + [part[0]] * (chunk - count)
        batch = data.collate(part, model.cfg)
        tokens = generate(model, batch["input_ids"], max_new_tokens, temperature, top_p,
                          **{k: batch[k] for k in data.VISION_KEYS}, attention_mask=batch["attention_mask"],
                          generator=generator, think_budget=think_budget or None,
                          force_answer_ids=force_answer_ids if think_budget else None)
        out += [cut_at_end(row, end_ids) for row in tokens[:count].tolist()]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The command line: chat with a checkpoint
# ---------------------------------------------------------------------------------------------------------------

def load(checkpoint: str, device="cpu", dtype=None, quantize=None):
    """(model, tokenizer) from a checkpoint directory: config.json, model.safetensors (or shards), tokenizer.json.
    Also a PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors, tokenizer.json: lora.py),
    merged into the base checkpoint it names, and an int8 checkpoint (quantize.py). quantize="int8": make the
    decoder linears and the lm_head weight-only int8 after loading."""
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(M.not_found(checkpoint))
    adapter = lora.is_peft_adapter(checkpoint)
    for name in ("tokenizer.json",) if adapter else ("config.json", "tokenizer.json"):
        if not os.path.exists(os.path.join(checkpoint, name)):
            raise FileNotFoundError(f"{checkpoint} has no {name} (a checkpoint directory holds config.json, "
                                    "model.safetensors and tokenizer.json)")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize must be int8, not {quantize!r}")
    if adapter:
        base = lora.read_peft_config(checkpoint).get("base_model_name_or_path")
        if not base or not os.path.isdir(base):
            raise FileNotFoundError(f"{checkpoint}: the adapter's base checkpoint {base!r} is not a directory here")
        model = lora.merge_adapters(lora.load_peft(M.GLM4V.from_pretrained(base, dtype, device), checkpoint))
    elif Q.is_int8_checkpoint(checkpoint):
        model = Q.load_int8(checkpoint, dtype, device)
    else:
        model = M.GLM4V.from_pretrained(checkpoint, dtype=dtype, device=device)
    if quantize == "int8" and not isinstance(model.lm_head, Q.Int8Linear):
        Q.quantize_int8(model)
    tokenizer = data.load_tokenizer(checkpoint)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{checkpoint}: tokenizer.json has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.cfg.vocab_size}")
    return model, tokenizer


class ReplyPrinter:
    """Prints a reply as its tokens arrive: the reasoning under "Thinking", the reply under "Answer", the boxed final
    answer highlighted (bold on a terminal, **…** otherwise), end-of-turn tokens hidden."""

    def __init__(self, tokenizer, out=sys.stdout, color=None):
        self.tokenizer, self.out = tokenizer, out
        color = out.isatty() if color is None else color
        dim, bold, reset = ("\x1b[2m", "\x1b[1m", "\x1b[0m") if color else ("", "**", "**")
        self.styles = {data.THINK_OPEN: "Thinking:\n" + dim,
                       data.THINK_CLOSE: (reset if color else "") + "\n\nAnswer:\n",
                       data.ANSWER_OPEN: "", data.ANSWER_CLOSE: "", data.BOX_OPEN: bold, data.BOX_CLOSE: reset,
                       **{s: "" for s in M.END_OF_TURN}}
        self.reset = reset if color else ""
        self.pending, self.text = [], ""

    def add(self, token_ids, flush=False):
        """Print what `token_ids` add, holding back an incomplete UTF-8 character until its last byte arrives."""
        self.pending += list(token_ids)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd") and not flush:
            return
        self.pending = []
        self.text += piece
        for tag, style in self.styles.items():
            piece = piece.replace(tag, style)
        self.out.write(piece)
        self.out.flush()

    def finish(self):
        """End the reply; prints the boxed answer once more on its own line. Returns the reply text."""
        self.add([], flush=True)
        box = boxed_answer(self.text)
        self.out.write(self.reset + ("\n\nBoxed answer: " + box if box is not None else "") + "\n")
        self.out.flush()
        return self.text


def boxed_answer(reply: str):
    """The boxed final answer of a well-formed reply (data.parse_reply), or None. A --no-think reply starts at
    <answer>: its empty think block was prefilled in the prompt."""
    if not reply.lstrip().startswith(data.THINK_OPEN):
        reply = data.THINK_OPEN + data.THINK_CLOSE + reply
    box = data.parse_reply(reply)[0]
    return None if box is None else box.strip()


class Chat:
    """A conversation: messages plus the images and videos they refer to (processed once, in order)."""

    def __init__(self, model, tokenizer, args, out=sys.stdout):
        self.model, self.tokenizer, self.args, self.out = model, tokenizer, args, out
        device = model.lm_head.weight.device
        self.generator = torch.Generator(device).manual_seed(args.seed)
        self.compile_notice = args.compile or (args.compile is None and device.type == "cuda")
        self.reset()

    def reset(self):
        self.messages, self.images, self.videos = [], [], []

    def ask(self, prompt: str, images=(), videos=()) -> str:
        images = [data.process_image(path) for path in images]  # errors name the file
        videos = [data.process_video(path) for path in videos]
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + \
            [{"type": "text", "text": prompt}]
        messages = self.messages + [{"role": "user", "content": content}]
        inputs = data.render_chat(messages, self.tokenizer, images=self.images + images,
                                  videos=self.videos + videos, thinking=not self.args.no_think)
        device = self.model.lm_head.weight.device
        vision = {k: None if inputs[k] is None else inputs[k].to(device)
                  for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
        budget = None if self.args.no_think else self.args.think_budget
        force = self.tokenizer.force_answer_ids if budget is not None else None
        stream = generate_stream(self.model, inputs["input_ids"][None].to(device), self.args.max_new_tokens,
                                 self.args.temperature, self.args.top_p, **vision, generator=self.generator,
                                 think_budget=budget, force_answer_ids=force, compile=self.args.compile,
                                 max_seq_len=self.args.max_seq_len)
        if self.compile_notice:
            print("(compiling the decode step for this shape: the first reply takes a minute longer)",
                  file=sys.stderr)
            self.compile_notice = False
        printer = ReplyPrinter(self.tokenizer, self.out)
        if self.args.no_think:
            self.out.write("Answer:\n")
        if self.args.stream or self.args.prompt is None:  # a chat always streams
            for tokens, _ in stream:
                printer.add(tokens.tolist())
        else:
            printer.add([t for tokens, _ in stream for t in tokens.tolist()])
        reply = printer.finish()
        # later turns see it as the released client keeps it: its answer, without the reasoning (data.history_reply)
        self.messages = messages + [{"role": "assistant", "content": data.history_reply(reply)}]
        self.images += images
        self.videos += videos
        return reply


def interactive(chat: Chat, images=(), videos=(), stdin=sys.stdin):
    """A multi-turn chat on the terminal. /image PATH and /video PATH attach files to the next message."""
    out = chat.out
    out.write("Chat with GLM-4.1V. /image PATH or /video PATH attaches a file to your next message, /reset starts "
              "over, /quit (or Ctrl-D) ends.\n")
    images, videos = list(images), list(videos)
    while True:
        out.write("\nYou: ")
        out.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            chat.reset()
            images, videos = [], []
            continue
        if line.startswith(("/image ", "/video ")):
            path = line.split(" ", 1)[1].strip()
            if not os.path.exists(path):
                out.write(f"error: file not found: {path}\n")
            else:
                (images if line.startswith("/image") else videos).append(path)
            continue
        out.write("\nGLM-4.1V:\n")
        try:
            chat.ask(line, images, videos)
        except (FileNotFoundError, ValueError, ImportError) as e:
            out.write(f"error: {e}\n")
        except KeyboardInterrupt:  # Ctrl-C stops the reply (it is left out of the history), not the chat
            out.write("\n(interrupted)\n")
        images, videos = [], []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a GLM-4.1V checkpoint (images, video, thinking on/off). "
                                "Without --prompt: an interactive multi-turn chat.")
    p.add_argument("--checkpoint", required=True, help="directory with config.json, model.safetensors, tokenizer.json")
    p.add_argument("--prompt", help="the question; omit it for an interactive chat")
    p.add_argument("--image", action="append", default=[], help="an image file for the prompt (repeatable)")
    p.add_argument("--video", action="append", default=[],
                   help="a video for the prompt: mp4 (needs PyAV), animated GIF or a folder of frames (repeatable)")
    p.add_argument("--no-think", action="store_true", help="answer without reasoning (prefills <think></think>)")
    p.add_argument("--parse-special-tokens", action="store_true", help="read special-token strings typed in the "
                   "prompt (<|user|>, <think>, ...) as the control tokens they name (default: as plain text)")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="the longest reply, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to "
                   "this probability mass")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated (always on in a chat)")
    p.add_argument("--think-budget", type=int, help="force answering (paper §5): after this many reply tokens "
                   "without </think>, insert </think><answer>")
    p.add_argument("--max-seq-len", type=int, help="the context in tokens, prompt + reply "
                   "(default: the model's max_position_embeddings)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="weights and activations (auto: bfloat16 on CUDA, the checkpoint's dtype on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step: CUDA graphs on a GPU, C++ kernels and wrapper on a "
                        "CPU (default: on for CUDA; on a CPU the first reply waits ~25 s)")
    add_quantize_flag(p)
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "max_seq_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        p.error("--temperature must be a finite number >= 0")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.think_budget is not None and args.think_budget < 0:
        p.error("--think-budget must be >= 0")
    return args


def add_quantize_flag(parser):
    parser.add_argument("--quantize", choices=["int8"], help="int8: weight-only int8 decoder linears and lm_head "
                        "(quantize.py), half the weight memory of bf16; an int8 checkpoint needs no flag")


def main(argv=None, stdin=sys.stdin, out=sys.stdout):
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        sys.exit(f"error: unknown --device {args.device!r} (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but this machine has no CUDA GPU (use --device cpu)")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    try:
        for path in args.image + args.video:
            if not os.path.exists(path):
                raise FileNotFoundError(f"file not found: {path}")
        model, tokenizer = load(args.checkpoint, device, dtype, args.quantize)
        tokenizer.parse_special_tokens = args.parse_special_tokens
        chat = Chat(model, tokenizer, args, out)
        if args.prompt is None:
            interactive(chat, args.image, args.video, stdin)
        else:
            chat.ask(args.prompt, args.image, args.video)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
