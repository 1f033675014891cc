"""Tests for holes the verifiers had and for what closing them added: each hole has cases that must
pay and cases that must not (several per kind, our own hostile cases); then the math benchmark answers need
(functions, constants, ±, intervals, sets, inequalities, unicode fractions, degrees), the vqa, physics/chemistry
and multi_image verifiers, GLM-4.1V's GUI action formats, and the same guarantees as tests/test_rewards.py for all of
it: every score within 50 ms of CPU time, no injected code runs, score never raises."""

import functools
import json
import math
import random
import warnings
from fractions import Fraction

import pytest

import data
import rewards
from conftest import cpu_seconds


def reply(box):
    return data.format_reply(box, "Let me think.")


pytestmark = pytest.mark.usefixtures("verifier_safety_net")  # score()'s catch-all must never fire here


def pays(task, pred, truth):
    return rewards.score(task, reply(pred), truth)


def check(task, cases):
    """cases: (pred, truth, expected score); every score is also timed (≤ 50 ms of CPU, caches empty)."""
    wrong, slow = [], []
    for pred, truth, expected in cases:
        result = []
        seconds = cpu_seconds(lambda: result.append(pays(task, pred, truth)))
        if result[0] != pytest.approx(expected):
            wrong.append((pred, truth, result[0]))
        if seconds >= 0.05:
            slow.append((pred, truth, f"{seconds * 1e3:.1f} ms"))
    assert not wrong, f"{task}: (reply, truth, score) not as expected: {wrong}"
    assert not slow, f"{task}: slower than 50 ms: {slow}"


# ------------------------------------------------------------------------------------------------ A. the holes

NEGATIVE_MIXED_NUMBERS = [  # a number right before \frac is 2.5 to a schoolchild and 1 to LaTeX: never paid
    (r"-2\frac{1}{2}", "-1", 0), (r"-2\frac{1}{2}", "-5/2", 0), (r"-2 \frac{1}{2}", "-1", 0),
    (r"-3\dfrac{3}{4}", "-9/4", 0), (r"--2\frac12", "1", 0), (r"x = -2\frac{1}{2}", "-1", 0),
    (r"\left(-2\frac{1}{2}\right)", "-1", 0), (r"1 - 2\frac{1}{2}", "0", 0), (r"+2\tfrac{1}{2}", "1", 0),
    # ... while the unambiguous forms pay
    ("-2½", "-5/2", 1), ("2½", "2.5", 1), (r"-\frac{5}{2}", "-2.5", 1), (r"(-2)\frac{1}{2}", "-1", 1),
    (r"-2 \cdot \frac{1}{2}", "-1", 1), (r"x^2\frac{1}{2}", "x^2/2", 1), (r"\frac12\frac34", "3/8", 1),
    (r"-\frac{1}{2}x", "-x/2", 1),
]

THOUSANDS_SEPARATORS = [  # groups after the first must have exactly three digits, one separator throughout
    ("1{,}23", "123", 0), ("12,34", "1234", 0), ("12{,}34", "1234", 0), ("1{,}2345", "12345", 0),
    ("1,2345", "12345", 0), (r"1\,23", "123", 0), ("1,234{,}567", "1234567", 0), ("1,23,456", "123456", 0),
    ("12,34", "12.34", 0),
    ("1{,}234", "1234", 1), ("1,234,567", "1234567", 1), (r"1\,000\,000", "10^6", 1), ("12{,}345.5", "12345.5", 1),
    ("-1,234", "-1234", 1), ("1{,}000{,}000", "1000000", 1), ("12,34", "12, 34", 1),  # a list, read as a list
]

FLOATS_THAT_CANCEL = [  # exactness never comes from floats that cancel ...
    (r"\ln(1+10^{-12})", "0", 0), (r"\ln(1+10^{-20})", "0", 0), (r"\log_{10}(1+10^{-15})", "0", 0),
    (r"\ln(10^{20}+1)-\ln(10^{20})", "0", 0), (r"10^{20}((1+10^{-20})^{1/2}-1)", "0", 0),
    (r"\sqrt{10^{20}+1}-10^{10}", "0", 0), (r"(1+10^{-30})^{1/3}-1", "0", 0), (r"\ln\frac{10^{12}+1}{10^{12}}", "0", 0),
    # ... and the true values of the same expressions pay
    (r"\ln(1+10^{-12})", "10^{-12}", 1), (r"\ln(10^{20}+1)-\ln(10^{20})", "10^{-20}", 1),
    (r"10^{20}((1+10^{-20})^{1/2}-1)", "1/2", 1), (r"\sqrt{10^{20}+1}-10^{10}", "5 \\cdot 10^{-11}", 1),
    (r"\ln\frac{10^{12}+1}{10^{12}}", "10^{-12}", 1), (r"(1+10^{-20})^{1/2}", "1", 1),
]

MINUS_BEFORE_PERCENT = [  # -5% reads as -0.05 and as -5, like 5% reads as 0.05 and 5
    (r"-5\%", "-5", 1), (r"-5\%", "-0.05", 1), ("-5%", "-5%", 1), ("-12.5%", "-1/8", 1), ("+5%", "5", 1),
    ("--5%", "5", 1), (r"x = -5\%", "-5", 1),
    ("-5%", "5", 0), ("-5%", "0.05", 0), ("-5%", "-50", 0), ("5%", "-5", 0), ("-5%", "-0.5", 0),
]

MARKERS_ON_BOTH_SIDES = [  # a % or ° both sides have is read the same way on both (found while closing the above)
    ("0.5%", "50%", 0), (r"0.5\%", r"50\%", 0), ("50%", "0.5%", 0), ("0.5236°", "30°", 0), ("30°", "0.5236°", 0),
    ("-0.5%", "-50%", 0),
    ("50%", "50%", 1), ("0.5", "50%", 1), ("50", "50%", 1), ("50%", "0.5", 1), ("50%", "50", 1), ("30°", r"\pi/6", 1),
    (r"30^\circ", "30°", 1), ("1/2", r"50\%", 1),
]

RESIDUE_OF_ZERO = [  # float residue of a true 0 equals an exact 0 ...
    (r"\sin(\pi)", "0", 1), (r"\cos\frac{\pi}{2}", "0", 1), (r"0.1\pi+0.2\pi-0.3\pi", "0", 1),
    (r"\sqrt{2}^2-2", "0", 1), (r"\tan \pi", "0", 1), (r"e^{\ln 2}-2", "0", 1), (r"\sin(10^{6}\pi)", "0", 1),
    (r"(\sqrt{2}+\sqrt{3})^2-5-2\sqrt{6}", "0", 1), (r"4\arctan(1)-\pi", "0", 1), ("0.1+0.2-0.3", "0", 1),
    (r"\sin 180^\circ", "0", 1), (r"\cos(\pi) + 1", "0", 1),
    # ... but a true non-zero value does not, however small, nor a wrong one
    (r"\sin(\pi)+10^{-13}", "0", 0), (r"\sin(\pi)+10^{-30}", "0", 0), ("1e-13", "0", 0),
    (r"\pi-3.14159265358979", "0", 0), (r"\cos(\pi)", "0", 0), (r"\sin(\pi)", "10^{-16}", 0),
]

EXACT_ROOTS = [  # roots of large integers are exact integers, never floats
    (r"\sqrt{10^{40}}", "10^{20}", 1), (r"\sqrt{10^{40}} - 10^{20}", "0", 1),
    (r"\sqrt[3]{(10^{100}+1)^3} - 10^{100}", "1", 1), (r"\sqrt[5]{3^{500}}", "3^{100}", 1),
    (r"(10^{60}+7)^{2/3}", "(10^{60}+7)^{2/3}", 1), (r"\sqrt{(2^{200}+1)^2} - 2^{200}", "1", 1),
    (r"\sqrt[64]{2^{6400}}", "2^{100}", 1), (r"\sqrt[3]{-(10^{30}+1)^{3}}", "-(10^{30}+1)", 1),
    (r"\sqrt{10^{40}+1} - 10^{20}", "0", 0), (r"\sqrt[3]{(10^{50}+1)^3+1} - (10^{50}+1)", "0", 0),
    (r"\sqrt[3]{(10^{100}+1)^3} - 10^{100}", "0", 0), (r"\sqrt{10^{40}}", "10^{20}+10^{15}", 0),
]

UNREADABLE_TRUTHS = [  # a truth the parser cannot read is compared as normalised text
    (r"\text{Monday}", r"\text{Monday}", 1), ("Monday", r"\text{Monday}", 1), (r"$\text{monday}$", "Monday", 1),
    (r"2\frac{1}{2}", r"2\frac{1}{2}", 1), (r"2 \dfrac{1}{2}", r"2\frac{1}{2}", 1), ("No solution.", "no solution", 1),
    (r"\mathbb{R}", r"\mathbb{R}", 1), (r"x \neq 3", r"x\neq 3", 1),
    ("Tuesday", r"\text{Monday}", 0), ("5/2", r"2\frac{1}{2}", 0), (r"\mathbb{Z}", r"\mathbb{R}", 0),
    ("Monday or Tuesday", "Monday", 0), ("", r"\text{Monday}", 0),
]


@pytest.mark.parametrize("name,cases", [
    ("negative mixed numbers", NEGATIVE_MIXED_NUMBERS), ("thousands separators", THOUSANDS_SEPARATORS),
    ("floats that cancel", FLOATS_THAT_CANCEL), ("minus before percent", MINUS_BEFORE_PERCENT),
    ("markers on both sides", MARKERS_ON_BOTH_SIDES),
    ("residue of zero", RESIDUE_OF_ZERO), ("exact roots", EXACT_ROOTS), ("unreadable truths", UNREADABLE_TRUTHS),
])
def test_math_holes(name, cases):
    assert sum(e == 1 for *_, e in cases) >= 4 and sum(e == 0 for *_, e in cases) >= 4, name
    check("math", cases)


def test_markers_on_both_sides_in_chart_vqa_and_physics():
    check("chart", [("0.5%", "50%", 0), ("50%", "50%", 1), ("42%", "42", 1), ("0.42", "42%", 1)])
    check("vqa", [("0.5%", "50%", 0), ("50%", "50%", 1), ("50%", "0.5", 1)])
    check("physics", [("0.5%", "50%", 0), ("50%", "50%", 1), ("50 percent", "50%", 1), ("0.52°", "30°", 0)])


def test_thousands_separators_in_chart_and_counting():
    check("chart", [("1{,}234", "1234", 1), ("1{,}23", "123", 0), ("12,34", "1234", 0), ("1,234", "1,234", 1)])
    check("counting", [("1{,}234", "1234", 1), ("1{,}23", "123", 0), ("12,34", "1234", 0), ("1\\,000", "1000", 1)])


def test_a_negative_mixed_number_is_unreadable_but_a_vulgar_one_is_exact():
    for text in (r"-2\frac{1}{2}", r"2\frac{1}{2}", r"-2 \frac12", r"(-2\frac{1}{2})"):
        assert rewards.math_readings(text) is None, text
    assert rewards.math_readings("-2½") == ((Fraction(-5, 2),),)
    assert rewards.math_readings("¾") == ((Fraction(3, 4),),)


def test_integer_roots_are_exact_fractions():
    big = (10**100 + 1) ** 3
    assert rewards._integer_root(big, 3) == 10**100 + 1
    assert rewards._integer_root(big + 1, 3) is None
    assert rewards._integer_root(10**40, 2) == 10**20
    for k in range(2, 65):
        n = random.Random(k).randrange(10**30, 10**31) ** k
        assert rewards._integer_root(n, k) ** k == n
    assert rewards.math_readings(r"\sqrt{10^{40}}") == ((Fraction(10**20),),)


def test_unreadable_math_truth_needs_text_to_compare():
    with pytest.warns(UserWarning, match="unreadable math ground truth"):
        assert pays("math", "", "   ") == 0.0


# --- long OCR transcriptions

def _text(rng, n, alphabet="abcdefgh ijklmnop"):
    return "".join(rng.choice(alphabet) for _ in range(n))


def _mutate(rng, text, errors):
    chars = list(text)
    for _ in range(errors):
        i = rng.randrange(len(chars))
        op = rng.choice("sid")
        if op == "s":
            chars[i] = "Z"
        elif op == "i":
            chars.insert(i, "Q")
        elif len(chars) > 1:
            del chars[i]
    return "".join(chars)


@pytest.mark.parametrize("n", [4097, 5000, 20000, 65536])
def test_long_exact_ocr_transcriptions_score_one_cheaply(n):
    text = _text(random.Random(n), n)
    result = []
    assert cpu_seconds(lambda: result.append(pays("ocr", text, text))) < 0.05
    assert result[0] == 1.0
    spaced = "  " + text[:n // 2].replace(" ", " \n ") + text[n // 2:] + "\n"
    assert pays("ocr", spaced, text) == (1.0 if len(spaced) <= rewards.MAX_OCR_CHARS else 0.0)  # whitespace collapses


@pytest.mark.parametrize("n,errors", [(5000, 3), (6000, 40), (20000, 10), (65536, 50), (65536, 400)])
def test_long_ocr_with_errors_is_scored_close_to_its_worth_and_never_above(n, errors):
    rng = random.Random(n + errors)
    truth = rewards._ocr_text(_text(rng, n))
    pred = rewards._ocr_text(_mutate(rng, truth, errors))
    result = []
    assert cpu_seconds(lambda: result.append(pays("ocr", pred, truth))) < 0.05
    longest = max(len(pred), len(truth))
    assert result[0] <= 1 - 1 / longest  # something differs
    assert result[0] >= 1 - 2 * errors / longest  # the bound is near the truth: each error costs at most ~2
    if n <= 20000:  # there the exact distance is affordable in a test: never overpaid
        exact = 1 - rewards.edit_distance(pred, truth) / longest
        assert result[0] <= exact + 1e-12


def test_long_unrelated_ocr_is_fast_and_not_overpaid():
    rng = random.Random(3)
    for n, m in [(5000, 5000), (16384, 16384), (65536, 65536), (100, 65536), (65536, 30000)]:
        a, b = rewards._ocr_text(_text(rng, n)), rewards._ocr_text(_text(rng, m))
        result = []
        assert cpu_seconds(lambda: result.append(pays("ocr", a, b))) < 0.05, (n, m)
        if n * m <= 5000 * 5000 * 4:
            assert result[0] <= 1 - rewards.edit_distance(a, b) / max(len(a), len(b)) + 1e-12
        assert result[0] < 0.5


def test_ocr_pieces_distance_is_an_upper_bound_of_the_edit_distance():
    rng = random.Random(11)
    for _ in range(30):
        a = _text(rng, rng.randint(600, 3000), "abc ")
        b = _mutate(rng, a, rng.randint(0, 200)) if rng.random() < 0.7 else _text(rng, rng.randint(1, 3000), "abc ")
        assert rewards._pieces_distance(a, b) >= rewards.edit_distance(a, b)


# ------------------------------------------------------------------------------------------------ B. math answers

MATH_FORMS = [
    # functions and constants
    (r"\sin\frac{\pi}{6}", "1/2", 1), (r"\sin 30^\circ", "1/2", 1), (r"\cos(60°)", "0.5", 1), (r"\tan\frac{\pi}{4}", "1", 1),
    (r"2\sin x \cos x", r"\sin 2x", 1), (r"\sin^2 x + \cos^2 x", "1", 1), (r"\sin^{2}(x)", r"(\sin x)^2", 1),
    (r"\log_2 8", "3", 1), (r"\log_{4} 2", "1/2", 1), (r"\lg 1000", "3", 1), (r"\ln e^{2}", "2", 1), (r"\ln(e)", "1", 1),
    (r"e^{\ln 3}", "3", 1), (r"\exp(2)", "e^2", 1), ("exp(1)", "e", 1), ("2.718281828", "e", 1), ("e", "2.7182818285", 1),
    (r"\frac{\ln 8}{\ln 2}", "3", 1), (r"\arctan 1", r"\frac{\pi}{4}", 1), (r"\arcsin\frac12", r"\pi/6", 1),
    (r"\sec 0", "1", 1), ("sin(pi/2)", "1", 1), ("ln(1)", "0", 1), (r"x e^{x}", r"x\exp(x)", 1),
    (r"\log 100", "2", 0), (r"\sin 30", "1/2", 0), (r"\sin^{-1} x", r"\arcsin x", 0), ("2.718", "e", 0),
    (r"\ln(-1)", "0", 0), (r"\tan\frac{\pi}{2}", "0", 0), ("e", "x", 0),
    # e stays a variable only where the truth uses it as one
    ("e+d+c+b+a", "a+b+c+d+e", 1), ("a+b+c+d+2.718281828459045", "a+b+c+d+e", 0), ("2e", "e+e", 1), ("2e", "5.43656366", 1),
    # ± pairs: only where the truth has one
    (r"1\pm\sqrt{2}", r"1 \pm \sqrt{2}", 1), (r"1+\sqrt2, 1-\sqrt2", r"1\pm\sqrt2", 1), (r"x = \pm 2", r"\pm 2", 1),
    ("-2, 2", r"\pm 2", 1), (r"\{2, -2\}", "±2", 1), (r"\frac{-1 \pm \sqrt{5}}{2}", r"\frac{-1\pm\sqrt5}{2}", 1),
    (r"\mp 3", r"\pm 3", 1), (r"1+\sqrt2", r"1\pm\sqrt2", 0), (r"\pm 3", "3", 0), (r"\pm 3", "-3", 0),
    (r"3 \pm 0", "3", 0), (r"\pm 3, \pm 3", r"\pm 3", 0), (r"\pm\pm 3", r"\pm 3", 0), ("3, -3, 3", r"\pm 3", 0),
    # intervals, tuples, sets, unions
    ("(1, 2]", "(1,2]", 1), ("[1,2)", r"\left[1, 2\right)", 1), (r"(-\infty, 3]", r"(-\infty,3]", 1),
    (r"x \in [1, 3]", "[1,3]", 1), (r"(-\infty,1)\cup(2,\infty)", r"(2,\infty)\cup(-\infty,1)", 1),
    ("(1, 2)", "(1,2]", 0), ("[1, 2]", "(1, 2)", 0), (r"(-\infty, 3)", r"(-\infty,3]", 0), ("(2, 1)", "(1, 2)", 0),
    (r"(1,\infty)", r"(1,-\infty)", 0), (r"(1,2)\cup(3,4)", "(1,2)", 0),
    ("(1, 2, 3)", r"\left(1,2,3\right)", 1), ("(3, 2, 1)", "(1, 2, 3)", 0), ("(1, 2)", "(1, 2, 3)", 0),
    (r"\{1, 2, 3\}", r"\{3, 1, 2\}", 1), ("3, 1, 2", r"\{1, 2, 3\}", 1), ("(1,2), (3,4)", "(3,4), (1,2)", 1),
    (r"\{1, 2\}", r"\{1, 2, 2\}", 0), ("1, 2", "1, 2, 3", 0), ("(1,2), (3,4)", "(2,1), (3,4)", 0),
    (r"\infty", r"\infty", 1), (r"+\infty", r"\infty", 1), (r"-\infty", r"\infty", 0), (r"2\infty", r"\infty", 0),
    # inequalities, structurally
    ("x>3", "3<x", 1), (r"x \ge 2", r"2 \le x", 1), (r"x\geq 2", r"x \geqslant 2", 1), (r"1 < x \le 5", r"5 \geq x > 1", 1),
    ("x ≥ 2", r"x\ge 2", 1), (r"x \gt 3", "x > 3", 1),
    (r"x\geq 2", "x>2", 0), ("x > 3", "3", 0), ("x > 3", "x < 3", 0), ("y > 3", "x > 3", 0), ("2x > 6", "x > 3", 0),
    ("1 < x < 5", "1 < x", 0), ("1 < x > 0", "x > 1", 0),
    # unicode fractions and degrees in the truth
    ("1/2", "½", 1), ("0.75", "¾", 1), (r"\frac{1}{3}", "⅓", 1), ("5/2", "2½", 1), ("-5/2", "-2½", 1), ("0.1", "⅒", 1),
    ("30", "30°", 1), (r"30^\circ", "30°", 1), (r"\frac{\pi}{6}", "30°", 1), (r"30^{\circ}", r"\frac{\pi}{6}", 1),
    ("25", "25°C", 1), (r"25^\circ C", "25", 1),
    ("2/3", "½", 0), ("1/2", "2½", 0), ("31", "30°", 0), ("1/2", "30°", 0),
]


@pytest.mark.parametrize("pred,truth,expected", MATH_FORMS)
def test_math_benchmark_forms(pred, truth, expected):
    check("math", [(pred, truth, expected)])


@pytest.mark.parametrize("pred", [
    "3 or 4", "between 5 and 9", r"3 \text{ or } 4", r"\pm 3", "±3", "3, 4", "[3, 4]", "(3, 4)", r"\{3, 4\}",
    r"3 \le x \le 4", "x > 3", r"x \in [3, 4]", r"(-\infty, 4]", r"3 \pm 1", "3, 3", r"3 \cup 4", r"\approx 3",
])
def test_structures_never_equal_a_single_value(pred):
    for truth in ("3", "4", "7", "3.5"):
        assert pays("math", pred, truth) == 0.0


def test_e_reading_follows_the_truth():
    assert rewards._e_is_a_variable("a+b+c+d+e")
    assert not rewards._e_is_a_variable("e")
    assert not rewards._e_is_a_variable("x e^{x}")
    assert not rewards._e_is_a_variable("2e")
    assert rewards.math_readings("e") == ((rewards._E,),)
    assert len(rewards.math_readings("e", True)[0]) == 3  # a variable: compared at three points


def test_to_sympy_knows_the_new_nodes():
    import sympy

    x = sympy.Symbol("x")
    cases = [(r"\sin x + \ln 2 + e^{x}", sympy.sin(x) + sympy.log(2) + sympy.exp(x)), (r"\log_2 8", sympy.Integer(3)),
             (r"\arctan 1", sympy.pi / 4), (r"\lg 100", sympy.Integer(2))]
    for text, expected in cases:
        assert sympy.simplify(rewards.to_sympy(rewards.parse_math(text)[0]) - expected) == 0, text
    assert rewards.to_sympy(rewards.parse_math("(1, 2]")[0]) == sympy.Interval.Lopen(1, 2)
    assert rewards.to_sympy(rewards.parse_math(r"\{1, 2\}")[0]) == sympy.FiniteSet(1, 2)


def _random_function_expression(rng, depth):
    """LaTeX text and an independent SymPy value of a random expression with functions of positive arguments."""
    import sympy

    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(1, 9)
        return (str(n), sympy.Integer(n)) if rng.random() < 0.7 else (r"\pi", sympy.pi)
    a_text, a = _random_function_expression(rng, depth - 1)
    op = rng.choice(["sin", "cos", "arctan", "exp", "ln", "+", "*", "/", "sqrt"])
    if op in ("+", "*", "/"):
        b_text, b = _random_function_expression(rng, depth - 1)
        return f"({a_text}) {op} ({b_text})", {"+": a + b, "*": a * b, "/": a / b}[op]
    if op == "exp":
        return rf"e^{{\frac{{{a_text}}}{{10}}}}", sympy.exp(a / 10)
    if op == "sqrt":
        return rf"\sqrt{{{a_text}}}", sympy.sqrt(a)
    if op == "ln":
        return rf"\ln(1 + ({a_text})^2)", sympy.log(1 + a**2)
    return rf"\{op}({a_text})", {"sin": sympy.sin, "cos": sympy.cos, "arctan": sympy.atan}[op](a)


def test_functions_agree_with_sympy_on_random_expressions():
    rng = random.Random(4)
    checked = 0
    for _ in range(200):
        text, expected = _random_function_expression(rng, 3)
        value = complex(expected.evalf(30))
        if value.imag or not math.isfinite(value.real) or abs(value.real) > 1e12:
            continue
        value = value.real
        readings = rewards.math_readings(text)
        if readings is None:  # a root of a negative value, say: unreadable, never a wrong number
            continue
        ours = readings[0][0]
        assert math.isclose(float(ours), value, rel_tol=1e-9, abs_tol=1e-12), (text, float(ours), value)
        if isinstance(ours, rewards._Approx):  # the error bound is honest
            assert abs(ours.value - value) <= ours.error + 1e-15 * max(1, abs(value)), (text, ours, value)
        checked += 1
    assert checked > 100


# ------------------------------------------------------------------------------------------------ C. new verifiers

VQA = [
    ("Two", "2", 1), ("2", "two", 1), ("the dog", "dog", 1), ("Dog.", "a dog", 1), ("yes", "Yes", 1), ("1,000", "1000", 1),
    ("2.0", "2", 1), ("1/2", "0.5", 1), ("cat", '["dog", "cat"]', 1), ("t-shirt", "T-Shirt", 1), ("dont", "don't", 1),
    (r"\text{red}", "red", 1), ("3", '[3, "three"]', 1), ("A", "a", 1),
    ("-5", "5", 0), ("yes or no", "yes", 0), ("2 or 3", "2", 0), ("2, 3", "2", 0), ("dog", '["cat", "cow"]', 0),
    ("2 apples", "2", 0), ("no", "yes", 0), ("", "yes", 0), ("3", "2", 0), ("twenty", "2", 0),
]

UNITS = [
    ("1500 m", "1.5 km", 1), ("9.8 m/s^2", r"9.8\,\mathrm{m\,s^{-2}}", 1), ("9.81 m·s⁻²", "9.8 m/s^2", 1),
    ("3 meters per second", "3 m/s", 1), ("3 m·s^-1", "3 m/s", 1), ("10 km/h", "2.7778 m/s", 1), ("100 J", "100 joules", 1),
    ("0.1 kJ", "100 J", 1), ("25 °C", "298.15 K", 1), ("25 degC", r"25^\circ C", 1), ("77 °F", "25 °C", 1),
    (r"1.5 \times 10^{3}\,\text{m}", "1.5 km", 1), ("30°", r"\frac{\pi}{6} rad", 1), ("25%", "0.25", 1),
    ("2 kilometres", "2000 m", 1), ("500 mL", "0.5 L", 1), ("5 cm^2", "0.0005 m^2", 1), ("1 atm", "101.325 kPa", 1),
    ("9.8 m/s^2", "9.8", 1), ("5 N", r"5\ \mathrm{kg\,m/s^2}", 1), (r"3.0\times10^{8}\ \mathrm{m/s}", "3e8 m/s", 1),
    ("9.8", "9.8 m/s^2", 0), ("5 m or 6 m", "5 m", 0), ("5 m", "5 s", 0), ("5 mm", "5 m", 0), ("5 MW", "5 mW", 0),
    ("9.5 m/s^2", "9.8 m/s^2", 0), ("25 K", "25 °C", 0), ("5 \\pm 0.1 m", "5 m", 0), ("about 5 m", "5 m", 0),
    ("5 m, 6 m", "5 m", 0), ("5 widgets", "5 m", 0), ("5 kg", "5 m", 0),
]

CHEMISTRY = [
    ("0.1 mol/L", "0.1 M", 1), ("0.1 mol L^-1", "0.1 M", 1), ("100 mM", "0.1 M", 1), ("0.1 mol·dm⁻³", "0.1 M", 1),
    ("H2O", "H2O", 1), ("18 g/mol", "18 g mol^-1", 1), ("8.314 J/(mol K)", "8.314 J/mol/K", 1),
    ("0.2 M", "0.1 M", 0), ("0.1 mol", "0.1 M", 0), ("CO", "Co", 0), ("H2O2", "H2O", 0),
]


def test_vqa():
    check("vqa", VQA)


def test_physics_units():
    check("physics", UNITS)


def test_chemistry_units():
    check("chemistry", CHEMISTRY)


def test_units_tolerance_is_one_percent():
    check("physics", [("9.9 m", "10 m", 1), ("9.89 m", "10 m", 0), ("1.01 km", "1000 m", 1), ("1.02 km", "1000 m", 0)])


def test_multi_image_scores_as_its_sub_task():
    check("multi_image", [
        ("3", '{"task": "counting", "answer": 3}', 1), ("4", '{"task": "counting", "answer": 3}', 0),
        (r"\frac{1}{2}", '{"task": "math", "answer": "0.5"}', 1), ("B", '{"task": "choice", "answer": "B"}', 1),
        ("A", '{"task": "choice", "answer": "B"}', 0), ("cat", "cat", 1), ("Cat.", '["dog", "cat"]', 1), ("cow", "cat", 0),
        ("[100,100,200,150]", '{"task": "grounding", "answer": [100, 100, 200, 150]}', 1),
    ])
    assert pays("multi_image", "3", {"task": "counting", "answer": 3}) == 1.0  # the truth as a dict
    with pytest.warns(UserWarning, match="unreadable multi_image ground truth"):
        assert pays("multi_image", "3", '{"task": "no_such_task", "answer": 3}') == 0.0
    with pytest.warns(UserWarning, match="unreadable multi_image ground truth"):
        assert pays("multi_image", "3", '{"task": "multi_image", "answer": "3"}') == 0.0


def test_new_tasks_are_in_the_verifier_table():
    for task in ("vqa", "physics", "chemistry", "multi_image"):
        assert task in rewards.VERIFIERS
    assert rewards.VERIFIERS["physics"] == rewards.VERIFIERS["chemistry"]


# --- GUI: GLM-4.1V's formats (zai-org/GLM-V, examples/gui-agent/glm-41v/agent.md)

BOX = '{"action": "click", "box": [100, 100, 200, 150]}'
GUI = [
    ("left_click(start_box='[150,125]')", BOX, 1), ("left_click(start_box='[100,100]', element_info='OK')", BOX, 1),
    ("left_click(start_box='[200,150]')", BOX, 1), ('{"action": "click", "point": [150, 125]}', BOX, 1),
    ('{"action_type": "click", "box_2d": [[105,100,205,150]]}', BOX, 1), ("left_click(start_box='[105,100,205,150]')", BOX, 1),
    (BOX, BOX, 1), ("tap(start_box='[150,125]')", BOX, 1),
    ("left_click(start_box='[250,125]')", BOX, 0), ("right_click(start_box='[150,125]')", BOX, 0),
    ("left_click(start_box='[150,125]') left_click(start_box='[10,10]')", BOX, 0),
    ("left_click(start_box='[150,125]')\nleft_click(start_box='[10,10]')", BOX, 0),
    ("left_click(start_box='[0,0,1000,1000]')", BOX, 0), ("left_click(start_box='[150,1250]')", BOX, 0),
    ("left_click(start_box='[150,125]', start_box='[10,10]')", BOX, 0), ("left_click(start_box=[150,125])", BOX, 0),
    ('{"action": "click", "box": "[100,100,200,150]"}', BOX, 0), ("left_click", BOX, 0), ("click [150,125]", BOX, 0),
    ('{"action": "click", "action_type": "click", "box": [100,100,200,150]}', BOX, 0),
    # a truth in the call form: a point within 20 of the truth point
    ("left_click(start_box='[380,470]')", "left_click(start_box='[376,465]')", 1),
    ("left_click(start_box='[420,470]')", "left_click(start_box='[376,465]')", 0),
    ("left_click(start_box='[350,450,400,480]')", "left_click(start_box='[376,465]')", 0),
    # other actions
    ("type(content='hello world')", '{"action": "type", "text": "hello world"}', 1),
    ("type(content='hello  world ')", "type(content='hello world')", 1),
    ("type(content='Hello world')", "type(content='hello world')", 0), ("type(content='hello')", "type(content='hello world')", 0),
    ("key(keys='Ctrl + C')", "key(keys='ctrl+c')", 1), ("key(keys='ctrl+v')", "key(keys='ctrl+c')", 0),
    ("scroll(start_box='[150,125]', direction='down', step=5)", '{"action": "scroll", "box": [100,100,200,150], '
     '"direction": "down"}', 1),
    ("scroll(start_box='[150,125]', direction='up', step=5)", '{"action": "scroll", "box": [100,100,200,150], '
     '"direction": "down"}', 0),
    ("left_drag(start_box='[110,110]', end_box='[510,510]')", '{"action": "drag", "box": [100,100,200,150], '
     '"end_box": [500,500,600,600]}', 1),
    ("left_drag(start_box='[110,110]', end_box='[10,10]')", '{"action": "drag", "box": [100,100,200,150], '
     '"end_box": [500,500,600,600]}', 0),
    ("DONE()", '{"action": "done"}', 1), ("WAIT()", "WAIT()", 1), ("FAIL()", "DONE()", 0),
    ('{"action_type": "input_text", "text": "abc", "box_2d": [[10,10,100,50]], "override": true}',
     '{"action_type": "input_text", "text": "abc", "box_2d": [[12,10,100,50]], "override": true}', 1),
    ('{"action_type": "input_text", "text": "abc", "box_2d": [[10,10,100,50]], "override": false}',
     '{"action_type": "input_text", "text": "abc", "box_2d": [[12,10,100,50]], "override": true}', 0),
    ('{"action_type": "swipe", "direction": "up"}', '{"action_type": "swipe", "direction": "up"}', 1),
    ('{"action_type": "open_app", "app_name": "Gmail"}', '{"action_type": "open_app", "app_name": "Gmail"}', 1),
]


def test_gui_formats():
    check("gui", GUI)


# ------------------------------------------------------------------------------------------------ D. guarantees

NEW_TRUTHS = {
    "math": [r"1\pm\sqrt2", "(1,2]", "x>3", r"\text{Monday}", "a+b+e", "30°", r"\sin x", "0", "-5%"],
    "chart": ["Asia", "1{,}234", "0"],
    "vqa": ["2", "yes", '["a", "b"]'],
    "physics": ["1.5 km", "9.8 m/s^2", "9.8", "25 °C", "H2O"],
    "chemistry": ["0.1 M"],
    "multi_image": ['{"task": "math", "answer": "1/2"}', "cat", '{"task": "gui", "answer": {"action": "click", '
                    '"box": [1, 2, 30, 40]}}'],
    "gui": [BOX, "left_click(start_box='[10,10]')", "type(content='hi')"],
    "ocr": ["HELLO"],
}
FRAGMENTS = [
    "0", "1", "2", "42", "-", "+", "*", "/", "^", "%", "\\%", ".", ",", "e", "x", "(", ")", "{", "}", "[", "]", "=",
    "\\frac", "\\sqrt", "\\pi", "\\sin", "\\cos", "\\tan", "\\arctan", "\\ln", "\\log", "\\log_", "_", "\\exp",
    "\\pm", "\\mp", "±", "\\infty", "∞", "\\cup", "\\in", "\\{", "\\}", "<", ">", "\\le", "\\geq", "≤", "½", "⅒",
    "{,}", "\\,", "1,000", "°", "^\\circ", "C", "\\mathrm{", "m", "s", "km", "J", "mol", "L", "M", "°C", "per",
    "squared", "·", "⁻¹", "µ", "Ω", "percent", "left_click(", "start_box=", "'[1,2]'", "'", "type(", "content=",
    "DONE()", '{"action_type": "click", "box_2d": [[1,2,30,40]]}', "1e308", "1e-400", "9**9**9", "\\sqrt[3]{",
    "10^{10^{10}}", "(-\\infty,", "yes", "two", "the", " ", "\\text{", "$", "\\", "\ud800", "\x00",
]


def _fuzz(rng):
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 14)))


def test_fuzzed_replies_to_the_new_verifiers_never_raise():
    rng = random.Random(2020)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rewards: unreadable")
        for _ in range(6000):
            task = rng.choice(sorted(NEW_TRUTHS))
            truth = rng.choice(NEW_TRUTHS[task]) if rng.random() < 0.7 else _fuzz(rng)
            value = pays(task, _fuzz(rng), truth)
            assert type(value) is float and 0.0 <= value <= 1.0


def test_fuzzed_answers_score_one_against_themselves():
    rng = random.Random(21)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rewards: unreadable")
        for _ in range(3000):
            box = _fuzz(rng)
            readings = rewards.math_readings(box)
            if readings is not None and all(not isinstance(v, rewards._Approx) for r in readings for v in r):
                assert pays("math", box, box) == 1.0, box


@functools.cache
def _hostile_cases():
    sin = r"\sin(\pi)x"
    return [
        ("math", ", ".join([sin] * 31 + ["1"]), ", ".join(["0"] * 31 + ["2"])),    # undecided in floats, 3 points
        ("math", ", ".join([f"{i}x°" for i in range(32)]), ", ".join([f"{31 - i}x°" for i in range(32)])),
        ("math", "+".join([r"\sqrt[63]{7^{3000}+1}"] * 12), "1"),                 # inexact roots of huge numbers
        ("math", "+".join([r"\log_{7^{100}}{7^{1000}}"] * 15), "150"),           # exact logarithms of huge numbers
        ("math", "x" + "<x" * 120, "x<x"), ("math", "\\pm" * 200 + "1", "1"), ("math", "½" * 1000, "1"),
        ("math", r"\cup".join(["(1,2)"] * 50), "(1,2)"), ("math", "\\sin" * 100 + " 1", "1"),
        ("math", r"\sin(10^{300})", "0"), ("math", r"\ln(10^{100}+1)-\ln(10^{100})", "10^{-100}"),
        ("physics", "1 " + "m " * 1000, "1 m"), ("physics", "1 m", "1 " + "m " * 5000),
        ("physics", "x " * 1000, "1 m"), ("physics", r"\text{" * 500 + "m" + "}" * 500, "1 m"),
        ("vqa", "yes " * 500, "yes"), ("vqa", "yes", json.dumps(["no"] * 64)),
        ("gui", "left_click(" + "a='1'," * 300 + ")", BOX), ("gui", "left_click(a='" + "\\" * 2000 + "')", BOX),
        ("gui", "left_click(" * 1000, BOX), ("multi_image", "1", json.dumps({"task": "ocr", "answer": "A" * 100000})),
        ("ocr", _text(random.Random(1), 65536), _text(random.Random(2), 65536)),
    ]


@pytest.mark.parametrize("case", range(len(_hostile_cases())))
def test_hostile_input_to_the_new_code_is_fast(case):
    task, pred, truth = _hostile_cases()[case]
    result = []
    seconds = cpu_seconds(lambda: result.append(pays(task, pred, truth)))
    assert seconds < 0.05, f"{seconds * 1e3:.1f} ms"
    assert 0.0 <= result[0] <= 1.0


def test_injected_code_never_runs_in_the_new_verifiers(tmp_path, no_code_runs):
    sentinel = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {sentinel}')", f"exec(\"open('{sentinel}', 'w')\")",
                f"left_click(start_box=__import__('os').system('touch {sentinel}'))",
                f"type(content='{{__import__(\"os\").system(\"touch {sentinel}\")}}')",
                f'{{"action_type": "__import__(\'os\').system(\'touch {sentinel}\')"}}', r"\input{/etc/passwd} m/s",
                f"5 m/s; import os; os.system('touch {sentinel}')"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rewards: unreadable")
        for payload in payloads:
            for task in NEW_TRUTHS:
                for truth in NEW_TRUTHS[task][:2] + [payload]:
                    assert 0.0 <= pays(task, payload, truth) <= 1.0
    assert not sentinel.exists()
