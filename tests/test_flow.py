"""The real Prefect flow with a real MLflow store: logging, artifacts, checklist, resume."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import api
from flows.runtime import InjectedCrash, RunState

SMALL = [
    "iterations=2",
    "rollout.tasks_per_iteration=4",
    "rollout.group_size=4",
    "eval_episodes=16",
    "env.horizon=3",
    "env.num_decisive=1",
    "tracking.heatmap_every=1",
]


@pytest.fixture()
def home(shared_home, monkeypatch):
    monkeypatch.setenv("CREDITFLOW_HOME", str(shared_home))
    return shared_home


def _client(home: Path):
    return api.tracker_for(home)


def _metric_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_two_iterations_log_params_metrics_tags_artifacts(prefect_harness, home):
    out = api.start_run(SMALL, home=home, progress=False)
    tracker = _client(home)
    run = tracker.client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    # params: the flattened resolved config
    assert run.data.params["credit.method"] == "grpo"
    assert run.data.params["iterations"] == "2"
    # tags: links both ways, git commit, checklist
    tags = run.data.tags
    assert tags["creditflow.run_id"] == out["run_id"]
    assert tags["prefect.flow_run_id"]
    assert "mlflow.source.git.commit" in tags
    assert tags["checklist.ca.granularity"].startswith("episode")
    assert tags["checklist.compute.device_hours.status"] == "filled"
    assert "CPU-hours" in tags["checklist.compute.device_hours"]
    assert tags["checklist.baseline.episode_level.status"] == "filled"
    # decision-tree recommendation for the task profile is recorded (survey §7.5)
    assert tags["creditflow.recommended_methods"]
    assert tags["creditflow.method_in_recommended"] == str("grpo" in tags["creditflow.recommended_methods"].split(",")).lower()
    # metrics: one step per iteration, plus the final eval step
    c = tracker.client
    assert _metric_steps(c, run.info.run_id, "progress.iteration") == [0, 1, 2]
    for key in ("reward.success_rate", "credit.mean", "credit.std", "credit.zero_fraction",
                "credit.decisive_share", "credit.gt_rank_corr", "credit.gt_rmse", "credit.gt_zero_advantage_mass", "update.loss", "update.grad_norm",
                "update.clip_fraction", "update.entropy", "time.rollout_seconds", "time.credit_seconds",
                "overhead.rollout.env_steps"):
        assert _metric_steps(c, run.info.run_id, key) == [0, 1], key
    assert _metric_steps(c, run.info.run_id, "eval.success_rate") == [2]
    # artifacts
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config", "checklist.json", "heatmaps"} <= names
    heat = {a.path for a in c.list_artifacts(run.info.run_id, "heatmaps")}
    assert "heatmaps/credit_iter_0000.png" in heat and "heatmaps/credit_iter_0001.png" in heat
    local = c.download_artifacts(run.info.run_id, "checklist.json", str(home / "dl"))
    items = json.loads(Path(local).read_text())
    assert len(items) == 14 and {i["status"] for i in items} <= {"filled", "missing", "n/a"}
    # the Prefect API serves the flow run back (guards the FastAPI pin: read filters with null sort)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = {str(r.id): r for r in client.read_flow_runs(limit=200)}
        assert tags["prefect.flow_run_id"] in runs
        # the UI and the CLI speak of the same run: the flow run is named after the creditflow run id
        assert runs[tags["prefect.flow_run_id"]].name == out["run_id"]
    # nothing landed in the current directory
    assert not Path("mlruns").exists() and not Path("mlartifacts").exists()


def test_resume_after_crash_in_credit_stage(prefect_harness, home):
    overrides = SMALL + ["iterations=3", "debug.crash_at=2:credit"]
    run_id = "cf-test-resume-credit"
    with pytest.raises(InjectedCrash):
        api.start_run(overrides, home=home, progress=False, run_id=run_id)
    state = RunState.open(run_id, home)
    first = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
    assert first[(2, "credit")] == 1 and (2, "update") not in first
    crashed = _client(home).client.get_run(state.info["mlflow_run_id"])
    assert crashed.info.status == "FAILED" and "InjectedCrash" in crashed.data.tags["creditflow.failure"]
    out = api.resume_run(run_id, home=home, progress=False)
    after = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
    resumed = after - first
    # only the crashed stage, its successors and the final eval ran again
    assert set(resumed) == {(2, "credit"), (2, "update"), (3, "eval")}, resumed
    for key in [(-1, "prepare"), (-1, "eval"), (0, "env"), (0, "rollout"), (1, "update"), (2, "env"),
                (2, "rollout"), (2, "reward")]:
        assert after[key] == 1, key
    tracker = _client(home)
    c = tracker.client
    assert c.get_run(out["mlflow_run_id"]).info.status == "FINISHED"
    for key in ("progress.iteration", "reward.success_rate", "credit.mean", "update.loss"):
        steps = _metric_steps(c, out["mlflow_run_id"], key)
        assert len(steps) == len(set(steps)), (key, steps)
    assert _metric_steps(c, out["mlflow_run_id"], "progress.iteration") == [0, 1, 2, 3]
    # both flow runs are linked on the MLflow run
    assert len(c.get_run(out["mlflow_run_id"]).data.tags["prefect.flow_run_ids"].split(",")) == 2


def test_resume_with_changed_hashed_config_is_refused(prefect_harness, home):
    from flows.config import ConfigError

    run_id = "cf-test-refuse"
    with pytest.raises(InjectedCrash):
        api.start_run(SMALL + ["debug.crash_at=0:rollout"], home=home, progress=False, run_id=run_id)
    with pytest.raises(ConfigError, match="config hash"):
        api.resume_run(run_id, ["update.lr=0.5"], home=home, progress=False)


#: where each SIGKILL of :func:`test_kill_9_in_every_stage_then_resume` lands, in order: inside each
#: of the five stages, and in the middle of the checkpoint write (files written, directory not renamed)
KILL_POINTS = ["env", "rollout", "reward", "credit", "update", "checkpoint"]


def test_kill_9_in_every_stage_then_resume(prefect_harness, home):
    """A real SIGKILL of the training process inside each of the five stages and in the middle of
    the checkpoint write, one after the other in one run (kill k lands in iteration k + 1; each
    resume carries the next kill): every resumed process recomputes nothing that finished (only
    the killed stage and its successors), loses nothing, logs no metric step twice and never sees
    a half-written checkpoint."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, CREDITFLOW_HOME=str(home), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    run_id = "cf-test-kill9-chain"
    iterations = len(KILL_POINTS) + 1
    root = Path(__file__).resolve().parent.parent
    stages = ["env", "rollout", "reward", "credit", "update"]
    overrides = [o for o in SMALL if not o.startswith(("iterations=", "tracking.heatmap_every="))]
    cmd = [sys.executable, "-m", "flows.cli", "train", "--quiet", "--run-id", run_id, *overrides,
           f"iterations={iterations}", "tracking.heatmap_every=3"]
    state, seen, prev = None, collections.Counter(), None  # prev: (iteration, index of the killed stage)
    for k, where in enumerate(KILL_POINTS + [None]):
        crash = [] if where is None else [f"debug.crash_at={k + 1}:{where}:kill"]
        proc = subprocess.run(cmd + crash, env=env, cwd=root, capture_output=True, text=True, timeout=600)
        if where is not None:
            assert proc.returncode == -9, (where, proc.stderr[-2000:])
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
        state = state or RunState.open(run_id, home)
        now = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
        new = now - seen
        expected: set = set() if prev is not None else {(-1, "prepare"), (-1, "eval")} | {(0, s) for s in stages}
        if prev is not None:  # the killed stage of the last process and its successors, once more
            expected |= {(prev[0], s) for s in stages[prev[1]:]}
        if where is None:
            expected |= {(iterations, "eval")}
        else:
            killed = stages.index("update" if where == "checkpoint" else where)
            expected |= {(k + 1, s) for s in stages[: killed + 1]}  # up to the stage it died in
            assert not (state.paths.checkpoints / f"iter_{k + 1:04d}").exists(), where  # never a partial checkpoint
            prev = (k + 1, killed)
        assert set(new) == expected and all(n == 1 for n in new.values()), (where, sorted(new), sorted(expected))
        seen = now
        cmd = [sys.executable, "-m", "flows.cli", "resume", "--quiet", run_id]
    assert "success rate" in proc.stdout
    c = _client(home).client
    mlflow_run = json.loads((state.paths.info).read_text())["mlflow_run_id"]
    assert c.get_run(mlflow_run).info.status == "FINISHED"
    for key in ("progress.iteration", "reward.success_rate", "update.loss"):
        steps = _metric_steps(c, mlflow_run, key)
        assert len(steps) == len(set(steps)), (key, steps)
    assert _metric_steps(c, mlflow_run, "progress.iteration") == list(range(iterations + 1))  # + the final step
    from stages.update.checkpoint import verify_checkpoint

    ckpts = state.paths.checkpoints
    kept = sorted(ckpts.glob("iter_*"))  # update.keep_checkpoints prunes the older ones
    assert kept and kept[-1].name == f"iter_{iterations - 1:04d}"
    for path in kept:
        verify_checkpoint(path)
    assert not list(ckpts.glob(".*tmp*"))  # the abandoned temporary directories were cleaned up


def test_gae_with_value_head_through_the_flow(prefect_harness, home):
    """A method that declares needs={'critic'} gets one; value loss and critic overhead are logged."""
    out = api.start_run(SMALL + ["credit=gae", "update=ppo", "iterations=1"], home=home, progress=False)
    c = _client(home).client
    run = c.get_run(out["mlflow_run_id"])
    m = run.data.metrics
    assert "update.value_loss" in m and "update.critic_grad_norm" in m
    # one critic forward pass per trajectory: 4 tasks x 4 samples
    assert m["overhead.credit.extra_forward_passes"] == 16
    assert run.data.tags["checklist.ca.granularity"].startswith("token")
    assert run.data.tags["checklist.ca.methodology"].startswith("TD")
    # the critic is checkpointed with the policy
    from flows.runtime import RunState

    ckpts = RunState.open(out["run_id"], home).paths.checkpoints
    assert (ckpts / "iter_0000" / "critic.safetensors").is_file()


def test_checklist_and_audit_cli(prefect_harness, home, capsys):
    from flows.cli import main

    base = api.start_run(SMALL + ["iterations=1"], home=home, progress=False, run_id="cf-test-baseline")
    other = api.start_run(SMALL + ["iterations=1", "credit=gae", "update=ppo", "report.baseline_run=cf-test-baseline",
                                   "report.ablation_of=cf-test-baseline"],
                          home=home, progress=False, run_id="cf-test-compared")
    capsys.readouterr()
    assert main(["checklist", other["run_id"]]) == 0
    text = capsys.readouterr().out
    assert "Reporting checklist (survey Appendix C)" in text
    assert "run cf-test-baseline (grpo); base model identical" in text
    assert "device-hours vs baseline" in text
    assert "Required items reported: 10/10" in text
    assert main(["checklist", base["run_id"], "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert {i["key"] for i in items} >= {"model.base_model", "compute.device_hours", "trajectory.length_distribution"}
    assert main(["audit"]) == 0
    table = capsys.readouterr().out
    assert "cf-test-baseline" in table and "cf-test-compared" in table and "items reported (of 14)" in table
    assert main(["checklist", "cf-nope"]) == 2


def _persisted(state, key):
    """The value of a stage result the flow persisted under the run's results directory."""
    from prefect.results import ResultRecord

    record = ResultRecord.deserialize((state.paths.results / f"{state.run_id}-{key}-{state.chash}").read_bytes())
    return record.result.value


def test_acpo_curriculum_samples_the_next_iteration_and_survives_resume(prefect_harness, home):
    """ACPO's curriculum (credit concentration per task instance) goes from iteration 0's persisted
    credit result to iteration 1's environment stage, which samples by it; a run that crashed in
    that env stage and was resumed samples exactly what an uninterrupted run samples."""
    overrides = SMALL + ["credit=acpo", "rollout.tasks_per_iteration=3", "rollout.group_size=2", "eval_episodes=2",
                         "tracking.heatmap_every=0"]
    straight = api.start_run(overrides, home=home, progress=False, run_id="cf-test-acpo-straight")
    with pytest.raises(InjectedCrash):
        api.start_run(overrides + ["debug.crash_at=1:env"], home=home, progress=False, run_id="cf-test-acpo-crash")
    api.resume_run("cf-test-acpo-crash", home=home, progress=False)
    a, b = RunState.open(straight["run_id"], home), RunState.open("cf-test-acpo-crash", home)
    assert collections.Counter((e["iteration"], e["stage"]) for e in b.executions())[(0, "credit")] == 1
    credit0, env1 = _persisted(a, "it0-credit"), _persisted(a, "it1-env")
    assert credit0.curriculum and set(credit0.curriculum) <= {s.instance.task_id for s in _persisted(a, "it0-env").slots}
    assert env1.curriculum == credit0.curriculum  # what iteration 1 sampled by
    resumed = _persisted(b, "it1-env")
    assert resumed.curriculum == env1.curriculum
    assert [(s.instance.task_id, s.episode_seed) for s in resumed.slots] == [(s.instance.task_id, s.episode_seed) for s in env1.slots]
    m = _client(home).client.get_run(straight["mlflow_run_id"]).data.metrics
    assert m["env.curriculum_tasks"] == len(credit0.curriculum)
