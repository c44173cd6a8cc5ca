"""One-line programming tasks verified by hidden unit tests run in a sandbox (survey §3.2, §8.2).

Each problem asks for the body of a Python function ``f`` from its signature and docstring
(``def f(a, b):`` / "Return the larger of a and b."). Problems come from a fixed list of
templates (:data:`TEMPLATES`, some with a parameter ``k``): a few dozen distinct problems, each
assigned to the train or eval split by the hash of its key (train and eval never share a
problem). Instances of a split cycle through its problems in a seeded order; every instance
draws its own hidden test inputs (``num_tests``), whose expected outputs come from the
template's reference body (trusted code, evaluated in-process at generation time).

Text protocol
-------------
* Prompt::

      Write the body of f as one line.
      def f(a, b):
          \"\"\"Return the larger of a and b.\"\"\"

  (ends with ``"\\n"``). The policy's action is **one line**, the function body, e.g.
  ``"return max(a, b)\\n"`` (indentation is added; a bare expression gets ``return``).
* The body runs against the hidden tests **inside the sandbox** (:mod:`code_harness`, written
  into the work directory, run as ``python3 -I -S cf_harness.py`` with ``exec_timeout_s``); the
  harness prints a machine-readable summary line that the environment parses.
* ``max_attempts > 1`` (multi-turn): after a failing attempt the observation is a short test
  summary, e.g. ``"# 2/5 failed: f(1, 2) expected 2 got 1\\n"`` (first failure only, at most
  ``feedback_chars`` characters), and the policy writes a revised body line. The last
  observation is the summary followed by ``"done: success"`` / ``"done: failure"``.
* Reward (terminal, on the final attempt): 1.0 when all hidden tests pass, else 0.0; with
  ``partial_credit=True`` the fraction of tests passed. Success = all tests pass. Done reasons:
  ``success``, ``tests_failed`` (out of attempts), ``sandbox_<reason>`` when the sandbox reports
  a fault (``timeout``, ``oom``, ``output_limit``, ``killed``, ``cpu_limit``, ``error``, ...) — the
  episode ends at once with reward 0, whatever attempts remain. A body that exits the harness
  early (no summary line) is a failed attempt (``error: no test summary``), not a sandbox fault.
* ``StepResult.info``: ``passed``, ``total``, ``attempt``, ``error``, ``terminal_reward`` on the
  final step. ``StepResult.action`` is the stripped body line (None when empty).
* ``privileged() = {"reference_body": ..., "tests": [[args, expected], ...], "template": key}``.
* Needs a sandbox: ``make(instance, sandbox)`` without one raises. :meth:`CodeFamily.verify`
  returns None: the verdict is computed during the episode, while the sandbox exists.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from environments.base import (
    SPLITS,
    EnvConfig,
    Environment,
    StepResult,
    TaskFamily,
    TaskInstance,
    as_action_text,
    derive_seed,
    hash_split,
    require_spec,
)
from environments.registry import register_family
from environments.tasks import code_harness
from stages.config_fields import param

HARNESS_FILE = "cf_harness.py"
TASK_FILE = "cf_task.json"
BODY_FILE = "cf_body.txt"
RESULT_TAG = "CFRESULT"
MAX_BODY_CHARS = 2000
EVAL_SHARE = 4  # 1 in EVAL_SHARE problems belongs to the eval split


@dataclass
class CodeConfig(EnvConfig):
    """Keys allowed under ``env.`` for the code family."""

    name: str = param("code", help="task family (registry name)")
    max_attempts: int = param(1, help="attempts per episode; > 1 shows a test summary after each failure (multi-turn)", ge=1)
    num_tests: int = param(5, help="hidden unit tests per instance", ge=1)
    partial_credit: bool = param(False, help="terminal reward = fraction of tests passed instead of all-or-nothing")
    exec_timeout_s: float = param(5.0, help="wall-clock limit of one test run in the sandbox (then sandbox_timeout)", gt=0)
    feedback_chars: int = param(120, help="longest test-summary observation shown between attempts", ge=0)
    train_size: int = param(256, help="train-split instance pool size (cycles through the split's problems)", ge=0)
    eval_size: int = param(64, help="eval-split instance pool size", ge=0)


# ----------------------------------------------------------------------------- templates
# (key, params, docstring, reference body, input kind, k values or None). ``{k}`` is substituted.

def _ints(rng: random.Random, n: int) -> list[Any]:
    return [rng.randint(-9, 9) for _ in range(n)]


def _list(rng: random.Random, nonempty: bool = False) -> list[int]:
    return [rng.randint(-9, 9) for _ in range(rng.randint(1 if nonempty else 0, 5))]


def _word(rng: random.Random, nonempty: bool = False) -> str:
    return "".join(rng.choice("abcdeiou") for _ in range(rng.randint(1 if nonempty else 0, 6)))


INPUTS: dict[str, Callable[[random.Random], list[Any]]] = {
    "ab": lambda r: _ints(r, 2),
    "n": lambda r: _ints(r, 1),
    "xs": lambda r: [_list(r)],
    "xs+": lambda r: [_list(r, nonempty=True)],
    "s": lambda r: [_word(r)],
    "s+": lambda r: [_word(r, nonempty=True)],
}
PARAMS = {"ab": ["a", "b"], "n": ["n"], "xs": ["xs"], "xs+": ["xs"], "s": ["s"], "s+": ["s"]}

TEMPLATES: list[tuple[str, str, str, str, Optional[tuple[int, ...]]]] = [
    ("max2", "ab", "Return the larger of a and b.", "return max(a, b)", None),
    ("min2", "ab", "Return the smaller of a and b.", "return min(a, b)", None),
    ("add2", "ab", "Return the sum of a and b.", "return a + b", None),
    ("sub2", "ab", "Return a minus b.", "return a - b", None),
    ("mul2", "ab", "Return the product of a and b.", "return a * b", None),
    ("absdiff", "ab", "Return the absolute difference of a and b.", "return abs(a - b)", None),
    ("eq2", "ab", "Return True if a equals b, else False.", "return a == b", None),
    ("addk", "n", "Return n plus {k}.", "return n + {k}", (2, 3, 5, 7)),
    ("mulk", "n", "Return n times {k}.", "return n * {k}", (2, 3, 4, 6)),
    ("modk", "n", "Return n modulo {k}.", "return n % {k}", (2, 3, 4, 5)),
    ("gtk", "n", "Return True if n is greater than {k}, else False.", "return n > {k}", (0, 1, 3, 5)),
    ("square", "n", "Return n squared.", "return n * n", None),
    ("neg", "n", "Return the negation of n.", "return -n", None),
    ("iseven", "n", "Return True if n is even, else False.", "return n % 2 == 0", None),
    ("sum", "xs", "Return the sum of the list xs.", "return sum(xs)", None),
    ("len", "xs", "Return the number of elements of xs.", "return len(xs)", None),
    ("maxl", "xs+", "Return the largest element of xs.", "return max(xs)", None),
    ("minl", "xs+", "Return the smallest element of xs.", "return min(xs)", None),
    ("sorted", "xs", "Return xs sorted in increasing order.", "return sorted(xs)", None),
    ("rev", "xs", "Return xs reversed, as a list.", "return xs[::-1]", None),
    ("last", "xs+", "Return the last element of xs.", "return xs[-1]", None),
    ("firstk", "xs", "Return the first {k} elements of xs.", "return xs[:{k}]", (1, 2, 3)),
    ("scalek", "xs", "Return xs with every element multiplied by {k}.", "return [x * {k} for x in xs]", (2, 3, 10)),
    ("countk", "xs", "Return how many times {k} occurs in xs.", "return xs.count({k})", (0, 1, 2)),
    ("bigk", "xs", "Return the elements of xs greater than {k}.", "return [x for x in xs if x > {k}]", (0, 2, 4)),
    ("srev", "s", "Return the string s reversed.", "return s[::-1]", None),
    ("supper", "s", "Return s in upper case.", "return s.upper()", None),
    ("slen", "s", "Return the length of s.", "return len(s)", None),
    ("sfirst", "s+", "Return the first character of s.", "return s[0]", None),
    ("vowels", "s", "Return the number of vowels (a, e, i, o, u) in s.", "return sum(c in 'aeiou' for c in s)", None),
    ("srepk", "s", "Return s repeated {k} times.", "return s * {k}", (2, 3)),
]


def all_problems() -> list[dict[str, Any]]:
    """Every (template, k) problem: key, params, doc, reference body, input kind."""
    out = []
    for key, kind, doc, body, ks in TEMPLATES:
        for k in ks if ks is not None else (None,):
            sub = (lambda t: t.replace("{k}", str(k))) if k is not None else (lambda t: t)
            out.append({"key": key if k is None else f"{key}{k}", "template": key, "kind": kind,
                        "params": PARAMS[kind], "doc": sub(doc), "reference_body": sub(body)})
    return out


def problem_split(key: str) -> str:
    return hash_split(f"code|{key}", EVAL_SHARE)


def _reference(params: list[str], body: str) -> Callable[..., Any]:
    ns: dict[str, Any] = {}
    exec(code_harness.build_source(params, body), ns)  # our own trusted template bodies only
    return ns["f"]


def prompt_of(spec: dict[str, Any]) -> str:
    return f'Write the body of f as one line.\ndef f({", ".join(spec["params"])}):\n    """{spec["doc"]}"""\n'


def feedback_line(summary: dict[str, Any], max_chars: int) -> str:
    """``"# 2/5 failed: f(1, 2) expected 2 got 1"`` / ``"# 5/5 passed"`` / ``"# error: ..."``."""
    total, passed = int(summary.get("total", 0)), int(summary.get("passed", 0))
    if summary.get("error"):
        text = f"# error: {summary['error']}"
    elif passed == total:
        text = f"# {passed}/{total} passed"
    else:
        fail = (summary.get("failures") or [{}])[0]
        text = f"# {total - passed}/{total} failed: {fail.get('call', '?')} expected {fail.get('expected', '?')} got {fail.get('got', '?')}"
    text = text.replace("\n", " ")
    return text if len(text) <= max_chars else text[: max(max_chars - 3, 0)] + "..."


# ----------------------------------------------------------------------------- environment


class CodeEnv(Environment):
    """One episode: up to ``max_attempts`` body lines, each run against the hidden tests."""

    def __init__(self, cfg: Any, instance: TaskInstance, sandbox: Any, episode_seed: int = 0):
        if sandbox is None:
            raise ValueError("the code family runs hidden tests in a sandbox: make(instance, sandbox=...) needs one")
        self.cfg, self.instance, self.box = cfg, instance, sandbox
        self.episode_seed = int(episode_seed)
        self.spec = instance.spec
        self._resets = 0
        self._sandbox_seconds = 0.0
        self._execs = 0
        self._files_ready = False
        self._started = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._attempt = 0
        self._done = False
        self._success = False
        self.history: list[tuple[str, int]] = []  # (body, passed)

    def _ensure_files(self) -> None:
        if self._files_ready:
            return
        t0 = time.perf_counter()
        self.box.write_file(HARNESS_FILE, Path(code_harness.__file__).read_bytes())
        task = {"params": self.spec["params"], "tests": self.spec["tests"]}
        self.box.write_file(TASK_FILE, json.dumps(task).encode())
        self._sandbox_seconds += time.perf_counter() - t0
        self._files_ready = True

    def reset(self) -> str:
        self._started = True
        self._resets += 1
        self._reset_state()
        self._ensure_files()
        return prompt_of(self.spec)

    def state_key(self) -> str:
        last = self.history[-1][1] if self.history else -1
        end = "|end" if self._done else ""
        return f"{self.instance.task_id}{end}|attempt={self._attempt}|passed={last}"

    def _run(self, body: str) -> tuple[Optional[dict[str, Any]], str]:
        """(summary, sandbox fault reason)."""
        nonce = secrets.token_hex(8)
        t0 = time.perf_counter()
        try:
            self.box.write_file(BODY_FILE, body.encode("utf-8", "replace"))
            res = self.box.exec(["python3", "-I", "-S", HARNESS_FILE], timeout_s=float(self.cfg.exec_timeout_s),
                                stdin=(nonce + "\n").encode())
        except Exception as exc:  # noqa: BLE001 - a broken sandbox is a sandbox fault, never a crash
            self._sandbox_seconds += time.perf_counter() - t0
            return None, f"error ({type(exc).__name__})"
        self._sandbox_seconds += time.perf_counter() - t0
        self._execs += 1
        if res.reason:
            return None, res.reason
        tag = f"{RESULT_TAG} {nonce} "
        for line in reversed(res.stdout.decode("utf-8", "replace").splitlines()):
            if line.startswith(tag):
                try:
                    summary = json.loads(line[len(tag):])
                    int(summary["passed"]), int(summary["total"])
                    return summary, ""
                except (ValueError, KeyError, TypeError):
                    break
        total = len(self.spec["tests"])
        return {"passed": 0, "total": total, "failures": [], "error": "no test summary"}, ""

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        text = as_action_text(action_text)
        body = text.split("\n", 1)[0][:MAX_BODY_CHARS]
        prefix = "" if text.endswith("\n") else "\n"
        self._ensure_files()
        summary, fault = self._run(body)
        self._attempt += 1
        action = body.strip() or None
        info: dict[str, Any] = {"attempt": self._attempt - 1, "turn_reward": 0.0}
        if fault:
            reason = "sandbox_" + fault.split(" ")[0]
            self.history.append((body, 0))
            self._done = True
            info.update(passed=0, total=len(self.spec["tests"]), error=f"sandbox fault: {fault}", terminal_reward=0.0)
            return StepResult(observation=prefix + f"# sandbox fault: {fault}\ndone: failure", reward=0.0, done=True,
                              action=action, state_key=self.state_key(), success=False, reason=reason, info=info)
        assert summary is not None
        passed, total = int(summary["passed"]), int(summary["total"])
        self.history.append((body, passed))
        all_pass = total > 0 and passed == total
        info.update(passed=passed, total=total, error=str(summary.get("error", "")))
        fb = feedback_line(summary, int(self.cfg.feedback_chars))
        if all_pass or self._attempt >= int(self.cfg.max_attempts):
            self._done = True
            self._success = all_pass
            reward = 1.0 if all_pass else (passed / total if self.cfg.partial_credit and total else 0.0)
            info["terminal_reward"] = reward
            return StepResult(observation=prefix + fb + ("\ndone: success" if all_pass else "\ndone: failure"),
                              reward=reward, done=True, action=action, state_key=self.state_key(),
                              success=all_pass, reason="success" if all_pass else "tests_failed", info=info)
        return StepResult(observation=prefix + fb + "\n", reward=0.0, done=False, action=action,
                          state_key=self.state_key(), info=info)

    @property
    def done(self) -> bool:
        return self._done

    def snapshot(self) -> dict[str, Any]:
        """Pure state: the sandbox holds only the harness, the task (rewritten when missing) and
        the body of the latest attempt (rewritten on every attempt), so no sandbox snapshot is needed."""
        return {"attempt": self._attempt, "done": self._done, "success": self._success,
                "started": self._started, "history": list(self.history)}

    def restore(self, handle: dict[str, Any]) -> None:
        self._attempt, self._done, self._success = handle["attempt"], handle["done"], handle["success"]
        self._started, self.history = handle["started"], list(handle["history"])
        self._resets += 1

    def stats(self) -> dict[str, float]:
        return {"sandbox_seconds": self._sandbox_seconds, "sandbox_execs": float(self._execs),
                "env_resets": float(max(self._resets, 1))}

    def privileged(self) -> dict[str, Any]:
        return {"reference_body": self.spec["reference_body"], "tests": self.spec["tests"],
                "template": self.spec["key"]}

    def close(self) -> None:
        """The sandbox belongs to the caller (the rollout stage closes it)."""


# ----------------------------------------------------------------------------- family


@register_family
class CodeFamily(TaskFamily):
    name = "code"
    Config = CodeConfig
    needs_sandbox = True
    #: no planning text (HICRA, Wang et al. 2025c §3): an action is one ``return`` line, a direct
    #: formula application -- the paper's own example of execution -- with no prose to steer it
    planning_pattern = None

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        self.problems = {s: [p for p in all_problems() if problem_split(p["key"]) == s] for s in SPLITS}
        self._refs: dict[str, Callable[..., Any]] = {}

    def _tests(self, prob: dict[str, Any], rng: random.Random) -> list[list[Any]]:
        fn = self._refs.get(prob["key"])
        if fn is None:
            fn = self._refs[prob["key"]] = _reference(prob["params"], prob["reference_body"])
        tests, seen = [], set()
        for _ in range(50 * int(self.cfg.num_tests)):
            args = INPUTS[prob["kind"]](rng)
            key = json.dumps(args)
            if key in seen:
                continue
            seen.add(key)
            tests.append([args, fn(*args)])
            if len(tests) == int(self.cfg.num_tests):
                break
        return tests

    def instance(self, split: str, index: int, seed: int, pool: Optional[list[dict[str, Any]]] = None) -> TaskInstance:
        probs = pool if pool is not None else self.problems[split]
        order = list(range(len(probs)))
        random.Random(hashlib.sha256(f"code-order|{split}|{seed}".encode()).digest()).shuffle(order)
        prob = probs[order[index % len(order)]]
        iseed = derive_seed("code-instance", split, seed, index)
        spec = dict(prob)
        spec["tests"] = self._tests(prob, random.Random(iseed))
        return TaskInstance(task_id=f"code-{split}-s{seed}-{index}-{prob['key']}", split=split, seed=iseed, spec=spec)

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> CodeEnv:
        require_spec(instance, ("params", "doc", "tests", "reference_body"), "code")
        return CodeEnv(self.cfg, instance, sandbox, episode_seed)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        n_train, n_eval = len(self.problems["train"]), len(self.problems["eval"])
        reward = "fraction of tests passed (partial credit)" if c.partial_credit else "1.0 iff all tests pass, else 0.0"
        return {
            "source": (f"templated one-line Python function problems ({len(TEMPLATES)} templates, "
                       f"{n_train + n_eval} problems), hidden tests drawn per instance"),
            "size": (f"train: {c.train_size} instances over {n_train} problems; eval: {c.eval_size} instances over "
                     f"{n_eval} problems"),
            "filtering": f"problems assigned to a split by hash of their key (1 in {EVAL_SHARE} to eval); disjoint",
            "metric": (f"success rate = all {c.num_tests} hidden tests pass (run in the sandbox, "
                       f"{c.exec_timeout_s}s limit); terminal reward {reward}; up to {c.max_attempts} attempt(s); a "
                       "sandbox fault ends the episode with reward 0"),
            "benchmark": f"code (one-line bodies, {c.max_attempts} attempt(s), {c.num_tests} tests)",
            "text_protocol": "prompt = signature + docstring; action = one body line ('return max(a, b)\\n')",
        }

    def profile(self) -> dict[str, Any]:
        multi = int(self.cfg.max_attempts) > 1
        return {
            "setting": "agentic" if multi else "reasoning",
            "turns": int(self.cfg.max_attempts),
            "trajectory_tokens": 60 + 40 * int(self.cfg.max_attempts),
            "verifiable_intermediate": multi,  # test feedback between attempts
            "verifiable_outcome": True,
            "stochastic": False,
            "partially_observable": False,
            "privileged_info": True,  # reference body and hidden tests
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """Format episodes: for a problem of either split's pool, bodies are reference bodies of
        *other* templates with the same signature (valid one-line Python over the right
        parameter names, never this problem's body), so the warm-up teaches "one ``return``
        line" and the vocabulary, not which body solves which docstring. Feedback observations
        are computed in-process with :func:`code_harness.run_tests` on those trusted bodies
        (a body may pass by coincidence, e.g. ``max`` vs ``sorted(...)[-1]``; rare)."""
        rng = random.Random(f"code-warmup|{seed}")
        probs = all_problems()
        by_kind: dict[str, list[str]] = {}
        for p in probs:
            by_kind.setdefault(tuple(p["params"]).__repr__(), []).append(p["reference_body"])
        out = []
        for i in range(n):
            prob = probs[rng.randrange(len(probs))]
            tests = self._tests(prob, random.Random(f"code-warmup-tests|{seed}|{i}"))
            others = [b for b in by_kind[tuple(prob["params"]).__repr__()] if b != prob["reference_body"]]
            spec = dict(prob, tests=tests)
            turns = []
            for attempt in range(int(self.cfg.max_attempts)):
                body = rng.choice(others)
                summary = code_harness.run_tests(prob["params"], body, tests)
                fb = feedback_line(summary, int(self.cfg.feedback_chars))
                all_pass = summary["passed"] == summary["total"]
                last = all_pass or attempt + 1 == int(self.cfg.max_attempts)
                obs = fb + (("\ndone: success" if all_pass else "\ndone: failure") if last else "\n")
                turns.append((body + "\n", obs))
                if last:
                    break
            out.append((prompt_of(spec), turns))
        return out
