"""Step credit of math episodes from exhaustive Monte Carlo continuations (survey §9.3; issue 15,
"reasoning tasks with step credit from exhaustive Monte Carlo, computed once, cached, its cost
recorded").

``V(prefix)`` is the success probability of a fixed *reference policy* continuing the episode
after the step lines of ``prefix``, estimated from ``n`` continuations played through the real
:class:`~environments.tasks.math.MathEnv` (from a restored snapshot of the prefix). The credit of
turn t is ``V(prefix_{t+1}) - V(prefix_t)`` (VinePPO's MC advantage, Kazemnejad et al. 2024
§3.1, with a frozen policy), the last turn's "next value" being its terminal reward (1 on the
right answer, else 0); step rewards (``env.step_reward``) are not part of V.

Reference policy: **the task's own scripted solution with noise** (``noisy-scripted-v1``),
chosen over a frozen model checkpoint because it is exactly reproducible and costs no forward
passes: with j the number of verified-correct lines so far, it writes reference step j
(``spec["steps"][j]``), or once the steps are exhausted ``answer <exact answer>``; with
probability ``noise`` it writes instead the same line with a wrong result (the step's result + 1,
an incorrect step) or a wrong answer (answer + 1). An incorrect line does not derail it, but
costs a turn of the ``max_steps`` budget; so V falls with each wasted turn. Its randomness is
seeded by the cache key: the same (instance, prefix, policy, n) gives the same estimate.

Cache: one JSON file per (instance, prefix, policy hash, n) under ``env.ground_truth_mc_dir``,
written atomically, holding the estimate, its standard error ``sqrt(V (1 - V) / n)`` and its
cost (continuations, environment steps, generated characters, seconds). A hit does no rollout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Optional

from environments.tasks.math_checker import format_number

POLICY = "noisy-scripted-v1"


def policy_hash(noise: float) -> str:
    """Identifies the reference policy (its name and version, and ``noise``)."""
    return hashlib.blake2b(f"{POLICY}|noise={float(noise)!r}".encode(), digest_size=8).hexdigest()


def _wrong_result(step: str) -> str:
    lhs, _, rhs = step.rpartition("=")
    return f"{lhs}={format_number(Fraction(rhs) + 1)}"


def scripted_line(steps: list[str], answer: Fraction, correct_so_far: int, noise: float, rng: random.Random) -> str:
    """The reference policy's next line (see the module docstring), with its trailing newline."""
    slip = rng.random() < noise
    if correct_so_far < len(steps):
        step = steps[correct_so_far]
        return (_wrong_result(step) if slip else step) + "\n"
    return f"answer {format_number(answer + 1 if slip else answer)}\n"


class MCCache:
    """The on-disk cache of prefix values (one JSON file per key, atomic writes)."""

    def __init__(self, directory: str):
        self.dir = Path(os.path.expanduser(directory))

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def get(self, key: str) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(key).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry, sort_keys=True))
        os.replace(tmp, self._path(key))


def prefix_key(task_id: str, instance_seed: int, problem: str, lines: list[str], policy: str, n: int,
               max_steps: int) -> str:
    """The cache key of ``V(prefix)``: instance, prefix lines, policy hash, n (and the turn budget)."""
    text = json.dumps([task_id, instance_seed, problem, lines, policy, n, max_steps])
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).hexdigest()


def estimate_value(make_env: Callable[[], Any], handle: dict[str, Any], steps: list[str], answer: Fraction,
                   noise: float, n: int, seed: int) -> dict[str, Any]:
    """``n`` continuations of the reference policy from the snapshot ``handle``; the success rate,
    its standard error and the cost."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    wins = env_steps = chars = 0
    env = make_env()
    for _ in range(n):
        env.restore(handle)
        correct = sum(bool(v) for v in handle["verdicts"])
        res = None
        while not env.done:
            line = scripted_line(steps, answer, correct, noise, rng)
            res = env.step(line)
            env_steps += 1
            chars += len(line)
            correct += bool(res.info.get("step_correct")) and not res.info.get("is_answer")
        wins += bool(res is not None and res.success)
    v = wins / n
    return {"value": v, "se": (v * (1 - v) / n) ** 0.5, "n": n, "policy": POLICY, "noise": float(noise),
            "cost": {"continuations": n, "env_steps": env_steps, "generated_chars": chars,
                     "seconds": time.perf_counter() - t0}}
