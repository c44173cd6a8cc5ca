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


def test_lightning_example_agent_trains_one_iteration_through_the_flow(prefect_harness, shared_home):
    """Agent Lightning end to end (Luo et al. 2025; issue 18's "must be shown"): ``creditflow train
    env=lightning credit=lightning`` serves the policy, runs examples/lightning_agent.py (an outside
    program speaking plain HTTP) for the iteration's episodes and for the eval episodes, and its
    calls reach the reward, credit and update stages as transitions; metrics land in MLflow."""
    # a short format warm-up of the fresh tiny policy (its chat corpus is the family's own) keeps this test small
    out = api.start_run(["env=lightning", "credit=lightning", *SMALL[1:3], "rollout.group_size=2", *SMALL[4:],
                         "model.warmup_steps=20", "model.warmup_batch_size=16"], home=shared_home, progress=False)
    run = api.tracker_for(shared_home).client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["creditflow.method"] == "lightning"
    m = run.data.metrics
    assert run.data.params["env.agent_command"] == "{python} examples/lightning_agent.py"
    # 2 tasks x 2 episodes, two chained calls each: one row per episode, the calls its turns
    assert m["credit.method.episodes"] == 4 and m["credit.method.calls_per_episode_mean"] == 2
    assert m["credit.method.split_episode_fraction"] == 0 and m["rollout.turns_mean"] == 2
    assert m["rollout.env_steps"] == 8 and m["rollout.generated_tokens"] > 0
    assert m.get("reward.done.success", 0) + m.get("reward.done.failure", 0) == 4  # every episode reported its reward
    # the agent's own rewards differ inside the groups: non-zero credit on the calls' tokens, a real gradient
    assert m["credit.zero_fraction"] < 1 and m["credit.abs_mean"] > 0
    assert m["update.grad_norm"] > 0 and m["update.minibatches"] >= 1
    assert 0 <= out["success_before"] <= 1 and 0 <= out["success_after"] <= 1  # eval episodes played by the agent too
