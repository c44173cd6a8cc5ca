"""Throughput of bounded-staleness asynchronous rollouts against the synchronous loop (issue 17).

The same config is trained through the real flow (Prefect tasks, persisted results, MLflow) with
``rollout.max_staleness=0`` (synchronous: rollout k waits for update k-1) and
``rollout.max_staleness=N`` (default 1: iteration k+1's env + rollout run on the flow's task
runner while iteration k's reward, credit and update run), interleaved in one process. Measured
over the steady state: from the end of iteration 0 to the end of the last iteration (the model
build, Prefect's server start, prepare and the evaluations are outside the window):

* iterations/s, and
* rollout tokens/s: the tokens the rollout stages generated in that window's iterations over its
  wall time (the learner's time counts for both: it is the throughput of training).

Thread split: ``--threads T`` (default 1, as the other benchmarks) is ``OMP_NUM_THREADS``. The
synchronous run gives all T torch intra-op threads to every stage in turn; the asynchronous one
gives the rollout lane ``ceil(T/2)`` and the learner ``floor(T/2)``, at least 1 each
(:class:`flows.train.AsyncRollouts`): with T=1 (or 2) that is 1 + 1, one core per lane on this
2-core machine, where the synchronous loop uses T. On a shared machine ``--threads 2`` makes the
synchronous baseline spin-wait (more OpenMP threads than free cores), so its ratio says more about
OpenMP than about asynchrony; compare at ``--threads 1``.

    python benchmarks/async_rollouts.py [--iterations 5] [--repeats 2] [--staleness 1] [overrides ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._threads import threads_from_argv  # noqa: E402

threads_from_argv()  # OMP_NUM_THREADS before torch is imported (default 1)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the CLI: no library chatter
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def run(overrides: list[str], home: Path) -> tuple[float, float, int, float]:
    """One training run through the flow: (steady-state seconds, rollout tokens in that window,
    iterations in it, seconds of its rollout stages)."""
    from flows import api, train

    ends: list[float] = []
    hook = lambda state, it: ends.append(time.perf_counter())  # noqa: E731  (after iteration it's metrics)
    train.ITERATION_HOOKS.append(hook)
    try:
        out = api.start_run(overrides, home=home, progress=False)
    finally:
        train.ITERATION_HOOKS.remove(hook)
    client = api.tracker_for(home).client
    tokens = sum(m.value for m in client.get_metric_history(out["mlflow_run_id"], "rollout.generated_tokens") if m.step >= 1)
    rollout_s = sum(m.value for m in client.get_metric_history(out["mlflow_run_id"], "time.rollout_seconds") if m.step >= 1)
    return ends[-1] - ends[0], tokens, len(ends) - 1, rollout_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved sync/async pairs; medians are compared")
    ap.add_argument("--staleness", type=int, default=1, help="rollout.max_staleness of the asynchronous runs")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (set before torch is imported)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = [f"iterations={args.iterations}", "eval_episodes=8", "tracking.heatmap_every=0", *args.overrides]
    home = Path(tempfile.mkdtemp(prefix="cf-bench-async-"))
    os.environ["CREDITFLOW_HOME"] = str(home)

    import torch

    # the cached warmed-up policy, Prefect's ephemeral server and MLflow's store: outside the timings
    run(["iterations=2", "eval_episodes=2", *args.overrides], home)
    sides: dict[str, list[tuple[float, float, int, float]]] = {"sync": [], "async": []}
    for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
        sides["sync"].append(run(base + ["rollout.max_staleness=0"], home))
        sides["async"].append(run(base + [f"rollout.max_staleness={args.staleness}"], home))

    def rates(rows):
        its = statistics.median(n / s for s, _, n, _ in rows)
        toks = statistics.median(t / s for s, t, _, _ in rows)
        return its, toks

    (s_it, s_tok), (a_it, a_tok) = rates(sides["sync"]), rates(sides["async"])
    t = torch.get_num_threads()
    print(f"config: {' '.join(base)}   (torch threads {t}: sync {t} per stage; async rollout lane "
          f"{max(1, t - t // 2)} + learner {max(1, t // 2)}; os.cpu_count()={os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"steady state: iterations 1..{args.iterations - 1}, medians of {args.repeats} interleaved runs each")
    print(f"{'':<26}{'iterations/s':>14}{'rollout tokens/s':>18}")
    print(f"{'synchronous':<26}{s_it:>14.3f}{s_tok:>18.1f}")
    print(f"{f'max_staleness={args.staleness}':<26}{a_it:>14.3f}{a_tok:>18.1f}")
    print(f"ratio async / sync        {a_it / s_it:>14.2f}x{a_tok / s_tok:>17.2f}x")
    for name, rows in sides.items():
        print(f"  {name} runs: " + ", ".join(f"{n / s:.3f} it/s" for s, _, n, _ in rows))
    # the bound with one free core per lane: the synchronous iteration's time over the longer lane
    # (the rollout stage vs everything else the flow's thread does)
    share = statistics.median(r / s for s, _, _, r in sides["sync"])
    print(f"rollout share of a synchronous iteration {share:.0%}: with a free core per lane the ratio is "
          f"at most {1 / max(share, 1 - share):.2f}x")


if __name__ == "__main__":
    main()
