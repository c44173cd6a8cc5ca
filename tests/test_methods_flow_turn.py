"""The turn-level credit methods and losses of the agentic catalogue (survey §5.1) run one
iteration through the real train flow on the multi-turn bifurcation family: Prefect tasks, the
providers their ``needs`` ask for (ITPO: the reference forward pass; Turn-PPO: the critic), the
per-turn losses (``update.loss=turn_ppo`` by Turn-PPO's default, ``sorl``), MLflow metrics and
the overhead records."""

from __future__ import annotations

import pytest

from flows import api

SMALL = ["env=bifurcation", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
         "eval_episodes=2", "tracking.heatmap_every=0"]
ROWS = 4  # tasks_per_iteration x group_size


def _run(home, extra):
    out = api.start_run(SMALL + extra, home=home, progress=False)
    run = api.tracker_for(home).client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    return run, run.data.metrics


def test_itpo_one_iteration_on_bifurcation(prefect_harness, shared_home):
    run, m = _run(shared_home, ["credit=itpo"])
    assert run.data.tags["creditflow.method"] == "itpo"
    assert run.data.params["update.loss"] == "grpo"  # ITPO names no update group of its own
    # the reference forward pass over the batch is recorded as the method's overhead
    assert m["overhead.credit.extra_forward_passes"] >= 1 and m["overhead.credit.forward_tokens"] > 0
    # iteration 0: the policy is the frozen reference, so the implicit turn rewards are float noise
    assert m["credit.method.implicit_turn_reward_abs_mean"] < 1e-4
    assert m["credit.method.turns_per_trajectory"] > 1  # bifurcation episodes are multi-turn
    # Norm-ITPO at the reference: the split is uniform; the turn rewards of a row sum to its outcome
    assert m["credit.method.proportion_excess_over_uniform"] == pytest.approx(0.0, abs=1e-4)
    assert abs(m["credit.method.turn_reward_mean"]) <= max(abs(m["reward.reward_mean"]), 1.0) + 1e-6
    assert "update.loss" in m


def test_turn_ppo_one_iteration_on_bifurcation_with_its_turn_loss(prefect_harness, shared_home):
    run, m = _run(shared_home, ["credit=turn_ppo"])
    assert run.data.params["update.loss"] == "turn_ppo"  # CreditMethod.default_update
    assert run.data.params["credit.gamma"] == "0.99" and run.data.params["credit.lam"] == "0.9"
    # the critic: its forward over the batch (one pass per trajectory) and its value loss in the update
    assert m["overhead.credit.extra_forward_passes"] == ROWS and m["overhead.credit.forward_tokens"] > 0
    assert "update.value_loss" in m and "update.critic_grad_norm" in m
    if m["reward.reward_mean"] != 0:  # non-zero turn returns: the zero critic is off its targets
        assert m["update.value_loss"] > 0
    assert m["credit.method.turns_per_trajectory"] > 1
    # a fresh critic (zero head) values every turn state at 0
    assert m["credit.method.turn_value_mean"] == pytest.approx(0.0, abs=1e-6)
    # the per-turn loss ran: one ratio per turn (its statistics), inside [0, 1] clip fraction
    assert m["update.turns"] >= ROWS and 0.0 <= m["update.clip_fraction"] <= 1.0


def test_grpo_with_the_sorl_loss_one_iteration_on_bifurcation(prefect_harness, shared_home):
    run, m = _run(shared_home, ["credit=grpo", "update.loss=sorl"])
    assert run.data.params["update.loss"] == "sorl"
    # SO-GRPO: the clipping-triggered normalization weight is logged; it lies in [0, 1]
    assert 0.0 <= m["update.sorl_weight_mean"] <= 1.0
    assert 0.0 <= m["update.sorl_suppressed_fraction"] <= 1.0
    assert m["update.turns"] >= ROWS
    assert "update.value_loss" not in m  # no critic for GRPO
