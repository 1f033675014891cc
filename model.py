"""GLM-4.1V-Thinking (arXiv 2507.01006): the config, the GLM-4 decoder, the whole vision-language model, and
Hugging Face checkpoint I/O.

    input_ids ──embed──┐
    images / videos ──vision.VisionModel──► visual tokens replace the <|image|> placeholders
                       └──► 40 × DecoderLayer (GQA attention with 3D M-RoPE, sandwich norms, SwiGLU) ──► lm_head

Module names follow the released checkpoint's tensor names (`model.visual.*`, `model.language_model.*`,
`lm_head.*`), so loading is a plain state-dict copy. Sequences are processed *packed*: the tokens of all rows (or
of all packed samples) form one (N, C) stream and attention stays inside each sequence via `cu_seqlens`; padding
never reaches a matmul.
"""
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
import rope2d
from vision import RMSNorm, VisionModel

# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    # decoder: GLM-4-9B-0414 (paper §2)
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5  # only the first half of each head rotates
    mrope_section: tuple = (8, 12, 12)  # frequency pairs driven by the t / h / w position ids
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    # vision encoder: AIMv2-Huge based (paper §2)
    vision_depth: int = 24
    vision_hidden_size: int = 1536
    vision_num_heads: int = 12
    vision_intermediate_size: int = 13696  # the projector's SwiGLU width
    vision_attention_bias: bool = False
    vision_rms_norm_eps: float = 1e-5
    vision_rope_theta: float = 10000.0
    out_hidden_size: int = 4096  # ViT MLP width and the width of the visual tokens
    image_size: int = 336  # the learned position table covers image_size / patch_size squared
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # special tokens
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    eos_token_ids: tuple = (151329, 151336, 151338)  # <|endoftext|>, <|user|>, <|observation|>
    pad_token_id: int = 151329

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def __post_init__(self):
        self.mrope_section = tuple(self.mrope_section)
        self.eos_token_ids = tuple(self.eos_token_ids)
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            problems.append("vision_hidden_size / vision_num_heads must be a multiple of 4 (2D-RoPE splits it in 4)")
        if not problems and 2 * sum(self.mrope_section) != self.rotary_dim:
            problems.append(f"mrope_section {self.mrope_section} must sum to rotary_dim/2 = {self.rotary_dim // 2}")
        if problems:
            raise ValueError("invalid Config: " + "; ".join(problems))

    def rope_index_kwargs(self) -> dict:
        return dict(image_token_id=self.image_token_id, video_start_token_id=self.video_start_token_id,
                    video_end_token_id=self.video_end_token_id, spatial_merge_size=self.spatial_merge_size)

    # --- Hugging Face config.json <-> Config ---------------------------------------------------------------
    _TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "initializer_range")
    _VISION_KEYS = {"depth": "vision_depth", "hidden_size": "vision_hidden_size", "num_heads": "vision_num_heads",
                    "intermediate_size": "vision_intermediate_size", "attention_bias": "vision_attention_bias",
                    "rms_norm_eps": "vision_rms_norm_eps", "out_hidden_size": "out_hidden_size",
                    "image_size": "image_size", "patch_size": "patch_size",
                    "temporal_patch_size": "temporal_patch_size", "spatial_merge_size": "spatial_merge_size",
                    "in_channels": "in_channels"}
    _TOKEN_KEYS = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                   "video_start_token_id", "video_end_token_id")

    @classmethod
    def from_hf(cls, source) -> "Config":
        """Read a Glm4v `config.json` (a path to the file or its directory, or the parsed dict). Accepts both the
        released layout (rope_theta / partial_rotary_factor / rope_scaling.mrope_section) and the newer
        `rope_parameters` one; text fields may sit in `text_config` or at the top level."""
        if isinstance(source, (str, os.PathLike)):
            if not os.path.exists(source):
                raise FileNotFoundError(not_found(source))
            path = os.path.join(source, "config.json") if os.path.isdir(source) else source
            try:
                with open(path) as f:
                    source = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        hf = dict(source)
        if hf.get("model_type", "glm4v") != "glm4v":
            raise ValueError(f"expected a glm4v config, got model_type={hf.get('model_type')!r}")
        text = {**{k: v for k, v in hf.items() if k not in ("text_config", "vision_config")},
                **(hf.get("text_config") or {})}
        vision = hf.get("vision_config") or {}
        kw = {k: text[k] for k in cls._TEXT_KEYS if text.get(k) is not None}
        rope = {**(text.get("rope_scaling") or {}), **(text.get("rope_parameters") or {})}
        for key in ("rope_theta", "partial_rotary_factor"):
            if rope.get(key, text.get(key)) is not None:
                kw[key] = rope.get(key, text.get(key))
        if rope.get("mrope_section") is not None:
            kw["mrope_section"] = tuple(rope["mrope_section"])
        kw.update({ours: vision[theirs] for theirs, ours in cls._VISION_KEYS.items() if vision.get(theirs) is not None})
        vision_rope = vision.get("rope_parameters") or {}
        if vision_rope.get("rope_theta", vision.get("rope_theta")) is not None:
            kw["vision_rope_theta"] = vision_rope.get("rope_theta", vision.get("rope_theta"))
        kw.update({k: hf[k] for k in cls._TOKEN_KEYS if hf.get(k) is not None})
        eos = text.get("eos_token_id", hf.get("eos_token_id"))
        if eos is not None:
            kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        if text.get("pad_token_id") is not None:
            kw["pad_token_id"] = text["pad_token_id"]
        if hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"):
            raise ValueError("GLM-4.1V has an untied lm_head; tie_word_embeddings=True is not supported")
        return cls(**kw)

    def to_hf(self) -> dict:
        """The config.json dict `transformers.Glm4vForConditionalGeneration` reads."""
        text = {k: getattr(self, k) for k in self._TEXT_KEYS}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor, "mrope_section": list(self.mrope_section)}
        text.update(model_type="glm4v_text", hidden_act="silu", attention_bias=True, attention_dropout=0.0,
                    rope_parameters=rope, pad_token_id=self.pad_token_id, eos_token_id=list(self.eos_token_ids),
                    tie_word_embeddings=False, use_cache=True)
        vision = {theirs: getattr(self, ours) for theirs, ours in self._VISION_KEYS.items()}
        vision.update(model_type="glm4v_vision", hidden_act="silu", attention_dropout=0.0,
                      initializer_range=self.initializer_range,
                      rope_parameters={"rope_type": "axial", "rope_theta": self.vision_rope_theta})
        return {"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v",
                **{k: getattr(self, k) for k in self._TOKEN_KEYS}, "eos_token_id": list(self.eos_token_ids),
                "pad_token_id": self.pad_token_id, "tie_word_embeddings": False,
                "text_config": text, "vision_config": vision}


# The tiny preset's vocabulary: ids 0–255 are UTF-8 bytes, then these GLM special tokens in this order from 256,
# the rest of its 320 ids reserved (data.tiny_tokenizer builds it; a released model brings its own tokenizer.json).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                       "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>", "<think>", "</think>",
                       "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>")
_TINY_ID = {token: 256 + i for i, token in enumerate(TINY_SPECIAL_TOKENS)}
END_OF_TURN = ("<|endoftext|>", "<|user|>", "<|observation|>")  # the stop tokens (eos_token_ids); the first pads

PRESETS = {
    # the released GLM-4.1V-9B-Thinking architecture
    "9b": Config(),
    # a real but small GLM-4.1V that trains in minutes on a CPU: byte-level vocab (256 bytes + specials)
    "tiny": Config(vocab_size=320, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6), max_position_embeddings=4096,
                   vision_depth=4, vision_hidden_size=192, vision_num_heads=3, vision_intermediate_size=688,
                   out_hidden_size=256, image_size=112,
                   image_token_id=_TINY_ID["<|image|>"], video_token_id=_TINY_ID["<|video|>"],
                   image_start_token_id=_TINY_ID["<|begin_of_image|>"], image_end_token_id=_TINY_ID["<|end_of_image|>"],
                   video_start_token_id=_TINY_ID["<|begin_of_video|>"], video_end_token_id=_TINY_ID["<|end_of_video|>"],
                   eos_token_ids=tuple(_TINY_ID[t] for t in END_OF_TURN),
                   pad_token_id=_TINY_ID["<|endoftext|>"]),
}

# ---------------------------------------------------------------------------------------------------------------
# The GLM-4 decoder
# ---------------------------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """A static per-layer cache (gpt-fast style): fixed shapes, so decoding can be compiled / CUDA-graphed."""

    def __init__(self, batch_size, max_seq_len, num_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # k, v: (B, Hkv, T, D) written at slots input_pos (T,)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    """Grouped-query attention (32 query heads share 2 KV heads) with biased q/k/v and 3D M-RoPE."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache = None

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, input_pos=None, cache_mask=None):
        """Packed: x (N, C), rope for positions (3, N), cu_seqlens → causal attention inside each sequence.
        Cached (generation): x (B, T, C), rope for positions (3, B, T), input_pos (T,), cache_mask (B, 1, T, S).
        `rope` comes from kernels.mrope_setup, once per forward."""
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        q, k = kernels.mrope(q, k, rope)  # 3D M-RoPE (paper §2)
        if input_pos is None:
            out = kernels.flash_attention(q, k, v, cu_seqlens, causal=True, max_seqlen=max_seqlen)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            k, v = self.kv_cache.update(input_pos, k, v)
            S = cache_mask.shape[-1]  # the slots the mask covers
            k, v = k[:, :, :S].to(q.dtype), v[:, :, :S].to(q.dtype)
            B, H, T, D = q.shape
            if T == 1:  # decode: the H/Hkv query heads of a KV head form one block of rows; no KV head copies
                q = q.reshape(B, self.num_kv_heads, H // self.num_kv_heads, D)
                if torch.compiler.is_compiling() and q.device.type == "cpu":  # written out, inductor fuses
                    # mask + softmax into one loop, which the CPU flash kernel it would call instead cannot
                    scores = (q @ k.transpose(-1, -2)) * D ** -0.5  # (B, Hkv, H/Hkv, S)
                    out = scores.masked_fill(~cache_mask, float("-inf")).softmax(-1) @ v  # (B, Hkv, H/Hkv, D)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask)  # (B, Hkv, H/Hkv, D)
                out = out.reshape(B, H, 1, D)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, enable_gqa=True)
            out = out.transpose(1, 2)
        return self.o_proj(out.flatten(-2))


class MLP(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul (`gate_up_proj`)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """GLM-4-0414's sandwich norms: each sublayer's output is normalised again before it joins the residual."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    activation_checkpointing = False  # set by the trainer: recompute this layer in the backward pass

    def forward(self, x, rope, cu_seqlens=None, max_seqlen=None, input_pos=None, cache_mask=None):
        args = (x, rope, cu_seqlens, max_seqlen, input_pos, cache_mask)
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(self, x, rope, cu_seqlens=None, max_seqlen=None, input_pos=None, cache_mask=None):
        x = x + self.post_self_attn_layernorm(
            self.self_attn(self.input_layernorm(x), rope, cu_seqlens, max_seqlen, input_pos, cache_mask))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, position_ids, cu_seqlens=None, max_seqlen=None, input_pos=None, cache_mask=None):
        rope = kernels.mrope_setup(position_ids, self.cfg.rotary_dim, self.cfg.mrope_section, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, rope, cu_seqlens, max_seqlen, input_pos, cache_mask)
        return self.norm(x)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096):
    """log p(target) for each row of hidden (N, C) under logits = hidden @ weight.T; 0 where target == -100.

    Works through chunks of rows, recomputing each chunk's logits in the backward pass, so the (N, vocab) fp32
    logits — 5 GB for 8k tokens of a 151k vocabulary — never exist at once."""
    def chunk_logprobs(h, t):
        logits = (h @ weight.T).float()
        picked = logits.gather(-1, t.clamp(min=0)[:, None])[:, 0]
        return torch.where(t >= 0, picked - logits.logsumexp(-1), 0.0)

    parts = []
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size)):
        parts.append(checkpoint(chunk_logprobs, h, t, use_reentrant=False) if torch.is_grad_enabled()
                     else chunk_logprobs(h, t))
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------------------


class GLM4V(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict(dict(visual=VisionModel(cfg), language_model=TextModel(cfg)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.cache_mask = None  # (B, S) which cache slots hold real tokens, set by setup_caches / prefill

    @torch.no_grad()
    def init_weights(self):
        """Fresh weights (normal(0, 0.02) matrices, zero biases, unit norms), also for a model built on the meta
        device: `with torch.device("meta"): m = GLM4V(cfg)` then `m.to_empty(device=...)` and `m.init_weights()`."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        return self

    # --- inputs → embeddings -------------------------------------------------------------------------------

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None):
        """Token embeddings with visual tokens in place of the <|image|> placeholders (B, T, C).

        Images and video frames share the image token id; a placeholder inside <|begin_of_video|>…<|end_of_video|>
        takes the next video token, any other the next image token, in reading order."""
        cfg = self.cfg
        x = self.model.language_model.embed_tokens(input_ids)
        is_vision = input_ids == cfg.image_token_id
        in_video = rope2d.in_video(input_ids, cfg.video_start_token_id, cfg.video_end_token_id)
        for name, pixels, grid, slots in (("image", pixel_values, image_grid_thw, is_vision & ~in_video),
                                          ("video", pixel_values_videos, video_grid_thw, is_vision & in_video)):
            if pixels is None and not slots.any():
                continue
            if pixels is None or grid is None:
                raise ValueError(f"input_ids hold {int(slots.sum())} {name} placeholder tokens but "
                                 f"{'pixel_values' if name == 'image' else 'pixel_values_videos'} / {name}_grid_thw "
                                 "were not given")
            features = self.model.visual(pixels, grid)
            if features.shape[0] != int(slots.sum()):
                raise ValueError(f"{name} placeholder tokens ({int(slots.sum())}) do not match the {name} features "
                                 f"({features.shape[0]} = sum of t·h·w / {cfg.spatial_merge_size ** 2} over the grids)")
            x = x.masked_scatter(slots[..., None], features.to(x.dtype))
        return x

    # --- forward -------------------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, position_ids=None, cu_seqlens=None, labels=None,
                return_hidden=False):
        """Logits (B, T, vocab); or, given `labels` (B, T), the log-probability of each label token (B, T); or with
        return_hidden the decoder's final hidden states (B, T, C), before lm_head (the reward model's input).

        `attention_mask` (B, T) marks real tokens (left or right padding); padded positions come back as zeros.
        For packed training pass input_ids (1, T), position_ids (3, 1, T) and cu_seqlens (n+1,) of the samples.
        3D positions are derived from input_ids and the grids when not given.
        `labels` follow the Hugging Face convention (not shifted; -100 = no loss): out[b, t] is
        log p(labels[b, t] | tokens before t), 0 where labels[b, t] == -100 — the training loss is its negated
        mean, and RL's policy ratios come from it. The logits are then computed in chunks and never returned."""
        B, T = input_ids.shape
        x = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if position_ids is None:
            position_ids, _ = rope2d.get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                                                    **self.cfg.rope_index_kwargs())
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("pass either cu_seqlens (packed samples) or attention_mask (padded rows), not both")
        keep = None if attention_mask is None else attention_mask.bool()
        if cu_seqlens is None:
            lengths = torch.full((B,), T, device=input_ids.device) if keep is None else keep.sum(-1)
            cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        cu_seqlens = cu_seqlens.to(x.device)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # once here, not once per layer

        def pack(t):  # (B, T, ...) -> (N, ...) of real tokens only
            return t.flatten(0, 1) if keep is None else t[keep]

        def unpack(t):  # (N, ...) -> (B, T, ...), zeros at padding
            if keep is None:
                return t.view(B, T, *t.shape[1:])
            return t.new_zeros(B, T, *t.shape[1:]).index_put_((keep,), t)

        positions = position_ids.flatten(1) if keep is None else position_ids[:, keep]
        h = self.model.language_model(pack(x), positions, cu_seqlens, max_seqlen)
        if return_hidden:
            return unpack(h)
        if labels is None:
            return unpack(self.lm_head(h))
        # position i predicts token i+1 of its own sequence; the last token of a sequence predicts nothing
        targets = pack(labels).roll(-1)
        targets[cu_seqlens[1:].long() - 1] = -100
        logprobs = token_logprobs(h, self.lm_head.weight, targets)
        return unpack(logprobs.roll(1))  # back to the positions of the predicted tokens

    # --- generation with a static KV cache (used by sample.py) ---------------------------------------------

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype=None):
        """Static KV caches for `batch_size` rows of `max_seq_len` slots. Calling it again with the same shapes
        keeps the buffers (so a compiled / CUDA-graphed decode step stays valid) and only resets the slot mask."""
        embed = self.model.language_model.embed_tokens.weight  # the activations' dtype (the lm_head may be int8)
        device, dtype = embed.device, dtype or embed.dtype
        cache = self.model.language_model.layers[0].self_attn.kv_cache
        if cache is None or cache.k.shape[0] != batch_size or cache.k.shape[2] != max_seq_len or \
                cache.k.dtype != dtype or cache.k.device != device:
            for layer in self.model.language_model.layers:
                layer.self_attn.kv_cache = KVCache(batch_size, max_seq_len, self.cfg.num_key_value_heads,
                                                   self.cfg.head_dim, dtype, device)
            self.cache_mask = torch.ones(batch_size, max_seq_len, dtype=torch.bool, device=device)
        self.cache_mask.fill_(True)  # a slot is visible unless a prefill marks it as padding

    def forward_cached(self, x, position_ids, input_pos, valid=None, last_only=False, kv_len=None):
        """One prefill or decode step over embeddings x (B, T, C) written at cache slots input_pos (T,).
        `valid` (B, T) marks real tokens (False for left padding); None leaves those slots marked real, so a
        decode step writes no mask. Attention reads the first `kv_len` slots (default: all, a static shape for
        compiled decoding; eager decoding passes the filled length and skips the empty rest).
        Returns logits (B, T, vocab), or (B, 1, vocab) for the last position only with `last_only` (a long prefill
        never materialises T × vocab logits)."""
        if valid is not None:
            self.cache_mask[:, input_pos] = valid
        S = kv_len or self.cache_mask.shape[1]
        causal = torch.arange(S, device=x.device)[None, :] <= input_pos[:, None]  # (T, S)
        mask = (self.cache_mask[:, None, :S] & causal[None]).unsqueeze(1)  # (B, 1, T, S)
        mask = mask | ~mask.any(-1, keepdim=True)  # a padding query row attends somewhere: no NaNs, output unused
        h = self.model.language_model(x, position_ids, input_pos=input_pos, cache_mask=mask)
        return self.lm_head(h[:, -1:] if last_only else h)

    # --- checkpoint I/O ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu", prepare=None):
        """Load a Hugging Face-format Glm4v checkpoint (config.json + model.safetensors or shards with
        model.safetensors.index.json). The model is built on the meta device and each tensor is read from disk
        straight into its final place, so peak host memory stays near one copy of the weights. `prepare(model)`
        changes the meta-device model before loading (quantize.py makes its linears int8)."""
        from safetensors import safe_open

        check_checkpoint_dir(path)
        cfg = Config.from_hf(path)
        files = checkpoint_files(path)
        with torch.device("meta"):
            model = cls(cfg)
        if prepare is not None:
            prepare(model)
        found = {}  # name -> shape, read from the safetensors headers only
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    found.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
            except Exception as e:  # safetensors raises its own error type on a damaged header
                raise ValueError(f"{file}: not a readable safetensors file, truncated or damaged ({e})") from e
        check_tensor_names(model.state_dict(), found, path)
        dtype = dtype or _checkpoint_dtype(files[0])
        model = model.to(dtype).to_empty(device=device)  # the cast is free on meta; memory is allocated once
        state = model.state_dict()
        with torch.no_grad():
            for file in files:
                with safe_open(file, framework="pt", device=str(device)) as f:
                    for name in f.keys():
                        state[name].copy_(f.get_tensor(name))
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=5 * 1024 ** 3, dtype=None):
        """Write config.json, generation_config.json and model.safetensors (sharded with an index above
        `max_shard_bytes`); data.save_hf_files adds the tokenizer, chat template and processor files."""
        write_hf_checkpoint(path, self.cfg, self.state_dict(), max_shard_bytes, dtype)


def generation_config(cfg: Config) -> dict:
    """generation_config.json: the stop tokens and the pad id; greedy decoding, sample.py's default."""
    return {"do_sample": False, "eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id}


def write_hf_checkpoint(path, cfg: Config, state_dict: dict, max_shard_bytes=5 * 1024 ** 3, dtype=None):
    """config.json (with the weights' `dtype`, as transformers 5 writes it), generation_config.json and safetensors
    (one file, or shards + model.safetensors.index.json), as `transformers` writes them."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {name: t.detach().to(dtype or t.dtype).contiguous().cpu() for name, t in state_dict.items()}
    config = {**cfg.to_hf(), "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}
    for name, content in (("config.json", config), ("generation_config.json", generation_config(cfg))):
        with open(os.path.join(path, name), "w") as f:
            f.write(json.dumps(content, indent=2) + "\n")
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def not_found(path, what: str = "checkpoint directory") -> str:
    """The one-line error for a missing checkpoint; a name shaped like a Hugging Face Hub id (owner/name) also says
    how to fetch it, since nothing here downloads."""
    message = f"{what} not found: {path}"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", os.fspath(path)):
        message += (f" (a Hugging Face Hub id is not downloaded here: fetch it first with `hf download {path} "
                    f"--local-dir {os.path.basename(os.fspath(path))}` and pass that directory)")
    return message


def check_checkpoint_dir(path):
    """One clear error when `path` is not a checkpoint directory (missing — a Hub id says how to fetch it — a file,
    or without config.json)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(not_found(path))
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file; a checkpoint is a directory (config.json, model.safetensors, "
                                 "tokenizer.json)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")


def checkpoint_files(path) -> list:
    """The safetensors files of a checkpoint directory; never a pickle."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
        return [os.path.join(path, n) for n in names]
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path} "
                            "(only safetensors checkpoints are read; pickled .bin files are never loaded)")


def check_tensor_names(expected: dict, found: dict, path):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(f"{n}: checkpoint {found[n]} vs model {tuple(expected[n].shape)}"
                       for n in set(expected) & set(found) if tuple(expected[n].shape) != tuple(found[n]))
    if missing or unexpected or misshaped:
        def show(items):
            return "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
        raise ValueError(f"checkpoint {path} does not match its config.json:\n"
                         f"  missing ({len(missing)}):\n    {show(missing)}\n"
                         f"  unexpected ({len(unexpected)}):\n    {show(unexpected)}\n"
                         f"  wrong shape ({len(misshaped)}):\n    {show(misshaped)}")


def _checkpoint_dtype(file) -> torch.dtype:
    """The dtype the checkpoint was saved in (read from the safetensors header, no tensor is loaded)."""
    from safetensors import safe_open

    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(file, framework="pt") as f:
        return names.get(f.get_slice(next(iter(f.keys()))).get_dtype(), torch.float32)
