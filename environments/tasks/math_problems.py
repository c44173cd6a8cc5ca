"""Problem generators of the math family (:mod:`environments.tasks.math`, survey §3, §9.3):
``arith``, ``linear`` and ``word`` problems scaled by ``difficulty`` (1..5), each with an exact
answer and a reference solution of one-operation step lines, and the hash-fixed train/eval split
of problem texts.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

from environments.base import SPLITS, derive_seed, hash_split
from environments.tasks.math_checker import format_number

KINDS = ("arith", "linear", "word")
#: fraction of the problem space that belongs to the eval split (by hash of the problem text)
EVAL_SHARE = 5  # 1 in EVAL_SHARE problems is an eval problem


def _operand(v: Fraction) -> str:
    s = format_number(v)
    return f"({s})" if v < 0 or v.denominator != 1 else s


def step_line(a: Fraction, op: str, b: Fraction) -> tuple[str, Fraction]:
    """The step line ``a<op>b=<result>`` (operands parenthesised when negative or fractional) and the result."""
    r = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
    return f"{_operand(a)}{op}{_operand(b)}={format_number(r)}", r


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
    line, r = step_line(va, op, vb)
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
        line, k = step_line(Fraction(a), "-", Fraction(c))
        steps.append(line)
        line, rhs = step_line(e, "-", Fraction(b))
        steps.append(line)
        line, sol = step_line(rhs, "/", k)
        steps.append(line)
    else:
        c = a * x + b
        if c.denominator != 1:
            x = Fraction(rng.randint(1, hi))
            c = a * x + b
        form = rng.randrange(2)
        problem = f"Solve for x: {a}x + {b} = {format_number(c)}" if form == 0 else f"Solve for x: {b} + {a}x = {format_number(c)}"
        line, rhs = step_line(c, "-", Fraction(b))
        steps.append(line)
        line, sol = step_line(rhs, "/", Fraction(a))
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
        s1, r = step_line(F(a), "+", F(b))
        s2, r = step_line(r, "-", F(c))
        steps = [s1, s2]
    elif t == 1:
        a, b = rng.randint(2, hi), rng.randint(2, 9)
        problem = f"A {item} costs {a} dollars. {name} buys {b} {item}s. How many dollars does {name} spend?"
        s1, r = step_line(F(a), "*", F(b))
        steps = [s1]
    elif t == 2:
        b = rng.randint(2, 6)
        a = b * rng.randint(1, hi) if d < 4 else rng.randint(b + 1, b * hi)
        problem = f"{name} shares {a} {item}s equally among {b} friends. How many {item}s does each friend get?"
        s1, r = step_line(F(a), "/", F(b))
        steps = [s1]
    elif t == 3:
        a, b, c = rng.randint(2, hi), rng.randint(2, 7), rng.randint(1, hi)
        problem = (f"{name} reads {a} pages a day for {b} days, then {c} more pages. "
                   f"How many pages does {name} read in all?")
        s1, r = step_line(F(a), "*", F(b))
        s2, r = step_line(r, "+", F(c))
        steps = [s1, s2]
    else:
        a, b = rng.randint(2, hi), rng.randint(2, 6)
        c = rng.randint(1, a * b)
        problem = f"A box holds {a} {item}s. {name} has {b} boxes and eats {c} {item}s. How many {item}s are left?"
        s1, r = step_line(F(a), "*", F(b))
        s2, r = step_line(r, "-", F(c))
        steps = [s1, s2]
    if d >= 3 and rng.random() < 0.5:
        k = rng.randint(2, 4)
        problem = problem[:-1] + f", multiplied by {k}?"
        s3, r = step_line(r, "*", F(k))
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

