"""world.py: every domain and level gives a valid item whose image shows its answer and whose reply its verifier
accepts, items are deterministic and small, train and held-out never overlap, the sources and the CLI."""
import json
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import data as D
import rewards
import world as W


def follows_contract(task, answer):
    """The ground-truth format every domain's answers follow (what its verifier reads)."""
    if task == "math":
        return re.fullmatch(r"-?\d+(/\d+|\.\d+)?", answer) is not None
    if task == "ocr":
        return bool(answer.strip()) and answer == answer.strip()
    if task == "counting":
        return re.fullmatch(r"\d+", answer) is not None
    if task == "chart":
        return re.fullmatch(r"-?\d+(\.\d+)?", answer) is not None
    if task == "grounding":
        boxes = json.loads(answer)
        boxes = boxes if isinstance(boxes[0], list) else [boxes]
        return all(len(b) == 4 and all(isinstance(v, int) and 0 <= v <= 1000 for v in b) and b[0] < b[2] and
                   b[1] < b[3] for b in boxes)
    if task == "gui":
        action = json.loads(answer)
        if action["action"] == "click":
            return set(action) == {"action", "box"} and follows_contract("grounding", json.dumps(action["box"]))
        return action["action"] == "type" and set(action) == {"action", "text"} and bool(action["text"])
    if task == "video_grounding":
        m = re.fullmatch(r"\[(\d+\.\d), (\d+\.\d)\]", answer)
        return m is not None and float(m[1]) < float(m[2])
    if task == "choice":
        return re.fullmatch(r"[A-D]", answer) is not None
    raise AssertionError(task)


def pixel_box(box1000, size):
    """0–1000 box -> inclusive pixel box."""
    w, h = size
    return (round(box1000[0] * w / 1000), round(box1000[1] * h / 1000), round(box1000[2] * w / 1000) - 1,
            round(box1000[3] * h / 1000) - 1)


def colour_mask(image, rgb):
    return (np.asarray(image) == np.array(rgb, dtype=np.uint8)).all(-1)


def bbox(mask):
    ys, xs = np.nonzero(mask)
    return (xs.min(), ys.min(), xs.max(), ys.max())


def check_image_shows_answer(item):
    """Domain by domain: what was drawn (read back from the pixels) determines the stored answer."""
    f = item.facts
    if item.task in ("counting", "grounding", "choice"):
        image = np.asarray(item.image)
        for (kind, colour), box in zip(f["objects"], f["boxes"]):  # every object is drawn where the facts say
            x0, y0, x1, y1 = box
            region = colour_mask(item.image, W.COLORS[colour])[y0:y1 + 1, x0:x1 + 1]
            assert region.any() and bbox(region) == (0, 0, x1 - x0, y1 - y0), (item.key, kind, colour)
        assert image.shape[:2] == (item.size[1], item.size[0])
    if item.task == "counting":
        kind, colour = f["target"]
        n = sum(k == kind and (colour is None or c == colour) for k, c in f["objects"])
        assert item.answer == str(n)
    elif item.task == "grounding":
        boxes = json.loads(item.answer)
        boxes = boxes if isinstance(boxes[0], list) else [boxes]
        kind, colour = f["target"]
        mask = colour_mask(item.image, W.COLORS[colour])
        for box in boxes:  # the answer's box, back in pixels, is the tight box of a target-coloured shape
            x0, y0, x1, y1 = pixel_box(box, item.size)
            assert abs(np.array(bbox(mask[y0 - 1:y1 + 2, x0 - 1:x1 + 2])) - np.array(
                (1, 1, x1 - x0 + 1, y1 - y0 + 1))).max() <= 1
        targets = [b for (k, c), b in zip(f["objects"], f["boxes"]) if (k, c) == (kind, colour)]
        assert len(targets) == len(boxes)
    elif item.task == "choice":
        options = dict(re.findall(r"\n([A-D])\. (\w+)", item.question))
        assert options[item.answer] == f["correct"] and list(options.values()).count(f["correct"]) == 1
    elif item.task == "gui":
        action = json.loads(item.answer)
        if action["action"] == "click":
            x0, y0, x1, y1 = pixel_box(action["box"], item.size)
            image = np.asarray(item.image)
            outline = np.array((120, 120, 120), dtype=np.uint8)
            assert (image[y0, x0:x1 + 1] == outline).all() and (image[y1, x0:x1 + 1] == outline).all()
            assert (image[y0:y1 + 1, x0] == outline).all() and (image[y0:y1 + 1, x1] == outline).all()
            label = f["labels"][f["target"]]
            assert f"Click the {label} button." == item.question or f["note"] == f"Click {label}"
        else:
            assert f["note"] == f"Type: {action['text']}"
    elif item.task == "video_grounding":
        start, end = json.loads(item.answer)
        kind, colour = f["target"]
        seen = [f_ for f_, frame in enumerate(item.frames) if colour_mask(frame, W.COLORS[colour]).any()]
        others = [c for _, c, *_ in f["distractors"]]
        if colour not in others:
            assert seen == list(range(round(start * item.fps), round(end * item.fps)))
        assert f["visible"] == list(range(round(start * item.fps), round(end * item.fps)))
    elif item.task == "chart":
        heights = []
        for x0, y0, x1, y1 in f["bars"]:
            column = colour_mask(item.image, f["color"])[:, (x0 + x1) // 2]
            heights.append(column.sum())
        values = [float(v) for v in f["values"]]
        for h, v in zip(heights, values):  # bar heights are proportional to the printed values
            assert abs(h - v / max(values) * heights[values.index(max(values))]) <= 1.5
        q, lab = item.question, f["labels"]
        val = dict(zip(lab, map(Fraction, f["values"])))
        if q.startswith("What is the value of bar"):
            expect = val[q.split()[-1][:-1]]
        elif " plus " in q or " minus " in q:
            a, op, b = q[len("What is "):-1].split()
            expect = val[a] + val[b] if op == "plus" else val[a] - val[b]
        elif q == "What is the largest value?":
            expect = max(val.values())
        elif q == "What is the total of all values?":
            expect = sum(val.values())
        else:
            expect = Fraction(max(val, key=val.get))
        assert Fraction(item.answer) == expect
    elif item.task == "math":  # exact arithmetic on the expression gives the answer
        expr = f["expression"]
        assert re.fullmatch(r"[\d+\-*/().]+", expr)
        exact = eval(re.sub(r"\d+(\.\d+)?", lambda m: f"Fraction('{m[0]}')", expr), {"Fraction": Fraction})
        assert Fraction(item.answer) == exact
    if item.task in ("math", "ocr"):  # the text is drawn whole inside the canvas
        pixels = np.asarray(item.image)
        ink = (pixels != pixels[0, 0]).any(-1)
        assert ink.sum() > 20
        if item.level < 5:  # (level 5 sprinkles noise specks everywhere)
            x0, y0, x1, y1 = bbox(ink)
            assert x0 >= 1 and y0 >= 1 and x1 <= item.size[0] - 2 and y1 <= item.size[1] - 2


def test_every_domain_and_level_is_valid_and_shows_its_answer():
    for task in W.TASKS:
        for level in W.LEVELS:
            for index in range(3):
                item = W.make_item(task, index, level=level)
                assert (item.task, item.level) == (task, level)
                assert follows_contract(task, item.answer), (task, level, item.answer)
                assert rewards.score(task, item.reply(), item.answer) == 1.0
                assert rewards.score(task, item.reply(thinking=False), item.answer) == 1.0
                check_image_shows_answer(item)
                w, h = item.size
                assert w % 28 == 0 and h % 28 == 0 and 56 <= min(w, h) and max(w, h) <= 224
                assert len(item.reply().encode()) < 200 and item.caption and item.question


def test_items_are_deterministic_and_small():
    a, b = W.make_item("chart", 12, seed=5), W.make_item("chart", 12, seed=5)
    assert a.image.tobytes() == b.image.tobytes() and a.answer == b.answer and a.key == b.key
    assert W.make_item("chart", 12, seed=6).key != a.key
    lazy = W.make_item("gui", 3, render=False)
    assert lazy.image is None and lazy.key == W.make_item("gui", 3).key
    tokens = []
    for task in W.TASKS:
        for i in range(10):
            item = W.make_item(task, i, render=False)
            if item.num_frames:
                grid, _ = D.video_layout(item.num_frames, item.size)
            else:
                grid = D.image_grid(item.size)
            tokens.append(int(grid.prod()) // 4)
    assert np.mean(np.array(tokens) <= 64) >= 0.85 and max(tokens) <= 100


def test_train_and_heldout_are_disjoint():
    for task in W.TASKS:
        train = {W.make_item(task, i, split="train", render=False).key for i in range(60)}
        held = [W.make_item(task, i, split="heldout", render=False) for i in range(20)]
        assert all(W.split_of(item.key) == "heldout" for item in held)  # the split is a function of the content
        assert not train & {item.key for item in held}
        assert all(W.split_of(k) == "train" for k in train)
    with pytest.raises(ValueError, match="unknown task"):
        W.make_item("poetry", 0)
    with pytest.raises(ValueError, match="split"):
        W.make_item("math", 0, split="test")


def test_synthetic_source_kinds_and_no_think_share(tok):
    sft = W.SyntheticSource("sft", no_think_share=0.5)
    thinking = [sft.sample(i, render=False)["thinking"] for i in range(200)]
    assert 60 < sum(thinking) < 140
    for i in range(16):
        assert sft.length(i, tok) == len(sft.encode(i, tok)["input_ids"])
    cap = W.SyntheticSource("caption")
    assert set(cap.sample(6)) == {"video", "text"} and set(cap.sample(0)) == {"image", "text"}
    for i in range(8):
        assert cap.length(i, tok) == len(cap.encode(i, tok)["input_ids"])
    prompt = sft.item(0).prompt(tok)
    assert prompt["text"].endswith("<|assistant|>\n") and not prompt["loss_mask"].any()


def test_show_cli_writes_a_contact_sheet(tmp_path):
    out = tmp_path / "grid.png"
    W.main(["show", "--domain", "grounding", "--n", "8", "--out", str(out)])
    sheet = Image.open(out)
    assert sheet.size == (4 * 240, 2 * (240 + 100))
    magenta = colour_mask(sheet.convert("RGB"), (255, 0, 255))
    assert magenta.sum() > 100  # the answer boxes are outlined


def test_export_round_trip_equals_the_synthetic_source(tmp_path, tok):
    path = W.main(["export", str(tmp_path), "--n", "1"])
    src = D.JsonlSource(path)
    synth = W.SyntheticSource("sft")
    assert src.size == len(W.TASKS)
    for i in range(len(W.TASKS)):  # same tokens and pixels whether read back from files or generated
        a, b = src.encode(i, tok), synth.encode(i, tok)
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        for key in ("pixel_values", "pixel_values_videos"):
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key])
