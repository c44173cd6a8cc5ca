"""The exact checker of the math family (:mod:`environments.tasks.math`, survey §3, §9.3): an
exact :class:`fractions.Fraction` parser of arithmetic expressions linear in ``x``, the step check
(``e1=e2[=...]`` is correct iff all parts have the same exact value) and the answer parser
(accepted formats in the math module's docstring).

Answer checking uses this module's own exact Fraction parser, not sympy/math-verify: sympy's
``parse_expr`` evaluates Python (unsafe on agent text) and math-verify is not a dependency; all
answers here are rationals, for which an exact parser is complete.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

#: longest step/answer line the checker looks at (longer lines are incorrect steps)
MAX_LINE_CHARS = 200
#: digits per numeric literal / bits of an intermediate numerator or denominator
_MAX_DIGITS = 30
_MAX_BITS = 512
_MAX_DEPTH = 30


class ParseError(ValueError):
    """Text that is not an exact arithmetic expression (or not linear in x)."""


_NORMALISE = str.maketrans({"×": "*", "·": "*", "∗": "*", "÷": "/", "−": "-", "–": "-", "—": "-", "：": ":"})
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\S))")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace left
            break
        pos = m.end()
        num, ch = m.group(1), m.group(2)
        if num is not None:
            if len(num) > _MAX_DIGITS:
                raise ParseError("number too long")
            out.append(num)
        elif ch in "+-*/()xX":
            out.append(ch.lower())
        else:
            raise ParseError(f"unexpected character {ch!r}")
    return out


def _num(tok: str) -> Fraction:
    return Fraction(tok) if not tok.endswith(".") else Fraction(tok[:-1])


class _Lin:
    """a*x + b with exact coefficients."""

    __slots__ = ("a", "b")

    def __init__(self, a: Fraction, b: Fraction):
        for v in (a, b):
            if v.numerator.bit_length() > _MAX_BITS or v.denominator.bit_length() > _MAX_BITS:
                raise ParseError("number too large")
        self.a, self.b = a, b


class _Parser:
    def __init__(self, toks: list[str], allow_x: bool):
        self.toks, self.i, self.allow_x, self.depth = toks, 0, allow_x, 0

    def peek(self) -> Optional[str]:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expr(self) -> _Lin:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise ParseError("nested too deeply")
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            w = self.term()
            v = _Lin(v.a + w.a, v.b + w.b) if op == "+" else _Lin(v.a - w.a, v.b - w.b)
        self.depth -= 1
        return v

    def term(self) -> _Lin:
        v = self.unary()
        while True:
            nxt = self.peek()
            if nxt in ("*", "/"):
                op = self.take()
                w = self.unary()
            elif nxt in ("(", "x") and self.toks[self.i - 1] not in ("+", "-", "*", "/", "("):
                op, w = "*", self.atom()  # implicit product: 3x, 2(3+1), (1+2)(3)
            else:
                return v
            if op == "*":
                if v.a and w.a:
                    raise ParseError("not linear in x")
                v = _Lin(v.a * w.b + w.a * v.b, v.b * w.b)
            else:
                if w.a:
                    raise ParseError("division by an expression in x")
                if w.b == 0:
                    raise ParseError("division by zero")
                v = _Lin(v.a / w.b, v.b / w.b)

    def unary(self) -> _Lin:
        if self.peek() in ("+", "-"):
            op = self.take()
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise ParseError("nested too deeply")
            v = self.unary()
            self.depth -= 1
            return _Lin(-v.a, -v.b) if op == "-" else v
        return self.atom()

    def atom(self) -> _Lin:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end")
        self.take()
        if tok == "(":
            v = self.expr()
            if self.peek() != ")":
                raise ParseError("missing ')'")
            self.take()
            return v
        if tok == "x":
            if not self.allow_x:
                raise ParseError("x not allowed here")
            return _Lin(Fraction(1), Fraction(0))
        if tok[0].isdigit() or tok[0] == ".":
            if self.peek() is not None and (self.peek()[0].isdigit() or self.peek()[0] == "."):
                raise ParseError("two numbers in a row")
            return _Lin(Fraction(0), _num(tok))
        raise ParseError(f"unexpected {tok!r}")


def _parse_linear(text: str, allow_x: bool) -> _Lin:
    text = text.translate(_NORMALISE)
    toks = _tokens(text)
    if not toks:
        raise ParseError("empty expression")
    p = _Parser(toks, allow_x)
    v = p.expr()
    if p.i != len(toks):
        raise ParseError(f"unexpected {toks[p.i]!r}")
    return v


def evaluate(text: str) -> Fraction:
    """Exact value of an arithmetic expression (no variables); :class:`ParseError` otherwise.
    Safe on arbitrary text: no ``eval``, bounded length, depth and number size."""
    if not isinstance(text, str) or len(text) > MAX_LINE_CHARS:
        raise ParseError("not a short string")
    return _parse_linear(text, allow_x=False).b


def check_step(line: str, solution: Optional[Fraction] = None) -> bool:
    """Whether a step line ``e1=e2[=...]`` is a true statement (see the module docstring).
    ``solution`` is x's value on linear problems (None: lines with x are unparsable)."""
    if not isinstance(line, str):
        return False
    s = line.strip().translate(_NORMALISE)
    if s.endswith("."):
        s = s[:-1]
    if not s or len(s) > MAX_LINE_CHARS or s.count("=") < 1:
        return False
    parts = s.split("=")
    try:
        vals = []
        for part in parts:
            lin = _parse_linear(part, allow_x=solution is not None)
            vals.append(lin.a * solution + lin.b if solution is not None else lin.b)
    except (ParseError, ZeroDivisionError, ValueError, OverflowError, RecursionError):
        return False
    return all(v == vals[0] for v in vals[1:])


_ANSWER_PREFIX = re.compile(r"^\s*answer\b\s*[:=]?\s*", re.IGNORECASE)
_NUMBER_FORMS = [
    (re.compile(r"^(-?)(\d+) (\d+)/(\d+)$"), "mixed"),
    (re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$"), "commas"),
    (re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$"), "decimal"),
    (re.compile(r"^-?\d+\s*/\s*-?\d+$"), "fraction"),
    (re.compile(r"^-?\(?\s*-?\d+\s*/\s*\d+\s*\)?$"), "fraction"),
]


def is_answer_line(text: str) -> bool:
    return isinstance(text, str) and _ANSWER_PREFIX.match(text) is not None


def parse_answer(text: str) -> Optional[Fraction]:
    """The number an answer denotes, or None. ``text`` may start with ``answer``."""
    if not isinstance(text, str) or len(text) > MAX_LINE_CHARS:
        return None
    s = _ANSWER_PREFIX.sub("", text, count=1).translate(_NORMALISE).strip()
    for _ in range(2):
        m = re.fullmatch(r"\\boxed\{(.*)\}", s) or re.fullmatch(r"\$(.*)\$", s)
        if m:
            s = m.group(1).strip()
    s = re.sub(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    s = s.rstrip(".").strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # x = 5
    s = re.sub(r"^\$\s*", "", s).replace("-$", "-")
    s = re.sub(r"(?<=\d)\s+[A-Za-z]+\.?$", "", s)  # trailing unit word: 14 apples
    s = s.rstrip(".").strip()
    for rx, form in _NUMBER_FORMS:
        m = rx.match(s)
        if not m:
            continue
        try:
            if form == "mixed":
                sign = -1 if m.group(1) else 1
                den = int(m.group(4))
                if den == 0:
                    return None
                return sign * (int(m.group(2)) + Fraction(int(m.group(3)), den))
            if form == "commas":
                return Fraction(s.replace(",", ""))
            if form == "decimal":
                return _num(s.lstrip("-")) * (-1 if s.startswith("-") else 1)
            t = s.replace("(", "").replace(")", "").replace(" ", "")
            num, den = t.split("/")
            if int(den) == 0:
                return None
            return Fraction(int(num), int(den))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def format_number(v: Fraction) -> str:
    """Canonical text of an exact value: ``14``, ``-3``, ``15/4``."""
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"

