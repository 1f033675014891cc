"""Helpers that build the `transformers` reference model next to ours. Tests only: no project file imports this."""
import json
import os

import torch

import model as M


def random_weights_(module: torch.nn.Module, seed: int = 0):
    """Overwrite every parameter with random values (norm weights around 1) so parity tests exercise them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name or "norm1" in name or "norm2" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return module


def hf_model(cfg: M.Config, ours: M.GLM4V = None):
    """The reference Glm4vForConditionalGeneration for `cfg`, holding `ours`' weights when given."""
    import transformers

    hf_cfg = transformers.Glm4vConfig(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    ref = transformers.Glm4vForConditionalGeneration(hf_cfg).eval()
    if ours is not None:
        missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
    return ref


def mm_token_type_ids(cfg: M.Config, input_ids: torch.Tensor) -> torch.Tensor:
    """What the reference processor returns: 1 for image placeholders, 2 for those inside video markers."""
    in_video = (input_ids == cfg.video_start_token_id).cumsum(-1) > (input_ids == cfg.video_end_token_id).cumsum(-1)
    is_vision = input_ids == cfg.image_token_id
    return (is_vision & ~in_video).long() + 2 * (is_vision & in_video).long()


def image_tokens(cfg: M.Config, t: int, h: int, w: int) -> list:
    n = t * h * w // cfg.spatial_merge_size ** 2
    return [cfg.image_start_token_id] + [cfg.image_token_id] * n + [cfg.image_end_token_id]


def video_tokens(cfg: M.Config, t: int, h: int, w: int, timestamps, text_ids) -> list:
    """<|begin_of_video|> then per frame pair <|begin_of_image|> image… <|end_of_image|> <timestamp text>."""
    out = [cfg.video_start_token_id]
    for ts in timestamps[:t]:
        out += image_tokens(cfg, 1, h, w) + text_ids(str(int(ts)))
    return out + [cfg.video_end_token_id]


def patches(cfg: M.Config, grid_thw, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(torch.as_tensor(grid_thw).prod(-1).sum())
    return torch.randn(n, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2, generator=g)


def write_json(path, obj):
    with open(os.path.join(path), "w") as f:
        json.dump(obj, f)
