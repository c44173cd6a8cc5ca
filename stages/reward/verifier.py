"""Stage 3 of survey §8: reward computation.

The terminal reward of each episode is the task family's verdict: the environment's own
success signal recorded during the rollout, or the family's post-hoc ``verify`` (hidden tests,
answer checkers). Per-turn rewards stay on the turns. A reward that is not a finite number is a
fault of the environment: that episode gets reward 0 and ``done_reason`` ``invalid_reward``, the
fault is counted, and the run goes on.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from environments.base import TaskFamily
from stages.schema import Batch, Overhead


def compute_rewards(batch: Batch, family: TaskFamily) -> tuple[Batch, dict[str, float], Overhead]:
    t0 = time.perf_counter()
    faults = 0
    reasons: Counter[str] = Counter()
    for traj in batch.trajectories:
        verdict = family.verify(traj)
        if verdict is not None:
            traj.reward, traj.success, info = float(verdict[0]), bool(verdict[1]), verdict[2]
            traj.meta["verifier"] = info
        bad_turns = [t.index for t in traj.turns if not math.isfinite(t.reward)]
        if not math.isfinite(traj.reward) or bad_turns:
            faults += 1
            traj.meta["invalid_reward"] = {"reward": repr(traj.reward), "turns": bad_turns}
            traj.reward, traj.success = 0.0, False
            for t in traj.turns:
                if not math.isfinite(t.reward):
                    t.reward = 0.0
            traj.done_reason = "invalid_reward"
        reasons[traj.done_reason or "unknown"] += 1
    batch.invalidate_tensors()
    batch.validate()
    n = max(len(batch), 1)
    stats = {
        "reward_mean": sum(t.reward for t in batch.trajectories) / n,
        "success_rate": sum(t.success for t in batch.trajectories) / n,
        "turn_reward_mean": sum(sum(tr.reward for tr in t.turns) for t in batch.trajectories) / n,
        "invalid_reward_episodes": float(faults),
    }
    for reason, count in reasons.items():
        stats[f"done.{reason}"] = float(count)
    return batch, stats, Overhead(wall_seconds=time.perf_counter() - t0)
