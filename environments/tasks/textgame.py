"""Text games of the TextWorld family on TextWorld Express (survey §4: partial observability, long
horizons, heterogeneous actions; §9.1: horizons past 50 turns).

The games are TextWorld Express's (Jansen & Côté 2022), generated offline by seed in its JVM
(:mod:`environments.tasks.textgame_twx`): ``twc`` (TextWorld Commonsense: pick up objects and put
them where they belong, the ALFWorld-like household task), ``cookingworld`` (the First TextWorld
Problems cooking game: find the recipe and ingredients, cook, eat), ``coin`` (find the coin,
take it) and ``mapreader`` (carry a coin to a box, with a map). ``env.game`` picks one,
``env.params`` its generation parameters (TextWorld Express's ``gameParams`` string, checked by
TextWorld Express itself before the run starts).

Instances and splits
--------------------
An instance is one generated game: (game, params, fold, game seed). The train split draws game
seeds from TextWorld Express's ``train`` fold, the eval split from ``env.eval_fold`` (``dev`` or
``test``): disjoint seed ranges, so train and eval never share a game. Instance ``index`` of a
split for run seed ``seed`` is the ``index``-th seed of the fold shuffled by ``seed``. Games are
deterministic given their seed: the same instance replays exactly (tested), whatever the
episode seed.

Text protocol
-------------
* Prompt: ``"Task: <TextWorld Express's task description>\\n"`` then the first observation.
* Observation: TextWorld Express's observation text (whitespace collapsed; truncated to
  ``env.obs_chars`` characters when > 0), then ``"\\nInventory: ..."`` when
  ``env.show_inventory``, then ``"\\nActions: a | b | ..."`` (the valid actions, sorted) when
  ``env.show_actions``, then ``"\\n> "``: the policy acts right after the ``"> "``.
* **Action: the command text, one line, ending with ``"\\n"``** (``"take coin\\n"``). The line is
  stripped and its inner whitespace collapsed; the command is *valid* iff it equals one of TextWorld
  Express's ``validActions`` of the current state, ignoring case. That valid action is sent to
  TextWorld Express (and is ``StepResult.action``). An invalid one is not (TextWorld Express would answer it with "Unknown
  action" and leave the state as it is): the observation is ``"Unknown action: <reason>"`` and
  the turn is used up (``StepResult.action`` None; ``info["invalid_reason"]`` = ``"empty"`` or
  ``"not a valid action"``). As in the other families, an observation after an action that did
  not end with ``"\\n"`` starts with ``"\\n"``.
* End: TextWorld Express's ``tasksuccess`` (reason ``success``) or ``taskfailure`` (``failure``,
  e.g. eating a raw ingredient) ends the episode, or ``env.max_steps`` turns (``max_turns``). The
  final observation is followed by ``"\\ndone: success"`` / ``"\\ndone: failure"``.
* Rewards (``env.reward``): ``success`` (default) — terminal reward 1.0 iff the task succeeded,
  no turn rewards; ``score`` — TextWorld Express's own reward passed through as the turn reward
  (the score delta; the score reaches 1.0 on success) and no terminal reward, so the return is the
  final score.

State keys and training-time information
----------------------------------------
The state key (GiGPO anchors) names the *true* game state where TextWorld Express exposes it:
``cookingworld`` has an object tree (every object, where it is, open/closed, cut/cooked, the
inventory): the key is ``"{task_id}|t={t}|tree={hash}"``. The other games expose no state
(their object tree is empty); their key hashes the observable state instead: the current room's
description, the inventory, the score and the last-seen description of every room visited so far
(nothing moves in a room while the agent is away, so this is the true state except for the
contents of *closed* containers the agent filled itself). ``t`` (turns taken) is in the key
because values are finite-horizon. ``privileged()`` = the gold path (TextWorld Express's
``getGoldActionSequence``), its length (the optimal episode length), the score and the game.

Snapshots are TextWorld Express's own mechanism: ``serialize`` is the (seed, fold, game, params)
plus the actions taken, and a restore **replays** them on a fresh game (the engine has no state
copy); :meth:`TextGameEnv.restore` does exactly that, so it costs one reset plus one step per
recorded action.

Execution
---------
In-process only (``needs_sandbox = False``; ``env.sandboxed=true`` is refused by the config loader
with :data:`SANDBOX_REFUSAL`). The process sandbox cannot host the engine: under bwrap the
trainer's virtualenv (py4j, ``textworld_express`` and its jar) is not visible, a JVM does not start
under the sandbox's default address-space limit (``sandbox.memory_mb=512`` and 2048: ``java
-Xmx128m -version`` exits 1; 4096: it starts, measured in session 6), and the jar has no
stdin/stdout driver, only the py4j gateway, so a sandboxed step would start a JVM (~0.5 s) and
replay the episode each time. The Docker image is assembled offline from the host's stdlib
python3 and a few tools (:mod:`environments.sandbox.image`); the host's JRE (``/usr/lib/jvm``,
562 MiB here) could be copied in the same way, but the package and py4j still could not, and the
replay-per-step cost would remain: not done.

Ground truth (``env.ground_truth``)
-----------------------------------
There is no known MDP to solve by dynamic programming. ``mc`` estimates, for every visited state
``s_t`` of an episode, the value ``V(s_t)`` under the *uniform policy over validActions* (the
reference policy; it plays the remaining ``max_steps - t`` turns) from ``env.gt_rollouts``
rollouts from the restored state, and, because the games are deterministic,
``Q(s_t, a_t) = r_t + V(s_{t+1})`` (``V`` of an ended episode = 0) and ``A_t = Q - V``, with
standard errors (``value_se``, as the math family's; :class:`MCGroundTruth` adds the advantages')
and its cost (``stats()``: ``gt_mc_continuations``, ``gt_mc_env_steps``, ``gt_mc_seconds``, named
as the math family's). A turn is ``decisive`` when its advantage is more than two
standard errors from 0. ``exhaustive`` computes the same values exactly by enumerating every
action sequence (small games only: ``env.gt_max_nodes`` bounds the tree). ``none`` (default): no
ground truth (the MC estimate costs thousands of engine steps per episode). Progress along the
gold path or score deltas are *not* ground truth and are not used as such.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

from environments.base import (
    SPLITS,
    EnvConfig,
    Environment,
    StepResult,
    TaskFamily,
    TaskInstance,
    as_action_text,
    derive_seed,
    require_spec,
)
from environments.ground_truth import GroundTruthCredit
from environments.registry import register_family
from environments.tasks import textgame_twx as twx
from environments.tasks.textgame_gt import MCGroundTruth, _ended, _Replayer, _reward_of, exhaustive_value, mc_value  # noqa: F401
from stages.config_fields import param

REWARDS = ("success", "score")
GROUND_TRUTHS = ("none", "mc", "exhaustive")
EVAL_FOLDS = ("dev", "test")
PROMPT_MARK = "\n> "
_PARAMS_RE = re.compile(r"^\s*$|^\s*[A-Za-z]+\s*=\s*-?\d+\s*(,\s*[A-Za-z]+\s*=\s*-?\d+\s*)*$")
_WS = re.compile(r"\s+")


def _params_problem(value: str) -> Optional[str]:
    if not isinstance(value, str) or not _PARAMS_RE.match(value):
        return "must be a comma-separated list of name=integer (TextWorld Express gameParams), e.g. numLocations=2"
    return None


@dataclass
class TextGameConfig(EnvConfig):
    """Keys allowed under ``env.`` for the textgame family (TextWorld Express)."""

    name: str = param("textgame", help="task family (registry name)")
    game: str = param("twc", help="TextWorld Express game: twc (put objects away; ALFWorld-like) | cookingworld | coin | mapreader", choices=twx.GAMES)
    params: str = param("numLocations=1,numItemsToPutAway=1,includeDoors=0", help="TextWorld Express gameParams of the game (name=int, comma-separated; checked by TextWorld Express)", check=_params_problem, rule="must be a comma-separated list of name=integer (TextWorld Express gameParams)")
    eval_fold: str = param("dev", help="TextWorld Express fold the eval split draws games from (train always uses 'train')", choices=EVAL_FOLDS)
    max_steps: int = param(8, help="turns per episode at most (then reason max_turns)", ge=1)
    reward: str = param("success", help="success: terminal 1.0 iff the task succeeded | score: TextWorld Express's score delta as turn reward", choices=REWARDS)
    obs_chars: int = param(0, help="truncate TextWorld Express's observation text to this many characters (0 = whole)", ge=0)
    show_inventory: bool = param(False, help="append the inventory to every observation")
    show_actions: bool = param(True, help="append the valid actions (TextWorld Express validActions) to every observation")
    train_size: int = param(512, help="train-split instance pool size (games of the 'train' fold; at most 1000)", ge=0, le=1000)
    eval_size: int = param(128, help="eval-split instance pool size (games of env.eval_fold; at most 1000)", ge=0, le=1000)
    ground_truth: str = param("none", help="per-turn ground-truth credit under the uniform-over-validActions policy: none | mc (Monte Carlo, with standard errors) | exhaustive (exact, small games)", choices=GROUND_TRUTHS)
    gt_rollouts: int = param(16, help="env.ground_truth=mc: rollouts per visited state", ge=2)
    gt_max_nodes: int = param(20000, help="env.ground_truth=exhaustive: most search-tree nodes per state before giving up", ge=1)
    sandboxed: bool = param(False, help="run the game inside the run's sandbox: not available for TextWorld Express (refused; module docstring, Execution)")

    def config_rules(self):
        if self.sandboxed:
            yield "sandboxed", SANDBOX_REFUSAL
        bad = [k for k in _param_names(self.params) if k not in twx.GAME_PARAMS.get(self.game, ())]
        if bad:
            yield "params", f"{bad[0]} is not a parameter of {self.game}; known: {', '.join(twx.GAME_PARAMS[self.game])}"

    def world_rules(self):
        """TextWorld Express loads the game with these parameters (its own range checks); it needs a
        Java runtime to run at all."""
        if shutil.which("java") is None:
            yield "game", ("TextWorld Express runs its games in a JVM and no Java runtime (>= 11) is on PATH "
                           "(Debian: apt-get install default-jre-headless; infra/ensure_system.sh installs it)")
            return
        err = twx.check_params(self.game, self.params)
        if err:
            yield "params", f"TextWorld Express refuses it: {err}"


#: why ``env.sandboxed=true`` is refused, and what is possible instead (one line; module docstring, Execution)
SANDBOX_REFUSAL = ("not available for textgame: TextWorld Express is a JVM driven through py4j from the trainer's "
                   "virtualenv, which neither sandbox carries (process/bwrap: the host's /usr, a JVM starts only with "
                   "sandbox.memory_mb>=4096, but no venv; docker image: a stdlib-only python3, no JRE), and its jar has "
                   "no stdin driver, so every step would start a JVM and replay the episode; use env.sandboxed=false "
                   "(in-process), or a sandboxed family: frozenlake, gym (tabular ids), minigrid, sokoban, bifurcation")


def _param_names(params: str) -> list[str]:
    return [p.split("=", 1)[0].strip() for p in str(params).split(",") if "=" in p]


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
        self.cfg, self.instance, self.spec = cfg, instance, instance.spec
        self.episode_seed = int(episode_seed)
        self.game: Any = twx.acquire(self.spec["game"], self.spec["params"])
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
            self._has_tree = bool(self.game.getObjectTree())
        if self._has_tree:
            return f"{tid}{end}|t={self._t}|tree={_digest(self.game.getObjectTree())}"
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
            obs, r, _, einfo = self.game.step(cmd)
            self._engine_steps += 1
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


# ----------------------------------------------------------------------------- family


@register_family
class TextGameFamily(TaskFamily):
    name = "textgame"
    privileged_keys = ("gold_path", "optimal_length", "score", "game", "game_seed")
    Config = TextGameConfig
    needs_sandbox = False  # the engine is a JVM in this process (see describe()["execution"])

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        self._seeds: dict[str, list[int]] = {}

    def fold(self, split: str) -> str:
        if split not in SPLITS and split != "warmup":
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.cfg.eval_fold if split == "eval" else "train"

    def _fold_seeds(self, fold: str) -> list[int]:
        if fold not in self._seeds:
            self._seeds[fold] = twx.fold_seeds(fold)
        return self._seeds[fold]

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        """Game ``index`` of ``split``'s fold shuffled by ``seed`` (the warm-up split reads the train
        fold in another order)."""
        fold = self.fold(split)
        seeds = list(self._fold_seeds(fold))
        random.Random(derive_seed("textgame-order", split, seed)).shuffle(seeds)
        game_seed = seeds[index % len(seeds)]
        c = self.cfg
        spec = {"game": c.game, "params": c.params, "fold": fold, "game_seed": int(game_seed)}
        return TaskInstance(task_id=f"tg-{split}-s{seed}-{index}", split=split,
                            seed=derive_seed("textgame-instance", split, seed, index), spec=spec)

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> TextGameEnv:
        require_spec(instance, ("game", "params", "fold", "game_seed"), "textgame")
        return TextGameEnv(self.cfg, instance, episode_seed=episode_seed)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        gt = {"none": "none (no exact MDP; env.ground_truth=mc gives a Monte Carlo estimate)",
              "mc": f"Monte Carlo V/Q/A under the uniform policy over validActions, {c.gt_rollouts} rollouts per "
                    "visited state (replayed), with standard errors",
              "exhaustive": "exact V/Q/A under the uniform policy over validActions by enumerating every action sequence"}
        return {
            "source": f"TextWorld Express 1.x (Jansen & Côté 2022), game {c.game} ({c.params}), generated offline by seed",
            "size": f"train: {c.train_size} games of fold 'train'; eval: {c.eval_size} games of fold '{c.eval_fold}'",
            "filtering": "none; splits are TextWorld Express's folds (disjoint seed ranges)",
            "metric": (f"success rate = TextWorld Express's tasksuccess within {c.max_steps} turns; "
                       + ("terminal reward 1.0 on success else 0.0" if c.reward == "success"
                          else "reward = TextWorld Express's score delta per turn (return = final score)")),
            "benchmark": f"textgame ({c.game}, {c.params}, max_steps={c.max_steps})",
            "ground_truth": gt[c.ground_truth],
            "text_protocol": ("one command per line, exactly one of the state's validActions ('take coin\\n'); "
                              "observation = TextWorld Express text" + (" + inventory" if c.show_inventory else "")
                              + (" + valid actions" if c.show_actions else "") + " + '\\n> '"),
            "execution": "in-process (TextWorld Express's JVM via py4j, one per process); not sandboxed",
        }

    def profile(self) -> dict[str, Any]:
        c = self.cfg
        per_turn = (c.obs_chars or 400) // 4 + 8 + (40 if c.show_actions else 0)
        return {
            "setting": "agentic",
            "turns": int(c.max_steps),
            "trajectory_tokens": 40 + int(c.max_steps) * per_turn,
            "verifiable_intermediate": c.reward == "score",  # the score marks sub-goals
            "verifiable_outcome": True,
            "stochastic": False,  # games are deterministic given their seed
            "partially_observable": True,  # one room at a time; closed containers hide their contents
            "privileged_info": True,  # gold path (privileged())
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,  # reset + replay costs milliseconds of engine steps
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """Format episodes on train-fold games (a separate order): 1 to ``max_steps`` commands drawn
        uniformly from the state's validActions, each written ``"<command>\\n"``; the environment's
        real observations. Teaches the command format, not which command solves the task."""
        rng = random.Random(derive_seed("textgame-warmup", seed))
        out = []
        for i in range(n):
            env = self.make(self.instance("warmup", i, seed))
            try:
                prompt = env.reset()
                turns: list[tuple[str, str]] = []
                for _ in range(rng.randint(1, int(self.cfg.max_steps))):
                    act = rng.choice(env.valid) + "\n"
                    res = env.step(act)
                    turns.append((act, res.observation))
                    if res.done:
                        break
            finally:
                env.close()
            out.append((prompt, turns))
        return out
