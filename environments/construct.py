"""Stage 1 of survey §8: environment construction.

Builds the iteration's batch of task instances — ``rollout.tasks_per_iteration`` instances
drawn from the family's train split (uniformly, or by the credit method's sampling schedule:
``weights``, e.g. ACPO's curriculum), each replicated ``rollout.group_size`` times with distinct
episode seeds (the group of a group baseline, §2.3) — as a picklable :class:`EnvBatch`. Live
environments (and, for families that execute code, their sandboxes from the configured
backend) are made from it by the rollout stage, so a persisted EnvBatch is enough to resume.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

from environments.base import TaskFamily, TaskInstance
from stages.schema import Overhead


@dataclass
class EnvSlot:
    """One episode to run: which instance, which group, which episode seed."""

    uid: str
    instance: TaskInstance
    group_id: int
    episode_seed: int


@dataclass
class EnvBatch:
    slots: list[EnvSlot]
    family: str
    split: str
    #: instance pool the slots were drawn from (checklist: training data size)
    pool_size: int
    overhead: Overhead = field(default_factory=Overhead)
    #: the curriculum scores (task_id -> score) the instances were sampled by: every score the
    #: credit stages of the earlier iterations recorded (empty: uniform sampling)
    curriculum: dict[str, float] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len({s.group_id for s in self.slots})


def build_env_batch(
    family: TaskFamily,
    tasks_per_iteration: int,
    group_size: int,
    pool_size: int,
    iteration: int,
    seed: int,
    split: str = "train",
    weights: Optional[dict[str, float]] = None,
) -> EnvBatch:
    """Deterministic in (seed, iteration, weights): draws ``tasks_per_iteration`` distinct instances,
    uniformly, or with ``weights`` (task_id -> relative weight > 0, absent ids 1) by weighted
    sampling without replacement (Efraimidis & Spirakis 2006: the k largest ``u ** (1 / w)``)."""
    t0 = time.perf_counter()
    pool = family.instances(split, pool_size, seed)
    rng = random.Random(f"{seed}:{iteration}:env")
    k = min(tasks_per_iteration, len(pool))
    if weights is None:
        chosen = rng.sample(pool, k=k)
    else:
        for task_id, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"build_env_batch: weights[{task_id!r}] must be a finite number > 0, got {w!r}")
        keys = [math.log(1.0 - rng.random()) / weights.get(inst.task_id, 1.0) for inst in pool]
        chosen = [pool[i] for i in sorted(range(len(pool)), key=lambda i: keys[i], reverse=True)[:k]]
    slots = []
    for g, inst in enumerate(chosen):
        for k in range(group_size):
            slots.append(
                EnvSlot(
                    uid=f"it{iteration}-g{g}-{k}",
                    instance=inst,
                    group_id=g,
                    episode_seed=rng.getrandbits(31),
                )
            )
    return EnvBatch(
        slots=slots,
        family=family.name,
        split=split,
        pool_size=len(pool),
        overhead=Overhead(wall_seconds=time.perf_counter() - t0),
    )
