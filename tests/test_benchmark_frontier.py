"""The CA efficiency frontier (issue 15): a benchmark swept over the task's horizon at one budget.

* ``horizons`` expands every task into one task per H (config rule, one-line errors, nothing created);
* :func:`stages.benchmark.learning.frontier_table` / ``frontier_grid`` by hand;
* a real tiny frontier (2 horizons x GRPO, oracle x 1 seed, Prefect + MLflow): the CLI prints the
  frontier table, ``summary.json`` holds it, the report has its table and figure.
"""

from __future__ import annotations

import json

import pytest

from stages.benchmark.learning import frontier_grid, frontier_table, learning_table, lr_sweep

TINY = ["rollout.tasks_per_iteration=2", "rollout.group_size=4", "eval_episodes=8", "tracking.heatmap_every=0"]


def _load(*overrides: str):
    from flows.benchmark_config import load_benchmark_config, to_object

    return to_object(load_benchmark_config("bifurcation_small", ["methods=[grpo,oracle]", "seeds=1", "lrs=[0.001]", *overrides]))


def test_horizons_expand_every_task_and_cells_carry_the_horizon():
    from flows.benchmark_config import cells, describe

    obj = _load("horizons=[2,5]", "tasks=[{name: bif, overrides: [env=bifurcation, env.horizon=9, env.num_decisive=1]}]")
    grid = cells(obj)
    assert [(c.task, c.horizon, c.family, c.method) for c in grid] == [
        ("bif-h2", 2, "bif", "grpo"), ("bif-h2", 2, "bif", "oracle"),
        ("bif-h5", 5, "bif", "grpo"), ("bif-h5", 5, "bif", "oracle")]
    # the sweep's env.horizon comes after the task's own (it wins), before credit=...
    ovs = list(grid[2].overrides)
    assert ovs.index("env.horizon=5") > ovs.index("env.horizon=9") and ovs.index("env.horizon=5") < ovs.index("credit=grpo")
    assert "2 tasks (1 x horizons [2, 5])" in describe(obj) and "= 4 cells" in describe(obj)
    plain = cells(_load())
    assert {(c.horizon, c.family) for c in plain} == {(None, "bifurcation-h4")}


@pytest.mark.parametrize("override, expect", [
    ("horizons=[4,4]", "horizons=[4, 4]: must not repeat a horizon"),
    ("horizons=[0,4]", "horizons=[0, 4]: every horizon must be an integer >= 1"),
    # a horizon the task cannot have is the training rule's line, naming the expanded task
    ("horizons=[1,4]", "tasks[0]=bifurcation-h4-h1: method grpo cannot run on it: "),
])
def test_bad_horizons_are_one_line_before_anything_exists(cf_home, capsys, override, expect):
    from flows.cli import main

    rc = main(["benchmark", "bifurcation_small", "methods=[grpo,oracle]", override])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("creditflow: config error: " + expect), err
    assert len(err.strip().splitlines()) == 1
    assert not (cf_home / "benchmarks").exists() and not (cf_home / "runs").exists()


def test_frontier_config_sweeps_every_method_at_one_forward_token_budget():
    from flows.benchmark_config import cells, load_benchmark_config, to_object

    obj = to_object(load_benchmark_config("frontier"))
    assert obj.horizons == [4, 8, 16, 32, 64] and obj.seeds == 3
    assert set(obj.methods) == {"grpo", "rloo", "gae", "vineppo", "spo", "pure", "tempo", "oracle"}
    assert obj.budget.limits() == {"forward_tokens": obj.budget.forward_tokens}  # one budget, in forward tokens
    budgets = {tuple(o for o in c.overrides if o.startswith("budget.")) for c in cells(obj)}
    assert budgets == {(f"budget.forward_tokens={obj.budget.forward_tokens}",)}  # the same for every cell


def _cell(method, task, h, ev, fwd=1000):
    return {"method": method, "task": task, "horizon": h, "family": "bif", "seed": 0, "lr": 1e-3,
            "status": "budget_spent", "final_success": ev, "final_eval_success": ev, "curve": [],
            "spent": {"forward_tokens": fwd, "ca_forward_tokens": 0, "wall_seconds": 1.0, "ca_seconds": 0.0}}


def test_frontier_table_by_hand():
    cells = [_cell("grpo", "bif-h4", 4, 0.5), _cell("rloo", "bif-h4", 4, 0.75), _cell("oracle", "bif-h4", 4, 1.0),
             _cell("grpo", "bif-h16", 16, 0.4), _cell("rloo", "bif-h16", 16, 0.2, fwd=3000), _cell("oracle", "bif-h16", 16, 0.8),
             {**_cell("grpo", "other", None, 0.9), "family": "other"}]  # not part of a sweep
    table = learning_table(cells, lr_sweep(cells), 0.8, "forward_tokens")
    front = frontier_table(table, cells)
    assert [(r["family"], r["horizon"]) for r in front] == [("bif", 4), ("bif", 16)]  # by H, not by name
    h4, h16 = front
    assert h4["methods"]["rloo"]["gap_closed"] == pytest.approx(0.5) and h4["beats_grpo"] == ["oracle", "rloo"]
    assert h16["methods"]["rloo"]["gap_closed"] == pytest.approx(-0.5) and h16["beats_grpo"] == ["oracle"]
    assert h16["methods"]["rloo"]["forward_tokens_mean"] == 3000
    headers, rows, clipped = frontier_grid(front)
    assert headers == ["task", "H", "grpo", "rloo", "oracle", "beats GRPO"] and not clipped
    assert rows[0] == ["bif", "4", "0.500 (+0.00)", "0.750 (+0.50)", "1.000 (+1.00)", "oracle, rloo"]
    assert rows[1][3] == "0.200 (-0.50)"
    # nothing beats GRPO: the table says so
    nothing = frontier_table(learning_table(cells[3:5], lr_sweep(cells[3:5]), 0.8, "forward_tokens"), cells[3:5])
    assert nothing[0]["beats_grpo"] == [] and frontier_grid(nothing)[1][0][-1] == "none"
    # an oracle below GRPO at an H (too few iterations at this budget): no share of a gap is defined
    low = [_cell("grpo", "bif-h4", 4, 0.5), _cell("rloo", "bif-h4", 4, 0.4), _cell("oracle", "bif-h4", 4, 0.4)]
    row = frontier_table(learning_table(low, lr_sweep(low), 0.8, "forward_tokens"), low)[0]
    assert row["methods"]["rloo"]["gap_closed"] is None and row["methods"]["oracle"]["gap_closed"] is None
    assert frontier_grid([row])[1][0][2:] == ["0.500 (no gap)", "0.400 (no gap)", "0.400 (no gap)", "none"]


def test_tiny_frontier_end_to_end(prefect_harness, shared_home, monkeypatch, capsys, tmp_path):
    from flows.cli import main
    from flows.report import write_report

    monkeypatch.setenv("CREDITFLOW_HOME", str(shared_home))
    bench_id = "bench-test-frontier"
    rc = main(["benchmark", "--bench-id", bench_id, "bifurcation_small", "methods=[grpo,oracle]", "seeds=1",
               "lrs=[0.001]", "max_iterations=3", "horizons=[2,3]", "budget.env_steps=null",
               "budget.forward_tokens=1000", "overrides=[" + ",".join(TINY) + "]",
               "tasks=[{name: bif, overrides: [env=bifurcation, env.num_decisive=1]}]"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((shared_home / "benchmarks" / bench_id / "summary.json").read_text())
    front = summary["frontier"]
    assert [(r["family"], r["horizon"], sorted(r["methods"])) for r in front] == [
        ("bif", 2, ["grpo", "oracle"]), ("bif", 3, ["grpo", "oracle"])]
    assert {c["task"]: c["horizon"] for c in summary["cells"]} == {"bif-h2": 2, "bif-h3": 3}
    for r in front:
        assert r["methods"]["oracle"]["gap_closed"] in (1.0, None)  # None when the oracle is not above GRPO at that H
        assert r["methods"]["grpo"]["forward_tokens_mean"] >= 1000  # the same budget stopped every cell
    assert {c["status"] for c in summary["cells"]} == {"budget_spent"}
    # the CLI summary prints the frontier: one line per H, a cell per method, the verdict column
    lines = out[out.index("CA efficiency frontier"):].splitlines()
    assert lines[1].split() == ["task", "H", "grpo", "oracle", "beats", "GRPO"]
    assert [ln.split()[:2] for ln in lines[2:4]] == [["bif", "2"], ["bif", "3"]]
    assert f"{front[0]['methods']['grpo']['final_success_mean']:.3f}" in lines[2]
    html, md = write_report(bench_id, home=shared_home, out=tmp_path / "report")
    text = md.read_text()
    assert "CA efficiency frontier" in text and "| bif | 2 |" in text and "| bif | 3 |" in text
    assert "figures/frontier.png" in text and (md.parent / "figures" / "frontier.png").stat().st_size > 0
    assert html.read_text().count("<svg") >= 2  # curves + frontier (+ overhead)
