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


#: method-specific checks of the flow-level run beyond "finished with metrics"
EXTRA = {"int": _check_int, "red": _check_red}

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
