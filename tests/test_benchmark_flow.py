"""``creditflow benchmark``: budget stopping rule, summary.json contract, resume, config errors, lr sweep."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest

from stages.benchmark.budget import CHARGED, BudgetConfig, Spend, credit_spend, exhausted, iteration_spend
from stages.benchmark.learning import compute_to_target, learning_table, lr_sweep, t_interval

# a tiny task: 2 tasks x 4 rollouts of 3 turns per iteration
TINY = ["rollout.tasks_per_iteration=2", "rollout.group_size=4", "eval_episodes=8", "tracking.heatmap_every=0"]


def _bench_overrides(**kw: str) -> list[str]:
    base = {"methods": "[grpo,oracle]", "seeds": "1", "lrs": "[0.001]", "max_iterations": "4",
            "tasks": "[{name: bif3, overrides: [env=bifurcation, env.horizon=3, env.num_decisive=1]}]",
            "overrides": "[" + ",".join(TINY) + "]", "parallel": "2"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------------------- pure functions
def _cell(method, lr, seed, ev, status="finished", curve=None, spent=None):
    return {"method": method, "task": "t", "seed": seed, "lr": lr, "status": status, "final_success": 0.0,
            "final_eval_success": ev, "curve": curve or [], "spent": spent or {"forward_tokens": 100, "ca_forward_tokens": 10,
                                                                              "wall_seconds": 2.0, "ca_seconds": 0.5}}


def test_lr_sweep_picks_best_mean_over_seeds():
    cells = [_cell("grpo", 1e-3, 0, 0.9), _cell("grpo", 1e-3, 1, 0.1),   # mean 0.5
             _cell("grpo", 3e-3, 0, 0.6), _cell("grpo", 3e-3, 1, 0.6),   # mean 0.6 (best)
             _cell("grpo", 1e-2, 0, 1.0, status="failed"), _cell("grpo", 1e-2, 1, None, status="running"),
             _cell("rloo", 1e-3, 0, 0.4), _cell("rloo", 3e-3, 0, 0.4)]   # tie -> the smaller lr
    sweep = lr_sweep(cells)
    assert sweep["grpo"]["best_lr"] == 3e-3
    assert sweep["grpo"]["sweep"] == {"0.001": 0.5, "0.003": 0.6, "0.01": None}  # failed cells do not count
    assert sweep["rloo"]["best_lr"] == 1e-3
    # select_by=success uses the last training batch's success instead
    for c in cells:
        c["final_success"] = c["lr"]
    assert lr_sweep(cells, by="success")["grpo"]["best_lr"] == 3e-3


def test_t_interval_and_table_by_hand():
    m, lo, hi = t_interval([0.5, 0.7, 0.9])
    half = 4.302652729911275 * 0.2 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert m == pytest.approx(0.7) and lo == pytest.approx(0.7 - half) and hi == pytest.approx(0.7 + half)
    assert math.isnan(t_interval([0.3])[1])
    curve = [{"success": 0.2, "forward_tokens": 10}, {"success": 0.85, "forward_tokens": 20}, {"success": 0.9, "forward_tokens": 30}]
    assert compute_to_target(curve, 0.8, "forward_tokens") == 20 and compute_to_target(curve, 0.95, "forward_tokens") is None
    cells = [_cell("grpo", 1e-3, 0, 0.4), _cell("oracle", 1e-3, 0, 0.8), _cell("rloo", 1e-3, 0, 0.5, curve=curve)]
    rows = {r["method"]: r for r in learning_table(cells, lr_sweep(cells), 0.8, "forward_tokens")}
    assert rows["rloo"]["gap_closed"] == pytest.approx(0.25) and rows["oracle"]["gap_closed"] == pytest.approx(1.0)
    assert rows["rloo"]["compute_to_target_mean"] == 20 and rows["grpo"]["compute_to_target_mean"] is None
    assert rows["grpo"]["ca_overhead_share_forward_tokens"] == pytest.approx(0.1)
    assert rows["grpo"]["ca_overhead_share_seconds"] == pytest.approx(0.25)


def test_ci95_is_clipped_to_unit_interval_for_display_and_raw_is_kept():
    """Success rates 0, 0, 1 over three seeds: the t-interval (mean 1/3 +- 1.43) leaves [0, 1];
    the table shows [0, 1] and flags it, the raw interval stays in final_success_ci95."""
    from stages.benchmark.learning import clip_unit

    cells = [_cell("grpo", 1e-3, s, ev) for s, ev in enumerate([0.0, 0.0, 1.0])]
    cells += [_cell("rloo", 1e-3, s, ev) for s, ev in enumerate([0.4, 0.5, 0.6])]
    rows = {r["method"]: r for r in learning_table(cells, lr_sweep(cells), 0.8, "forward_tokens")}
    half = 4.302652729911275 * math.sqrt(1 / 3) / math.sqrt(3)
    lo, hi = rows["grpo"]["final_success_ci95"]
    assert lo == pytest.approx(1 / 3 - half) and hi == pytest.approx(1 / 3 + half) and lo < 0 and hi > 1
    assert rows["grpo"]["final_success_ci95_shown"] == [0.0, 1.0] and rows["grpo"]["ci95_clipped"] is True
    r = rows["rloo"]
    assert r["final_success_ci95_shown"] == r["final_success_ci95"] and r["ci95_clipped"] is False
    assert 0 < r["final_success_ci95"][0] < 0.5 < r["final_success_ci95"][1] < 1
    assert clip_unit(None, None) == (None, None) and clip_unit(-0.2, 0.3) == (0.0, 0.3) and clip_unit(0.9, 1.7) == (0.9, 1.0)


def test_iteration_spend_and_stopping_rule():
    metrics = {"rollout.generated_tokens": 40.0, "overhead.credit.extra_tokens": 6.0,
               "overhead.credit.extra_forward_passes": 2.0, "overhead.rollout.env_steps": 12.0,
               "overhead.credit.env_steps": 3.0, "overhead.rollout.env_resets": 4.0, "overhead.credit.judge_calls": 1.0,
               "time.rollout_seconds": 1.5, "time.credit_seconds": 0.5, "time.update_seconds": 1.0}
    s = iteration_spend(metrics, batch_tokens=100, rows=4, update_epochs=2)
    assert s.generated_tokens == 46 and s.ca_forward_tokens == 6 + 2 * 25
    assert s.forward_tokens == 100 * 3 + 56 and s.env_steps == 15 and s.env_resets == 4 and s.judge_calls == 1
    assert s.wall_seconds == pytest.approx(3.0) and s.ca_seconds == pytest.approx(0.5) and s.iterations == 1
    # the credit stage's own share (what the oracle is not charged): its tokens, steps, calls and time
    ca = credit_spend(metrics, batch_tokens=100, rows=4)
    assert (ca.generated_tokens, ca.forward_tokens, ca.env_steps, ca.judge_calls) == (6, 56, 3, 1)
    rest = s - ca
    assert rest.forward_tokens == 300 and rest.generated_tokens == 40 and rest.ca_forward_tokens == 0
    assert rest.env_steps == 12 and rest.wall_seconds == pytest.approx(2.5) and rest.iterations == 1
    budget = BudgetConfig(env_steps=40)
    total = Spend()
    stops = []
    for _ in range(5):
        total = total + s
        stops.append(exhausted(total, budget))
    # 15, 30, 45: stops at the end of the third iteration, never before the budget is reached
    assert stops[:2] == [None, None] and stops[2] == "budget.env_steps spent: 45 >= 40"
    assert exhausted(total, BudgetConfig()) is None


# ---------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("override, expect", [
    ("methods=[grpo,nosuch]", "methods=['grpo', 'nosuch']: unknown credit method 'nosuch'"),
    ("budget.env_steps=0", "budget.env_steps=0: must be an integer >= 1"),
    ("budget.wall_seconds=-1", "budget.wall_seconds=-1.0: must be a finite number > 0"),
    ("tasks=[{name: m, overrides: [env=math]}]", "tasks[0]=m: method oracle cannot run on it: credit.method=oracle: needs a task whose exact MDP"),
])
def test_config_errors_are_one_line_before_anything_exists(cf_home, capsys, override, expect):
    from flows.cli import main

    rc = main(["benchmark", "bifurcation_small", "methods=[grpo,oracle]", override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("creditflow: config error: " + expect), err
    assert len(err.strip().splitlines()) == 1
    assert not (cf_home / "benchmarks").exists() and not (cf_home / "runs").exists()


def test_training_budget_is_a_field_rule():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^budget.forward_tokens=0: must be an integer >= 1$"):
        load_config(["budget.forward_tokens=0"])


# ---------------------------------------------------------------------------- the flow
CONTRACT_TOP = {"benchmark_id", "created", "command", "status", "config", "mlflow_run_id", "budget", "cells", "methods"}
CONTRACT_CELL = {"cell_id", "method", "task", "seed", "lr", "run_id", "mlflow_run_id", "status", "reason", "spent",
                 "curve", "final_success", "final_eval_success", "gt"}
CONTRACT_SPENT = {"generated_tokens", "forward_tokens", "ca_forward_tokens", "env_steps", "env_resets", "judge_calls",
                  "wall_seconds", "cpu_seconds", "ca_seconds", "iterations"}
CONTRACT_CURVE = {"iteration", "generated_tokens", "forward_tokens", "env_steps", "wall_seconds", "success", "eval_success"}
CONTRACT_GT = {"rmse", "spearman", "sign_accuracy", "zero_advantage_mass", "decisive_share", "shift_invariant_error",
               "pg_cosine", "batch_variance"}


def test_benchmark_budget_summary_and_nested_mlflow(prefect_harness, shared_home, monkeypatch):
    from flows import api
    from flows.benchmark import start_benchmark

    monkeypatch.setenv("CREDITFLOW_HOME", str(shared_home))
    budget = 40  # 24 env steps per iteration (8 episodes x 3 turns): stops after 2 of max 4 iterations
    out = start_benchmark("bifurcation_small", _bench_overrides(**{"budget.env_steps": str(budget)}),
                          home=shared_home, bench_id="bench-test-budget", command="creditflow benchmark test")
    summary = json.loads((shared_home / "benchmarks" / "bench-test-budget" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(out, allow_nan=False))  # the file is what the flow returned, strict JSON
    assert CONTRACT_TOP <= set(summary) and summary["status"] == "finished"
    assert summary["budget"] == {"generated_tokens": None, "forward_tokens": None, "env_steps": budget,
                                 "wall_seconds": None, "max_iterations": 4, "charged": CHARGED}
    assert CHARGED.startswith("training iterations") and "reported apart" in CHARGED
    assert {c["method"] for c in summary["cells"]} == {"grpo", "oracle"}
    tracker = api.tracker_for(shared_home)
    for cell in summary["cells"]:
        assert CONTRACT_CELL <= set(cell) and CONTRACT_SPENT <= set(cell["spent"])
        assert cell["status"] == "budget_spent" and cell["reason"].startswith("budget.env_steps spent")
        curve = cell["curve"]
        assert all(CONTRACT_CURVE <= set(r) for r in curve)
        steps = [r["env_steps"] for r in curve]
        # the budget stops the cell at the end of the iteration that spent it: never more than one over
        assert steps[-1] >= budget and (len(steps) == 1 or steps[-2] < budget)
        assert len(curve) < 4 and cell["spent"]["iterations"] == len(curve) and cell["spent"]["env_steps"] == steps[-1]
        assert steps == sorted(steps) and [r["forward_tokens"] for r in curve] == sorted(r["forward_tokens"] for r in curve)
        assert 0.0 <= cell["final_eval_success"] <= 1.0 and cell["final_success"] == curve[-1]["success"]
        # prepare and the two evaluations (8 episodes x 3 turns each) are measured apart, not charged
        un = cell["uncharged"]
        if cell["method"] == "oracle":  # its ground-truth scoring is reported apart too, not charged
            gt = un.pop("ground_truth")
            assert gt["forward_tokens"] > 0 and gt["wall_seconds"] > 0 and cell["spent"]["ca_forward_tokens"] == 0
        else:
            assert "ground_truth" not in un
        assert set(un) == {"prepare", "eval"} and un["eval"]["env_steps"] == 2 * 8 * 3
        assert un["eval"]["generated_tokens"] > 0 and un["eval"]["forward_tokens"] > un["eval"]["generated_tokens"]
        assert un["prepare"]["wall_seconds"] > 0 and un["prepare"]["env_steps"] == 0
        assert cell["spent"]["env_steps"] == steps[-1]  # the charged spend holds training only
        assert CONTRACT_GT == set(cell["gt"]) and cell["gt"]["rmse"] is not None
        # the training run: `creditflow report <run_id>` reads runs/<run_id>/; its MLflow run is nested
        assert (shared_home / "runs" / cell["run_id"] / "run.json").is_file()
        meta = json.loads((shared_home / "runs" / cell["run_id"] / "metadata.json").read_text())
        assert meta["kind"] == "benchmark_cell" and meta["benchmark"] == {"benchmark_id": summary["benchmark_id"],
                                                                          "cell_id": cell["cell_id"]}
        run = tracker.client.get_run(cell["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
        assert run.data.tags["creditflow.cell_id"] == cell["cell_id"]
        assert [m.step for m in tracker.client.get_metric_history(run.info.run_id, "eval.success_rate")] == [len(curve)]
        assert [m.value for m in tracker.client.get_metric_history(run.info.run_id, "budget.env_steps")] == steps
    oracle = next(c for c in summary["cells"] if c["method"] == "oracle")
    assert oracle["gt"]["pg_cosine"] == pytest.approx(1.0, abs=1e-3)  # the oracle's gradient is the true one
    assert summary["methods"]["grpo"] == {"best_lr": 0.001, "sweep": {"0.001": summary["cells"][0]["final_eval_success"]}}
    assert {(r["task"], r["method"]) for r in summary["table"]} == {("bif3", "grpo"), ("bif3", "oracle")}
    parent = tracker.client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["creditflow.benchmark_id"] == "bench-test-budget"
    assert "bif3/oracle/final_success_mean" in parent.data.metrics


def test_benchmark_resume_skips_finished_cells(prefect_harness, shared_home, monkeypatch):
    from flows.benchmark import resume_benchmark, start_benchmark
    from flows.runtime import RunState

    monkeypatch.setenv("CREDITFLOW_HOME", str(shared_home))
    bench_id = "bench-test-resume"
    out = start_benchmark("bifurcation_small", _bench_overrides(
        max_iterations="3", cell_overrides="{'oracle-*': ['debug.crash_at=1:credit']}"), home=shared_home, bench_id=bench_id)
    assert out["status"] == "failed"
    by = {c["method"]: c for c in out["cells"]}
    assert by["grpo"]["status"] == "finished" and by["oracle"]["status"] == "failed"
    assert "InjectedCrash" in by["oracle"]["reason"]

    def executions(cell):
        return collections.Counter((e["iteration"], e["stage"]) for e in RunState.open(cell["run_id"], shared_home).executions())

    grpo_before, oracle_before = executions(by["grpo"]), executions(by["oracle"])
    assert oracle_before[(1, "credit")] == 1 and (1, "update") not in oracle_before
    out = resume_benchmark(bench_id, home=shared_home)
    assert out["status"] == "finished" and all(c["status"] == "finished" for c in out["cells"])
    assert executions(by["grpo"]) == grpo_before  # the finished cell was not re-run
    resumed = executions(by["oracle"]) - oracle_before
    # the interrupted cell resumed its training run at the crashed stage
    assert set(resumed) == {(1, "credit"), (1, "update"), (2, "env"), (2, "rollout"), (2, "reward"), (2, "credit"),
                            (2, "update"), (3, "eval")}, resumed
    summary = json.loads((Path(shared_home) / "benchmarks" / bench_id / "summary.json").read_text())
    assert summary["status"] == "finished" and len(next(c for c in summary["cells"] if c["method"] == "oracle")["curve"]) == 3


def test_benchmark_cli_sigkilled_mid_cell_then_resume(prefect_harness, shared_home):
    """A real SIGKILL of the ``creditflow benchmark`` process (cells one at a time: the grpo cell
    finished, the oracle cell killed inside its iteration-1 credit stage); ``--resume`` loads the
    finished cell without re-running a stage of it, resumes the killed one at the killed stage, and
    every MLflow metric step (cells and parent) is there exactly once."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from flows import api
    from flows.runtime import RunState

    env = dict(os.environ, CREDITFLOW_HOME=str(shared_home), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    root = Path(__file__).resolve().parent.parent
    bench_id = "bench-test-kill9"
    ovs = _bench_overrides(max_iterations="3", parallel="1",
                           cell_overrides="{'oracle-*': ['debug.crash_at=1:credit:kill']}")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "benchmark", "--bench-id", bench_id, "bifurcation_small", *ovs],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    summary_path = shared_home / "benchmarks" / bench_id / "summary.json"
    killed = {c["method"]: c for c in json.loads(summary_path.read_text())["cells"]}
    assert killed["grpo"]["status"] == "finished" and killed["oracle"]["status"] == "running"

    def executions(method):
        return collections.Counter((e["iteration"], e["stage"])
                                   for e in RunState.open(killed[method]["run_id"], shared_home).executions())

    grpo_before, oracle_before = executions("grpo"), executions("oracle")
    assert oracle_before[(1, "credit")] == 1 and (1, "update") not in oracle_before  # killed mid-cell
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "benchmark", "--resume", bench_id],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cells, 1 already finished, 1 to run" in proc.stdout, proc.stdout
    assert executions("grpo") == grpo_before  # loaded, not re-run
    resumed = executions("oracle") - oracle_before
    assert set(resumed) == {(1, "credit"), (1, "update"), (2, "env"), (2, "rollout"), (2, "reward"), (2, "credit"),
                            (2, "update"), (3, "eval")} and max(resumed.values()) == 1, resumed
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "finished" and all(c["status"] == "finished" for c in summary["cells"])
    grpo = next(c for c in summary["cells"] if c["method"] == "grpo")
    assert grpo["curve"] == killed["grpo"]["curve"] and grpo["final_eval_success"] == killed["grpo"]["final_eval_success"]
    client = api.tracker_for(shared_home).client
    for cell in summary["cells"]:
        run = client.get_run(cell["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == summary["mlflow_run_id"]
        for key in ("progress.iteration", "reward.success_rate", "update.loss", "budget.env_steps"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == sorted(set(steps)) and len(steps) == (4 if key == "progress.iteration" else 3), (cell["cell_id"], key, steps)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "cells_finished")] == [2]
