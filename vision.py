"""The vision encoder of GLM-4.1V (paper §2): an AIMv2-Huge ViT adapted to any resolution, and the MLP projector.

    patches (N, 3·2·14·14)            every 4 consecutive rows are one 2×2 merge window
      → Conv3d patch embed             kernel = stride = (2, 14, 14): two frames fold into one token (3D conv)
      → RMSNorm                        post_conv_layernorm
      → + absolute position embedding  the 24×24 table, bicubic-resampled to each image's patch grid
      → 24 pre-norm blocks             2D-RoPE, attention only within each image (packed, cu_seqlens)
      → RMSNorm                        post_layernorm
      → 2×2 Conv2d downsample          4 patches → 1 token in the LLM's width
      → merger                         Linear → LayerNorm → GELU → SwiGLU   (the "MLP projector")
    tokens (N/4, 4096)

All images (and video frame pairs) of a batch travel as one packed sequence: no padding, no N×N mask.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
import rope2d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return kernels.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used in every ViT block and at the end of the projector."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PatchEmbed(nn.Module):
    """Conv3d over (2 frames × 14 × 14) patches — the temporal downsampling of paper §2. As kernel == stride
    covers a whole patch, the convolution is one matmul over the flattened patch."""

    def __init__(self, cfg):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.vision_hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, patches):  # (N, C·t·p·p) -> (N, hidden)
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.flatten(1), self.proj.bias)


class PositionEmbedding(nn.Module):
    """Learned absolute positions for a 24×24 grid (336 px), bicubic-resampled to any grid (paper §2).

    Patch (h, w) of an H×W grid samples the table at 2·((w+0.5)/W, (h+0.5)/H) − 1 with align_corners=False and
    border padding, in fp32 — so a 1×200 strip and a 200×1 column both get smooth, sensible positions."""

    def __init__(self, cfg):
        super().__init__()
        self.num_side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.num_side ** 2, cfg.vision_hidden_size)

    def forward(self, coords: torch.Tensor, grid_hw: torch.Tensor) -> torch.Tensor:
        """coords (N, 2) patch (row, col); grid_hw (N, 2) the patch grid (H, W) of each patch's image."""
        table = self.position_embedding.weight
        table_2d = table.float().view(self.num_side, self.num_side, -1).permute(2, 0, 1)[None]  # (1, C, S, S)
        xy = (coords.flip(-1).float() + 0.5) / grid_hw.flip(-1).float() * 2 - 1  # (N, 2) as (x=col, y=row)
        sampled = F.grid_sample(table_2d, xy[None, :, None, :], mode="bicubic", align_corners=False,
                                padding_mode="border")  # (1, C, N, 1)
        return sampled[0, :, :, 0].T.to(table.dtype)  # (N, C)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.vision_num_heads
        self.head_dim = cfg.vision_hidden_size // cfg.vision_num_heads
        self.qkv = nn.Linear(cfg.vision_hidden_size, 3 * cfg.vision_hidden_size, bias=cfg.vision_attention_bias)
        self.proj = nn.Linear(cfg.vision_hidden_size, cfg.vision_hidden_size, bias=False)

    def forward(self, x, rope, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)  # 3 × (N, H, D)
        q, k = kernels.rope_vision(q, k, rope)  # 2D-RoPE (paper §2)
        out = kernels.flash_attention(q, k, v, cu_seqlens, causal=False, max_seqlen=max_seqlen)  # per image
        return self.proj(out.flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.vision_hidden_size, cfg.vision_rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.vision_hidden_size, cfg.vision_rms_norm_eps)
        self.mlp = SwiGLU(cfg.vision_hidden_size, cfg.out_hidden_size)

    activation_checkpointing = False  # set by the trainer: recompute this block in the backward pass

    def forward(self, x, rope, cu_seqlens, max_seqlen):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, rope, cu_seqlens, max_seqlen, use_reentrant=False)
        return self._forward(x, rope, cu_seqlens, max_seqlen)

    def _forward(self, x, rope, cu_seqlens, max_seqlen):
        x = x + self.attn(self.norm1(x), rope, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm2(x))


class Merger(SwiGLU):
    """The MLP projector into the LLM (paper §2): Linear → LayerNorm → GELU → SwiGLU."""

    def __init__(self, cfg):
        super().__init__(cfg.out_hidden_size, cfg.vision_intermediate_size)
        self.proj = nn.Linear(cfg.out_hidden_size, cfg.out_hidden_size, bias=False)
        self.post_projection_norm = nn.LayerNorm(cfg.out_hidden_size)

    def forward(self, x):
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class VisionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.vision_hidden_size, cfg.vision_rms_norm_eps)
        self.embeddings = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_depth))
        self.post_layernorm = RMSNorm(cfg.vision_hidden_size, cfg.vision_rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.vision_hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.merger = Merger(cfg)

    def check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
            raise ValueError(f"pixel_values must be (num_patches, {patch_dim}), got {tuple(pixel_values.shape)}")
        if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be (num_images, 3) rows of (t, h, w), got {tuple(grid_thw.shape)}")
        if (grid_thw <= 0).any() or (grid_thw[:, 1:] % m != 0).any():
            raise ValueError(f"every grid (t, h, w) needs t, h, w > 0 and h, w divisible by the merge size {m}; "
                             f"got {grid_thw.tolist()}")
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != expected:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but the grids {grid_thw.tolist()} "
                             f"describe {expected}")

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 3·2·14·14), grid_thw (num_images, 3) → visual tokens (N / m², out_hidden_size)."""
        self.check_inputs(pixel_values, grid_thw)
        grid_thw = grid_thw.to(pixel_values.device)
        if torch.is_grad_enabled() or len(grid_thw) == 1:
            return self.encode(pixel_values, grid_thw)
        # Inference: every op of the encoder is per image, so encode groups of whole images (≤ inference_patches
        # each) one after another; peak memory then follows the group, not the whole many-image batch.
        sizes = grid_thw.prod(-1).tolist()
        outputs, first, patches = [], 0, 0
        for i, size in enumerate(sizes + [None]):
            if i > first and (size is None or patches + size > self.inference_patches):
                outputs.append(self.encode(pixel_values[sum(sizes[:first]):sum(sizes[:i])], grid_thw[first:i]))
                first, patches = i, 0
            patches += size or 0
        return torch.cat(outputs)

    inference_patches = 4096

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        m = self.cfg.spatial_merge_size
        coords = rope2d.vision_patch_coords(grid_thw, m)  # (N, 2)
        frames_hw = grid_thw[:, 1:].repeat_interleave(grid_thw[:, 0], dim=0)  # one (h, w) per frame pair
        frame_sizes = frames_hw.prod(-1)
        grid_hw = frames_hw.repeat_interleave(frame_sizes, dim=0)  # (N, 2)
        cu_seqlens = F.pad(frame_sizes.cumsum(0), (1, 0)).to(torch.int32)  # each frame pair attends to itself

        x = self.post_conv_layernorm(self.patch_embed(pixel_values))
        x = x + self.embeddings(coords, grid_hw)
        max_seqlen = int(frame_sizes.max())
        cfg = self.cfg
        rope = kernels.rope_vision_setup(coords, cfg.vision_hidden_size // cfg.vision_num_heads, cfg.vision_rope_theta)
        for block in self.blocks:
            x = block(x, rope, cu_seqlens, max_seqlen)
        x = self.post_layernorm(x)
        # each run of m² rows is one m×m window: (N/m², m, m, C) -> channels-first for the conv, as one matmul
        windows = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).flatten(1)  # (N/m², C·m·m)
        x = F.linear(windows, self.downsample.weight.flatten(1), self.downsample.bias)
        return self.merger(x)
