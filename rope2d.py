"""Positions in GLM-4.1V: how one model sees text, images of any size and videos (paper §2).

Three ideas live here, each a few lines of tensor code:

1. **Vision 2D-RoPE** (paper §2, "2D-RoPE"): every ViT patch knows its (row, col) in its own image, so the
   encoder handles any resolution and aspect ratio (up to 200:1) without a fixed grid. Half of each head's
   frequencies rotate with the row, half with the column, rotate-half style over the full head_dim.
2. **3D M-RoPE** in the decoder (paper §2, from Qwen2-VL): each token carries (t, h, w) positions. Text tokens
   use (p, p, p), so for pure text it is ordinary 1D RoPE. The rotary frequencies are split by `mrope_section`
   into temporal / height / width groups, each driven by its own position id. GLM rotates only the first half of
   each head (partial rotary) in interleaved pairs (x[2i], x[2i+1]).
3. **The position builder** `get_rope_index`: walks a token sequence, gives text consecutive positions, lays each
   image out on its merged patch grid, and treats a video as a row of frame-pair "images", each followed by its
   timestamp as plain text — the *time index tokens* of paper §2 — so temporal order is carried by real text.

Layouts: q/k are `(*S, H, D)` with positions `(*S,)` / `(3, *S)`, where `*S` is `(N,)` for packed sequences or
`(B, T)` for batches. All angle math is fp32.
"""
import torch

# ---------------------------------------------------------------------------------------------------------------
# 1. Vision 2D-RoPE (paper §2)
# ---------------------------------------------------------------------------------------------------------------


def vision_patch_coords(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """(row, col) of every ViT patch, listed in the processor's order: merge windows of m×m patches one after
    another, row-major inside a window, and repeated for each temporal slot. Returns (N, 2) long."""
    coords = []
    m = spatial_merge_size
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)  # (H/m, m, W/m, m)
        cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        # window-major order: (H/m, W/m, m, m) then flatten
        rc = torch.stack([rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()], dim=-1)
        coords.append(rc.repeat(t, 1))
    return torch.cat(coords).to(grid_thw.device)


def vision_inv_freq(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """The head_dim/4 frequencies f_i = theta^(-2i / (head_dim/2)) shared by the row and the column axis."""
    return 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=device) / (head_dim // 2)))


def vision_rope_cos_sin(coords: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos/sin tables (N, head_dim) for patches at `coords` (N, 2): angles [row·f, col·f] fill head_dim/2 slots
    and are repeated for the two rotate-half halves."""
    angles = coords.float()[..., None] * vision_inv_freq(head_dim, theta, coords.device)  # (N, 2, head_dim/4)
    angles = angles.flatten(-2)  # (N, head_dim/2): [row·f..., col·f...]
    angles = torch.cat([angles, angles], dim=-1)  # (N, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q, k (N, H, D) by cos/sin (N, D); computed in fp32, returned in the input dtype."""
    cos, sin = cos[:, None, :].float(), sin[:, None, :].float()
    q_out = q.float() * cos + rotate_half(q.float()) * sin
    k_out = k.float() * cos + rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


# ---------------------------------------------------------------------------------------------------------------
# 2. Text 3D M-RoPE: partial, interleaved pairs, mrope_section (paper §2)
# ---------------------------------------------------------------------------------------------------------------


def mrope_inv_freq(rotary_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """The rotary_dim/2 frequencies theta^(-2i / rotary_dim) of the decoder's M-RoPE."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def mrope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, mrope_section, theta: float = 10000.0,
                  dtype: torch.dtype = torch.float32):
    """cos/sin (*S, rotary_dim) for 3D positions (3, *S).

    rotary_dim/2 frequencies are split into `mrope_section` = [n_t, n_h, n_w] consecutive groups; group j takes its
    angle from position row j (temporal, height, width). Each angle then drives one interleaved pair, so it is
    repeated twice in place. Like the reference, the tables are cast to the activation dtype."""
    assert sum(mrope_section) == rotary_dim // 2, f"mrope_section {mrope_section} must sum to {rotary_dim // 2}"
    angles = position_ids.float()[..., None] * mrope_inv_freq(rotary_dim, theta, position_ids.device)  # (3,*S,R/2)
    # frequency group j takes its angle from position row j: (t, h, w)
    angles = torch.cat([chunk[j] for j, chunk in enumerate(angles.split(list(mrope_section), dim=-1))], dim=-1)
    angles = angles.repeat_interleave(2, dim=-1)  # (*S, rotary_dim), pairs share an angle
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a 90° turn of every interleaved pair."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([-x_odd, x_even], dim=-1).flatten(-2)


def apply_mrope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate the first rotary_dim dims of q, k (*S, H, D) by cos/sin (*S, rotary_dim); the rest pass through."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads

    def rotate(x):
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        return torch.cat([x_rot * cos + rotate_pairs(x_rot) * sin, x_pass], dim=-1)

    return rotate(q), rotate(k)


# ---------------------------------------------------------------------------------------------------------------
# 3. Position ids for mixed text / image / video sequences (paper §2: any resolution, time index tokens)
# ---------------------------------------------------------------------------------------------------------------


def in_video(input_ids: torch.Tensor, video_start_token_id: int, video_end_token_id: int) -> torch.Tensor:
    """(..., T) bool: the tokens inside <|begin_of_video|>…<|end_of_video|>, where an image placeholder is a video
    frame pair (images and videos share the placeholder token)."""
    return (input_ids == video_start_token_id).cumsum(-1) > (input_ids == video_end_token_id).cumsum(-1)


def get_rope_index(input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
                   image_token_id: int, video_start_token_id: int, video_end_token_id: int,
                   spatial_merge_size: int):
    """3D positions (3, B, T) for a batch of token sequences, and the per-row offset `deltas` (B, 1) such that the
    k-th generated token (k = 0, 1, ...) of a row with L real prompt tokens sits at position L + k + delta, i.e.
    right after the prompt's largest position.

    Text advances p by one per token with positions (p, p, p). A run of image tokens is one image (or one video
    frame pair when inside <|begin_of_video|>…<|end_of_video|>) with merged grid (h, w): its cell (i, j) gets
    (p, p+i, p+j), then p advances by max(h, w). Images take grids from `image_grid_thw` in order; a video with t
    temporal slots takes t consecutive runs, each laid out like an image with t = 1. Padding (attention_mask 0),
    left or right, gets position 0 and does not advance p."""
    B, T = input_ids.shape
    device = input_ids.device
    m = spatial_merge_size
    image_grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    frame_grids = []  # one (h, w) per video frame pair
    for t, h, w in ([] if video_grid_thw is None else video_grid_thw.tolist()):
        frame_grids += [(1, h, w)] * t
    next_image, next_frame = 0, 0

    position_ids = torch.zeros(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, 1, dtype=torch.long)
    ids_cpu = input_ids.cpu()
    mask_cpu = None if attention_mask is None else attention_mask.cpu().bool()
    for b in range(B):
        keep = torch.ones(T, dtype=torch.bool) if mask_cpu is None else mask_cpu[b]
        ids = ids_cpu[b][keep]
        video = in_video(ids, video_start_token_id, video_end_token_id)
        is_vision = ids == image_token_id
        # runs of equal "is_vision" give text spans and vision spans
        change = torch.nonzero(is_vision[1:] != is_vision[:-1]).flatten() + 1
        bounds = [0] + change.tolist() + [len(ids)]
        pieces, p = [], 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            if not is_vision[start]:
                pieces.append(torch.arange(p, p + end - start).expand(3, -1))
                p += end - start
                continue
            if video[start]:
                if next_frame >= len(frame_grids):
                    raise ValueError(f"row {b}: more video frame runs in input_ids than video_grid_thw provides "
                                     f"({len(frame_grids)} frame pairs)")
                _, h, w = frame_grids[next_frame]
                next_frame += 1
            else:
                if next_image >= len(image_grids):
                    raise ValueError(f"row {b}: more image placeholder runs in input_ids than image_grid_thw "
                                     f"provides ({len(image_grids)} images)")
                t, h, w = image_grids[next_image]
                next_image += 1
                if t != 1:
                    raise ValueError(f"image grid {(t, h, w)} has t={t}; still images have t=1 (videos go in "
                                     "video_grid_thw)")
            gh, gw = h // m, w // m
            if end - start != gh * gw:
                raise ValueError(f"row {b}: a run of {end - start} image tokens does not match its grid "
                                 f"(h={h}, w={w}) -> {gh * gw} merged tokens")
            rows = torch.arange(gh).view(gh, 1).expand(gh, gw).flatten()
            cols = torch.arange(gw).view(1, gw).expand(gh, gw).flatten()
            pieces.append(torch.stack([torch.zeros_like(rows), rows, cols]) + p)
            p += max(gh, gw)
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, keep] = positions
        deltas[b] = (positions.max() + 1 - len(ids)) if len(ids) else 0
    if next_image != len(image_grids) or next_frame != len(frame_grids):
        raise ValueError(f"input_ids use {next_image} of {len(image_grids)} images and {next_frame} of "
                         f"{len(frame_grids)} video frame pairs given by the grids; placeholder tokens and grids "
                         "must match one to one")
    return position_ids.to(device), deltas.to(device)
