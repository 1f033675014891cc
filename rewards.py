"""rewards.py — the reward system of RL: one strict verifier per task domain (paper §5, Table 1).

GLM-4.1V-Thinking learns in RL only from verifiable rewards, and the paper's strongest warning is that one weak
verifier lets the policy hack its reward ("a number between 0 and 10") and drags every domain down (§5).
So `score(task, response, answer) -> float in [0, 1]` is strict everywhere and never raises on model output.

Design (the algorithmic choices, top to bottom):
* Format, checked in one place (`data.parse_reply`): the reply is `<think>…</think><answer>…</answer>` with exactly one
  `<|begin_of_box|>X<|end_of_box|>` inside the answer, optionally followed by one end-of-turn token. Only X is
  graded; anything malformed scores 0. Format is learned in SFT and not rewarded in RL (paper §5).
* Verifiers, as in paper Table 1: math — value equality, relative tolerance 1e-6; choice — exactly one letter;
  ocr — 1 − edit distance / max length; counting — exact integer; chart — relative tolerance 2.5e-2, but integers
  1000–3000 are years and must match exactly; grounding — fraction of truth boxes matched one-to-one with
  IoU ≥ 0.5, divided by max(#truth, #predicted) so spraying boxes does not pay; gui — the action type must match,
  then box IoU ≥ 0.5 / text equality; video_grounding — temporal IoU, 0 below 0.5 (the video's length is unknown,
  so this threshold is what makes a whole-video segment worthless, as IoU ≥ 0.5 does for a whole-image box).
* Model text never reaches eval, exec, sympify or parse_expr. Math goes through a small recursive-descent parser of
  our own (ASCII tokens only, ≤ MAX_TOKENS tokens, nesting ≤ MAX_DEPTH) into a tuple AST; `to_sympy` turns that
  AST into SymPy objects (for the CLI and the tests), while equality is decided by exact rational arithmetic
  (fractions.Fraction), with floats only for irrational values (√, π). That is ~30× faster than SymPy on the hot
  path, and every intermediate is capped at MAX_BITS bits, so `9**9**9**9` or `10^{10^{10}}` is rejected in
  microseconds. Expressions with letters are compared at three fixed random rational points (Schwartz–Zippel)
  instead of calling simplify().
* Hedges earn nothing because they do not parse: words ("or", "between"), lists, ±, inequalities, ranges, several
  option letters. A trailing % may be read either as the fraction (50% = 0.5) or as the percentage (50), never more.
* `score(..., lenient=True)` is the deliberately weak verifier of paper §5 — kept tiny at the end of the file to
  reproduce the reward-hacking collapse (README, Finding 3). Never train with it otherwise.
"""

import argparse
import json
import math
import random
import re
import string
import sys
import unicodedata
import warnings
from fractions import Fraction
from functools import lru_cache

import data

# ----------------------------------------------------------------------------------------------------------------
# Tasks, tolerances and limits (paper Table 1)

MATH_REL_TOL = Fraction(1, 10**6)        # paper Table 1: SymPy numeric equality, relative tolerance 1e-6
CHART_REL_TOL = Fraction(25, 1000)       # paper Table 1: chart numbers within 2.5e-2 ...
YEARS = (1000, 3000)                     # ... except integers in this range, which are years and must be exact
IOU_THRESHOLD = 0.5                      # grounding and GUI boxes; also the floor of temporal IoU
COORD_MAX = 1000                         # boxes are [x1, y1, x2, y2] in 0–1000 coordinates (the released format)
MAX_SECONDS = 1e6                        # video timestamps beyond ~11 days are nonsense

# Limits that keep hostile output cheap: everything is bounded before any work that grows with it.
MAX_RESPONSE_CHARS = 1 << 22             # 4 Mi characters (a 64k-token reply is far shorter); scanned in C anyway
MAX_BOX_CHARS = 2048                     # box content of every task but OCR (room for MAX_BOXES boxes)
MAX_OCR_CHARS = 4096                     # OCR box content (edit distance is O(n·m/64) word operations)
MAX_TOKENS = 256                         # math tokens
MAX_DEPTH = 32                           # math nesting: parentheses, braces, exponents, unary signs
MAX_BITS = 16384                         # numerator/denominator size of every exact intermediate (~4,900 digits)
MAX_LITERAL_EXPONENT = 1000              # 1e±1000 at most in scientific notation
MAX_ROOT = 64                            # \sqrt[n]{…} and x^{p/q}: n, q ≤ 64 for the exact path
MAX_BOXES = 100                          # predicted boxes in one answer

# ----------------------------------------------------------------------------------------------------------------
# Answer extraction: the reply format is data.py's (`parse_reply`); only the box content is graded


def extract_answer(response):
    """The box content of a well-formed reply (data.parse_reply), or None; an over-long reply is not read."""
    if isinstance(response, str) and len(response) > MAX_RESPONSE_CHARS:
        return None
    return data.parse_reply(response)[0]


class _Unreadable(ValueError):
    """Model text (or a ground truth) that no verifier can read; always becomes a score of 0."""


# Errors that parsing and exact arithmetic on hostile text may raise. Anything else is a bug in this file.
_EXPECTED_ERRORS = (ValueError, ArithmeticError, RecursionError)


_LATEX_WRAPPERS = ("\\boxed{", "\\text{", "\\textbf{", "\\textrm{", "\\mathrm{", "\\mathbf{")


def _closing_brace(text, open_at):
    """Index of the brace that closes the one at text[open_at], or -1."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _unwrap(text):
    """Strip wrappers that enclose the WHOLE answer: $…$, $$…$$, \\(…\\), \\[…\\], \\boxed{…}, \\text{…}, ...

    "$5$ or $6$" starts and ends with $, but its inside "5$ or $6" still fails to parse, so hedges stay hedges.
    """
    for _ in range(8):
        t = text.strip()
        if len(t) >= 4 and t.startswith("$$") and t.endswith("$$"):
            t = t[2:-2]
        elif len(t) >= 2 and t[0] == "$" and t[-1] == "$":
            t = t[1:-1]
        elif len(t) >= 4 and t.startswith(("\\(", "\\[")) and t.endswith(("\\)", "\\]")):
            t = t[2:-2]
        else:
            for wrapper in _LATEX_WRAPPERS:
                if t.startswith(wrapper) and t.endswith("}") and _closing_brace(t, len(wrapper) - 1) == len(t) - 1:
                    t = t[len(wrapper):-1]
                    break
            else:
                return t
        text = t
    return text.strip()


# ----------------------------------------------------------------------------------------------------------------
# The safe math parser: text -> tuple AST -> exact values (paper Table 1: math)
#
# AST nodes: ("number", Fraction) ("var", letter) ("pi",) ("neg", a) ("pct", a) ("root", n, a) and binary
# ("add"|"sub"|"mul"|"div"|"pow", a, b). Grammar, lowest precedence first:
#   expr    := term (('+' | '-') term)*
#   term    := unary (('*' | '/' | \times | \cdot | \div) unary | implicit)*     implicit: 2x, 2\pi, 3(4), 2\sqrt{3}
#   unary   := ('-' | '+') unary | power
#   power   := postfix [('^' | '**') (unary | \circ)]                            right-associative: 2^3^2 = 2^9
#   postfix := atom ['%']
#   atom    := number | letter | \pi | ( expr ) | { expr } | \frac{a}{b} | \sqrt[n]{a} | \text{…} | sqrt(a)

# Look-alikes with one unambiguous meaning; every other non-ASCII character makes the answer unreadable
# (fullwidth or Arabic-Indic digits, superscripts, Cyrillic letters, zero-width spaces, ±, ≤, ≈ ...).
_UNICODE_MATH = str.maketrans({
    "\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ",
    "\u03c0": "\\pi ", "\u221a": "\\sqrt ", "\u00b0": "^\\circ ", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})

_TOKEN = re.compile(r"""
    (?P<space> \s+ | \\[,;:!\ ] | ~ )
  | (?P<number> [1-9][0-9]{0,2}(?:,[0-9]{3})+(?![0-9])(?:\.[0-9]+)?         # 1,234,567.5
              | (?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? )          # 12  0.75  .5  1.5e-3
  | (?P<command> \\[a-zA-Z]+ | \\% )
  | (?P<word> [a-zA-Z]+ )
  | (?P<op> \*\* | [-+*/^(){}\[\]%=] )
""", re.ASCII | re.VERBOSE)

_COMMANDS = {  # LaTeX command -> token kind; anything else (\infty, \pm, \le, \approx, \input ...) is unreadable
    "\\frac": "frac", "\\dfrac": "frac", "\\tfrac": "frac", "\\cfrac": "frac", "\\sqrt": "sqrt", "\\pi": "pi",
    "\\times": "*", "\\cdot": "*", "\\ast": "*", "\\div": "/", "\\%": "%", "\\circ": "circ",
    "\\left": None, "\\right": None, "\\displaystyle": None,  # None: dropped (\left( is just '(')
    "\\text": "wrap", "\\textbf": "wrap", "\\textrm": "wrap", "\\mathrm": "wrap", "\\mathbf": "wrap",
    "\\boxed": "wrap",
}
_WORDS = {"pi": "pi", "sqrt": "sqrt"}  # plain-text spellings; other words ("or", "between") are unreadable
_ATOM_STARTS = frozenset({"number", "var", "pi", "(", "{", "frac", "sqrt", "wrap"})
_IMPLICIT_STARTS = _ATOM_STARTS - {"number"}  # "3 4" is two answers, not 12
_CLOSING = {"(": ")", "{": "}", "[": "]"}


def _literal(text):
    """Exact value of a number token; bounded so that 1e999999999 is refused instead of computed."""
    mantissa, _, exponent = text.replace(",", "").lower().partition("e")
    value = Fraction(mantissa)
    if exponent:
        e = int(exponent)
        if abs(e) > MAX_LITERAL_EXPONENT:
            raise _Unreadable("exponent too large")
        value *= Fraction(10) ** e
    return _fit(value)


def _tokenize(text):
    if not text.isascii():
        text = text.translate(_UNICODE_MATH)
        if not text.isascii():
            raise _Unreadable("non-ASCII character")
    text = text.replace("{,}", "")  # LaTeX thousands separator 1{,}000
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Unreadable(f"unexpected {text[pos]!r}")
        pos, kind, value = m.end(), m.lastgroup, m.group()
        if kind == "space":
            continue
        if kind == "number":
            tokens.append(("number", _literal(value)))
        elif kind == "command":
            if value not in _COMMANDS:
                raise _Unreadable(f"unsupported command {value}")
            if _COMMANDS[value] is not None:
                tokens.append((_COMMANDS[value], value))
        elif kind == "word":
            if len(value) == 1:
                tokens.append(("var", value))
            elif value.lower() in _WORDS:
                tokens.append((_WORDS[value.lower()], value))
            else:
                raise _Unreadable(f"word {value!r}")
        else:
            tokens.append(("^" if value == "**" else value, value))
        if len(tokens) > MAX_TOKENS:
            raise _Unreadable("too many tokens")
    return tokens


class _MathParser:
    """Recursive descent over the token list (grammar above). Raises _Unreadable; never evaluates anything."""

    def __init__(self, tokens):
        self.tokens, self.pos, self.depth = tokens, 0, 0
        self.variables = set()

    def peek(self):
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def take(self, kind=None):
        if self.pos >= len(self.tokens) or (kind is not None and self.tokens[self.pos][0] != kind):
            raise _Unreadable(f"expected {kind or 'more'}")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Unreadable("nested too deeply")

    def expr(self):
        self.enter()
        node = self.term()
        while self.peek() in ("+", "-"):
            node = ("add" if self.take()[0] == "+" else "sub", node, self.term())
        self.depth -= 1
        return node

    def term(self):
        node = self.unary()
        while True:
            kind = self.peek()
            if kind in ("*", "/"):
                self.take()
                node = ("mul" if kind == "*" else "div", node, self.unary())
            elif kind in _IMPLICIT_STARTS:
                if kind == "frac" and node[0] == "number":
                    raise _Unreadable("2\\frac{1}{2}: mixed number or product?")
                node = ("mul", node, self.power())
            else:
                return node

    def unary(self):
        kind = self.peek()
        if kind not in ("-", "+"):
            return self.power()
        self.take()
        self.enter()  # "----5" nests like "-(-(-(-5)))"
        node = self.unary()
        self.depth -= 1
        return ("neg", node) if kind == "-" else node

    def power(self):
        node = self.atom()
        if self.peek() == "%":
            self.take()
            node = ("pct", node)
        if self.peek() == "^":
            self.take()
            kinds = [t[0] for t in self.tokens[self.pos:self.pos + 3]]
            if kinds[:1] == ["circ"] or kinds == ["{", "circ", "}"]:  # 30^\circ: degrees are a unit, not a power
                self.pos += 1 if kinds[0] == "circ" else 3
            else:
                self.enter()  # 9^9^9^9 nests to the right
                node = ("pow", node, self.unary())
                self.depth -= 1
        return node

    def group(self):
        """A braced argument: {expr}, or one character as in \\frac12 (LaTeX reads one digit or letter)."""
        kind = self.peek()
        if kind == "{":
            self.take()
            node = self.expr()
            self.take("}")
            return node
        if kind == "number":
            token = self.tokens[self.pos][1]
            if token.denominator == 1 and token >= 10:  # \frac12 -> 1 and 2: split off the first digit
                digits = str(token.numerator)
                self.tokens[self.pos] = ("number", Fraction(digits[1:]))
                return ("number", Fraction(digits[0]))
        if kind in ("number", "var", "pi"):
            return self.atom()
        raise _Unreadable("expected an argument")

    def atom(self):
        kind, value = self.take()
        if kind == "number":
            return ("number", value)
        if kind == "var":
            self.variables.add(value)
            return ("var", value)
        if kind == "pi":
            return ("pi",)
        if kind in ("(", "{"):
            node = self.expr()
            self.take(_CLOSING[kind])
            return node
        if kind == "frac":
            return ("div", self.group(), self.group())
        if kind == "sqrt":
            index = ("number", Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            if self.peek() == "(":  # sqrt(2), \sqrt(2)
                return ("root", index, self.atom())
            if self.peek() == "number":  # √12 means √(12), not √(1)·2
                return ("root", index, self.atom())
            return ("root", index, self.group())
        if kind == "wrap":  # \text{…}: a group like any other; "\text{ or }" still fails inside
            self.take("{")
            node = self.expr()
            self.take("}")
            return node
        raise _Unreadable(f"unexpected {value!r}")


def parse_math(text):
    """Parse an answer into (AST, variables). Raises _Unreadable (a ValueError) on anything outside the grammar.

    A leading "x =" is dropped ("x = 5" grades as 5); any other '=' is unreadable.
    """
    tokens = _tokenize(_unwrap(text))
    if len(tokens) > 2 and tokens[0][0] == "var" and tokens[1][0] == "=":
        tokens = tokens[2:]
    parser = _MathParser(tokens)
    node = parser.expr()
    if parser.pos != len(tokens):
        raise _Unreadable(f"unexpected {tokens[parser.pos][1]!r}")
    return node, frozenset(parser.variables)


def _fit(x):
    """Refuse exact values too large to keep computing with, and non-finite floats."""
    if isinstance(x, Fraction):
        if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
            raise _Unreadable("number too large")
    elif not math.isfinite(x):
        raise _Unreadable("not finite")
    return x


def _log(x):
    """Natural log of a positive Fraction or float; math.log takes arbitrarily large ints, so no overflow."""
    if isinstance(x, Fraction):
        return math.log(x.numerator) - math.log(x.denominator)
    return math.log(x)


def _integer_root(n, k):
    """The exact k-th root of the int n ≥ 0, or None."""
    if n < 2:
        return n
    guess = round(math.exp(math.log(n) / k))
    for r in (guess - 1, guess, guess + 1):
        if r >= 0 and r ** k == n:
            return r
    return None


def _float_power(base, exponent):
    """base ** exponent in floats through logarithms, refusing complex results, overflow and underflow."""
    if base == 0:
        if exponent > 0:
            return 0.0
        raise _Unreadable("0 to a non-positive power")
    sign = 1.0
    if base < 0:
        # A negative base needs an integer exponent or an odd root: (-8)^{1/3} = -2.
        if not (isinstance(exponent, Fraction) and exponent.denominator % 2 == 1):
            raise _Unreadable("not a real number")
        sign = -1.0 if exponent.numerator % 2 else 1.0
        base = -base
    log_magnitude = float(exponent) * _log(base)
    if not -700.0 < log_magnitude < 700.0:  # beyond float range either way: 9**9**9**9 ends here
        raise _Unreadable("power out of range")
    return sign * math.exp(log_magnitude)


def _power(base, exponent):
    if isinstance(base, Fraction) and isinstance(exponent, Fraction):
        p, q = exponent.numerator, exponent.denominator
        if q == 1:
            if base == 0 and p <= 0:
                raise _Unreadable("0 to a non-positive power")
            if base in (0, 1) or p == 0:
                return Fraction(1) if p == 0 else base
            if base == -1:
                return Fraction(-1) if p % 2 else Fraction(1)
            size = max(base.numerator.bit_length(), base.denominator.bit_length())
            if size * abs(p) <= MAX_BITS:
                return base ** p
        elif q <= MAX_ROOT and (base >= 0 or q % 2 == 1):  # exact when base is a perfect q-th power: 8^{2/3} = 4
            num = _integer_root(abs(base.numerator), q)
            den = _integer_root(base.denominator, q)
            if num is not None and den is not None:
                return _power(Fraction(num if base >= 0 else -num, den), Fraction(p))
    return _float_power(base, exponent)


def _evaluate(node, env):
    """Exact value (Fraction) of an AST, or a float once an irrational (√2, π) is involved. Raises _Unreadable."""
    kind = node[0]
    if kind == "number":
        return node[1]
    if kind == "var":
        return env[node[1]]
    if kind == "pi":
        return math.pi
    if kind == "neg":
        return -_evaluate(node[1], env)
    if kind == "pct":
        return _evaluate(node[1], env) / 100
    if kind == "root":
        index = _evaluate(node[1], env)
        if not (isinstance(index, Fraction) and index.denominator == 1 and 2 <= index <= MAX_ROOT):
            raise _Unreadable("root index must be an integer 2..64")
        return _fit(_power(_evaluate(node[2], env), 1 / index))
    a, b = _evaluate(node[1], env), _evaluate(node[2], env)
    if kind == "add":
        return _fit(a + b)
    if kind == "sub":
        return _fit(a - b)
    if kind == "mul":
        return _fit(a * b)
    if kind == "div":
        if b == 0:
            raise _Unreadable("division by zero")
        return _fit(a / b)
    if kind == "pow":
        return _fit(_power(a, b))
    raise AssertionError(f"unknown node {kind}")


# Letters are compared at three fixed random rational points: two different polynomials of small degree agree
# at all three with negligible probability (Schwartz–Zippel), and no simplify() is ever needed.
_rng = random.Random(20250701)
_VARIABLE_POINTS = tuple(
    {c: Fraction(_rng.randint(11, 97), _rng.randint(2, 13)) for c in string.ascii_letters} for _ in range(3))


@lru_cache(maxsize=1 << 13)
def math_readings(text):
    """The ways an answer can be read, each a tuple of values (one per variable point), or None if unreadable.

    One reading, except for a trailing percent sign: "50%" is read as 0.5 and as 50 (a "what percentage" truth is
    often stored without its %). Cached: a GRPO group shares its truth, and rollouts often repeat an answer.
    """
    try:
        node, variables = parse_math(text)
        nodes = (node, node[1]) if node[0] == "pct" else (node,)
        envs = _VARIABLE_POINTS if variables else (None,)
        return tuple(tuple(_evaluate(n, env) for env in envs) for n in nodes)
    except _EXPECTED_ERRORS:
        return None


def _close(a, b, rel_tol):
    """|a − b| ≤ rel_tol · max(|a|, |b|): exact for two Fractions, in floats otherwise."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or abs(a - b) <= rel_tol * max(abs(a), abs(b))
    try:
        a, b = float(a), float(b)
    except OverflowError:
        return False
    return abs(a - b) <= float(rel_tol) * max(abs(a), abs(b))


def _same_reading(pred, truth, rel_tol):
    if len(pred) != len(truth):  # one side has letters, the other has not: compare the constant at every point
        pred, truth = (pred * 3)[:3], (truth * 3)[:3]
    return all(_close(p, t, rel_tol) for p, t in zip(pred, truth))


def to_sympy(node):
    """The SymPy expression of a parsed AST, built unevaluated so that nothing large is ever computed."""
    import sympy  # lazily: only the CLI and the tests need it, and importing it costs ~0.5 s

    kind = node[0]
    if kind == "number":
        return sympy.Rational(node[1].numerator, node[1].denominator)
    if kind == "var":
        return sympy.Symbol(node[1])
    if kind == "pi":
        return sympy.pi
    if kind == "neg":
        return sympy.Mul(-1, to_sympy(node[1]), evaluate=False)
    if kind == "pct":
        return sympy.Mul(to_sympy(node[1]), sympy.Rational(1, 100), evaluate=False)
    a, b = to_sympy(node[1]), to_sympy(node[2])
    if kind == "root":  # ("root", index, radicand)
        return sympy.Pow(b, sympy.Pow(a, -1, evaluate=False), evaluate=False)
    if kind == "add":
        return sympy.Add(a, b, evaluate=False)
    if kind == "sub":
        return sympy.Add(a, sympy.Mul(-1, b, evaluate=False), evaluate=False)
    if kind == "mul":
        return sympy.Mul(a, b, evaluate=False)
    if kind == "div":
        return sympy.Mul(a, sympy.Pow(b, -1, evaluate=False), evaluate=False)
    return sympy.Pow(a, b, evaluate=False)


# ----------------------------------------------------------------------------------------------------------------
# Readers of the other answer forms (each returns None for anything it cannot read)

def _integer(text):
    """A plain integer literal ("7", "+7", "7.0", "$7$"), not an expression: counting is exact (paper Table 1)."""
    try:
        node, _ = parse_math(text)
    except _EXPECTED_ERRORS:
        return None
    sign = 1
    while node[0] == "neg":
        sign, node = -sign, node[1]
    if node[0] == "number" and node[1].denominator == 1:
        return sign * node[1].numerator
    return None


def _number_readings(text):
    """Readings of a chart value: like math, but letters are unreadable."""
    readings = math_readings(text)
    if readings is None or any(len(r) != 1 for r in readings):
        return None
    return tuple(r[0] for r in readings)


_CHOICE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?", re.ASCII)


def _choice_letter(text):
    """Exactly one option letter, optionally as (B), [B], B., B: or $B$/\\text{B}; "ABCD" or "A or B" is None."""
    m = _CHOICE.fullmatch(_unwrap(text))
    return m.group(1).upper() if m else None


def _ocr_text(text):
    """OCR strings compare after Unicode NFC (same glyphs, same code points) and whitespace collapsing."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def edit_distance(a, b):
    """Levenshtein distance by the bit-parallel algorithm (Myers 1999 as formulated by Hyyrö 2001).

    Each character of the longer string costs a handful of big-int operations over the shorter one, so two 4096-
    character strings take a few ms in pure Python instead of the ~5 s of the textbook O(n·m) table.
    """
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    match = {}  # character -> bit mask of its positions in b
    for i, c in enumerate(b):
        match[c] = match.get(c, 0) | (1 << i)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    plus, minus, distance = mask, 0, m  # vertical +1 / −1 deltas of the DP column
    for c in a:
        eq = match.get(c, 0)
        xv = eq | minus
        xh = ((((eq & plus) + plus) & mask) ^ plus) | eq
        hplus = (minus | ~(xh | plus)) & mask
        hminus = plus & xh
        if hplus & top:
            distance += 1
        elif hminus & top:
            distance -= 1
        hplus = ((hplus << 1) | 1) & mask
        hminus = (hminus << 1) & mask
        plus = (hminus | ~(xv | hplus)) & mask
        minus = hplus & xv
    return distance


_BOX_CHARACTERS = re.compile(r"[0-9.,\[\]()\s-]*", re.ASCII)
_NUMBER = r"-?[0-9]+(?:\.[0-9]+)?"
_FOUR = r"\s*({0})\s*,\s*({0})\s*,\s*({0})\s*,\s*({0})\s*".format(_NUMBER)
_BOX = re.compile(rf"\[{_FOUR}\]|\({_FOUR}\)", re.ASCII)
_BOX_LIST = re.compile(r"#(?:,?#)*|\[#(?:,?#)*\]")  # after boxes became '#' and whitespace was removed


def _valid_box(values):
    """A box (x1, y1, x2, y2) of floats with 0 ≤ x1 < x2 ≤ 1000 and 0 ≤ y1 < y2 ≤ 1000, or None."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except OverflowError:  # JSON ints have no size limit
        return None
    if not (0 <= x1 < x2 <= COORD_MAX and 0 <= y1 < y2 <= COORD_MAX):  # also refuses NaN
        return None
    return (x1, y1, x2, y2)


def parse_boxes(text):
    """Boxes written as [x1,y1,x2,y2], (x1,y1,x2,y2), "[b1, b2]" or "b1, b2"; None if anything else is there."""
    if not _BOX_CHARACTERS.fullmatch(text):
        return None
    boxes = []

    def take(m):
        boxes.append(_valid_box([float(g) for g in m.groups() if g is not None]))
        return "#"

    rest = "".join(_BOX.sub(take, text).split())
    if not boxes or len(boxes) > MAX_BOXES or None in boxes or not _BOX_LIST.fullmatch(rest):
        return None
    return boxes


def _iou(a, b):
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _max_matching(candidates, n_right):
    """Size of a maximum one-to-one matching; candidates[i] lists the right nodes left node i may take (Kuhn)."""
    owner = [-1] * n_right

    def augment(i, seen):
        for j in candidates[i]:
            if not seen[j]:
                seen[j] = True
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, [False] * n_right) for i in range(len(candidates)))


def _reject_constant(name):
    raise _Unreadable(f"{name} is not a number")


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Unreadable("duplicate key")
    return dict(pairs)


def parse_gui(text):
    """A GUI action {"action": str, "box": [x1,y1,x2,y2] | "text": str, ...} from strict JSON, or None."""
    try:
        action = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _EXPECTED_ERRORS:  # json.JSONDecodeError is a ValueError; deep nesting is a RecursionError
        return None
    if not isinstance(action, dict) or not isinstance(action.get("action"), str):
        return None
    if "box" in action:
        action["box"] = _valid_box(action["box"])
        if action["box"] is None:
            return None
    if "text" in action and not isinstance(action["text"], str):
        return None
    return action


_SECONDS = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)\s*s?"
_SEGMENT = re.compile(rf"\s*[\[(]\s*{_SECONDS}\s*,\s*{_SECONDS}\s*[\])]\s*", re.ASCII)


def parse_segment(text):
    """A video segment "[start, end]" in seconds (an "s" after each number is allowed), or None."""
    m = _SEGMENT.fullmatch(text)
    if m is None:
        return None
    start, end = float(m.group(1)), float(m.group(2))
    return (start, end) if 0 <= start < end <= MAX_SECONDS else None


# ----------------------------------------------------------------------------------------------------------------
# The verifiers (paper Table 1). Each takes the box content and the parsed truth and returns a float in [0, 1].

def verify_math(pred, truth):
    readings = math_readings(pred)
    if readings is None:
        return 0.0
    return float(any(_same_reading(p, t, MATH_REL_TOL) for p in readings for t in truth))


def verify_choice(pred, truth):
    return float(_choice_letter(pred) == truth)


def verify_ocr(pred, truth):
    pred = _ocr_text(pred)
    longest = max(len(pred), len(truth))
    return 1.0 if longest == 0 else (longest - edit_distance(pred, truth)) / longest  # = 1 − d / max length


def verify_counting(pred, truth):
    return float(_integer(pred) == truth)


def verify_chart(pred, truth):
    readings = _number_readings(pred)
    if readings is None:
        return 0.0
    for t in truth:
        is_year = isinstance(t, Fraction) and t.denominator == 1 and YEARS[0] <= t <= YEARS[1]
        if any(p == t if is_year else _close(p, t, CHART_REL_TOL) for p in readings):
            return 1.0
    return 0.0


def verify_grounding(pred, truth):
    boxes = parse_boxes(pred)
    if boxes is None:
        return 0.0
    candidates = [[j for j, b in enumerate(boxes) if _iou(t, b) >= IOU_THRESHOLD] for t in truth]
    # Divide by the larger count: 1 truth box and 20 guesses earn at most 1/20 (no box spraying).
    return _max_matching(candidates, len(boxes)) / max(len(truth), len(boxes))


def verify_gui(pred, truth):
    action = parse_gui(pred)
    if action is None or action["action"].strip().lower() != truth["action"].strip().lower():
        return 0.0
    for key, want in truth.items():
        got = action.get(key)
        if key == "action":
            continue
        if key == "box":
            ok = got is not None and _iou(got, want) >= IOU_THRESHOLD
        elif key == "text":
            ok = isinstance(got, str) and " ".join(got.split()) == " ".join(want.split())
        else:  # any other argument (e.g. a scroll direction) must be equal
            ok = got == want
        if not ok:
            return 0.0
    return 1.0


def verify_video_grounding(pred, truth):
    segment = parse_segment(pred)
    if segment is None:
        return 0.0
    inter = max(0.0, min(segment[1], truth[1]) - max(segment[0], truth[0]))
    iou = inter / ((segment[1] - segment[0]) + (truth[1] - truth[0]) - inter)
    return iou if iou >= IOU_THRESHOLD else 0.0


VERIFIERS = {
    "math": (verify_math, math_readings),
    "choice": (verify_choice, _choice_letter),
    "ocr": (verify_ocr, _ocr_text),
    "counting": (verify_counting, _integer),
    "chart": (verify_chart, _number_readings),
    "grounding": (verify_grounding, parse_boxes),
    "gui": (verify_gui, parse_gui),
    "video_grounding": (verify_video_grounding, parse_segment),
}  # task -> (verifier, reader of the ground truth); add_verifier adds users' tasks beside these
BUILTIN_TASKS = tuple(VERIFIERS)


def _truth_as_text(answer_text):
    return answer_text  # a user verifier reads its ground truth itself


def _bounded(fn):
    """A user verifier whose result is a float clamped to [0, 1] (NaN: 0); raising or returning no number is left
    to score(), which scores 0 with a warning."""
    def verify(pred, truth):
        value = float(fn(pred, truth))
        return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0
    return verify


def add_verifier(task, fn):
    """Add the task `task`, scored by a user function fn(box_content: str, answer: str) -> float in [0, 1].

    box_content is what the built-in verifiers get too: the box of a reply that passed the strict format check
    (`extract_answer`; a malformed reply scores 0 without calling fn), at most MAX_BOX_CHARS long. answer is the
    ground truth as text: a string as the dataset stores it, lists, dicts and numbers as JSON. Built-in tasks cannot
    be replaced; adding the same name again replaces the earlier user function."""
    if not isinstance(task, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", task):
        raise ValueError(f"a verifier's task name is letters, digits, '_', '.' or '-', got {task!r}")
    if task in BUILTIN_TASKS:
        raise ValueError(f"{task} is a built-in verifier; give your verifier another task name")
    if not callable(fn):
        raise ValueError(f"the verifier of {task} is not callable: {fn!r:.80}")
    VERIFIERS[task] = (_bounded(fn), _truth_as_text)


def add_verifiers(specs):
    """--verifier NAME=module:function[,NAME=module:function…] of rlcs.py and evaluate.py: add_verifier for each
    (the module is imported from the current directory or sys.path). Returns the task names added."""
    added = []
    for spec in (s.strip() for s in (specs or "").split(",")):
        if not spec:
            continue
        task, sep, target = spec.partition("=")
        if not sep or ":" not in target:
            raise ValueError(f"--verifier expects NAME=module:function, got {spec!r}")
        add_verifier(task.strip(), data.import_callable(target.strip()))
        added.append(task.strip())
    return added


def _answer_text(answer):
    """The ground truth as text: strings as they are, lists/dicts/numbers as JSON, anything else via str()."""
    if isinstance(answer, str):
        return answer
    try:
        return json.dumps(answer)
    except (TypeError, ValueError):
        return str(answer)


@lru_cache(maxsize=1 << 16)
def parse_truth(task, answer_text):
    """The parsed ground truth (cached: every rollout of a group shares it), or None with a warning."""
    try:
        truth = VERIFIERS[task][1](answer_text)
    except _EXPECTED_ERRORS:
        truth = None
    if truth is None:
        warnings.warn(f"rewards: unreadable {task} ground truth {answer_text[:80]!r}; it scores 0", stacklevel=3)
    return truth


def score(task, response, answer, lenient=False):
    """Reward of one reply: a float in [0, 1]. Never raises on any response or answer.

    task: a key of VERIFIERS, built in or added by add_verifier (anything else is a programming error and raises
    ValueError, so that a typo cannot silently zero the rewards of a whole run). response: the decoded reply with
    special tokens kept as strings. answer: the ground truth as the dataset stores it (string, or the equivalent
    number/list/dict). lenient=True adds the deliberately hackable verifier of paper §5 (see `lenient_score`); only
    for reproducing the collapse.
    """
    if not isinstance(task, str) or task not in VERIFIERS:
        raise ValueError(f"rewards.score: unknown task {task!r}; expected one of {', '.join(VERIFIERS)}")
    try:
        value = 0.0
        pred = extract_answer(response)
        if pred is not None and len(pred) <= (MAX_OCR_CHARS if task == "ocr" else MAX_BOX_CHARS):
            truth = parse_truth(task, _answer_text(answer))
            if truth is not None:
                value = VERIFIERS[task][0](pred, truth)
        if lenient and value < 1.0:
            value = max(value, lenient_score(task, response, answer))
        return value
    except Exception as e:  # a safety net for bugs here or in a user's verifier: RL must not die on one reply
        warnings.warn(f"rewards: {task} verifier failed with {e!r}; scoring 0")
        return 0.0


# ----------------------------------------------------------------------------------------------------------------
# THE BAD EXAMPLE: a lenient verifier (paper §5, "a weak verifier collapses training"). Do not train with it.

_ANY_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def lenient_score(task, response, answer):
    """Deliberately hackable, for the collapse experiment only. It skips the format check and rewards 1 if the
    truth appears anywhere in the reply's end ("3 or 4", "ABCD", a list of boxes) or two consecutive numbers there
    bracket it ("between 0 and 10"). The policy learns to hedge instead of to answer."""
    tail = response[-2000:] if isinstance(response, str) else ""
    truth = _answer_text(answer).strip()
    if truth and truth in tail:
        return 1.0
    try:
        t = float(truth)
    except ValueError:
        return 0.0
    numbers = [float(x) for x in _ANY_NUMBER.findall(tail)]
    return float(any(min(a, b) <= t <= max(a, b) for a, b in zip(numbers, numbers[1:])))


# ----------------------------------------------------------------------------------------------------------------
# Command line: a debugging aid that shows how a reply is read

def describe(task, text):
    """How a verifier reads `text` (box content or ground truth), for humans."""
    if text is None:
        return "-"
    if task in ("math", "chart", "counting"):
        try:
            node, _ = parse_math(text)
        except _EXPECTED_ERRORS as e:
            return f"unreadable ({e})"
        readings = math_readings(text)
        values = "unreadable value" if readings is None else " or ".join(
            ", ".join(f"{float(v):.10g}" for v in r) for r in readings)
        return f"{to_sympy(node)}  = {values}"
    truth = VERIFIERS[task][1](text)
    return "unreadable" if truth is None else repr(truth)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Score one model reply and show how the verifier read it.")
    ap.add_argument("response", nargs="?",
                    help="the model reply, <think>…</think><answer>…</answer>; read from stdin when omitted")
    ap.add_argument("--task", required=True, choices=list(VERIFIERS), help="which verifier to use")
    ap.add_argument("--answer", required=True, help="the ground truth as the dataset stores it, e.g. 1/2 or [1,2,3,4]")
    ap.add_argument("--lenient", action="store_true", help="use the deliberately hackable verifier (the bad example)")
    args = ap.parse_args(argv)
    response = sys.stdin.read() if args.response is None else args.response
    content, problem = data.parse_reply(response)
    print(f"extracted: {content!r}" if problem is None else f"extracted: none, malformed reply: {problem}")
    if content is not None:
        print(f"parse:     {describe(args.task, content)}")
    print(f"truth:     {describe(args.task, args.answer)}")
    print(f"score:     {score(args.task, response, args.answer, lenient=args.lenient)}")


if __name__ == "__main__":
    main()
