"""benchmarks.py — readers of the files public benchmarks ship, for `python evaluate.py CHECKPOINT --bench FILE`.

A reader is a plain function (record, the file's folder, the record's number) -> [EvalItem]: it turns one record of
a benchmark file into what evaluation needs — the verifier task (rewards.VERIFIERS), the ground truth in that
verifier's format, and the user turn with its images or video. FORMATS maps a format name to its reader; `detect`
picks one from the first record's fields (--format forces one).

Files: .jsonl, .json (a list of records, or a dict of them as MathVista's testmini.json), .tsv (VLMEvalKit's, with
base64 images; an image cell that holds another row's index reuses that row's image), .txt (Charades-STA's
`vid start end##sentence` lines). Images are paths relative to the file's folder, base64 strings, or {"bytes",
"path"} dicts as Hugging Face exports write them. A record a reader cannot use — a missing field, a missing or
unreadable image — is skipped and counted, never fatal.

Prompts: the wording of each benchmark's official or standard evaluation (PROMPTS says whose). GLM-V's benchmark
script adds no system prompt and no wording of its own, so neither do we. Where the standard wording asks for an
answer our verifiers do not read (a time span as "a - b", a click as a point), the wording is ours and says so.
Scores are our verifiers' (rewards.py), not the benchmarks' own scorers: see the README's benchmark table.
"""
import ast
import base64
import binascii
import csv
import dataclasses
import io
import json
import os
import re

from PIL import Image

import data
import rewards
import world

LETTERS = "ABCDEFGHIJKLMNOP"

PROMPTS = {
    # MathVista's own query.json ("Hint" style): used as is when a record carries its `query`
    "mathvista_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                        "at the end.\nQuestion: {question}\nChoices:\n{options}",
    "mathvista_integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
                         "e.g., 1, 2, 3, at the end.\nQuestion: {question}",
    "mathvista_float1": "Hint: Please answer the question requiring a floating-point number with one decimal place "
                        "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: {question}",
    "mathvista_float2": "Hint: Please answer the question requiring a floating-point number with two decimal places "
                        "and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\nQuestion: {question}",
    "mathvista_list": "Hint: Please answer the question requiring a Python list as an answer and provide the final "
                      "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\nQuestion: {question}",
    # MMMU's evaluation code (options as "(A) …"); MMMU-Pro's direct prompts (options as "A. …")
    "mmmu_choice": "{question}\n\n{options}\n\nAnswer with the option's letter from the given choices directly.",
    "mmmu_open": "{question}\n\nAnswer the question using a single word or phrase.",
    "mmmu_pro": "{question}\n{options}\nAnswer with the option letter from the given choices directly.",
    "mmmu_pro_vision": "Answer with the option letter from the given choices directly.",
    # VLMEvalKit's multiple-choice prompt (MMStar TSV), lmms-eval's for options inside the question
    "mcq_columns": "{hint}Question: {question}\nOptions:\n{options}\nPlease select the correct answer from the "
                   "options above. \n",
    "mcq_inline": "{question}\nAnswer with the option's letter from the given choices directly",
    # VLMEvalKit's (MUIRBench, ChartQA); OCRBench's question goes as it is (lmms-eval)
    "muirbench": "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    "chartqa": "{question}\nAnswer the question using a single word or phrase.",
    # ours: the click in the JSON action format the gui verifier reads
    "screenspot": "{instruction}\nAnswer with the click as {{\"action\": \"click\", \"box\": [x1, y1, x2, y2]}}, the "
                  "box of the element in 0-1000 coordinates.",
    # GLM-V's README (its grounding example): boxes [x1, y1, x2, y2] in 0-1000 coordinates
    "refcoco": "Help me to locate {expression} in the image and give me its bounding boxes.",
    # ours: lmms-eval asks for "start - end", which the video_grounding verifier does not read
    "charades": "When does the event \"{sentence}\" happen in the video? Answer [start, end] in seconds.",
    # lmms-eval's CountBenchQA (never with the alt-text caption, which states the count)
    "countbench": "{question}\nAnswer with a single number.",
}


@dataclasses.dataclass
class EvalItem:
    """One evaluation prompt. The score of a reply is the best over `answer` and `alternatives` (benchmarks that
    accept several answers: OCRBench, ChartQA's label lists, MMMU's open questions)."""
    key: str                    # unique in a results folder ("{benchmark}/{record number}"): what a resume skips
    benchmark: str
    category: str               # the benchmark's own sub-task: MMMU subject, OCRBench type, ScreenSpot platform ...
    task: str                   # the verifier (rewards.VERIFIERS)
    answer: object              # the ground truth in that verifier's format
    question: str               # the prompt's text, for the record
    messages: list              # the conversation up to the reply
    images: list = ()           # paths, bytes or PIL images, in the order the messages place them
    videos: list = ()           # paths, frame folders or lists of PIL frames
    alternatives: tuple = ()
    index: int = 0              # the record's number in its file (synthetic: the item index)
    level: int = None           # synthetic items only

    def prompt(self, tokenizer: data.Tokenizer) -> dict:
        """render_chat of the conversation with the generation prompt, thinking on; a missing or unreadable
        image raises (FileNotFoundError / ValueError)."""
        return data.render_chat(self.messages, tokenizer, images=[load_image(i) for i in self.images],
                                videos=list(self.videos), add_generation_prompt=True)


def synthetic_item(item: world.Item) -> EvalItem:
    """A held-out item of the synthetic world as an evaluation item (benchmark "synthetic", one category per task)."""
    return EvalItem(f"synthetic/{item.task}/{item.level}/{item.index}", "synthetic", item.task, item.task,
                    item.answer, item.question, item.messages(with_reply=False), **item.media(), index=item.index,
                    level=item.level)


# ---------------------------------------------------------------------------------------------------------------
# Media: paths relative to the file, base64, Hugging Face {"bytes", "path"} dicts
# ---------------------------------------------------------------------------------------------------------------

_BASE64 = re.compile(r"[A-Za-z0-9+/]{64,}={0,2}")  # no '.': a file name has one


def media(value, root: str):
    """An image as a benchmark stores it -> a path (joined to the file's folder) or the decoded bytes of a base64
    string (a data: URL, or 64+ base64 characters that name no file)."""
    if isinstance(value, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"no image ({value!r:.40})")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    elif not _BASE64.fullmatch(value) or os.path.exists(os.path.join(root, value)):
        return os.path.join(root, value)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"an image that is neither a file nor base64 ({e})") from e


def media_list(value, root: str) -> list:
    """Several images: a list, or a list written as a string (VLMEvalKit's multi-image cells)."""
    if isinstance(value, str) and value.startswith("["):
        value = ast.literal_eval(value)
    return [media(v, root) for v in (value if isinstance(value, (list, tuple)) else [value])]


def load_image(image):
    """A path or PIL image as render_chat takes it; bytes decoded here (errors say the image is unreadable)."""
    if not isinstance(image, bytes):
        return image
    try:
        decoded = Image.open(io.BytesIO(image))
        decoded.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable embedded image ({e})") from e
    return decoded


def image_size(image) -> tuple:
    """(width, height) from the header alone, for boxes stored in pixels."""
    if isinstance(image, str) and not os.path.exists(image):
        raise FileNotFoundError(f"image not found: {image}")
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return im.size
    except (OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image ({e})") from e


def find_video(name: str, root: str) -> str:
    """A Charades video id or file name (3MSZA, 3MSZA.mp4) -> the video file, GIF or frame folder of that name in
    the benchmark file's folder, its videos/ or its Charades_v1_480/; the plain path when there is none (its
    render then fails and is counted)."""
    stem = os.path.splitext(name)[0]
    for folder in (root, os.path.join(root, "videos"), os.path.join(root, "Charades_v1_480")):
        for candidate in (name, stem, *(stem + ext for ext in data.VIDEO_EXTENSIONS + (".gif",))):
            if os.path.exists(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return os.path.join(root, name)


# ---------------------------------------------------------------------------------------------------------------
# Building blocks of the readers
# ---------------------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"<image\s*(\d*)>")


def user_turn(text: str, images=(), videos=()) -> list:
    """The user message: images placed at `<image N>` / `<image>` placeholders in the text (MMMU, MUIRBench), else
    first; then videos; then the text. Returns [message], and the images in the order the message uses them."""
    pieces, used, last, order = [], [], 0, iter(range(1, len(images) + 1))
    for m in _PLACEHOLDER.finditer(text):
        number = int(m.group(1)) if m.group(1) else next(order, len(images) + 1)
        if not 1 <= number <= len(images):
            raise ValueError(f"{m.group()} but the record has {len(images)} images")
        pieces += [{"type": "text", "text": text[last:m.start()]}, {"type": "image"}]
        used.append(images[number - 1])
        last = m.end()
    if not used:
        pieces, used = [{"type": "image"} for _ in images], list(images)
    pieces += [{"type": "video"} for _ in videos] + [{"type": "text", "text": text[last:]}]
    return [{"role": "user", "content": [p for p in pieces if p["type"] != "text" or p["text"]]}], used


def make_item(number: int, category, task: str, answer, text: str, images=(), videos=(), alternatives=()):
    """An EvalItem of one record (read_benchmark adds the benchmark's name to the key)."""
    messages, used = user_turn(text, images, videos)
    return EvalItem(str(number), "", str(category), task, answer, text, messages, used, list(videos),
                    tuple(alternatives), number)


def letters(options) -> str:
    return "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(options))


def option_list(options) -> list:
    """Options as MMMU stores them (a list written as a Python literal) or as a list."""
    options = ast.literal_eval(options) if isinstance(options, str) else options
    if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"options must be a list of 2 to {len(LETTERS)}, got {options!r:.60}")
    return [str(o) for o in options]


def choice_letter(answer, n_options: int) -> str:
    letter = str(answer).strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise ValueError(f"the answer {answer!r} is not an option letter A-{LETTERS[n_options - 1]}")
    return letter


_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:,[0-9]{3})*(?:\.[0-9]*)?|\.[0-9]+)%?")


def short_answer_task(answer) -> str:
    """The verifier of a short free-text answer: numbers by the math path, words by vqa (normalised exact match)."""
    return "math" if _NUMBER.fullmatch(str(answer).strip()) else "vqa"


def answers(value) -> list:
    """One answer or several (a list, or a list written as a Python literal), as strings."""
    if isinstance(value, str) and value.startswith("["):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    values = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if not values or not all(v.strip() for v in values):
        raise ValueError(f"empty answer {value!r:.40}")
    return values


def box_1000(box, width: float, height: float) -> list:
    """[x1, y1, x2, y2] in pixels -> 0–1000 coordinates (the released grounding format), one decimal."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(1000 * x1 / width, 1), round(1000 * y1 / height, 1), round(1000 * x2 / width, 1),
            round(1000 * y2 / height, 1)]


# ---------------------------------------------------------------------------------------------------------------
# The readers: record, the file's folder, the record's number -> [EvalItem]
# ---------------------------------------------------------------------------------------------------------------


def read_generic(obj, root, number):
    """Our JSONL: {"messages", "images"/"videos", "task", "answer", "category" (optional)} (data.parse_record's
    conversation format; a trailing assistant reply is dropped). `python world.py export` writes such files."""
    record = data.parse_record(obj, root)
    if "messages" not in record or "task" not in obj or "answer" not in obj:
        raise ValueError("a generic record needs 'messages', 'task' and 'answer'")
    messages = record["messages"]
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    text = " ".join(p if isinstance(p, str) else " ".join(i.get("text", "") for i in p)
                    for p in (m["content"] for m in messages if m["role"] == "user")).strip()
    return [EvalItem(str(number), "", str(obj.get("category", obj["task"])), obj["task"], obj["answer"], text,
                     messages, record["images"], record["videos"], index=number)]


def read_mathvista(obj, root, number):
    """MathVista: question, choices, answer (the choice's text for multi_choice), answer_type, precision, unit."""
    question = obj["question"] + (f" (Unit: {obj['unit']})" if obj.get("unit") else "")
    choices, kind = obj.get("choices") or None, obj.get("answer_type")
    if obj.get("question_type") == "multi_choice":
        if not choices or str(obj["answer"]) not in choices:
            raise ValueError(f"the answer {obj['answer']!r} is not one of the choices")
        task, answer = "choice", LETTERS[choices.index(str(obj["answer"]))]
        prompt = PROMPTS["mathvista_choice"].format(question=question, options="\n".join(
            f"({LETTERS[k]}) {c}" for k, c in enumerate(choices)))
    else:
        # integers, floats and lists all go to math (lists: tuples compared element-wise by the math verifier)
        task, answer = "math", str(obj["answer"])
        name = kind if kind in ("integer", "list") else "float1" if float(obj.get("precision") or 1) <= 1 else "float2"
        prompt = PROMPTS[f"mathvista_{name}"].format(question=question)
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    image = obj.get("decoded_image") or obj["image"]
    return [make_item(number, meta.get("task") or obj.get("question_type") or "all", task, answer,
                      obj.get("query") or prompt, [media(image, root)])]


def read_mmmu(obj, root, number):
    """MMMU (options as a Python-literal list, image_1 … image_7, `<image N>` placeholders, question_type),
    MMMU-Pro standard (the same without question_type) and MMMU-Pro vision (one image holding the question)."""
    images = [media(obj[f"image_{k}"], root) for k in range(1, 8) if obj.get(f"image_{k}")]
    subject = obj.get("subject") or obj.get("subfield") or "_".join(str(obj.get("id", "")).split("_")[1:-1])
    if "question" not in obj:  # MMMU-Pro vision: the screenshot is the question
        options = option_list(obj["options"])
        return [make_item(number, subject or "all", "choice", choice_letter(obj["answer"], len(options)),
                          PROMPTS["mmmu_pro_vision"], [media(obj["image"], root)])]
    if obj.get("question_type", "multiple-choice") != "multiple-choice":
        truths = answers(obj["answer"])
        return [make_item(number, subject or "all", short_answer_task(truths[0]), truths[0],
                          PROMPTS["mmmu_open"].format(question=obj["question"]), images, alternatives=truths[1:])]
    options = option_list(obj["options"])
    if "question_type" in obj:
        prompt = PROMPTS["mmmu_choice"].format(question=obj["question"], options="\n".join(
            f"({LETTERS[k]}) {o}" for k, o in enumerate(options)))
    else:
        prompt = PROMPTS["mmmu_pro"].format(question=obj["question"], options=letters(options))
    return [make_item(number, subject or "all", "choice", choice_letter(obj["answer"], len(options)), prompt,
                      images)]


def read_mcq_columns(obj, root, number):
    """VLMEvalKit multiple-choice TSV (MMStar, MMMU-Pro TSVs): options in columns A, B, …, an optional hint, the
    image(s) in base64; or MMStar's own records, whose question holds the options."""
    options = [str(obj[c]) for c in LETTERS if str(obj.get(c, "")).strip() not in ("", "nan")]
    if options:
        hint = str(obj.get("hint") or "").strip()
        prompt = PROMPTS["mcq_columns"].format(hint=f"Hint: {hint}\n" if hint and hint != "nan" else "",
                                               question=obj["question"], options=letters(options))
    else:
        prompt = PROMPTS["mcq_inline"].format(question=obj["question"])
    n = len(options) or len(LETTERS)
    return [make_item(number, obj.get("category") or "all", "choice", choice_letter(obj["answer"], n), prompt,
                      media_list(obj["image"], root))]


def read_muirbench(obj, root, number):
    """MUIRBench: question with `<image>` placeholders, options list, image_list, answer letter, task."""
    options = option_list(obj["options"])
    prompt = PROMPTS["muirbench"].format(question=obj["question"], options=letters(options))
    truth = {"task": "choice", "answer": choice_letter(obj["answer"], len(options))}  # a choice over several images
    return [make_item(number, obj.get("task") or "all", "multi_image", json.dumps(truth), prompt,
                      media_list(obj["image_list"], root))]


def read_chartqa(obj, root, number):
    """ChartQA: {imgname, query, label} as the original repo ships it (images in png/ beside the file), or the
    Hugging Face copies (image, query, label list, human_or_machine; lmms-lab: question, answer, type). A number is
    scored by the chart verifier (relative tolerance 2.5e-2, years exact)."""
    truths = answers(obj["label"] if "label" in obj else obj["answer"])
    path = media(obj.get("image") or obj["imgname"], root)
    if isinstance(path, str) and not os.path.exists(path):  # the original layout: test/test_human.json, test/png/
        path = os.path.join(root, "png", os.path.relpath(path, root))
    split = {0: "human", 1: "augmented"}.get(obj.get("human_or_machine"), str(obj.get("type", "all")))
    task = "chart" if short_answer_task(truths[0]) == "math" else short_answer_task(truths[0])
    return [make_item(number, split.replace("_test", ""), task, truths[0],
                      PROMPTS["chartqa"].format(question=obj.get("query") or obj["question"]), [path],
                      alternatives=truths[1:])]


def read_ocrbench(obj, root, number):
    """OCRBench: {dataset_name, image_path, question, answers (a string or a list), type}, or the Hugging Face
    copy {dataset, image, question, question_type, answer (a list)}. Recognition types go to the ocr verifier,
    the question-answering types (scene/document VQA, key information) to the short-answer one."""
    truths = answers(obj["answers"] if "answers" in obj else obj["answer"])
    kind = str(obj.get("type") or obj.get("question_type") or "all")
    task = "ocr" if "Recognition" in kind else short_answer_task(truths[0])
    image = obj.get("image") or obj["image_path"]
    return [make_item(number, kind, task, truths[0], obj["question"], [media(image, root)],
                      alternatives=truths[1:])]


def screenspot_box(obj, size) -> list:
    """ScreenSpot's element box -> 0–1000 [x1, y1, x2, y2]: normalised xyxy (values ≤ 1, the Hugging Face copy),
    pixel xyxy with img_size (ScreenSpot-Pro), else pixel [x, y, w, h] (SeeClick's ScreenSpot and v2 files)."""
    bbox = json.loads(obj["bbox"]) if isinstance(obj["bbox"], str) else obj["bbox"]
    if len(bbox) != 4:
        raise ValueError(f"bbox must have 4 numbers, got {bbox!r:.60}")
    if all(0 <= float(v) <= 1 for v in bbox):
        return box_1000(bbox, 1, 1)
    width, height = size
    if "img_size" in obj:
        return box_1000(bbox, width, height)
    x, y, w, h = (float(v) for v in bbox)
    return box_1000((x, y, x + w, y + h), width, height)


def read_screenspot(obj, root, number):
    """ScreenSpot / -v2 / -Pro: instruction, bbox, img_filename, data_type (text | icon), data_source or platform.
    The truth is a click on the element's box (the gui verifier)."""
    image = media(obj.get("img_filename") or obj.get("file_name") or obj["image"], root)
    size = obj.get("img_size")
    size = json.loads(size) if isinstance(size, str) else size or image_size(image)
    source = str(obj.get("platform") or obj.get("data_source") or "web").lower()
    platform = {"ios": "mobile", "android": "mobile", "macos": "desktop", "windows": "desktop"}.get(source, source)
    answer = json.dumps({"action": "click", "box": screenspot_box(obj, size)}, separators=(",", ":"))
    category = f"{platform}-{obj.get('data_type') or obj.get('ui_type') or 'all'}"
    return [make_item(number, category, "gui", answer, PROMPTS["screenspot"].format(instruction=obj["instruction"]),
                      [image])]


def read_refcoco(obj, root, number):
    """RefCOCO / RefCOCO+ / RefCOCOg (lmms-lab's records): image or file_name, bbox [x, y, w, h] in pixels, the
    referring expressions in `answer` (or sentences / expression) — one item per expression (Acc@0.5 per
    expression, the standard count)."""
    image = media(obj.get("image") or obj["file_name"], root)
    width, height = image_size(image)
    x, y, w, h = (float(v) for v in (json.loads(obj["bbox"]) if isinstance(obj["bbox"], str) else obj["bbox"]))
    box = json.dumps(box_1000((x, y, x + w, y + h), width, height))
    expressions = answers(next(obj[k] for k in ("answer", "sentences", "expression", "sentence") if k in obj))
    items = []
    for j, expression in enumerate(expressions):
        item = make_item(number, obj.get("split") or "all", "grounding", box,
                         PROMPTS["refcoco"].format(expression=expression), [image])
        items.append(dataclasses.replace(item, key=f"{number}.{j}"))
    return items


def read_charades(obj, root, number):
    """Charades-STA: {video, caption, timestamp [start, end]} (lmms-lab; our .txt loader reads the original
    `vid start end##sentence` lines into the same fields). Times in seconds, rounded to 0.01 s (lmms-lab stores
    float16)."""
    start, end = (round(float(t), 2) for t in obj["timestamp"])
    video = find_video(str(obj["video"]), root)
    return [make_item(number, "all", "video_grounding", f"[{start}, {end}]",
                      PROMPTS["charades"].format(sentence=obj["caption"].strip().rstrip(".")), videos=[video])]


def read_countbench(obj, root, number):
    """CountBenchQA: image, question, number (an exact integer; the `text` caption is never shown)."""
    count = int(obj["number"])
    return [make_item(number, "all", "counting", str(count), PROMPTS["countbench"].format(question=obj["question"]),
                      [media(obj["image"], root)])]


FORMATS = {
    "jsonl": read_generic, "mathvista": read_mathvista, "mmmu": read_mmmu, "mmstar": read_mcq_columns,
    "muirbench": read_muirbench, "chartqa": read_chartqa, "ocrbench": read_ocrbench, "screenspot": read_screenspot,
    "refcoco": read_refcoco, "charades": read_charades, "countbench": read_countbench,
}  # format name -> reader


SIGNATURES = (  # (format, the fields that tell it), tried in order: the first whose fields a record has wins
    ("jsonl", {"messages"}), ("mathvista", {"answer_type", "question_type"}), ("muirbench", {"image_list", "options"}),
    ("mmmu", {"options", "answer"}), ("mmstar", {"A", "B", "answer"}), ("mmstar", {"l2_category"}),
    ("chartqa", {"query", "label"}), ("ocrbench", {"answers"}), ("ocrbench", {"dataset", "question_type"}),
    ("screenspot", {"instruction", "bbox"}), ("refcoco", {"bbox"}), ("charades", {"caption", "timestamp"}),
    ("countbench", {"number", "question"}))


def detect(obj) -> str:
    """The format of a record, from its fields; None when no reader knows them."""
    keys = set(obj) if isinstance(obj, dict) else set()
    return next((fmt for fmt, fields in SIGNATURES if fields <= keys), None)


# ---------------------------------------------------------------------------------------------------------------
# Files -> records -> items
# ---------------------------------------------------------------------------------------------------------------

def _jsonl_records(path):
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
    return records, problems


def _json_records(path):
    with open(path, encoding="utf-8") as f:
        try:
            loaded = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    loaded = list(loaded.values()) if isinstance(loaded, dict) else loaded  # MathVista: a dict keyed by pid
    if not isinstance(loaded, list):
        raise ValueError(f"{path}: expected a list of records or a dict of them")
    return [(f"{path}[{k}]", r) for k, r in enumerate(loaded)], []


def _tsv_records(path):
    csv.field_size_limit(1 << 30)  # base64 images are long cells
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    images = {str(r.get("index")): r.get("image") for r in rows}
    for r in rows:  # VLMEvalKit: a short image cell is the index of the row whose image it shares
        if r.get("image") and len(r["image"]) <= 64 and r["image"] in images:
            r["image"] = images[r["image"]]
    return [(f"{path}:{k + 2}", r) for k, r in enumerate(rows)], []


def _charades_records(path):
    """`vid start end##sentence` lines -> {video, timestamp, caption} records."""
    records, problems = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            head, _, sentence = line.partition("##")
            if len(head.split()) == 3 and sentence.strip():
                vid, start, end = head.split()
                records.append((f"{path}:{lineno}", {"video": vid, "timestamp": [start, end], "caption": sentence}))
            elif line.strip():
                problems.append(f"{path}:{lineno}: not a 'vid start end##sentence' line")
    return records, problems


LOADERS = {".jsonl": _jsonl_records, ".json": _json_records, ".tsv": _tsv_records, ".txt": _charades_records}


def load_records(path: str):
    """[(where, record)] of a benchmark file, and the lines it could not read as ["file:line: why"]."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LOADERS:
        raise ValueError(f"{path}: a benchmark file ends in {', '.join(LOADERS)}")
    return LOADERS[suffix](path)


def read_benchmark(path: str, fmt: str = None, limit: int = None, required: bool = True):
    """(name, format, items, skipped) of one benchmark file (its name: the file's stem): its first `limit` items
    (all by default), the records a reader could not use as ["file:line: why"]. The format comes from the first
    record's fields unless `fmt` is given; when it cannot, that is an error, or with required=False a format of
    None and no items (a folder's other files). An unknown verifier task is an error listing the known ones."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file not found: {path}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    name = os.path.splitext(os.path.basename(path))[0]
    records, skipped = load_records(path)
    fmt = fmt or (detect(records[0][1]) if records else None)
    if fmt is None and not required:
        return name, None, [], []
    if not records:
        raise ValueError(f"{path}: no records" + (f" ({skipped[0]})" if skipped else ""))
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the benchmark from the fields {sorted(records[0][1])[:12]}; give "
                         f"--format (one of {', '.join(FORMATS)})")
    root, items = os.path.dirname(os.path.abspath(path)), []
    for number, (where, obj) in enumerate(records, 1):
        if limit is not None and len(items) >= limit:
            break
        try:
            if not isinstance(obj, dict):
                raise ValueError(f"a record is a JSON object, got {type(obj).__name__}")
            got = FORMATS[fmt](obj, root, number)
        except KeyError as e:
            skipped.append(f"{where}: no field {e} for the {fmt} reader")
            continue
        except (ValueError, TypeError, OSError, SyntaxError) as e:
            skipped.append(f"{where}: {e}")
            continue
        items += [dataclasses.replace(it, benchmark=name, key=f"{name}/{it.key}") for it in got]
    unknown = sorted({it.task for it in items} - set(rewards.VERIFIERS))
    if unknown:
        raise ValueError(f"{path}: unknown task {', '.join(unknown)}; tasks: {', '.join(rewards.VERIFIERS)} "
                         "(--verifier NAME=module:function adds one)")
    return name, fmt, items[:limit], skipped


def bench_files(path: str) -> list:
    """A benchmark file, or every benchmark file in a folder (not its subfolders), sorted."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1].lower() in LOADERS)
        if not files:
            raise ValueError(f"{path}: no {', '.join(LOADERS)} files")
        return files
    return [path]
