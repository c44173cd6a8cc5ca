"""Bifurcation's sandboxed mode: transitions computed by a stdlib script in a process sandbox give
the same trajectories as the in-process mode; faults end the episode; snapshots; one iteration."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.bifurcation import BifurcationFamily
from environments.tasks.bifurcation_config import BifurcationConfig
from environments.tasks.bifurcation_sandboxed import SandboxedBifurcationEnv
from tests.env_support import play_alike

CFG = BifurcationConfig(horizon=5, num_decisive=2, num_actions=3, slip_prob=0.3, decisive_reward=0.5)


@pytest.fixture
def backend(tmp_path):
    b = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    yield b
    b.close()


def test_needs_sandbox_is_per_config():
    assert BifurcationFamily(CFG).needs_sandbox is False
    assert BifurcationFamily(replace(CFG, sandboxed=True)).needs_sandbox is True
    assert BifurcationFamily.needs_sandbox is False  # the class default is untouched
    fam = BifurcationFamily(replace(CFG, sandboxed=True))
    with pytest.raises(ValueError, match="needs a sandbox"):
        fam.make(fam.instances("train", 1, 0)[0])


@pytest.mark.parametrize("terminate_on_error", [False, True])
def test_identical_trajectories(backend, terminate_on_error):
    cfg = replace(CFG, terminate_on_error=terminate_on_error)
    plain, boxed = BifurcationFamily(cfg), BifurcationFamily(replace(cfg, sandboxed=True))
    rng = random.Random(7)
    choices = [" A\n", " B\n", " C\n", "A", " D\n", "\udcff\n", "", "AB\n", "\x00"]
    for inst in plain.instances("train", 6, seed=1):
        seed = rng.getrandbits(31)
        e1, e2 = plain.make(inst, episode_seed=seed), boxed.make(inst, backend.create(), episode_seed=seed)
        assert isinstance(e2, SandboxedBifurcationEnv)
        assert e1.reset() == e2.reset() and e1.state_key() == e2.state_key()
        actions = play_alike(e1, e2, iter(lambda: rng.choice(choices), None))
        assert e1.ground_truth(actions) == e2.ground_truth(actions)
        assert e2.stats()["sandbox_execs"] == len(actions) and e2.stats()["sandbox_seconds"] > 0


def test_snapshot_restore_with_reseed(backend):
    fam = BifurcationFamily(replace(CFG, sandboxed=True))
    plain = BifurcationFamily(CFG)
    inst = fam.instances("train", 1, 0)[0]
    env, ref = fam.make(inst, backend.create(), episode_seed=3), plain.make(inst, episode_seed=3)
    for e in (env, ref):
        e.reset()
        e.step(" A\n")
    snap = env.snapshot()
    assert snap == ref.snapshot()
    for reseed in (None, 11):
        env.restore(snap, reseed=reseed)
        ref.restore(snap, reseed=reseed)
        for a in [" B\n", " A\n", " C\n", " A\n"]:
            r1, r2 = env.step(a), ref.step(a)
            assert r1 == r2
            if r1.done:
                break


def test_sandbox_faults_end_the_episode(backend):
    fam = BifurcationFamily(replace(CFG, sandboxed=True))
    inst = fam.instances("train", 1, 0)[0]
    box = backend.create()
    env = fam.make(inst, box)
    env.reset()
    box.write_file("bif_step.py", b"while True:\n    pass\n")
    env.exec_timeout_s = 0.5
    r = env.step(" A\n")
    assert r.done and r.reason == "sandbox_timeout" and r.reward == 0.0 and r.info["terminal_reward"] == 0.0
    env = fam.make(inst, backend.create())
    env.reset()
    env.box.write_file("bif_step.py", b"import sys\nsys.exit(3)\n")
    assert env.step(" A\n").reason == "sandbox_error"
    box = backend.create()
    env = fam.make(inst, box)
    env.reset()
    box.close()
    r = env.step(" A\n")
    assert r.done and r.reason == "sandbox_error" and not r.success


def test_one_pipeline_iteration(tmp_path):
    from flows.api import run_plain

    out = run_plain(["env=bifurcation", "env.sandboxed=true", "iterations=1", "rollout.tasks_per_iteration=2",
                     "rollout.group_size=2", "eval_episodes=2", "model.warmup_steps=3"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
    run_dir = tmp_path / "runs" / out["run_id"]
    assert (run_dir / "sandboxes").is_dir() and list((run_dir / "sandboxes").rglob("*")) == []
