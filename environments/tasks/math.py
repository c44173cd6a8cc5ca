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
  (:func:`~environments.tasks.math_checker.parse_answer`): integers (``14``, ``-3``,
  ``1,000``), fractions (``3/4``, ``-3/4``), decimals (``0.75``, ``.5``), mixed numbers
  (``2 1/2``), ``x=5`` / ``x = 5``, ``$14``, a trailing period, a trailing unit word
  (``14 apples``), ``\\boxed{..}`` and ``\\frac{a}{b}``, an optional ``:`` after ``answer``. Unevaluated expressions (``answer 3+4``) are *not*
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
* With ``env.ground_truth_mc=N`` (default 0: off) the ground truth is instead step credit from
  exhaustive Monte Carlo (:mod:`environments.tasks.math_mc`): ``value[t]`` = the success
  probability of a noisy scripted reference policy continuing after the first t lines (N
  continuations, cached on disk under ``env.ground_truth_mc_dir`` with their cost),
  ``q_value[t]`` = the next prefix's value (the terminal reward after the last turn),
  ``advantage = q_value - value``, ``value_se`` their standard errors; ``stats()`` adds the
  ``gt_mc_*`` cost counters (continuations, env steps, seconds, cache hits).
* ``privileged() = {"answer": "15/4", "reference_steps": ["20-5=15", ...], "kind": ...}``.
* State keys (GiGPO anchors): ``"{task_id}|t={t}|h={hash of the normalised step lines so far}"``:
  two episodes share a key iff they wrote the same steps (ignoring spaces and case).

The exact checker (step lines, answers) is :mod:`environments.tasks.math_checker`; the problem
generators are :mod:`environments.tasks.math_problems`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional

from environments.base import (
    EnvConfig,
    Environment,
    StepResult,
    TaskFamily,
    TaskInstance,
    as_action_text,
    derive_seed,
    require_spec,
)
from environments.registry import register_family
from environments.ground_truth import GroundTruthCredit
from environments.tasks.math_checker import check_step, format_number, is_answer_line, parse_answer
from environments.tasks import math_mc
from environments.tasks.math_problems import EVAL_SHARE, KINDS, generate_problem, step_line
from environments.planning_text import STRATEGIC_GRAMS, grams_pattern
from stages.config_fields import param

STOP_TEXT = "\n"


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
    ground_truth_mc: int = param(0, help="ground truth = step credit from N MC continuations of the noisy scripted "
                                 "reference policy per prefix (environments/tasks/math_mc.py; survey §9.3); 0 = step-check",
                                 ge=0)
    ground_truth_mc_noise: float = param(0.2, help="probability that the MC reference policy writes a wrong line",
                                         ge=0, lt=1)
    ground_truth_mc_dir: str = param("~/.cache/creditflow/math_mc", help="on-disk cache of the MC prefix values")


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
        #: cost of the MC ground truth (env.ground_truth_mc > 0): computed continuations and cache hits
        self._mc_cost = {"gt_mc_continuations": 0.0, "gt_mc_env_steps": 0.0, "gt_mc_seconds": 0.0,
                         "gt_mc_cache_hits": 0.0}
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
        self.check_can_step()
        text = as_action_text(action_text)
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
        if int(getattr(self.cfg, "ground_truth_mc", 0)) > 0:
            return self._mc_ground_truth(n, decisive)
        return GroundTruthCredit(value=[0.0] * n, q_value=list(adv), advantage=adv, decisive=decisive,
                                 reference_policy="step-check")

    def _mc_ground_truth(self, n: int, decisive: list[bool]) -> GroundTruthCredit:
        """``env.ground_truth_mc=N``: ``value[t] = V(prefix_t)`` by N MC continuations of the noisy
        scripted reference policy (cached on disk), ``q_value[t] = V(prefix_{t+1})`` (the terminal
        reward after the episode's last turn), ``advantage = q - value``
        (:mod:`environments.tasks.math_mc`); ``value_se`` the standard errors."""
        cfg = self.cfg
        N, noise = int(cfg.ground_truth_mc), float(cfg.ground_truth_mc_noise)
        policy = math_mc.policy_hash(noise)
        cache = math_mc.MCCache(str(cfg.ground_truth_mc_dir))
        values: list[float] = []
        ses: list[float] = []
        for t in range(n + 1):
            if t == n and self._done and n == len(self.verdicts):
                values.append(1.0 if self._success else 0.0)  # the last turn's next value: its terminal reward
                ses.append(0.0)
                break
            lines = self.lines[:t]
            key = math_mc.prefix_key(self.instance.task_id, self.instance.seed, self.problem, lines, policy, N,
                                     self.max_steps)
            entry = cache.get(key)
            if entry is None:
                handle = {"t": t, "done": False, "success": False, "started": True, "lines": list(lines),
                          "verdicts": list(self.verdicts[:t]), "answered": None}
                entry = math_mc.estimate_value(lambda: MathEnv(self.cfg, self.instance), handle, self.reference_steps,
                                               self.answer, noise, N, seed=int(key[:8], 16))
                cache.put(key, entry)
                self._mc_cost["gt_mc_continuations"] += entry["cost"]["continuations"]
                self._mc_cost["gt_mc_env_steps"] += entry["cost"]["env_steps"]
                self._mc_cost["gt_mc_seconds"] += entry["cost"]["seconds"]
            else:
                self._mc_cost["gt_mc_cache_hits"] += 1
            values.append(float(entry["value"]))
            ses.append(float(entry["se"]))
        q = values[1 : n + 1]
        return GroundTruthCredit(value=values[:n], q_value=q, advantage=[b - a for a, b in zip(values[:n], q)],
                                 decisive=decisive, reference_policy=f"mc:{math_mc.POLICY}(noise={noise}),n={N}",
                                 value_se=ses[: n + 1])

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
        out = {"env_resets": float(max(self._resets, 1)), "sandbox_seconds": 0.0, "sandbox_execs": 0.0}
        if int(getattr(self.cfg, "ground_truth_mc", 0)) > 0:
            out.update(self._mc_cost)
        return out

    def privileged(self) -> dict[str, Any]:
        return {"answer": format_number(self.answer), "reference_steps": list(self.reference_steps),
                "kind": self.instance.spec.get("kind", "")}


# ----------------------------------------------------------------------------- family


#: planning text of a math step (HICRA, Wang et al. 2025c §3): the step lines are one operation
#: each, ``"12*7=84"``, so the paper's split of "what to do" (planning) from "carrying out the
#: operation" (execution) falls inside the line: the left-hand side, which chooses the operands and
#: the operator (the decomposition of the problem), plans; ``"=84"``, the computed result, executes;
#: an ``answer`` line is the final commitment, not planning. Prose lines (which the protocol admits
#: as unverified steps, e.g. ``"first add the tens"`` from a larger policy) plan by the paper's
#: natural-language strategic grams.
PLANNING_PATTERN = r"^(?!\s*(?i:answer)\b)\s*[^=\s][^=\n]*(?==)|" + grams_pattern(STRATEGIC_GRAMS)


@register_family
class MathFamily(TaskFamily):
    name = "math"
    privileged_keys = ("answer", "reference_steps", "kind")
    Config = MathConfig
    needs_sandbox = False
    planning_pattern = PLANNING_PATTERN

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
            "ground_truth": (f"step credit V(prefix_t+1) - V(prefix_t) from {c.ground_truth_mc} MC continuations of "
                             f"the noisy scripted reference policy (noise {c.ground_truth_mc_noise}), cached"
                             if c.ground_truth_mc else
                             "step-check: every step line verified exactly (+1 correct / -1 incorrect), decisive = "
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
                line, r = step_line(a, op, b)
                seen.append(r)
                res = env.step(line + "\n")
                turns.append((line + "\n", res.observation))
            text = f"answer {format_number(rng.choice(seen))}\n"
            res = env.step(text)
            turns.append((text, res.observation))
            out.append((prompt, turns))
        return out
