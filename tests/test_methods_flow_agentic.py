"""The agentic group methods (GiGPO, CARL, StarPO-S; survey §5.3, §5.4, §5.7) run one iteration through the real
train flow on the multi-turn bifurcation family (``creditflow train env=bifurcation
credit=<method>``): Prefect tasks, MLflow metrics, and no extra compute recorded. The rollouts of
one task share its cue sequence and start state, so GiGPO has step groups to compare; with the
seeded tiny policy the groups succeed in part (success rate 0.25), so every method has signal."""

from __future__ import annotations

import pytest

from flows import api

SMALL = ["env=bifurcation", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=4",
         "eval_episodes=2", "tracking.heatmap_every=0"]
ROWS = 8


def _check_gigpo(m):
    assert m["credit.method.anchored_step_fraction"] == 1.0  # the family exposes its state
    assert m["credit.method.step_adv_abs_mean"] > 0 and m["credit.zero_fraction"] < 1
    # every rollout of a task takes its first action in the start cell: at least those steps are grouped
    assert m["credit.method.grouped_step_fraction"] * m["credit.method.steps"] >= ROWS
    assert m["credit.method.step_groups"] >= 2  # one start-cell group per task at least
    assert m["credit.method.steps"] >= ROWS


def _check_carl(m):
    assert m["credit.method.skipped_action_fraction"] > 0  # rho < 1 leaves the low-entropy actions out
    assert m["credit.method.critical_actions"] >= 1
    assert m["credit.method.critical_entropy_mean"] >= m["credit.method.entropy_mean"]
    assert m["credit.zero_fraction"] >= m["credit.method.skipped_token_fraction"] - 1e-6  # skipped tokens carry 0
    assert m["credit.abs_mean"] > 0


def _check_starpo(m):
    assert m["credit.method.groups"] == 2 and m["credit.method.kept_groups"] == 1  # ceil(0.25 * 2)
    assert m["credit.method.kept_group_fraction"] == 0.5
    assert m["credit.method.kept_reward_std_mean"] >= m["credit.method.reward_std_mean"]
    assert m["credit.method.policy_entropy_mean"] > 0  # sampled at temperature > 0
    assert m["credit.abs_mean"] > 0


CHECKS = {"gigpo": _check_gigpo, "carl": _check_carl, "starpo": _check_starpo}


@pytest.mark.parametrize("method", sorted(CHECKS))
def test_agentic_method_runs_one_iteration_through_the_flow_on_bifurcation(prefect_harness, shared_home, method):
    out = api.start_run(SMALL + [f"credit={method}"], home=shared_home, progress=False)
    c = api.tracker_for(shared_home).client
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert run.data.tags["creditflow.method"] == method
    assert "update.loss" in m
    assert 0 < m["reward.success_rate"] < 1  # mixed outcomes: the checks below see real advantages
    for k in ("extra_forward_passes", "forward_tokens", "extra_tokens", "env_resets", "env_steps", "judge_calls"):
        assert f"overhead.credit.{k}" not in m  # zero counters are not logged: no extra compute
    CHECKS[method](m)
