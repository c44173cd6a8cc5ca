"""Scale-out of the rollout stage (flows/scaleout.py): shards of whole groups, played on a real local
Dask or Ray cluster (two worker processes) through Prefect's DaskTaskRunner / RayTaskRunner, give the same trajectories as
the unsharded rollout: identical token ids, actions, rewards; log-probs equal to float32 resolution."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from environments.construct import build_env_batch
from flows import scaleout
from flows.config import load_config
from stages.config_fields import check
from stages.rollout.hf_engine import sample_per_request
from flows.runtime import RunState

# env and model as tests/test_flow.py: the session's cached tiny policy is reused
SMALL = ["rollout.tasks_per_iteration=5", "rollout.group_size=3", "env.horizon=3", "env.num_decisive=1"]


@pytest.fixture(scope="module")
def run(shared_home):
    """A run directory with its init checkpoint (the state a worker starts from), the iteration's
    EnvBatch, and the unsharded reference rollout played in this process."""
    home = shared_home
    state = RunState.create(load_config(SMALL), home)
    checkpoint = state.save_init_checkpoint()
    cfg = state.obj
    envb = build_env_batch(state.family, cfg.rollout.tasks_per_iteration, cfg.rollout.group_size,
                           cfg.env.train_size, 0, cfg.seed, split="train")
    seed = state.seed_for(0, "rollout")
    ctx = scaleout.ShardContext(state.run_id, str(home))  # not the cached one: the reference is independent
    ctx.ensure_checkpoint(checkpoint)
    reference, _, tokens = ctx.player.play(envb.slots, seed, cfg.rollout.temperature)
    ctx.close()
    assert len(reference) == 15 and tokens > 0
    return {"home": str(home), "run_id": state.run_id, "checkpoint": checkpoint, "envb": envb, "seed": seed,
            "temperature": cfg.rollout.temperature, "reference": reference}


#: float32 logits of magnitude ~10 resolve ~1e-6 (one ulp); CPU kernels round differently for other batch
#: shapes, so a row's log-probs move by ~1e-6 with the batch it is in (measured: 7e-7 for 2 shards, 1.0e-6
#: for 5). Tokens are compared exactly.
LOGPROB_ATOL = 1e-5


def _assert_same(reference, batch):
    assert [t.uid for t in batch.trajectories] == [t.uid for t in reference.trajectories]
    for a, b in zip(reference.trajectories, batch.trajectories):
        assert b.prompt_ids == a.prompt_ids
        assert b.response_ids == a.response_ids, a.uid
        assert b.policy_mask == a.policy_mask
        assert [t.action_text for t in b.turns] == [t.action_text for t in a.turns]
        assert (b.reward, b.success, b.done_reason) == (a.reward, a.success, a.done_reason)
        diff = (torch.tensor(b.logprobs) - torch.tensor(a.logprobs)).abs().max().item()
        assert diff <= LOGPROB_ATOL, (a.uid, diff)


# ------------------------------------------------------------------------------------- sharding
def test_shards_hold_whole_groups_in_order(run):
    slots = run["envb"].slots
    for n in (1, 2, 3, 5, 9):
        shards = scaleout.shard_slots(slots, n)
        assert len(shards) == min(n, 5)
        assert [s.uid for shard in shards for s in shard] == [s.uid for s in slots]  # contiguous, same order
        owner = {}
        for i, shard in enumerate(shards):
            for s in shard:
                assert owner.setdefault(s.group_id, i) == i  # a group never spans two shards
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 3  # balanced to within one group
    assert scaleout.shard_slots([], 4) == []
    with pytest.raises(ValueError, match="rollout_shards"):
        scaleout.shard_slots(slots, 0)


def test_runner_config_is_checked_and_local_has_no_runner():
    assert scaleout.make_task_runner(scaleout.RunnerConfig()) is None
    assert check(scaleout.RunnerConfig(kind="dask", rollout_shards=2), "runner") == []
    errors = {p.key for p in check(scaleout.RunnerConfig(kind="spark", rollout_shards=0, address="x"), "runner")}
    assert {"runner.kind", "runner.rollout_shards"} <= errors
    assert [p.key for p in check(scaleout.RunnerConfig(kind="dask", address="host:8786"), "runner")] == ["runner.address"]


# ------------------------------------------------------------------------------------- sampling
def test_per_request_sampling_follows_the_distribution_and_ignores_the_batch():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(20000, -1).clone()
    logits[:, 4] = float("-inf")
    seeds = torch.arange(20000, dtype=torch.long) * 7919 + 12345
    tok, lp, ent = sample_per_request(logits, 1.0, 1.0, seeds, step=0)
    freq = torch.bincount(tok, minlength=5).double() / len(tok)
    assert (freq[:4] - probs[:4].double()).abs().max() < 0.015  # 4 sigma at n=20000
    assert freq[4] == 0  # a token without mass is never drawn
    assert torch.allclose(lp, probs.log()[tok], atol=1e-6)
    assert torch.allclose(ent, torch.special.entr(probs).sum().expand(20000), atol=1e-5)
    # a row's draw depends on its own seed and step only: any sub-batch, any order, gives the same tokens
    perm = torch.randperm(20000, generator=torch.Generator().manual_seed(0))[:777]
    sub, _, _ = sample_per_request(logits[perm], 1.0, 1.0, seeds[perm], step=0)
    assert torch.equal(sub, tok[perm])
    step1, _, _ = sample_per_request(logits, 1.0, 1.0, seeds, step=1)
    assert (step1 != tok).float().mean() > 0.3  # a new step draws anew
    # top-p: tokens outside the nucleus are never drawn
    top, _, _ = sample_per_request(logits, 1.0, 0.7, seeds, step=0)
    assert set(Counter(top.tolist())) <= {0, 1}


# ------------------------------------------------------------------------------------- invariance
def test_sharded_rollout_in_process_equals_unsharded(run):
    """Outside a flow the shards are played one after another here: any shard count, same result."""
    for n in (2, 5):
        batch, overhead, tokens = scaleout.rollout_sharded(run["run_id"], run["home"], run["envb"],
                                                           run["checkpoint"], run["seed"], run["temperature"], n)
        _assert_same(run["reference"], batch)
        assert batch.meta["shards"] == n and batch.meta["dropped_groups"] == 0
        assert overhead.env_resets == 15 and tokens == sum(t.num_policy_tokens for t in batch.trajectories)


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_sharded_rollout_on_a_local_cluster_equals_unsharded(prefect_harness, run, kind):
    """Two shards as Prefect tasks on a real local cluster with two worker processes (prefect-dask's
    DaskTaskRunner, prefect-ray's RayTaskRunner): each worker process opens the run from its
    directory, loads the checkpoint, plays its groups."""
    pytest.importorskip(f"prefect_{kind}", reason=f"runner.kind={kind} needs the {kind} extra: pip install -e '.[{kind}]'")
    from prefect import flow

    runner = scaleout.make_task_runner(scaleout.RunnerConfig(kind=kind, workers=2, rollout_shards=2))

    @flow(name=f"scaleout-{kind}-test", task_runner=runner, persist_result=False)
    def sharded() -> tuple:
        return scaleout.rollout_sharded(run["run_id"], run["home"], run["envb"], run["checkpoint"], run["seed"],
                                        run["temperature"], 2)

    batch, overhead, tokens = sharded()
    _assert_same(run["reference"], batch)
    assert batch.meta["shards"] == 2 and overhead.env_resets == 15
    assert tokens == sum(t.num_policy_tokens for t in run["reference"].trajectories)
    # the shards ran in the cluster's worker processes, not here
    pids = {int(w.rsplit(":", 1)[1]) for w in batch.meta["shard_workers"]}
    assert pids and os.getpid() not in pids


def _flow_has_runner() -> bool:
    from flows.config import TrainConfig

    return "runner" in TrainConfig.__dataclass_fields__


@pytest.mark.slow  # two flow runs (prepare, eval, one iteration each) and a Dask cluster
@pytest.mark.skipif(not _flow_has_runner(), reason="flows/config.py has no runner section yet (wiring pending)")
def test_one_iteration_through_the_flow_on_dask_equals_in_process(prefect_harness, tmp_path):
    """The real flow, one iteration: runner.kind=dask with 2 shards on a 2-process cluster persists the
    same rollout as 3 shards played in the flow process (so rewards, credit and update agree too)."""
    pytest.importorskip("prefect_dask")
    from flows import api

    cfg = SMALL + ["iterations=1", "eval_episodes=2"]
    here = api.start_run(cfg + ["runner.rollout_shards=3"], home=tmp_path, progress=False)
    there = api.start_run(cfg + ["runner.kind=dask", "runner.workers=2", "runner.rollout_shards=2"],
                          home=tmp_path, progress=False)
    a, b = (_persisted_rollout(RunState.open(out["run_id"], Path(tmp_path))) for out in (here, there))
    _assert_same(a, b)
    assert a.meta["shards"] == 3 and b.meta["shards"] == 2
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in b.meta["shard_workers"]}


def _persisted_rollout(state):
    """The iteration-0 rollout batch the flow persisted under the run's results directory."""
    from prefect.results import ResultRecord

    key = f"{state.run_id}-it0-rollout-{state.chash}"
    record = ResultRecord.deserialize((state.paths.results / key).read_bytes())
    return record.result.value
