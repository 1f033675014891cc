"""rewards.py — the reward system of RL: one strict verifier per task domain (paper §5, Table 1).

GLM-4.1V-Thinking learns in RL only from verifiable rewards, and the paper's strongest warning is that one weak
verifier lets the policy hack its reward ("a number between 0 and 10") and drags every domain down (§5).
So `score(task, response, answer) -> float in [0, 1]` is strict everywhere and never raises on model output.

Design (the algorithmic choices, top to bottom):
* Format, checked in one place (`data.parse_reply`): the reply is `<think>…</think><answer>…</answer>` with exactly one
  `<|begin_of_box|>X<|end_of_box|>` inside the answer, optionally followed by one end-of-turn token. Only X is
  graded; anything malformed scores 0. Format is learned in SFT and not rewarded in RL (paper §5).
* Verifiers, as in paper Table 1: math — value equality, relative tolerance 1e-6; choice — exactly one letter;
  ocr — 1 − edit distance / max length (exact while n·m ≤ 2^24, else an upper bound of the distance from anchored
  pieces, so a 64k-character transcription costs milliseconds and is never overpaid); counting — exact integer;
  chart — relative tolerance 2.5e-2, but integers 1000–3000 are years and must match exactly; grounding — fraction
  of truth boxes matched one-to-one with IoU ≥ 0.5, divided by max(#truth, #predicted) so spraying boxes does not
  pay; gui — the action type must match, then box IoU ≥ 0.5 (or a clicked point inside the truth box, or within
  20 of a truth point) / text equality, in JSON or in GLM-4.1V's own action formats; video_grounding — temporal
  IoU, 0 below 0.5 (the video's length is unknown, so this threshold is what makes a whole-video segment
  worthless, as IoU ≥ 0.5 does for a whole-image box); vqa — the VQA evaluation's normalised exact match against
  any of a JSON list of answers, numbers by value; physics / chemistry — same dimensions and the number within
  1e-2 after both sides are converted to SI (1500 m = 1.5 km; a missing unit scores 0); multi_image — the
  verifier of the sub-task named in the truth. A math, chart or physics truth that cannot be read is compared as
  normalised text, so an identical reply still scores 1.
* Model text never reaches eval, exec, sympify or parse_expr. Math goes through a small recursive-descent parser of
  our own (ASCII tokens only, ≤ MAX_TOKENS tokens, nesting ≤ MAX_DEPTH) into a tuple AST; `to_sympy` turns that
  AST into SymPy objects (for the CLI and the tests), while equality is decided by exact rational arithmetic
  (fractions.Fraction) wherever the value is rational — k-th roots by integer Newton, log_b x when x is a power of
  b — and every intermediate is capped at MAX_BITS bits, so `9**9**9**9` or `10^{10^{10}}` is rejected in
  microseconds. Irrational values (π, e, √2, sin, ln) are floats that carry a bound on their error, and floats
  decide a comparison only when the bounds make it certain; the rest (sin π vs 0, but also ln(10^{20}+1) −
  ln(10^{20}) = 10^{-20} vs 0) is re-evaluated from the AST in rigorous mpmath intervals at 200 bits, where
  residue of a true 0 stays below ~10^{-41} and a value that cancelled in floats is resolved. That is ~30× faster
  than SymPy on the hot path.
  Expressions with letters are compared at three fixed random rational points (Schwartz–Zippel) instead of
  calling simplify(); e is Euler's number unless the truth uses it as a variable (a + b + e).
* Answers may be tuples and intervals (compared element-wise, brackets must match), sets and bare lists (as
  multisets), unions of intervals, ± pairs, and inequalities (x > 3 equals 3 < x, x ≥ 2 is not x > 2).
* Hedges earn nothing: words ("or", "between") do not parse, and a list, a ± pair, an interval or an inequality is
  never equal to a single value; a number right before \\frac (2\\frac{1}{2}, −2\\frac{1}{2}) is unreadable. A
  trailing % may be read either as the fraction (50% = 0.5) or as the percentage (50), never more; a degree sign as
  degrees or radians (30° = 30 or π/6).
* `model_verifier` is the other half of the reward system (RLHF, paper §5.2): a reward model trained by reward.py
  scores the answer part of replies to prompts no rule can check; rlcs.py uses it only where asked (--reward-model).
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
MATH_ABS_FLOOR = 1e-9                    # an inexact value's error bound may be this large near 0 (sin π = 0) ...
PRECISE_BITS = 200                       # ... unless mpmath intervals at this precision decide (see _close)
PRECISE_AGREEMENT = 2.0 ** -136          # intervals that still overlap count as equal if this close (~1e-41)
PRECISE_NODES = 256                      # AST nodes (or ¼ comparisons) re-evaluated per score (sin: ~60 µs)
UNITS_REL_TOL = Fraction(1, 100)         # physics/chemistry numbers, after conversion to SI units (see verify_units)
GUI_POINT_RADIUS = 20                    # a clicked point this close to a truth point hits it (GLM-V's OSWorld judge)

# Limits that keep hostile output cheap: everything is bounded before any work that grows with it.
MAX_RESPONSE_CHARS = 1 << 22             # 4 Mi characters (a 64k-token reply is far shorter); scanned in C anyway
MAX_BOX_CHARS = 2048                     # box content of every task but OCR (room for MAX_BOXES boxes)
MAX_OCR_CHARS = 1 << 16                  # OCR box content; exact edit distance only up to OCR_EXACT_CELLS
OCR_EXACT_CELLS = 1 << 24                # n·m of the exact bit-parallel edit distance (~15 ms); beyond, a bound
MAX_TOKENS = 256                         # math tokens
MAX_DEPTH = 32                           # math nesting: parentheses, braces, exponents, unary signs
MAX_BITS = 16384                         # numerator/denominator size of every exact intermediate (~4,900 digits)
MAX_LITERAL_EXPONENT = 1000              # 1e±1000 at most in scientific notation
MAX_ROOT = 64                            # \sqrt[n]{…} and x^{p/q}: n, q ≤ 64 for the exact path
MAX_BOXES = 100                          # predicted boxes in one answer
MAX_ITEMS = 32                           # elements of a tuple, set or list in a math answer

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
# Scalar AST nodes: ("number", Fraction) ("var", letter) ("pi",) ("e",) ("inf",) ("neg", a) ("pct", a) ("deg", a)
# ("root", n, a) ("func", name, a) ("log", base, a) and binary ("add"|"sub"|"mul"|"div"|"pow", a, b) and
# ("pm"|"mp", a, b) for a ± b, a ∓ b. Whole answers may also be ("tuple", open, close, items) — tuples and
# intervals, brackets kept — ("set", items) for \{…\} and bare lists, ("union", items) and ("rel", ops, sides).
# Grammar, lowest precedence first:
#   answer  := [letter ('=' | \in)] (item (',' item)* | expr (relop expr)+)     "x = 5", "x \in [1, 2)", "x > 3"
#   item    := expr (\cup expr)*
#   expr    := term (('+' | '-' | \pm | \mp) term)*
#   term    := unary (('*' | '/' | \times | \cdot | \div) unary | implicit)*     implicit: 2x, 2\pi, 3(4), 2\sin x
#   unary   := ('-' | '+' | \pm | \mp) unary | power
#   power   := postfix [('^' | '**') (unary | \circ)]                            right-associative: 2^3^2 = 2^9
#   postfix := atom ['%']
#   atom    := number | letter | \pi | e | \infty | ( expr ) | { expr } | \frac{a}{b} | \sqrt[n]{a} | \text{…}
#            | sqrt(a) | function [^k] argument | \log_b argument | (a, b, …) | [a, b) | \{a, b, …\}
# A function's argument is (…), {…} or an implicit product: \sin 2x = sin(2x), \sin x \cos x = sin(x)·cos(x).

# Look-alikes with one unambiguous meaning; every other non-ASCII character makes the answer unreadable
# (fullwidth or Arabic-Indic digits, superscripts, Cyrillic letters, zero-width spaces, ≈ ...).
_UNICODE_MATH = str.maketrans({
    "\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ", "\u22c5": "\\cdot ",
    "\u03c0": "\\pi ", "\u221a": "\\sqrt ", "\u00b0": "^\\circ ", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    "\u00b1": "\\pm ", "\u2213": "\\mp ", "\u2264": "\\le ", "\u2265": "\\ge ", "\u221e": "\\infty ",
    "\u222a": "\\cup ", "\u2208": "\\in ",
})
# ½ ⅓ ¾ ...: alone a fraction; right after digits a mixed number (2½ = 5/2), which only they write unambiguously.
_VULGAR_FRACTION = re.compile("(?<![0-9.,])([0-9]*)([\u00bc-\u00be\u2150-\u215e])")

_TOKEN = re.compile(r"""
    (?P<number> [1-9][0-9]{0,2}(?P<sep>,|\{,\}|\\,)[0-9]{3}(?:(?P=sep)[0-9]{3})*(?![0-9])(?:\.[0-9]+)?
              | (?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? )   # 1,234,567.5  1{,}000  1\,000  .5  1.5e-3
  | (?P<space> \s+ | \\[,;:!\ ] | ~ )
  | (?P<command> \\[a-zA-Z]+ | \\[%{}] )
  | (?P<word> [a-zA-Z]+ )
  | (?P<op> \*\* | <= | >= | [-+*/^(){}\[\]%=,<>_] )
""", re.ASCII | re.VERBOSE)

_FUNCTIONS = ("sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "ln", "log", "lg", "exp")
_TRIG = frozenset({"sin", "cos", "tan", "cot", "sec", "csc"})  # their arguments read 30^\circ as π/6
_COMMANDS = {  # LaTeX command -> token kind; anything else (\approx, \neq, \mathbb, \input ...) is unreadable
    "\\frac": "frac", "\\dfrac": "frac", "\\tfrac": "frac", "\\cfrac": "frac", "\\sqrt": "sqrt", "\\pi": "pi",
    "\\times": "*", "\\cdot": "*", "\\ast": "*", "\\div": "/", "\\%": "%", "\\circ": "circ",
    "\\left": None, "\\right": None, "\\displaystyle": None,  # None: dropped (\left( is just '(')
    "\\text": "wrap", "\\textbf": "wrap", "\\textrm": "wrap", "\\mathrm": "wrap", "\\mathbf": "wrap",
    "\\boxed": "wrap", "\\pm": "pm", "\\mp": "mp", "\\infty": "inf", "\\cup": "cup", "\\in": "in",
    "\\{": "{{", "\\}": "}}", "\\lbrace": "{{", "\\rbrace": "}}", "\\lt": "<", "\\gt": ">",
    "\\le": "<=", "\\leq": "<=", "\\leqslant": "<=", "\\ge": ">=", "\\geq": ">=", "\\geqslant": ">=",
    **{"\\" + name: "func" for name in _FUNCTIONS},
}
_WORDS = {"pi": "pi", "sqrt": "sqrt", **{name: "func" for name in _FUNCTIONS}}  # plain-text spellings; other words
_RELATIONS = frozenset({"<", "<=", ">", ">="})                                  # ("or", "between") are unreadable
_IMPLICIT_STARTS = frozenset({"var", "pi", "(", "{", "frac", "sqrt", "wrap", "func"})  # "3 4" is two answers, not 12


def _literal(text):
    """Exact value of a number token; bounded so that 1e999999999 is refused instead of computed."""
    if text.isdigit():  # the common case, without the separators and exponent below
        return _fit(Fraction(int(text)))
    mantissa, _, exponent = re.sub(r"[,{}\\]", "", text).lower().partition("e")
    value = Fraction(mantissa)
    if exponent:
        e = int(exponent)
        if abs(e) > MAX_LITERAL_EXPONENT:
            raise _Unreadable("exponent too large")
        value *= Fraction(10) ** e
    return _fit(value)


def _vulgar(m):
    codes = unicodedata.decomposition(m.group(2)).split()[1:]  # "<fraction> 0031 2044 0032" for ½
    slash = codes.index("2044")
    num, den = (int("".join(chr(int(c, 16)) for c in part)) for part in (codes[:slash], codes[slash + 1:]))
    if not m.group(1):
        return f"\\frac{{{num}}}{{{den}}}"
    if len(m.group(1)) > 100:
        raise _Unreadable("mixed number too long")
    return f"({int(m.group(1)) * den + num}/{den})"


def _ascii(text):
    if not text.isascii():
        text = _VULGAR_FRACTION.sub(_vulgar, text).translate(_UNICODE_MATH)
        if not text.isascii():
            raise _Unreadable("non-ASCII character")
    return text


def _tokenize(text):
    text, tokens, pos = _ascii(text), [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Unreadable(f"unexpected {text[pos]!r}")
        pos, kind, value = m.end(), m.lastgroup, m.group()
        if kind == "number":
            tokens.append(("number", _literal(value)))
        elif kind == "command":
            if value not in _COMMANDS:
                raise _Unreadable(f"unsupported command {value}")
            if _COMMANDS[value] == "frac":
                _refuse_mixed_number(tokens)
            if _COMMANDS[value] is not None:
                tokens.append((_COMMANDS[value], value.lstrip("\\")))
        elif kind == "word":
            if len(value) == 1:
                tokens.append(("var", value))
            elif value.lower() in _WORDS:
                tokens.append((_WORDS[value.lower()], value.lower()))
            else:
                raise _Unreadable(f"word {value!r}")
        elif kind == "op":
            tokens.append(("^" if value == "**" else value, value))
        if len(tokens) > MAX_TOKENS:
            raise _Unreadable("too many tokens")
    return tokens


def _refuse_mixed_number(tokens):
    """Before a \\frac token: 2\\frac{1}{2} is 2.5 to a schoolchild and 1 to LaTeX, and so is -2\\frac{1}{2} (−2.5 or
    −1), so a number right before \\frac is unreadable wherever it stands, unless it is an exponent or \\frac12's."""
    if tokens and tokens[-1][0] == "number" and (len(tokens) == 1 or tokens[-2][0] not in ("^", "frac", "sqrt", "_")):
        raise _Unreadable("2\\frac{1}{2}: mixed number or product?")


class _MathParser:
    """Recursive descent over the token list (grammar above). Raises _Unreadable; never evaluates anything.

    e is Euler's number unless e_variable; uses_e / e_as_base / degrees record what the text used."""

    def __init__(self, tokens, e_variable=False):
        self.tokens, self.pos, self.depth = tokens, 0, 0
        self.variables, self.e_variable = set(), e_variable
        self.uses_e = self.e_as_base = self.degrees = False
        self.in_trig = 0

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

    def answer(self):
        """A whole answer: a leading "x =" or "x \\in" is dropped; then a bare list, a relation chain or one item."""
        if len(self.tokens) > 2 and self.tokens[0][0] == "var" and self.tokens[1][0] in ("=", "in"):
            self.pos = 2
        items = [self.item()]
        while self.peek() == ",":
            self.take()
            items.append(self.item())
            if len(items) > MAX_ITEMS:
                raise _Unreadable("too many items")
        if len(items) > 1:
            return ("set", tuple(items))  # "1, -2": the solutions, in any order
        if self.peek() in _RELATIONS:
            return self.relation(items[0])
        return items[0]

    def relation(self, first):
        """x > 3 and 3 < x are one relation: chains are kept pointing up (<, <=), so a > chain is reversed."""
        sides, ops = [first], []
        while self.peek() in _RELATIONS:
            ops.append(self.take()[0])
            sides.append(self.expr())
        if set(ops) <= {">", ">="}:
            sides.reverse()
            ops = [op.replace(">", "<") for op in reversed(ops)]
        elif not set(ops) <= {"<", "<="}:
            raise _Unreadable("a chain of relations pointing both ways")
        return ("rel", tuple(ops), tuple(sides))

    def item(self):
        node = self.expr()
        if self.peek() != "cup":
            return node
        members = [node]
        while self.peek() == "cup":
            self.take()
            members.append(self.expr())
        return ("union", tuple(members))

    def expr(self):
        self.enter()
        node = self.term()
        while self.peek() in ("+", "-", "pm", "mp"):
            kind = self.take()[0]
            node = ({"+": "add", "-": "sub"}.get(kind, kind), node, self.term())
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
                node = ("mul", node, self.power())
            else:
                return node

    def unary(self):
        kind = self.peek()
        if kind not in ("-", "+", "pm", "mp"):
            return self.power()
        self.take()
        self.enter()  # "----5" nests like "-(-(-(-5)))"
        node = self.unary()
        self.depth -= 1
        if kind in ("pm", "mp"):
            return (kind, ("number", Fraction(0)), node)
        return ("neg", node) if kind == "-" else node

    def power(self):
        node = self.atom()
        if self.peek() == "%":
            self.take()
            node = ("pct", node)
        if self.peek() == "^":
            self.take()
            if self.degree_sign():
                if self.in_trig:  # \sin 30^\circ: degrees are radians here
                    return ("mul", node, ("div", ("pi",), ("number", Fraction(180))))
                self.degrees = True
                return ("deg", node)
            if node == ("e",):
                self.e_as_base = True
            self.enter()  # 9^9^9^9 nests to the right
            node = ("pow", node, self.unary())
            self.depth -= 1
        return node

    def degree_sign(self):
        """Take \\circ or {\\circ} after '^', and a C or F after it (25^\\circ C is a temperature, not 25·C)."""
        kinds = [t[0] for t in self.tokens[self.pos:self.pos + 3]]
        if kinds[:1] == ["circ"]:
            self.pos += 1
        elif kinds == ["{", "circ", "}"]:
            self.pos += 3
        else:
            return False
        after = self.tokens[self.pos:self.pos + 4]
        if after[:1] in ([("var", "C")], [("var", "F")]):
            self.pos += 1
        elif [t[0] for t in after] == ["wrap", "{", "var", "}"] and after[2][1] in "CF":
            self.pos += 4
        return True

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
            return self.letter(value)
        if kind in ("pi", "inf"):
            return (kind,)
        if kind in ("(", "["):
            return self.brackets(kind)
        if kind in ("{", "wrap"):  # \text{…}: a group like any other; "\text{ or }" still fails inside
            if kind == "wrap":
                self.take("{")
            node = self.expr()
            self.take("}")
            return node
        if kind == "{{":
            return ("set", self.items("}}"))
        if kind == "frac":
            return ("div", self.group(), self.group())
        if kind == "sqrt":
            return self.root()
        if kind == "func":
            return self.function(value)
        raise _Unreadable(f"unexpected {value!r}")

    def letter(self, name):
        if name == "e" and not self.e_variable:
            self.uses_e = True
            return ("e",)
        self.variables.add(name)
        return ("var", name)

    def items(self, *closings):
        items = [self.expr()]
        while self.peek() == ",":
            self.take()
            items.append(self.expr())
            if len(items) > MAX_ITEMS:
                raise _Unreadable("too many items")
        if self.peek() not in closings:
            raise _Unreadable(f"expected {' or '.join(closings)}")
        self.take()
        return tuple(items)

    def brackets(self, opening):
        """(expr) is a group; (a, b, …), [a, b, …] are tuples; (a, b], [a, b) are intervals; brackets are kept."""
        items = self.items(")", "]")
        closing = self.tokens[self.pos - 1][0]
        if len(items) == 1:
            if opening + closing != "()":
                raise _Unreadable("brackets around one value")
            return items[0]
        if len(items) > 2 and opening + closing not in ("()", "[]"):
            raise _Unreadable("half-open brackets around more than two values")
        return ("tuple", opening, closing, items)

    def root(self):
        index = ("number", Fraction(2))
        if self.peek() == "[":
            self.take()
            index = self.expr()
            self.take("]")
        if self.peek() in ("(", "number"):  # sqrt(2), \sqrt(2); √12 means √(12), not √(1)·2
            return ("root", index, self.atom())
        return ("root", index, self.group())

    def function(self, name):
        """\\sin x, \\sin(x), \\sin^2 x = (\\sin x)^2, \\log_2 8; \\sin^{-1} is refused (a power or the inverse?)."""
        base = exponent = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.group()
        if self.peek() == "^":
            self.take()
            exponent = self.group()
            if exponent[0] != "number" or exponent[1].denominator != 1 or exponent[1] < 1:
                raise _Unreadable("a function's power must be a positive integer")
        self.enter()
        self.in_trig += name in _TRIG
        if self.peek() in ("(", "{"):
            argument = self.atom()
        else:  # \sin 2x = sin(2x); \sin x \cos x = sin(x)·cos(x)
            argument = self.power()
            while self.peek() in _IMPLICIT_STARTS - {"func"}:
                argument = ("mul", argument, self.power())
        self.in_trig -= name in _TRIG
        self.depth -= 1
        node = ("func", name, argument) if base is None else ("log", base, argument)
        return node if exponent is None else ("pow", node, exponent)


def _parse(text, e_variable=False):
    parser = _MathParser(_tokenize(_unwrap(text)), e_variable)
    parser.node = parser.answer()
    if parser.pos != len(parser.tokens):
        raise _Unreadable(f"unexpected {parser.tokens[parser.pos][1]!r}")
    return parser


def parse_math(text, e_variable=False):
    """Parse an answer into (AST, variables). Raises _Unreadable (a ValueError) on anything outside the grammar.

    A leading "x =" (or "x \\in") is dropped: "x = 5" grades as 5; any other '=' is unreadable.
    """
    parser = _parse(text, e_variable)
    return parser.node, frozenset(parser.variables)


# ---- values: exact Fractions, and inexact floats that carry a bound on their error

_ROUNDING = 2.0 ** -52  # twice the unit roundoff: one float operation (or libm call) errs by less, relatively ...
_TINY = 2.0 ** -1022    # ... plus at most this absolutely (subnormal results)


class _Approx:
    """An inexact real: a float and a bound on its absolute error, propagated through every operation.

    Only irrational values (π, e, √2, sin 1, ln 2 ...) are inexact. The bound is what lets float residue equal an
    exact 0 (sin π, 0.1π + 0.2π − 0.3π), and what refuses a value that cancelled inside floats:
    10^{20}·(√(1 + 10^{-20}) − 1) computes as 0 with a bound of ~10^4, which equals nothing."""
    __slots__ = ("value", "error", "source", "precise")  # source: (AST, env) of a whole scalar, see _close

    def __init__(self, value, error):
        if not (math.isfinite(value) and math.isfinite(error)):
            raise _Unreadable("not finite")
        self.value, self.error, self.source, self.precise = value, error, None, None

    def __eq__(self, other):
        return isinstance(other, _Approx) and (self.value, self.error) == (other.value, other.error)

    def __hash__(self):
        return hash((self.value, self.error))

    def __float__(self):
        return self.value

    def __repr__(self):
        return f"{self.value!r}±{self.error:.1e}"


class _Infinity:
    """±∞: allowed as an interval end or an answer, never in arithmetic."""
    __slots__ = ("sign",)

    def __init__(self, sign):
        self.sign = sign

    def __eq__(self, other):
        return isinstance(other, _Infinity) and self.sign == other.sign

    def __hash__(self):
        return hash(("inf", self.sign))

    def __repr__(self):
        return "∞" if self.sign > 0 else "-∞"


def _fit(x):
    """Refuse exact values too large to keep computing with (inexact ones are refused when not finite)."""
    if isinstance(x, Fraction) and (x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS):
        raise _Unreadable("number too large")
    return x


def _rounded(value, error):
    """The _Approx of a float result: the error propagated from the inputs plus this operation's rounding."""
    return _Approx(value, error + abs(value) * _ROUNDING + _TINY)


def _inexact(x):
    """x as an _Approx; a Fraction converts with its rounding error (OverflowError beyond the float range)."""
    if isinstance(x, _Approx):
        return x
    if not isinstance(x, Fraction):
        raise _Unreadable("∞ in arithmetic")
    value = float(x)  # correctly rounded
    return _Approx(value, 0.0 if value == x else abs(value) * _ROUNDING / 2 + _TINY)


_PI = _Approx(math.pi, math.pi * _ROUNDING / 2)
_E = _Approx(math.e, math.e * _ROUNDING / 2)


def _negate(x):
    if isinstance(x, _Approx):
        return _Approx(-x.value, x.error)
    return _Infinity(-x.sign) if isinstance(x, _Infinity) else -x


def _add(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return _fit(a + b)
    a, b = _inexact(a), _inexact(b)
    return _rounded(a.value + b.value, a.error + b.error)


def _sub(a, b):
    return _add(a, _negate(b))


def _mul(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return _fit(a * b)
    a, b = _inexact(a), _inexact(b)
    return _rounded(a.value * b.value, abs(a.value) * b.error + abs(b.value) * a.error + a.error * b.error)


def _div(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        if b == 0:
            raise _Unreadable("division by zero")
        return _fit(a / b)
    a, b = _inexact(a), _inexact(b)
    if abs(b.value) <= b.error:
        raise _Unreadable("division by a value that may be zero")
    quotient = a.value / b.value
    return _rounded(quotient, (a.error + abs(quotient) * b.error) / (abs(b.value) - b.error))


def _monotone(f, x, low=-math.inf, high=math.inf):
    """f(x) for f monotone on [low, high]; the error bound is f's spread over x's interval (plus libm's rounding)."""
    x = _inexact(x)
    lo, hi = x.value - x.error, x.value + x.error
    lo, hi = lo - abs(lo) * _ROUNDING, hi + abs(hi) * _ROUNDING  # the interval's own ends are rounded
    if not low <= lo <= hi <= high:
        raise _Unreadable("outside the function's domain")
    value, at_lo, at_hi = f(x.value), f(lo), f(hi)
    spread = max(abs(at_lo - value), abs(at_hi - value))
    return _rounded(value, spread + 2 * _ROUNDING * max(abs(at_lo), abs(at_hi)))


def _integer_root(n, k):
    """The exact k-th root of the int n ≥ 0, or None. Integer Newton from above, never floats: √(10^40) = 10^20."""
    if n < 2:
        return n
    if k == 2:
        root = math.isqrt(n)
    else:
        root = 1 << -(-n.bit_length() // k)  # ≥ the root; Newton's iterates then decrease to ⌊n^(1/k)⌋
        while True:
            better = ((k - 1) * root + n // root ** (k - 1)) // k
            if better >= root:
                break
            root = better
    return root if root ** k == n else None


def _exact_power(base, exponent):
    """base ** exponent for Fractions when the result is rational and not too large (8^{2/3} = 4), else None."""
    p, q = exponent.numerator, exponent.denominator
    if base == 0:
        if p <= 0:
            raise _Unreadable("0 to a non-positive power")
        return Fraction(0)
    if base == 1 or p == 0:
        return Fraction(1)
    if q > 1:
        if q > MAX_ROOT or (base < 0 and q % 2 == 0):
            return None
        num, den = _integer_root(abs(base.numerator), q), _integer_root(base.denominator, q)
        if num is None or den is None:
            return None
        base = Fraction(num if base > 0 else -num, den)  # (-8)^{1/3} = -2
    if base == -1:
        return Fraction(-1 if p % 2 else 1)
    if max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(p) > MAX_BITS:
        return None
    return base ** p


def _negative(x):
    return x < 0 if isinstance(x, Fraction) else _inexact(x).value < 0


def _power(base, exponent):
    """base ** exponent: exact where the result is rational, else an _Approx through exp(y·ln x). A negative base
    needs a rational exponent with odd denominator ((-8)^{1/3} = -2); overflow and underflow are refused."""
    if isinstance(base, Fraction) and isinstance(exponent, Fraction):
        exact = _exact_power(base, exponent)
        if exact is not None:
            return exact
    if isinstance(exponent, Fraction) and exponent.denominator == 1 and abs(exponent) <= 64:
        p = int(exponent)  # x^2 of an inexact x: x² is monotone on each side of 0, so its spread bounds the error
        low = math.ulp(0.0) if p < 0 else -math.inf
        x = _inexact(base)
        if x.value < 0:
            return _negate(_power(_negate(x), exponent)) if p % 2 else _power(_negate(x), exponent)
        return _monotone(lambda t: abs(t) ** p, x, low)
    if isinstance(base, _Approx) and abs(base.value) <= base.error:  # √(π − π): 0, as uncertain as √(its error)
        y, reach = _inexact(exponent), abs(base.value) + base.error
        if y.value - y.error <= 0:
            raise _Unreadable("a value that may be 0 to a non-positive power")
        return _rounded(0.0, max(reach ** (y.value - y.error), reach ** (y.value + y.error)))
    sign = 1
    if _negative(base):
        if not (isinstance(exponent, Fraction) and exponent.denominator % 2 == 1):
            raise _Unreadable("not a real number")
        sign, base = (-1 if exponent.numerator % 2 else 1), _negate(base)
    log_magnitude = _mul(exponent, _ln(base))
    if not -700.0 < log_magnitude.value < 700.0:  # beyond float range either way: 9**9**9**9 ends here
        raise _Unreadable("power out of range")
    result = _monotone(math.exp, log_magnitude)
    return result if sign > 0 else _negate(result)


def _ln(x):
    """Natural log. Of a Fraction near 1 through log1p of the exact x − 1: log(n) − log(d) would cancel (ln(1 +
    10^{-20}) is 0.0 that way); elsewhere math.log, which takes ints of any size."""
    if isinstance(x, Fraction):
        if x <= 0:
            raise _Unreadable("log of a non-positive number")
        if x == 1:
            return Fraction(0)
        if abs(x - 1) < Fraction(1, 2):
            return _monotone(math.log1p, x - 1, -0.5, 0.5)
        a, b = math.log(x.numerator), math.log(x.denominator)
        return _rounded(a - b, 4 * _ROUNDING * (abs(a) + abs(b)))
    return _monotone(math.log, x, math.ulp(0.0))


def _exact_log(x, base):
    """The rational k = p/q (q ≤ 12) with base^k = x exactly (log_2 8 = 3, log_4 2 = 1/2, log_8 4 = 2/3), or None."""
    if x <= 0 or base <= 0 or base == 1:
        return None
    ratio = _div(_inexact(_ln(x)), _inexact(_ln(base))).value
    x_bits = max(x.numerator.bit_length(), x.denominator.bit_length())
    base_bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    for q in range(1, 13):
        p = round(ratio * q)
        if abs(p) * base_bits <= MAX_BITS and q * x_bits <= MAX_BITS and base ** p == x ** q:
            return Fraction(p, q)
    return None


def _logarithm(x, base=None):
    """ln x, or log_base x (exact where x is a rational power of a rational base)."""
    if base is None:
        return _ln(x)
    if isinstance(x, Fraction) and isinstance(base, Fraction):
        exact = _exact_log(x, base)
        if exact is not None:
            return exact
    return _div(_ln(x), _ln(base))


_EXACT_VALUES = {("sin", 0): 0, ("tan", 0): 0, ("arcsin", 0): 0, ("arctan", 0): 0, ("cos", 0): 1, ("exp", 0): 1,
                 ("arccos", 1): 0}  # the rational values of the functions at rational points (ln 1: see _ln)


def _function(name, x):
    """\\sin … \\exp of a Fraction or _Approx. sin and cos have derivatives ≤ 1, so the argument's error carries
    over; tan, cot, sec, csc divide, so a pole (tan π/2) is a division by a value that may be zero."""
    if isinstance(x, Fraction) and (name, x) in _EXACT_VALUES:
        return Fraction(_EXACT_VALUES[name, x])
    if name in ("ln", "log", "lg"):
        return _logarithm(x, Fraction(10) if name == "lg" else None)
    if name == "exp":
        return _monotone(math.exp, x)
    if name in ("arcsin", "arccos", "arctan"):
        return _monotone(getattr(math, "a" + name[3:]), x, *((-1, 1) if name != "arctan" else ()))
    x = _inexact(x)
    sin = _rounded(math.sin(x.value), x.error)
    cos = _rounded(math.cos(x.value), x.error)
    return {"sin": lambda: sin, "cos": lambda: cos, "tan": lambda: _div(sin, cos), "cot": lambda: _div(cos, sin),
            "sec": lambda: _div(Fraction(1), cos), "csc": lambda: _div(Fraction(1), sin)}[name]()


_BINARY = {"add": _add, "sub": _sub, "mul": _mul, "div": _div, "pow": _power}


def _evaluate(node, env):
    """Value of a scalar AST: a Fraction while exact, an _Approx once an irrational is involved, an _Infinity for
    ±∞. env maps letters to values, "°" to 1 or π/180 and, while ± is being expanded, "±" to +1 or −1."""
    kind = node[0]
    if kind == "number":
        return node[1]
    if kind == "var":
        return env[node[1]]
    if kind in ("pi", "e", "inf"):
        return {"pi": _PI, "e": _E, "inf": _Infinity(1)}[kind]
    if kind == "neg":
        return _negate(_evaluate(node[1], env))
    if kind in ("pct", "deg"):
        return _mul(_evaluate(node[1], env), Fraction(1, 100) if kind == "pct" else env["°"])
    if kind == "root":
        index = _evaluate(node[1], env)
        if not (isinstance(index, Fraction) and index.denominator == 1 and 2 <= index <= MAX_ROOT):
            raise _Unreadable("root index must be an integer 2..64")
        return _power(_evaluate(node[2], env), 1 / index)
    if kind == "func":
        return _function(node[1], _evaluate(node[2], env))
    if kind == "log":
        return _logarithm(_evaluate(node[2], env), _evaluate(node[1], env))
    if kind in ("tuple", "set", "union", "rel"):
        raise _Unreadable(f"a {kind} inside an expression")
    if kind == "pow" and node[1] == ("e",):  # e^x: exp directly, not exp(x·ln e)
        return _monotone(math.exp, _evaluate(node[2], env))
    a, b = _evaluate(node[1], env), _evaluate(node[2], env)
    if kind in ("pm", "mp"):
        if "±" not in env:
            raise _Unreadable("± inside a tuple, an interval or a relation")
        return _add(a, b) if (env["±"] > 0) == (kind == "pm") else _sub(a, b)
    return _BINARY[kind](a, b)


def _tagged(value, node, env):
    """value; if inexact, a copy that remembers the scalar expression it came from (for _close_precisely)."""
    if isinstance(value, _Approx):
        value = _Approx(value.value, value.error)
        value.source = (node, env)
    return value


def _has_pm(node):
    return node[0] in ("pm", "mp") or any(isinstance(c, tuple) and _has_pm(c) for c in node[1:])


def _element(node, env):
    """Values of one element of a list or set: a tuple, or a scalar; two scalars for ± (both signs together, as
    in \\frac{-b \\pm \\sqrt{b^2-4ac}}{2a})."""
    if node[0] == "tuple":
        return (_structure(node, env),)
    if not _has_pm(node):
        return (_tagged(_evaluate(node, env), node, env),)
    envs = ({**env, "±": sign} for sign in (1, -1))
    return tuple(_tagged(_evaluate(node, e), node, e) for e in envs)


def _structure(node, env):
    """Value of an answer: a scalar or (kind, tag, values) with kind tuple (tag: its brackets), set, union or rel
    (tag: its operators). A bare list, \\{…\\} and a ± pair are all sets."""
    kind = node[0]
    if kind == "tuple":
        return ("tuple", node[1] + node[2], tuple(_structure(i, env) if i[0] == "tuple" else
                                                  _tagged(_evaluate(i, env), i, env) for i in node[3]))
    if kind == "set":
        return ("set", "", tuple(v for item in node[1] for v in _element(item, env)))
    if kind == "union":
        members = tuple(_structure(m, env) for m in node[1])
        if not all(isinstance(m, tuple) and m[0] == "tuple" and len(m[2]) == 2 for m in members):
            raise _Unreadable("a union of something other than intervals")
        return ("union", "", members)
    if kind == "rel":
        return ("rel", node[1], tuple(_tagged(_evaluate(s, env), s, env) for s in node[2]))
    values = _element(node, env)
    return values[0] if len(values) == 1 else ("set", "", values)


# Letters are compared at three fixed random rational points: two different polynomials of small degree agree
# at all three with negligible probability (Schwartz–Zippel), and no simplify() is ever needed.
_rng = random.Random(20250701)
_VARIABLE_POINTS = tuple(
    {c: Fraction(_rng.randint(11, 97), _rng.randint(2, 13)) for c in string.ascii_letters} for _ in range(3))


def _percent_reading(node):
    """The other reading of a trailing %: 50% is 0.5 or 50, and -5% is -0.05 or -5 (the sign keeps its place)."""
    signs = 0
    while node[0] == "neg":
        signs, node = signs + 1, node[1]
    if node[0] != "pct":
        return ()
    node = node[1]
    for _ in range(signs):
        node = ("neg", node)
    return (node,)


class _Readings(tuple):
    """Readings with .markers, the signs among ("%", "°") that the text has. Readings run over the % reading first,
    then the ° one, so a reading's index says how it read each marker (see _pairs)."""
    markers = ()


def _readings(values, markers):
    readings = _Readings(values)
    readings.markers = markers
    return readings


def _pairs(pred, truth):
    """The (pred, truth) reading pairs to compare: any reading with any, except that a marker both sides have is read
    the same way on both (0.5% is not 50%, though 0.5 is; 0.52° is not 30°, though 0.52 is)."""
    pred_markers, truth_markers = getattr(pred, "markers", ()), getattr(truth, "markers", ())
    shared = set(pred_markers) & set(truth_markers)
    for i, p in enumerate(pred):
        for j, t in enumerate(truth):
            if all((m in _marks(i, pred_markers)) == (m in _marks(j, truth_markers)) for m in shared):
                yield p, t


def _marks(index, markers):
    """The markers that reading `index` reads the other way (50% as 50, 30° as π/6)."""
    if len(markers) == 2:
        return {m for m, bit in zip(markers, (index >> 1, index & 1)) if bit}
    return set(markers) if index else set()


@lru_cache(maxsize=1 << 13)
def math_readings(text, e_variable=False):
    """The ways an answer can be read, each a tuple of values (one per variable point), or None if unreadable.

    A trailing percent sign gives two readings: "50%" is 0.5 and 50 (a "what percentage" truth is often stored
    without its %); so does a degree sign outside a trigonometric function: "30°" is 30 and π/6. Cached: a GRPO
    group shares its truth, and rollouts often repeat an answer.
    """
    try:
        parser = _parse(text, e_variable)
        nodes = (parser.node,) + _percent_reading(parser.node)
        degrees = (Fraction(1), _div(_PI, Fraction(180))) if parser.degrees else (Fraction(1),)
        points = _VARIABLE_POINTS if parser.variables else ({},)
        markers = ("%",) * (len(nodes) > 1) + ("°",) * (len(degrees) > 1)
        return _readings([tuple(_structure(n, {**p, "°": d}) for p in points) for n in nodes for d in degrees],
                         markers)
    except _EXPECTED_ERRORS:
        return None


def _e_is_a_variable(text):
    """Whether a truth uses e as a variable: with other letters and never as a base (a + b + e, not x e^{x} or 2e)."""
    try:
        parser = _parse(text)
    except _EXPECTED_ERRORS:
        return False
    return parser.uses_e and bool(parser.variables) and not parser.e_as_base


def _close(a, b, rel_tol, budget=None):
    """Scalars within rel_tol: exactly for two Fractions. With an inexact side, floats decide when their error bounds
    do (apart or within even with every error against them); else _close_precisely re-evaluates both sides (budget:
    [AST nodes it may evaluate], None for floats only), and if it cannot, the float rule: the bound must be small (a
    tenth of the tolerance, or MATH_ABS_FLOOR near 0) and the difference at most tolerance plus bound."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or abs(a - b) <= rel_tol * max(abs(a), abs(b))
    if isinstance(a, _Infinity) or isinstance(b, _Infinity):
        return a == b
    try:
        x, y = _inexact(a), _inexact(b)
    except OverflowError:
        return False
    tolerance = float(rel_tol) * max(abs(x.value), abs(y.value))
    bound, difference = x.error + y.error, abs(x.value - y.value)
    if difference > tolerance + bound:
        return False
    if difference + bound <= tolerance:
        return True
    decided = None if budget is None else _close_precisely(a, b, rel_tol, budget)
    return decided if decided is not None else bound <= tolerance / 10 + MATH_ABS_FLOOR


def _close_precisely(a, b, rel_tol, budget):
    """Decide what floats could not (sin π vs 0, but also ln(10^{20}+1) − ln(10^{20}) = 10^{-20} vs 0): both sides
    re-evaluated from their ASTs as rigorous mpmath intervals at PRECISE_BITS. True or False where the intervals
    decide; where they still overlap, True only if they agree to PRECISE_AGREEMENT (residue, as in sin π); None when
    a side cannot be re-evaluated (no AST, a complex intermediate, budget spent)."""
    from mpmath import iv  # lazily, like SymPy: only undecided comparisons need it

    budget[0] -= 4  # a comparison costs about as much as four re-evaluated nodes
    if budget[0] < 0:
        return None
    saved = iv.prec
    try:
        iv.prec = PRECISE_BITS
        x, y = _precise_value(a, budget), _precise_value(b, budget)
        difference, tolerance = abs(x - y), iv.mpf(rel_tol.numerator) / rel_tol.denominator
        low, high = (tolerance * max(abs(x).a, abs(y).a)), (tolerance * max(abs(x).b, abs(y).b))
        if difference.b <= low:
            return True
        if difference.a > high:
            return False
        return bool(difference.b <= high + PRECISE_AGREEMENT * (1 + max(abs(x).b, abs(y).b)))
    except (ArithmeticError, ValueError, TypeError):  # mpmath's ComplexResult is a ValueError
        return None
    finally:
        iv.prec = saved


def _precise_value(value, budget):
    from mpmath import iv

    if isinstance(value, Fraction):
        return iv.mpf(value.numerator) / value.denominator
    if value.precise is None:
        if value.source is None:
            raise _Unreadable("no expression to re-evaluate")
        value.precise = _interval(*value.source, budget)
    return value.precise


def _interval(node, env, budget):
    """A scalar AST as an mpmath interval at the current iv.prec (rigorous bounds), counting nodes against budget."""
    from mpmath import iv

    budget[0] -= 1
    if budget[0] < 0:
        raise _Unreadable("precise budget spent")
    kind = node[0]
    if kind in ("number", "var"):
        x = node[1] if kind == "number" else env[node[1]]
        return iv.mpf(x.numerator) / x.denominator
    if kind in ("pi", "e"):
        return +iv.pi if kind == "pi" else iv.exp(1)
    if kind in ("neg", "pct", "deg"):
        x = _interval(node[1], env, budget)
        return -x if kind == "neg" else x / 100 if kind == "pct" else x if env["°"] == 1 else x * iv.pi / 180
    if kind == "root":
        return _iv_power(_interval(node[2], env, budget), 1 / _evaluate(node[1], env))
    if kind == "func":
        return _iv_function(node[1], _interval(node[2], env, budget))
    if kind == "log":
        return iv.log(_interval(node[2], env, budget)) / iv.log(_interval(node[1], env, budget))
    if kind == "pow" and node[1] == ("e",):
        return iv.exp(_interval(node[2], env, budget))
    a, b = _interval(node[1], env, budget), _interval(node[2], env, budget)
    if kind == "pow":
        exponent = _evaluate(node[2], env)
        return _iv_power(a, exponent if isinstance(exponent, Fraction) else b)
    if kind in ("pm", "mp"):
        return a + b if (env["±"] > 0) == (kind == "pm") else a - b
    return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b}[kind]()


def _iv_power(x, exponent):
    """x ** exponent for an interval x, with _power's sign rules for an exact rational exponent."""
    from mpmath import iv

    if not isinstance(exponent, Fraction):
        return x ** exponent
    p, q = exponent.numerator, exponent.denominator
    if q == 1:
        return x ** p
    if x.a < 0:  # (-8)^{1/3} = -2: an odd root of an interval wholly below 0
        if q % 2 == 0 or x.b >= 0:
            raise _Unreadable("not real here")
        magnitude = (-x) ** (iv.mpf(p) / q)
        return -magnitude if p % 2 else magnitude
    return x ** (iv.mpf(p) / q)


def _iv_function(name, x):
    """\\sin … \\exp of an interval; arcsin, arccos, arctan (monotone, with no interval version in mpmath) from
    their values at the ends, computed 32 bits finer and widened by more than that error."""
    from mpmath import iv, mp

    if name in ("ln", "log", "lg"):
        return iv.log(x) / (iv.log(10) if name == "lg" else 1)
    if name in ("sin", "cos", "tan", "cot", "sec", "csc", "exp"):
        return getattr(iv, name)(x)
    with mp.workprec(iv.prec + 32):
        f = getattr(mp, "a" + name[3:])
        ends = [f(mp.mpf(x.a)), f(mp.mpf(x.b))]
        if not all(isinstance(v, mp.mpf) for v in ends):
            raise _Unreadable("outside the function's domain")
        low, high = min(ends), max(ends)
        slack = mp.mpf(2) ** -iv.prec * (1 + abs(low) + abs(high))
        return iv.mpf([low - slack, high + slack])


def _same_value(pred, truth, rel_tol, budget=None):
    """Answers agree: scalars within tolerance; tuples, intervals and relations element by element, with the same
    brackets and operators; sets and unions as multisets (a one-to-one matching of agreeing elements)."""
    if not isinstance(pred, tuple) or not isinstance(truth, tuple):
        return not isinstance(pred, tuple) and not isinstance(truth, tuple) and _close(pred, truth, rel_tol, budget)
    (kind, tag, items), (truth_kind, truth_tag, truth_items) = pred, truth
    if (kind, tag, len(items)) != (truth_kind, truth_tag, len(truth_items)):
        return False
    if kind in ("tuple", "rel"):
        return all(_same_value(p, t, rel_tol, budget) for p, t in zip(items, truth_items))
    # Sorted by value, equal multisets almost always pair up in order (O(n log n)); else a maximum matching.
    if all(_same_value(p, t, rel_tol, budget) for p, t in zip(sorted(items, key=_order),
                                                               sorted(truth_items, key=_order))):
        return True
    candidates = []
    for p in items:
        candidates.append([j for j, t in enumerate(truth_items) if _same_value(p, t, rel_tol, budget)])
        if not candidates[-1]:
            return False
    return _max_matching(candidates, len(truth_items)) == len(truth_items)


def _order(value):
    """A sort key of answer values: scalars by their float value (±inf beyond the float range), then structures."""
    if isinstance(value, tuple):
        return (1, value[0], value[1], tuple(_order(v) for v in value[2]))
    if isinstance(value, _Infinity):
        return (0, math.inf * value.sign)
    try:
        return (0, float(value))
    except OverflowError:
        return (0, math.inf if value > 0 else -math.inf)


def _same_reading(pred, truth, rel_tol, budget=None):
    if len(pred) != len(truth):  # one side has letters, the other has not: compare the constant at every point
        pred, truth = (pred * 3)[:3], (truth * 3)[:3]
    return all(_same_value(p, t, rel_tol, budget) for p, t in zip(pred, truth))


def to_sympy(node):
    """The SymPy expression of a parsed AST, built unevaluated so that nothing large is ever computed."""
    import sympy  # lazily: only the CLI and the tests need it, and importing it costs ~0.5 s

    kind = node[0]
    if kind == "number":
        return sympy.Rational(node[1].numerator, node[1].denominator)
    if kind in ("var", "pi", "e", "inf"):
        return sympy.Symbol(node[1]) if kind == "var" else {"pi": sympy.pi, "e": sympy.E, "inf": sympy.oo}[kind]
    if kind in ("neg", "pct"):
        return sympy.Mul(to_sympy(node[1]), -1 if kind == "neg" else sympy.Rational(1, 100), evaluate=False)
    if kind == "deg":  # the reading in degrees; the other one is this times π/180
        return to_sympy(node[1])
    if kind in ("func", "log"):
        return _sympy_function(node)
    if kind in ("tuple", "set", "union", "rel"):
        return _sympy_structure(node)
    a, b = to_sympy(node[1]), to_sympy(node[2])
    if kind == "root":  # ("root", index, radicand)
        return sympy.Pow(b, sympy.Pow(a, -1, evaluate=False), evaluate=False)
    if kind in ("add", "sub"):
        return sympy.Add(a, b if kind == "add" else sympy.Mul(-1, b, evaluate=False), evaluate=False)
    if kind in ("pm", "mp"):  # SymPy has no ±: the pair of values
        return sympy.FiniteSet(sympy.Add(a, b, evaluate=False), sympy.Add(a, -b, evaluate=False), evaluate=False)
    if kind == "mul":
        return sympy.Mul(a, b, evaluate=False)
    if kind == "div":
        return sympy.Mul(a, sympy.Pow(b, -1, evaluate=False), evaluate=False)
    return sympy.Pow(a, b, evaluate=False)


def _sympy_function(node):
    import sympy

    argument = to_sympy(node[2])
    if node[0] == "log" or node[1] == "lg":
        base = to_sympy(node[1]) if node[0] == "log" else sympy.Integer(10)
        return sympy.Mul(sympy.log(argument, evaluate=False), sympy.Pow(sympy.log(base, evaluate=False), -1,
                                                                        evaluate=False), evaluate=False)
    name = {"arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log"}.get(node[1], node[1])
    return getattr(sympy, name)(argument, evaluate=False)


def _sympy_structure(node):
    import sympy

    if node[0] == "tuple":
        items = [to_sympy(i) for i in node[3]]
        if len(items) == 2 and node[1] + node[2] != "()":
            return sympy.Interval(*items, node[1] == "(", node[2] == ")")
        return sympy.Tuple(*items)
    if node[0] == "rel":
        sides = [to_sympy(s) for s in node[2]]
        links = [(sympy.Lt if op == "<" else sympy.Le)(a, b, evaluate=False)
                 for op, a, b in zip(node[1], sides, sides[1:])]
        return links[0] if len(links) == 1 else sympy.And(*links, evaluate=False)
    items = [to_sympy(i) for i in node[1]]
    return sympy.Union(*items, evaluate=False) if node[0] == "union" else sympy.FiniteSet(*items, evaluate=False)


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
    """Readings of one number (chart values, VQA numbers, physical quantities): like math, but letters, ±∞ and
    structures (lists, intervals, ± pairs, relations) are unreadable."""
    readings = math_readings(text)
    if readings is None or any(len(r) != 1 or isinstance(r[0], (tuple, _Infinity)) for r in readings):
        return None
    return _readings([r[0] for r in readings], readings.markers)


_PLAIN_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_PLAIN_DROPPED = re.compile(r"\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[,;:! ]|[\s~$]")


def _plain(text, casefold=False):
    """A truth the parser cannot read ("\\text{Monday}", "2\\frac{1}{2}", "H2O") is compared as this text: NFC, the
    answer's wrappers, \\text{…} inside it, \\left/\\right, spacing and a final period dropped; \\dfrac is \\frac."""
    text = _unwrap(unicodedata.normalize("NFC", text))
    for _ in range(8):  # nested wrappers, innermost first
        text, found = _PLAIN_WRAPPER.subn(r"\1", text)
        if not found:
            break
    text = _PLAIN_DROPPED.sub("", text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")).rstrip(".")
    return text.casefold() if casefold else text


def _math_truth(text):
    """A math ground truth: (readings, whether e is a variable in it, None), or (None, None, its plain text) when
    the parser cannot read it; None when not even that is left (an empty truth)."""
    e_variable = _e_is_a_variable(text)
    readings = math_readings(text, e_variable)
    if readings is not None:
        return readings, e_variable, None
    plain = _plain(text, casefold=True)
    return (None, None, plain) if plain else None


def _chart_truth(text):
    """A chart ground truth: (number readings, None), or (None, casefolded plain text) for a label ("Q3", "Asia")."""
    readings = _number_readings(text)
    if readings is not None:
        return readings, None
    plain = _plain(text, casefold=True)
    return (None, plain) if plain else None


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


OCR_CHUNK = 64                           # piece length of the bounded edit distance of long OCR transcriptions
OCR_CHUNK_BUDGET = 1 << 14               # differing characters of pieces compared exactly (~20 ms); beyond, a bound


def _common_prefix(a, b):
    """Length of the common prefix, by bisection over C-speed slice comparisons."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _differing_middles(a, b):
    """a and b without their common prefix and suffix (which an optimal alignment may always match)."""
    start = _common_prefix(a, b)
    a, b = a[start:], b[start:]
    end = _common_prefix(a[::-1], b[::-1])
    return a[:len(a) - end], b[:len(b) - end]


def _ocr_distance(a, b):
    """The edit distance of two OCR strings while it is cheap, else an upper bound of it, so that a long transcription
    is never paid more than it earns: the common prefix and suffix are free, and the differing middles are compared
    exactly when their n·m ≤ OCR_EXACT_CELLS (and the longer, which the bit-parallel loop walks, is within
    OCR_CHUNK_BUDGET), else piece by piece (_pieces_distance)."""
    if a == b:
        return 0
    a, b = _differing_middles(a, b)
    if len(a) < len(b):
        a, b = b, a
    if len(a) * len(b) <= OCR_EXACT_CELLS and len(a) <= OCR_CHUNK_BUDGET:
        return edit_distance(a, b)
    return _pieces_distance(a, b)


def _pieces_distance(a, b):
    """An upper bound of the edit distance of two long strings, a the longer. a is cut every OCR_CHUNK characters,
    b where the 16 characters after each cut of a are found again near where they should be (else one chunk after
    its last cut). Equal pieces cost nothing; differing ones (without their common ends) their exact distance while
    OCR_CHUNK_BUDGET characters last, then their longer length. The pieces' alignments together are an alignment of
    the whole, so the sum bounds the distance from above."""
    cuts_a, cuts_b, reach = list(range(0, len(a), OCR_CHUNK))[1:] + [len(a)], [0], 4 * OCR_CHUNK
    for cut in cuts_a[:-1]:
        expected = min(cuts_b[-1] + OCR_CHUNK, len(b))
        found = b.find(a[cut:cut + 16], max(cuts_b[-1], expected - reach), expected + reach + 16)
        cuts_b.append(found if found >= 0 else expected)
    cuts_b.append(len(b))
    total, budget = 0, OCR_CHUNK_BUDGET
    for a0, a1, b0, b1 in zip([0] + cuts_a, cuts_a, cuts_b, cuts_b[1:]):
        x, y = a[a0:a1], b[b0:b1]
        if x != y:
            x, y = _differing_middles(x, y)
            longer = max(len(x), len(y))
            total += edit_distance(x, y) if longer <= budget else longer
            budget -= longer
    return total


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


# GUI actions come as JSON ({"action": "click", "box": [...]}, or GLM-4.1V's mobile form {"action_type": "click",
# "box_2d": [[...]]}) or in GLM-4.1V's desktop call form, left_click(start_box='[x,y]', element_info='…') (zai-org/
# GLM-V, examples/gui-agent/glm-41v/agent.md). Both become one dict: a canonical lower-case "action", "box" or
# "point" (and "end_box" / "end_point" for drags), "text", "keys" (lower case, no spaces), other arguments as given.
_GUI_ACTIONS = {"left_click": "click", "tap": "click", "left_double_click": "double_click", "left_drag": "drag",
                "input_text": "type", "hotkey": "key"}
_GUI_KEYS = {"action_type": "action", "content": "text", "box_2d": "box", "start_box": "box"}
_GUI_CALL = re.compile(r"\s*([A-Za-z_]+)\s*\((.*)\)\s*", re.DOTALL)
_GUI_ARGUMENT = re.compile(r"""\s*([A-Za-z_]+)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"
                               |(-?[0-9]+(?:\.[0-9]+)?|True|False|true|false))\s*(?:,|\Z)""", re.DOTALL | re.VERBOSE)
_GUI_NUMBER = r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*"
_GUI_POSITION = re.compile(rf"\s*\[{_GUI_NUMBER},{_GUI_NUMBER}(?:,{_GUI_NUMBER},{_GUI_NUMBER})?\]\s*")


def _gui_call(text):
    """The arguments of an action in the call form — left_click(start_box='[x,y]'), type(content='…'),
    key(keys='ctrl+c'), scroll(start_box='[x,y]', direction='down', step=5), DONE() — as a dict, or None."""
    m = _GUI_CALL.fullmatch(text)
    if m is None:
        return None
    action, arguments, pos = {"action": m.group(1)}, m.group(2), 0
    while arguments[pos:].strip():
        a = _GUI_ARGUMENT.match(arguments, pos)
        if a is None or a.group(1) in action:
            return None
        name, single, double, bare = a.groups()
        if bare is None:
            action[name] = re.sub(r"\\(.)", r"\1", single if single is not None else double)
        elif bare.lower() in ("true", "false"):
            action[name] = bare.lower() == "true"
        else:
            action[name] = float(bare) if "." in bare else int(bare)
        pos = a.end()
    return action


def _gui_position(value, strings):
    """("point", (x, y)) or ("box", (x1, y1, x2, y2)) in 0–1000 coordinates from a list (or [[…]], as box_2d writes
    it) or, in the call form only, from the string "[x,y]"; None if invalid."""
    if isinstance(value, str):
        m = _GUI_POSITION.fullmatch(value) if strings else None
        if m is None:
            return None
        value = [float(g) for g in m.groups() if g is not None]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if isinstance(value, list) and len(value) == 2:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return None
        try:
            x, y = float(value[0]), float(value[1])
        except OverflowError:  # JSON ints have no size limit
            return None
        return ("point", (x, y)) if 0 <= x <= COORD_MAX and 0 <= y <= COORD_MAX else None  # also refuses NaN
    box = _valid_box(value)
    return None if box is None else ("box", box)


def _gui_action(raw, strings):
    """The common form of a parsed action (see above); None if malformed or if an argument is written twice."""
    action = {}
    for key, value in raw.items():
        key = _GUI_KEYS.get(key, key)
        if key in ("box", "point", "end_box", "end_point"):
            position = _gui_position(value, strings)
            if position is None:
                return None
            key, value = ("end_" if key.startswith("end") else "") + position[0], position[1]
        if key in action:  # action and action_type, box and box_2d ...
            return None
        action[key] = value
    name = action.get("action")
    if not isinstance(name, str) or not isinstance(action.get("text", ""), str):
        return None
    if not isinstance(action.get("keys", ""), str):
        return None
    action["action"] = _GUI_ACTIONS.get(name.strip().lower(), name.strip().lower())
    if "keys" in action:
        action["keys"] = "".join(action["keys"].lower().split())
    return action


def parse_gui(text):
    """A GUI action from strict JSON or from the call form, in the common form above; None otherwise."""
    if not text.lstrip().startswith("{"):
        raw = _gui_call(text)
        return None if raw is None else _gui_action(raw, strings=True)
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _EXPECTED_ERRORS:  # json.JSONDecodeError is a ValueError; deep nesting is a RecursionError
        return None
    return _gui_action(raw, strings=False) if isinstance(raw, dict) else None


_SECONDS = r"([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)\s*s?"
_SEGMENT = re.compile(rf"\s*[\[(]\s*{_SECONDS}\s*,\s*{_SECONDS}\s*[\])]\s*", re.ASCII)


def parse_segment(text):
    """A video segment "[start, end]" in seconds (an "s" after each number is allowed), or None."""
    m = _SEGMENT.fullmatch(text)
    if m is None:
        return None
    start, end = float(m.group(1)), float(m.group(2))
    return (start, end) if 0 <= start < end <= MAX_SECONDS else None


# VQA answers (Antol et al. 2015, the VQA evaluation's normalisation), and a list of acceptable answers.

_VQA_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#&|~:^$]")
_VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                     "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
                     "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "wont": "won't", "couldnt": "couldn't",
                     "shouldnt": "shouldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't"}
MAX_VQA_ANSWERS = 64                     # acceptable answers in one VQA truth


def _vqa_key(text):
    """(normalised text, number readings or None). Normalised as the VQA evaluation does: lower case, commas inside
    numbers and periods not before a digit dropped, other punctuation to spaces, number words to digits (zero–ten),
    articles dropped, common contractions restored. The number is read from the text first (1/2, 50%, 1{,}000),
    then from its normalised form ("two")."""
    raw = _unwrap(unicodedata.normalize("NFC", text))
    normal = re.sub(r"(?<=[0-9]),(?=[0-9])", "", raw.lower())
    normal = _VQA_PUNCTUATION.sub(" ", re.sub(r"\.(?![0-9])", "", normal))
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in normal.split()]
    normal = " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))
    normal = normal or " ".join(raw.lower().split())  # "A" is an answer, not an article
    values = _number_readings(raw) if len(raw) <= MAX_BOX_CHARS else None
    return normal, values if values is not None or len(words) != 1 else _number_readings(normal)


def _vqa_truth(text):
    """Acceptable answers: a JSON list of strings or numbers (any of them counts), or the text itself; None if empty."""
    answers = [text]
    if text.lstrip().startswith("["):
        try:
            parsed = json.loads(text, parse_constant=_reject_constant)
        except _EXPECTED_ERRORS:
            parsed = None
        if isinstance(parsed, list):
            if not 0 < len(parsed) <= MAX_VQA_ANSWERS or not all(
                    isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in parsed):
                return None
            answers = [a if isinstance(a, str) else json.dumps(a) for a in parsed]
    keys = tuple(_vqa_key(a) for a in answers)
    return keys if all(normal for normal, _ in keys) else None


# Physical quantities (physics, chemistry): a number and a unit, both sides converted to SI before comparing.

_DIMENSIONS = ("m", "kg", "s", "A", "K", "mol", "rad")  # rad: an angle is kept apart from a pure number


def _dims(**exponents):
    return tuple(exponents.get(d, 0) for d in _DIMENSIONS)


_ENERGY, _PRESSURE, _TIME, _LENGTH = _dims(kg=1, m=2, s=-2), _dims(kg=1, m=-1, s=-2), _dims(s=1), _dims(m=1)
_UNITS = {  # symbol -> (scale to SI, dimensions, whether it takes an SI prefix)
    "m": (1, _LENGTH, True), "g": (Fraction(1, 1000), _dims(kg=1), True), "s": (1, _TIME, True),
    "A": (1, _dims(A=1), True), "K": (1, _dims(K=1), True), "mol": (1, _dims(mol=1), True),
    "rad": (1, _dims(rad=1), True), "Hz": (1, _dims(s=-1), True), "N": (1, _dims(kg=1, m=1, s=-2), True),
    "Pa": (1, _PRESSURE, True), "J": (1, _ENERGY, True), "W": (1, _dims(kg=1, m=2, s=-3), True),
    "C": (1, _dims(A=1, s=1), True), "V": (1, _dims(kg=1, m=2, s=-3, A=-1), True),
    "F": (1, _dims(kg=-1, m=-2, s=4, A=2), True), "ohm": (1, _dims(kg=1, m=2, s=-3, A=-2), True),
    "S": (1, _dims(kg=-1, m=-2, s=3, A=2), True), "T": (1, _dims(kg=1, s=-2, A=-1), True),
    "Wb": (1, _dims(kg=1, m=2, s=-2, A=-1), True), "H": (1, _dims(kg=1, m=2, s=-2, A=-2), True),
    "L": (Fraction(1, 1000), _dims(m=3), True), "l": (Fraction(1, 1000), _dims(m=3), True),
    "M": (1000, _dims(mol=1, m=-3), True),  # molar, mol/L
    "eV": (Fraction("1.602176634e-19"), _ENERGY, True), "Wh": (3600, _ENERGY, True),
    "cal": (Fraction("4.184"), _ENERGY, True), "bar": (100000, _PRESSURE, True),
    "Da": (Fraction("1.66053906660e-27"), _dims(kg=1), True), "min": (60, _TIME, False),
    "h": (3600, _TIME, False), "atm": (101325, _PRESSURE, False),
    "mmHg": (Fraction("133.322387415"), _PRESSURE, False), "Torr": (Fraction(101325, 760), _PRESSURE, False),
    "mi": (Fraction("1609.344"), _LENGTH, False), "ft": (Fraction("0.3048"), _LENGTH, False),
    "mph": (Fraction("0.44704"), _dims(m=1, s=-1), False), "deg": (_div(_PI, Fraction(180)), _dims(rad=1), False),
    "percent": (Fraction(1, 100), _dims(), False), "degC": (1, _dims(K=1), False),
    "degF": (Fraction(5, 9), _dims(K=1), False),
}
_TEMPERATURE_ZERO = {"degC": Fraction("273.15"), "degF": Fraction("273.15") - Fraction(160, 9)}  # alone: absolute
_PREFIXES = {"T": 10**12, "G": 10**9, "M": 10**6, "k": 1000, "h": 100, "d": Fraction(1, 10), "c": Fraction(1, 100),
             "m": Fraction(1, 1000), "u": Fraction(1, 10**6), "n": Fraction(1, 10**9), "p": Fraction(1, 10**12),
             "f": Fraction(1, 10**15)}
_UNIT_NAMES = {"meter": "m", "metre": "m", "second": "s", "sec": "s", "gram": "g", "ampere": "A", "amp": "A",
               "kelvin": "K", "mole": "mol", "mol": "mol", "radian": "rad", "hertz": "Hz", "newton": "N",
               "pascal": "Pa", "joule": "J", "watt": "W", "coulomb": "C", "volt": "V", "farad": "F", "ohm": "ohm",
               "siemens": "S", "tesla": "T", "henry": "H", "liter": "L", "litre": "L", "molar": "M",
               "minute": "min", "min": "min", "hour": "h", "hr": "h", "degree": "deg", "percent": "percent",
               "atmosphere": "atm", "electronvolt": "eV", "calorie": "cal", "bar": "bar", "celsius": "degC",
               "fahrenheit": "degF", "mile": "mi", "foot": "ft", "feet": "ft"}
_PREFIX_NAMES = {"tera": "T", "giga": "G", "mega": "M", "kilo": "k", "hecto": "h", "deci": "d", "centi": "c",
                 "milli": "m", "micro": "u", "nano": "n", "pico": "p", "femto": "f"}
_UNIT_SPELLINGS = tuple((re.compile(p), r) for p, r in (  # applied in order, before the number and unit are split
    (r"\\(?:[,;:! ]|quad)|~", " "), (r"\\(?:mu|micro)(?![a-zA-Z])|[µμ]", "u"), (r"\\Omega|Ω", "ohm"),
    (r"\\%", "%"), (r"℃", "degC"), (r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°", " deg "), (r"·|⋅|\\cdot", "·"),
    (r"\bdeg\s*C\b|\bdegrees?\s+(?:celsius|centigrade)\b", "degC"),
    (r"\bdeg\s*F\b|\bdegrees?\s+fahrenheit\b", "degF"), (r"\bper\b", "/"),
    (r"\bsquare\s+([A-Za-z]+)", r"\1^2"), (r"\bcubic\s+([A-Za-z]+)", r"\1^3"),
    (r"\s+squared\b", "^2"), (r"\s+cubed\b", "^3"),
))
_SUPERSCRIPT = re.compile("(\u207b?)([\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+)")
_UNIT_TOKEN = re.compile(r"""\s*(?: (?P<name>[A-Za-z]+) | (?P<op>[/*·()])
    | (?:\^|\*\*)\s*(?:\{\s*(?P<braced>[-+]?[0-9]+)\s*\}|\(\s*(?P<paren>[-+]?[0-9]+)\s*\)|(?P<plain>[-+]?[0-9]+))
    | (?P<bare>[-+]?[0-9]+) )""", re.VERBOSE)
_UNIT_START = re.compile(r"(?<![\\A-Za-z])(?:[A-Za-z]|\((?=\s*[A-Za-z]))")  # 25% stays a number: 0.25 or 25
MAX_UNIT_TOKENS = 24
MAX_QUANTITY_CHARS = 512                 # a physical quantity is a number and a unit, not a paragraph


def _unit_text(text):
    """An answer with its LaTeX unit markup made plain: \\text{…}, \\mathrm{…} unwrapped, µ → u, Ω → ohm,
    °C → degC, ° → deg, m·s⁻¹ → m·s^-1, "meters per second squared" → "meters / second^2"."""
    text = _unwrap(unicodedata.normalize("NFC", text))
    for _ in range(16):
        m = re.search(r"\\(?:text|mathrm|textrm|rm|operatorname|mathit)\s*\{", text)
        end = _closing_brace(text, m.end() - 1) if m else -1
        if end < 0:
            break
        text = f"{text[:m.start()]} {text[m.end():end]} {text[end + 1:]}"
    text = _SUPERSCRIPT.sub(lambda m: "^" + "-" * bool(m.group(1)) + m.group(2).translate(
        str.maketrans("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "0123456789")), text)
    for pattern, replacement in _UNIT_SPELLINGS:
        text = pattern.sub(replacement, text)
    return text.strip()


def _unit_symbol(name):
    """(scale, dimensions) of one unit: a symbol (case matters: mW is not MW), an SI prefix and a symbol (km, mM,
    kPa), or a spelled name, singular or plural, with a spelled prefix (kilometres, millilitre)."""
    if name in _UNITS:
        scale, dims, _ = _UNITS[name]
        return (scale if isinstance(scale, _Approx) else Fraction(scale)), dims
    if len(name) > 1 and name[0] in _PREFIXES and name[1:] in _UNITS and _UNITS[name[1:]][2]:
        scale, dims, _ = _UNITS[name[1:]]
        return _mul(Fraction(_PREFIXES[name[0]]), Fraction(scale)), dims
    word = name.lower()
    for singular in (word, word[:-1] if word.endswith("s") else "", word[:-2] if word.endswith("es") else ""):
        for spelled, prefix in (("", ""), *_PREFIX_NAMES.items()):
            if singular.startswith(spelled) and singular[len(spelled):] in _UNIT_NAMES:
                return _unit_symbol(prefix + _UNIT_NAMES[singular[len(spelled):]])
    raise _Unreadable(f"unknown unit {name!r}")


def _unit_tokens(text):
    tokens, pos = [], 0
    while pos < len(text):
        m = _UNIT_TOKEN.match(text, pos)
        if m is None or len(tokens) >= MAX_UNIT_TOKENS:
            raise _Unreadable("not a unit")
        pos = m.end()
        exponent = m.group("braced") or m.group("paren") or m.group("plain") or m.group("bare")
        if exponent is not None:
            if not tokens or tokens[-1][0] not in ("name", ")") or tokens[-1][2] != 1 or abs(int(exponent)) > 12:
                raise _Unreadable("misplaced exponent")
            tokens[-1] = (tokens[-1][0], tokens[-1][1], int(exponent))
        else:
            tokens.append(("name", m.group("name"), 1) if m.group("name") else (m.group("op"), None, 1))
    return tokens


def _parse_unit(text):
    """(scale, dimensions, the symbol if the unit is one symbol) of m/s^2, kg·m·s^-2, J/(mol K), km/h, mol L^-1.
    After a '/', every factor up to the closing parenthesis divides: J/mol K = J/(mol·K), as chemists write it."""
    tokens = _unit_tokens(text.strip())
    frames = [[Fraction(1), _dims(), False]]  # per parenthesis level: scale, dimensions, dividing
    for kind, name, exponent in tokens:
        if kind == "/":
            frames[-1][2] = True
        elif kind == "(":
            if len(frames) > 4:
                raise _Unreadable("unit nested too deeply")
            frames.append([Fraction(1), _dims(), False])
        elif kind in ("name", ")"):
            if kind == ")":
                if len(frames) == 1:
                    raise _Unreadable("unbalanced parenthesis")
                scale, dims, _ = frames.pop()
            else:
                scale, dims = _unit_symbol(name)
            frame = frames[-1]
            k = -exponent if frame[2] else exponent
            frame[0] = _mul(frame[0], _power(scale, Fraction(k)))
            frame[1] = tuple(a + k * b for a, b in zip(frame[1], dims))
    if len(frames) != 1 or not tokens:
        raise _Unreadable("not a unit")
    scale, dims, _ = frames[0]
    return scale, dims, tokens[0][1] if len(tokens) == 1 and tokens[0][2] == 1 else None


def _quantity(text):
    """(values in SI units, dimensions, values as written, whether a unit was written) of a physical answer —
    "9.8 m/s^2", "1.5 \\times 10^{3}\\,\\text{m}", "25 °C", "0.1 M" — or None. The unit is the longest tail that
    reads as one, and the rest must be one number; a lone °C or °F is an absolute temperature."""
    if len(text) > MAX_QUANTITY_CHARS:
        return None
    text = _unit_text(text)
    for m in _UNIT_START.finditer(text):
        try:
            scale, dims, symbol = _parse_unit(text[m.start():])
        except _EXPECTED_ERRORS:
            continue
        readings = _number_readings(text[:m.start()])
        if readings is not None:
            zero = _TEMPERATURE_ZERO.get(symbol, Fraction(0))
            return _readings([_add(_mul(r, scale), zero) for r in readings], readings.markers), dims, readings, True
    readings = _number_readings(text)
    return None if readings is None else (readings, _dims(), readings, False)


def _quantity_truth(text):
    """A physics or chemistry ground truth: its _quantity, or (None, plain text) when it is not one ("H2O", "B")."""
    quantity = _quantity(text)
    if quantity is not None:
        return quantity
    plain = _plain(text)
    return (None, plain) if plain else None


def _multi_image_truth(text):
    """A multi-image ground truth: {"task": sub-task, "answer": …} is scored by that task's verifier; anything else
    as a short VQA answer (GLM-V's own multi-image verifier: exact match, then numbers). (verifier, truth) or None."""
    try:
        raw = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _EXPECTED_ERRORS:
        raw = None
    if isinstance(raw, dict) and {"task", "answer"} <= set(raw):
        task = raw["task"]
        if not isinstance(task, str) or task not in VERIFIERS or task == "multi_image":
            return None
        truth = VERIFIERS[task][1](_answer_text(raw["answer"]))
        return None if truth is None else (VERIFIERS[task][0], truth)
    truth = _vqa_truth(text)
    return None if truth is None else (verify_vqa, truth)


# ----------------------------------------------------------------------------------------------------------------
# The verifiers (paper Table 1). Each takes the box content and the parsed truth and returns a float in [0, 1].

def verify_math(pred, truth):
    readings, e_variable, plain = truth
    if readings is None:  # a truth the parser cannot read ("\\text{odd}"): normalised, case-folded text equality
        return float(_plain(pred, casefold=True) == plain)
    pred_readings = math_readings(pred, e_variable)  # e is read as the truth reads it
    if pred_readings is None:
        return 0.0
    budget = [PRECISE_NODES]
    return float(any(_same_reading(p, t, MATH_REL_TOL, budget) for p, t in _pairs(pred_readings, readings)))


def verify_choice(pred, truth):
    return float(_choice_letter(pred) == truth)


def verify_ocr(pred, truth):
    pred = _ocr_text(pred)
    longest = max(len(pred), len(truth))
    return 1.0 if longest == 0 else (longest - _ocr_distance(pred, truth)) / longest  # = 1 − d / max length


def verify_counting(pred, truth):
    return float(_integer(pred) == truth)


def verify_chart(pred, truth):
    truth, plain = truth
    if truth is None:  # a label, not a number: case-insensitive normalised string equality
        return float(_plain(pred, casefold=True) == plain)
    readings, budget = _number_readings(pred), [PRECISE_NODES]
    if readings is None:
        return 0.0
    for p, t in _pairs(readings, truth):
        is_year = isinstance(t, Fraction) and t.denominator == 1 and YEARS[0] <= t <= YEARS[1]
        if p == t if is_year else _close(p, t, CHART_REL_TOL, budget):
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
    if action is None or action["action"] != truth["action"]:
        return 0.0
    for key, want in truth.items():  # every argument of the truth must be matched; extra ones are notes
        if key not in ("action", "element_info") and not _gui_argument_matches(action, key, want):
            return 0.0
    return 1.0


def _gui_argument_matches(action, key, want):
    """A truth box is hit by a box with IoU ≥ 0.5 or by a point inside it (a point cannot spray); a truth point by
    a point within GUI_POINT_RADIUS; text after whitespace collapsing; anything else (direction, step) equal."""
    if key in ("box", "end_box"):
        box, point = action.get(key), action.get(key.replace("box", "point"))
        if box is not None:
            return _iou(box, want) >= IOU_THRESHOLD
        return point is not None and want[0] <= point[0] <= want[2] and want[1] <= point[1] <= want[3]
    got = action.get(key)
    if key in ("point", "end_point"):
        return got is not None and math.dist(got, want) <= GUI_POINT_RADIUS
    if key == "text":
        return isinstance(got, str) and " ".join(got.split()) == " ".join(want.split())
    return got == want


def verify_vqa(pred, truth):
    """Any acceptable answer matches: by value when both are numbers (so "-5" is not "5"), else by VQA-normalised
    text. A hedge ("yes or no", "2 or 3") matches nothing."""
    (normal, values), budget = _vqa_key(pred), [PRECISE_NODES]
    for truth_normal, truth_values in truth:
        if values is not None and truth_values is not None:
            if any(_close(p, t, MATH_REL_TOL, budget) for p, t in _pairs(values, truth_values)):
                return 1.0
        elif normal == truth_normal:
            return 1.0
    return 0.0


def verify_units(pred, truth):
    """Physics and chemistry: the same dimensions and the value within UNITS_REL_TOL, both in SI (1500 m = 1.5 km,
    25 °C = 298.15 K, 0.1 M = 0.1 mol/L). A truth with a unit needs one; a truth without (a bare number) is compared
    with the number as the reply wrote it, whatever unit follows."""
    if truth[0] is None:
        return float(_plain(pred) == truth[1])
    values, dims, _, has_unit = truth
    got, budget = _quantity(pred), [PRECISE_NODES]
    if got is None or (has_unit and got[1] != dims):  # a missing or different unit
        return 0.0
    return float(any(_close(p, t, UNITS_REL_TOL, budget) for p, t in _pairs(got[0 if has_unit else 2], values)))


def verify_multi_image(pred, truth):
    verifier, truth = truth
    return verifier(pred, truth)


def verify_video_grounding(pred, truth):
    segment = parse_segment(pred)
    if segment is None:
        return 0.0
    inter = max(0.0, min(segment[1], truth[1]) - max(segment[0], truth[0]))
    iou = inter / ((segment[1] - segment[0]) + (truth[1] - truth[0]) - inter)
    return iou if iou >= IOU_THRESHOLD else 0.0


VERIFIERS = {
    "math": (verify_math, _math_truth),
    "choice": (verify_choice, _choice_letter),
    "ocr": (verify_ocr, _ocr_text),
    "counting": (verify_counting, _integer),
    "chart": (verify_chart, _chart_truth),
    "grounding": (verify_grounding, parse_boxes),
    "gui": (verify_gui, parse_gui),
    "video_grounding": (verify_video_grounding, parse_segment),
    "vqa": (verify_vqa, _vqa_truth),
    "physics": (verify_units, _quantity_truth),
    "chemistry": (verify_units, _quantity_truth),
    "multi_image": (verify_multi_image, _multi_image_truth),
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


def truth_problem(task, answer):
    """Why a ground truth cannot be graded strictly, or None: RL prompts are checked with this when their pool
    loads, so that an item whose every reply would score 0 (or be compared as a mere string) is dropped instead."""
    text = _answer_text(answer)
    try:
        truth = VERIFIERS[task][1](text)
    except _EXPECTED_ERRORS:
        truth = None
    if truth is None:
        return f"the {task} verifier cannot read the answer {text[:60]!r}"
    if task == "math" and truth[0] is None:
        return f"the math answer {text[:60]!r} does not parse (only string equality could compare it)"
    return None


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
# The `model` verifier: a reward model for what no rule can check (RLHF, paper §5.2)

MODEL_VERIFIER = "model"  # the "verifier" of RL prompts a reward model grades (rlcs.py --reward-model)


def model_verifier(reward_model, tokenizer, prompts, replies, batch_rows=None):
    """Rewards in [0, 1] of decoded replies to rendered prompts from a reward model (reward.py), batched (batch_rows
    rows per forward) on its device: σ(r − offset), where offset (its reward.json) lies halfway between its mean
    reward of the right and of the wrong replies of its held-out pairs, so that boundary maps to 0.5 and r − offset
    is the log-odds that the reply beats a reply on it (Bradley–Terry). A malformed reply scores 0 without the
    model, as for every verifier (format is SFT's job); a non-finite r scores 0. Returns (scores, how many r were
    not finite)."""
    import reward  # torch and a model: imported only by runs that have a reward model

    graded = [k for k, reply in enumerate(replies) if extract_answer(reply) is not None]
    raw = reward.rewards_of(reward_model, tokenizer, [prompts[k] for k in graded], [replies[k] for k in graded],
                            batch_rows)
    scores, nonfinite = [0.0] * len(replies), 0
    for k, r in zip(graded, raw):
        if math.isfinite(r):
            scores[k] = 0.5 * (1.0 + math.tanh((r - reward_model.offset) / 2))  # σ without overflow
        else:
            nonfinite += 1
    return scores, nonfinite


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

def _show(value):
    """A reading's value for humans: numbers to 10 digits, structures with their brackets or operators."""
    if isinstance(value, tuple):
        kind, tag, items = value
        shown = [_show(v) for v in items]
        if kind == "rel":
            return " ".join(x for pair in zip(shown, tag + ("",)) for x in pair).strip()
        if kind == "tuple":
            return f"{tag[0]}{', '.join(shown)}{tag[1]}"
        return " ∪ ".join(shown) if kind == "union" else "{" + ", ".join(shown) + "}"
    if isinstance(value, _Approx):  # an inexact value with its error bound: "0±2e-14" cancelled in floats
        return f"{value.value:.10g}±{value.error:.0e}"
    return repr(value) if isinstance(value, _Infinity) else f"{float(value):.10g}"


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
            ", ".join(_show(v) for v in r) for r in readings)
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
