"""MiniGrid with varying layouts (issue 16): layouts split by hash so train and eval never share
one, exact ground truth per layout checked against MC with real MiniGrid episodes on
KeyCorridor / DoorKey / MultiRoom (whose success tests object identity or needs a key and a door),
the MC ground truth (``env.ground_truth=mc|auto``) against the exact one, the config refusals, the
sandboxed table on varying layouts, and one train-flow iteration of ``experiment=minigrid_random``."""

from __future__ import annotations

import random

import gymnasium
import numpy as np
import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.minigrid_env import ACTIONS, MiniGridConfig, MiniGridFamily
from environments.tasks.minigrid_gt import layout_key, true_state
from flows.config import ConfigError, load_config
from tests.test_minigrid import _mc_q, identical_play

KC, DK, MR, ER = ("MiniGrid-KeyCorridorS3R1-v0", "MiniGrid-DoorKey-5x5-v0", "MiniGrid-MultiRoom-N2-S4-v0",
                  "MiniGrid-Empty-Random-5x5-v0")


def se_bound(se, value, n: int):
    """The sample SE, or the binomial SE under the exact ``value`` when larger (returns lie in
    [0, 1]; a rare success gives a zero sample SE)."""
    value = np.clip(np.asarray(value, dtype=float), 0.0, 1.0)
    return np.maximum(np.asarray(se, dtype=float), np.sqrt(value * (1 - value) / n))


def fam(**kw) -> MiniGridFamily:
    return MiniGridFamily(MiniGridConfig(**kw))


def optimal_plan(gym_id: str, inst, max_turns: int = 60, tab=None) -> list[str]:
    """The shortest plan of ``inst`` from the exact optimal-policy tables (greedy in Q)."""
    tab = tab or fam(gym_id=gym_id, max_turns=max_turns, reference_policy="optimal").tables_for(inst)
    s, plan = 0, []
    for t in range(max_turns):
        a = int(np.argmax(tab.values.Q[t, s, : len(ACTIONS)]))
        plan.append(ACTIONS[a])
        if tab.success[s, a]:
            return plan
        s = int(tab.next[s, a])
    raise AssertionError(f"{gym_id}: no plan within {max_turns} turns")


def test_train_and_eval_never_share_a_layout():
    for gym_id in (ER, DK, KC):
        f = fam(gym_id=gym_id, ground_truth="none")
        train = {i.spec["layout"] for i in f.instances("train", 96, 0)}
        ev = {i.spec["layout"] for i in f.instances("eval", 32, 0)}
        assert len(train) > 1 and len(ev) > 1 and not train & ev, gym_id
        warm = {f.instance("warmup", i, 0).spec["layout"] for i in range(8)}
        assert all(f.layout_split(k) == "train" for k in warm)  # the warm-up never sees eval layouts
        for inst in f.instances("eval", 3, 0):  # the spec's layout is the real reset's
            env = f.make(inst)
            env.reset()
            assert layout_key(env.unwrapped) == inst.spec["layout"]
    # the degenerate split (disjoint seeds only) does share layouts on a small layout space
    f = fam(gym_id=ER, split_by="seed", ground_truth="none")
    assert {i.spec["layout"] for i in f.instances("train", 96, 0)} & {i.spec["layout"] for i in f.instances("eval", 32, 0)}


def test_config_refusals_are_one_line():
    cases = [
        (["env.gym_id=MiniGrid-Empty-5x5-v0"], r"^env.split_by=layout: MiniGrid-Empty-5x5-v0 gave 1 distinct layout"),
        (["env.gym_id=MiniGrid-Dynamic-Obstacles-5x5-v0", "env.split_by=seed"], r"^env.ground_truth=exact: must be none"),
        (["env.gym_id=MiniGrid-ObstructedMaze-1Dl-v0", "env.split_by=seed"], r"^env.ground_truth=exact: cannot be exact"),
        (["env.ground_truth=mc", "env.reference_policy=optimal"], r"^env.reference_policy=optimal: must be uniform"),
    ]
    for extra, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as err:
            load_config(["env=minigrid", *extra])
        assert "\n" not in str(err.value)
    load_config(["env=minigrid", "env.gym_id=MiniGrid-ObstructedMaze-1Dl-v0", "env.split_by=seed", "env.ground_truth=mc"])


@pytest.mark.parametrize("gym_id", [KC, DK, MR])
def test_exact_ground_truth_equals_monte_carlo_on_varying_layouts(gym_id):
    """Two moves before the goal of an eval layout's shortest plan, with 6 turns left: the exact
    uniform-policy Q of the plan's move and of the worst move equal MC estimates from real MiniGrid
    episodes (deep copies of an independently made env, observations rendered) within 4 SE.
    KeyCorridor tests success by object identity (``carrying == self.obj``): the old decoded-grid
    BFS never reached it there (V = 0 everywhere)."""
    f = fam(gym_id=gym_id, max_turns=60, reference_policy="optimal")
    inst = f.instances("eval", 1, 0)[0]
    best = f.tables_for(inst)
    plan = optimal_plan(gym_id, inst, tab=best)
    assert best.values.V[0, 0] > 0.5  # the goal is reachable and rewarded (the old BFS: 0 on KeyCorridor)
    k = len(plan) - 2
    H = k + 6
    f = fam(gym_id=gym_id, max_turns=H)
    tab = f.tables_for(inst)
    base = gymnasium.make(gym_id).unwrapped
    base.reset(seed=inst.spec["reset_seed"])
    assert layout_key(base) == inst.spec["layout"]
    for a in plan[:k]:
        base.step(ACTIONS.index(a))
    s = tab.index[true_state(base)]
    Q = tab.values.Q[k, s, : len(ACTIONS)]
    worst = ACTIONS[int(np.argmin(Q))]
    for name in (plan[k], worst):
        a = ACTIONS.index(name)
        mean, se = _mc_q(base, H - k, a, 300, seed=a)
        bound = float(se_bound(se, Q[a], 300))
        assert abs(mean - Q[a]) <= 4 * bound + 1e-9, (gym_id, name, mean, se, Q[a])
    assert Q[ACTIONS.index(plan[k])] > Q[ACTIONS.index(worst)] + 0.05  # distinguishable


def test_mc_ground_truth_equals_exact_within_standard_error():
    """DoorKey-5x5, an eval layout: its shortest plan with an invalid action and a wasted turn
    inserted; the MC values (300 rollouts per turn) equal the exact ones within 4 SE at every
    turn, their cost is recorded; ``auto`` falls back to MC past ``env.max_states``."""
    H = 24
    exact, mc = fam(gym_id=DK, max_turns=H), fam(gym_id=DK, max_turns=H, ground_truth="mc", gt_rollouts=300)
    inst = exact.instances("eval", 2, 0)[1]
    plan = optimal_plan(DK, inst)
    texts = [f" {a}\n" for a in plan[:2]] + ["jump\n", " left\n", " right\n"] + [f" {a}\n" for a in plan[2:]]
    envs = [exact.make(inst, episode_seed=1), mc.make(inst, episode_seed=1)]
    for env in envs:
        env.reset()
        for text in texts:
            if env.step(text).done:
                break
        assert env._success
    g_exact, g_mc = (env.ground_truth(env.actions) for env in envs)
    n = len(g_exact.value)
    assert n == len(texts) and len(g_mc.value) == n and len(g_mc.value_se) == n + 1
    se = np.asarray(g_mc.value_se[:n])
    assert np.all(np.abs(np.asarray(g_mc.value) - g_exact.value) <= 4 * se_bound(se, g_exact.value, 300) + 1e-9)
    adv_bound = np.hypot(se_bound(se, g_exact.value, 300), se_bound(g_mc.value_se[1:], g_exact.value[1:] + [0.0], 300))
    assert np.all(np.abs(np.asarray(g_mc.advantage) - g_exact.advantage) <= 4 * adv_bound + 1e-9)
    assert g_mc.q_value[-1] == pytest.approx(g_exact.q_value[-1])  # the last move's reward is the real one
    assert max(g_exact.value) > 0.3 and se.max() > 0  # informative: values far from 0, estimates noisy
    stats = envs[1].stats()
    assert stats["gt_mc_rollouts"] == 300 * n and stats["gt_mc_env_steps"] > stats["gt_mc_rollouts"]
    assert stats["gt_mc_seconds"] > 0 and "gt_states" not in stats
    assert envs[0].stats()["gt_states"] > 0
    # auto: exact where the layout has at most env.max_states states, else MC; exact alone: missing
    auto = fam(gym_id=DK, max_turns=H, ground_truth="auto", max_states=10, gt_rollouts=4)
    only = fam(gym_id=DK, max_turns=H, max_states=10)
    for f, kind in ((auto, "mc"), (only, None)):
        env = f.make(inst)
        env.reset()
        env.step(" left\n")
        gt = env.ground_truth(env.actions)
        assert (gt is None) if kind is None else gt.reference_policy.startswith("uniform (mc")
        assert env.stats()["gt_missing"] == float(kind is None)


def test_sandboxed_table_equals_in_process_on_varying_layouts(tmp_path):
    """The exported BFS table stepped in a process sandbox on eval layouts of KeyCorridor and
    MultiRoom: the shortest plan (its success reward computed by the sandbox's script) with
    invalid texts inserted, identical to in-process play."""
    backend = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    try:
        box = backend.create()
        for gym_id in (KC, MR):
            kw = dict(gym_id=gym_id, max_turns=40)
            plain, boxed = fam(**kw), fam(sandboxed=True, **kw)
            inst = plain.instances("eval", 1, 0)[0]
            plan = [f" {a}\n" for a in optimal_plan(gym_id, inst)]
            texts = plan[:1] + ["jump\n", "\n"] + plan[1:]
            e1, _ = identical_play(plain, boxed, box, inst, 3, texts)
            assert e1._success
            rng = random.Random(5)
            identical_play(plain, boxed, box, plain.instances("train", 2, 0)[1], 4,
                           [f" {rng.choice(ACTIONS)}\n" for _ in range(8)])
    finally:
        backend.close()


@pytest.mark.slow  # one flow iteration: ~85 s here under load (model, warm-up, two evals)
def test_one_train_flow_iteration_on_varying_layouts(prefect_harness, shared_home):
    """``experiment=minigrid_random`` (Empty-Random-5x5, layouts split by hash) for one iteration
    through the train flow: the run finishes and the ground-truth credit metrics are logged."""
    from flows import api

    out = api.start_run(["experiment=minigrid_random", "iterations=1", "rollout.tasks_per_iteration=2",
                         "rollout.group_size=2", "eval_episodes=2", "model.warmup_steps=2", "env.max_turns=6",
                         "tracking.heatmap_every=0"], home=shared_home, progress=False)
    run = api.tracker_for(shared_home).client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["env.split_by"] == "layout"
    assert run.data.params["env.gym_id"] == ER
    assert any(k.startswith("credit.gt_") for k in run.data.metrics)
    assert 0.0 <= out["success_after"] <= 1.0
