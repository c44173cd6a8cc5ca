"""One in-process episode of a bifurcation instance (see :mod:`environments.tasks.bifurcation`
for the semantics, the variants and the text protocol)."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any, Optional, Sequence

from environments.base import Environment, StepResult, TaskInstance, derive_seed
from environments.ground_truth import GroundTruthCredit, TabularMDP
from environments.tasks.bifurcation_config import parse_action
from environments.tasks.bifurcation_dp import ON, STATE_LABELS, Dynamics, exact_tables, tabular_mdp


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
        self.variant = str(getattr(cfg, "variant", "decisive"))
        self.dynamics = Dynamics(spec, cfg)
        #: the valid action letters (``S`` = stop last with ``variant=varh``)
        self.letters = "".join(self.dynamics.letters)
        self.decisive = [t in set(spec["decisive"]) for t in range(self.horizon)]
        self.cues: list[str] = list(spec["cues"])
        self.answers: list[Optional[str]] = list(spec["answers"])
        self._tables = tables
        #: slip outcome of each turn (privileged; only matters on decisive turns)
        self.slips = self._draw_slips(random.Random(derive_seed("episode", instance.seed, self.episode_seed)))
        self._started = False
        self._t = 0
        self._s = ON  # state code (bifurcation_dp: OFF, ON, REPAIR)
        self._done = False
        self._success = False
        self.actions: list[Optional[str]] = []

    def _draw_slips(self, rng: random.Random) -> list[bool]:
        p = float(self.cfg.slip_prob)
        return [rng.random() < p for _ in range(self.horizon)]

    # -- text ------------------------------------------------------------------------------

    @property
    def prompt_header(self) -> str:
        stop = ", or S to stop" if self.variant == "varh" else ""
        return f"Follow the rule. Answer with one letter: {' '.join(self.letters[: self.num_actions])}{stop}.\n"

    def observation(self, t: int) -> str:
        mark = " !" if self.cfg.mark_decisive and self.decisive[t] else ""
        return f"t{t + 1}{mark} cue {self.cues[t]}"

    # -- Environment API -----------------------------------------------------------------

    def reset(self) -> str:
        self._started = True
        self._t, self._s, self._done, self._success = 0, ON, False, False
        self.actions = []
        return self.prompt_header + self.observation(0)

    def _key(self, t: int, s: int, terminal: bool) -> str:
        tid = self.instance.task_id
        if terminal:
            return f"{tid}|end|t={t}|on={int(s == ON)}"
        return f"{tid}|t={t}|cue={self.cues[t]}|on={STATE_LABELS[s]}"

    def privileged(self) -> dict[str, Any]:
        """The hidden rule's answer at each turn (``None`` on routine turns, where any valid letter
        is fine) and the decisive turns: training-time only (SWEET-RL's critic), never shown to the
        policy (the observations show the cue, not the rule)."""
        return {"answers": list(self.answers), "decisive": [t for t, d in enumerate(self.decisive) if d]}

    def state_key(self) -> str:
        return self._key(self._t, self._s, self._done)

    def _transition(self, t: int, s: int, a: Optional[str], slips: Sequence[bool]) -> tuple[int, float, bool]:
        """(next state code, turn reward, terminated early) of action ``a`` at turn ``t`` in state
        ``s`` (:meth:`environments.tasks.bifurcation_dp.Dynamics.step` with this episode's slip)."""
        s2, r, ended = self.dynamics.step(t, int(s), a, bool(slips[t]))
        return s2, float(r), ended

    def _apply(self, t: int, action_text: str) -> tuple[Optional[str], int, float, bool]:
        """(parsed action, next state code, turn reward, terminated early) of turn ``t``."""
        a = parse_action(action_text, self.num_actions, self.variant)
        s, reward, terminated = self._transition(t, self._s, a, self.slips)
        return a, s, reward, terminated

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        t = self._t
        a, s, reward, terminated = self._apply(t, action_text)
        self.actions.append(a)
        self._s = s
        on = s == ON
        self._t = t + 1
        done = terminated or self._t >= self.horizon
        prefix = "" if isinstance(action_text, str) and action_text.endswith("\n") else "\n"
        # a decisive turn is verifiable: the hidden rule checks its action and its turn reward
        # (decisive_reward when right, 0 when wrong) is exact; a routine turn has nothing to check
        info: dict[str, Any] = {"turn": t, "valid": a is not None, "turn_reward": reward,
                                "verifiable": bool(self.decisive[t])}
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
            self._tables = exact_tables(self.instance.spec, self.cfg)
        return self._tables

    def ground_truth(self, actions: list[Optional[str]]) -> GroundTruthCredit:
        """Exact credit of the taken actions (letters, or None for invalid) under the reference policy.

        ``value[t] = V(s_t)``, ``q_value[t] = Q(s_t, a_t)``, ``advantage[t] = Q - V``, where the
        state ``s_t`` follows this episode's realized slips (its slip table), so the result
        describes the episode that was actually played with these actions. ``decisive[t]``: a
        decisive turn, the stop turn (varh) or a repair turn (recovery); ``mistake[t]``: a wrong
        letter at a decisive turn taken on track. A string that is not a bare letter is parsed
        like action text."""
        V, Q = self._get_tables()
        values: list[float] = []
        qs: list[float] = []
        advs: list[float] = []
        states: list[int] = []
        decisive: list[bool] = []
        mistake: list[bool] = []
        s = ON
        ended = False
        for t, a in enumerate(actions):
            if ended or t >= self.horizon:
                raise ValueError(
                    f"ground_truth: {len(actions)} actions, but the episode of {self.instance.task_id} "
                    f"ends after {t} turns"
                )
            if a is not None:
                a = parse_action(a, self.num_actions, self.variant)
            states.append(s)
            decisive.append(self.dynamics.is_bifurcation(t, s))
            mistake.append(self.dynamics.is_mistake(t, s, a))
            v, q = V[t][s], Q[t][s][a]
            values.append(float(v))
            qs.append(float(q))
            advs.append(float(q - v))
            s, _, ended = self._transition(t, s, a, self.slips)
        return GroundTruthCredit(
            value=values,
            q_value=qs,
            advantage=advs,
            decisive=decisive,
            reference_policy=str(self.cfg.reference_policy),
            mdp=self.tabular_mdp(states),
            mistake=mistake if self.variant == "recovery" else None,
        )

    def tabular_mdp(self, states: list[int]) -> TabularMDP:
        """This instance's MDP in the family-independent form of :class:`TabularMDP`
        (:func:`environments.tasks.bifurcation_dp.tabular_mdp`); ``states`` are the realized
        states of the played turns."""
        return tabular_mdp(self.instance.spec, self.cfg, states)

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": self._t,
            "on": self._s,  # state code
            "done": self._done,
            "success": self._success,
            "started": self._started,
            "actions": list(self.actions),
            "slips": list(self.slips),
        }

    def restore(self, handle: dict[str, Any], reseed: Optional[int] = None) -> None:
        """Resume from ``handle``. With ``reseed`` the slips of the turns not yet taken are
        redrawn from (instance seed, episode seed, reseed): independent futures for MC rollouts."""
        self._t, self._s, self._done = handle["t"], int(handle["on"]), handle["done"]
        self._success, self._started = handle["success"], handle["started"]
        self.actions = list(handle["actions"])
        self.slips = list(handle["slips"])
        if reseed is not None:
            fresh = self._draw_slips(random.Random(derive_seed("reseed", self.instance.seed, self.episode_seed, reseed)))
            self.slips = self.slips[: self._t] + fresh[self._t :]
