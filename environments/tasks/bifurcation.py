"""Controlled bifurcation tasks with exact ground-truth credit (survey §4.6, §9.3).

A multi-turn text episode of ``horizon`` turns. At every turn the environment shows a cue (a
lowercase letter) and the policy answers with one uppercase letter. A few turns are
*decisive* (bifurcation points): there, the hidden rule's action for the cue keeps the episode
on track (with probability ``1 - slip_prob``) and any other answer puts it off track for good.
The remaining turns are *routine*: any valid letter is fine. The terminal reward is 1.0 iff
the episode is still on track at the end. Because the MDP is known, every turn's exact value,
Q-value and advantage under a reference policy are computed by dynamic programming
(:func:`exact_values`, :meth:`BifurcationEnv.ground_truth`): the instrument against which
every credit method is measured.

Semantics
---------
* A *rule* (a random permutation without fixed points drawn from ``rule_seed``, see
  :func:`make_rule`) maps cue ``a, b, c, ...`` to action ``A, B, C, ...``; it is shared by all
  instances, so it is learnable across episodes.
* An instance fixes which turns are decisive and the cue of every turn (``instance.spec``:
  ``horizon``, ``num_actions``, ``decisive``, ``cues``, ``answers``; JSON-serialisable).
  With ``distractors=True`` routine turns show a random cue as well, so decisive turns look
  like routine ones (unless ``mark_decisive``); with ``distractors=False`` routine turns show
  cue ``-``. The optimal policy answers the rule's action on every turn.
* State = (turn t, on-track bit). At a decisive turn: the rule's action keeps the bit with
  probability ``1 - slip_prob`` (a *slip* clears it: stochastic transition); a wrong letter
  clears it. At a routine turn a valid letter keeps the bit. **An invalid action (anything
  whose ``strip()`` is not exactly one valid letter) clears the bit on any turn: format errors
  fail the episode.** Once off track the episode can never succeed.
* ``terminate_on_error``: a wrong decisive letter or an invalid action ends the episode at once
  (terminal reward 0; variable trajectory length). Slips do not end the episode.
* Rewards: the *turn* reward ``r_t`` is ``decisive_reward`` for the rule's action at a decisive
  turn (whether or not it slips, on or off track), else 0. The *terminal* reward is 1.0 on
  success, else 0.0. ``StepResult.reward`` is ``r_t``, plus the terminal reward on the final
  step, whose ``info["terminal_reward"]`` gives the terminal part on its own (the agent loop
  splits it off into ``Trajectory.reward``; ``info["turn_reward"]`` is ``r_t`` on every step).
  The return is ``sum_t r_t + terminal``; ground-truth values are expectations of it.
* Randomness: slips only. Each episode draws its slip table (one uniform per turn) from
  ``random.Random`` seeded by (instance seed, ``episode_seed``), so the same instance and
  episode seed replay exactly, whatever the actions. :meth:`BifurcationEnv.restore` replays
  the same future slips unless given ``reseed`` (MC rollouts from a snapshot want fresh ones).

Text protocol
-------------
The rollout and warm-up code rely on this; the transcript of an episode is exactly the
concatenation ``prompt + action_0 + obs_1 + action_1 + obs_2 + ... + action_{T-1} + obs_T``
with nothing inserted.

* Prompt: ``"Follow the rule. Answer with one letter: A B.\\n"`` (the valid letters, space
  separated) followed by the first turn's observation.
* Turn observation: ``"t{k} cue {c}"`` with k = 1..H (1-based) and c the cue (``-`` on
  routine turns without distractors); with ``mark_decisive`` decisive turns read
  ``"t{k} ! cue {c}"``. Every observation where the policy must act **ends with the cue**
  (no trailing space), right where the policy answers. The cue is the last token of the
  context, so even a tiny policy reads it straight from the residual stream; with the cue
  earlier in the line a 2-layer model has to learn to attend to the *latest* of many cues
  first, and GRPO on the default task did not leave chance level in 25 iterations.
* **The policy emits a space, the letter and a newline: ``" A\\n"``**. The newline ends the
  turn: ``"\\n"`` is the stop text (a rollout engine stops at the first token whose text
  contains ``"\\n"``, and that token is part of the action). Warm-up episodes use exactly
  ``" A\\n"``.
* Parsing is lenient about whitespace: ``action_text.strip()`` must equal a valid letter
  (``"A"``, ``" A"``, ``"A\\n"`` are all action A); anything else is invalid
  (``StepResult.action`` is None).
* Observation after a step: the next turn's observation, or ``"done: success"`` /
  ``"done: failure"`` at the end. It does **not** start with ``"\\n"`` when the action text
  ended with ``"\\n"`` (the normal case); when the action text did not end with a newline
  (e.g. cut by the token limit) the observation is prefixed with ``"\\n"``, so every
  observation starts on a fresh line either way.

Example (H=3, decisive turn 2, rule a->B, b->A)::

    Follow the rule. Answer with one letter: A B.
    t1 cue a A
    t2 cue b A
    t3 cue a B
    done: success

Sandboxed mode
--------------
``env.sandboxed=true`` makes the family declare ``needs_sandbox`` (an instance attribute that
shadows the class default, so ``family.needs_sandbox`` is what the rollout stage reads) and
:meth:`BifurcationFamily.make` return a :class:`SandboxedBifurcationEnv`: each transition runs
a stdlib-only step script (``bifurcation_step.py``) inside the episode's sandbox, the state in
its work directory. Trajectories are identical to the in-process mode for the same seeds and
actions (tested); a sandbox fault ends the episode with reason ``sandbox_<reason>``. The
warm-up corpus is generated in-process (same texts).

State keys (GiGPO anchors): ``"{task_id}|t={t}|cue={c}|on={0|1}"`` for the state in which turn
``t`` (0-based) is taken, ``"{task_id}|end|t={t}|on={0|1}"`` for terminal states. They expose
the hidden on-track bit (the *true* MDP state): two episodes of an instance share a key iff
they are in the same true state.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from fractions import Fraction
from typing import Any, Optional, Sequence

from environments.base import (
    SPLITS,
    EnvConfig,
    Environment,
    StepResult,
    TaskFamily,
    TaskInstance,
    derive_seed,
)
from environments.registry import register_family
from environments.ground_truth import GroundTruthCredit, TabularMDP
from stages.config_fields import param

LETTERS = "ABCDEF"
CUES = "abcdef"
MAX_ACTIONS = len(LETTERS)
REFERENCE_POLICIES = ("uniform", "optimal")
#: the text the policy emits for action ``L`` (warm-up corpus, scripted agents)
ACTION_FORMAT = " {}\n"
#: the text that ends a policy turn
STOP_TEXT = "\n"
NO_CUE = "-"


@dataclass
class BifurcationConfig(EnvConfig):
    """Keys allowed under ``env.`` for the bifurcation family."""

    name: str = param("bifurcation", help="task family (registry name)")
    horizon: int = param(4, help="turns per episode (H)", ge=1)
    num_decisive: int = param(2, help="decisive turns (bifurcation points) per instance, 0..horizon", ge=0)
    num_actions: int = param(2, help="valid actions A, B, ... (2..6); cues a, b, ... likewise", ge=2, le=MAX_ACTIONS)
    slip_prob: float = param(0.0, help="probability that a correct decisive action still fails (stochastic transition)", ge=0, le=1)
    distractors: bool = param(True, help="routine turns show a cue too, so decisive turns are not marked")
    mark_decisive: bool = param(False, help="print a \"!\" marker on decisive turns")
    terminate_on_error: bool = param(False, help="a wrong decisive or invalid action ends the episode at once")
    decisive_reward: float = param(0.0, help="turn reward for a correct decisive action (besides terminal 1.0 on success)")
    train_size: int = param(512, help="train-split instance pool size", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)
    rule_seed: int = param(0, help="seed of the hidden cue->action rule shared by all instances")
    reference_policy: str = param("uniform", help="policy of the ground-truth V/Q/A: uniform (over valid actions) | optimal", choices=REFERENCE_POLICIES)
    sandboxed: bool = param(False, help="compute every transition inside a sandbox (stdlib step script; same trajectories)")

    def config_rules(self):
        """Rules between fields (checked by stages.config_fields.check)."""
        if self.num_decisive > self.horizon:
            yield "num_decisive", f"must be <= env.horizon={self.horizon}"



def make_rule(rule_seed: int, num_actions: int) -> dict[str, str]:
    """The hidden rule: cue letter -> action letter, a random *derangement* (no cue maps to its
    own capital, so the rule cannot be guessed by copying the cue). With 2 actions the only
    derangement is a->B, b->A, whatever ``rule_seed``."""
    rng = random.Random(derive_seed("bifurcation-rule", rule_seed, num_actions))
    while True:
        actions = list(LETTERS[:num_actions])
        rng.shuffle(actions)
        if all(actions[i] != LETTERS[i] for i in range(num_actions)):
            return {CUES[i]: actions[i] for i in range(num_actions)}


def parse_action(action_text: str, num_actions: int) -> Optional[str]:
    """The valid letter ``action_text`` denotes, or None (invalid)."""
    a = action_text.strip() if isinstance(action_text, str) else None
    return a if a is not None and len(a) == 1 and a in LETTERS[:num_actions] else None


def format_action(letter: str) -> str:
    """The exact text a well-formatted policy emits for ``letter`` (``"A\\n"``)."""
    return ACTION_FORMAT.format(letter)


# ----------------------------------------------------------------------------- exact values


def _dynamics(cfg: Any) -> tuple[Fraction, Fraction, bool, bool]:
    return (
        Fraction(cfg.slip_prob),
        Fraction(cfg.decisive_reward),
        bool(cfg.terminate_on_error),
        cfg.reference_policy == "optimal",
    )


def _exact_tables(spec: dict[str, Any], cfg: Any) -> tuple[list[list[Fraction]], list[list[dict[Optional[str], Fraction]]]]:
    """Backward induction in exact rational arithmetic (so routine advantages are exactly 0)."""
    H = int(spec["horizon"])
    letters = list(LETTERS[: int(spec["num_actions"])])
    decisive = set(spec["decisive"])
    answers = spec["answers"]
    slip, r_dec, terminate, optimal = _dynamics(cfg)
    V: list[list[Fraction]] = [[Fraction(0), Fraction(0)] for _ in range(H + 1)]
    V[H] = [Fraction(0), Fraction(1)]  # terminal reward 1.0 iff on track
    Q: list[list[dict[Optional[str], Fraction]]] = [[{}, {}] for _ in range(H)]
    for t in reversed(range(H)):
        for on in (0, 1):
            q: dict[Optional[str], Fraction] = {}
            for a in letters + [None]:
                correct = t in decisive and a is not None and a == answers[t]
                error = a is None or (t in decisive and not correct)
                r = r_dec if correct else Fraction(0)
                if error:
                    cont = Fraction(0) if terminate else V[t + 1][0]
                elif correct:
                    cont = (1 - slip) * V[t + 1][on] + slip * V[t + 1][0]
                else:
                    cont = V[t + 1][on]
                q[a] = r + cont
            Q[t][on] = q
            vals = [q[a] for a in letters]
            V[t][on] = max(vals) if optimal else sum(vals, Fraction(0)) / len(vals)
    return V, Q


def exact_values(spec: dict[str, Any], cfg: Any) -> tuple[list[list[float]], list[list[dict[Optional[str], float]]]]:
    """Exact V and Q of an instance under ``cfg.reference_policy``, by backward induction.

    ``V[t][on]`` for t = 0..H (``V[H]`` = terminal reward), ``on`` in {0, 1};
    ``Q[t][on][a]`` for t = 0..H-1 and ``a`` each valid letter or ``None`` (an invalid action).
    Values are expected returns (turn rewards + terminal reward) from the state onwards.
    """
    V, Q = _exact_tables(spec, cfg)
    return (
        [[float(v) for v in row] for row in V],
        [[{a: float(x) for a, x in q.items()} for q in row] for row in Q],
    )


# ----------------------------------------------------------------------------- environment


class BifurcationEnv(Environment):
    """One episode of a bifurcation instance (see the module docstring for the protocol)."""

    def __init__(
        self,
        cfg: Any,
        instance: TaskInstance,
        episode_seed: int = 0,
        tables: Optional[tuple[list[list[Fraction]], list[list[dict[Optional[str], Fraction]]]]] = None,
    ):
        spec = instance.spec
        self.cfg = cfg
        self.instance = instance
        self.episode_seed = int(episode_seed)
        self.horizon = int(spec["horizon"])
        self.num_actions = int(spec["num_actions"])
        self.letters = LETTERS[: self.num_actions]
        self.decisive = [t in set(spec["decisive"]) for t in range(self.horizon)]
        self.cues: list[str] = list(spec["cues"])
        self.answers: list[Optional[str]] = list(spec["answers"])
        self._tables = tables
        #: slip outcome of each turn (privileged; only matters on decisive turns)
        self.slips = self._draw_slips(random.Random(derive_seed("episode", instance.seed, self.episode_seed)))
        self._started = False
        self._t = 0
        self._on = True
        self._done = False
        self._success = False
        self.actions: list[Optional[str]] = []

    def _draw_slips(self, rng: random.Random) -> list[bool]:
        p = float(self.cfg.slip_prob)
        return [rng.random() < p for _ in range(self.horizon)]

    # -- text ------------------------------------------------------------------------------

    @property
    def prompt_header(self) -> str:
        return f"Follow the rule. Answer with one letter: {' '.join(self.letters)}.\n"

    def observation(self, t: int) -> str:
        mark = " !" if self.cfg.mark_decisive and self.decisive[t] else ""
        return f"t{t + 1}{mark} cue {self.cues[t]}"

    # -- Environment API -----------------------------------------------------------------

    def reset(self) -> str:
        self._started = True
        self._t, self._on, self._done, self._success = 0, True, False, False
        self.actions = []
        return self.prompt_header + self.observation(0)

    def _key(self, t: int, on: bool, terminal: bool) -> str:
        tid = self.instance.task_id
        if terminal:
            return f"{tid}|end|t={t}|on={int(on)}"
        return f"{tid}|t={t}|cue={self.cues[t]}|on={int(on)}"

    def state_key(self) -> str:
        return self._key(self._t, self._on, self._done)

    def _transition(self, t: int, on: bool, a: Optional[str], slips: Sequence[bool]) -> tuple[bool, float, bool]:
        """(next on-track bit, turn reward, terminated early) of action ``a`` at turn ``t``."""
        correct = self.decisive[t] and a is not None and a == self.answers[t]
        error = a is None or (self.decisive[t] and not correct)
        reward = float(self.cfg.decisive_reward) if correct else 0.0
        if error:
            return False, reward, bool(self.cfg.terminate_on_error)
        if correct and slips[t]:
            return False, reward, False
        return on, reward, False

    def _apply(self, t: int, action_text: str) -> tuple[Optional[str], bool, float, bool]:
        """(parsed action, next on-track bit, turn reward, terminated early) of turn ``t``."""
        a = parse_action(action_text, self.num_actions)
        on, reward, terminated = self._transition(t, self._on, a, self.slips)
        return a, on, reward, terminated

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        t = self._t
        a, on, reward, terminated = self._apply(t, action_text)
        self.actions.append(a)
        self._on = on
        self._t = t + 1
        done = terminated or self._t >= self.horizon
        prefix = "" if isinstance(action_text, str) and action_text.endswith("\n") else "\n"
        info: dict[str, Any] = {"turn": t, "valid": a is not None, "turn_reward": reward}
        if done:
            self._done = True
            self._success = on
            info["terminal_reward"] = 1.0 if on else 0.0
            reward += info["terminal_reward"]
            obs = prefix + ("done: success" if on else "done: failure")
            reason = "success" if on else ("invalid_action" if terminated and a is None else "failure")
        else:
            obs = prefix + self.observation(self._t)
            reason = ""
        return StepResult(
            observation=obs,
            reward=reward,
            done=done,
            action=a,
            state_key=self.state_key(),
            success=self._success if done else False,
            reason=reason,
            info=info,
        )

    @property
    def done(self) -> bool:
        return self._done

    def _get_tables(self) -> tuple[list[list[Fraction]], list[list[dict[Optional[str], Fraction]]]]:
        if self._tables is None:
            self._tables = _exact_tables(self.instance.spec, self.cfg)
        return self._tables

    def ground_truth(self, actions: list[Optional[str]]) -> GroundTruthCredit:
        """Exact credit of the taken actions (letters, or None for invalid) under the reference policy.

        ``value[t] = V(s_t)``, ``q_value[t] = Q(s_t, a_t)``, ``advantage[t] = Q - V``, where
        ``s_t``'s on-track bit follows this episode's realized slips (its slip table), so the
        result describes the episode that was actually played with these actions.
        A string that is not a bare letter is parsed like action text."""
        V, Q = self._get_tables()
        values: list[float] = []
        qs: list[float] = []
        advs: list[float] = []
        states: list[int] = []
        on = True
        ended = False
        for t, a in enumerate(actions):
            if ended or t >= self.horizon:
                raise ValueError(
                    f"ground_truth: {len(actions)} actions, but the episode of {self.instance.task_id} "
                    f"ends after {t} turns"
                )
            if a is not None:
                a = parse_action(a, self.num_actions)
            states.append(int(on))
            v, q = V[t][int(on)], Q[t][int(on)][a]
            values.append(float(v))
            qs.append(float(q))
            advs.append(float(q - v))
            on, _, ended = self._transition(t, on, a, self.slips)
        return GroundTruthCredit(
            value=values,
            q_value=qs,
            advantage=advs,
            decisive=list(self.decisive[: len(actions)]),
            reference_policy=str(self.cfg.reference_policy),
            mdp=self.tabular_mdp(states),
        )

    def tabular_mdp(self, states: list[int]) -> TabularMDP:
        """This instance's MDP in the family-independent form of :class:`TabularMDP` (states
        0 = off track, 1 = on track, 2 = ended by ``terminate_on_error``; actions the valid
        letters, then None = invalid), the same dynamics as :func:`_exact_tables`; ``states`` are
        the realized states of the played turns."""
        spec = self.instance.spec
        H, letters = int(spec["horizon"]), list(LETTERS[: int(spec["num_actions"])])
        decisive, answers = set(spec["decisive"]), spec["answers"]
        slip, r_dec, terminate = float(self.cfg.slip_prob), float(self.cfg.decisive_reward), bool(self.cfg.terminate_on_error)
        OFF, ON, END = 0, 1, 2
        reward: list[list[list[float]]] = []
        trans: list[list[list[list[float]]]] = []
        for t in range(H):
            r_t, p_t = [], []
            for s in (OFF, ON, END):
                r_s, p_s = [], []
                for a in letters + [None]:
                    nxt = [0.0, 0.0, 0.0]
                    if s == END:
                        r_s.append(0.0)
                        nxt[END] = 1.0
                        p_s.append(nxt)
                        continue
                    correct = t in decisive and a is not None and a == answers[t]
                    error = a is None or (t in decisive and not correct)
                    r_s.append(r_dec if correct else 0.0)
                    if error:
                        nxt[END if terminate else OFF] = 1.0
                    elif correct and s == ON:
                        nxt[ON], nxt[OFF] = 1.0 - slip, slip
                    else:
                        nxt[s] = 1.0
                    p_s.append(nxt)
                r_t.append(r_s)
                p_t.append(p_s)
            reward.append(r_t)
            trans.append(p_t)
        return TabularMDP(reward=reward, transition=trans, terminal_value=[0.0, 1.0, 0.0], states=list(states),
                          actions=[*letters, None], action_texts=[format_action(a) for a in letters])

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": self._t,
            "on": self._on,
            "done": self._done,
            "success": self._success,
            "started": self._started,
            "actions": list(self.actions),
            "slips": list(self.slips),
        }

    def restore(self, handle: dict[str, Any], reseed: Optional[int] = None) -> None:
        """Resume from ``handle``. With ``reseed`` the slips of the turns not yet taken are
        redrawn from (instance seed, episode seed, reseed): independent futures for MC rollouts."""
        self._t, self._on, self._done = handle["t"], handle["on"], handle["done"]
        self._success, self._started = handle["success"], handle["started"]
        self.actions = list(handle["actions"])
        self.slips = list(handle["slips"])
        if reseed is not None:
            fresh = self._draw_slips(random.Random(derive_seed("reseed", self.instance.seed, self.episode_seed, reseed)))
            self.slips = self.slips[: self._t] + fresh[self._t :]


class SandboxFault(Exception):
    """A sandbox exec of the sandboxed mode failed (``reason``: the ExecResult reason or ``error``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


STEP_SCRIPT = "bif_step.py"
SPEC_FILE = "bif_spec.json"
STATE_FILE = "bif_state.json"


class SandboxedBifurcationEnv(BifurcationEnv):
    """``env.sandboxed=true``: every transition is computed by a stdlib-only script
    (:mod:`environments.tasks.bifurcation_step`) run inside the episode's sandbox, with the
    state kept in the sandbox work directory (``bif_state.json``). The host mirrors the state the
    script reports, so text, rewards, state keys, ground truth and snapshots are exactly those of
    :class:`BifurcationEnv` for the same instance, episode seed and actions. A sandbox fault
    (``ExecResult.reason`` set, a non-zero exit, unreadable output) ends the episode with
    terminal reward 0 and reason ``sandbox_<reason>`` (observation ``"done: failure"``)."""

    def __init__(self, cfg: Any, instance: TaskInstance, sandbox: Any, episode_seed: int = 0, tables: Any = None,
                 exec_timeout_s: Optional[float] = None):
        if sandbox is None:
            raise ValueError("env.sandboxed=true: make(instance, sandbox=...) needs a sandbox")
        super().__init__(cfg, instance, episode_seed=episode_seed, tables=tables)
        self.box = sandbox
        #: None: the sandbox's own limit (``sandbox.exec_timeout_s``)
        self.exec_timeout_s = exec_timeout_s
        self._sandbox_seconds = 0.0
        self._execs = 0
        self._resets = 0

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._sandbox_seconds += time.perf_counter() - t0

    def _write_state(self) -> None:
        spec = {
            "letters": self.letters,
            "decisive": list(self.decisive),
            "answers": list(self.answers),
            "slips": list(self.slips),
            "decisive_reward": float(self.cfg.decisive_reward),
            "terminate_on_error": bool(self.cfg.terminate_on_error),
        }
        state = {"t": self._t, "on": self._on, "done": self._done}
        try:
            self._timed(self.box.write_file, STEP_SCRIPT, _step_script_bytes())
            self._timed(self.box.write_file, SPEC_FILE, json.dumps(spec).encode())
            self._timed(self.box.write_file, STATE_FILE, json.dumps(state).encode())
        except Exception as exc:  # noqa: BLE001
            raise SandboxFault("error", f"{type(exc).__name__}: {exc}") from exc

    def reset(self) -> str:
        prompt = super().reset()
        self._resets += 1
        self._fault: Optional[str] = None
        try:
            self._write_state()
        except SandboxFault as exc:
            self._fault = exc.reason  # reported by the first step
        return prompt

    def _apply(self, t: int, action_text: str) -> tuple[Optional[str], bool, float, bool]:
        if getattr(self, "_fault", None):
            raise SandboxFault(self._fault or "error")
        payload = json.dumps({"action": action_text if isinstance(action_text, str) else None}).encode()
        try:
            res = self._timed(self.box.exec, ["python3", "-I", "-S", STEP_SCRIPT], timeout_s=self.exec_timeout_s,
                              stdin=payload)
        except Exception as exc:  # noqa: BLE001 - a broken sandbox is a fault, never a crash
            raise SandboxFault("error", f"{type(exc).__name__}: {exc}") from exc
        self._execs += 1
        if res.reason:
            raise SandboxFault(res.reason)
        try:
            if res.exit_code != 0:
                raise ValueError(f"exit code {res.exit_code}: {res.stderr[-200:]!r}")
            out = json.loads(res.stdout.decode().strip().splitlines()[-1])
            a = out["a"]
            if int(out["t"]) != t + 1 or (a is not None and a not in self.letters):
                raise ValueError(f"unexpected step output {out!r}")
            return a, bool(out["on"]), float(out["reward"]), bool(out["terminated"])
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise SandboxFault("error", str(exc)) from exc

    def step(self, action_text: str) -> StepResult:
        try:
            return super().step(action_text)
        except SandboxFault as exc:
            t = self._t
            self.actions.append(None)
            self._t, self._on, self._done, self._success = t + 1, False, True, False
            prefix = "" if isinstance(action_text, str) and action_text.endswith("\n") else "\n"
            info = {"turn": t, "valid": False, "turn_reward": 0.0, "terminal_reward": 0.0, "sandbox_fault": str(exc)}
            return StepResult(observation=prefix + "done: failure", reward=0.0, done=True, action=None,
                              state_key=self.state_key(), success=False, reason=f"sandbox_{exc.reason}", info=info)

    def restore(self, handle: dict[str, Any], reseed: Optional[int] = None) -> None:
        super().restore(handle, reseed=reseed)
        self._resets += 1
        self._fault = None
        try:
            self._write_state()
        except SandboxFault as exc:
            self._fault = exc.reason

    def stats(self) -> dict[str, float]:
        return {"sandbox_seconds": self._sandbox_seconds, "sandbox_execs": float(self._execs),
                "env_resets": float(max(self._resets, 1))}


_STEP_SCRIPT_CACHE: list[bytes] = []


def _step_script_bytes() -> bytes:
    if not _STEP_SCRIPT_CACHE:
        _STEP_SCRIPT_CACHE.append((Path(__file__).resolve().parent / "bifurcation_step.py").read_bytes())
    return _STEP_SCRIPT_CACHE[0]


# ----------------------------------------------------------------------------- family


@register_family
class BifurcationFamily(TaskFamily):
    name = "bifurcation"
    Config = BifurcationConfig
    needs_sandbox = False

    exact_mdp = True  # every ground truth carries the instance's TabularMDP (oracle credit)

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        #: per instance: the sandboxed mode runs its transitions in a sandbox (shadows the class default)
        self.needs_sandbox = bool(getattr(self.cfg, "sandboxed", False))
        #: the hidden rule (privileged: for scripted agents and tests)
        self.rule = make_rule(self.cfg.rule_seed, self.cfg.num_actions)
        self._tables_cache: dict[str, Any] = {}

    def pool_size(self, split: str) -> int:
        """Configured instance count of ``split`` (``train_size`` / ``eval_size``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return int(self.cfg.train_size if split == "train" else self.cfg.eval_size)

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        """Instance ``index`` of ``split`` for ``seed`` (train/eval use disjoint seed streams)."""
        cfg = self.cfg
        iseed = derive_seed("bifurcation-instance", split, seed, index)
        rng = random.Random(iseed)
        H = int(cfg.horizon)
        decisive = sorted(rng.sample(range(H), int(cfg.num_decisive)))
        cues: list[str] = []
        for t in range(H):
            c = CUES[rng.randrange(cfg.num_actions)]  # drawn on every turn: same stream either way
            cues.append(c if (t in decisive or cfg.distractors) else NO_CUE)
        answers = [self.rule[cues[t]] if t in decisive else None for t in range(H)]
        spec = {
            "horizon": H,
            "num_actions": int(cfg.num_actions),
            "decisive": decisive,
            "cues": cues,
            "answers": answers,
            "rule_seed": int(cfg.rule_seed),
        }
        return TaskInstance(task_id=f"bif-{split}-s{seed}-{index}", split=split, seed=iseed, spec=spec)

    def _tables(self, instance: TaskInstance) -> Any:
        key = f"{instance.task_id}|{instance.seed}"
        tables = self._tables_cache.get(key)
        if tables is None:
            if len(self._tables_cache) > 4096:
                self._tables_cache.clear()
            tables = self._tables_cache[key] = _exact_tables(instance.spec, self.cfg)
        return tables

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> BifurcationEnv:
        """A :class:`BifurcationEnv`; with ``env.sandboxed`` a :class:`SandboxedBifurcationEnv`,
        which needs ``sandbox`` (ValueError without one)."""
        spec = instance.spec
        for k in ("horizon", "num_actions", "decisive", "cues", "answers"):
            if k not in spec:
                raise ValueError(f"instance {instance.task_id}: spec lacks {k!r} (not a bifurcation instance?)")
        if self.needs_sandbox:
            return SandboxedBifurcationEnv(self.cfg, instance, sandbox, episode_seed=episode_seed,
                                           tables=self._tables(instance))
        return BifurcationEnv(self.cfg, instance, episode_seed=episode_seed, tables=self._tables(instance))

    def exact_values(self, instance: TaskInstance) -> tuple[list[list[float]], list[list[dict[Optional[str], float]]]]:
        return exact_values(instance.spec, self.cfg)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        structure = (
            f"H={c.horizon}, {c.num_decisive} decisive turns, {c.num_actions} actions, slip_prob={c.slip_prob}, "
            f"distractors={c.distractors}, mark_decisive={c.mark_decisive}, "
            f"terminate_on_error={c.terminate_on_error}, decisive_reward={c.decisive_reward}"
        )
        metric = (
            "success rate = fraction of episodes ending on track (every decisive turn answered with the "
            "rule's action and not slipped, no invalid action on any turn); terminal reward 1.0 on success "
            "else 0.0"
        )
        if c.decisive_reward:
            metric += f"; plus a turn reward of {c.decisive_reward} per correct decisive action"
        return {
            "source": f"procedurally generated bifurcation MDPs, rule_seed={c.rule_seed} ({structure})",
            "size": f"train: {c.train_size} instances; eval: {c.eval_size} instances",
            "filtering": "none",
            "metric": metric,
            "benchmark": (
                f"bifurcation ({structure}); splits: train, eval (disjoint seed streams; instance "
                "layouts may repeat when the layout space is small)"
            ),
            "ground_truth": f"exact V/Q/advantage by dynamic programming under the {c.reference_policy} reference policy",
            "text_protocol": "policy emits '<LETTER>\\n' right after the observation's ':'; a turn ends at the first '\\n'",
            "execution": ("every transition computed by a stdlib step script inside the episode's sandbox"
                          if c.sandboxed else "in-process"),
        }

    def profile(self) -> dict[str, Any]:
        """Decision-tree profile: an agentic multi-turn task, verifiable outcome only, cheap resets
        (snapshots), stochastic when ``slip_prob > 0``."""
        return {
            "setting": "agentic",
            "turns": self.cfg.horizon,
            "trajectory_tokens": 8 * self.cfg.horizon + 16,
            "verifiable_intermediate": False,
            "verifiable_outcome": True,
            "stochastic": self.cfg.slip_prob > 0,
            "partially_observable": False,
            "privileged_info": False,
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """``n`` episodes with uniformly random valid actions, each written as ``" A\\n"``.

        Instances come from a separate "warmup" seed stream (not the train or eval pools)."""
        out: list[tuple[str, list[tuple[str, str]]]] = []
        for i in range(n):
            inst = self.instance("warmup", i, seed)
            rng = random.Random(derive_seed("warmup-actions", seed, i))
            # in-process even in the sandboxed mode: the texts are identical by construction
            env = BifurcationEnv(self.cfg, inst, episode_seed=rng.getrandbits(31), tables=self._tables(inst))
            prompt = env.reset()
            turns: list[tuple[str, str]] = []
            while True:
                text = format_action(rng.choice(env.letters))
                res = env.step(text)
                turns.append((text, res.observation))
                if res.done:
                    break
            out.append((prompt, turns))
        return out
