"""Stage 1 of survey §8, live part: start environments (with retry), replay them, play slots.

:mod:`environments.construct` draws the picklable :class:`~environments.construct.EnvSlot` s of an
iteration; this module turns slots into live environments and episodes:

* :func:`start_environments` — start the environments (and, for families that execute code,
  their sandboxes) group by group. Environment faults (survey §8.2): a group whose sandbox
  creation, ``make`` or ``reset`` raises is retried, then dropped *whole*, never kept with
  missing members (that would bias group baselines, §2.3); the drops are counted.
* :func:`fork_snapshots` / :func:`replay_environments` — bring environments to a state inside a
  recorded episode, as Monte Carlo continuations (VinePPO §3.1.1) and interventions (InT) need,
  without persisting anything live. Where the family implements ``snapshot()``/``restore()``,
  one fresh environment per episode is replayed *once* through its recorded turns and snapshotted
  at every fork point on the way; each continuation's environment is then ``restore`` d from its
  fork's snapshot (k continuations of T forks: T replayed steps at most instead of k * T * T / 2).
  Otherwise (the fallback) every continuation's environment replays the actions itself. Either
  way each replayed observation is checked against the recorded one.
* :class:`SlotPlayer` — what playing slots needs (family, engine, tokenizer, rollout config, a
  sandbox factory), and :meth:`SlotPlayer.play`: start (or replay), run the multi-turn agent loop
  of stage 2 (:func:`stages.rollout.agent_loop.run_episodes`), close everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from environments.base import TaskFamily
from environments.construct import EnvSlot
from stages.rollout.config import RolloutConfig
from stages.schema import Batch, Overhead


class EnvStartError(RuntimeError):
    """Every group of a batch failed to start its environments (sandbox or reset failures)."""


#: makes one sandbox for one environment (``backend.create``); ``None`` for families without sandboxes
SandboxFactory = Optional[Callable[[], Any]]


def close_all(objs: list[Any]) -> None:
    """Close environments and sandboxes, best effort (the backend's own cleanup removes leftovers)."""
    for obj in objs:
        try:
            obj.close()
        except Exception:
            pass


def start_group(family: TaskFamily, slots: list[EnvSlot], new_sandbox: SandboxFactory
                ) -> tuple[list[Any], list[Any], list[str]]:
    """Sandboxes, environments and prompts for one group's slots; on any failure everything made
    so far is closed and the exception propagates."""
    boxes: list[Any] = []
    envs: list[Any] = []
    try:
        if family.needs_sandbox:
            if new_sandbox is None:
                raise ValueError(f"env family {family.name!r} executes code but no sandbox backend was given")
            for _ in slots:
                boxes.append(new_sandbox())
        for i, s in enumerate(slots):
            envs.append(family.make(s.instance, sandbox=boxes[i] if boxes else None, episode_seed=s.episode_seed))
        prompts = [env.reset() for env in envs]
        return envs, boxes, prompts
    except BaseException:
        close_all([*envs, *boxes])
        raise


def start_environments(family: TaskFamily, slots: list[EnvSlot], retries: int, new_sandbox: SandboxFactory = None
                       ) -> tuple[list[EnvSlot], list[Any], list[Any], list[str], dict[str, Any]]:
    """Start the environments of ``slots`` group by group (survey §8.2: environment faults).

    A group whose environment fails to start (sandbox creation, ``make`` or ``reset`` raising) is
    retried ``retries`` times; then the *whole* group is dropped — never a group with missing
    members, which would bias group baselines — and the drop is reported in ``info``
    (``dropped_groups``, ``start_failures``, ``failure_reasons``, ``start_seconds``,
    ``sandboxes_created``). Returns ``(kept slots, envs, sandboxes, prompts, info)``."""
    groups: dict[int, list[EnvSlot]] = {}
    for s in slots:
        groups.setdefault(s.group_id, []).append(s)
    kept: list[EnvSlot] = []
    envs: list[Any] = []
    boxes: list[Any] = []
    prompts: list[str] = []
    info: dict[str, Any] = {"dropped_groups": 0, "start_failures": 0, "failure_reasons": []}
    t0 = time.perf_counter()
    try:
        for gid, members in groups.items():
            for attempt in range(retries + 1):
                try:
                    e, b, p = start_group(family, members, new_sandbox)
                except Exception as exc:
                    info["start_failures"] += 1
                    info["failure_reasons"].append(f"group {gid} attempt {attempt + 1}: {type(exc).__name__}: {exc}"[:300])
                    continue
                kept.extend(members)
                envs.extend(e)
                boxes.extend(b)
                prompts.extend(p)
                break
            else:
                info["dropped_groups"] += 1
    except BaseException:
        close_all([*envs, *boxes])
        raise
    # environment construction cost (survey §8.2 "reset cost"): sandboxes made + envs reset, seconds
    info["start_seconds"] = time.perf_counter() - t0
    info["sandboxes_created"] = len(boxes)
    if slots and not kept:
        raise EnvStartError(
            f"every group's environment failed to start ({info['start_failures']} attempts); last error: "
            f"{info['failure_reasons'][-1] if info['failure_reasons'] else '?'}"
        )
    return kept, envs, boxes, prompts, info


def replay_environments(envs: list[Any], slots: list[EnvSlot], replay: list[list[Any]], family: str) -> int:
    """Step each freshly reset environment through the recorded turns ``replay[i]`` of its episode
    (``turn.action_text`` in, ``turn.observation`` checked); returns the environment steps taken.
    A divergent observation raises: the family's transitions must be deterministic given the
    episode seed."""
    steps = 0
    for env, turns, slot in zip(envs, replay, slots):
        for turn in turns:
            _replay_turn(env, turn, slot, family)
            steps += 1
    return steps


def _replay_turn(env: Any, turn: Any, slot: EnvSlot, family: str) -> None:
    """Step ``env`` through one recorded turn; a divergent observation raises."""
    res = env.step(turn.action_text)
    if res.observation != turn.observation:
        raise RuntimeError(
            f"replaying episode {slot.uid} of env {family!r} diverged at turn {turn.index}: "
            f"recorded observation {turn.observation!r}, replay gave {res.observation!r}; "
            "the family's transitions must be deterministic given the episode seed"
        )


def fork_snapshots(family: TaskFamily, slots: list[EnvSlot], turns: list[list[Any]], points: list[set[int]],
                   new_sandbox: SandboxFactory = None) -> tuple[list[Optional[dict[int, Any]]], int, int]:
    """Snapshots of episode ``i``'s environment before each turn index in ``points[i]``: one fresh
    environment of ``slots[i]`` is reset and replayed once through the recorded ``turns[i]``
    (observations checked), with ``env.snapshot()`` taken on the way. Returns ``(handles,
    environments made, steps replayed)``; ``handles[i]`` is ``None`` where the family has no
    snapshots (``NotImplementedError``: the caller replays instead). Fork points at turn 0 need no
    snapshot (a reset environment is there) and points past the recorded turns are ignored."""
    handles: list[Optional[dict[int, Any]]] = []
    made = steps = 0
    for slot, recorded, want in zip(slots, turns, points):
        want = {t for t in want if 0 < t <= len(recorded)}
        if not want:
            handles.append({})
            continue
        envs, boxes, _ = start_group(family, [slot], new_sandbox)
        made += 1
        env, got = envs[0], {}
        try:
            try:
                env.snapshot()  # probe before replaying anything
            except NotImplementedError:
                handles.append(None)
                continue
            for t in range(max(want) + 1):
                if t in want:
                    got[t] = env.snapshot()
                if t < max(want):
                    _replay_turn(env, recorded[t], slot, family.name)
                    steps += 1
        finally:
            close_all([*envs, *boxes])
        handles.append(got)
    return handles, made, steps


def restore_environments(envs: list[Any], handles: list[Any]) -> int:
    """``env.restore(handle)`` for every environment with a handle (``None``: left as reset);
    returns the number restored."""
    n = 0
    for env, handle in zip(envs, handles):
        if handle is not None:
            env.restore(handle)
            n += 1
    return n


@dataclass
class SlotPlayer:
    """What playing slots needs, and nothing else.

    ``family``: the task family (makes environments); ``engine`` / ``tokenizer``: the policy's
    rollout engine and tokenizer; ``rollout``: the run's ``rollout.`` config (turns, tokens per
    turn, ``env_start_retries``); ``new_sandbox``: makes one sandbox (families that execute code).
    The flow process (:class:`flows.runtime.RunState`) and every rollout shard's worker build one
    from their own live objects."""

    family: TaskFamily
    engine: Any
    tokenizer: Any
    rollout: RolloutConfig
    new_sandbox: SandboxFactory = None

    def play(self, slots: list[EnvSlot], seed: int, temperature: float, starts: Optional[list[Any]] = None,
             replay: Optional[list[list[Any]]] = None, uids: Optional[list[str]] = None,
             restore: Optional[list[Any]] = None) -> tuple[Batch, Overhead, int]:
        """Make live environments (and sandboxes) for ``slots``, play them, close everything.

        Plain episodes start through :func:`start_environments` (retry, then drop whole groups; the
        batch's ``meta`` says how many). With ``starts`` (continuations) the environments are reset
        and brought to the start points: ``restore[i]``, where given and not ``None``, is a
        snapshot handle that environment ``i`` is restored from (:func:`restore_environments`);
        the others replay the recorded turns ``replay[i]`` (:func:`replay_environments`). Then the
        episodes continue from the start points. Returns ``(batch, overhead, generated tokens)``;
        the overhead counts restores and replayed steps (``env_restores``, ``env_replay_steps``,
        the latter included in ``env_steps``)."""
        from stages.rollout.agent_loop import run_episodes

        name = self.family.name
        cfg = replace(self.rollout, temperature=temperature)
        boxes: list[Any] = []
        envs: list[Any] = []
        replay_steps = restored = 0
        info: dict[str, Any] = {}
        prompts: Optional[list[str]] = None
        try:
            if starts is None:
                slots, envs, boxes, prompts, info = start_environments(
                    self.family, slots, int(self.rollout.env_start_retries), self.new_sandbox)
            else:
                envs, boxes, _ = start_group(self.family, slots, self.new_sandbox)
                handles = restore if restore is not None else [None] * len(envs)
                restored = restore_environments(envs, handles)
                turns = replay or [[]] * len(envs)
                replay_steps = replay_environments(envs, slots, [[] if h is not None else t for h, t in zip(handles, turns)],
                                                   name)
            trajs = run_episodes(
                self.engine, self.tokenizer, envs,
                group_ids=[s.group_id for s in slots],
                task_ids=[s.instance.task_id for s in slots],
                uids=uids or [s.uid for s in slots],
                env_name=name, cfg=cfg, seed=seed, starts=starts, prompts=prompts,
            )
        finally:
            close_all([*envs, *boxes])
        steps = sum(len(t.turns) for t in trajs) + replay_steps
        # imposed actions (interventions) are not generated
        gen_tokens = sum(int(t.meta.get("generated_tokens", t.num_policy_tokens)) for t in trajs)
        overhead = Overhead(env_resets=len(envs), env_steps=steps, env_restores=restored, env_replay_steps=replay_steps)
        return Batch(trajectories=trajs, meta=info), overhead, gen_tokens
