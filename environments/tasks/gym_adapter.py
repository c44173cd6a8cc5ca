"""Any Gymnasium environment as a text task family (``env=gym``; survey §4 agentic challenges, §8.2).

The systems credit-assignment work comes from train agents on Gymnasium-API environments (RAGEN's
FrozenLake and Sokoban, BALROG's and MiniGrid's grid worlds). :class:`GymTextEnv` puts one such
environment (``gymnasium.make(env.gym_id, **env.gym_kwargs)``) behind the text protocol of
:class:`environments.base.Environment`; :class:`GymFamily` (``env=gym``) serves any registered id,
and the FrozenLake (:mod:`environments.tasks.frozenlake`) and MiniGrid
(:mod:`environments.tasks.minigrid_env`) families are subclasses with their own text renderers and
exact ground truth.

Text protocol
-------------
* Prompt: an intro line, ``"Actions: a | b | ..."`` (the action names, see below), then the first
  observation. Every observation where the policy must act ends with ``"\\nt{k}:"`` (k = 1-based
  turn), right where the policy answers.
* Observation text: the family's renderer; for ``env=gym`` the environment's ``ansi`` rendering
  with the colour escapes removed (when ``render_mode="ansi"`` is supported), else ``str(obs)``.
* **Actions** (``Discrete`` action spaces): the policy emits ``" <name>\\n"``; parsing is lenient:
  ``action_text.strip().lower()`` may be the action's name or its index (``"2"``). Names: the
  family's (FrozenLake ``left down right up``, MiniGrid ``left right forward pickup drop toggle
  done``); for ``env=gym`` the indices ``0 1 2 ...``. Anything else is *invalid*:
  ``StepResult.action`` is None, ``info["invalid_reason"]`` says why (``empty`` / ``unknown``), and
  ``env.invalid_action`` decides the effect: ``noop`` (the turn passes, the environment is not
  stepped) or ``end`` (the episode ends, reason ``invalid_action``, reward 0).
* After a step: the next observation, or ``"done: success"`` / ``"done: failure"``; prefixed with
  ``"\\n"`` when the action text did not end with a newline.

Rewards, termination, truncation are the environment's, passed through: ``StepResult.reward`` is
gym's step reward; on the final step ``info["terminal_reward"]`` is that step's reward (the agent
loop puts it on ``Trajectory.reward``), earlier rewards are turn rewards. ``terminated`` ends the
episode with reason ``success`` (final reward > 0) or ``failure``; ``truncated`` (gym's
``TimeLimit``, set to ``env.max_turns``) or ``max_turns`` turns end it with reason ``max_turns``.
``info`` carries ``terminated``, ``truncated``, ``gym_reward`` and gym's own info (JSON-able values).

Seeds: the instance fixes ``reset(seed=instance reset seed)`` (the layout of procedurally
generated environments); the environment's transition randomness is then reseeded with
``derive_seed(instance seed, episode_seed)`` (``env.unwrapped.np_random``), so the episodes of a
group differ reproducibly on stochastic environments. State keys (GiGPO anchors) are
``"{task_id}|t={t}|s={true state}"`` (``"|end"`` after the last step) with the environment's true
state (:meth:`GymTextEnv.true_state`: ``unwrapped.s`` for the toy-text environments, the hash of
the observation otherwise); ``privileged()`` holds it as well. ``snapshot()`` deep-copies the
environment (its RNG included), so ``restore`` replays the same future.

Sandboxed mode (``env.sandboxed=true``): for environments with a transition table
(``unwrapped.P``: Gymnasium's toy-text FrozenLake, CliffWalking, Taxi) every transition is computed
inside the episode's sandbox by a standard-library script (:mod:`environments.tasks.gym_tabular_step`)
from the exported table, consuming the same uniforms the in-process environment draws from its
``np_random`` (``categorical_sample``: one ``random()`` per step), so the trajectories are identical
for the same seeds (tested). Other environments need gymnasium inside the sandbox, which the
sandbox's stdlib interpreter does not have: the config loader refuses ``sandboxed`` for them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
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
)
from environments.registry import register_family
from environments.sandbox.step_script import SandboxFault, StepScriptEnv
from environments.tasks.gym_spec import _gym_id_problem, _jsonable, _kwargs_problem, make_gym, parse_kwargs, strip_ansi
from stages.config_fields import param

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")  # minigrid imports pygame, which prints a banner

INVALID_ACTIONS = ("noop", "end")
# ----------------------------------------------------------------------------- the environment


STEP_SCRIPT = "gym_step.py"
TABLE_FILE = "gym_table.json"
STATE_FILE = "gym_state.json"
_STEP_SCRIPT_PATH = Path(__file__).resolve().parent / "gym_tabular_step.py"


def tabular_table(unwrapped: Any) -> dict[str, list[list[list[float]]]]:
    """``unwrapped.P`` (state -> action -> [(p, s', r, terminated)]) as JSON-able lists."""
    P = unwrapped.P
    return {str(s): [[[float(p), int(s2), float(r), bool(d)] for p, s2, r, d in P[s][a]] for a in sorted(P[s])]
            for s in sorted(P)}


def is_tabular(unwrapped: Any) -> bool:
    """Whether the environment has a toy-text transition table ``P`` (its state is ``unwrapped.s``)."""
    return isinstance(getattr(unwrapped, "P", None), dict)


class GymTextEnv(StepScriptEnv, Environment):
    """One episode of a Gymnasium environment under the text protocol of the module docstring.

    Subclasses override :meth:`render_text`, :meth:`true_state`, :meth:`intro` and set
    ``action_names``; :meth:`ground_truth` where the MDP is known."""

    #: the name of each action index (``None``: the indices ``"0"``, ``"1"``, ...)
    action_names: Optional[tuple[str, ...]] = None
    #: with ``invalid_action=noop``: the gym action an invalid action steps (the environment's own
    #: no-op, so its step counter keeps counting turns), or None (the environment is not stepped)
    invalid_gym_action: Optional[int] = None

    def __init__(self, cfg: Any, instance: TaskInstance, make_env: Callable[[], Any], episode_seed: int = 0,
                 sandbox: Any = None):
        self.cfg, self.instance, self.episode_seed = cfg, instance, int(episode_seed)
        self.env = make_env()
        n = int(self.env.action_space.n)
        self.names = tuple(self.action_names or [str(i) for i in range(n)])[:n]
        self._init_step_script(sandbox)
        self.max_turns = int(cfg.max_turns)
        self._started = False
        self._resets = 0
        self._clear()

    def _clear(self) -> None:
        self._t = 0
        self._gym_steps = 0
        self._done = False
        self._success = False
        self.last_obs: Any = None
        self.actions: list[Optional[int]] = []
        #: the true state at every played turn (ground truth, oracle)
        self.states: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------------

    @property
    def unwrapped(self) -> Any:
        return self.env.unwrapped

    def intro(self) -> str:
        return f"Gymnasium {self.env.spec.id if self.env.spec else type(self.unwrapped).__name__}."

    def render_text(self) -> str:
        """The text of the current observation."""
        if getattr(self.env, "render_mode", None) == "ansi":
            return strip_ansi(str(self.env.render())).strip("\n")
        return str(self.last_obs)

    def true_state(self) -> Any:
        """A hashable true state (JSON-able): ``unwrapped.s`` where it exists, else an observation hash."""
        if hasattr(self.unwrapped, "s"):
            return int(self.unwrapped.s)
        return hashlib.blake2b(repr(self.last_obs).encode(), digest_size=8).hexdigest()

    def is_success(self, reward: float, terminated: bool) -> bool:
        return bool(terminated) and reward > 0

    # -- protocol ------------------------------------------------------------------------------

    def _observation(self) -> str:
        return f"{self.render_text()}\nt{self._t + 1}:"

    def reset(self) -> str:
        from gymnasium.utils import seeding

        self._started = True
        self._resets += 1
        self._clear()
        reset_seed = int(self.instance.spec.get("reset_seed", self.instance.seed)) % (2 ** 31)
        self.last_obs, _ = self.env.reset(seed=reset_seed)
        self._trans_seed = derive_seed("gym-episode", self.instance.seed, self.episode_seed) % (2 ** 63)
        self.unwrapped.np_random, _ = seeding.np_random(self._trans_seed)
        if self.box is not None:
            self._sandbox_init()
        return f"{self.intro()}\nActions: {' | '.join(self.names)}\n{self._observation()}"

    def parse(self, action_text: Any) -> tuple[Optional[int], str]:
        """(action index, "") or (None, why invalid)."""
        text = as_action_text(action_text).strip().lower()
        if not text:
            return None, "empty"
        if text in self.names:
            return self.names.index(text), ""
        if text.isdigit() and int(text) < len(self.names):
            return int(text), ""
        return None, "unknown"

    def record_state(self) -> None:
        """Called before every step: the state the turn is taken in (``self.states``)."""
        self.states.append(self.true_state())

    def state_key(self) -> str:
        end = "|end" if self._done else ""
        return f"{self.instance.task_id}{end}|t={self._t}|s={self.true_state()}"

    def _gym_step(self, a: int) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self.box is not None:
            return self._sandbox_step(a)
        obs, r, terminated, truncated, info = self.env.step(a)
        return obs, float(r), bool(terminated), bool(truncated), dict(info)

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        t = self._t
        self.record_state()
        a, why = self.parse(action_text)
        self.actions.append(a)
        prefix = "" if isinstance(action_text, str) and action_text.endswith("\n") else "\n"
        info: dict[str, Any] = {"turn": t, "valid": a is not None}
        r, terminated, truncated, reason = 0.0, False, False, ""
        if a is None:
            info["invalid_reason"] = why
            if self.cfg.invalid_action == "end":
                terminated, reason = True, "invalid_action"
        gym_a = a if a is not None else (self.invalid_gym_action if not reason else None)
        if gym_a is not None:
            try:
                self.last_obs, r, terminated, truncated, gym_info = self._gym_step(gym_a)
            except SandboxFault as exc:
                info["sandbox_fault"] = str(exc)
                terminated, reason = True, f"sandbox_{exc.reason}"
                r = 0.0
            else:
                self._gym_steps += 1
                info.update({f"gym_{k}": v for k, v in _jsonable(gym_info).items()})
        self._t = t + 1
        truncated = (truncated or self._t >= self.max_turns) and not terminated
        info.update({"terminated": terminated, "truncated": truncated, "gym_reward": r})
        done = terminated or truncated
        if not done:
            info["turn_reward"] = r
            return StepResult(observation=prefix + self._observation(), reward=r, done=False,
                              action=self.names[a] if a is not None else None, state_key=self.state_key(), info=info)
        self._done = True
        self._success = not reason and self.is_success(r, terminated)
        reason = reason or ("success" if self._success else ("failure" if terminated else "max_turns"))
        info["turn_reward"], info["terminal_reward"] = 0.0, r
        return StepResult(observation=prefix + ("done: success" if self._success else "done: failure"), reward=r,
                          done=True, action=self.names[a] if a is not None else None, state_key=self.state_key(),
                          success=self._success, reason=reason, info=info)

    @property
    def done(self) -> bool:
        return self._done

    def privileged(self) -> dict[str, Any]:
        return {"gym_id": self.env.spec.id if self.env.spec else "", "true_state": self.true_state(),
                "states": list(self.states)}

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the environment (RNG included) and the episode counters."""
        return {"env": copy.deepcopy(self.env), "t": self._t, "gym_steps": self._gym_steps, "done": self._done,
                "success": self._success, "started": self._started, "obs": copy.deepcopy(self.last_obs),
                "actions": list(self.actions), "states": list(self.states)}

    def restore(self, handle: dict[str, Any]) -> None:
        self.env = copy.deepcopy(handle["env"])
        self._t, self._gym_steps, self._done = handle["t"], handle["gym_steps"], handle["done"]
        self._success, self._started = handle["success"], handle["started"]
        self.last_obs = copy.deepcopy(handle["obs"])
        self.actions, self.states = list(handle["actions"]), list(handle["states"])
        self._resets += 1
        if self.box is not None:
            self._sandbox_write_state()

    def stats(self) -> dict[str, float]:
        out = {"env_resets": float(max(self._resets, 1)), "gym_steps": float(self._gym_steps),
               "invalid_actions": float(sum(a is None for a in self.actions))}
        if self.box is not None:
            out.update({"sandbox_seconds": self._sandbox_seconds, "sandbox_execs": float(self._execs)})
        return out

    def close(self) -> None:
        try:
            self.env.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass

    # -- sandboxed mode (tabular environments) ------------------------------------------------

    def _sandbox_init(self) -> None:
        """Write the step script, the transition table and the uniforms the in-process
        environment would draw (one per gym step, from the same reseeded generator)."""
        from gymnasium.utils import seeding

        if not is_tabular(self.unwrapped):
            raise ValueError(f"env.sandboxed: {self.intro()} has no transition table (unwrapped.P)")
        rng, _ = seeding.np_random(self._trans_seed)
        uniforms = [float(rng.random()) for _ in range(self.max_turns)]
        self._timed(self.box.write_file, STEP_SCRIPT, _STEP_SCRIPT_PATH.read_bytes())
        self._timed(self.box.write_file, TABLE_FILE,
                    json.dumps({"P": tabular_table(self.unwrapped), "uniforms": uniforms}).encode())
        self._sandbox_write_state()

    def _sandbox_write_state(self) -> None:
        state = {"s": int(self.unwrapped.s), "k": self._gym_steps}
        self._timed(self.box.write_file, STATE_FILE, json.dumps(state).encode())

    def _sandbox_step(self, a: int) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        out = self._run_step_script(STEP_SCRIPT, {"a": int(a)})
        try:
            s2, r, terminated, p = int(out["s"]), float(out["r"]), bool(out["terminated"]), float(out["p"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxFault("error", str(exc)) from exc
        # the host mirrors the state the sandbox reports (rendering, state keys, ground truth)
        self.unwrapped.s, self.unwrapped.lastaction = s2, a
        # gym's TimeLimit (max_episode_steps = max_turns) truncates no earlier than the turn cap
        return s2, r, terminated, False, {"prob": p}


# ----------------------------------------------------------------------------- the family


@dataclass
class GymConfig(EnvConfig):
    """Keys allowed under ``env.`` for the Gymnasium adapter (``env=gym``)."""

    name: str = param("gym", help="task family (registry name)")
    gym_id: str = param("FrozenLake-v1", help="Gymnasium environment id (\"module:Id\" imports module first; MiniGrid-* import minigrid)",
                        check=_gym_id_problem, rule="must be a registered Gymnasium id")
    gym_kwargs: str = param("{}", help="keyword arguments for gymnasium.make: key=value,... (is_slippery=false) or a JSON object",
                            check=_kwargs_problem, rule="must be key=value,... or a JSON object")
    max_turns: int = param(20, help="turns per episode at most (gym's TimeLimit is set to it; then reason max_turns)", ge=1)
    invalid_action: str = param("noop", help="effect of an unparsable action: noop (the turn passes) | end (the episode fails)",
                                choices=INVALID_ACTIONS)
    sandboxed: bool = param(False, help="compute every transition inside the run's sandbox (environments with a transition table only)")
    train_size: int = param(512, help="train-split instance pool size (reset seeds)", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size (reset seeds, disjoint from train)", ge=0)

    def config_rules(self):
        if self.sandboxed and _gym_id_problem(self.gym_id) is None and _kwargs_problem(self.gym_kwargs) is None:
            env = make_gym(self.gym_id, parse_kwargs(self.gym_kwargs), self.max_turns)
            try:
                if not is_tabular(env.unwrapped):
                    yield "sandboxed", (f"needs an environment with a transition table (unwrapped.P); "
                                        f"{self.gym_id} has none (the sandbox's Python has no gymnasium)")
            finally:
                env.close()


def _gym_instance(prefix: str, split: str, index: int, seed: int, spec: dict[str, Any]) -> TaskInstance:
    if split not in (*SPLITS, "warmup"):
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    iseed = derive_seed(f"{prefix}-instance", split, seed, index)
    spec = {**spec, "reset_seed": iseed % (2 ** 31)}
    return TaskInstance(task_id=f"{prefix}-{split}-s{seed}-{index}", split=split, seed=iseed, spec=spec)


def random_valid_episodes(family: TaskFamily, n: int, seed: int, action_text: Callable[[str], str]
                          ) -> list[tuple[str, list[tuple[str, str]]]]:
    """Warm-up corpus shared by the Gymnasium families: ``n`` episodes of the "warmup" split with
    uniformly random valid actions written as ``action_text(name)`` (teaches format, not the task)."""
    import random

    out = []
    for i in range(n):
        inst = family.instance("warmup", i, seed)
        rng = random.Random(derive_seed("gym-warmup-actions", family.name, seed, i))
        env = family.make_env(inst, None, rng.getrandbits(31))  # in-process: same texts as sandboxed
        try:
            prompt = env.reset()
            turns: list[tuple[str, str]] = []
            while True:
                text = action_text(rng.choice(env.names))
                res = env.step(text)
                turns.append((text, res.observation))
                if res.done:
                    break
        finally:
            env.close()
        out.append((prompt, turns))
    return out


ACTION_FORMAT = " {}\n"


@register_family
class GymFamily(TaskFamily):
    """``env=gym``: any Gymnasium environment with a ``Discrete`` action space (module docstring)."""

    name = "gym"
    Config = GymConfig

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        self.needs_sandbox = bool(self.cfg.sandboxed)
        self.kwargs = parse_kwargs(self.cfg.gym_kwargs)

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        return _gym_instance("gym", split, index, seed, {"gym_id": self.cfg.gym_id})

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> GymTextEnv:
        """A :class:`GymTextEnv`; with ``env.sandboxed`` its transitions run in ``sandbox`` (required)."""
        if self.needs_sandbox and sandbox is None:
            raise ValueError("env.sandboxed=true: make(instance, sandbox=...) needs a sandbox")
        return self.make_env(instance, sandbox if self.needs_sandbox else None, episode_seed)

    def make_env(self, instance: TaskInstance, sandbox: Any, episode_seed: int) -> GymTextEnv:
        """The environment, sandboxed iff ``sandbox`` is given."""
        return GymTextEnv(self.cfg, instance, lambda: make_gym(self.cfg.gym_id, self.kwargs, self.cfg.max_turns),
                          episode_seed=episode_seed, sandbox=sandbox)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        return {
            "source": f"Gymnasium environment {c.gym_id} with kwargs {c.gym_kwargs}",
            "size": f"train: {c.train_size} reset seeds; eval: {c.eval_size} reset seeds (disjoint seed streams)",
            "filtering": "none",
            "metric": "success rate = episodes terminated with a positive final reward; return = sum of gym rewards",
            "benchmark": f"gym:{c.gym_id} (max {c.max_turns} turns, invalid action: {c.invalid_action})",
            "text_protocol": "observation = the environment's ansi rendering + 'tK:'; the policy emits ' <action index>\\n'",
            "execution": "transitions in the run's sandbox (tabular step script)" if c.sandboxed else "in-process",
        }

    def profile(self) -> dict[str, Any]:
        return {
            "setting": "agentic",
            "turns": int(self.cfg.max_turns),
            "trajectory_tokens": 32 + 24 * int(self.cfg.max_turns),
            "verifiable_intermediate": False,
            "verifiable_outcome": True,
            "stochastic": True,
            "partially_observable": False,
            "privileged_info": True,
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        return random_valid_episodes(self, n, seed, ACTION_FORMAT.format)
