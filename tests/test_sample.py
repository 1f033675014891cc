"""sample.py: greedy tokens identical to `transformers` generate(), per-row stopping, sampling, top-p, force
answering, log-probs, bad input, and the command line."""
import dataclasses
import os

import pytest
import torch

import data
import model as M
import reference as R
import sample as S

transformers = pytest.importorskip("transformers")

# the tiny preset's vocabulary and special tokens (so the tiny tokenizer fits) in a smaller, faster network
CFG = dataclasses.replace(M.PRESETS["tiny"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          mrope_section=(2, 3, 3), vision_depth=2, vision_hidden_size=64, vision_num_heads=2,
                          vision_intermediate_size=128, out_hidden_size=128, image_size=56)
THINK_END, ANSWER = data.tiny_tokenizer().force_answer_ids  # </think>, <answer> in the tiny vocabulary


def text(s):
    return list(s.encode())


# decoding is thousands of tiny ops; on a busy 2-core machine OpenMP's thread hand-offs make them ~10× slower
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = R.random_weights_(M.GLM4V(CFG).eval(), 11)
    return ours, R.hf_model(CFG, ours)


def reference_generate(ref, ids, mask=None, n=20, eos=None, **vision):
    mask = torch.ones_like(ids) if mask is None else mask
    extra = {} if eos is None else dict(eos_token_id=list(eos))
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=R.mm_token_type_ids(CFG, ids),
                           max_new_tokens=n, do_sample=False, **extra, **vision)
    return out[:, ids.shape[1]:]


def full_logits(ours, ids, mask, new, **vision):
    """Teacher-forced logits (B, n, V) that predicted each new token, from one full forward."""
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        logits = ours(torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1), **vision)
    return logits[:, ids.shape[1] - 1:-1]


def assert_decisive(ours, ids, mask, new, **vision):
    """Greedy parity only means something if no step is a near-tie that rounding could flip."""
    top2 = full_logits(ours, ids, mask, new, **vision).topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4


def padded_batch(rows, side="left"):
    T = max(map(len, rows))
    pad = [[CFG.pad_token_id] * (T - len(r)) for r in rows]
    ids = torch.tensor([p + r if side == "left" else r + p for r, p in zip(rows, pad)])
    mask = torch.tensor([[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
                         for r, p in zip(rows, pad)])
    return ids, mask


def mixed_batch(video=True):
    """Rows of different lengths: two images of different grids, a text-only row and (unless video=False; the
    reference cannot take images and videos in one call) a video."""
    grid, video_grid = torch.tensor([[1, 4, 4], [1, 2, 6]]), torch.tensor([[2, 4, 2]])
    rows = [text("short ") + R.image_tokens(CFG, 1, 4, 4),
            text("a much longer first prompt ") + R.image_tokens(CFG, 1, 2, 6) + text(" ok"),
            text("text only row")]
    vision = dict(pixel_values=R.patches(CFG, grid, 3), image_grid_thw=grid)
    if video:
        rows.append(text("clip ") + R.video_tokens(CFG, 2, 4, 2, [0, 3], text))
        vision.update(pixel_values_videos=R.patches(CFG, video_grid, 4), video_grid_thw=video_grid)
    return rows, vision


# ---------------------------------------------------------------------------------------------------------------
# Greedy parity with the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_greedy_matches_reference_batch_1(pair, kind):
    ours, ref = pair
    vision = {}
    if kind == "text":
        ids = text("The quick brown fox jumps over the lazy dog.")
    elif kind == "image":
        grid = torch.tensor([[1, 6, 10]])
        ids = text("Look: ") + R.image_tokens(CFG, 1, 6, 10) + text(" what is it?")
        vision = dict(pixel_values=R.patches(CFG, grid, 1), image_grid_thw=grid)
    else:
        grid = torch.tensor([[3, 4, 6]])
        ids = text("Clip: ") + R.video_tokens(CFG, 3, 4, 6, [0, 2, 14], text) + text(" when?")
        vision = dict(pixel_values_videos=R.patches(CFG, grid, 2), video_grid_thw=grid)
    ids = torch.tensor([ids])
    ours_new = S.generate(ours, ids, 24, **vision)
    ref_new = reference_generate(ref, ids, n=24, **vision)
    assert ours_new.shape == (1, 24)
    assert torch.equal(ours_new, ref_new)
    assert_decisive(ours, ids, None, ours_new, **vision)


def test_greedy_matches_reference_padded_video_batch(pair):
    ours, ref = pair
    grid = torch.tensor([[2, 4, 2], [3, 2, 4]])
    rows = [text("first clip ") + R.video_tokens(CFG, 2, 4, 2, [0, 3], text) + text(" what happens?"),
            text("a text row"),
            R.video_tokens(CFG, 3, 2, 4, [1, 5, 9], text)]
    ids, mask = padded_batch(rows)
    vision = dict(pixel_values_videos=R.patches(CFG, grid, 5), video_grid_thw=grid)
    new = S.generate(ours, ids, 16, attention_mask=mask, **vision)
    assert torch.equal(new, reference_generate(ref, ids, mask, 16, **vision))
    assert_decisive(ours, ids, mask, new, **vision)


def test_greedy_matches_reference_padded_batch_with_per_row_stops(pair, monkeypatch):
    ours, ref = pair
    rows, vision = mixed_batch(video=False)
    ids, mask = padded_batch(rows)
    n = 24
    free = S.generate(ours, ids, n, attention_mask=mask, **vision)
    assert torch.equal(free, reference_generate(ref, ids, mask, n, **vision))
    assert_decisive(ours, ids, mask, free, **vision)

    # Make two tokens of the greedy paths end-of-turn ids, chosen so that two rows end at different steps and one
    # runs to max_new_tokens (greedy tokens before a row's end do not depend on the stop ids).
    def end(row, stops):
        hits = torch.isin(free[row], torch.tensor(stops)).nonzero()
        return int(hits[0]) if len(hits) else n

    seen = free.unique().tolist()
    candidates = [(sorted(end(r, [a, b]) for r in range(len(rows))), (a, b)) for a in seen for b in seen if a < b]
    ends, stop = max(c for c in candidates if c[0][-1] == n and c[0][0] < c[0][1] < n)
    eos = stop + CFG.eos_token_ids
    monkeypatch.setattr(ours, "cfg", dataclasses.replace(CFG, eos_token_ids=eos))
    stopped = S.generate(ours, ids, n, attention_mask=mask, **vision)
    assert torch.equal(stopped, reference_generate(ref, ids, mask, n, eos=eos, **vision))
    for r in range(len(rows)):  # the stop token is kept, then padding
        e = end(r, list(stop))
        assert torch.equal(stopped[r, :e + 1], free[r, :e + 1])
        assert (stopped[r, e + 1:] == CFG.pad_token_id).all()
    # generation ends with the longest row: all rows stopping early shortens the result
    monkeypatch.setattr(ours, "cfg", dataclasses.replace(CFG, eos_token_ids=tuple(free[:, 0].tolist())))
    assert S.generate(ours, ids, n, attention_mask=mask, **vision).shape == (len(rows), 1)
    # the same when the device is asked only every 8 steps (as on a GPU) and the extra steps are cut off
    monkeypatch.setitem(S.STOP_CHECK_EVERY, "cpu", 8)
    steps = list(S.generate_stream(ours, ids, n, attention_mask=mask, **vision))
    assert len(steps) == 8 and (torch.stack([t for t, _ in steps[1:]]) == CFG.pad_token_id).all()
    assert S.generate(ours, ids, n, attention_mask=mask, **vision).shape == (len(rows), 1)
    monkeypatch.setattr(ours, "cfg", dataclasses.replace(CFG, eos_token_ids=eos))
    assert torch.equal(S.generate(ours, ids, n, attention_mask=mask, **vision), stopped)


def test_right_padding_gives_the_same_tokens(pair):
    ours, _ = pair
    rows, vision = mixed_batch()
    ids, mask = padded_batch(rows, "left")
    left = S.generate(ours, ids, 10, attention_mask=mask, **vision)
    ids, mask = padded_batch(rows, "right")
    assert torch.equal(S.generate(ours, ids, 10, attention_mask=mask, **vision), left)
    # a row alone gives what it gives in the batch
    alone = S.generate(ours, torch.tensor([rows[2]]), 10)
    assert torch.equal(alone[0], left[2])



def test_chunked_prefill_gives_the_same_tokens(pair, monkeypatch):
    ours, _ = pair
    rows, vision = mixed_batch()
    ids, mask = padded_batch(rows)
    whole = S.generate(ours, ids, 8, attention_mask=mask, **vision)
    monkeypatch.setattr(S, "PREFILL_CHUNK", 7)  # chunk borders cut through padding and images
    assert torch.equal(S.generate(ours, ids, 8, attention_mask=mask, **vision), whole)


# ---------------------------------------------------------------------------------------------------------------
# Sampling, top-p, log-probs
# ---------------------------------------------------------------------------------------------------------------


def test_top_p_filter_by_hand_and_against_the_reference_warper():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert S.top_p_filter(probs, 0.8).nonzero()[:, 1].tolist() == [1, 3]  # 0.5 + 0.3 reach 0.8
    assert S.top_p_filter(probs, 0.81).nonzero()[:, 1].tolist() == [0, 1, 3]
    assert S.top_p_filter(probs, 0.01).nonzero()[:, 1].tolist() == [1]  # the most likely token always stays
    assert torch.equal(S.top_p_filter(probs, 1.0), probs)
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.3, 0.9, 0.99):
        ours = S.top_p_filter(logits.softmax(-1), top_p) > 0
        theirs = torch.isfinite(transformers.generation.TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs)


def test_sampled_frequencies_follow_the_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 40000
    g = torch.Generator().manual_seed(0)
    tokens = S.sample_tokens(logits.expand(n, 4), temperature=0.5, top_p=0.9, generator=g)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1]) ** 2  # temperature 0.5 squares the probabilities
    p = p / p.sum()  # 0.533, 0.3, 0.133, 0.033: the nucleus of 0.9 is the first three
    p[3] = 0
    p = p / p.sum()
    freq = torch.bincount(tokens, minlength=4) / n
    assert freq[3] == 0
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


def test_seeded_sampling_is_reproducible_and_stays_in_the_nucleus(pair):
    ours, _ = pair
    rows, vision = mixed_batch()
    ids, mask = padded_batch(rows)

    def run(seed):
        return S.generate(ours, ids, 16, temperature=1.3, top_p=0.7, attention_mask=mask, **vision,
                          generator=torch.Generator().manual_seed(seed), return_logprobs=True)

    (a, lp_a), (b, lp_b), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
    assert not torch.equal(a, c)
    alive = torch.ones_like(a, dtype=torch.bool)
    for r in range(len(rows)):  # only steps up to a row's stop count
        stops = torch.isin(a[r], torch.tensor(CFG.eos_token_ids)).nonzero()
        if len(stops):
            alive[r, int(stops[0]) + 1:] = False
    logits = full_logits(ours, ids, mask, a, **vision)
    nucleus = S.top_p_filter((logits / 1.3).softmax(-1), 0.7) > 0
    chosen = nucleus.gather(-1, a[..., None])[..., 0]
    assert chosen[alive].all()
    assert (~nucleus).any()  # top-p really cut tokens at this temperature
    # log-probs of the chosen tokens under the temperature-scaled (untruncated) distribution
    expected = torch.log_softmax(logits / 1.3, -1).gather(-1, a[..., None])[..., 0]
    torch.testing.assert_close(lp_a[alive], expected[alive], atol=1e-4, rtol=0)
    assert (lp_a[~alive] == 0).all()


def test_greedy_logprobs_match_a_full_forward(pair):
    ours, _ = pair
    ids = torch.tensor([text("log probs please")])
    new, logprobs = S.generate(ours, ids, 12, return_logprobs=True)
    expected = torch.log_softmax(full_logits(ours, ids, None, new), -1).gather(-1, new[..., None])[..., 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Force answering (paper §5)
# ---------------------------------------------------------------------------------------------------------------


def test_force_answering_inserts_the_answer_tokens_and_continues(pair):
    ours, _ = pair
    ids, mask = padded_batch([text("think about it <think>"), text("and this one too")])
    budget, n = 5, 14
    free = S.generate(ours, ids, n, attention_mask=mask)
    forced = S.generate(ours, ids, n, attention_mask=mask, think_budget=budget, force_answer_ids=[THINK_END, ANSWER])
    assert not (free[:, :budget] == THINK_END).any()  # neither row closes its thinking on its own
    assert torch.equal(forced[:, :budget], free[:, :budget])
    assert (forced[:, budget:budget + 2] == torch.tensor([THINK_END, ANSWER])).all()
    assert not torch.equal(forced[:, budget + 2:], free[:, budget + 2:])
    # after the forced tokens the model answers: the same as greedy decoding from the extended prompt
    for r in range(2):
        prompt = torch.cat([ids[r][mask[r].bool()], forced[r, :budget + 2]])[None]
        assert torch.equal(forced[r, budget + 2:], S.generate(ours, prompt, n - budget - 2)[0])
    # a row that closes its thinking (here: emits the first forced id itself) before the budget is left alone
    closer = next(t for t in free[0, :budget].tolist() if t not in free[1, :budget].tolist())
    own = S.generate(ours, ids, n, attention_mask=mask, think_budget=budget, force_answer_ids=[closer, ANSWER])
    assert torch.equal(own[0], free[0])
    assert own[1, budget:budget + 2].tolist() == [closer, ANSWER]
    zero = S.generate(ours, ids, 3, attention_mask=mask, think_budget=0, force_answer_ids=[THINK_END, ANSWER])
    assert (zero[:, :2] == torch.tensor([THINK_END, ANSWER])).all()


# ---------------------------------------------------------------------------------------------------------------
# Context limits and bad input
# ---------------------------------------------------------------------------------------------------------------


def test_context_limit(pair):
    ours, _ = pair
    ids = torch.tensor([text("0123456789")])
    assert S.generate(ours, ids, 50, max_seq_len=13).shape == (1, 3)  # capped to what fits
    with pytest.raises(ValueError, match="10 tokens but the context holds 10"):
        S.generate(ours, ids, 5, max_seq_len=10)
    assert S.generate(ours, ids, 0).shape == (1, 0)


def test_bad_inputs_are_explained(pair):
    ours, _ = pair
    ids = torch.tensor([text("x ") + R.image_tokens(CFG, 1, 4, 4)])
    with pytest.raises(ValueError, match="were not given"):
        S.generate(ours, ids, 4)
    with pytest.raises(ValueError, match="temperature"):
        S.generate(ours, ids[:, :2], 4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        S.generate(ours, ids[:, :2], 4, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="force_answer_ids"):
        S.generate(ours, ids[:, :2], 4, think_budget=3)
    with pytest.raises(ValueError, match="no tokens"):
        S.generate(ours, torch.tensor([[1, 2], [3, 4]]), 4, attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="shape of input_ids"):
        S.generate(ours, torch.tensor([[1, 2]]), 4, attention_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        S.generate(ours, torch.tensor([1, 2]), 4)


def test_static_shape_decode_path_gives_the_same_tokens(pair, monkeypatch):
    """The compiled path attends over the whole static cache (masked) instead of the filled part; run it eagerly
    (compiling takes minutes on a CPU) and on a reused cache, which must not leak the previous call's slots."""
    ours, _ = pair
    rows, vision = mixed_batch()
    ids, mask = padded_batch(rows)
    eager = S.generate(ours, ids, 12, attention_mask=mask, **vision)
    monkeypatch.setattr(S, "compiled_decode_step", lambda device_type: S.decode_step)
    T = ids.shape[1]
    assert T + 12 <= S.CACHE_ROUNDING  # both calls use one cache
    # a first call whose padding covers the slots the second call decodes into
    stale_ids, stale_mask = padded_batch([text("y" * (T + 20)), text("x"), text("z")])
    S.generate(ours, stale_ids, 2, attention_mask=stale_mask, compile=True)
    assert torch.equal(S.generate(ours, ids, 12, attention_mask=mask, **vision, compile=True), eager)


def test_compiled_decode_gives_the_same_tokens(pair):
    """torch.compile for real on the CPU (inductor with its C++ wrapper, ~25 s cold): the one-query attention is
    the decomposed form there, so check that it decodes the eager tokens, on a padded batch with images and video,
    and again on a shorter prompt that reuses the cache and the compiled step."""
    ours, _ = pair
    rows, vision = mixed_batch()
    ids, mask = padded_batch(rows)
    eager = S.generate(ours, ids, 12, attention_mask=mask, **vision)
    assert torch.equal(S.generate(ours, ids, 12, attention_mask=mask, **vision, compile=True), eager)
    short = torch.tensor([text("a short one")])
    assert torch.equal(S.generate(ours, short, 8, compile=True), S.generate(ours, short, 8))


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, pair):
    from PIL import Image

    path = tmp_path_factory.mktemp("ckpt")
    pair[0].save_pretrained(path)
    data.tiny_tokenizer().save(path)
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(60, 90, 3, generator=g) * 255).byte().numpy()).save(path / "photo.png")
    return path


def cli(*argv, stdin=""):
    import io

    out = io.StringIO()
    S.main([str(a) for a in argv], stdin=io.StringIO(stdin), out=out)
    return out.getvalue()


def test_reply_printer_shows_thinking_answer_and_box(tok):
    import io

    reply = "<think>hmm, é?</think><answer>It is <|begin_of_box|>42<|end_of_box|>.</answer><|user|>"
    out = io.StringIO()
    printer = S.ReplyPrinter(tok, out, color=False)
    for t in tok.encode(reply):  # one token at a time: "é" is two byte tokens
        printer.add([t])
    assert printer.finish() == reply
    assert out.getvalue() == "Thinking:\nhmm, é?\n\nAnswer:\nIt is **42**.\n\nBoxed answer: 42\n"
    assert data.history_reply(reply) == "It is <|begin_of_box|>42<|end_of_box|>."  # what the next turn sees


def test_cli_prompt_with_an_image_gives_the_generated_reply(checkpoint, pair):
    ours, _ = pair
    tok = data.load_tokenizer(checkpoint)
    image = checkpoint / "photo.png"
    inputs = data.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
                              tok, images=[image])
    new = S.generate(ours, inputs["input_ids"][None], 12, pixel_values=inputs["pixel_values"],
                     image_grid_thw=inputs["image_grid_thw"])
    args = S.parse_args(["--checkpoint", str(checkpoint), "--max-new-tokens", "12"])
    model, tokenizer = S.load(str(checkpoint))
    assert S.Chat(model, tokenizer, args, out=open(os.devnull, "w")).ask("What?", [image]) == tok.decode(new[0])
    streamed = cli("--checkpoint", checkpoint, "--prompt", "What?", "--image", image, "--max-new-tokens", 12,
                   "--stream")
    assert streamed == cli("--checkpoint", checkpoint, "--prompt", "What?", "--image", image,
                           "--max-new-tokens", 12)
    assert len(streamed) > 5
    budget = cli("--checkpoint", checkpoint, "--prompt", "Think", "--max-new-tokens", 8, "--think-budget", 3)
    assert "\n\nAnswer:\n" in budget  # </think> forced after 3 tokens


def test_cli_interactive_chat_keeps_the_history(checkpoint, generate_prompts, tok):
    prompts = generate_prompts
    image = checkpoint / "photo.png"
    out = cli("--checkpoint", checkpoint, "--max-new-tokens", 6, "--no-think",
              stdin=f"first question\n/image {image}\nsecond, with a picture\n/image /no/such.png\n/quit\n")
    assert len(prompts) == 2 and "error: file not found: /no/such.png" in out
    first, second = tok.decode(prompts[0]), tok.decode(prompts[1])
    assert first.endswith("<|user|>\nfirst question<|assistant|>\n<think></think>")
    # the first reply stays by its answer alone (data.history_reply): no prefilled <think></think> before it
    assert second.startswith(first.removesuffix("<think></think>")) and second.count("<think></think>") == 1
    assert second.count("<|user|>") == 2 and "<|begin_of_image|>" in second


def test_cli_errors_are_explained(checkpoint, tmp_path):
    from PIL import Image

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            cli(*argv)
        return str(e.value.code)

    assert "checkpoint directory not found" in error("--checkpoint", tmp_path / "nowhere", "--prompt", "hi")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    assert "no tokenizer.json" in error("--checkpoint", tmp_path, "--prompt", "hi")
    (tmp_path / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text())
    assert "model.safetensors" in error("--checkpoint", tmp_path, "--prompt", "hi")
    assert "file not found" in error("--checkpoint", checkpoint, "--prompt", "hi", "--image", tmp_path / "no.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    assert "broken.png" in error("--checkpoint", checkpoint, "--prompt", "hi", "--image", tmp_path / "broken.png")
    Image.new("RGB", (6000, 20)).save(tmp_path / "strip.png")
    assert "aspect ratio" in error("--checkpoint", checkpoint, "--prompt", "hi", "--image", tmp_path / "strip.png")
    assert "context holds 40" in error("--checkpoint", checkpoint, "--prompt", "x" * 60, "--max-seq-len", 40)
    with pytest.raises(SystemExit):
        S.parse_args(["--checkpoint", str(checkpoint), "--top-p", "0"])
