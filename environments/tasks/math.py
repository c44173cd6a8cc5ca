"""Procedurally generated math problems with per-step verification (survey §3, §9.3).

Three problem kinds, each with an exact answer (:class:`fractions.Fraction`) and a reference
solution of one-operation steps, scaled by ``difficulty`` (1..5):

* ``arith`` — an arithmetic expression of ``difficulty`` binary operations (``+ - *``; ``/`` from
  difficulty 3, with fractional answers from difficulty 4; parentheses from difficulty 2).
* ``linear`` — a linear equation in ``x`` (``3x + 5 = 20``; from difficulty 3 also
  ``ax + b = cx + e``; fractional solutions from difficulty 4).
* ``word`` — templated word problems (buying, sharing, reading pages, boxes), 1–3 operations.

Text protocol (credit methods depend on it; keep it exactly)
-------------------------------------------------------------
* Prompt: the problem text plus ``"\\n"``.
* Each policy turn is **one reasoning-step line** ending with ``"\\n"`` (the stop text), e.g.
  ``"3+4=7\\n"``, ``"7*2=14\\n"``, ``"20-5=15\\n"``. A step is a chain ``e1=e2[=e3...]`` of
  arithmetic expressions (numbers, ``+ - * /``, ``× ÷ ·`` and unicode minus, parentheses,
  decimals, implicit products such as ``3x`` or ``2(3+1)``); it is **correct** iff every part
  parses and all parts have the same exact value. Lines that mention ``x`` are allowed on
  ``linear`` problems only and are checked at the problem's solution (``3x=15`` is correct when
  x = 5); products/quotients that are not linear in ``x`` are unparsable. Spaces and a trailing
  period are ignored. An unparsable line (prose, garbage, invalid UTF-8 decoded to U+FFFD, an
  empty line) is an **incorrect** step. A true statement that does not advance the solution
  (``1+1=2``) is a correct step: the check is arithmetic, not relevance.
* A turn whose text starts with ``answer`` (case-insensitive, after leading whitespace) is the
  answer turn and ends the episode, e.g. ``"answer 14\\n"``. Accepted answer formats
  (:func:`parse_answer`): integers (``14``, ``-3``, ``1,000``), fractions (``3/4``, ``-3/4``),
  decimals (``0.75``, ``.5``), mixed numbers (``2 1/2``), ``x=5`` / ``x = 5``, ``$14``, a
  trailing period, a trailing unit word (``14 apples``), ``\\boxed{..}`` and ``\\frac{a}{b}``,
  an optional ``:`` after ``answer``. Unevaluated expressions (``answer 3+4``) are *not*
  accepted: the answer must be a number.
* Observation after a step: ``""`` (empty) — the transcript is the prompt followed by the step
  lines. When the action text did not end with ``"\\n"`` (cut by ``max_new_tokens_per_turn``) the
  observation is ``"\\n"`` so every step stays on its own line. After the answer turn (or the
  last allowed turn) the observation is ``"done: correct"`` / ``"done: wrong"`` /
  ``"done: no answer"`` (same newline rule). Empty observations are safe in the agent loop
  (zero observation tokens; ``Turn.obs_span`` is then empty).
* ``max_steps`` turns at most (the answer turn included); a step on the last allowed turn that
  is not an answer ends the episode with reason ``max_turns`` and terminal reward 0.

Rewards, verdicts, ground truth
-------------------------------
* ``StepResult.info["step_correct"]`` on every turn (the answer turn: whether the answer is
  right; ``info["is_answer"]`` marks it). ``info["turn_reward"]`` = ``step_reward`` for a
  correct non-answer step, else 0. The final step carries ``info["terminal_reward"]`` = 1.0 iff
  the final answer is right (its ``StepResult.reward`` adds the turn reward, as in gym).
* Done reasons: ``success`` (right answer), ``wrong_answer``, ``max_turns``.
* :meth:`MathEnv.ground_truth` (``reference_policy = "step-check"``): per turn,
  ``advantage = q_value = +1.0`` for a verified-correct step (or right answer) and ``-1.0`` for an
  incorrect one (or wrong answer); ``value = 0.0`` (the step checker has no prior over states,
  so ``advantage = q_value - value`` holds). ``decisive`` is True on the **first incorrect step**;
  when every step is correct but the answer is wrong, on the answer turn; when every step is
  correct and the episode ran out of turns (``max_turns``), on the last turn (where it failed to
  answer); otherwise (a correct solution) no turn is decisive.
* ``privileged() = {"answer": "15/4", "reference_steps": ["20-5=15", ...], "kind": ...}``.
* State keys (GiGPO anchors): ``"{task_id}|t={t}|h={hash of the normalised step lines so far}"``:
  two episodes share a key iff they wrote the same steps (ignoring spaces and case).

Answer checking uses this module's own exact Fraction parser, not sympy/math-verify: sympy's
``parse_expr`` evaluates Python (unsafe on agent text) and math-verify is not a dependency; all
answers here are rationals, for which an exact parser is complete.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from environments.base import (
    SPLITS,
    EnvConfig,
    Environment,
    StepResult,
    TaskFamily,
    TaskInstance,
    derive_seed,
    hash_split,
    require_spec,
)
from environments.registry import register_family
from environments.ground_truth import GroundTruthCredit
from stages.config_fields import param

KINDS = ("arith", "linear", "word")
STOP_TEXT = "\n"
#: longest step/answer line the checker looks at (longer lines are incorrect steps)
MAX_LINE_CHARS = 200
#: digits per numeric literal / bits of an intermediate numerator or denominator
_MAX_DIGITS = 30
_MAX_BITS = 512
_MAX_DEPTH = 30
#: fraction of the problem space that belongs to the eval split (by hash of the problem text)
EVAL_SHARE = 5  # 1 in EVAL_SHARE problems is an eval problem


@dataclass
class MathConfig(EnvConfig):
    """Keys allowed under ``env.`` for the math family."""

    name: str = param("math", help="task family (registry name)")
    kinds: str = param("arith,linear,word", help="comma-separated problem kinds drawn uniformly: arith | linear | word", subset_of=KINDS)
    difficulty: int = param(1, help="1..5: operations per problem, number ranges, fractions from 4", ge=1, le=5)
    max_steps: int = param(6, help="turns per episode at most, the answer turn included (then reason max_turns)", ge=1)
    step_reward: float = param(0.0, help="turn reward for each verified-correct step line (0 = outcome reward only)")
    train_size: int = param(512, help="train-split instance pool size", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)



# ----------------------------------------------------------------------------- exact parser


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


def _operand(v: Fraction) -> str:
    s = format_number(v)
    return f"({s})" if v < 0 or v.denominator != 1 else s


def _step(a: Fraction, op: str, b: Fraction) -> tuple[str, Fraction]:
    r = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    return f"{_operand(a)}{op}{_operand(b)}={format_number(r)}", r


# ----------------------------------------------------------------------------- generators

_NAMES = ["Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
_ITEMS = ["apple", "pencil", "marble", "card", "coin", "stamp", "book", "shell"]
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _gen_arith(rng: random.Random, d: int) -> dict[str, Any]:
    hi = 9 if d <= 2 else 20
    ops = ["+", "-", "*"] + (["/"] if d >= 3 else [])
    # a random binary tree with d operations; leaves are numbers
    nodes: list[Any] = [Fraction(rng.randint(1, hi)) for _ in range(d + 1)]
    while len(nodes) > 1:
        i = rng.randrange(len(nodes) - 1) if d >= 2 else 0
        op = rng.choice(ops)
        left, right = nodes[i], nodes[i + 1]
        if op == "/":
            rv = _value(right)
            if rv == 0 or (d < 4 and (_value(left) / rv).denominator != 1):
                op = rng.choice(["+", "*"])
        nodes[i : i + 2] = [(op, left, right)]
    tree = nodes[0]
    text = _render(tree, 0, False)
    steps: list[str] = []
    answer = _reduce(tree, steps)
    return {"kind": "arith", "problem": f"Compute {text}.", "answer": format_number(answer), "steps": steps}


def _value(node: Any) -> Fraction:
    if isinstance(node, Fraction):
        return node
    op, a, b = node
    va, vb = _value(a), _value(b)
    return {"+": va + vb, "-": va - vb, "*": va * vb, "/": va / vb if vb else Fraction(0)}[op]


def _render(node: Any, parent_prec: int, right: bool) -> str:
    if isinstance(node, Fraction):
        return format_number(node)
    op, a, b = node
    p = _PREC[op]
    s = f"{_render(a, p, False)}{op}{_render(b, p, True)}"
    if p < parent_prec or (right and p == parent_prec):
        s = f"({s})"
    return s


def _reduce(node: Any, steps: list[str]) -> Fraction:
    if isinstance(node, Fraction):
        return node
    op, a, b = node
    va, vb = _reduce(a, steps), _reduce(b, steps)
    line, r = _step(va, op, vb)
    steps.append(line)
    return r


def _gen_linear(rng: random.Random, d: int) -> dict[str, Any]:
    hi = 5 + 2 * d
    a = rng.randint(2, hi)
    if d >= 4 and rng.random() < 0.5:
        x = Fraction(rng.randint(-hi, hi), rng.randint(2, 4))
    else:
        x = Fraction(rng.randint(-hi, hi) if d >= 3 else rng.randint(1, hi))
    b = rng.randint(1, 4 * hi)
    steps: list[str] = []
    if d >= 3 and rng.random() < 0.5:
        c = rng.randint(1, a - 1)
        e = (a - c) * x + b
        if e.denominator != 1:
            x = Fraction(rng.randint(1, hi))
            e = (a - c) * x + b
        cx = "x" if c == 1 else f"{c}x"
        rhs_text = f"{cx} + {format_number(e)}" if e >= 0 else f"{cx} - {format_number(-e)}"
        problem = f"Solve for x: {a}x + {b} = {rhs_text}"
        line, k = _step(Fraction(a), "-", Fraction(c))
        steps.append(line)
        line, rhs = _step(e, "-", Fraction(b))
        steps.append(line)
        line, sol = _step(rhs, "/", k)
        steps.append(line)
    else:
        c = a * x + b
        if c.denominator != 1:
            x = Fraction(rng.randint(1, hi))
            c = a * x + b
        form = rng.randrange(2)
        problem = f"Solve for x: {a}x + {b} = {format_number(c)}" if form == 0 else f"Solve for x: {b} + {a}x = {format_number(c)}"
        line, rhs = _step(c, "-", Fraction(b))
        steps.append(line)
        line, sol = _step(rhs, "/", Fraction(a))
        steps.append(line)
    assert sol == x
    return {"kind": "linear", "problem": problem, "answer": format_number(x), "steps": steps}


def _gen_word(rng: random.Random, d: int) -> dict[str, Any]:
    hi = 9 if d <= 1 else 10 * d
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    t = rng.randrange(5)
    F = Fraction
    if t == 0:
        a, b, c = rng.randint(2, hi), rng.randint(1, hi), rng.randint(1, hi)
        c = min(c, a + b)
        problem = (f"{name} has {a} {item}s and buys {b} more. Then {name} gives away {c}. "
                   f"How many {item}s does {name} have now?")
        s1, r = _step(F(a), "+", F(b))
        s2, r = _step(r, "-", F(c))
        steps = [s1, s2]
    elif t == 1:
        a, b = rng.randint(2, hi), rng.randint(2, 9)
        problem = f"A {item} costs {a} dollars. {name} buys {b} {item}s. How many dollars does {name} spend?"
        s1, r = _step(F(a), "*", F(b))
        steps = [s1]
    elif t == 2:
        b = rng.randint(2, 6)
        a = b * rng.randint(1, hi) if d < 4 else rng.randint(b + 1, b * hi)
        problem = f"{name} shares {a} {item}s equally among {b} friends. How many {item}s does each friend get?"
        s1, r = _step(F(a), "/", F(b))
        steps = [s1]
    elif t == 3:
        a, b, c = rng.randint(2, hi), rng.randint(2, 7), rng.randint(1, hi)
        problem = (f"{name} reads {a} pages a day for {b} days, then {c} more pages. "
                   f"How many pages does {name} read in all?")
        s1, r = _step(F(a), "*", F(b))
        s2, r = _step(r, "+", F(c))
        steps = [s1, s2]
    else:
        a, b = rng.randint(2, hi), rng.randint(2, 6)
        c = rng.randint(1, a * b)
        problem = f"A box holds {a} {item}s. {name} has {b} boxes and eats {c} {item}s. How many {item}s are left?"
        s1, r = _step(F(a), "*", F(b))
        s2, r = _step(r, "-", F(c))
        steps = [s1, s2]
    if d >= 3 and rng.random() < 0.5:
        k = rng.randint(2, 4)
        problem = problem[:-1] + f", multiplied by {k}?"
        s3, r = _step(r, "*", F(k))
        steps.append(s3)
    return {"kind": "word", "problem": problem, "answer": format_number(r), "steps": steps}


_GENERATORS = {"arith": _gen_arith, "linear": _gen_linear, "word": _gen_word}


def problem_split(problem: str) -> str:
    """The split a problem text belongs to (fixed by its hash: train and eval never share a text)."""
    return hash_split(problem, EVAL_SHARE)


def generate_problem(kinds: list[str], difficulty: int, split: str, key: Any) -> dict[str, Any]:
    """A problem of ``split`` drawn from the stream ``key`` (rejection on the text's split)."""
    rng = random.Random(derive_seed("math-problem", key))
    for _ in range(1000):
        kind = rng.choice(kinds)
        prob = _GENERATORS[kind](rng, difficulty)
        if split not in SPLITS or problem_split(prob["problem"]) == split:
            return prob
    raise RuntimeError(f"could not draw a {split} problem for {key!r}")  # pragma: no cover


# ----------------------------------------------------------------------------- environment


def _norm_line(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


class MathEnv(Environment):
    """One episode of a math problem (protocol in the module docstring)."""

    def __init__(self, cfg: Any, instance: TaskInstance, episode_seed: int = 0):
        spec = instance.spec
        self.cfg = cfg
        self.instance = instance
        self.episode_seed = int(episode_seed)
        self.problem: str = spec["problem"]
        self.answer = Fraction(spec["answer"])
        self.reference_steps: list[str] = list(spec["steps"])
        self.solution = self.answer if spec.get("kind") == "linear" else None
        self.max_steps = int(cfg.max_steps)
        self._started = False
        self._resets = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self._t = 0
        self._done = False
        self._success = False
        self.lines: list[str] = []
        self.verdicts: list[bool] = []
        self.answered: Optional[bool] = None  # None: no answer turn (yet)

    def reset(self) -> str:
        self._started = True
        self._resets += 1
        self._reset_state()
        return self.problem + "\n"

    def state_key(self) -> str:
        h = hashlib.blake2b("\n".join(_norm_line(x) for x in self.lines).encode("utf-8", "replace"), digest_size=6)
        end = "|end" if self._done else ""
        return f"{self.instance.task_id}{end}|t={self._t}|h={h.hexdigest()}"

    def step(self, action_text: str) -> StepResult:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError(f"episode of {self.instance.task_id} is over; call reset()")
        text = action_text if isinstance(action_text, str) else ""
        line = text.split("\n", 1)[0]
        t = self._t
        info: dict[str, Any] = {"turn": t}
        prefix = "" if text.endswith("\n") else "\n"
        if is_answer_line(line):
            value = parse_answer(line)
            correct = value is not None and value == self.answer
            info.update(is_answer=True, step_correct=correct, answer_correct=correct, turn_reward=0.0,
                        parsed_answer=None if value is None else format_number(value))
            self.answered = correct
            return self._finish(line, correct, 0.0, info, prefix + ("done: correct" if correct else "done: wrong"),
                                "success" if correct else "wrong_answer", action=line.strip())
        correct = check_step(line, self.solution)
        turn_reward = float(self.cfg.step_reward) if correct else 0.0
        info.update(is_answer=False, step_correct=correct, turn_reward=turn_reward)
        action = line.strip() if correct else None
        if t + 1 >= self.max_steps:
            return self._finish(line, correct, turn_reward, info, prefix + "done: no answer", "max_turns", action=action)
        self.lines.append(line)
        self.verdicts.append(correct)
        self._t = t + 1
        return StepResult(observation=prefix, reward=turn_reward, done=False, action=action,
                          state_key=self.state_key(), info=info)

    def _finish(self, line: str, correct: bool, turn_reward: float, info: dict[str, Any], obs: str, reason: str,
                action: Optional[str]) -> StepResult:
        self.lines.append(line)
        self.verdicts.append(correct)
        self._t += 1
        self._done = True
        self._success = reason == "success"
        info["terminal_reward"] = 1.0 if self._success else 0.0
        return StepResult(observation=obs, reward=turn_reward + info["terminal_reward"], done=True, action=action,
                          state_key=self.state_key(), success=self._success, reason=reason, info=info)

    @property
    def done(self) -> bool:
        return self._done

    def ground_truth(self, actions: list[Optional[str]]) -> GroundTruthCredit:
        """Step-check credit of this episode's turns (see the module docstring). ``actions`` is
        only used for its length (the verdicts were recorded while stepping)."""
        n = len(actions)
        if n > len(self.verdicts):
            raise ValueError(f"ground_truth: {n} actions, but the episode of {self.instance.task_id} has "
                             f"{len(self.verdicts)} turns")
        verdicts = self.verdicts[:n]
        adv = [1.0 if v else -1.0 for v in verdicts]
        decisive = [False] * n
        if n:
            if not all(verdicts):
                decisive[verdicts.index(False)] = True
            elif self._done and n == len(self.verdicts) and not self._success:
                decisive[n - 1] = True  # wrong answer after correct steps, or ran out of turns
        return GroundTruthCredit(value=[0.0] * n, q_value=list(adv), advantage=adv, decisive=decisive,
                                 reference_policy="step-check")

    def snapshot(self) -> dict[str, Any]:
        return {"t": self._t, "done": self._done, "success": self._success, "started": self._started,
                "lines": list(self.lines), "verdicts": list(self.verdicts), "answered": self.answered}

    def restore(self, handle: dict[str, Any]) -> None:
        self._t, self._done, self._success = handle["t"], handle["done"], handle["success"]
        self._started = handle["started"]
        self.lines, self.verdicts = list(handle["lines"]), list(handle["verdicts"])
        self.answered = handle["answered"]
        self._resets += 1

    def stats(self) -> dict[str, float]:
        return {"env_resets": float(max(self._resets, 1)), "sandbox_seconds": 0.0, "sandbox_execs": 0.0}

    def privileged(self) -> dict[str, Any]:
        return {"answer": format_number(self.answer), "reference_steps": list(self.reference_steps),
                "kind": self.instance.spec.get("kind", "")}


# ----------------------------------------------------------------------------- family


@register_family
class MathFamily(TaskFamily):
    name = "math"
    Config = MathConfig
    needs_sandbox = False

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        self.kinds = [k.strip() for k in str(self.cfg.kinds).split(",") if k.strip()]

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        prob = generate_problem(self.kinds, int(self.cfg.difficulty), split, (split, seed, index, self.cfg.difficulty))
        iseed = derive_seed("math-instance", split, seed, index)
        return TaskInstance(task_id=f"math-{split}-s{seed}-{index}", split=split, seed=iseed, spec=prob)

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> MathEnv:
        require_spec(instance, ("problem", "answer", "steps"), "math")
        return MathEnv(self.cfg, instance, episode_seed)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        metric = ("success rate = fraction of episodes whose answer turn ('answer <number>') equals the exact "
                  "answer (Fraction; integers, fractions, decimals, mixed numbers, 'x=' accepted); terminal "
                  f"reward 1.0 on success else 0.0; max {c.max_steps} turns")
        if c.step_reward:
            metric += f"; plus {c.step_reward} per verified-correct step line"
        return {
            "source": f"procedurally generated math problems (kinds {c.kinds}, difficulty {c.difficulty}) with "
                      "exact answers and reference step solutions",
            "size": f"train: {c.train_size} instances; eval: {c.eval_size} instances",
            "filtering": (f"problem texts are assigned to a split by hash (1 in {EVAL_SHARE} to eval), so train "
                          "and eval never share a problem; texts may repeat within a split"),
            "metric": metric,
            "benchmark": f"math ({c.kinds}, difficulty {c.difficulty})",
            "ground_truth": ("step-check: every step line verified exactly (+1 correct / -1 incorrect), decisive = "
                             "first incorrect step (or the answer turn after all-correct steps)"),
            "text_protocol": "one step line per turn ('3+4=7\\n'); 'answer <number>\\n' ends; observations are empty",
        }

    def profile(self) -> dict[str, Any]:
        """A short-CoT verifiable reasoning task with a step checker (a perfect PRM). ``turns=1``:
        the per-line turns are the newline stop of the agent loop, not interaction (the
        observations are empty), so the decision tree routes it as single-generation reasoning."""
        return {
            "setting": "reasoning",
            "turns": 1,
            "trajectory_tokens": 12 * int(self.cfg.max_steps) + 40,
            "verifiable_intermediate": True,
            "verifiable_outcome": True,
            "stochastic": False,
            "partially_observable": False,
            "privileged_info": True,
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": True,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """``n`` format episodes on problems of a separate "warmup" stream (not train/eval).

        What it teaches: the line format — 0 to ``max_steps - 1`` step lines ``<a><op><b>=<c>``
        followed by ``answer <number>``. What it does not: which numbers to combine and what to
        answer. Operands are drawn uniformly from the numbers seen so far (the problem's and
        earlier results), operators uniformly, the arithmetic of each line is correct, and the
        answer is a uniformly chosen number among those seen — right only by chance (~10-20% at
        difficulty 1, mostly on one-operation problems)."""
        out: list[tuple[str, list[tuple[str, str]]]] = []
        for i in range(n):
            inst = self.instance("warmup", i, seed)
            rng = random.Random(derive_seed("math-warmup", seed, i))
            env = self.make(inst)
            prompt = env.reset()
            seen = [Fraction(m) for m in re.findall(r"\d+", inst.spec["problem"])][:8] or [Fraction(1)]
            turns: list[tuple[str, str]] = []
            k = rng.randint(0, max(0, min(3, self.cfg.max_steps - 1)))
            for _ in range(k):
                a, b = rng.choice(seen), rng.choice(seen)
                op = rng.choice("+-*" + ("/" if b != 0 else ""))
                line, r = _step(a, op, b)
                seen.append(r)
                res = env.step(line + "\n")
                turns.append((line + "\n", res.observation))
            text = f"answer {format_number(rng.choice(seen))}\n"
            res = env.step(text)
            turns.append((text, res.observation))
            out.append((prompt, turns))
        return out
