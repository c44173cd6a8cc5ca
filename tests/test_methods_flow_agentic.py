"""The agentic group methods (GiGPO, CARL, StarPO-S; survey §5.3, §5.4, §5.7) run one iteration through the real
train flow on FrozenLake (``creditflow train experiment=frozenlake credit=<method>``): Prefect
tasks, MLflow metrics, and no extra compute recorded. FrozenLake's rollouts of one task all start
in the same cell, so GiGPO has step groups to compare."""

from __future__ import annotations

import pytest

from flows import api

SMALL = ["experiment=frozenlake", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=4",
         "eval_episodes=2", "tracking.heatmap_every=0", "env.max_turns=4"]
ROWS = 8


def _check_gigpo(m):
    assert m["credit.method.anchored_step_fraction"] == 1.0  # FrozenLake exposes its state (the cell)
    # every rollout of a task takes its first action in the start cell: at least those steps are grouped
    assert m["credit.method.grouped_step_fraction"] * m["credit.method.steps"] >= ROWS
    assert m["credit.method.step_groups"] >= 2  # one start-cell group per task at least
    assert m["credit.method.steps"] >= ROWS


def _check_carl(m):
    assert m["credit.method.skipped_action_fraction"] > 0  # rho < 1 leaves the low-entropy actions out
    assert m["credit.method.critical_actions"] >= 1
    assert m["credit.method.critical_entropy_mean"] >= m["credit.method.entropy_mean"]


def _check_starpo(m):
    assert m["credit.method.groups"] == 2 and m["credit.method.kept_groups"] == 1  # ceil(0.25 * 2)
    assert m["credit.method.kept_group_fraction"] == 0.5
    assert m["credit.method.kept_reward_std_mean"] >= m["credit.method.reward_std_mean"]
    assert m["credit.method.policy_entropy_mean"] > 0  # sampled at temperature > 0


CHECKS = {"gigpo": _check_gigpo, "carl": _check_carl, "starpo": _check_starpo}


@pytest.mark.parametrize("method", sorted(CHECKS))
def test_agentic_method_runs_one_iteration_through_the_flow_on_frozenlake(prefect_harness, shared_home, method):
    out = api.start_run(SMALL + [f"credit={method}"], home=shared_home, progress=False)
    c = api.tracker_for(shared_home).client
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert run.data.tags["creditflow.method"] == method
    assert "update.loss" in m
    for k in ("extra_forward_passes", "forward_tokens", "extra_tokens", "env_resets", "env_steps", "judge_calls"):
        assert f"overhead.credit.{k}" not in m  # zero counters are not logged: no extra compute
    CHECKS[method](m)
