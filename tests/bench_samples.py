"""Sample benchmark files: held-out items of the synthetic world written in each public format benchmarks.py reads
(the fields, answer forms and image storage of the real files; images as small PNGs beside them, MMStar's as base64
in its TSV, Charades' videos as GIFs). Each writer returns the world's own answers, item by item: as replies they
must score 1 against what a reader makes of the file, which checks its conversions (pixel boxes, option texts,
letters) end to end.

    python tests/bench_samples.py runs/bench_samples      # write them (the README's tiny-model numbers use these)
"""
import base64
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import world  # noqa: E402

SEED = 0


def heldout(task, n, level):
    """n held-out items of a domain at one level, and their numbers."""
    return [world.make_item(task, i, SEED, "heldout", level) for i in range(n)]


def save(item, folder, name) -> str:
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    item.image.save(os.path.join(folder, "images", name))
    return f"images/{name}"


def stem(question: str) -> str:
    """A multiple-choice question without its option lines."""
    return question.split("\n")[0]


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def mathvista(folder, n):
    """testmini.json's layout: a dict keyed by pid; multiple choice answers with the choice's text."""
    records, expected = {}, []
    for item in heldout("math", n, 2):
        expected.append(item.answer)
        pid = f"m{item.index}"
        records[pid] = {"pid": pid, "question": item.question, "image": save(item, folder, f"mathvista_{pid}.png"),
                        "choices": None, "unit": None, "precision": None, "answer": item.answer,
                        "question_type": "free_form", "answer_type": "integer",
                        "metadata": {"task": "math word problem"}}
    for item in heldout("choice", n, 2):
        expected.append(item.answer)
        pid = f"c{item.index}"
        records[pid] = {"pid": pid, "question": stem(item.question), "choices": item.facts["options"],
                        "image": save(item, folder, f"mathvista_{pid}.png"), "unit": None, "precision": None,
                        "answer": item.facts["correct"], "question_type": "multi_choice", "answer_type": "text",
                        "metadata": {"task": "figure question answering"}}
    _write_json(os.path.join(folder, "mathvista.json"), records)
    return expected


def mmmu(folder, n):
    """MMMU's fields: options as a Python-literal string, image_1 … with `<image N>` placeholders; one open
    question; one question about the second of two images."""
    rows = []
    for item in heldout("choice", n, 2):
        rows.append({"id": f"validation_Shapes_{item.index}", "question": f"<image 1> {stem(item.question)}",
                     "options": str(item.facts["options"]), "answer": item.answer,
                     "image_1": save(item, folder, f"mmmu_{item.index}.png"), "question_type": "multiple-choice"})
    item = heldout("math", 1, 2)[0]
    rows.append({"id": "validation_Math_0", "question": f"<image 1> {item.question}", "options": "[]",
                 "answer": item.answer, "image_1": save(item, folder, "mmmu_open.png"), "question_type": "open"})
    first, second = heldout("choice", 2, 2)
    rows.append({"id": "validation_Shapes_pair", "question": f"<image 1> is not asked about. <image 2> "
                 f"{stem(second.question)}", "options": str(second.facts["options"]), "answer": second.answer,
                 "image_1": save(first, folder, "mmmu_pair1.png"), "image_2": save(second, folder, "mmmu_pair2.png"),
                 "question_type": "multiple-choice"})
    _write_jsonl(os.path.join(folder, "mmmu.jsonl"), rows)
    return [r["answer"] for r in rows]


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mmstar(folder, n):
    """VLMEvalKit's TSV: options in columns A–D, base64 images; the last row reuses the first row's image."""
    items = heldout("choice", n, 2)
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tl2_category\timage"]
    for k, item in enumerate(items + items[:1]):
        options = item.facts["options"] + [""] * (4 - len(item.facts["options"]))
        image = png_base64(item.image) if k < len(items) else "0"
        lines.append("\t".join([str(k), stem(item.question), *options, item.answer, "coarse perception",
                                "image style & quality", image]))
    with open(os.path.join(folder, "mmstar.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [item.answer for item in items + items[:1]]


def muirbench(folder, n):
    """MUIRBench: two images, `<image>` placeholders in the question, options, a letter."""
    rows = []
    for k in range(n):
        a, b = world.make_item("choice", 2 * k, SEED, "heldout", 1), world.make_item("choice", 2 * k + 1, SEED,
                                                                                    "heldout", 1)
        if a.facts["correct"] == b.facts["correct"]:
            continue
        rows.append({"idx": k, "task": "Image-Text Matching", "question": f"Which image shows a "
                     f"{a.facts['correct']}? <image> <image>", "options": ["the first", "the second"], "answer": "A",
                     "image_list": [save(a, folder, f"muir_{k}a.png"), save(b, folder, f"muir_{k}b.png")]})
    _write_json(os.path.join(folder, "muirbench.json"), rows)
    return ["A"] * len(rows)


def chartqa(folder, n):
    """The original repository's test_human.json: imgname, query, label; the charts in png/."""
    os.makedirs(os.path.join(folder, "png"), exist_ok=True)
    rows = []
    for item in heldout("chart", n, 2):
        item.image.save(os.path.join(folder, "png", f"chart_{item.index}.png"))
        rows.append({"imgname": f"chart_{item.index}.png", "query": item.question, "label": item.answer})
    _write_json(os.path.join(folder, "chartqa_test_human.json"), rows)
    return [r["label"] for r in rows]


def ocrbench(folder, n):
    """OCRBench.json: answers a string or a list."""
    items = heldout("ocr", n, 2)
    rows = [{"dataset_name": "IIIT5K", "id": item.index, "image_path": save(item, folder, f"ocr_{item.index}.png"),
             "question": "what is written in the image?", "answers": [item.answer] if k % 2 else item.answer,
             "type": "Regular Text Recognition"} for k, item in enumerate(items)]
    _write_json(os.path.join(folder, "ocrbench.json"), rows)
    return [item.answer for item in items]


def screenspot(folder, n):
    """SeeClick's screenspot_*.json: bbox [x, y, w, h] in pixels."""
    rows, expected = [], []
    for item in heldout("gui", n, 2):  # level 2: every action is a click
        expected.append(item.answer)
        x0, y0, x1, y1 = item.facts["boxes"][item.facts["target"]]
        rows.append({"img_filename": save(item, folder, f"screen_{item.index}.png"), "instruction": item.question,
                     "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "data_type": "text", "data_source": "windows"})
    _write_json(os.path.join(folder, "screenspot_desktop.json"), rows)
    return expected


def refcoco(folder, n):
    """lmms-lab's RefCOCO records: bbox [x, y, w, h] in pixels, the expressions in `answer`."""
    rows, expected = [], []
    for item in heldout("grounding", n, 2):
        expected += [item.answer] * 2
        x0, y0, x1, y1 = item.facts["targets"][0]
        expression = item.question[len("Find "):].rstrip(".")
        rows.append({"question_id": str(item.index), "file_name": save(item, folder, f"ref_{item.index}.png"),
                     "answer": [expression, expression.replace("the ", "the one ")],
                     "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
    _write_jsonl(os.path.join(folder, "refcoco_val.jsonl"), rows)
    return expected


def charades(folder, n):
    """charades_sta_test.txt: `vid start end##sentence`, the videos beside it (GIFs here)."""
    lines, expected = [], []
    for item in heldout("video_grounding", n, 2):
        expected.append(item.answer)
        vid = f"V{item.index:04d}"
        item.frames[0].save(os.path.join(folder, vid + ".gif"), save_all=True, append_images=item.frames[1:],
                            duration=int(1000 / item.fps), loop=0)
        start, end = json.loads(item.answer)
        kind = item.facts["target"]
        lines.append(f"{vid} {start} {end}##the {kind[1]} {kind[0]} is visible.")
    with open(os.path.join(folder, "charades_sta_test.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return expected


def countbench(folder, n):
    """CountBenchQA: image, question, number (and the alt-text, which must not reach the prompt)."""
    rows = [{"image": save(item, folder, f"count_{item.index}.png"), "question": item.question,
             "number": int(item.answer), "text": f"{item.answer} things"} for item in heldout("counting", n, 2)]
    _write_json(os.path.join(folder, "countbench.json"), rows)
    return [str(r["number"]) for r in rows]


def generic(folder, n):
    """Our JSONL, as `python world.py export` writes it (the reply is dropped by the reader)."""
    tasks = ("counting", "grounding")
    os.replace(world.export_world(folder, tasks=tasks, n=n, kind="sft", split="heldout", level=2),
               os.path.join(folder, "generic.jsonl"))
    return [item.answer for task in tasks for item in heldout(task, n, 2)]


WRITERS = (mathvista, mmmu, mmstar, muirbench, chartqa, ocrbench, screenspot, refcoco, charades, countbench, generic)


def write_samples(folder, n: int = 2) -> dict:
    """Every sample file into folder (about n items each) -> {benchmark name: the world's answers, item by item}."""
    os.makedirs(folder, exist_ok=True)
    names = ("mathvista", "mmmu", "mmstar", "muirbench", "chartqa_test_human", "ocrbench", "screenspot_desktop",
             "refcoco_val", "charades_sta_test", "countbench", "generic")
    return {name: writer(folder, n) for name, writer in zip(names, WRITERS)}


if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "runs/bench_samples"
    counts = {name: len(answers) for name, answers in write_samples(folder, int(sys.argv[2]) if len(sys.argv) > 2
                                                                         else 2).items()}
    print(f"{folder}: {counts}")
