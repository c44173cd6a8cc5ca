"""Ground truth and layouts of the MiniGrid family (:mod:`environments.tasks.minigrid_env`; survey §9.3).

* **Layouts.** The *layout* of an instance is its reset state (agent cell and direction, carried
  object, MiniGrid's grid encoding with door states and object positions) and its mission;
  :func:`layout_key` hashes it. ``env.split_by=layout`` assigns every layout to a split by that hash
  (:func:`environments.base.hash_split`, 1 in ``env.eval_share`` to eval), so train and eval never
  share a layout, whatever the seeds.
* **Exact** (``env.ground_truth=exact``): :func:`enumerate_states` runs a BFS over the true states
  reachable from the reset state with the 7 actions, stepping a *working copy* of the environment
  (:class:`StateCopier`: MiniGrid's own ``step``, its observation rendering switched off), and
  :func:`grid_tables` runs backward induction with MiniGrid's time-dependent success reward.
* **Monte Carlo** (``env.ground_truth=mc``, or ``auto`` past ``env.max_states``): :func:`mc_credit`
  replays the played actions on a working copy and estimates V of every turn's state from
  ``env.gt_rollouts`` uniform-policy rollouts (mean and standard error; their cost recorded).

Working copies. Setting a MiniGrid environment to a state by decoding the grid
(``Grid.decode``) makes new objects, while some environments test success against the *object*
they placed (KeyCorridor: ``self.carrying == self.obj``; Unlock: ``self.door.is_open``): on a
decoded grid those tests never fire. :class:`StateCopier` instead deep-copies the grid, the
carried object and every attribute of the environment that refers to a grid object in one
``copy.deepcopy`` call, so the references keep pointing at the copied objects.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from environments.tabular_values import finite_horizon_values

ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
DONE = ACTIONS.index("done")
#: ids whose transitions are random (the obstacles move at random): outside both estimators
STOCHASTIC_PREFIXES = ("MiniGrid-Dynamic-Obstacles",)
#: ids that hide objects in boxes (box contents are not in the grid encoding, so the BFS would
#: merge distinct states): exact ground truth and the sandboxed table are refused, MC is not
BOX_CONTENT_PREFIXES = ("MiniGrid-ObstructedMaze",)


def true_state(u: Any) -> tuple:
    """The hashable true state of a MiniGrid env: agent cell and direction, carried object, grid."""
    carry = None if u.carrying is None else tuple(int(v) for v in u.carrying.encode())
    return (int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir), carry, u.grid.encode().tobytes())


def layout_key(u: Any) -> str:
    """The hash of a freshly reset env's layout: its true state and its mission."""
    return hashlib.blake2b(repr((true_state(u), str(u.mission))).encode(), digest_size=8).hexdigest()


def set_state(u: Any, state: tuple, shape: tuple) -> None:
    """Set ``u`` to ``state`` by decoding the grid (for rendering: ``gen_obs`` is a pure function of
    the true state; stepping a decoded grid loses object identity, see :class:`StateCopier`)."""
    from minigrid.core.grid import Grid
    from minigrid.core.world_object import WorldObj

    x, y, d, carry, grid = state
    u.grid, _ = Grid.decode(np.frombuffer(grid, dtype=np.uint8).reshape(shape))
    u.agent_pos, u.agent_dir = (x, y), d
    u.carrying = None if carry is None else WorldObj.decode(*carry)
    if u.carrying is not None:
        u.carrying.cur_pos = np.array([-1, -1])
    u.step_count = 0


class StateCopier:
    """Captures and restores the mutable state of a MiniGrid env (module docstring), and makes
    working copies whose ``step`` does not render the observation (2-4 us a step instead of ~100)."""

    def __init__(self, u: Any):
        from minigrid.core.world_object import WorldObj

        def is_obj(v: Any) -> bool:
            return isinstance(v, WorldObj) or (isinstance(v, (list, tuple)) and bool(v)
                                               and all(isinstance(x, WorldObj) for x in v))

        self.refs = [k for k, v in vars(u).items() if k not in ("grid", "carrying") and is_obj(v)]

    @staticmethod
    def working_copy(u: Any) -> Any:
        w = copy.deepcopy(u)
        w.gen_obs = lambda: None  # the observation is not needed to step
        return w

    def capture(self, u: Any) -> tuple:
        objects = copy.deepcopy((u.grid, u.carrying, [getattr(u, k) for k in self.refs]))
        return objects, (int(u.agent_pos[0]), int(u.agent_pos[1])), int(u.agent_dir), int(u.step_count)

    def restore(self, u: Any, snap: tuple, objects: bool = True) -> None:
        """``u`` set to ``snap``; ``objects=False`` restores the agent only (the grid, the carried
        object and their states are known to be unchanged since the last restore)."""
        if objects:
            u.grid, u.carrying, refs = copy.deepcopy(snap[0])
            for k, v in zip(self.refs, refs):
                setattr(u, k, v)
        u.agent_pos, u.agent_dir, u.step_count = snap[1], snap[2], snap[3]


# ----------------------------------------------------------------------------- exact


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
    more than ``max_states``), stepping working copies of ``u`` (``u`` itself is not changed)."""
    w = StateCopier.working_copy(u)
    copier = StateCopier(w)
    start = true_state(w)
    index = {start: 0}
    snaps = {0: copier.capture(w)}
    nxt, succ, term = [], [], []
    queue = deque([start])
    while queue:
        s = queue.popleft()
        snap = snaps.pop(index[s])
        row_n, row_s, row_t = [], [], []
        dirty = True
        for a in range(len(ACTIONS)):
            copier.restore(w, snap, objects=dirty)
            w.step_count = 0
            _, r, terminated, _, _ = w.step(a)
            s2 = true_state(w)
            # left/right/forward leave the objects alone; pickup/drop/toggle may change them
            dirty = s2[3:] != s[3:]
            if s2 not in index:
                if len(index) >= max_states:
                    return None
                index[s2] = len(index)
                snaps[index[s2]] = copier.capture(w)
                queue.append(s2)
            row_n.append(index[s2])
            row_s.append(bool(terminated) and r > 0)
            row_t.append(bool(terminated))
        nxt.append(row_n)
        succ.append(row_s)
        term.append(row_t)
    return index, np.asarray(nxt), np.asarray(succ), np.asarray(term)


def success_reward(horizon: int, max_steps: int) -> np.ndarray:
    """MiniGrid's success reward at turn t (its (t+1)-th step): ``1 - 0.9 (t + 1) / max_steps``,
    0 past ``max_steps`` (MiniGrid truncates the episode there)."""
    steps = np.arange(horizon) + 1
    return np.where(steps <= max_steps, 1.0 - 0.9 * steps / max_steps, 0.0)


def grid_tables(u: Any, cfg: Any) -> Optional[GridTables]:
    """Exact tables of the instance whose reset state ``u`` holds."""
    t0 = time.perf_counter()
    found = enumerate_states(u, int(cfg.max_states))
    if found is None:
        return None
    index, nxt, succ, term = found
    S, A = len(index) + 1, len(ACTIONS) + 1  # + the ended state; + the invalid action
    END = S - 1
    NEXT = np.full((S, A), END, dtype=np.int64)  # deterministic: next-state indices, not an S x A x S table
    NEXT[: S - 1, : len(ACTIONS)] = np.where(term, END, nxt)
    success = np.zeros((S, A))
    success[: S - 1, : len(ACTIONS)] = succ
    if cfg.invalid_action != "end":  # the invalid action is MiniGrid's 'done' no-op (else it ends the episode)
        NEXT[: S - 1, len(ACTIONS)] = NEXT[: S - 1, DONE]
        success[: S - 1, len(ACTIONS)] = success[: S - 1, DONE]
    H = int(cfg.max_turns)
    max_steps = int(u.max_steps)
    R = success_reward(H, max_steps)[:, None, None] * success[None]
    values = finite_horizon_values(NEXT, R, H, len(ACTIONS), str(cfg.reference_policy))
    return GridTables(index=index, values=values, bfs_seconds=time.perf_counter() - t0, n_states=S - 1,
                      states=list(index), next=nxt, success=succ, terminal=term, max_steps=max_steps,
                      shape=tuple(u.grid.encode().shape))


# ----------------------------------------------------------------------------- Monte Carlo


@dataclass
class MCCredit:
    """Per-turn MC values (``value`` has one entry per turn and one after the last), their
    standard errors, the realized rewards, and the estimate's cost."""

    value: list[float]
    value_se: list[float]
    rewards: list[float]
    rollouts: int
    env_steps: int
    seconds: float


def mc_credit(u: Any, gym_actions: list[Optional[int]], horizon: int, rollouts: int, rng: random.Random) -> MCCredit:
    """MC ground truth of an episode from the reset state ``u`` holds: the played ``gym_actions``
    (None: the turn ended the episode, ``env.invalid_action=end``) are replayed on a working copy;
    at each turn t (and after the last) V is the mean return of ``rollouts`` episodes of uniformly
    random actions over the ``horizon - t`` turns left, with MiniGrid's own rewards (its step
    counter is the turn, so the success reward is the time-dependent one) and its truncation."""
    t0 = time.perf_counter()
    w = StateCopier.working_copy(u)
    copier = StateCopier(w)
    max_steps = int(w.max_steps)
    n = len(gym_actions)
    values, ses, rewards = [], [], []
    steps = done_rollouts = 0
    ended = False
    for t in range(n + 1):
        left = horizon - t
        if ended or left <= 0 or t >= max_steps:
            values.append(0.0)
            ses.append(0.0)
        else:
            snap = copier.capture(w)
            rets = np.zeros(rollouts)
            for k in range(rollouts):  # rollouts x turns of a small fixed horizon: env steps, not tensors
                copier.restore(w, snap)
                for _ in range(left):
                    _, r, terminated, truncated, _ = w.step(rng.randrange(len(ACTIONS)))
                    steps += 1
                    rets[k] += float(r)
                    if terminated or truncated:
                        break
            done_rollouts += rollouts
            copier.restore(w, snap)
            values.append(float(rets.mean()))
            ses.append(float(rets.std(ddof=1) / math.sqrt(rollouts)) if rollouts > 1 else 0.0)
        if t == n:
            break
        a = gym_actions[t]
        if ended or a is None:
            ended = True
            rewards.append(0.0)
            continue
        _, r, terminated, truncated, _ = w.step(a)
        steps += 1
        rewards.append(float(r))
        ended = bool(terminated or truncated)
    return MCCredit(value=values, value_se=ses, rewards=rewards, rollouts=done_rollouts, env_steps=steps,
                    seconds=time.perf_counter() - t0)
