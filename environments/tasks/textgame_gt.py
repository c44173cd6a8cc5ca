"""Ground truth of the textgame family (``env.ground_truth=mc|exhaustive``): Monte Carlo and exact
values under the uniform policy over TextWorld Express's validActions, each state restored by
replaying the recorded prefix on a scratch game (Jansen & Côté 2022, TextWorld Express; survey
§4.6 on ground-truth credit). See :mod:`environments.tasks.textgame`, "Ground truth", for the
estimator; this module holds the pieces it uses (moved out of ``textgame.py``, issue 14).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from environments.ground_truth import MCGroundTruth  # noqa: F401  (textgame_env imports it from here)
from environments.tasks import textgame_twx as twx


class _Replayer:
    """Plays from a recorded prefix: a scratch game reset to the instance and replayed."""

    def __init__(self, spec: dict[str, Any], cfg: Any):
        self.spec, self.cfg = spec, cfg
        self.game = twx.acquire(spec["game"], spec["params"])
        self.steps = 0
        self.rollouts = 0

    def at(self, actions: list[str]) -> dict[str, Any]:
        _, info = self.game.reset(seed=int(self.spec["game_seed"]), gameFold=self.spec["fold"])
        for a in actions:
            _, _, _, info = self.game.step(a)
            self.steps += 1
        return info

    def step(self, a: str) -> tuple[float, dict[str, Any]]:
        _, r, _, info = self.game.step(a)
        self.steps += 1
        return float(r), info

    def close(self) -> None:
        twx.release(self.game)


def _ended(info: dict[str, Any]) -> bool:
    return bool(info.get("tasksuccess")) or bool(info.get("taskfailure"))


def _reward_of(cfg: Any, r: float, info: dict[str, Any]) -> float:
    """The family's reward of one engine step (turn + terminal part, see ``env.reward``)."""
    if cfg.reward == "score":
        return float(r)
    return 1.0 if info.get("tasksuccess") else 0.0


def mc_value(rep: _Replayer, prefix: list[str], turns_left: int, n: int, rng: random.Random) -> tuple[float, float]:
    """Monte Carlo V (mean, standard error) of the state after ``prefix`` under the uniform policy
    over validActions for ``turns_left`` turns, from ``n`` rollouts (each restored by replay)."""
    if turns_left <= 0:
        return 0.0, 0.0
    rets = []
    for _ in range(n):
        info = rep.at(prefix)
        if _ended(info):
            return 0.0, 0.0
        ret = 0.0
        rep.rollouts += 1
        for _ in range(turns_left):
            r, info = rep.step(rng.choice(sorted(info["validActions"])))
            ret += _reward_of(rep.cfg, r, info)
            if _ended(info):
                break
        rets.append(ret)
    mean = sum(rets) / n
    var = sum((x - mean) ** 2 for x in rets) / (n - 1)
    return mean, math.sqrt(var / n)


def exhaustive_value(rep: _Replayer, prefix: list[str], turns_left: int, max_nodes: int) -> float:
    """Exact V of the state after ``prefix`` under the uniform policy over validActions for
    ``turns_left`` turns, by enumerating every action sequence (``ValueError`` past ``max_nodes``)."""
    count = [0]

    def v(path: list[str], left: int) -> float:
        count[0] += 1
        if count[0] > max_nodes:
            raise ValueError(f"exhaustive ground truth: more than {max_nodes} nodes (env.gt_max_nodes)")
        info = rep.at(path)
        if left <= 0 or _ended(info):
            return 0.0
        acts = sorted(info["validActions"])
        total = 0.0
        for a in acts:
            rep.at(path)
            r, nxt = rep.step(a)
            total += _reward_of(rep.cfg, r, nxt) + (0.0 if _ended(nxt) else v(path + [a], left - 1))
        return total / len(acts)

    return v(list(prefix), turns_left)
