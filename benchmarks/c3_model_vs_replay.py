"""C3's model-based counterfactual against the real replay, on bifurcation (issue 18).

One batch of bifurcation episodes (exact per-turn advantages from the task's MDP) played by the
run's tiny policy; C3 (:mod:`stages.credit.methods.counterfactual`) with
``counterfactual_outcome=model`` and ``compare_replay=true`` assigns credit to it for each
counterfactual action (``resample``, ``default``): the counterfactual actions are taken as the
replay takes them, the judge (``credit.judge=policy``: the same live policy, yes/no log-odds)
predicts each one's P(success), and the same actions are really replayed from forked environments.
Printed per counterfactual: the agreement of the two credits (Spearman, sign agreement on the turns
where the replay credit is non-zero, the predictions' mean absolute error against the replays'
returns), each one's sign accuracy and Spearman against the exact per-turn advantage, and the cost
of both (forward tokens, environment steps and forks, seconds) with the ratios model / replay.

The judge is the policy itself, a tiny model trained on the task's text (not a general LLM): its
P(yes) says what *this* model believes, which is the point of the comparison; pass ``--judge DIR``
for a local Hugging Face model instead.

Usage::

    .venv/bin/python benchmarks/c3_model_vs_replay.py [--tasks 4 --group 4] [--k 4] [--horizon 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
from stages.credit.methods.counterfactual import C3, C3Config  # noqa: E402
from stages.reward.judge import make_judge  # noqa: E402
from stages.rollout.config import ModelConfig, RolloutConfig  # noqa: E402
from stages.rollout.continuations import MCContinuations  # noqa: E402
from stages.rollout.policy import build_live_policy, pad_token_id  # noqa: E402

COLUMNS = (("compare_spearman", "rho(model,replay)"), ("compare_sign_agreement", "sign agree"),
           ("compare_outcome_mae", "outcome MAE"), ("compare_model_gt_sign_accuracy", "model gt sign"),
           ("compare_replay_gt_sign_accuracy", "replay gt sign"), ("compare_model_gt_spearman", "model gt rho"),
           ("compare_replay_gt_spearman", "replay gt rho"))
COSTS = ("forward_tokens", "env_steps", "env_forks", "judge_calls", "seconds")


def measure(args: argparse.Namespace) -> list[tuple[str, dict[str, float]]]:
    family = BifurcationFamily(BifurcationConfig(horizon=args.horizon, num_decisive=args.num_decisive))
    rollout_cfg = RolloutConfig(tasks_per_iteration=args.tasks, group_size=args.group)
    home = Path(args.home or tempfile.mkdtemp(prefix="creditflow-bench-"))
    live = build_live_policy(ModelConfig(device=args.device), rollout_cfg, family, home, args.seed, torch.device(args.device))
    player = SlotPlayer(family=family, engine=live.engine, tokenizer=live.tokenizer, rollout=rollout_cfg)
    envb = build_env_batch(family, args.tasks, args.group, family.pool_size("train"), 0, args.seed)
    batch, _, _ = player.play(envb.slots, args.seed * 1000, rollout_cfg.temperature)
    tensors = batch.to_tensors(pad_token_id(live.tokenizer))
    out = []
    for cf in ("resample", "default"):
        cfg = C3Config(k=args.k, counterfactual=cf, counterfactual_outcome="model", compare_replay=True,
                       judge=args.judge)
        judge = make_judge(cfg, policy=live.model, tokenizer=live.tokenizer)
        mc = MCContinuations(player, envb, batch, lambda name, cf=cf: derive_seed(args.seed, cf, name))
        ctx = CreditContext(mc_rollouts=mc, judge=judge, default_action=family.default_action)
        res = C3(cfg)(tensors, batch, ctx)
        out.append((cf, res.stats))
    return out


def _fmt(x: float) -> str:
    return "   nan" if x != x else f"{x:6.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=4, help="task instances (rollout.tasks_per_iteration)")
    p.add_argument("--group", type=int, default=4, help="episodes per instance (rollout.group_size)")
    p.add_argument("--horizon", type=int, default=6, help="bifurcation turns per episode")
    p.add_argument("--num-decisive", type=int, default=2, help="decisive turns per episode")
    p.add_argument("--k", type=int, default=4, help="counterfactual actions per turn (credit.k)")
    p.add_argument("--judge", default="policy", help="credit.judge: policy (the live policy) or a local HF model directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (set before torch loads)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--home", default=None, help="directory for the warmed-up tiny policy (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args)
    print(f"C3 model-based vs replayed counterfactuals: bifurcation H={args.horizon} ({args.num_decisive} decisive), "
          f"{args.tasks}x{args.group} episodes, k={args.k}, judge={args.judge}, {args.device}")
    print("counterfactual | " + " | ".join(h for _, h in COLUMNS))
    for cf, s in rows:
        print(f"{cf:14s} | " + " | ".join(f"{_fmt(s.get(key, float('nan'))):>{len(h)}}" for key, h in COLUMNS))
    print("cost: model / replay (ratio)")
    for cf, s in rows:
        parts = []
        for c in COSTS:
            m, r = s.get(f"model_{c}", 0.0), s.get(f"replay_{c}", 0.0)
            ratio = f"{m / r:.3f}" if r else "-"
            parts.append(f"{c} {m:.4g} / {r:.4g} ({ratio})")
        print(f"{cf:14s} | " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
