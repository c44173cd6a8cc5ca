"""Per-stage time breakdown of a training iteration, and the orchestration + tracking overhead.

The same iterations are run twice on the same config, in the same process:

1. **plain**: the five stage bodies called as plain functions (no Prefect, no MLflow);
2. **flow**: the real Prefect flow with persisted results and MLflow logging.

It prints the per-stage breakdown of the plain run and the ratio flow / plain. Prefect's
ephemeral server start (once per process) is measured separately and excluded from the ratio.

    python benchmarks/pipeline.py [--iterations 10] [overrides ...]
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


def run_plain(overrides: list[str], home: Path) -> tuple[float, dict[str, list[float]]]:
    from flows.api import run_plain as plain

    t0 = time.perf_counter()
    out = plain(overrides, home)
    return time.perf_counter() - t0, out["per_stage"]


def run_flow(overrides: list[str], home: Path) -> float:
    from flows.api import start_run

    t0 = time.perf_counter()
    start_run(overrides, home=home, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="alternating plain/flow pairs; the medians are compared")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (set before torch is imported)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [f"iterations={args.iterations}", *args.overrides]
    home = Path(tempfile.mkdtemp(prefix="cf-bench-"))
    os.environ["CREDITFLOW_HOME"] = str(home)

    # build the cached warmed-up policy and start Prefect's ephemeral server outside the timings
    from prefect import flow

    @flow
    def _noop() -> int:
        return 0

    t0 = time.perf_counter()
    _noop()
    server_start = time.perf_counter() - t0
    run_plain(["iterations=1", *args.overrides], home)
    # one-off per process/home: MLflow import + SQLite schema creation, matplotlib import
    t0 = time.perf_counter()
    from flows.api import tracker_for

    tracker_for(home)
    import matplotlib.pyplot  # noqa: F401

    tracking_start = time.perf_counter() - t0

    plain_runs, flow_runs = [], []
    for _ in range(args.repeats):  # interleaved, so background load hits both sides alike
        plain_runs.append(run_plain(overrides, home))
        flow_runs.append(run_flow(overrides, home))
    # medians of the interleaved pairs: on a shared VM single runs vary by +-30%
    plain_total = statistics.median(r[0] for r in plain_runs)
    per_stage = min(plain_runs, key=lambda r: abs(r[0] - plain_total))[1]
    flow_total = statistics.median(flow_runs)
    pair_ratios = sorted(f / p[0] for f, p in zip(flow_runs, plain_runs))

    print(f"config: {' '.join(overrides)}")
    print(f"\nper-stage wall time, plain function calls ({args.iterations} iterations):")
    print(f"  {'stage':<10} {'mean s':>9} {'share':>7}")
    for stage, times in per_stage.items():
        print(f"  {stage:<10} {statistics.fmean(times):>9.4f} {sum(times) / plain_total:>7.1%}")
    print(f"\nmedians of {args.repeats} interleaved runs each:")
    print(f"plain total            {plain_total:8.2f} s")
    print(f"Prefect flow + MLflow  {flow_total:8.2f} s")
    print(f"ratio flow / plain     {flow_total / plain_total:8.3f}  "
          f"(overhead {flow_total - plain_total:+.2f} s, "
          f"{(flow_total - plain_total) / (args.iterations * 5 + 3) * 1000:+.1f} ms per task)")
    print(f"ratio of each pair      {' '.join(f'{r:.2f}' for r in pair_ratios)}")
    print(f"one-off costs, excluded: Prefect ephemeral server start {server_start:.1f} s; "
          f"MLflow import + SQLite schema + matplotlib import {tracking_start:.1f} s")


if __name__ == "__main__":
    main()
