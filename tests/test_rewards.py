"""Tests for rewards.py: per-domain equivalences and near misses, hacking attempts, format violations, hostile
input (each within 50 ms of CPU time, no injected code runs) and a seeded fuzzer that score never raises."""

import ast
import functools
import json
import math
import os
import random
import subprocess
import sys
import warnings
from fractions import Fraction

import pytest

import data
import rewards
from conftest import cpu_seconds


def reply(box, think="Let me think.", answer_prefix="", answer_suffix=""):
    return (f"<think>{think}</think><answer>{answer_prefix}<|begin_of_box|>{box}<|end_of_box|>"
            f"{answer_suffix}</answer>")


pytestmark = pytest.mark.usefixtures("verifier_safety_net")  # score()'s catch-all must never fire here


# ------------------------------------------------------------------------------------------------ format

def test_extracts_box_of_well_formed_reply():
    assert rewards.extract_answer(reply("42")) == "42"
    assert rewards.extract_answer(reply(" 42 ", answer_prefix="The answer is ", answer_suffix=".")) == " 42 "
    assert rewards.extract_answer("\n " + reply("42") + " \n") == "42"
    assert rewards.extract_answer(reply("42") + "<|user|>") == "42"  # a kept stop token is not text
    assert rewards.extract_answer(reply("42", think="")) == "42"  # --no-think replies
    assert rewards.score("math", reply("42") + "<|endoftext|>", "42") == 1.0


@pytest.mark.parametrize("response", [
    "<answer><|begin_of_box|>42<|end_of_box|></answer>",                                  # no thinking
    "<think>x</think><|begin_of_box|>42<|end_of_box|>",                                   # no answer tags
    "<think>x</think><answer>42</answer>",                                                # no box
    "<think>x</think><answer><|begin_of_box|>42<|end_of_box|> <|begin_of_box|>3<|end_of_box|></answer>",
    "<think>x<|begin_of_box|>42<|end_of_box|></think><answer>42</answer>",                # box in the thinking
    "<think>x<think>y</think></think><answer><|begin_of_box|>42<|end_of_box|></answer>",  # nested think
    "<think>x</think><answer><answer><|begin_of_box|>42<|end_of_box|></answer></answer>",
    "<think>x</think><answer><|begin_of_box|>42<|end_of_box|></answer> so 42 or 43",      # text after </answer>
    "Sure! <think>x</think><answer><|begin_of_box|>42<|end_of_box|></answer>",            # text before <think>
    "<think>x</think> 42 <answer><|begin_of_box|>42<|end_of_box|></answer>",              # text in between
    "<answer><|begin_of_box|>42<|end_of_box|></answer><think>x</think>",                  # out of order
    "<think>x</think><answer><|end_of_box|>42<|begin_of_box|></answer>",                  # box reversed
    "<think>x</think><answer><|begin_of_box|>42</answer><|end_of_box|>",                  # box leaves answer
    "<think>x</think><answer><|begin_of_box|>42<|end_of_box|></answer><|user|><|user|>",  # two stop tokens
    "<think>x</think><answer><|begin_of_box|>42<|end_of_box|>",                           # truncated
    "",
])
def test_malformed_replies_score_zero(response):
    assert rewards.extract_answer(response) is None
    assert data.parse_reply(response)[1]  # says why
    assert rewards.score("math", response, "42") == 0.0


@pytest.mark.parametrize("response", [None, 42, b"<think></think>", ["42"], {"a": 1}])
def test_non_string_replies_score_zero(response):
    assert rewards.score("math", response, "42") == 0.0
    assert rewards.score("math", response, "42", lenient=True) == 0.0


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task"):
        rewards.score("stem", reply("1"), "1")
    with pytest.raises(ValueError, match="unknown task"):
        rewards.score(["math"], reply("1"), "1")


def test_unreadable_ground_truth_scores_zero_with_a_warning():
    with pytest.warns(UserWarning, match="unreadable counting ground truth"):
        assert rewards.score("counting", reply("7"), "seven-ish") == 0.0
    with pytest.warns(UserWarning, match="unreadable grounding ground truth"):
        assert rewards.score("grounding", reply("[1,2,3,4]"), "[5,5,1,1]") == 0.0


# ------------------------------------------------------------------------------------------------ math

MATH_EQUIVALENT = {
    "1/2": ["0.5", "1/2", r"\frac{1}{2}", r"\dfrac{1}{2}", r"\tfrac12", r"\frac12", r"50\%", "50%", "2^{-1}",
            "2**-1", r"$\frac{1}{2}$", r"$$0.5$$", r"\(0.5\)", r"\left(\frac{1}{2}\right)", r"\text{0.5}",
            r"\boxed{\frac{1}{2}}", r"5 \times 10^{-1}", r"5\cdot 10^{-1}", "5e-1", "5E-1", "0.50", ".5", "x = 0.5",
            r"\frac{\sqrt{4}}{4}", "1 / 2", r"1 \div 2", "1÷2", "0.4999999", "0.5000004", r"\frac{2}{4}", "½"],
    "12": ["12", "12.0", "+12", "3*4", r"3 \times 4", r"3\cdot4", "3×4", "3·4", "1.2e1", r"1.2\times10^{1}",
           r"\sqrt{144}", "√144", "2(6)", "(3)(4)", "3**2+3", r"12^\circ", "12°", r"12\,", "{12}", "12."],
    "-3": ["-3", "−3", r"-\frac{6}{2}", "-(3)", "+-3", "-3.0"],
    "0.75": ["3/4", r"75\%", r"\frac34", r"\frac{3}{4}", "0.750"],
    "1000000": ["1000000", "10^6", "10^{6}", "1,000,000", "1{,}000{,}000", "1e6", "1e+6", "1.0E6"],
    r"\sqrt{2}": ["2^{1/2}", r"\frac{2}{\sqrt{2}}", "1.4142136", "√2", r"\sqrt2", r"\sqrt[2]{2}", "sqrt(2)",
                  r"\sqrt{8}/2", r"\frac{\sqrt{8}}{2}"],
    r"2\sqrt{3}": [r"\sqrt{12}", r"2 \sqrt 3", "3.4641016"],
    r"\pi/4": [r"\frac{\pi}{4}", r"0.25\pi", "0.7853982", "π/4", "pi/4", r"\frac{1}{4}\pi"],
    "2": ["8^{1/3}", r"\sqrt[3]{8}", "4^{0.5}", "(-8)^{2/3}/2", "x=2", "y = 2"],
    "-2": ["(-8)^{1/3}", r"\sqrt[3]{-8}"],
    "(x+1)^2": ["x^2+2x+1", "(1+x)(x+1)", "x*x+2*x+1", "1+2x+x^2"],
    "25": [r"25\%"],  # a "what percentage" truth stored without its %
    "0": ["0", "-0", "0.0", r"\sqrt{2}-\sqrt{2}"],
}

MATH_NEAR_MISSES = {
    "1/2": ["0.51", "0.4999", "0.49999", "2", "-1/2", "1/3", r"\frac{1}{2}+\frac{1}{10^{5}}", "0.5x"],
    "12": ["13", "12.001", "-12", "1.2", "120%"],
    r"\sqrt{2}": ["1.414", "1.4142", "2", r"\sqrt{3}"],
    r"\pi/4": ["0.785", "3.14/4"],
    "(x+1)^2": ["x^2+1", "y^2+2y+1", "x^2+2x"],
    "25": ["0.25", "2.5"],
    "0": ["1e-13", "0.000001"],
    "2": ["(-8)^{1/3}", "2 = x"],
}


@pytest.mark.parametrize("truth,pred", [(t, p) for t, ps in MATH_EQUIVALENT.items() for p in ps])
def test_math_equivalent_forms_score_one(truth, pred):
    assert rewards.score("math", reply(pred), truth) == 1.0


@pytest.mark.parametrize("truth,pred", [(t, p) for t, ps in MATH_NEAR_MISSES.items() for p in ps])
def test_math_near_misses_score_zero(truth, pred):
    assert rewards.score("math", reply(pred), truth) == 0.0


def test_math_relative_tolerance_is_one_in_a_million():
    assert rewards.score("math", reply("1000001"), "1000000") == 1.0  # relative error 1e-6
    assert rewards.score("math", reply("1000002"), "1000000") == 0.0
    assert rewards.score("math", reply("0.333333"), "1/3") == 1.0
    assert rewards.score("math", reply("0.33333"), "1/3") == 0.0


def test_math_ground_truth_as_number():
    assert rewards.score("math", reply(r"\frac{1}{2}"), 0.5) == 1.0
    assert rewards.score("math", reply("12"), 12) == 1.0
    assert rewards.score("math", reply("1/3"), Fraction(1, 3)) == 1.0
    assert rewards.score("math", reply("1e-7"), 1e-7) == 1.0


@pytest.mark.parametrize("pred", [
    "between 5 and 9", "5 to 9", "3 or 4", "3, 4", "3,4", "3;4", r"3 \text{ or } 4", r"\text{3 or 4}", r"\pm 3",
    "±3", r"5 \le x \le 9", "5 < x < 9", "[5, 9]", "(5, 9)", r"\{3, 4\}", "3~4", "3 4", "x=3, x=4", "x = 3 = 4",
    "$3$ or $4$", r"\approx 3", "3 or more", "any number", r"\infty", "3!", "3 | 4", "3 and 4", "about 3",
])
def test_math_hedges_score_zero(pred):
    for truth in ("3", "4", "7"):
        assert rewards.score("math", reply(pred), truth) == 0.0


def test_math_ambiguous_mixed_number_is_unreadable():
    # 2\frac{1}{2} is 2.5 to a schoolchild and 1 to LaTeX; neither reading is safe to reward.
    assert rewards.math_readings(r"2\frac{1}{2}") is None
    assert rewards.math_readings(r"x\frac{1}{2}") is not None


def test_math_variables_are_compared_at_random_points_not_by_name():
    assert rewards.score("math", reply("a"), "12") == 0.0
    assert rewards.score("math", reply("12x/x"), "12") == 1.0  # equal wherever defined
    assert rewards.score("math", reply("x"), "y") == 0.0
    assert rewards.score("math", reply("xy"), "x*y") == 0.0  # two letters are a word, not a product


def test_to_sympy_is_the_same_expression():
    import sympy

    node, variables = rewards.parse_math(r"\frac{1}{2} + 3x^{2} - \sqrt{8}")
    x = sympy.Symbol("x")
    assert variables == {"x"}
    assert sympy.simplify(rewards.to_sympy(node) - (sympy.Rational(1, 2) + 3 * x**2 - 2 * sympy.sqrt(2))) == 0
    assert rewards.to_sympy(rewards.parse_math(r"50\%")[0]).doit() == sympy.Rational(1, 2)


def _random_expression(rng, depth):
    """The same random expression as LaTeX text and as a SymPy value built independently of rewards.py, plus
    whether every intermediate is a finite real number (else our reader must refuse it: SymPy happily turns
    x / (0^{-2}) into 0 via zoo, and (√-2)^2 into -2)."""
    import sympy

    if depth == 0 or rng.random() < 0.3:
        kind = rng.choice(["int", "int", "dec", "pi"])
        if kind == "int":
            n = rng.randint(0, 30)
            return str(n), sympy.Integer(n), True
        if kind == "dec":
            n = rng.randint(1, 999)
            return f"{n / 100}", sympy.Rational(n, 100), True
        return r"\pi", sympy.pi, True
    op = rng.choice(["+", "-", "*", "/", "frac", "^", "sqrt", "neg"])
    a_text, a, a_ok = _random_expression(rng, depth - 1)
    if op == "sqrt":
        text, value, ok = rf"\sqrt{{{a_text}}}", sympy.sqrt(a), a_ok
    elif op == "neg":
        text, value, ok = f"-({a_text})", -a, a_ok
    elif op == "^":
        k = rng.randint(-3, 3)
        text, value, ok = f"({a_text})^{{{k}}}", a**k, a_ok and not (a == 0 and k <= 0)
    else:
        b_text, b, b_ok = _random_expression(rng, depth - 1)
        ok = a_ok and b_ok
        if op == "frac":
            text, value = rf"\frac{{{a_text}}}{{{b_text}}}", a / b
        else:
            text, value = f"({a_text}) {op} ({b_text})", {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]
    return text, value, ok and bool(value.is_finite) and bool(value.is_real)


def test_math_evaluator_agrees_with_sympy_on_random_expressions():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        text, expected, defined = _random_expression(rng, 3)
        readings = rewards.math_readings(text)
        if not defined:  # division by zero, √ of a negative: unreadable, never a wrong number
            assert readings is None, text
            continue
        assert readings is not None, text
        ours, value = float(readings[0][0]), float(expected.evalf(30))
        assert math.isclose(ours, value, rel_tol=1e-9, abs_tol=1e-12), (text, ours, value)
        checked += 1
    assert checked > 150


# -------------------------------------------------------------------------------- choice, counting, chart

@pytest.mark.parametrize("pred,expected", [
    ("B", 1), ("b", 1), ("(B)", 1), ("[B]", 1), ("B.", 1), ("B:", 1), ("B)", 1), (" B ", 1), (r"\text{B}", 1),
    ("$B$", 1), (r"\boxed{B}", 1), (r"\textbf{B}", 1),
    ("A", 0), ("AB", 0), ("ABCD", 0), ("A or B", 0), ("B, C", 0), ("B/C", 0), ("A B", 0), ("Option B", 0),
    ("B. 42", 0), ("", 0), ("В", 0), ("Ｂ", 0), ("ß", 0), (r"\text{A} \text{B}", 0), ("$A$ $B$", 0),
])
def test_choice(pred, expected):
    assert rewards.score("choice", reply(pred), "B") == expected
    assert rewards.score("choice", reply(pred), "b") == expected


@pytest.mark.parametrize("pred,expected", [
    ("7", 1), ("7.0", 1), ("+7", 1), ("07", 1), ("$7$", 1), (r"\text{7}", 1),
    ("8", 0), ("6", 0), ("-7", 0), ("6.9", 0), ("7.5", 0), ("3+4", 0), ("7 or 8", 0), ("7-8", 0), ("seven", 0),
    (r"7\%", 0), ("7, 8", 0), ("７", 0), ("", 0),
])
def test_counting_is_exact(pred, expected):
    assert rewards.score("counting", reply(pred), "7") == expected
    assert rewards.score("counting", reply(pred), 7) == expected


@pytest.mark.parametrize("truth,pred,expected", [
    ("42", "42", 1), ("42", "41", 1), ("42", "43", 1), ("42", "42.5", 1), ("42", "4.2e1", 1),
    ("42", r"\frac{84}{2}", 1), ("42", r"42\%", 1), ("42", "40", 0), ("42", "44", 0), ("42", "-42", 0),
    ("3.5", "3.55", 1), ("3.5", "3.45", 1), ("3.5", "3.6", 0), ("3.5", "3.41", 0),
    ("1987", "1987", 1), ("1987", "1987.0", 1), ("1987", "1988", 0), ("1987", "1990", 0), ("1987", "1987.4", 0),
    ("3000", "3001", 0), ("999", "1000", 1), ("3001", "3010", 1),  # the year range is 1000–3000 inclusive
    ("0", "0", 1), ("0", "0.01", 0), ("42", "x", 0), ("42", "40 to 44", 0), ("42", "41 or 43", 0),
])
def test_chart_tolerance_and_years(truth, pred, expected):
    assert rewards.score("chart", reply(pred), truth) == expected


# ------------------------------------------------------------------------------------------------ ocr

def _textbook_edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_bit_parallel_edit_distance_matches_the_textbook_table():
    rng = random.Random(1)
    for _ in range(400):
        alphabet = rng.choice(["ab", "abc", "HELO 42", "αβγδ€"])
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert rewards.edit_distance(a, b) == _textbook_edit_distance(a, b), (a, b)


@pytest.mark.parametrize("pred,expected", [
    ("HELLO 42", 1.0), ("  HELLO   42 ", 1.0), ("HELL0 42", 1 - 1 / 8), ("HELLO 4", 1 - 1 / 8),
    ("hello 42", 1 - 5 / 8), ("", 0.0), ("HELLO 42 HELLO 42", 1 - 9 / 17), ("ΗELLO 42", 1 - 1 / 8),  # Greek Eta
    ("HELLO 42 or HELLO 24", 1 - 12 / 20),
])
def test_ocr_is_one_minus_normalised_edit_distance(pred, expected):
    assert rewards.score("ocr", reply(pred), "HELLO 42") == pytest.approx(expected)


def test_ocr_unicode_composition_does_not_count_as_an_error():
    assert rewards.score("ocr", reply("Cafe\u0301"), "Caf\u00e9") == 1.0


# ------------------------------------------------------------------------------------------------ grounding

@pytest.mark.parametrize("pred,expected", [
    ("[120,40,380,300]", 1), ("[120, 40, 380, 300]", 1), ("(120,40,380,300)", 1), ("[[120,40,380,300]]", 1),
    ("[120.5, 40, 380, 300.25]", 1), ("[130,50,390,310]", 1),   # IoU 0.86
    ("[300,40,560,300]", 0), ("[120,170,380,430]", 0),          # IoU 0.2, 0.33
    ("[0,0,1000,1000]", 0),                                      # the whole image
    ("[120,40,380,300],[0,0,10,10]", 0.5), ("[[120,40,380,300],[0,0,10,10]]", 0.5),
    ("[380,40,120,300]", 0), ("[120,40,380,1300]", 0), ("[-5,40,380,300]", 0), ("[120,40,380]", 0),
    ("[120,40,380,300,5]", 0), ("[120,40,380,300] or [0,0,10,10]", 0), ("[120,40,380,300", 0), ("", 0),
    ("[1e2,40,380,300]", 0), ("[120;40;380;300]", 0), ("[[120,40,380,300]", 0),
])
def test_grounding_single_box(pred, expected):
    assert rewards.score("grounding", reply(pred), "[120,40,380,300]") == expected


def test_grounding_is_one_to_one_and_penalises_extra_boxes():
    truth = "[[0,0,100,100],[500,500,600,600]]"
    assert rewards.score("grounding", reply("[0,0,100,100]"), truth) == 0.5
    assert rewards.score("grounding", reply("[[500,500,600,600],[0,0,100,100]]"), truth) == 1.0
    assert rewards.score("grounding", reply("[0,0,100,100] [500,500,600,600]"), truth) == 1.0
    assert rewards.score("grounding", reply("[0,0,100,100],[0,0,100,100]"), truth) == 0.5  # one box, one match
    assert rewards.score("grounding", reply("[[0,0,100,100],[500,500,600,600],[0,0,99,99]]"), truth) == 2 / 3
    # ground truth as the list a dataset may store
    assert rewards.score("grounding", reply("[0,0,100,100]"), [[0, 0, 100, 100], [500, 500, 600, 600]]) == 0.5
    assert rewards.score("grounding", reply("[0,0,100,100]"), [0, 0, 100, 100]) == 1.0


def test_grounding_matching_is_maximal_not_greedy():
    # Prediction p0 overlaps both truths (best with t0); p1 overlaps only t0. Greedy t0->p0 leaves t1 unmatched.
    truth = "[[0,0,100,100],[0,0,100,140]]"
    pred = "[[0,0,100,110],[0,0,100,60]]"
    assert rewards.score("grounding", reply(pred), truth) == 1.0


def test_grounding_box_spraying_does_not_pay():
    grid = ",".join(f"[{x},{y},{x + 100},{y + 100}]" for x in range(0, 1000, 100) for y in range(0, 1000, 100))
    assert rewards.score("grounding", reply(grid), "[200,200,300,300]") == pytest.approx(1 / 100)
    assert rewards.score("grounding", reply(grid), "[[200,200,300,300],[0,0,100,100]]") == pytest.approx(2 / 100)
    assert rewards.score("grounding", reply(grid + ",[0,0,5,5]"), "[200,200,300,300]") == 0.0  # > MAX_BOXES


# ------------------------------------------------------------------------------------------------ gui

CLICK = '{"action": "click", "box": [100, 100, 200, 150]}'


@pytest.mark.parametrize("pred,expected", [
    (CLICK, 1), ('{"action":"CLICK","box":[105,100,205,150]}', 1), ('{"box": [100,100,200,150], "action": "click"}', 1),
    ('{"action": "click", "box": [100,100,200,150], "note": "the OK button"}', 1),
    ('{"action": "type", "box": [100,100,200,150]}', 0), ('{"action": "click", "box": [300,100,400,150]}', 0),
    ('{"action": "click", "box": [0,0,1000,1000]}', 0), ('{"action": "click"}', 0),
    ('{"action": "click", "box": [[100,100,200,150],[0,0,10,10]]}', 0),
    ('{"action": ["click", "type"], "box": [100,100,200,150]}', 0),
    ('{"action": "type", "action": "click", "box": [100,100,200,150]}', 0),  # duplicate keys
    ('{"action": "click", "box": [100,100,200,NaN]}', 0), ('{"action": "click", "box": [true,100,200,150]}', 0),
    ('{"action": "click", "box": "[100,100,200,150]"}', 0), ("{'action': 'click', 'box': [100,100,200,150]}", 0),
    ("click [100,100,200,150]", 0), ('[{"action": "click", "box": [100,100,200,150]}]', 0), ("", 0),
    ('{"action": "click", "box": [100,100,200,150]} {"action": "click"}', 0),
])
def test_gui_click(pred, expected):
    assert rewards.score("gui", reply(pred), CLICK) == expected
    assert rewards.score("gui", reply(pred), json.loads(CLICK)) == expected  # truth as a dict


@pytest.mark.parametrize("pred,expected", [
    ('{"action": "type", "text": "hello world"}', 1), ('{"action": "type", "text": " hello  world "}', 1),
    ('{"action": "type", "text": "Hello world"}', 0), ('{"action": "type", "text": "hello"}', 0),
    ('{"action": "type"}', 0), ('{"action": "type", "text": 5}', 0), ('{"action": "click", "text": "hello world"}', 0),
])
def test_gui_type(pred, expected):
    assert rewards.score("gui", reply(pred), '{"action": "type", "text": "hello world"}') == expected


# ------------------------------------------------------------------------------------------------ video

@pytest.mark.parametrize("pred,expected", [
    ("[2.0, 5.0]", 1), ("[2, 5]", 1), ("(2.0s, 5.0s)", 1), ("[2.5, 5.0]", 2.5 / 3), ("[1.0, 5.0]", 0.75),
    ("[3, 6]", 0.5), ("[3.5, 6]", 0), ("[3, 4]", 0),       # temporal IoU 0.5 counts, 0.375 and 0.33 do not
    ("[0, 10]", 0), ("[0, 100000]", 0),                     # whole-video segments
    ("[5.0, 2.0]", 0), ("[-1, 5]", 0), ("[2, 2]", 0), ("2.0-5.0", 0), ("[2.0, 5.0] or [3, 6]", 0),
    ("[[2.0, 5.0]]", 0), ("[2.0, 5.0, 8.0]", 0), ("[2e0, 5e0]", 1), ("[1e400, 5]", 0), ("", 0),
])
def test_video_grounding_temporal_iou(pred, expected):
    assert rewards.score("video_grounding", reply(pred), "[2.0, 5.0]") == pytest.approx(expected)
    assert rewards.score("video_grounding", reply(pred), [2.0, 5.0]) == pytest.approx(expected)


# -------------------------------------------------------------------------------- the lenient bad example

@pytest.mark.parametrize("task,pred,truth", [
    ("math", "between 5 and 9", "7"), ("math", "3 or 4", "3"), ("counting", "a number between 0 and 10", "7"),
    ("choice", "ABCD", "B"), ("chart", "40 to 50", "42"),
])
def test_lenient_verifier_is_hackable_where_the_strict_one_is_not(task, pred, truth):
    assert rewards.score(task, reply(pred), truth) == 0.0
    assert rewards.score(task, reply(pred), truth, lenient=True) == 1.0


def test_lenient_verifier_still_accepts_what_the_strict_one_accepts():
    assert rewards.score("math", reply("0.5"), "1/2", lenient=True) == 1.0
    assert rewards.score("ocr", reply("HELL0"), "HELLO", lenient=True) == pytest.approx(0.8)
    assert rewards.score("math", "no format at all: 7", "7", lenient=True) == 1.0  # nor does it check the format


# ------------------------------------------------------------------------------------------------ hostile input

MEGABYTE = 1 << 20


@functools.cache
def _hostile_cases():
    rng = random.Random(7)
    junk = "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(4096)) * (MEGABYTE // 4096)
    return [
        ("math", reply("0.5", think="x" * MEGABYTE), "1/2", 1.0),                  # 1 MB of thinking, still right
        ("math", reply("9" * MEGABYTE), "1/2", 0.0),                                # 1 MB number
        ("math", reply("{" * MEGABYTE), "1/2", 0.0),
        ("math", reply("{" * 400 + "1" + "}" * 400), "1", 0.0),                     # nested past MAX_DEPTH
        ("math", reply("(" * 30 + "1" + ")" * 30), "1", 1.0),                      # ... but 30 levels parse
        ("math", reply("-(" * 300 + "1" + ")" * 300), "1", 0.0),
        ("math", reply("9**9**9**9"), "1", 0.0),
        ("math", reply(r"10^{10^{10}}"), "1", 0.0),
        ("math", reply(r"9^{9^{9^{9^{9}}}}"), "1", 0.0),
        ("math", reply(r"(10^{1000})^{1000}"), "1", 0.0),
        ("math", reply(r"2^{2^{2^{2^{2}}}}"), "1", 0.0),                            # 2^65536: too many bits
        ("math", reply(r"0.5^{10^{10}}"), "0", 0.0),                                # underflow is not zero
        ("math", reply("1e999999999"), "1", 0.0),
        ("math", reply("1" + "0" * 1000), "1" + "0" * 1000, 1.0),                  # big but fine
        ("math", reply("1" * 5000), "1", 0.0),
        ("math", reply("+" * 1000 + "1"), "1", 0.0),
        ("math", reply("1+" * 500 + "1"), "501", 0.0),                              # too many tokens
        ("math", reply(junk), "1", 0.0),
        ("math", junk, "1", 0.0),
        ("math", "<think>" * (MEGABYTE // 7), "1", 0.0),
        ("math", reply("1") * (MEGABYTE // 64), "1", 0.0),
        ("ocr", reply("A" * MEGABYTE), "HELLO", 0.0),
        ("ocr", reply("HELLO" * 819), "HELLO" * 819, 1.0),                          # 4095 characters
        ("ocr", reply("HELLO" * 819), "OLLEH" * 819, None),                         # worst-ish case, partial
        ("grounding", reply("[1,2,3,4]," * (MEGABYTE // 10)), "[1,2,3,4]", 0.0),
        ("grounding", reply("[" * MEGABYTE), "[1,2,3,4]", 0.0),
        ("grounding", reply(" " * 1000 + "x"), "[1,2,3,4]", 0.0),
        ("gui", reply("[" * 1000), CLICK, 0.0),                                     # json recursion
        ("gui", reply('{"action": "click", "box": [1' + "0" * 900 + ',1,2,3]}'), CLICK, 0.0),
        ("choice", reply("B" * MEGABYTE), "B", 0.0),
        ("video_grounding", reply("[" + "1" * 500 + ", 5]"), "[2, 5]", 0.0),
        ("counting", reply("7" * 5000), "7", 0.0),
        ("chart", reply("1e-999 "), "0", 0.0),
    ]


@pytest.mark.parametrize("case", range(len(_hostile_cases())))
def test_hostile_input_is_fast_and_scores_as_expected(case):
    task, response, truth, expected = _hostile_cases()[case]
    result = []
    seconds = cpu_seconds(lambda: result.append(rewards.score(task, response, truth)))
    assert seconds < 0.05, f"{seconds * 1e3:.1f} ms"
    assert all(0.0 <= r <= 1.0 for r in result)
    if expected is not None:
        assert result[0] == expected
    assert cpu_seconds(lambda: rewards.score(task, response, truth, lenient=True)) < 0.05


@pytest.mark.parametrize("task,pred,truth", [
    ("math", "１２", "12"), ("math", "١٢", "12"), ("math", "1\u200b2", "12"), ("math", "2²", "4"), ("math", "x²", "x^2"),
    ("math", "٣/٤", "3/4"), ("math", "±3", "3"), ("math", "3 ≤ x ≤ 4", "3"),
    ("choice", "В", "B"), ("choice", "Ｂ", "B"), ("choice", "B\u0301", "B"), ("counting", "７", "7"),
    ("chart", "４２", "42"), ("grounding", "[１20,40,380,300]", "[120,40,380,300]"),
    ("video_grounding", "[２, 5]", "[2, 5]"),
    ("gui", '｛"action": "click", "box": [100, 100, 200, 150]｝', CLICK),
    ("gui", '{"action": "сlick", "box": [100, 100, 200, 150]}', CLICK),  # Cyrillic с
])
def test_unicode_look_alikes_score_zero(task, pred, truth):
    # Python's int() and float() accept "١٢" and "１２"; the verifiers read ASCII digits only.
    assert rewards.score(task, reply(pred), truth) == 0.0


INJECTIONS = [
    "__import__('os').system('touch {sentinel}')",
    "exec(\"open('{sentinel}', 'w').close()\")",
    "eval(\"open('{sentinel}', 'w').close()\")",
    "lambda: open('{sentinel}', 'w')",
    "().__class__.__bases__[0].__subclasses__()",
    "import os; os.system('touch {sentinel}')",
    "sympify('open(\"{sentinel}\", \"w\")')",
    "Symbol('x').__class__.__init__.__globals__",
    r"\input{/etc/passwd}", r"\write18{touch {sentinel}}", "${{7*7}}", "{{config.__class__}}",
    '{"action": "click", "box": [1,2,3,4], "__proto__": {"admin": true}}',
    "1; DROP TABLE rewards; --", "`touch {sentinel}`", "$(touch {sentinel})",
]


def test_injected_code_never_runs(tmp_path, no_code_runs):
    sentinel = tmp_path / "pwned"
    for payload in INJECTIONS:
        text = payload.replace("{sentinel}", str(sentinel))
        for task in rewards.VERIFIERS:
            for truth in ("1", text):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # unreadable truths warn; fine here
                    warnings.filterwarnings("error", message=r"rewards: .* verifier failed")
                    value = rewards.score(task, reply(text), truth)
                    if truth == text:  # a payload as ground truth is unreadable, or (OCR, GUI JSON) equal to itself
                        assert value in (0.0, 1.0)
                    elif task == "ocr":  # OCR reads any string: the payload shares at most one "1" with the truth
                        assert value <= 1 / len(text)
                    else:
                        assert value == 0.0
                    assert rewards.score(task, text, truth) == 0.0
                    # in the thinking, a payload is just text: the reply scores as if it were not there
                    assert rewards.score(task, reply("1", think=text), truth) == rewards.score(task, reply("1"), truth)
    assert not sentinel.exists()


def test_source_never_calls_eval_exec_or_sympy_parsers():
    tree = ast.parse(open(rewards.__file__).read())
    banned_names = {"eval", "exec", "compile", "__import__"}
    banned_attributes = {"sympify", "parse_expr", "parse_latex", "eval", "exec", "S"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            assert not (isinstance(f, ast.Name) and f.id in banned_names), ast.unparse(node)
            assert not (isinstance(f, ast.Attribute) and f.attr in banned_attributes), ast.unparse(node)


# ------------------------------------------------------------------------------------------------ fuzzing

FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>", "<|user|>", " ", "\n",
    "0", "1", "7", "42", "-", "+", "*", "/", "^", "**", "%", "\\%", ".", ",", "e", "E", "x", "(", ")", "{", "}", "[",
    "]", "=", "\\frac", "\\sqrt", "\\pi", "\\times", "\\cdot", "\\text{", "\\left(", "\\right)", "$", "\\",
    "\\boxed{", "^\\circ", "°", "π", "√", "−", "×", "１", "٣", "²", "\u200b", "\ud800", "\x00", "ABCD", "B", "or",
    "[1,2,3,4]", "[0,0,1000,1000]", "(", '{"action": "click", "box": ', '"text": "a"', "true", "NaN", "1e308",
    "9**9**9", "10^{10^{10}}", "1e-400", "0.000001", "1,000", "{,}", "~", "\\,", "s", "'", '"', ":",
]

TRUTHS = {
    "math": ["12", "-3", "1/2", "0.75", r"\sqrt{2}", "x^2", "0", 0.5, 3, Fraction(1, 3)],
    "choice": ["A", "B", "d"],
    "ocr": ["HELLO 42", "", "ok"],
    "counting": ["7", "0", 12],
    "chart": ["42", "3.5", "1987", "0", 2.5],
    "grounding": ["[120,40,380,300]", "[[0,0,100,100],[500,500,600,600]]", [1, 2, 3, 4]],
    "gui": [CLICK, '{"action": "type", "text": "hi"}', {"action": "click", "box": [0, 0, 10, 10]}],
    "video_grounding": ["[2.0, 5.0]", [0, 1.5]],
}
GARBAGE_TRUTHS = [None, "", "nonsense", [], {}, [[]], float("nan"), float("inf"), -1, True, b"7", object(),
                  "[1,2]", '{"action": 3}', "1/0", "9**9**9**9"]


def _fuzz_box(rng):
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))


def test_fuzzed_replies_never_raise_and_stay_in_unit_interval():
    rng = random.Random(1234)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rewards: unreadable")  # garbage truths warn by design
        for i in range(10000):
            task = rng.choice(list(TRUTHS))
            truth = rng.choice(TRUTHS[task]) if rng.random() < 0.85 else rng.choice(GARBAGE_TRUTHS)
            if rng.random() < 0.7:  # mostly well-formed replies, so that the verifiers themselves get fuzzed
                response = reply(_fuzz_box(rng), think=_fuzz_box(rng) if rng.random() < 0.2 else "t")
            else:
                response = _fuzz_box(rng) * rng.randint(1, 3)
            for lenient in (False, True):
                value = rewards.score(task, response, truth, lenient=lenient)
                assert type(value) is float and 0.0 <= value <= 1.0, (task, response, truth, value)


def test_fuzzed_math_answers_read_consistently():
    """Whatever a math answer reads as, it reads the same every time and scores 1 against itself or not at all."""
    rng = random.Random(99)
    for _ in range(1500):
        box = _fuzz_box(rng)
        readings = rewards.math_readings(box)
        rewards.math_readings.cache_clear()
        assert rewards.math_readings(box) == readings
        if readings is not None and all(isinstance(v, Fraction) for r in readings for v in r):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="rewards: unreadable")
                assert rewards.score("math", reply(box), box) == 1.0, box


# ------------------------------------------------------------------------------------------------ CLI

def test_user_verifiers_get_the_box_and_the_truth_as_text(user_module):
    seen = []
    rewards.add_verifier("echo", lambda box, answer: seen.append((box, answer)) or 0.5)
    assert rewards.score("echo", reply(" [1, 2] "), [1, 2]) == 0.5 and seen == [(" [1, 2] ", "[1, 2]")]
    assert rewards.score("echo", "no format", "x") == 0.0 and len(seen) == 1  # a malformed reply: fn not called
    for value, expected in ((7, 1.0), (-1, 0.0), (float("nan"), 0.0)):  # clamped to [0, 1]
        rewards.add_verifier("echo", lambda box, answer, v=value: v)  # the same name again replaces it
        assert rewards.score("echo", reply("a"), "b") == expected
    rewards.add_verifier("echo", lambda box, answer: 1 / 0)
    with pytest.warns(UserWarning, match="echo verifier failed with ZeroDivisionError"):
        assert rewards.score("echo", reply("a"), "b") == 0.0
    assert rewards.add_verifiers(f"{user_module}, odd=myverifiers:parity") == ["parity", "odd"]
    assert rewards.score("odd", reply("5"), "1") == 1.0 and rewards.score("odd", reply("4"), "1") == 0.0
    with pytest.raises(ValueError, match="math is a built-in verifier"):
        rewards.add_verifier("math", len)
    with pytest.raises(ValueError, match="expects NAME=module:function, got 'parity'"):
        rewards.add_verifiers("parity")
    with pytest.raises(ValueError, match="cannot load myverifiers:nothing"):
        rewards.add_verifiers("x=myverifiers:nothing")
    with pytest.raises(ValueError, match="unknown task 'nope'; expected one of math, .*, echo, parity, odd"):
        rewards.score("nope", reply("1"), "1")


def test_cli_shows_extraction_parse_and_score(capsys):
    rewards.main(["--task", "math", "--answer", "0.5", reply(r"\frac{1}{2}")])
    out = capsys.readouterr().out
    assert "extracted: '\\\\frac{1}{2}'" in out and "1/2" in out and "score:     1.0" in out
    rewards.main(["--task", "math", "--answer", "7", "--lenient", reply("between 5 and 9")])
    out = capsys.readouterr().out
    assert "unreadable (word 'between')" in out and "score:     1.0" in out
    rewards.main(["--task", "choice", "--answer", "B", "<answer>B</answer>"])
    assert "malformed reply: format tags <answer></answer>; expected <think>" in capsys.readouterr().out


def test_cli_runs_as_a_script():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "rewards.py", "--task", "grounding", "--answer", "[[0,0,100,100],[5,5,9,9]]",
                          reply("[0,0,100,100]")], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "score:     0.5" in out
