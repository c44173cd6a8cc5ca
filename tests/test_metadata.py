"""The benchmark metadata schema (survey §9.5; stages/benchmark/metadata.schema.json): a realistic
document validates; a missing field, a wrong type and an out-of-range value each fail with a
message naming the field, the value and the rule. (A real run's metadata: tests/test_report.py.)"""

from __future__ import annotations

import copy
import json
import math
from importlib import resources

import pytest

from flows import checklist
from stages.benchmark import metadata as M


def valid_doc() -> dict:
    items = [{"key": k, "category": c, "priority": p, "item": t, "status": "filled", "value": "x"}
             for k, c, p, t in checklist.ITEMS]
    return {
        "schema_version": "1", "kind": "training_run",
        "run": {"run_id": "cf-20261206-120000-abcdef", "mlflow_run_id": "0123abcd", "created": "2026-12-06T12:00:00+00:00",
                "finished": "2026-12-06T12:01:04+00:00", "status": "finished"},
        "task": {"env": "bifurcation", "variant": None, "description": {"source": "generated", "metric": "success rate"},
                 "profile": {"setting": "agentic", "turns": 3, "trajectory_tokens": 40, "verifiable_intermediate": False,
                             "verifiable_outcome": True, "stochastic": False, "partially_observable": False,
                             "privileged_info": False, "num_agents": 1, "compute_budget": "low",
                             "env_reset_cheap": True, "prm_available": False},
                 "has_ground_truth": True, "recommendation": {"methods": ["gigpo", "grpo"], "method_in_recommended": True}},
        "method": {"name": "grpo", "granularity": "episode", "methodology": "group-relative outcome baseline",
                   "episode_level_baseline": True, "taxonomy": None},
        "baselines": {"is_episode_level_baseline": True, "baseline_run": None, "ablation_of": None},
        "model": {"name": "tiny-qwen2", "parameters": 123456, "version": "abc", "path": None, "device": "CPU"},
        "seeds": [0],
        "compute": {"iterations": 2, "generated_tokens": 900, "forward_tokens": 4000, "ca_forward_tokens": 0,
                    "env_steps": 96, "env_resets": 32, "judge_calls": 0, "wall_seconds": 12.5, "cpu_seconds": 20.1,
                    "ca_seconds": 0.01, "ca_share": 0.001, "device_hours": 0.0056, "device": "CPU",
                    "stage_seconds": {"rollout": 5.0, "credit": 0.01},
                    "ca_overhead": {"extra_forward_passes": 0, "extra_tokens": 0, "env_resets": 0, "env_steps": 0,
                                    "judge_calls": 0, "wall_seconds": 0.01}},
        "ground_truth": {"iterations": 2, "rmse": 0.3, "spearman": 0.4, "sign_accuracy": 0.7, "zero_advantage_mass": 0.6,
                         "decisive_share": 0.3, "shift_invariant_error": 0.2, "pg_cosine": 0.8, "batch_variance": None},
        "results": {"metric": "success rate", "success_before": {"rate": 0.25, "ci95": [0.1, 0.5], "episodes": 16},
                    "success_after": {"rate": 0.5, "ci95": [0.28, 0.72], "episodes": 16}, "final_train_success": 0.4},
        "checklist": items,
        "software": {"python": "3.11.9", "creditflow": "0.1.0", "torch": "2.13.0"},
        "git_commit": "c20fa42", "config_hash": "9f8e7d",
    }


def test_the_schema_is_package_data_and_a_realistic_document_validates():
    text = resources.files("stages.benchmark").joinpath("metadata.schema.json").read_text()
    assert json.loads(text)["$schema"].endswith("2020-12/schema")
    M.validate(valid_doc())
    no_gt = valid_doc()
    no_gt["ground_truth"] = None  # a task without ground truth
    M.validate(no_gt)


@pytest.mark.parametrize("mutate, field, rule", [
    (lambda d: d["compute"].pop("generated_tokens"), "compute", "'generated_tokens' is a required property"),
    (lambda d: d.pop("checklist"), "(document)", "'checklist' is a required property"),
    (lambda d: d["model"].__setitem__("parameters", "123k"), "model.parameters", "is not of type 'integer'"),
    (lambda d: d["seeds"].__setitem__(0, 1.5), "seeds[0]", "is not of type 'integer'"),
    (lambda d: d["compute"].__setitem__("wall_seconds", -1.0), "compute.wall_seconds", "less than the minimum of 0"),
    (lambda d: d["ground_truth"].__setitem__("spearman", 1.7), "ground_truth.spearman", "greater than the maximum of 1"),
    (lambda d: d["results"]["success_after"].__setitem__("ci95", [0.2]), "results.success_after.ci95", "too short"),
    (lambda d: d["method"].__setitem__("granularity", "sentence"), "method.granularity", "is not one of"),
    (lambda d: d["checklist"].pop(), "checklist", "is too short"),
    (lambda d: d["checklist"][3].__setitem__("status", "done"), "checklist[3].status", "is not one of"),
    (lambda d: d["task"]["profile"].__setitem__("turns", 0), "task.profile.turns", "less than the minimum of 1"),
    (lambda d: d.__setitem__("git_commit", "HEAD~1"), "git_commit", "does not match"),
    (lambda d: d["run"].__setitem__("finished", "yesterday"), "run.finished", "is not a 'date-time'"),
])
def test_invalid_documents_fail_naming_field_value_and_rule(mutate, field, rule):
    doc = valid_doc()
    mutate(doc)
    with pytest.raises(M.MetadataError) as err:
        M.validate(doc)
    msg = str(err.value)
    assert f"{field}: " in msg and rule in msg, msg


def test_non_finite_numbers_become_null_before_validation():
    doc = valid_doc()
    doc["ground_truth"]["pg_cosine"] = float("nan")
    doc["compute"]["ca_share"] = float("inf")
    clean = M.finite_or_none(doc)
    assert clean["ground_truth"]["pg_cosine"] is None and clean["compute"]["ca_share"] is None
    assert math.isnan(doc["ground_truth"]["pg_cosine"])  # a copy: the input is untouched
    M.validate(clean)
    json.dumps(clean, allow_nan=False)


@pytest.mark.parametrize("env", ["bifurcation", "bifurcation_long", "math", "code", "tooluse"])
def test_every_shipped_task_family_profile_and_description_fit_the_schema(env):
    """What the metadata builder takes from a task family as is (its decision-tree profile and
    Appendix C description) validates against the schema's task section."""
    import jsonschema

    from environments.registry import get_family_class
    from flows.config import load_config, to_object
    import environments.tasks  # noqa: F401  (registers the families)

    cfg = to_object(load_config([f"env={env}"]))
    family = get_family_class(cfg.env.name)(cfg.env)
    schema = M.load_schema()
    task = {"env": cfg.env.name, "description": {k: str(v) for k, v in family.describe().items()},
            "profile": family.profile(), "has_ground_truth": False,
            "recommendation": {"methods": [], "method_in_recommended": None}}
    jsonschema.Draft202012Validator({**schema["properties"]["task"], "$defs": schema["$defs"]}).validate(task)


def test_taxonomy_row_of_a_method_realized_by_a_loss():
    """SORL's Appendix B row is credit=grpo with update.loss=sorl: plain GRPO keeps its own row."""
    from flows.metadata import _taxonomy

    assert _taxonomy("grpo")["method"] == "GRPO" and _taxonomy("grpo", "grpo")["method"] == "GRPO"
    assert _taxonomy("grpo", "ppo")["method"] == "GRPO"
    assert _taxonomy("grpo", "sorl")["method"] == "SORL" and _taxonomy("grpo", "sorl")["number"] == 24
    assert _taxonomy("turn_ppo", "turn_ppo")["method"] == "Turn-PPO"
