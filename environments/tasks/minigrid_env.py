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

Layouts and splits. Procedurally generated ids (Empty-Random, DoorKey, KeyCorridor, MultiRoom,
...) lay out a different grid per reset seed; an instance's *layout* is its reset state and
mission, hashed into ``spec["layout"]`` (:func:`environments.tasks.minigrid_gt.layout_key`).
``env.split_by=layout`` (the default) gives every layout to one split by that hash (1 in
``env.eval_share`` to eval; the "warmup" stream draws train layouts): instance ``i`` of a split is
the first reset seed of the stream ``(split, seed, i, attempt)`` whose layout hashes to the split,
so train and eval never share a layout, for any seeds (``tests/test_minigrid_layouts.py``).
``env.split_by=seed`` keeps disjoint reset-seed streams only (a small layout space then repeats
layouts across the splits); ids with one fixed layout (Empty-5x5) need it, and the config loader
says so when 64 reset seeds do not give layouts in both splits.

Ground truth (``env.ground_truth``; :mod:`environments.tasks.minigrid_gt`):

* ``exact``: the reachable true states (agent cell and direction, what it carries, the grid's
  encoding with door states and object positions) are enumerated by BFS from the layout's reset
  state, stepping working copies of the environment that keep the objects the environment refers
  to (KeyCorridor's ball, Unlock's door: their success tests object identity); MiniGrid's
  transitions are deterministic, so backward induction over ``env.max_turns`` turns with the
  time-dependent success reward (0 past MiniGrid's ``max_steps``) gives the exact V/Q/advantage of
  every played turn under the uniform policy over the 7 actions (or the optimal one). Once per
  layout, cached (256 layouts); its cost is ``stats()["gt_bfs_seconds"]`` of the episode that
  ran it. More than ``env.max_states`` reachable states: no ground truth for that layout
  (``stats()["gt_missing"]``). Sizes here: Empty-Random-5x5 36 states, KeyCorridorS3R1 284,
  DoorKey-5x5 308, MultiRoom-N2-S4 68, DoorKey-6x6 1368 (3 s), Unlock 9348 (~20 s).
* ``mc``: the played actions are replayed on a working copy; V of every turn's state (and of the
  state after the last) is the mean return of ``env.gt_rollouts`` uniform-policy rollouts over the
  turns left, with MiniGrid's own rewards and truncation; Q = the turn's reward + V(next); standard
  errors in ``value_se``/``advantage_stderr`` (:class:`environments.ground_truth.MCGroundTruth`);
  decisive = |A| above twice its standard error; cost in ``stats()["gt_mc_rollouts"]``,
  ``gt_mc_env_steps``, ``gt_mc_seconds``. For the ids too large to enumerate (KeyCorridorS3R2+,
  MultiRoom-N4+, DoorKey-8x8+, ObstructedMaze).
* ``auto``: ``exact`` where the layout has at most ``env.max_states`` states, else ``mc``; the
  BFS runs first on every new layout, and giving up costs time (KeyCorridorS3R2: 58 s to pass
  20000 states here under load; MultiRoom-N4-S5: 5312 states in 68 s, DoorKey-8x8: 7232 in 36 s),
  so ``mc`` (or a smaller ``env.max_states``) suits the large ids. Under the uniform policy their
  values from a random episode are mostly 0 (no rollout reaches the goal in 30 turns).

Refused at config time (one line): ``exact``/``mc``/``auto`` and ``sandboxed`` for the
Dynamic-Obstacles ids (random obstacle moves: both estimators assume deterministic transitions);
``exact``/``auto`` and ``sandboxed`` for ObstructedMaze (objects hidden in boxes: box contents are
not in the grid encoding, the BFS would merge distinct states; ``mc`` works); ``mc``/``auto`` with
``reference_policy=optimal``. The MDP is not exported (the oracle's horizon x states x actions
tables would be too large), so ``credit=oracle`` is refused here; the ``credit.gt_*`` metrics use
the ground truth.

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

import dataclasses
import json
import os
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from environments.base import SPLITS, EnvConfig, TaskInstance, derive_seed, hash_split
from environments.ground_truth import GroundTruthCredit, MCGroundTruth
from environments.registry import register_family
from environments.sandbox.step_script import SandboxFault
from environments.tabular_values import REFERENCE_POLICIES, played_credit
from environments.tasks.gym_adapter import (
    ACTION_FORMAT,
    INVALID_ACTIONS,
    GymFamily,
    GymTextEnv,
    _gym_instance,
    random_valid_episodes,
)
from environments.tasks.gym_spec import resolve_gym_id
from environments.tasks.minigrid_gt import (  # noqa: F401  (GridTables, grid_tables, enumerate_states: this module's API)
    ACTIONS,
    BOX_CONTENT_PREFIXES,
    DONE,
    STOCHASTIC_PREFIXES,
    GridTables,
    enumerate_states,
    grid_tables,
    layout_key,
    mc_credit,
    set_state,
    true_state,
)
from stages.config_fields import param

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

STEP_SCRIPT = "minigrid_step.py"
TABLE_FILE = "minigrid_table.json"
STATE_FILE = "minigrid_state.json"
_STEP_SCRIPT_PATH = Path(__file__).resolve().parent / "minigrid_table_step.py"

DIRECTIONS = ("east", "south", "west", "north")
GROUND_TRUTHS = ("exact", "mc", "auto", "none")
SPLIT_BY = ("layout", "seed")
#: reset seeds tried for an instance of a split before giving up (env.split_by=layout)
MAX_ATTEMPTS = 1000
#: reset seeds the config check draws to see that both splits get layouts
PROBE_SEEDS = 64
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
    ground_truth: str = param("exact", help="exact (BFS over reachable true states + DP) | mc (uniform-policy rollouts from every turn's state) | auto (exact up to env.max_states states, else mc) | none", choices=GROUND_TRUTHS)
    max_states: int = param(20000, help="exact ground truth (and the sandboxed table) only for instances with at most this many reachable states", ge=1)
    gt_rollouts: int = param(32, help="env.ground_truth=mc|auto: uniform-policy rollouts per turn for the MC values", ge=2)
    reference_policy: str = param("uniform", help="policy of the ground-truth V/Q/A: uniform (over the 7 actions) | optimal (exact only)", choices=REFERENCE_POLICIES)
    decisive_gap: float = param(0.05, help="a turn is decisive when the actions' Q-values at its state differ by at least this", ge=0)
    split_by: str = param("layout", help="layout (a layout, hashed, belongs to one split: train and eval never share one) | seed (disjoint reset-seed streams; layouts may repeat across splits)", choices=SPLIT_BY)
    eval_share: int = param(4, help="env.split_by=layout: 1 in this many layouts belongs to eval", ge=2)
    train_size: int = param(512, help="train-split instance pool size (reset seeds = layouts)", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)
    sandboxed: bool = param(False, help="step the exported BFS transition table inside the run's sandbox (stdlib script; same trajectories)")

    def config_rules(self):
        if _minigrid_id_problem(self.gym_id) is not None:
            return
        gid = str(self.gym_id)
        if gid.startswith(STOCHASTIC_PREFIXES):
            if self.ground_truth != "none":
                yield "ground_truth", (f"must be none for {gid}: its obstacles move at random, and the exact and MC "
                                       "ground truth assume MiniGrid's deterministic transitions")
            if self.sandboxed:
                yield "sandboxed", f"needs deterministic transitions (the exported table); {gid} moves its obstacles at random"
        if gid.startswith(BOX_CONTENT_PREFIXES):
            if self.ground_truth in ("exact", "auto"):
                yield "ground_truth", (f"cannot be {self.ground_truth} for {gid}: it hides objects in boxes and box contents "
                                       "are not in MiniGrid's grid encoding, so the BFS would merge distinct states (use mc)")
            if self.sandboxed:
                yield "sandboxed", f"needs the BFS table, which {gid} cannot have (box contents are not in the grid encoding)"
        if self.ground_truth in ("mc", "auto") and self.reference_policy != "uniform":
            yield "reference_policy", f"must be uniform with env.ground_truth={self.ground_truth} (the MC rollouts play uniform actions)"
        if self.split_by == "layout":
            counts = layout_counts(gid, int(self.eval_share))
            if min(counts.values()) == 0:
                yield "split_by", (f"{gid} gave {sum(counts.values())} distinct layout(s) over {PROBE_SEEDS} reset seeds "
                                   f"({counts['train']} train, {counts['eval']} eval by hash), so train and eval cannot have "
                                   "disjoint layouts; use env.split_by=seed")


_LAYOUT_COUNTS: dict[tuple[str, int], dict[str, int]] = {}


def layout_counts(gym_id: str, eval_share: int) -> dict[str, int]:
    """Distinct layouts per split over :data:`PROBE_SEEDS` reset seeds (cached per id)."""
    key = (gym_id, eval_share)
    if key not in _LAYOUT_COUNTS:
        import gymnasium

        env = gymnasium.make(resolve_gym_id(gym_id))
        try:
            layouts = set()
            for s in range(PROBE_SEEDS):
                env.reset(seed=s)
                layouts.add(layout_key(env.unwrapped))
        finally:
            env.close()
        splits = [hash_split(f"minigrid|{k}", eval_share) for k in layouts]
        _LAYOUT_COUNTS[key] = {"train": splits.count("train"), "eval": splits.count("eval")}
    return _LAYOUT_COUNTS[key]


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


# ----------------------------------------------------------------------------- env + family


class MiniGridEnv(GymTextEnv):
    """One MiniGrid episode under the text protocol (module docstring)."""

    action_names = ACTIONS
    invalid_gym_action = DONE

    def __init__(self, cfg: Any, instance: TaskInstance, make_env: Any, family: "MiniGridFamily", episode_seed: int = 0,
                 sandbox: Any = None):
        super().__init__(cfg, instance, make_env, episode_seed=episode_seed, sandbox=sandbox)
        self.family = family
        self._gt_cost = {"gt_bfs_seconds": 0.0, "gt_mc_rollouts": 0.0, "gt_mc_env_steps": 0.0, "gt_mc_seconds": 0.0}

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

    def _tables(self, transitions: bool = False) -> Optional[GridTables]:
        """The instance's exact tables; the BFS seconds they cost, when this episode computed
        them, go to ``stats()["gt_bfs_seconds"]`` (the family caches them per layout)."""
        before = self.family.bfs_seconds
        tables = self.family.tables_for(self.instance, transitions=transitions)
        self._gt_cost["gt_bfs_seconds"] += self.family.bfs_seconds - before
        return tables

    def ground_truth(self, actions: list[Optional[str]]) -> Optional[GroundTruthCredit]:
        """Per-turn V/Q/A of the played ``actions`` (names or indices; None = invalid) under the
        reference policy: exact from the layout's tables, or MC (module docstring)."""
        mode = self.cfg.ground_truth
        if mode == "none":
            return None
        # names (the agent loop's StepResult.action) or indices (self.actions); None = invalid
        idx = [a if isinstance(a, int) else (None if a is None else self.parse(a)[0]) for a in actions]
        idx = [len(ACTIONS) if a is None else a for a in idx]
        tables = self._tables() if mode in ("exact", "auto") else None
        if tables is not None:
            states = [tables.index[s] for s in self._exact_states[: len(actions)]]
            value, q, adv, decisive = played_credit(tables.values, states, idx, len(ACTIONS), float(self.cfg.decisive_gap))
            return GroundTruthCredit(value=value, q_value=q, advantage=adv, decisive=decisive,
                                     reference_policy=str(self.cfg.reference_policy), mdp=None)
        if mode == "exact" or not actions:
            return None
        return self._mc_ground_truth(idx)

    def _mc_ground_truth(self, idx: list[int]) -> MCGroundTruth:
        """MC values of every turn from ``env.gt_rollouts`` uniform rollouts (minigrid_gt.mc_credit);
        Q = the turn's reward + V of the next state; decisive = |A| above twice its standard error."""
        noop = self.cfg.invalid_action == "noop"
        gym_actions = [a if a < len(ACTIONS) else (DONE if noop else None) for a in idx]
        rng = random.Random(derive_seed("minigrid-gt", self.instance.seed, self.episode_seed))
        K = int(self.cfg.gt_rollouts)
        mc = mc_credit(self.family.reset_state(self.instance), gym_actions, int(self.cfg.max_turns), K, rng)
        n = len(idx)
        v, se = np.asarray(mc.value), np.asarray(mc.value_se)
        q = np.asarray(mc.rewards) + v[1:]
        adv = q - v[:n]
        adv_se = np.sqrt(se[:n] ** 2 + se[1:] ** 2)
        self._gt_cost["gt_mc_rollouts"] += float(mc.rollouts)
        self._gt_cost["gt_mc_env_steps"] += float(mc.env_steps)
        self._gt_cost["gt_mc_seconds"] += mc.seconds
        return MCGroundTruth(value=v[:n].tolist(), q_value=q.tolist(), advantage=adv.tolist(),
                             decisive=(np.abs(adv) > 2 * adv_se).tolist(), reference_policy=f"uniform (mc, {K} rollouts)",
                             value_se=se.tolist(), advantage_stderr=adv_se.tolist(), rollouts=mc.rollouts,
                             env_steps=mc.env_steps)

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "exact_states": list(self._exact_states)}

    def restore(self, handle: dict[str, Any]) -> None:
        super().restore(handle)
        self._exact_states = list(handle["exact_states"])

    def stats(self) -> dict[str, float]:
        """The Gymnasium stats, ``gt_missing`` (exact ground truth unavailable: too many states),
        ``gt_states`` (the layout's reachable states, where enumerated) and the ground truth's cost:
        ``gt_bfs_seconds`` (BFS + DP, charged to the episode that ran it), ``gt_mc_rollouts``,
        ``gt_mc_env_steps``, ``gt_mc_seconds``."""
        out = super().stats()
        mode = self.cfg.ground_truth
        tables = self._tables() if mode in ("exact", "auto") else None
        out["gt_missing"] = float(mode == "exact" and tables is None)
        if tables is not None:
            out["gt_states"] = float(tables.n_states)
        out.update(self._gt_cost)
        return out

    # -- sandboxed mode (module docstring) ---------------------------------------------------

    def _sandbox_table(self) -> GridTables:
        tables = self._tables(transitions=True)
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
        set_state(u, state, tables.shape)
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
        self._tables: OrderedDict[str, Optional[GridTables]] = OrderedDict()
        self.bfs_seconds = 0.0
        self._probe: Any = None
        self._layouts: dict[int, str] = {}
        #: reset seeds drawn and passed over because their layout belongs to the other split
        self.rejected = 0

    def _reset_probe(self, reset_seed: int) -> Any:
        """The family's scratch environment reset to ``reset_seed`` (its unwrapped env)."""
        if self._probe is None:
            self._probe = self._make_gym()
        self._probe.reset(seed=int(reset_seed))
        return self._probe.unwrapped

    def layout(self, reset_seed: int) -> str:
        """The layout hash of ``reset_seed`` (:func:`environments.tasks.minigrid_gt.layout_key`)."""
        if reset_seed not in self._layouts:
            if len(self._layouts) > 65536:
                self._layouts.clear()
            self._layouts[reset_seed] = layout_key(self._reset_probe(reset_seed))
        return self._layouts[reset_seed]

    def layout_split(self, layout: str) -> str:
        """The split a layout belongs to with ``env.split_by=layout`` (its hash, 1 in ``env.eval_share`` to eval)."""
        return hash_split(f"minigrid|{layout}", int(self.cfg.eval_share))

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        """Instance ``index`` of ``split``: ``env.split_by=seed``: the reset seed of a split's own
        seed stream; ``layout``: the first reset seed of the stream ``(split, seed, index, attempt)``
        whose layout hashes to ``split`` ("warmup" draws train layouts), so no layout is in both."""
        spec = {"gym_id": self.cfg.gym_id}
        if self.cfg.split_by == "seed":
            inst = _gym_instance("mg", split, index, seed, spec)
            return dataclasses.replace(inst, spec={**inst.spec, "layout": self.layout(inst.spec["reset_seed"])})
        if split not in (*SPLITS, "warmup"):
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        want = "train" if split == "warmup" else split
        for attempt in range(MAX_ATTEMPTS):
            iseed = derive_seed("mg-layout-instance", split, seed, index, attempt)
            reset_seed = iseed % (2 ** 31)
            key = self.layout(reset_seed)
            if self.layout_split(key) == want:
                return TaskInstance(task_id=f"mg-{split}-s{seed}-{index}", split=split, seed=iseed,
                                    spec={**spec, "reset_seed": reset_seed, "layout": key, "attempt": attempt})
            self.rejected += 1
        raise RuntimeError(f"minigrid: no {want} layout of {self.cfg.gym_id} in {MAX_ATTEMPTS} reset seeds "
                           "(env.split_by=layout); use env.split_by=seed")

    def _make_gym(self) -> Any:
        import gymnasium

        return gymnasium.make(resolve_gym_id(self.cfg.gym_id), max_episode_steps=int(self.cfg.max_turns))

    def make_env(self, instance: TaskInstance, sandbox: Any, episode_seed: int) -> MiniGridEnv:
        return MiniGridEnv(self.cfg, instance, self._make_gym, self, episode_seed=episode_seed, sandbox=sandbox)

    def reset_state(self, instance: TaskInstance) -> Any:
        """The instance's reset state in the family's scratch env (callers copy it, never step it)."""
        return self._reset_probe(int(instance.spec["reset_seed"]))

    def tables_for(self, instance: TaskInstance, transitions: bool = False) -> Optional[GridTables]:
        """The instance's exact tables (BFS + DP once per layout; the 256 most recent layouts are
        kept), None when unavailable (more than ``env.max_states`` states, or ``env.ground_truth``
        none or mc unless ``transitions``: the sandboxed mode needs the transition table whatever
        the ground truth)."""
        if self.cfg.ground_truth not in ("exact", "auto") and not transitions:
            return None
        key = str(instance.spec.get("layout") or f"{instance.task_id}|{instance.spec['reset_seed']}")
        if key in self._tables:
            self._tables.move_to_end(key)
        else:
            while len(self._tables) >= 256:
                self._tables.popitem(last=False)
            tables = grid_tables(self.reset_state(instance), self.cfg)
            self.bfs_seconds += tables.bfs_seconds if tables is not None else 0.0
            self._tables[key] = tables
        return self._tables[key]

    def describe(self) -> dict[str, str]:
        c = self.cfg
        exact = (f"exact V/Q/advantage by BFS over the reachable true states + DP (deterministic transitions), "
                 f"{c.reference_policy} reference policy over the 7 actions, horizon {c.max_turns}, at most "
                 f"{c.max_states} states per layout; decisive = actions' Q spread >= {c.decisive_gap}")
        mc = (f"MC V of every turn's state from {c.gt_rollouts} uniform-policy rollouts (standard errors; cost in "
              "gt_mc_*); Q = reward + V(next); decisive = |A| > 2 standard errors")
        gt = {"exact": exact, "mc": mc, "auto": f"{exact}; past that: {mc}", "none": "none"}[c.ground_truth]
        split = (f"layouts assigned to a split by hash (1 in {c.eval_share} to eval): train and eval share no layout"
                 if c.split_by == "layout" else "disjoint reset-seed streams (a layout may occur in both splits)")
        return {
            "source": f"Farama minigrid {c.gym_id} (procedurally generated layouts, one per reset seed)",
            "size": f"train: {c.train_size} instances; eval: {c.eval_size} instances",
            "filtering": split,
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
