"""Step-credit agreement with ground truth on math tasks with verifiable steps (survey §9.3).

One batch of math episodes (``experiment=math``) is rolled out with the run's policy; every
reasoning-RL credit method of the registry (and the GRPO baseline) assigns credit to the *same*
batch. For each method the script reports, against the math family's step checks (ground truth
+1 for a verified step, -1 for a wrong one):

* ``sign``   — fraction of steps whose mean token credit has the ground truth's sign;
* ``rank``   — Spearman correlation of step credit with ground truth over all steps;
* ``within`` — within-episode pairwise accuracy: over episodes that have both right and wrong
  steps, the fraction of (right, wrong) step pairs where the right step gets more credit (ties
  count 1/2). Episode-level methods score exactly 0.5 here by construction: this column is what
  step-level credit assignment adds;
* overhead per episode: extra forward passes, generated tokens, environment resets, judge calls,
  and credit wall seconds.

Usage::

    .venv/bin/python benchmarks/step_credit.py [--tasks 8] [--group 4] [--batches 2] [--out docs/step_credit.md]

The numbers depend on the policy: with the tiny embedded policy (a few hundred warm-up steps of
format) most steps are wrong and agreement is noisy; the table is a measurement, not a ranking of
the papers. Point ``--model-path`` at a real local model for meaningful numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import torch  # noqa: E402

from flows import train  # noqa: E402
from flows.config import load_config  # noqa: E402
from flows.runtime import RunState  # noqa: E402
import stages.credit.methods  # noqa: E402,F401  (registers the built-in methods)
from stages.credit.registry import build_method  # noqa: E402
from stages.credit.inventory import load_inventory  # noqa: E402
from stages.credit.stats import credit_statistics  # noqa: E402
from stages.rollout.policy import pad_token_id  # noqa: E402
from stages.schema import turn_credit  # noqa: E402

#: the papers' defaults, cut to keep one benchmark run within minutes on 2 CPU cores
CHEAP = {"vineppo": ["credit.k=4"], "spo": ["credit.k=4"], "scar": ["credit.num_permutations=16"]}

#: methods that consume process rewards run twice: with Monte Carlo step values from the policy
#: (Math-Shepherd; a fair comparison) and with the math family's step checks — the same verifier
#: that defines the ground truth, so that row is an oracle upper bound, not a result
PROCESS_SOURCES = {"mc": ["credit.process_reward=mc", "credit.mc_k=4"], "step_check": ["credit.process_reward=step_check"]}


def variants(name: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) rows of the table for one registry method."""
    from stages.credit.registry import get_method_class

    cls = get_method_class(name)
    base = [f"credit={name}", *CHEAP.get(name, [])]
    if "process_rewards" in cls.needs:
        rows = []
        for src, extra in PROCESS_SOURCES.items():
            try:  # a method may refuse a source (RED: step checks are not prefix scores)
                build_method(cls.Config(process_reward=src))
            except ValueError:
                continue
            rows.append((f"{name} [{src}{' = oracle' if src == 'step_check' else ''}]", base + extra))
        return rows
    return [(name, base)]


READING = """How to read it (tiny embedded policy): almost every step it writes is wrong, so
the sign agreement of an episode-level method is the share of right steps, and within-episode
accuracy is where step-level methods can differ from GRPO (exactly 0.5 for it: one credit per
episode). Rows marked `= oracle` read the same step checks that define the
ground truth and bound what a perfect process reward would give; the `[mc]` rows use Monte Carlo
step values from the policy itself, which are ~0 everywhere for a policy that almost never
succeeds. PURE's min-form return is 0 for every step of a failed episode whatever the source (its
defining property), hence identical rows. Judge-based methods (capo, int) use the policy itself as
the judge here; point `credit.judge` at a real model for meaningful verdicts."""


def within_episode_accuracy(credit: torch.Tensor, gt: torch.Tensor) -> tuple[float, int]:
    """Pairwise (right step, wrong step) accuracy inside each episode; (accuracy, pairs)."""
    right = (gt > 0) & ~torch.isnan(credit)
    wrong = (gt < 0) & ~torch.isnan(credit)
    c = torch.nan_to_num(credit)
    diff = c.unsqueeze(2) - c.unsqueeze(1)  # (B, K, K): credit[right i] - credit[wrong j]
    pairs = right.unsqueeze(2) & wrong.unsqueeze(1)
    n = int(pairs.sum())
    if n == 0:
        return float("nan"), 0
    tie = diff.abs() <= 1e-6 * (1.0 + c.abs().max())  # equal credit up to float rounding of the turn means
    score = ((diff > 0) & ~tie).double() + 0.5 * tie.double()
    return float((score * pairs).sum() / n), n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=8, help="task instances per batch")
    ap.add_argument("--group", type=int, default=4, help="samples per instance")
    ap.add_argument("--batches", type=int, default=4, help="batches (iterations of rollouts) averaged")
    ap.add_argument("--methods", default="", help="comma-separated registry names (default: all reasoning + grpo)")
    ap.add_argument("--model-path", default=None, help="local HF model directory (default: the tiny policy)")
    ap.add_argument("--home", default=None, help="CREDITFLOW_HOME (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m] or ["grpo"] + sorted(
        r.registry_name for r in load_inventory() if r.status == "implemented" and r.number and "R" in r.setting)
    base = ["experiment=math", f"rollout.tasks_per_iteration={args.tasks}", f"rollout.group_size={args.group}"]
    if args.model_path:
        base.append(f"model.path={args.model_path}")
    home = Path(args.home or tempfile.mkdtemp(prefix="cf-stepcredit-"))
    state = RunState.create(load_config(base), home)
    train._RUNS[state.run_id] = state
    rows = []
    try:
        ck = train.prepare_stage.fn(state.run_id, "prepare", state.chash, -1).value["checkpoint"]
        batches = []
        for it in range(args.batches):
            env = train.env_stage.fn(state.run_id, f"it{it}-env", state.chash, it).value
            roll = train.rollout_stage.fn(state.run_id, f"it{it}-rollout", state.chash, it, env, ck).value
            rew = train.reward_stage.fn(state.run_id, f"it{it}-reward", state.chash, it, roll).value
            batches.append((env, rew))
        episodes = sum(len(b) for _, b in batches)
        for name, overrides in [v for m in methods for v in variants(m)]:
            cfg = load_config(base + overrides)
            from omegaconf import OmegaConf

            state.method = build_method(OmegaConf.to_object(cfg.credit))
            acc = {"sign": [], "rank": [], "within": [], "pairs": 0}
            over = None
            t0 = time.perf_counter()
            for it, (env, batch) in enumerate(batches):
                res = train.credit_stage.fn(state.run_id, f"it{it}-credit", state.chash, it, batch, ck, env)
                tensors = batch.to_tensors(pad_token_id=pad_token_id(state.tokenizer))
                st = credit_statistics(tensors, res.value)
                acc["sign"].append(st.get("gt_sign_agreement", float("nan")))
                acc["rank"].append(st.get("gt_rank_corr", float("nan")))
                gt = tensors.gt_turn_advantage
                tc = turn_credit(res.value.advantages.float(), tensors.turn_ids, gt.shape[1])
                w, n = within_episode_accuracy(tc, gt)
                if n:
                    acc["within"].append(w * n)
                    acc["pairs"] += n
                over = res.overhead if over is None else over + res.overhead
            wall = time.perf_counter() - t0

            def mean(xs: list[float]) -> float:
                xs = [x for x in xs if not math.isnan(x)]
                return sum(xs) / len(xs) if xs else float("nan")

            within = sum(acc["within"]) / acc["pairs"] if acc["pairs"] else float("nan")
            rows.append((name, mean(acc["sign"]), mean(acc["rank"]), within, acc["pairs"],
                         over.extra_forward_passes / episodes, over.extra_tokens / episodes,
                         over.env_resets / episodes, over.judge_calls / episodes, wall / episodes))
            print(f"  {name}: done in {wall:.1f}s", file=sys.stderr, flush=True)
    finally:
        state.close()
        train._RUNS.pop(state.run_id, None)

    steps = sum(len(t.turns) for _, b in batches for t in b.trajectories)
    right = sum(bool(t.info.get("step_correct")) for _, b in batches for tr in b.trajectories for t in tr.turns)
    head = (f"Step-credit agreement on math ({episodes} episodes, {steps} steps, {right} verified-correct; "
            f"policy: {state.model_info.get('name', '?')}, {state.model_info.get('num_parameters', 0):,} params)\n\n"
            "| method | sign agreement | rank corr. | within-episode acc. (pairs) | fwd passes/ep | gen. tokens/ep "
            "| env resets/ep | judge calls/ep | credit s/ep |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} ({r[4]}) | {r[5]:.2f} | {r[6]:.1f} | {r[7]:.2f} "
                     f"| {r[8]:.2f} | {r[9]:.4f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        doc = __doc__.split("Usage::")[0].strip()
        Path(args.out).write_text(
            f"# {doc.splitlines()[0]}\n\n" + "\n".join(doc.splitlines()[1:]).strip() + "\n\n"
            f"Produced by `python benchmarks/step_credit.py {' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
            + text + "\n\n" + READING + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
