"""MiniGrid family: egocentric text view, actions by name, invalid actions (MiniGrid's no-op),
exact ground truth by BFS + DP (a hand computation of the optimal value; exhaustive MC with real
MiniGrid episodes under the uniform policy), seeds and splits, snapshots, config rules.

Not here: a sandboxed-vs-in-process identity test. MiniGrid needs gymnasium and minigrid inside
the sandbox, whose interpreter is the system python3 with the standard library only (process
backend under bubblewrap, docker image), so the family runs in-process (``needs_sandbox`` False)."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.tasks.minigrid_env import ACTIONS, DONE, MiniGridConfig, MiniGridFamily
from flows.config import ConfigError, load_config
from stages.credit.decision_tree import TaskProfile

EMPTY = "MiniGrid-Empty-5x5-v0"


def fam(**kw) -> MiniGridFamily:
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
