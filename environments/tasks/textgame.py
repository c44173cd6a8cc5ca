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
In-process by default: one JVM per process (:mod:`environments.tasks.textgame_twx`).
``env.sandboxed=true`` runs every episode's game inside the episode's **process** sandbox
(:mod:`environments.tasks.textgame_sandboxed`: a JVM started in the sandbox per engine call, the
episode's commands replayed; same observations, rewards, dones, state keys and ground truth,
tested; a sandbox fault ends the episode with reason ``sandbox_<reason>``; about 2 s per engine
call). The Docker backend is refused by the config loader: its offline-built image has no Java
runtime (:data:`environments.tasks.textgame_sandboxed.DOCKER_REFUSAL`).

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

import random
import re
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from environments.base import SPLITS, EnvConfig, TaskFamily, TaskInstance, derive_seed, require_spec
from environments.registry import register_family
from environments.tasks import textgame_twx as twx
# the episode lives in textgame_env (shared with the sandboxed mode); its names are this module's too
from environments.tasks.textgame_env import PROMPT_MARK, TextGameEnv, _clean, _digest, normalize_command  # noqa: F401
from environments.tasks.textgame_gt import MCGroundTruth, _ended, _Replayer, _reward_of, exhaustive_value, mc_value  # noqa: F401
from stages.config_fields import param

REWARDS = ("success", "score")
GROUND_TRUTHS = ("none", "mc", "exhaustive")
EVAL_FOLDS = ("dev", "test")
_PARAMS_RE = re.compile(r"^\s*$|^\s*[A-Za-z]+\s*=\s*-?\d+\s*(,\s*[A-Za-z]+\s*=\s*-?\d+\s*)*$")


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
    sandboxed: bool = param(False, help="run each episode's game inside its process sandbox (a JVM per engine call, the episode replayed; ~2 s per call; sandbox.backend=process only)")

    def config_rules(self):
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


def _param_names(params: str) -> list[str]:
    return [p.split("=", 1)[0].strip() for p in str(params).split(",") if "=" in p]


# ----------------------------------------------------------------------------- family


@register_family
class TextGameFamily(TaskFamily):
    name = "textgame"
    privileged_keys = ("gold_path", "optimal_length", "score", "game", "game_seed")
    Config = TextGameConfig
    needs_sandbox = False  # in-process by default; env.sandboxed=true: per instance (below)

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        self._seeds: dict[str, list[int]] = {}
        #: per instance: the sandboxed mode plays its games in the episode's sandbox (shadows the class default)
        self.needs_sandbox = bool(self.cfg.sandboxed)

    @classmethod
    def sandbox_problem(cls, env_cfg: Any, sandbox_cfg: Any) -> Optional[tuple[str, str]]:
        """The sandboxed mode needs the process backend (the Docker image has no JRE) and room for a JVM."""
        if not env_cfg.sandboxed:
            return None
        from environments.tasks.textgame_sandboxed import DOCKER_REFUSAL, MIN_MEMORY_MB

        if sandbox_cfg.backend != "process":
            return "sandbox.backend", DOCKER_REFUSAL
        if int(sandbox_cfg.memory_mb) < MIN_MEMORY_MB:
            return "sandbox.memory_mb", (f"must be >= {MIN_MEMORY_MB} for env=textgame env.sandboxed=true: the "
                                         "sandbox's JVM does not start under a smaller address-space limit")
        return None

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
        """A :class:`TextGameEnv`; with ``env.sandboxed`` a
        :class:`~environments.tasks.textgame_sandboxed.SandboxedTextGameEnv`, which needs a process
        ``sandbox`` (ValueError without one)."""
        require_spec(instance, ("game", "params", "fold", "game_seed"), "textgame")
        if self.needs_sandbox:
            from environments.tasks.textgame_sandboxed import SandboxedTextGameEnv

            return SandboxedTextGameEnv(self.cfg, instance, sandbox, episode_seed=episode_seed)
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
            "execution": ("in the episode's process sandbox (a JVM per engine call, the episode's commands replayed)"
                          if c.sandboxed else "in-process (TextWorld Express's JVM via py4j, one per process); not sandboxed"),
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
        real observations. Teaches the command format, not which command solves the task. Played
        in-process also when ``env.sandboxed`` (the same text; format episodes only)."""
        rng = random.Random(derive_seed("textgame-warmup", seed))
        out = []
        for i in range(n):
            inst = self.instance("warmup", i, seed)
            env = TextGameEnv(self.cfg, inst)
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
