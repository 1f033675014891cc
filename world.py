"""The synthetic task world: eight domains of verifiable tasks at five levels, the default data of every stage.

No data can be downloaded here, so pretraining, SFT and RL run on a world that is generated: small PIL images (or a
few video frames) for math (rendered arithmetic), OCR (rendered strings), counting, chart (bar charts), grounding
(find a shape, a box in 0–1000 coordinates), GUI (a window of buttons: a click or a typed word), video temporal
grounding (when is an object visible) and multiple choice. Each item comes from (seed, index) alone and carries a
difficulty level, a caption (pretraining, paper §3), a short reasoning reply in the `<think>/<answer>/box` format
(SFT, paper §4) and a ground-truth answer for the verifiers (RL, paper §5).

    python world.py show --domain grounding --n 8 --out grid.png   a contact sheet, to look at the world
    python world.py export out/world --kind sft --n 100             the world as JSONL + PNG/GIF files

Level 1 is one large object or a short string and a single step, sized for the tiny preset (which after minutes
of training tells big shapes and positions apart but reads little); level 5 crowds the scene, shrinks the text and
needs several steps. Image sides are multiples of 28, so the processor never resizes them (112×112 is 16 visual
tokens). The split of an item is decided by a hash of its content (the expression, the string, the scene), so a
held-out item can never also be a training item.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import random
import re
from fractions import Fraction
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import data
from data import FACTOR, VIDEO_FPS, Unrendered, stable_hash

TASKS = ("math", "ocr", "counting", "chart", "grounding", "gui", "video_grounding", "choice")
LEVELS = (1, 2, 3, 4, 5)
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10  # one content hash in ten belongs to the held-out split
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
    ground truth (in the format its verifier reads), `reasoning` the short chain of thought, `caption` the pretraining text,
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
        """The SFT target: the reasoning (none with thinking=False), then the boxed answer (data.format_reply)."""
        return data.format_reply(self.answer, self.reasoning, thinking)

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

    def prompt(self, tokenizer: data.Tokenizer, thinking: bool = True) -> dict:
        """render_chat of the question with the generation prompt (what RL rollouts start from)."""
        return data.render_chat(self.messages(with_reply=False), tokenizer, **self.media(), thinking=thinking)


class _Retry(Exception):
    """A generator drew an impossible scene (e.g. objects that do not fit): try the next attempt."""


def split_of(key: str) -> str:
    """The split an item with content `key` belongs to. A function of the content alone, so no content can be in
    both splits."""
    return "heldout" if stable_hash("split", key) % HELDOUT_EVERY == 0 else "train"


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


def _draw_scene(side: int, background, objects, boxes) -> Image.Image:
    """A square canvas with each (shape, colour) object filled into its pixel box."""
    image = Image.new("RGB", (side, side), background)
    d = ImageDraw.Draw(image)
    for (kind, color), box in zip(objects, boxes):
        _draw_shape(d, kind, box, COLORS[color])
    return image


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
    draw = functools.partial(_draw_scene, side, bg, objects, boxes)
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
    draw = functools.partial(_draw_scene, side, (255, 255, 255), objects, boxes)
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
        rng = random.Random(stable_hash("item", seed, task, split, index, level, attempt))
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
        thinking = not data.no_think(self.seed, i, self.no_think_share)
        return {"messages": item.messages(thinking=thinking), **media, "thinking": thinking}

    def length(self, i: int, tokenizer: data.Tokenizer) -> int:
        return len(data.encode_sample(self.sample(i, render=False), tokenizer, sizes_only=True)["input_ids"])

    def encode(self, i: int, tokenizer: data.Tokenizer) -> dict:
        return data.encode_sample(self.sample(i), tokenizer)


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


# ---------------------------------------------------------------------------------------------------------------
# Command line: python world.py show | export
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="The synthetic task world: look at it (show) or write it out as a "
                                                 "JSONL dataset (export).")
    sub = parser.add_subparsers(dest="command", required=True)
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


if __name__ == "__main__":
    main()
