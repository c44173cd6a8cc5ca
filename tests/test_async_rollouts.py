"""Bounded-staleness asynchronous rollouts (``rollout.max_staleness``, issue 17, survey §8.2).

Iteration k's env + rollout stages run on the flow's task runner while iteration k-1's reward,
credit and update run; the rollout samples a frozen copy of the checkpoint update k-1-N wrote, so
the staleness of every trajectory at update k is exactly ``min(k, N)`` (a fixed schedule, not a
race). Checked here through the real flow (MLflow metrics, the persisted rollout results, the
checkpoints), the one-line refusals, and (slow) a chain of SIGKILLs against an uninterrupted run."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows import api
from flows.config import ConfigError, load_config
from flows.runtime import RunState
from tests.test_flow import _persisted  # the value of a persisted stage result

ROOT = Path(__file__).resolve().parent.parent
TINY = ["env=bifurcation", "env.horizon=3", "env.num_decisive=1", "rollout.tasks_per_iteration=2",
        "rollout.group_size=2", "eval_episodes=2", "tracking.heatmap_every=0", "update.keep_checkpoints=8"]


def _history(home: Path, mlflow_run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in api.tracker_for(home).client.get_metric_history(mlflow_run_id, key)]


# ---------------------------------------------------------------------------- refusals: one line, before compute
REFUSED = [
    # (overrides, the key the line starts with, a fragment of its reason)
    (["credit=vineppo"], "rollout.max_staleness=1", "mc_rollouts"),
    (["credit=remax"], "rollout.max_staleness=1", "greedy_rollout"),
    (["credit=red"], "rollout.max_staleness=1", "credit.process_reward=mc"),
    (["runner.rollout_shards=2"], "rollout.max_staleness=1", "rollout_shards=1"),
    (["runner.kind=dask"], "rollout.max_staleness=1", "runner.kind=local"),
    (["env=lightning", "credit=lightning"], "rollout.max_staleness=1", "outside agent program"),
]


@pytest.mark.parametrize("overrides,key,fragment", REFUSED, ids=[" ".join(o) for o, _, _ in REFUSED])
def test_refused_combinations_are_one_line_naming_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(["rollout.max_staleness=1", *overrides])
    text = str(info.value)
    assert "\n" not in text and text.startswith(key) and fragment in text, text
    load_config(["rollout.max_staleness=0", *overrides])  # the synchronous loop takes them all


def test_a_loss_without_an_off_policy_correction_is_refused():
    from stages.update.loss_registry import register_loss, unregister_loss

    @register_loss("onpolicy_only_test", aggregation="token-mean")
    def _loss(logprobs, old_logprobs, advantages, mask, cfg):  # pragma: no cover - never computed
        return (logprobs * 0).sum(), {}

    try:
        with pytest.raises(ConfigError, match=r"^update.loss=onpolicy_only_test: declares no off-policy correction"):
            load_config(["rollout.max_staleness=2", "update.loss=onpolicy_only_test"])
        load_config(["update.loss=onpolicy_only_test"])
    finally:
        unregister_loss("onpolicy_only_test")
    for ok in (["update.loss=sorl"], ["update=ppo", "credit=gae"], ["update.loss=turn_ppo"], ["update.loss=dpo"]):
        load_config(["rollout.max_staleness=1", *ok])


def test_cli_refuses_before_anything_is_created(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(CREDITFLOW_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "rollout.max_staleness=1", "credit=vineppo"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "rollout.max_staleness=1" in lines[0] and "mc_rollouts" in lines[0], proc.stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_run_plain_is_synchronous_and_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"^rollout.max_staleness=1: run_plain"):
        api.run_plain(["rollout.max_staleness=1"], home=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_the_default_is_synchronous_and_keeps_the_config_hash():
    from flows.config import config_hash

    cfg = load_config([])
    assert cfg.rollout.max_staleness == 0
    legacy = load_config([])
    with __import__("omegaconf").open_dict(legacy.rollout):
        del legacy.rollout["max_staleness"]  # a run created before the key existed
    assert config_hash(cfg) == config_hash(legacy)
    assert config_hash(load_config(["rollout.max_staleness=1"])) != config_hash(cfg)


# ---------------------------------------------------------------------------- the schedule
def test_staleness_check_raises_past_the_bound():
    from types import SimpleNamespace

    from flows.train import staleness_stats

    def batch(versions):
        return SimpleNamespace(trajectories=[SimpleNamespace(meta={"policy_version": v}) for v in versions])

    # update 3 starts from iter_0002 (version 3); N=2: versions 1..3 are admissible
    assert staleness_stats(batch([1, 1, 2]), "x/iter_0002", 2) == {"staleness_mean": pytest.approx(5 / 3),
                                                                   "staleness_max": 2.0}
    with pytest.raises(RuntimeError, match="staleness outside"):
        staleness_stats(batch([0, 3]), "x/iter_0002", 2)  # 3 versions old
    with pytest.raises(RuntimeError, match="staleness outside"):
        staleness_stats(batch([4]), "x/iter_0002", 2)  # from the future


# ---------------------------------------------------------------------------- through the flow
def test_async_flow_staleness_is_min_k_n_and_the_update_uses_the_behaviour_logprobs(prefect_harness, shared_home):
    """N=2 over 4 iterations: MLflow's ``update.staleness_max`` (and mean) is ``min(k, 2)`` at step k,
    every persisted trajectory carries the version of the checkpoint its rollout sampled, and its
    recorded (behaviour) log-probs are that stale checkpoint's, not the learner's: the log-probs the
    update's ratio divides by are the behaviour policy's."""
    n, iters = 2, 4
    out = api.start_run(TINY + [f"iterations={iters}", f"rollout.max_staleness={n}"], home=shared_home, progress=False)
    mid = out["mlflow_run_id"]
    assert api.tracker_for(shared_home).client.get_run(mid).info.status == "FINISHED"
    expect = [(k, float(min(k, n))) for k in range(iters)]
    assert _history(shared_home, mid, "update.staleness_max") == expect
    assert _history(shared_home, mid, "update.staleness_mean") == expect
    assert _history(shared_home, mid, "rollout.policy_version") == [(k, float(k - min(k, n))) for k in range(iters)]
    state = RunState.open(out["run_id"], shared_home)
    runs = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
    assert all(c == 1 for c in runs.values()) and len(runs) == 2 + 5 * iters + 1, runs
    batches = {k: _persisted(state, f"it{k}-rollout") for k in range(iters)}
    for k, b in batches.items():
        assert {t.meta["policy_version"] for t in b.trajectories} == {k - min(k, n)}, k
    # iteration 3 sampled iter_0000 (version 1) while its update starts from iter_0002 (version 3)
    from stages.rollout.policy import pad_token_id
    from stages.rollout.scorer import response_logprobs
    from stages.update.checkpoint import load_checkpoint

    state.build_policy()
    pad, temp = pad_token_id(state.tokenizer), state.obj.rollout.temperature
    b = batches[3]
    t = b.to_tensors(pad_token_id=pad)
    recorded = t.old_logprobs * t.response_mask

    def under(name):
        load_checkpoint(state.paths.checkpoints / name, state.policy, None)
        return response_logprobs(state.policy, b, pad, temp)

    behaviour, learner = under("iter_0000"), under("iter_0002")
    assert torch.allclose(recorded, behaviour, atol=1e-4)
    assert (recorded - learner).abs().max() > 1e-3  # two updates apart: the ratio is not 1


def test_async_flow_with_the_sorl_loss(prefect_harness, shared_home):
    """N=1 with SO-GRPO (update.loss=sorl): its turn-level ratios and clipping-triggered weights are
    computed against the stale behaviour log-probs (logged every step, staleness 1 after step 0)."""
    out = api.start_run(TINY + ["iterations=3", "rollout.max_staleness=1", "update.loss=sorl"], home=shared_home,
                        progress=False)
    mid = out["mlflow_run_id"]
    assert _history(shared_home, mid, "update.staleness_max") == [(0, 0.0), (1, 1.0), (2, 1.0)]
    weights = _history(shared_home, mid, "update.sorl_weight_mean")
    assert [s for s, _ in weights] == [0, 1, 2] and all(0.0 <= w <= 1.0 for _, w in weights)
    assert [s for s, _ in _history(shared_home, mid, "update.turn_ratio_mean")] == [0, 1, 2]


# ---------------------------------------------------------------------------- resume after SIGKILL
def _weights(path: Path) -> dict[str, str]:
    from stages.update.checkpoint import verify_checkpoint

    return {k: v["sha256"] for k, v in verify_checkpoint(path)["files"].items() if k.endswith(".safetensors")}


@pytest.mark.slow  # five training processes (a few minutes on 2 busy cores)
def test_async_kill_9_chain_resumes_to_the_uninterrupted_result(prefect_harness, shared_home):
    """SIGKILLs inside the rollout lane (a rollout running beside the learner), the credit stage and
    the checkpoint write, one after the other in one asynchronous run (N=1), each resume carrying
    the next: metrics are logged exactly once per step, nothing that was persisted is recomputed,
    and the final checkpoint is bit-identical to that of an uninterrupted asynchronous run."""
    from prefect.settings import PREFECT_API_URL

    iters = 4
    over = TINY + [f"iterations={iters}", "rollout.max_staleness=1"]
    straight = api.start_run(over, home=shared_home, progress=False, run_id="cf-test-async-straight")
    env = dict(os.environ, CREDITFLOW_HOME=str(shared_home), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    run_id = "cf-test-async-kill9"
    cmd = [sys.executable, "-m", "flows.cli", "train", "--quiet", "--run-id", run_id, *over]
    state, seen = None, collections.Counter()
    kills = ["2:rollout", "2:credit", "3:checkpoint"]
    for where in kills + [None]:
        crash = [] if where is None else [f"debug.crash_at={where}:kill"]
        proc = subprocess.run(cmd + crash, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == (-9 if where else 0), (where, proc.stderr[-3000:])
        state = state or RunState.open(run_id, shared_home)
        now = collections.Counter((e["iteration"], e["stage"]) for e in state.executions())
        new = now - seen
        if seen:  # a resumed process: what the killed one persisted is loaded, not recomputed
            persisted = {key for key in seen if now[key] == seen[key]}
            assert all(new[key] == 0 for key in persisted)
            assert sum(new.values()) <= 2 + 5 * iters + 1  # never a whole re-run
        seen = now
        cmd = [sys.executable, "-m", "flows.cli", "resume", "--quiet", run_id]
    # every stage ran, and ran again only where a kill cut it short (at most two lanes in flight)
    stages = {(-1, "prepare"), (-1, "eval"), (iters, "eval")} | {(k, s) for k in range(iters)
                                                                  for s in ("env", "rollout", "reward", "credit", "update")}
    assert set(seen) == stages
    assert sum(seen.values()) - len(stages) <= 2 * len(kills)
    mlflow_run = json.loads(state.paths.info.read_text())["mlflow_run_id"]
    c = api.tracker_for(shared_home).client
    assert c.get_run(mlflow_run).info.status == "FINISHED"
    for key in ("progress.iteration", "update.loss", "update.staleness_max", "rollout.policy_version"):
        steps = [s for s, _ in _history(shared_home, mlflow_run, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    assert _history(shared_home, mlflow_run, "update.staleness_max") == [(k, float(min(k, 1))) for k in range(iters)]
    final = f"iter_{iters - 1:04d}"
    ref = RunState.open(straight["run_id"], shared_home)
    assert _weights(state.paths.checkpoints / final) == _weights(ref.paths.checkpoints / final)
    assert _history(shared_home, mlflow_run, "update.loss") == _history(shared_home, straight["mlflow_run_id"], "update.loss")
