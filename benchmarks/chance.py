"""Chance level of an experiment: the success rate of the uniformly random valid-action policy on
the *same eval instances* the train flow's eval stage plays (``flows.train.eval_stage``:
``build_env_batch(family, eval_episodes, 1, eval_size, iteration=10**6, seed, split="eval")``).

The learning table of the README compares "before -> after" with this number (survey §9.3: a
learning claim needs the chance baseline of the same instances). Monte Carlo: ``--episodes``
episodes per eval instance, each action drawn uniformly from the family's action names
(``env.names`` of the Gymnasium families, ``sokoban_rules.ACTIONS`` for Sokoban); for Sokoban the
exact value (the solver's uniform-policy V at the start, success reward 1) is printed beside it.

    python -m benchmarks.chance experiment=minigrid env.gym_id=MiniGrid-Empty-5x5-v0 --episodes 64
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from typing import Any

from environments.base import derive_seed


def action_names(env: Any) -> tuple[str, ...]:
    """The valid actions a uniform policy draws from."""
    names = getattr(env, "names", None)
    if names:
        return tuple(names)
    if env.__class__.__name__.endswith("SokobanEnv"):
        from environments.tasks.sokoban_rules import ACTIONS

        return tuple(ACTIONS)
    raise ValueError(f"no action list for {type(env).__name__}: chance needs a family with a finite action set")


def uniform_success(family: Any, instances: list, episodes: int, seed: int) -> dict[str, Any]:
    """Success rate (and its standard error) of uniform random actions, ``episodes`` per instance."""
    wins = total = 0
    per_instance = []
    for i, inst in enumerate(instances):
        w = 0
        for e in range(episodes):
            rng = random.Random(derive_seed("chance", seed, i, e))
            env = family.make(inst, episode_seed=rng.getrandbits(31))
            try:
                env.reset()
                names = action_names(env)
                while True:
                    res = env.step(f" {rng.choice(names)}\n")
                    if res.done:
                        w += int(bool(res.success))
                        break
            finally:
                env.close()
        wins += w
        total += episodes
        per_instance.append(w / episodes)
    p = wins / max(total, 1)
    return {"success": p, "stderr": math.sqrt(p * (1 - p) / max(total, 1)), "episodes": total,
            "instances": len(instances), "per_instance_min": min(per_instance), "per_instance_max": max(per_instance)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from environments.construct import build_env_batch
    from environments.registry import get_family_class
    from flows.config import load_config, to_object

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides, as for `creditflow train`")
    ap.add_argument("--episodes", type=int, default=64, help="uniform-policy episodes per eval instance")
    args = ap.parse_args(argv)
    cfg = to_object(load_config(args.overrides))
    family = get_family_class(cfg.env.name)(cfg.env)
    pool = getattr(cfg.env, "eval_size", cfg.eval_episodes)
    envb = build_env_batch(family, cfg.eval_episodes, 1, pool, iteration=10**6, seed=cfg.seed, split="eval")
    instances = [slot.instance for slot in envb.slots]
    out = {"overrides": args.overrides, **uniform_success(family, instances, args.episodes, cfg.seed)}
    if family.name == "sokoban":
        import numpy as np

        exact = [float(family.tables(inst.spec["rows"]).V[0, 0]) for inst in instances]
        lengths = [int(inst.spec["optimal_length"]) for inst in instances]
        out["exact_uniform_success"] = float(np.mean(exact))
        out["optimal_length_hist"] = {str(k): lengths.count(k) for k in sorted(set(lengths))}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
