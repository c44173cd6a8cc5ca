"""Every reasoning-RL credit method (survey §3) runs one iteration through the real train flow on
the math task family (``creditflow train experiment=math credit=<method>``): Prefect tasks, the
providers its ``needs`` ask for, MLflow metrics, and its overhead recorded."""

from __future__ import annotations

import pytest

from flows import api
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.registry import get_method_class, method_names
from stages.credit.inventory import load_inventory

SMALL = ["experiment=math", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
         "eval_episodes=2", "tracking.heatmap_every=0"]

#: keep the per-method extra compute of the test small (the defaults are the papers')
CHEAP = {"vineppo": ["credit.k=2"], "spo": ["credit.k=2"], "scar": ["credit.num_permutations=8"],
         # a strict policy-as-judge (every step wrong) so that InT has first wrong steps to intervene on
         "int": ["credit.judge_margin=50", "credit.k=1"], "red": ["credit.mc_k=2"]}


def _check_capo(client, run, m):
    """CAPO: one judge call per judged step (votes=1); the penalty is W_process / W_whole."""
    assert m["credit.method.judged_steps"] > 0
    assert m["overhead.credit.judge_calls"] == m["credit.method.judged_steps"]
    assert m["credit.method.penalty"] == pytest.approx(0.5)  # defaults W_process=1, W_whole=2
    assert 0 <= m["credit.method.wrong_step_fraction"] <= 1 and 0 <= m["credit.method.wrong_token_fraction"] <= 1
    if m["credit.method.wrong_step_fraction"] > 0:
        assert m["credit.method.responses_with_wrong_step"] > 0
    if m["reward.success_rate"] in (0.0, 1.0):  # no outcome signal: the mean credit is the penalty alone
        assert m["credit.mean"] == pytest.approx(-0.5 * m["credit.method.wrong_token_fraction"], abs=1e-6)


def _check_pure(client, run, m):
    """PURE on the family's binary step checks: a step is capped exactly when it is correct and a
    later one is not, so mean(r) - mean(min-form return) is the capped fraction; min <= sum form."""
    assert run.data.params["credit.process_reward"] == "step_check"
    assert m["credit.method.valid_step_fraction"] == 1.0  # the math family checks every step
    assert m["credit.method.process_reward_mean"] - m["credit.method.min_form_return_mean"] == pytest.approx(
        m["credit.method.capped_step_fraction"], abs=1e-6)
    assert m["credit.method.min_form_return_mean"] <= m["credit.method.sum_form_return_mean"]


def _reference_is_the_start_policy(m, key):
    """Iteration 0: the policy is the frozen reference, so the log-ratio the reference provider
    yields is float noise only (the provider scores the same tokens under the same weights)."""
    assert m["overhead.credit.extra_forward_passes"] >= 1  # the reference forward pass
    assert abs(m[key]) < 1e-4


def _check_spro(client, run, m):
    """SPRO at iteration 0: implicit rewards ~0, so the masked step advantage is ~0."""
    _reference_is_the_start_policy(m, "credit.method.sequence_implicit_reward_mean")
    assert m["credit.method.msa_abs_mean"] < 1e-4


def _check_prl(client, run, m):
    """PRL at iteration 0: KL ~0, the entropy-regularized return is the reward; steps are turns."""
    _reference_is_the_start_policy(m, "credit.method.kl_mean")
    assert m["credit.method.regularized_return_mean"] == pytest.approx(m["reward.reward_mean"], abs=1e-4)
    assert m["credit.method.steps_mean"] > 1  # math episodes have several reasoning steps


def _check_dpo_implicit(client, run, m):
    """Implicit DPO credit at iteration 0: the token log-ratios pi/pi_ref are ~0."""
    _reference_is_the_start_policy(m, "credit.method.sequence_implicit_reward_mean")
    assert m["credit.method.token_credit_abs_mean"] < 1e-4


def _check_t_reg(client, run, m):
    """T-REG: the contrastive prompts change the policy's log-probs (non-zero, sigmoid-bounded token
    rewards), scored in batched forwards over both instructions' contexts."""
    assert m["overhead.credit.extra_forward_passes"] >= 1
    assert 0 < m["credit.method.token_reward_abs_mean"] < 0.5
    assert abs(m["credit.method.token_reward_mean"]) <= m["credit.method.token_reward_abs_mean"]
    assert 0 <= m["credit.method.positive_token_fraction"] <= 1
    assert m["credit.method.scored_tokens"] > 2 * m["credit.policy_tokens"]  # prompts + responses, twice
    assert m["credit.method.row_sum_shift_max"] < 1e-5  # redistribute (default): each response keeps GRPO's total


def _check_acpo(client, run, m):
    """ACPO attributed reasoning steps with the policy as scorer (forward passes, no judge calls)."""
    assert m["credit.method.attributed_steps"] > 0 and m["credit.method.gain_abs_mean"] > 0
    assert 0 <= m["credit.method.concentration_mean"] <= 1
    assert m["credit.method.factor_max"] >= 1
    assert m["overhead.credit.extra_forward_passes"] >= 1 and m.get("overhead.credit.judge_calls", 0) == 0


def _check_int(client, run, m):
    """InT really intervened: interventions rolled out (continuations billed), their records logged."""
    assert m["credit.method.interventions"] > 0 and m["credit.method.judged_responses"] > 0
    assert m["overhead.credit.env_resets"] >= m["credit.method.interventions"]  # one fresh environment per continuation
    assert m["overhead.credit.env_steps"] >= m["credit.method.interventions"]
    import json
    from pathlib import Path

    local = client.download_artifacts(run.info.run_id, "credit/interventions/iter_0000.json")
    records = json.loads(Path(local).read_text())
    assert len(records) == m["credit.method.interventions"] + m["credit.method.interventions_empty"]
    for r in records:
        assert {"prompt", "proposal", "replacement", "original_return", "intervened_returns", "effect"} <= set(r)
        assert "Reference solution:" in r["prompt"]  # math has a reference solution; the proposer saw it
        if r["replacement"]:
            assert len(r["intervened_returns"]) == 1 and r["continuations"][0][0] == r["replacement"]
    assert "reference solution" in run.data.tags["checklist.ca.methodology"]


def _check_red(client, run, m):
    """RED ran on prefix scores from its default source (MC values), recorded in the checklist."""
    assert run.data.params["credit.process_reward"] == "mc"
    assert m["credit.method.prefix_source_is_prefix_score"] == 1.0
    assert "process_reward=mc" in run.data.tags["checklist.ca.methodology"]
    assert m["overhead.credit.env_resets"] > 0 and m["overhead.credit.extra_tokens"] > 0  # the MC continuations


def _check_hicra(client, run, m):
    """HICRA found planning tokens in real math rollouts with default settings (the family's
    declared planning text: the left-hand sides of the step lines), so it is not GRPO."""
    assert 0 < m["credit.method.planning_token_fraction"] < 1
    assert m["credit.method.amplification_mass"] > 0 or m["credit.abs_mean"] == 0


ROWS = 4  # rollout.tasks_per_iteration x rollout.group_size of SMALL


def _check_mc(m, k):
    """MC methods (VinePPO, SPO): k continuations per estimation point, each a fresh environment
    (those after the first turn restored from a snapshot of one more environment per trajectory);
    MC values are mean returns (math rewards lie in [0, 1])."""
    points = m["credit.method.mc_points"]
    assert points >= ROWS and m["credit.method.mc_continuations"] == k * points
    n = m["credit.method.mc_continuations"]
    assert n <= m["overhead.credit.env_resets"] <= n + ROWS
    assert m.get("overhead.credit.env_restores", 0.0) <= n  # zero counters are not logged
    if m["credit.method.units_per_trajectory"] > 1:  # some fork after the first step: math has snapshots
        assert m["overhead.credit.env_restores"] > 0 and m["overhead.credit.env_replay_steps"] > 0
    assert m["credit.method.units_per_trajectory"] * ROWS == pytest.approx(points)
    assert 0.0 <= m["credit.method.value_mean"] <= 1.0
    assert m["credit.method.unit_adv_abs_mean"] >= 0.0


def _check_vineppo(client, run, m):
    """VinePPO: one MC point per reasoning step, k=2 continuations each, no critic trained."""
    _check_mc(m, k=2)
    assert "update.value_loss" not in m and "update.critic_grad_norm" not in m


def _check_spo(client, run, m):
    """SPO (cut points, probability mask): only cut-point tokens carry credit, so at least the
    non-cut share of the policy tokens has zero advantage."""
    _check_mc(m, k=2)
    cut = m["credit.method.cutpoint_fraction"]
    assert 0.0 < cut <= 1.0
    assert m["credit.zero_fraction"] >= 1.0 - cut - 1e-6


def _check_tempo(client, run, m):
    """TEMPO: one prefix tree per group, no extra compute (no forward pass, no generation)."""
    assert m["credit.method.groups"] == ROWS // 2
    assert m["credit.method.tree_nodes"] >= 2 * m["credit.method.groups"]  # a root and a leaf per group
    assert 0.0 <= m["credit.method.branch_token_fraction"] <= 1.0 and m["credit.method.td_abs_mean"] >= 0.0
    assert m["credit.method.branch_nodes"] <= m["credit.method.tree_nodes"]
    for k in ("extra_forward_passes", "extra_tokens", "env_resets", "env_steps"):
        assert f"overhead.credit.{k}" not in m  # zero counters are not logged


def _check_scar(client, run, m):
    """SCAR: every row with >= 2 steps is a Shapley game (exact here: n <= 8), scored by the
    policy; the rows that fall back to GRPO are counted by reason."""
    fb = {r: m[f"credit.method.fallback_{r}"] for r in ("single_step", "failed", "zero_sum")}
    assert m["credit.method.fallback_rows"] == sum(fb.values()) <= ROWS
    games = m["credit.method.exact_rows"] + m["credit.method.sampled_rows"]
    assert games == ROWS - fb["single_step"]
    assert m["credit.method.scorer_contexts"] >= 2 * games  # at least v(empty) and v(all) per game
    if games:
        assert m["overhead.credit.extra_forward_passes"] >= 1
    assert m["credit.method.shaped_reward_abs_mean"] >= 0.0


#: method-specific checks of the flow-level run beyond "finished with metrics"
EXTRA = {"capo": _check_capo, "pure": _check_pure, "spro": _check_spro, "prl": _check_prl,
         "dpo_implicit": _check_dpo_implicit, "t_reg": _check_t_reg, "acpo": _check_acpo,
         "int": _check_int, "red": _check_red, "hicra": _check_hicra,
         "vineppo": _check_vineppo, "spo": _check_spo, "tempo": _check_tempo, "scar": _check_scar}

REASONING = sorted(r.registry_name for r in load_inventory()
                   if r.status == "implemented" and r.number is not None and "R" in r.setting)


def test_every_implemented_reasoning_row_is_registered():
    assert set(REASONING) <= set(method_names())
    assert len(REASONING) >= 9


@pytest.mark.parametrize("method", REASONING)
def test_method_runs_one_iteration_through_the_flow_on_math(prefect_harness, shared_home, method):
    out = api.start_run(SMALL + [f"credit={method}", *CHEAP.get(method, [])], home=shared_home, progress=False)
    c = api.tracker_for(shared_home).client
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert run.data.tags["creditflow.method"] == method
    assert "credit.abs_mean" in m or "credit.mean" in m
    assert "update.loss" in m
    needs = get_method_class(method).needs
    if "mc_rollouts" in needs:
        assert m["overhead.credit.extra_tokens"] > 0 and m["overhead.credit.env_resets"] > 0
    if "judge" in needs:
        assert m["overhead.credit.judge_calls"] > 0
    if needs & {"scorer", "ref_logprobs"}:
        assert m["overhead.credit.extra_forward_passes"] > 0
    if method in EXTRA:
        EXTRA[method](c, run, m)
