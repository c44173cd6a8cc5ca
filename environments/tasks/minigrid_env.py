"""MiniGrid (Farama ``minigrid``) as a text task family with exact ground truth (survey §4.2, §4.6, §9.3).

BALROG's and the MiniGrid benchmark's grid worlds: ``env.gym_id`` any ``MiniGrid-*`` id (e.g.
``MiniGrid-DoorKey-5x5-v0``, ``MiniGrid-Empty-5x5-v0``, ``MiniGrid-KeyCorridorS3R1-v0``,
``MiniGrid-MultiRoom-N2-S4-v0``). Partial observability (§4.2): the policy sees only the agent's
egocentric 7x7 view, rendered as text by :func:`render_view`:

* ``Mission: <the env's mission>`` (in the prompt), then per turn
* ``You face <east|south|west|north>, carrying <nothing|a yellow key>.``
* the view, 7 rows of 7 characters, the agent ``^`` at the bottom centre looking up (the
  direction it faces): ``#`` wall, ``.`` empty/floor, ``K`` key, ``D`` closed door, ``L`` locked
  door, ``/`` open door, ``B`` ball, ``X`` box, ``G`` goal, ``~`` lava, ``?`` not visible;
* ``Seen: yellow key 2 ahead 1 left; yellow locked door 1 ahead`` (objects with their colours and
  door states, relative to the agent), then ``t{k}:``.

Actions by name: ``left right forward pickup drop toggle done`` (the policy emits ``" forward\\n"``;
the index works too). An unparsable action is recorded invalid (``StepResult.action`` None) and
steps the environment with MiniGrid's no-op ``done`` action, so the environment's step counter
(and its success reward ``1 - 0.9 * steps / max_steps``) keeps counting turns; or ends the episode
(``env.invalid_action=end``). Rewards, termination and truncation are MiniGrid's.

Ground truth (``env.ground_truth=exact``): the reachable true states (agent cell and direction,
what it carries, the grid's encoding with door states and object positions) are enumerated by BFS
from the instance's reset state, stepping a working copy of the environment set to each state
(:func:`enumerate_states`); MiniGrid's transitions are deterministic for these environments, so
backward induction over ``env.max_turns`` turns with the time-dependent success reward gives the
exact V/Q/advantage of every played turn under the uniform policy over the 7 actions (or the
optimal one). More than ``env.max_states`` reachable states: no ground truth for that instance
(counted in ``stats()["gt_missing"]``). The MDP is not exported (the horizon x states x actions x
states table of the oracle would be too large), so ``credit=oracle`` is refused here; the
``credit.gt_*`` metrics use the ground truth. Limits: box contents are not part of the encoding
(no environment listed above puts objects in boxes); stochastic MiniGrid environments (dynamic
obstacles) are outside the exact DP's assumptions.

Sandboxed mode (``env.sandboxed=true``; survey §8.2, safety during training). Which option, and
why: the sandboxes run the system ``python3`` with the standard library only (the process backend under bubblewrap exposes ``/usr`` but not the project's virtual environment;
the Docker image is assembled offline from the host interpreter without ``site-packages``), so
``gymnasium``/``minigrid``/``numpy`` cannot run inside them. This mode is therefore a *tabular
export* (option (a) of issue 16), as :mod:`environments.tasks.gym_tabular_step` is for toy-text
Gymnasium environments:

* at reset the host writes the instance's deterministic transition table, enumerated by BFS over
  the reachable true states by stepping real MiniGrid (:func:`environments.tasks.minigrid_env.grid_tables`,
  the same tables the exact ground truth uses), into the sandbox with the stdlib step script
  :mod:`environments.tasks.minigrid_table_step`;
* every stepped action (invalid actions step MiniGrid's ``done`` no-op, as in-process) is one exec
  of that script, which applies MiniGrid's reward and step-limit rules and keeps the state index
  and step count in the sandbox's work directory;
* the host mirrors the state index the sandbox reports: it sets its own MiniGrid instance to that
  true state and renders the egocentric view with MiniGrid's ``gen_obs`` (a pure function of the
  true state: agent cell and direction, carried object, grid encoding), so observations, rewards,
  terminations, state keys, ground truth, snapshots and stats equal the in-process ones for the
  same instance, seed and actions (``tests/test_minigrid.py``: process backend;
  ``tests/test_sandboxed_families_docker.py``: Docker).

What runs in the sandbox is the transition arithmetic, not MiniGrid's Python code and not the
rendering. Instances with more than ``env.max_states`` reachable states have no table: their reset
raises a ValueError naming ``env.max_states``. Sandbox faults end the episode with terminal reward 0
and reason ``sandbox_<reason>`` (:class:`environments.sandbox.step_script.StepScriptEnv`).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from environments.base import EnvConfig, TaskInstance
from environments.ground_truth import GroundTruthCredit
from environments.registry import register_family
from environments.sandbox.step_script import SandboxFault
from environments.tabular_values import REFERENCE_POLICIES, finite_horizon_values, played_credit
from environments.tasks.gym_adapter import (
    ACTION_FORMAT,
    INVALID_ACTIONS,
    GymFamily,
    GymTextEnv,
    _gym_instance,
    random_valid_episodes,
)
from environments.tasks.gym_spec import resolve_gym_id
from stages.config_fields import param

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

STEP_SCRIPT = "minigrid_step.py"
TABLE_FILE = "minigrid_table.json"
STATE_FILE = "minigrid_state.json"
_STEP_SCRIPT_PATH = Path(__file__).resolve().parent / "minigrid_table_step.py"

ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
DONE = ACTIONS.index("done")
DIRECTIONS = ("east", "south", "west", "north")
GROUND_TRUTHS = ("exact", "none")
_CHAR = {"unseen": "?", "empty": ".", "floor": ".", "wall": "#", "key": "K", "ball": "B", "box": "X", "goal": "G",
         "lava": "~", "agent": "^"}
_DOOR = {0: "/", 1: "D", 2: "L"}
_DOOR_STATE = {0: "open", 1: "closed", 2: "locked"}


def _minigrid_id_problem(value: str) -> Optional[str]:
    if not str(value).startswith(("MiniGrid-", "BabyAI-")):
        return "must be a MiniGrid-* (or BabyAI-*) id"
    try:
        resolve_gym_id(value)
    except ValueError as exc:
        return f"not a registered MiniGrid id ({exc})"
    return None


@dataclass
class MiniGridConfig(EnvConfig):
    """Keys allowed under ``env.`` for the MiniGrid family."""

    name: str = param("minigrid", help="task family (registry name)")
    gym_id: str = param("MiniGrid-DoorKey-5x5-v0", help="MiniGrid environment id (DoorKey, Empty, KeyCorridor, MultiRoom, ...)",
                        check=_minigrid_id_problem, rule="must be a registered MiniGrid-* id")
    max_turns: int = param(30, help="turns per episode at most (horizon of the ground truth)", ge=1)
    invalid_action: str = param("noop", help="unparsable action: noop (MiniGrid's 'done' no-op, the step counts) | end (the episode fails)", choices=INVALID_ACTIONS)
    ground_truth: str = param("exact", help="exact (BFS over reachable true states + DP) | none", choices=GROUND_TRUTHS)
    max_states: int = param(20000, help="ground truth only for instances with at most this many reachable states", ge=1)
    reference_policy: str = param("uniform", help="policy of the ground-truth V/Q/A: uniform (over the 7 actions) | optimal", choices=REFERENCE_POLICIES)
    decisive_gap: float = param(0.05, help="a turn is decisive when the actions' Q-values at its state differ by at least this", ge=0)
    train_size: int = param(512, help="train-split instance pool size (reset seeds = layouts)", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size (disjoint seed stream)", ge=0)
    sandboxed: bool = param(False, help="step the exported BFS transition table inside the run's sandbox (stdlib script; same trajectories)")


# ----------------------------------------------------------------------------- text


def render_view(obs: dict[str, Any], carrying: Any) -> str:
    """The egocentric view of ``obs`` (MiniGrid's ``image``, ``direction``) as text (module docstring)."""
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

    img = np.asarray(obs["image"])
    W, Hh = img.shape[0], img.shape[1]
    ax, ay = W // 2, Hh - 1
    rows, seen = [], []
    for y in range(Hh):
        row = []
        for x in range(W):
            obj, color, state = (int(v) for v in img[x, y])
            name = IDX_TO_OBJECT[obj]
            if (x, y) == (ax, ay):
                row.append("^")
                continue
            row.append(_DOOR[state] if name == "door" else _CHAR.get(name, "?"))
            if name in ("key", "ball", "box", "goal", "door", "lava"):
                ahead, side = ay - y, x - ax
                where = [f"{ahead} ahead"] if ahead else []
                if side:
                    where.append(f"{abs(side)} {'right' if side > 0 else 'left'}")
                label = f"{IDX_TO_COLOR[color]} {_DOOR_STATE[state] + ' ' if name == 'door' else ''}{name}"
                seen.append(f"{label} {' '.join(where) or 'here'}")
        rows.append("".join(row))
    carry = f"a {carrying.color} {carrying.type}" if carrying is not None else "nothing"
    head = f"You face {DIRECTIONS[int(obs['direction'])]}, carrying {carry}."
    return "\n".join([head, *rows, "Seen: " + ("; ".join(seen) if seen else "nothing")])


# ----------------------------------------------------------------------------- exact ground truth


def true_state(u: Any) -> tuple:
    """The hashable true state of a MiniGrid env: agent cell and direction, carried object, grid."""
    carry = None if u.carrying is None else tuple(int(v) for v in u.carrying.encode())
    return (int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir), carry, u.grid.encode().tobytes())


def _set_state(u: Any, state: tuple, shape: tuple) -> None:
    from minigrid.core.grid import Grid
    from minigrid.core.world_object import WorldObj

    x, y, d, carry, grid = state
    u.grid, _ = Grid.decode(np.frombuffer(grid, dtype=np.uint8).reshape(shape))
    u.agent_pos, u.agent_dir = (x, y), d
    u.carrying = None if carry is None else WorldObj.decode(*carry)
    if u.carrying is not None:
        u.carrying.cur_pos = np.array([-1, -1])
    u.step_count = 0


@dataclass
class GridTables:
    """Reachable states (index by true state), deterministic ``next`` (S, A), ``success`` and
    ``terminal`` (S, A) flags, and the finite-horizon values with the time-dependent reward."""

    index: dict[tuple, int]
    values: Any
    bfs_seconds: float
    n_states: int
    #: the true state of every index (BFS order), for the sandboxed mode's host-side mirror
    states: list[tuple] = field(default_factory=list)
    #: (S, 7) next state index, success and terminal flags of MiniGrid's own actions
    next: Any = None
    success: Any = None
    terminal: Any = None
    #: MiniGrid's ``max_steps`` and the grid encoding's shape
    max_steps: int = 0
    shape: tuple = ()


def enumerate_states(u: Any, max_states: int) -> Optional[tuple[dict[tuple, int], np.ndarray, np.ndarray, np.ndarray]]:
    """BFS over the states reachable from ``u``'s current state with the 7 actions (None when
    more than ``max_states``). ``u`` is a working copy: its state is overwritten."""
    shape = u.grid.encode().shape
    start = true_state(u)
    index = {start: 0}
    order = [start]
    nxt, succ, term = [], [], []
    queue = deque([start])
    while queue:
        s = queue.popleft()
        row_n, row_s, row_t = [], [], []
        for a in range(len(ACTIONS)):
            _set_state(u, s, shape)
            _, r, terminated, _, _ = u.step(a)
            s2 = true_state(u)
            if s2 not in index:
                if len(index) >= max_states:
                    return None
                index[s2] = len(order)
                order.append(s2)
                queue.append(s2)
            row_n.append(index[s2])
            row_s.append(bool(terminated) and r > 0)
            row_t.append(bool(terminated))
        nxt.append(row_n)
        succ.append(row_s)
        term.append(row_t)
    return index, np.asarray(nxt), np.asarray(succ), np.asarray(term)


def grid_tables(u: Any, cfg: Any) -> Optional[GridTables]:
    """Exact tables of the instance whose reset state ``u`` holds (a working copy)."""
    t0 = time.perf_counter()
    found = enumerate_states(u, int(cfg.max_states))
    if found is None:
        return None
    index, nxt, succ, term = found
    S, A = len(index) + 1, len(ACTIONS) + 1  # + the ended state; + the invalid action
    END = S - 1
    T = np.zeros((S, A, S))
    rows = np.arange(S - 1)[:, None]
    cols = np.arange(len(ACTIONS))[None, :]
    T[rows, cols, np.where(term, END, nxt)] = 1.0
    success = np.zeros((S, A))
    success[: S - 1, : len(ACTIONS)] = succ
    if cfg.invalid_action == "end":
        T[: S - 1, len(ACTIONS), END] = 1.0
    else:  # the invalid action is MiniGrid's 'done' no-op
        T[: S - 1, len(ACTIONS)] = T[: S - 1, DONE]
        success[: S - 1, len(ACTIONS)] = success[: S - 1, DONE]
    T[END, :, END] = 1.0
    H = int(cfg.max_turns)
    max_steps = int(u.max_steps)
    # MiniGrid's success reward at the (t+1)-th step: 1 - 0.9 * (t + 1) / max_steps
    step_reward = 1.0 - 0.9 * (np.arange(H) + 1) / max_steps
    R = step_reward[:, None, None] * success[None]
    values = finite_horizon_values(T, R, H, len(ACTIONS), str(cfg.reference_policy))
    return GridTables(index=index, values=values, bfs_seconds=time.perf_counter() - t0, n_states=S - 1,
                      states=list(index), next=nxt, success=succ, terminal=term, max_steps=max_steps,
                      shape=tuple(u.grid.encode().shape))


# ----------------------------------------------------------------------------- env + family


class MiniGridEnv(GymTextEnv):
    """One MiniGrid episode under the text protocol (module docstring)."""

    action_names = ACTIONS
    invalid_gym_action = DONE

    def __init__(self, cfg: Any, instance: TaskInstance, make_env: Any, family: "MiniGridFamily", episode_seed: int = 0,
                 sandbox: Any = None):
        super().__init__(cfg, instance, make_env, episode_seed=episode_seed, sandbox=sandbox)
        self.family = family
        self.tables: Optional[GridTables] = None

    def intro(self) -> str:
        return f"Mission: {self.unwrapped.mission}"

    def render_text(self) -> str:
        return render_view(self.last_obs, self.unwrapped.carrying)

    def true_state(self) -> Any:
        u = self.unwrapped
        carry = "none" if u.carrying is None else f"{u.carrying.color}-{u.carrying.type}"
        grid = u.grid.encode().tobytes()
        import hashlib

        return f"{int(u.agent_pos[0])},{int(u.agent_pos[1])},{int(u.agent_dir)},{carry},{hashlib.blake2b(grid, digest_size=4).hexdigest()}"

    def reset(self) -> str:
        self._exact_states: list[tuple] = []
        return super().reset()

    def record_state(self) -> None:
        super().record_state()
        self._exact_states.append(true_state(self.unwrapped))

    def ground_truth(self, actions: list[Optional[str]]) -> Optional[GroundTruthCredit]:
        tables = self.family.tables_for(self.instance)
        if tables is None:
            return None
        states = [tables.index[s] for s in self._exact_states[: len(actions)]]
        idx = [len(ACTIONS) if a is None else self.parse(a)[0] for a in actions]
        idx = [len(ACTIONS) if a is None else a for a in idx]
        value, q, adv, decisive = played_credit(tables.values, states, idx, len(ACTIONS), float(self.cfg.decisive_gap))
        return GroundTruthCredit(value=value, q_value=q, advantage=adv, decisive=decisive,
                                 reference_policy=str(self.cfg.reference_policy), mdp=None)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "exact_states": list(self._exact_states)}

    def restore(self, handle: dict[str, Any]) -> None:
        super().restore(handle)
        self._exact_states = list(handle["exact_states"])

    def stats(self) -> dict[str, float]:
        out = super().stats()
        tables = self.family.tables_for(self.instance) if self.cfg.ground_truth == "exact" else None
        out["gt_missing"] = float(self.cfg.ground_truth == "exact" and tables is None)
        if tables is not None:
            out["gt_states"] = float(tables.n_states)
        return out


    # -- sandboxed mode (module docstring) ---------------------------------------------------

    def _sandbox_table(self) -> GridTables:
        tables = self.family.tables_for(self.instance, transitions=True)
        if tables is None:
            raise ValueError(f"env.sandboxed: instance {self.instance.task_id} has more than env.max_states="
                             f"{self.cfg.max_states} reachable states, so no transition table to run in the sandbox")
        return tables

    def _sandbox_init(self) -> None:
        tables = self._sandbox_table()
        spec = {"next": tables.next.tolist(), "success": tables.success.tolist(),
                "terminal": tables.terminal.tolist(), "max_steps": int(tables.max_steps)}
        self._timed(self.box.write_file, STEP_SCRIPT, _STEP_SCRIPT_PATH.read_bytes())
        self._timed(self.box.write_file, TABLE_FILE, json.dumps(spec).encode())
        self._sandbox_write_state()

    def _sandbox_write_state(self) -> None:
        s = self._sandbox_table().index[true_state(self.unwrapped)]
        self._timed(self.box.write_file, STATE_FILE, json.dumps({"s": s, "k": self._gym_steps}).encode())

    def _sandbox_step(self, a: int) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        tables = self._sandbox_table()
        out = self._run_step_script(STEP_SCRIPT, {"a": int(a)})
        try:
            s2, r = int(out["s"]), float(out["r"])
            terminated, truncated = bool(out["terminated"]), bool(out["truncated"])
            state = tables.states[s2]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise SandboxFault("error", str(exc)) from exc
        # the host mirrors the reported state (rendering, state keys, ground truth)
        u = self.unwrapped
        _set_state(u, state, tables.shape)
        u.step_count = self._gym_steps + 1
        return u.gen_obs(), r, terminated, truncated, {}


@register_family
class MiniGridFamily(GymFamily):
    name = "minigrid"
    Config = MiniGridConfig  # type: ignore[assignment]

    def __init__(self, cfg: Optional[Any] = None):
        super(GymFamily, self).__init__(cfg)
        #: env.sandboxed: the exported table is stepped in the sandbox (module docstring)
        self.needs_sandbox = bool(self.cfg.sandboxed)
        self._tables: dict[str, Optional[GridTables]] = {}
        self.bfs_seconds = 0.0

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        return _gym_instance("mg", split, index, seed, {"gym_id": self.cfg.gym_id})

    def _make_gym(self) -> Any:
        import gymnasium

        return gymnasium.make(resolve_gym_id(self.cfg.gym_id), max_episode_steps=int(self.cfg.max_turns))

    def make_env(self, instance: TaskInstance, sandbox: Any, episode_seed: int) -> MiniGridEnv:
        return MiniGridEnv(self.cfg, instance, self._make_gym, self, episode_seed=episode_seed, sandbox=sandbox)

    def tables_for(self, instance: TaskInstance, transitions: bool = False) -> Optional[GridTables]:
        """The instance's exact tables (BFS + DP once per layout; cached), None when unavailable
        (more than ``env.max_states`` states, or ``env.ground_truth=none`` unless ``transitions``:
        the sandboxed mode needs the transition table whatever the ground truth)."""
        if self.cfg.ground_truth != "exact" and not transitions:
            return None
        key = f"{instance.task_id}|{instance.spec['reset_seed']}"
        if key not in self._tables:
            if len(self._tables) > 256:
                self._tables.clear()
            env = self._make_gym()
            try:
                env.reset(seed=int(instance.spec["reset_seed"]))
                tables = grid_tables(env.unwrapped, self.cfg)
            finally:
                env.close()
            self.bfs_seconds += tables.bfs_seconds if tables is not None else 0.0
            self._tables[key] = tables
        return self._tables[key]

    def describe(self) -> dict[str, str]:
        c = self.cfg
        gt = ("exact V/Q/advantage by BFS over the reachable true states + DP (deterministic transitions), "
              f"{c.reference_policy} reference policy over the 7 actions, horizon {c.max_turns}, at most "
              f"{c.max_states} states per instance; decisive = actions' Q spread >= {c.decisive_gap}"
              if c.ground_truth == "exact" else "none")
        return {
            "source": f"Farama minigrid {c.gym_id} (procedurally generated layouts, one per reset seed)",
            "size": f"train: {c.train_size} layouts; eval: {c.eval_size} layouts (disjoint seed streams)",
            "filtering": "none",
            "metric": f"success rate = reaching the mission's goal within {c.max_turns} turns; reward 1 - 0.9 * steps / max_steps",
            "benchmark": f"minigrid {c.gym_id} (egocentric 7x7 view as text; max {c.max_turns} turns)",
            "ground_truth": gt,
            "text_protocol": "observation = direction, carrying, 7x7 view, seen objects + 't{k}:'; the policy emits ' forward\\n' etc.",
            "execution": ("transitions in the run's sandbox (stdlib script stepping the exported BFS table)"
                          if c.sandboxed else "in-process"),
        }

    def profile(self) -> dict[str, Any]:
        return {
            "setting": "agentic",
            "turns": int(self.cfg.max_turns),
            "trajectory_tokens": 40 + 45 * int(self.cfg.max_turns),
            "verifiable_intermediate": False,
            "verifiable_outcome": True,
            "stochastic": False,
            "partially_observable": True,  # the egocentric 7x7 view
            "privileged_info": True,  # the true state (privileged())
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """``n`` episodes of uniformly random actions written as ``" forward\\n"`` (format only)."""
        return random_valid_episodes(self, n, seed, ACTION_FORMAT.format)
