"""benchmarks.py: each public format read from files we write ourselves — the world's answers score 1 against what
every reader makes of its sample file (tests/bench_samples.py), and hand-written records pin the conversions
(pixel boxes, option letters, placeholders, base64, Charades lines) and what is skipped and counted."""
import base64
import io
import json

import pytest
from PIL import Image

import benchmarks
import data
import rewards
from bench_samples import write_samples



@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return folder, write_samples(folder, 2)


def png(path, size=(200, 100)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.name


def read(tmp_path, name, records, fmt=None):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        path.write_text(records)
    return benchmarks.read_benchmark(str(path), fmt)


def test_every_sample_file_is_detected_and_its_world_answers_score_1(samples):
    folder, expected = samples
    formats = {}
    for path in benchmarks.bench_files(str(folder)):
        name, fmt, items, skipped = benchmarks.read_benchmark(path)
        formats[name] = fmt
        assert not skipped and len(items) == len(expected[name]) > 0, name
        for it, answer in zip(items, expected[name]):
            assert it.key.startswith(name + "/") and it.benchmark == name
            assert rewards.score(it.task, data.format_reply(answer), it.answer) == 1.0, (name, it.key, answer)
            assert rewards.score(it.task, data.format_reply("[1, 2]"), it.answer) < 1.0  # not everything scores
            n_media = len(it.images) + len(it.videos)
            placed = sum(p["type"] in ("image", "video") for p in it.messages[0]["content"])
            assert placed == n_media >= 1
    assert formats == {"mathvista": "mathvista", "mmmu": "mmmu", "mmstar": "mmstar", "muirbench": "muirbench",
                       "chartqa_test_human": "chartqa", "ocrbench": "ocrbench", "screenspot_desktop": "screenspot",
                       "refcoco_val": "refcoco", "charades_sta_test": "charades", "countbench": "countbench",
                       "generic": "jsonl"}


def test_prompts_render_and_keep_the_alt_text_out(samples, tok):
    folder, _ = samples
    _, _, items, _ = benchmarks.read_benchmark(str(folder / "countbench.json"))
    rendered = items[0].prompt(tok)
    assert rendered["pixel_values"] is not None and "things" not in rendered["text"]  # CountBench's caption leaks
    assert rendered["text"].endswith("Answer with a single number.<|assistant|>\n")
    _, _, items, _ = benchmarks.read_benchmark(str(folder / "charades_sta_test.txt"))
    assert items[0].prompt(tok)["video_grid_thw"] is not None  # the GIF found by its id


def test_screenspot_boxes_in_each_convention_become_0_1000_clicks(tmp_path):
    name = png(tmp_path / "s.png")  # 200 × 100 pixels
    records = [{"img_filename": name, "instruction": "close", "bbox": [10, 20, 30, 40], "data_type": "icon",
                "data_source": "ios"},  # SeeClick: [x, y, w, h] in pixels
               {"img_filename": name, "instruction": "close", "bbox": [0.1, 0.2, 0.3, 0.4], "data_type": "text",
                "data_source": "gitlab"},  # the Hugging Face copy: normalised xyxy
               {"img_filename": name, "instruction": "close", "bbox": "[10, 20, 40, 60]", "img_size": [200, 100],
                "ui_type": "text", "platform": "macos"},  # ScreenSpot-Pro: pixel xyxy (here as a JSON string)
               {"img_filename": "missing.png", "instruction": "close", "bbox": [10, 20, 30, 40]}]
    _, fmt, items, skipped = read(tmp_path, "screenspot_mobile.json", records)
    boxes = [json.loads(it.answer)["box"] for it in items]
    assert fmt == "screenspot" and boxes == [[50, 200, 200, 600], [100, 200, 300, 400], [50, 200, 200, 600]]
    assert [it.category for it in items] == ["mobile-icon", "gitlab-text", "desktop-text"]
    assert len(skipped) == 1 and "missing.png" in skipped[0] and "screenspot_mobile.json[3]" in skipped[0]
    click = data.format_reply('{"action": "click", "box": [52, 205, 198, 590]}')
    assert rewards.score("gui", click, items[0].answer) == 1.0 and items[0].task == "gui"


def test_refcoco_one_item_per_expression_with_the_box_in_0_1000(tmp_path):
    name = png(tmp_path / "r.png")
    _, fmt, items, _ = read(tmp_path, "refcocog.jsonl", [
        {"question_id": "7", "file_name": name, "answer": ["the red thing", "a box"], "bbox": [10, 20, 30, 40]}])
    assert fmt == "refcoco" and [it.key for it in items] == ["refcocog/1.0", "refcocog/1.1"]
    assert json.loads(items[0].answer) == [50, 200, 200, 600] and items[1].task == "grounding"
    assert items[1].question == "Help me to locate a box in the image and give me its bounding boxes."


def test_mmmu_places_each_image_at_its_placeholder(tmp_path):
    one, two = png(tmp_path / "one.png"), png(tmp_path / "two.png", (60, 60))
    records = [{"id": "validation_Art_Theory_3", "question": "Compare <image 2> with <image 1>.",
                "options": "['<image 1> is older', 'they are the same age']", "answer": "B", "image_1": one,
                "image_2": two, "question_type": "multiple-choice"},
               {"id": "validation_Physics_1", "question": "How far? <image 1>", "options": "[]",
                "answer": "['3.5', '3.50']", "image_1": one, "question_type": "open"},
               {"id": "validation_Physics_2", "question": "x", "options": "['a', 'b']", "answer": "C",
                "image_1": one, "question_type": "multiple-choice"}]
    _, _, items, skipped = read(tmp_path, "mmmu_val.jsonl", records)
    first = items[0]
    assert [p["type"] for p in first.messages[0]["content"]] == ["text", "image"] * 3 + ["text"]  # one in an option
    assert [str(p).rsplit("/", 1)[-1] for p in first.images] == ["two.png", "one.png", "one.png"]
    assert first.answer == "B" and first.category == "Art_Theory" and "(B) they are the same age" in first.question
    assert first.question.endswith("Answer with the option's letter from the given choices directly.")
    assert (items[1].task, items[1].answer, items[1].alternatives) == ("math", "3.5", ("3.50",))
    assert len(skipped) == 1 and "not an option letter A-B" in skipped[0]  # answer C of two options
    _, fmt, items, _ = read(tmp_path, "mmmu_pro.jsonl", [  # MMMU-Pro: standard (no question_type), vision
        {"id": "test_Art_1", "question": "Which? <image 1>", "options": ["p", "q", "r"], "answer": "C",
         "image_1": one, "subject": "Art"},
        {"id": "test_Art_2", "image": two, "options": "['p', 'q']", "answer": "A", "subject": "Art"}])
    assert fmt == "mmmu" and items[0].question == ("Which? <image 1>\nA. p\nB. q\nC. r\nAnswer with the option "
                                                   "letter from the given choices directly.")
    assert items[1].question.startswith("Answer with the option letter") and items[1].images[0].endswith("two.png")
    assert [(it.answer, it.category) for it in items] == [("C", "Art"), ("A", "Art")]


def test_mathvista_choice_text_becomes_its_letter_and_the_hint_wording(tmp_path):
    name = png(tmp_path / "m.png")
    records = {"3": {"pid": "3", "question": "Find the angle.", "image": name, "choices": ["135°", "145°"],
                     "answer": "145°", "question_type": "multi_choice", "answer_type": "text", "unit": None},
               "2": {"pid": "2", "question": "How heavy?", "image": name, "choices": None, "unit": "g",
                     "answer": "1.25", "precision": 2, "question_type": "free_form", "answer_type": "float"},
               "9": {"pid": "9", "question": "q", "image": name, "answer": "7", "query": "Our own query.",
                     "question_type": "free_form", "answer_type": "integer"}}
    _, fmt, items, _ = read(tmp_path, "testmini.json", records)
    assert fmt == "mathvista" and [(it.task, it.answer) for it in items] == [("choice", "B"), ("math", "1.25"),
                                                                            ("math", "7")]
    assert items[0].question.endswith("Question: Find the angle.\nChoices:\n(A) 135°\n(B) 145°")
    assert "two decimal places" in items[1].question and "How heavy? (Unit: g)" in items[1].question
    assert items[2].question == "Our own query."


def test_vlmevalkit_tsv_base64_images_shared_rows_and_hints(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 0, 255)).save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    tsv = ("index\tquestion\thint\tA\tB\tC\tanswer\tcategory\timage\n"
           f"10\tWhat colour?\tLook closely.\tred\tblue\t\tB\tcoarse perception\t{b64}\n"
           "11\tWhat colour again?\tnan\tred\tblue\tgreen\tb\tmath\t10\n"  # row 10's image
           f"12\tWhich?\t\tx\ty\t\tA\tmath\t{str([b64, b64])}\n"
           "13\tBroken?\t\tx\ty\t\tA\tmath\tnot-an-image.png\n")
    _, fmt, items, _ = read(tmp_path, "MMStar.tsv", tsv)
    assert fmt == "mmstar" and [it.answer for it in items] == ["B", "B", "A", "A"]
    assert items[0].question.startswith("Hint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n")
    assert "C." not in items[0].question and "C. green" in items[1].question and "Hint" not in items[1].question
    assert items[1].images == items[0].images and len(items[2].images) == 2
    assert benchmarks.load_image(items[1].images[0]).size == (40, 30)
    with pytest.raises(FileNotFoundError):  # rendering fails; evaluation counts it (test_evaluate.py)
        data.process_image(benchmarks.load_image(items[3].images[0]))


def test_charades_lines_and_float16_timestamps(tmp_path):
    frames = [Image.new("RGB", (56, 56), (k * 20, 0, 0)) for k in range(4)]
    frames[0].save(tmp_path / "3MSZA.gif", save_all=True, append_images=frames[1:], duration=500)
    _, fmt, items, skipped = read(tmp_path, "charades_sta_test.txt",
                                  "3MSZA 24.3 30.4##person turn a light on.\nnot a line\n\n")
    assert fmt == "charades" and items[0].answer == "[24.3, 30.4]" and items[0].videos[0].endswith("3MSZA.gif")
    assert '"person turn a light on"' in items[0].question and "charades_sta_test.txt:2" in skipped[0]
    _, _, items, _ = read(tmp_path, "charades.jsonl",
                          [{"video": "3MSZA.mp4", "caption": "x", "timestamp": [24.296875, 30.40625]}])
    assert items[0].answer == "[24.3, 30.41]" and items[0].videos[0].endswith("3MSZA.gif")


def test_ocrbench_chartqa_and_countbench_answers(tmp_path):
    name = png(tmp_path / "o.png")
    _, _, items, _ = read(tmp_path, "OCRBench.json", [
        {"dataset_name": "docVQA", "id": 1, "image_path": name, "question": "Total?",
         "answers": ["Twelve", "12 apples"], "type": "Doc-oriented VQA"},
        {"dataset_name": "IIIT5K", "id": 2, "image_path": name, "question": "what is written?", "answers": "CENTRE",
         "type": "Regular Text Recognition"}])
    assert [(it.task, it.answer, it.alternatives) for it in items] == [("vqa", "Twelve", ("12 apples",)),
                                                                       ("ocr", "CENTRE", ())]
    (tmp_path / "png").mkdir()
    png(tmp_path / "png" / "c.png")
    _, _, items, _ = read(tmp_path, "test_augmented.json", [{"imgname": "c.png", "query": "Max?", "label": "1.5"},
                                                            {"imgname": "c.png", "query": "Who?", "label": "Inspired"}])
    assert [(it.task, it.answer) for it in items] == [("chart", "1.5"), ("vqa", "Inspired")]
    assert items[0].images[0].endswith("png/c.png")  # the original layout: the charts in png/ beside the file
    _, _, items, _ = read(tmp_path, "chartqa_hf.jsonl", [{"image": name, "query": "Max?", "label": ["2,000", "2000"],
                                                          "human_or_machine": 1}])
    assert (items[0].answer, items[0].alternatives, items[0].category) == ("2,000", ("2000",), "augmented")
    _, fmt, items, _ = read(tmp_path, "countbenchqa.json", [{"image": name, "question": "How many?", "number": 4,
                                                             "text": "four dogs"}])
    assert fmt == "countbench" and (items[0].task, items[0].answer) == ("counting", "4")


def test_format_errors_unknown_tasks_and_forcing_a_format(tmp_path):
    with pytest.raises(ValueError, match=r"cannot tell the benchmark from the fields \['foo'\]; give --format"):
        read(tmp_path, "odd.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match="--format must be one of jsonl, mathvista"):
        read(tmp_path, "odd.jsonl", [{"foo": 1}], fmt="nope")
    record = {"messages": [{"role": "user", "content": "hi"}], "task": "parity", "answer": "1"}
    with pytest.raises(ValueError, match="unknown task parity; tasks: math, choice, .*--verifier NAME=module:function"):
        read(tmp_path, "mine.jsonl", [record])
    name = png(tmp_path / "k.png")
    _, fmt, items, skipped = read(tmp_path, "forced.json", [{"image": name, "question": "How many?", "number": 2,
                                                             "answers": "x"}], fmt="countbench")  # would be ocrbench
    assert fmt == "countbench" and items[0].answer == "2" and not skipped
    assert benchmarks.read_benchmark(str(tmp_path / "odd.jsonl"), required=False)[1] is None
