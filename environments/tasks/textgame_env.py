"""The episode of a TextWorld Express game (``env=textgame``): :class:`TextGameEnv`, the text
protocol, state keys, snapshots by replay and the ground truth; documented in
:mod:`environments.tasks.textgame` (the family, its config and instances). Its engine calls go
through three hooks (``_engine_reset``, ``_engine_step``, ``_object_tree``) that the sandboxed mode
(:mod:`environments.tasks.textgame_sandboxed`) sends into the episode's sandbox."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from typing import Any, Optional

from environments.base import Environment, StepResult, TaskInstance, as_action_text, derive_seed
from environments.ground_truth import GroundTruthCredit
from environments.tasks import textgame_twx as twx
from environments.tasks.textgame_gt import MCGroundTruth, _ended, _Replayer, _reward_of, exhaustive_value, mc_value

PROMPT_MARK = "\n> "
_WS = re.compile(r"\s+")


def normalize_command(text: str) -> str:
    """The command a line denotes, for matching: first line, stripped, inner whitespace collapsed,
    lower-cased (``validActions`` are matched ignoring case: "put x in TV stand")."""
    return _WS.sub(" ", as_action_text(text).split("\n", 1)[0]).strip().lower()


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=8).hexdigest()


def _clean(text: str) -> str:
    return _WS.sub(" ", text or "").strip()


# ----------------------------------------------------------------------------- environment


class TextGameEnv(Environment):
    """One episode of a TextWorld Express game (protocol in the module docstring)."""

    def __init__(self, cfg: Any, instance: TaskInstance, episode_seed: int = 0):
        self._init_episode(cfg, instance, episode_seed, twx.acquire(instance.spec["game"], instance.spec["params"]))

    def _init_episode(self, cfg: Any, instance: TaskInstance, episode_seed: int, game: Any) -> None:
        """The episode's fields; ``game`` is the host engine (None when it runs in a sandbox)."""
        self.cfg, self.instance, self.spec = cfg, instance, instance.spec
        self.episode_seed = int(episode_seed)
        self.game: Any = game
        self._resets = 0
        self._engine_steps = 0
        self._gt_cost = {"gt_mc_continuations": 0.0, "gt_mc_env_steps": 0.0, "gt_mc_seconds": 0.0}
        self._started = False
        self._done = False
        self._has_tree: Optional[bool] = None
        self._gold: list[str] = []

    # -- engine -------------------------------------------------------------------------------

    def _engine_reset(self) -> dict[str, Any]:
        _, info = self.game.reset(seed=int(self.spec["game_seed"]), gameFold=self.spec["fold"])
        self._resets += 1
        return info

    def _engine_step(self, cmd: str) -> tuple[str, float, dict[str, Any]]:
        """One valid command sent to the engine: (observation, score delta, TextWorld Express's info)."""
        obs, r, _, info = self.game.step(cmd)
        self._engine_steps += 1
        return obs, r, info

    def _object_tree(self) -> Any:
        """TextWorld Express's object tree of the current state (empty for games without one)."""
        return self.game.getObjectTree()

    def gold_path(self) -> list[str]:
        """TextWorld Express's gold action sequence of this game (generated once, on a scratch game
        of the pool: generating it costs a reset ~6x dearer, which the warm-up corpus skips)."""
        if not self._gold:
            g = twx.acquire(self.spec["game"], self.spec["params"])
            try:
                g.reset(seed=int(self.spec["game_seed"]), gameFold=self.spec["fold"], generateGoldPath=True)
                self._gold = [str(a) for a in g.getGoldActionSequence()]
            finally:
                twx.release(g)
        return list(self._gold)

    def _set_state(self, info: dict[str, Any]) -> None:
        self.info = info
        self.valid = sorted(str(a) for a in info["validActions"])
        self._valid_by_norm = {normalize_command(a): a for a in self.valid}
        self.score = float(info.get("score", 0.0))
        look = _clean(info.get("look", ""))
        self.rooms[look.split(".", 1)[0]] = look

    def reset(self) -> str:
        info = self._engine_reset()
        self._started, self._done, self._success = True, False, False
        self._t = 0
        self.actions: list[str] = []
        self.rooms: dict[str, str] = {}
        self._set_state(info)
        return f"Task: {_clean(info['taskDescription'])}\n" + self._render(info["observation"])

    def _render(self, text: str) -> str:
        body = _clean(text)
        n = int(self.cfg.obs_chars)
        if n and len(body) > n:
            body = body[: max(n - 3, 1)] + "..."
        parts = [body]
        if self.cfg.show_inventory:
            parts.append("Inventory: " + _clean(self.info.get("inventory", "")).replace("Inventory: ", "", 1))
        if self.cfg.show_actions:
            parts.append("Actions: " + " | ".join(self.valid))
        return "\n".join(parts) + PROMPT_MARK

    def state_key(self) -> str:
        tid = self.instance.task_id
        end = "|end" if self._done else ""
        if self._has_tree is None:
            self._has_tree = bool(self._object_tree())
        if self._has_tree:
            return f"{tid}{end}|t={self._t}|tree={_digest(self._object_tree())}"
        obs = [_clean(self.info.get("look", "")), _clean(self.info.get("inventory", "")), self.score,
               sorted(self.rooms.items())]
        return f"{tid}{end}|t={self._t}|obs={_digest(obs)}"

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        text = as_action_text(action_text)
        prefix = "" if text.endswith("\n") else "\n"
        norm = normalize_command(text)
        cmd = self._valid_by_norm.get(norm)
        t = self._t
        self._t += 1
        info: dict[str, Any] = {"turn": t, "turn_reward": 0.0, "valid": cmd is not None}
        if cmd is not None:
            obs, r, einfo = self._engine_step(cmd)
            self.actions.append(cmd)
            self._set_state(einfo)
            turn_r = float(r) if self.cfg.reward == "score" else 0.0
            action: Optional[str] = cmd
            info["score"] = self.score
        else:
            info["invalid_reason"] = "empty" if not norm else "not a valid action"
            obs, turn_r, action = f"Unknown action: {info['invalid_reason']}.", 0.0, None
        info["turn_reward"] = turn_r
        success, failure = bool(self.info.get("tasksuccess")), bool(self.info.get("taskfailure"))
        if success or failure or self._t >= int(self.cfg.max_steps):
            self._done, self._success = True, success
            terminal = 1.0 if (success and self.cfg.reward == "success") else 0.0
            info["terminal_reward"] = terminal
            reason = "success" if success else ("failure" if failure else "max_turns")
            end = "done: success" if success else "done: failure"
            return StepResult(observation=prefix + _clean(obs) + "\n" + end, reward=turn_r + terminal, done=True,
                              action=action, state_key=self.state_key(), success=success, reason=reason, info=info)
        return StepResult(observation=prefix + self._render(obs), reward=turn_r, done=False, action=action,
                          state_key=self.state_key(), info=info)

    @property
    def done(self) -> bool:
        return self._done

    # -- snapshots: TextWorld Express's serialize = the actions; restore replays them -----------

    def snapshot(self) -> dict[str, Any]:
        return {"t": self._t, "actions": list(self.actions), "done": self._done, "started": self._started}

    def restore(self, handle: dict[str, Any]) -> None:
        """Back to ``handle``'s state: a fresh reset of the game, then its valid actions replayed
        (invalid turns changed nothing but the turn count, which is restored as well)."""
        info = self._engine_reset()
        self.actions, self.rooms = [], {}
        self._set_state(info)
        for a in handle["actions"]:
            _, _, _, info = self.game.step(a)
            self._engine_steps += 1
            self.actions.append(a)
            self._set_state(info)
        self._t, self._done, self._started = int(handle["t"]), bool(handle["done"]), bool(handle["started"])
        self._success = bool(self.info.get("tasksuccess"))

    # -- ground truth ----------------------------------------------------------------------

    def ground_truth(self, actions: list[Optional[str]]) -> Optional[GroundTruthCredit]:
        """Per-turn V/Q/A under the uniform policy over validActions (``env.ground_truth``; module
        docstring): ``None`` when ``none``. ``actions`` are the parsed commands (None = invalid)."""
        mode = self.cfg.ground_truth
        if mode == "none" or not actions:
            return None
        t0 = time.perf_counter()
        rep = _Replayer(self.spec, self.cfg)
        rng = random.Random(derive_seed("textgame-gt", self.instance.seed, self.episode_seed))
        H, K = int(self.cfg.max_steps), int(self.cfg.gt_rollouts)
        try:
            values, ses, rewards, prefix = [], [], [], []
            for t in range(len(actions) + 1):
                if mode == "mc":
                    v, se = mc_value(rep, prefix, H - t, K, rng)
                else:
                    v, se = exhaustive_value(rep, prefix, H - t, int(self.cfg.gt_max_nodes)), 0.0
                values.append(v)
                ses.append(se)
                if t == len(actions):
                    break
                a = actions[t]
                if a is not None:
                    rep.at(prefix)
                    r, info = rep.step(a)
                    rewards.append(_reward_of(self.cfg, r, info))
                    prefix.append(a)
                    if _ended(info):  # the episode ended here: V of the ended state is 0
                        values.append(0.0)
                        ses.append(0.0)
                        break
                else:
                    rewards.append(0.0)
        finally:
            steps, rollouts = rep.steps, rep.rollouts
            rep.close()
        n = len(actions)
        q = [rewards[t] + values[t + 1] for t in range(n)]
        adv = [q[t] - values[t] for t in range(n)]
        adv_se = [math.sqrt(ses[t] ** 2 + ses[t + 1] ** 2) for t in range(n)]
        self._gt_cost["gt_mc_continuations"] += float(rollouts)
        self._gt_cost["gt_mc_env_steps"] += float(steps)
        self._gt_cost["gt_mc_seconds"] += time.perf_counter() - t0
        decisive = [abs(adv[t]) > 2 * adv_se[t] if mode == "mc" else abs(adv[t]) > 1e-12 for t in range(n)]
        return MCGroundTruth(value=values[:n], q_value=q, advantage=adv, decisive=decisive,
                             reference_policy=f"uniform over validActions ({mode}" + (f", {K} rollouts)" if mode == "mc" else ")"),
                             value_se=ses[: n + 1], advantage_stderr=adv_se, rollouts=int(rollouts),
                             env_steps=int(steps))

    def stats(self) -> dict[str, float]:
        return {"env_resets": float(max(self._resets, 1)), "engine_steps": float(self._engine_steps), **self._gt_cost}

    def privileged(self) -> dict[str, Any]:
        gold = self.gold_path()
        return {"gold_path": gold, "optimal_length": len(gold), "score": getattr(self, "score", 0.0),
                "game": self.spec["game"], "game_seed": int(self.spec["game_seed"])}

    def close(self) -> None:
        """Give the engine's game back to the process's pool (idempotent)."""
        if self.game is not None:
            twx.release(self.game)
            self.game = None
