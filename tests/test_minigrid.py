"""MiniGrid family: egocentric text view, actions by name, invalid actions (MiniGrid's no-op),
exact ground truth by BFS + DP (a hand computation of the optimal value; exhaustive MC with real
MiniGrid episodes under the uniform policy), seeds and splits, snapshots, config rules, and the
sandboxed mode (the exported BFS table stepped in a process sandbox; the Docker one is in
tests/test_sandboxed_families_docker.py) against in-process play."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.minigrid_env import ACTIONS, DONE, MiniGridConfig, MiniGridFamily
from flows.config import ConfigError, load_config
from stages.credit.decision_tree import TaskProfile

EMPTY = "MiniGrid-Empty-5x5-v0"


def fam(**kw) -> MiniGridFamily:
    if kw.get("gym_id") == EMPTY:  # one fixed layout: no layout-disjoint splits (env.split_by=seed)
        kw.setdefault("split_by", "seed")
    return MiniGridFamily(MiniGridConfig(**kw))


def test_optimal_value_equals_a_hand_computation():
    """Empty-5x5: the agent starts at (1,1) facing east, the goal is at (3,3): the shortest
    path is forward, forward, right, forward, forward (5 steps), MiniGrid's success reward is
    1 - 0.9 * 5 / max_steps with max_steps = 4 * 5 * 5 = 100."""
    f = fam(gym_id=EMPTY, max_turns=8, reference_policy="optimal")
    inst = f.instance("train", 0, 0)
    env = f.make(inst)
    env.reset()
    for a in ["forward", "forward", "right", "forward"]:
        assert not env.step(f" {a}\n").done
    res = env.step(" forward\n")
    assert res.done and res.success and res.reward == pytest.approx(1 - 0.9 * 5 / 100)
    gt = env.ground_truth(["forward", "forward", "right", "forward", "forward"])
    assert gt.value[0] == pytest.approx(1 - 0.9 * 5 / 100)
    assert gt.advantage == pytest.approx([0.0] * 5)  # every move was optimal
    tables = f.tables_for(inst)
    assert tables.n_states == 36  # 9 cells x 4 directions


def _mc_q(base, H_left, first, n, seed):
    """MC estimate of Q(state of ``base``, first) under the uniform policy over ``H_left`` turns,
    with real MiniGrid steps from deep copies of ``base`` (independent of the BFS tables)."""
    rng = random.Random(seed)
    rets = []
    for _ in range(n):
        env = copy.deepcopy(base)
        a, ret = first, 0.0
        for _ in range(H_left):
            _, r, term, _, _ = env.step(a)
            ret += r
            if term:
                break
            a = rng.randrange(len(ACTIONS))
        rets.append(ret)
    x = np.asarray(rets)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))


def test_uniform_ground_truth_equals_exhaustive_monte_carlo():
    """From the state after forward, forward, right (the goal 2 cells ahead), with 5 turns left."""
    import gymnasium

    H, prefix = 8, ["forward", "forward", "right"]
    f = fam(gym_id=EMPTY, max_turns=H)
    inst = f.instance("train", 0, 0)
    env = f.make(inst)
    env.reset()
    for a in prefix:
        env.step(f" {a}\n")
    env.record_state()  # the state of turn 3
    s3 = f.tables_for(inst).index[env._exact_states[-1]]
    Q3 = f.tables_for(inst).values.Q[3, s3, : len(ACTIONS)]
    base = gymnasium.make(EMPTY).unwrapped
    base.reset(seed=inst.spec["reset_seed"])
    for a in prefix:
        base.step(ACTIONS.index(a))
    for a in (ACTIONS.index("forward"), ACTIONS.index("left")):
        mean, se = _mc_q(base, H - 3, a, 300, seed=a)
        assert abs(mean - Q3[a]) <= 4 * se + 1e-9, (ACTIONS[a], mean, se, Q3[a])
    assert Q3[ACTIONS.index("forward")] > Q3[ACTIONS.index("left")] + 0.05  # distinguishable


def test_text_view_actions_and_invalid_noop():
    f = fam(gym_id="MiniGrid-DoorKey-5x5-v0", max_turns=6, ground_truth="none")
    env = f.make(f.instance("train", 1, 0))
    prompt = env.reset()
    assert prompt.startswith("Mission: use the key to open the door")
    assert "Actions: left | right | forward | pickup | drop | toggle | done" in prompt
    lines = prompt.splitlines()
    assert any(line.startswith("You face ") and "carrying nothing" in line for line in lines)
    view = [line for line in lines if len(line) == 7 and set(line) <= set("#.KDL/BXG~?^")]
    assert len(view) == 7 and view[-1][3] == "^"
    assert prompt.endswith("t1:") and "Seen: " in prompt
    steps_before = env.unwrapped.step_count
    res = env.step("dance\n")
    assert res.action is None and res.info["invalid_reason"] == "unknown" and not res.info["valid"]
    assert env.unwrapped.step_count == steps_before + 1  # MiniGrid's 'done' no-op took the step
    assert env.step(" 2\n").action == "forward"
    assert f"{DONE}" == "6"
    assert env.stats()["invalid_actions"] == 1.0


def test_seeds_splits_and_snapshots():
    f = fam(gym_id="MiniGrid-DoorKey-5x5-v0", max_turns=10, ground_truth="none")
    a, b = f.instance("train", 0, 0), f.instance("train", 0, 0)
    assert a == b and f.make(a).reset() == f.make(b).reset()
    train = {i.spec["reset_seed"] for i in f.instances("train", 30, 0)}
    ev = {i.spec["reset_seed"] for i in f.instances("eval", 30, 0)}
    assert not train & ev
    assert len({f.make(i).reset() for i in f.instances("train", 8, 0)}) > 1  # layouts differ
    env = f.make(a)
    env.reset()
    env.step(" left\n")
    snap = env.snapshot()
    seq = [" forward\n", " right\n", " forward\n"]
    first = [env.step(m).observation for m in seq]
    env.restore(snap)
    assert [env.step(m).observation for m in seq] == first


def test_config_rules_describe_profile():
    with pytest.raises(ConfigError, match=r"^env.gym_id=FrozenLake-v1: must be a MiniGrid"):
        load_config(["env=minigrid", "env.gym_id=FrozenLake-v1"])
    with pytest.raises(ConfigError, match=r"^credit"):
        load_config(["env=minigrid", "credit=oracle"])  # no exported MDP here
    f = fam()
    assert {"source", "ground_truth", "metric"} <= set(f.describe())
    assert TaskProfile(**f.profile()).partially_observable
    corpus = f.warmup_corpus(2, 0)
    assert all(t[0] in {f" {a}\n" for a in ACTIONS} for _, turns in corpus for t in turns)


#: every action name, an index, invalid texts (MiniGrid's no-op is stepped for them)
MG_TEXTS = [f" {a}\n" for a in ACTIONS] + [" 2\n", " forward\n", " forward\n", "jump\n", "\n", "Forward"]


def identical_play(plain, boxed, box, inst, seed, texts):
    """Play ``texts`` in-process and in ``box``; every StepResult, the ground truth and the
    stats (but the sandbox counters) must be identical. Returns the in-process env."""
    e1, e2 = plain.make(inst, episode_seed=seed), boxed.make(inst, sandbox=box, episode_seed=seed)
    assert e1.reset() == e2.reset() and e1.state_key() == e2.state_key()
    for text in texts:
        r1, r2 = e1.step(text), e2.step(text)
        assert r1 == r2 and "sandbox_fault" not in r2.info, text
        if r1.done:
            break
    assert e1.actions == e2.actions and e1.states == e2.states
    assert e1.ground_truth(e1.actions) == e2.ground_truth(e2.actions)
    s1, s2 = e1.stats(), dict(e2.stats())
    for key in ("gt_bfs_seconds", "gt_mc_seconds"):  # wall time of the ground truth, not a trajectory fact
        s1.pop(key, None), s2.pop(key, None)
    assert s2.pop("sandbox_seconds") > 0 and s2.pop("sandbox_execs") == s1["gym_steps"] and s1 == s2
    return e1, e2


def test_sandboxed_trajectories_equal_in_process(tmp_path):
    backend = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    try:
        box = backend.create()
        rng = random.Random(7)
        reasons, invalid = set(), 0
        # DoorKey: keys, locked doors, pickup/toggle/drop; Empty: the goal, MiniGrid's reward
        for gym_id, turns, seeds in (("MiniGrid-DoorKey-5x5-v0", 40, (0, 1, 2)), (EMPTY, 12, (3,))):
            kw = dict(gym_id=gym_id, max_turns=turns)
            plain, boxed = fam(**kw), fam(sandboxed=True, **kw)
            assert boxed.needs_sandbox and not plain.needs_sandbox
            assert "sandbox" in boxed.describe()["execution"]
            for seed in seeds:
                inst = plain.instance("train", seed, 0)
                texts = [rng.choice(MG_TEXTS) for _ in range(turns)]
                e1, e2 = identical_play(plain, boxed, box, inst, seed, texts)
                invalid += sum(a is None for a in e1.actions)
        # the solution of Empty-5x5 (the goal's reward goes through the sandbox's arithmetic)
        plain, boxed = fam(gym_id=EMPTY, max_turns=12), fam(gym_id=EMPTY, max_turns=12, sandboxed=True)
        e1, e2 = identical_play(plain, boxed, box, plain.instance("eval", 0, 0), 0,
                                [" forward\n", "bad\n", " forward\n", " right\n", " forward\n", " forward\n"])
        assert e1.done and e1._success and 0 < e1.stats()["gym_steps"] == 6
        assert invalid >= 1
        # snapshot / restore: the same future, the sandbox's state file rewritten
        e2.reset()
        e2.step(" forward\n")
        snap = e2.snapshot()
        first = [e2.step(m) for m in (" forward\n", " right\n")]
        e2.restore(snap)
        assert [e2.step(m) for m in (" forward\n", " right\n")] == first
        # ground_truth=none still has the transition table; too many states is a clear error
        boxed = fam(gym_id=EMPTY, max_turns=12, sandboxed=True, ground_truth="none")
        identical_play(fam(gym_id=EMPTY, max_turns=12, ground_truth="none"), boxed, box, boxed.instance("train", 1, 0),
                       1, MG_TEXTS)
        tiny = fam(gym_id=EMPTY, sandboxed=True, max_states=3)
        with pytest.raises(ValueError, match="env.max_states=3"):
            tiny.make(tiny.instance("train", 0, 0), sandbox=box).reset()
        with pytest.raises(ValueError, match="needs a sandbox"):
            tiny.make(tiny.instance("train", 0, 0))
    finally:
        backend.close()


def test_sandbox_fault_ends_the_episode(tmp_path):
    backend = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    try:
        f = fam(gym_id=EMPTY, max_turns=12, sandboxed=True)
        box = backend.create()
        env = f.make(f.instance("train", 0, 0), sandbox=box)
        env.reset()
        box.write_file("minigrid_step.py", b"import sys\nsys.exit(3)\n")
        r = env.step(" forward\n")
        assert r.done and r.reason == "sandbox_error" and r.reward == 0.0 and not r.success
    finally:
        backend.close()


def test_one_train_flow_iteration_sandboxed(tmp_path):
    """experiment=minigrid with env.sandboxed=true through the train flow: the rollout gets one
    process sandbox per episode and every sandbox directory is gone afterwards."""
    from flows.api import run_plain

    out = run_plain(["experiment=minigrid", "env.sandboxed=true", "env.max_turns=6", "iterations=1",
                     "rollout.tasks_per_iteration=2", "rollout.group_size=2", "eval_episodes=2",
                     "model.warmup_steps=2"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
    sandboxes = tmp_path / "runs" / out["run_id"] / "sandboxes"
    assert sandboxes.is_dir() and list(sandboxes.rglob("*")) == []
