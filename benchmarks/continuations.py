"""MC continuations at rollout speed: rollout-stage tokens/s vs continuation tokens/s (issue 14).

One run, one policy, one machine state: the rollout stage plays an iteration of bifurcation
episodes (``--horizon`` turns, default 20; ``--tasks`` instances x ``--group`` samples) through
:meth:`environments.start.SlotPlayer.play`, exactly as the flow's rollout task does; then VinePPO
(Kazemnejad et al. 2025, §3.1.1; ``credit.k``, default its K=9) assigns credit to that batch,
asking :class:`stages.rollout.continuations.MCContinuations` for ``k`` continuations from every
step start, exactly as the flow's credit task does. Printed: generated tokens, wall seconds and
tokens/s of both, the ratio continuation / rollout (goal >= 0.8), and the environment accounting
of the continuations (restores from snapshots, replayed steps, continuation steps).

The rollout stage always plays the whole iteration (default 8 x 8 = 64 episodes, the size whose
rollout throughput the issue quotes: a rollout of a few episodes is bound by per-step Python, not
by the model, and would flatter the ratio); VinePPO forks from the first ``--credit-rows`` of them
(default 4: 4 x 20 x 9 = 720 continuations, generated together, large enough to be compute-bound),
so the defaults run in about 3 minutes on this 2-core machine. ``--credit-rows 0`` is the issue's
full size (all 64 episodes: 11,520 continuations). ``--repeats`` measures that many iterations
after a warm-up one and reports medians; ``--replay`` forces the replay fallback (no snapshots).

Usage::

    .venv/bin/python benchmarks/continuations.py [--tasks 8 --group 8] [--k 9] [--horizon 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._threads import threads_from_argv  # noqa: E402

threads_from_argv()

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # the cached policy's "Loading weights" bar

import stages.credit.methods  # noqa: E402,F401  (registers the built-in methods)
from environments.base import derive_seed  # noqa: E402
from environments.construct import build_env_batch  # noqa: E402
from environments.start import SlotPlayer  # noqa: E402
from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily  # noqa: E402
from stages.credit.base import CreditContext  # noqa: E402
from stages.credit.registry import build_method, get_method_class  # noqa: E402
from stages.rollout.config import ModelConfig, RolloutConfig  # noqa: E402
from stages.rollout.continuations import MCContinuations  # noqa: E402
from stages.rollout.policy import build_live_policy, pad_token_id  # noqa: E402
from stages.schema import Batch  # noqa: E402


def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    family = BifurcationFamily(BifurcationConfig(horizon=args.horizon))
    rollout_cfg = RolloutConfig(tasks_per_iteration=args.tasks, group_size=args.group)
    home = Path(args.home or tempfile.mkdtemp(prefix="creditflow-bench-"))
    device = torch.device(args.device)
    live = build_live_policy(ModelConfig(device=args.device), rollout_cfg, family, home, args.seed, device)
    player = SlotPlayer(family=family, engine=live.engine, tokenizer=live.tokenizer, rollout=rollout_cfg)
    vine = build_method(get_method_class("vineppo").Config(k=args.k))
    rows = []
    for it in range(args.repeats + 1):  # iteration 0 warms up (allocator, kernels); not reported
        envb = build_env_batch(family, args.tasks, args.group, family.pool_size("train"), it, args.seed)
        t0 = time.perf_counter()
        batch, _, tokens = player.play(envb.slots, args.seed * 1000 + it, rollout_cfg.temperature)
        roll_s = time.perf_counter() - t0
        # VinePPO on the first --credit-rows episodes (0: all): the rollout keeps its batch size
        sub = Batch(trajectories=batch.trajectories[: args.credit_rows or len(batch)], meta=dict(batch.meta))
        mc = MCContinuations(player, envb, sub, lambda name, it=it: derive_seed(args.seed, it, name),
                             **({"snapshots": False} if args.replay else {}))
        tensors = sub.to_tensors(pad_token_id(live.tokenizer))
        t0 = time.perf_counter()
        res = vine(tensors, sub, CreditContext(mc_rollouts=mc))
        cont_s = time.perf_counter() - t0
        ov = res.overhead
        row = {"rollout_tokens": tokens, "rollout_s": roll_s, "rollout_tps": tokens / roll_s,
               "cont_tokens": ov.extra_tokens, "cont_s": cont_s, "cont_tps": ov.extra_tokens / cont_s,
               "continuations": res.stats.get("mc_continuations", 0.0), "env_restores": getattr(ov, "env_restores", 0),
               "replay_steps": getattr(ov, "env_replay_steps", ov.env_steps - ov.env_resets * 0), "env_steps": ov.env_steps,
               "ratio": (ov.extra_tokens / cont_s) / (tokens / roll_s)}
        if it:
            rows.append(row)
        print(f"iter {it}{' (warm-up)' if not it else ''}: rollout {tokens} tok {roll_s:.2f} s "
              f"{row['rollout_tps']:.0f} tok/s | continuations {int(row['continuations'])} x {ov.extra_tokens} tok "
              f"{cont_s:.2f} s {row['cont_tps']:.0f} tok/s | ratio {row['ratio']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8, help="task instances per iteration (rollout.tasks_per_iteration)")
    p.add_argument("--group", type=int, default=8, help="episodes per instance (rollout.group_size)")
    p.add_argument("--credit-rows", type=int, default=4,
                   help="episodes VinePPO forks from (0: all, the issue's full size: 64 x 20 x 9 = 11,520 continuations)")
    p.add_argument("--horizon", type=int, default=20, help="bifurcation turns per episode")
    p.add_argument("--k", type=int, default=9, help="continuations per step start (VinePPO's K=9)")
    p.add_argument("--repeats", type=int, default=1, help="measured iterations (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (set before torch loads)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--home", default=None, help="directory for the warmed-up tiny policy (default: a temp dir)")
    p.add_argument("--replay", action="store_true", help="restore environments by replay only (no snapshots)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args)
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"bifurcation H={args.horizon}, {args.tasks}x{args.group} episodes, VinePPO k={args.k} on "
          f"{args.credit_rows or args.tasks * args.group} of them, "
          f"{args.device}, {args.threads} thread(s), median of {len(rows)}:")
    print(f"  rollout stage:  {med['rollout_tps']:8.0f} tokens/s ({med['rollout_tokens']:.0f} tokens, {med['rollout_s']:.2f} s)")
    print(f"  continuations:  {med['cont_tps']:8.0f} tokens/s ({med['cont_tokens']:.0f} tokens, {med['cont_s']:.2f} s, "
          f"{med['continuations']:.0f} continuations)")
    print(f"  environments:   {med['env_restores']:.0f} snapshot restores, {med['replay_steps']:.0f} replayed steps, "
          f"{med['env_steps']:.0f} steps in all")
    print(f"  ratio continuation / rollout tokens/s: {med['ratio']:.2f} (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
