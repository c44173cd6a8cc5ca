"""FrozenLake (Gymnasium ``FrozenLake-v1``) with exact ground-truth credit (survey §4.1, §4.6, §9.3).

RAGEN's stochastic grid world: walk from ``S`` to the goal ``G`` over frozen cells ``F`` without
falling into a hole ``H``; with ``is_slippery`` the move goes in the intended direction with
probability 1/3 and to either perpendicular side otherwise (stochastic transitions, §4.1).
Terminal reward 1.0 on reaching G (gym's reward, passed through), 0 otherwise.

The environment is Gymnasium's own (``gymnasium.make("FrozenLake-v1", desc=..., is_slippery=...)``)
behind the adapter's text protocol (:mod:`environments.tasks.gym_adapter`): the policy emits
``" left\\n"``, ``" down\\n"``, ``" right\\n"`` or ``" up\\n"`` (or the index 0-3); the observation
is the map with the agent's cell drawn as ``A`` (``env.render`` ``grid``), the line
``"t{k} at {row},{col}:"`` (``position``) or both; the position ends the observation, right where
the policy answers (a tiny policy reads it from the last tokens, cf. the bifurcation family).

Maps (``env.map_name``): Gymnasium's ``4x4`` / ``8x8``, a ``custom`` map (``env.custom_map``,
rows separated by ``/``: ``"SFF/FHF/FFG"``) or ``random``: one map per instance from
``generate_random_map(env.random_size, env.random_frozen_prob, seed)`` (always solvable), a map
belonging to the train or the eval split by the hash of its text, so the splits never share a
map. With a fixed map the splits differ in their seeds only (the slippery transitions).

Ground truth (exact, by dynamic programming over gym's transition table ``env.unwrapped.P``):
states = the cells plus one *ended* state (reached by an invalid action when
``env.invalid_action=end``); actions = the four moves plus the invalid action (a no-op, or the end
of the episode); horizon = ``env.max_turns``. ``V``, ``Q`` and the advantage of every played turn
under the reference policy (uniform over the four moves, or optimal) come from
:func:`environments.tabular_values.finite_horizon_values`; a turn is *decisive* when the moves'
Q-values at its cell differ by at least ``env.decisive_gap``. The MDP is exported as
:class:`environments.ground_truth.TabularMDP` (``exact_mdp``), so ``credit=oracle`` computes the
exact credit under the current policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from environments.base import SPLITS, EnvConfig, TaskInstance, derive_seed, hash_split
from environments.ground_truth import GroundTruthCredit, TabularMDP
from environments.registry import register_family
from environments.tabular_values import REFERENCE_POLICIES, finite_horizon_values, played_credit
from environments.tasks.gym_adapter import (
    ACTION_FORMAT,
    INVALID_ACTIONS,
    GymFamily,
    GymTextEnv,
    _gym_instance,
    random_valid_episodes,
)
from stages.config_fields import param

MAP_NAMES = ("4x4", "8x8", "custom", "random")
RENDERS = ("grid", "position", "both")
MOVES = ("left", "down", "right", "up")
EVAL_SHARE = 5


def map_problem(text: str) -> Optional[str]:
    """The rule of ``env.custom_map`` when ``text`` breaks it ("" is allowed: unused)."""
    if not text:
        return None
    rows = str(text).split("/")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        return "rows (separated by /) must have equal, non-zero length"
    cells = "".join(rows)
    if set(cells) - set("SFHG"):
        return "cells must be S, F, H or G"
    if cells.count("S") != 1 or cells.count("G") < 1:
        return "needs exactly one S and at least one G"
    return None


@dataclass
class FrozenLakeConfig(EnvConfig):
    """Keys allowed under ``env.`` for the FrozenLake family."""

    name: str = param("frozenlake", help="task family (registry name)")
    map_name: str = param("4x4", help="4x4 | 8x8 (Gymnasium's maps) | custom (env.custom_map) | random (one map per instance)", choices=MAP_NAMES)
    custom_map: str = param("", help="map_name=custom: rows of S/F/H/G separated by /, e.g. SFF/FHF/FFG",
                            check=map_problem, rule="rows of S/F/H/G of equal length, one S, a G")
    random_size: int = param(4, help="map_name=random: side of the generated maps", ge=2, le=16)
    random_frozen_prob: float = param(0.8, help="map_name=random: probability that a generated cell is frozen", gt=0, le=1)
    is_slippery: bool = param(True, help="moves slip to a perpendicular direction with probability 2/3 (Gymnasium's default)")
    max_turns: int = param(20, help="turns per episode at most (horizon of the ground truth)", ge=1)
    render: str = param("both", help="observation text: grid (the map, agent as A) | position (row,col) | both", choices=RENDERS)
    invalid_action: str = param("noop", help="effect of an unparsable action: noop (the turn passes) | end (the episode fails)", choices=INVALID_ACTIONS)
    reference_policy: str = param("uniform", help="policy of the ground-truth V/Q/A: uniform (over the 4 moves) | optimal", choices=REFERENCE_POLICIES)
    decisive_gap: float = param(0.05, help="a turn is decisive when the moves' Q-values at its cell differ by at least this", ge=0)
    sandboxed: bool = param(False, help="compute every transition inside the run's sandbox (stdlib step script; same trajectories)")
    train_size: int = param(512, help="train-split instance pool size", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)

    def config_rules(self):
        if self.map_name == "custom" and not self.custom_map:
            yield "custom_map", "must be set when env.map_name=custom"


def fixed_map(cfg: Any) -> Optional[list[str]]:
    """The rows of the configured map, or None for ``map_name=random``."""
    if cfg.map_name == "random":
        return None
    if cfg.map_name == "custom":
        return str(cfg.custom_map).split("/")
    from gymnasium.envs.toy_text.frozen_lake import MAPS

    return list(MAPS[cfg.map_name])


class FrozenLakeEnv(GymTextEnv):
    """One FrozenLake episode (module docstring); ``tables`` = the family's cached DP tables."""

    action_names = MOVES

    def __init__(self, cfg: Any, instance: TaskInstance, make_env: Any, tables: "LakeTables", episode_seed: int = 0,
                 sandbox: Any = None):
        super().__init__(cfg, instance, make_env, episode_seed=episode_seed, sandbox=sandbox)
        self.tables = tables
        self.desc = list(instance.spec["desc"])

    def intro(self) -> str:
        slip = " The ice is slippery: a move may go sideways." if self.cfg.is_slippery else ""
        return f"Frozen lake: walk from S to the goal G; H is a hole.{slip}"

    def _position(self) -> tuple[int, int]:
        s = int(self.unwrapped.s)
        return divmod(s, len(self.desc[0]))

    def render_text(self) -> str:
        r, c = self._position()
        if self.cfg.render == "position":
            return ""
        rows = [row if i != r else row[:c] + "A" + row[c + 1:] for i, row in enumerate(self.desc)]
        return "\n".join(rows)

    def _observation(self) -> str:
        r, c = self._position()
        grid = self.render_text()
        pos = f"t{self._t + 1} at {r},{c}:" if self.cfg.render != "grid" else f"t{self._t + 1}:"
        return f"{grid}\n{pos}" if grid else pos

    def ground_truth(self, actions: list[Optional[str]]) -> GroundTruthCredit:
        """Exact credit of the played turns under the reference policy (module docstring)."""
        if len(actions) > len(self.states):
            raise ValueError(f"ground_truth: {len(actions)} actions, but {len(self.states)} turns were played")
        idx = [self.parse(a)[0] if a is not None else None for a in actions]
        a_idx = [len(MOVES) if a is None else a for a in idx]
        states = [int(s) for s in self.states[: len(actions)]]
        value, q, adv, decisive = played_credit(self.tables.values, states, a_idx, len(MOVES), float(self.cfg.decisive_gap))
        return GroundTruthCredit(value=value, q_value=q, advantage=adv, decisive=decisive,
                                 reference_policy=str(self.cfg.reference_policy), mdp=self.tables.mdp(states))

    def privileged(self) -> dict[str, Any]:
        return {**super().privileged(), "map": "/".join(self.desc),
                "value_of_start": float(self.tables.values.V[0, int(self.states[0]) if self.states else 0])}


@dataclass
class LakeTables:
    """A map's stationary MDP (``transition`` (S+1, 5, S+1), ``reward`` (S+1, 5); state S = ended,
    action 4 = invalid) and its finite-horizon values under the reference policy."""

    transition: np.ndarray
    reward: np.ndarray
    values: Any
    horizon: int

    def __post_init__(self) -> None:
        self._lists: Optional[tuple[list, list]] = None

    def mdp(self, states: list[int]) -> TabularMDP:
        """The MDP in the family-independent form (the same per-turn tables shared by reference)."""
        if self._lists is None:
            r, p = self.reward.tolist(), self.transition.tolist()
            self._lists = ([r] * self.horizon, [p] * self.horizon)
        reward, transition = self._lists
        S = self.transition.shape[0]
        return TabularMDP(reward=reward, transition=transition, terminal_value=[0.0] * S, states=list(states),
                          actions=[*MOVES, None], action_texts=[ACTION_FORMAT.format(m) for m in MOVES])


def lake_tables(P: dict[int, dict[int, list]], n_cells: int, cfg: Any) -> LakeTables:
    """Exact tables from gym's transition table ``P`` (``unwrapped.P``)."""
    S, A = n_cells + 1, len(MOVES) + 1
    T = np.zeros((S, A, S))
    R = np.zeros((S, A))
    for s in range(n_cells):
        for a in range(len(MOVES)):
            for p, s2, r, _ in P[s][a]:
                T[s, a, s2] += p
                R[s, a] += p * r
        if cfg.invalid_action == "end":
            T[s, len(MOVES), n_cells] = 1.0
        else:
            T[s, len(MOVES), s] = 1.0
    T[n_cells, :, n_cells] = 1.0  # ended: absorbing, no reward
    H = int(cfg.max_turns)
    values = finite_horizon_values(T, R, H, len(MOVES), str(cfg.reference_policy))
    return LakeTables(transition=T, reward=R, values=values, horizon=H)


@register_family
class FrozenLakeFamily(GymFamily):
    name = "frozenlake"
    Config = FrozenLakeConfig  # type: ignore[assignment]
    exact_mdp = True  # every ground truth carries the map's TabularMDP (oracle credit)

    def __init__(self, cfg: Optional[Any] = None):
        super(GymFamily, self).__init__(cfg)
        self.needs_sandbox = bool(self.cfg.sandboxed)
        self._tables: dict[str, LakeTables] = {}

    def _random_map(self, split: str, index: int, seed: int) -> list[str]:
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        c = self.cfg
        for attempt in range(1000):
            rows = generate_random_map(int(c.random_size), float(c.random_frozen_prob),
                                       seed=derive_seed("frozenlake-map", split, seed, index, attempt) % (2 ** 31))
            if split == "warmup" or hash_split("frozenlake|" + "/".join(rows), EVAL_SHARE) == split:
                return list(rows)
        raise ValueError(f"no {split} map of size {c.random_size} in 1000 draws (too few distinct maps)")

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        if split not in (*SPLITS, "warmup"):
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        desc = fixed_map(self.cfg) or self._random_map(split, index, seed)
        return _gym_instance("lake", split, index, seed, {"desc": desc, "is_slippery": bool(self.cfg.is_slippery)})

    def tables(self, desc: list[str], P: Any) -> LakeTables:
        key = "/".join(desc)
        if key not in self._tables:
            if len(self._tables) > 1024:
                self._tables.clear()
            self._tables[key] = lake_tables(P, len(desc) * len(desc[0]), self.cfg)
        return self._tables[key]

    def make_env(self, instance: TaskInstance, sandbox: Any, episode_seed: int) -> FrozenLakeEnv:
        desc = list(instance.spec["desc"])
        slippery = bool(instance.spec.get("is_slippery", self.cfg.is_slippery))

        def make() -> Any:
            import gymnasium

            return gymnasium.make("FrozenLake-v1", desc=desc, is_slippery=slippery,
                                  max_episode_steps=int(self.cfg.max_turns))

        tables = self._tables.get("/".join(desc))
        if tables is None:
            probe = make()
            try:
                tables = self.tables(desc, probe.unwrapped.P)
            finally:
                probe.close()
        return FrozenLakeEnv(self.cfg, instance, make, tables, episode_seed=episode_seed, sandbox=sandbox)

    def start_value(self, instance: TaskInstance) -> float:
        """V(start) under the reference policy: the uniform policy's success probability (chance level)."""
        env = self.make_env(instance, None, 0)
        try:
            env.reset()
            return float(env.tables.values.V[0, int(env.unwrapped.s)])
        finally:
            env.close()

    def describe(self) -> dict[str, str]:
        c = self.cfg
        lake = (f"random {c.random_size}x{c.random_size} maps (frozen prob {c.random_frozen_prob})" if c.map_name == "random"
                else f"map {c.map_name}" + (f" {c.custom_map}" if c.map_name == "custom" else ""))
        chance = ""
        if c.map_name != "random":
            chance = f"; uniform-policy success probability {self.start_value(self.instance('eval', 0, 0)):.3f}"
        return {
            "source": f"Gymnasium FrozenLake-v1, {lake}, is_slippery={c.is_slippery}",
            "size": f"train: {c.train_size} instances; eval: {c.eval_size} instances",
            "filtering": ("maps split by hash of their text (1 in 5 to eval), disjoint" if c.map_name == "random"
                          else "one fixed map; splits differ in seeds (slippery transitions)"),
            "metric": f"success rate = reaching G within {c.max_turns} turns (terminal reward 1.0, else 0.0){chance}",
            "benchmark": f"frozenlake ({lake}, slippery={c.is_slippery}, max {c.max_turns} turns, invalid: {c.invalid_action})",
            "ground_truth": (f"exact V/Q/advantage by DP over gym's transition table under the {c.reference_policy} "
                             f"policy, horizon {c.max_turns}; decisive = moves' Q spread >= {c.decisive_gap}"),
            "text_protocol": "observation = map (agent A) + 't{k} at r,c:'; the policy emits ' left|down|right|up\\n'",
            "execution": "transitions in the run's sandbox (stdlib step script)" if c.sandboxed else "in-process",
        }

    def profile(self) -> dict[str, Any]:
        side = int(self.cfg.random_size) if self.cfg.map_name == "random" else len((fixed_map(self.cfg) or ["x"])[0])
        per_turn = (side + 1) * side // 2 + 8 if self.cfg.render != "position" else 8
        return {
            "setting": "agentic",
            "turns": int(self.cfg.max_turns),
            "trajectory_tokens": 40 + per_turn * int(self.cfg.max_turns),
            "verifiable_intermediate": False,
            "verifiable_outcome": True,
            "stochastic": bool(self.cfg.is_slippery),
            "partially_observable": False,
            "privileged_info": True,  # the true cell and the exact values (privileged())
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """``n`` episodes of uniformly random moves written as ``" left\\n"`` (format, not the way)."""
        return random_valid_episodes(self, n, seed, ACTION_FORMAT.format)
