"""One in-process episode of a bifurcation instance (see :mod:`environments.tasks.bifurcation`
for the semantics and the text protocol)."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any, Optional, Sequence

from environments.base import Environment, StepResult, TaskInstance, derive_seed
from environments.ground_truth import GroundTruthCredit, TabularMDP
from environments.tasks.bifurcation_config import LETTERS, format_action, parse_action
from environments.tasks.bifurcation_dp import _exact_tables

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
