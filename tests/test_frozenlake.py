"""FrozenLake family: exact ground truth (a hand computation; exhaustive MC with real Gymnasium
episodes), the exported MDP under the oracle's DP, invalid actions, seeds, snapshots, splits of
random maps, the sandboxed-vs-in-process identity, the config rule, one train-flow iteration."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.frozenlake import MOVES, FrozenLakeConfig, FrozenLakeFamily, map_problem
from stages.benchmark.oracle import played_advantages, policy_values, stack_mdps
from stages.credit.decision_tree import TaskProfile


def fam(**kw) -> FrozenLakeFamily:
    return FrozenLakeFamily(FrozenLakeConfig(**kw))


def play(env, texts):
    prompt = env.reset()
    out = [prompt]
    for text in texts:
        res = env.step(text)
        out.append((res.observation, res.reward, res.done, res.action, res.state_key, res.reason))
        if res.done:
            break
    return out


def test_ground_truth_equals_a_hand_computation():
    """Map "SG", not slippery, 2 turns, uniform reference: V_1(S) = 1/4 (only right reaches G),
    Q_0(S, right) = 1, Q_0(S, other) = V_1(S) = 1/4, V_0(S) = (3/4 + 1) / 4 = 7/16."""
    f = fam(map_name="custom", custom_map="SG", is_slippery=False, max_turns=2)
    env = f.make(f.instance("train", 0, 0))
    env.reset()
    env.step(" left\n")
    res = env.step(" right\n")
    assert res.done and res.success and res.reason == "success" and res.info["terminal_reward"] == 1.0
    gt = env.ground_truth(["left", "right"])
    assert gt.value == pytest.approx([7 / 16, 1 / 4])
    assert gt.q_value == pytest.approx([1 / 4, 1.0])
    assert gt.advantage == pytest.approx([1 / 4 - 7 / 16, 3 / 4])
    assert gt.decisive == [True, True]  # the moves' Q differ by 3/4 at S
    assert gt.mdp is not None and gt.mdp.states == [0, 0] and gt.mdp.actions == [*MOVES, None]


def _mc_uniform(desc, slippery, H, first_action, n, seed):
    """Exhaustive-MC estimate of Q(start, first_action) under the uniform policy with real
    Gymnasium episodes (independent of the family's DP)."""
    import gymnasium

    env = gymnasium.make("FrozenLake-v1", desc=desc, is_slippery=slippery, max_episode_steps=H)
    rng = random.Random(seed)
    total = []
    env.reset(seed=seed)
    for i in range(n):
        env.reset()
        ret, a = 0.0, first_action
        for _ in range(H):
            _, r, term, trunc, _ = env.step(a)
            ret += r
            if term or trunc:
                break
            a = rng.randrange(4)
        total.append(ret)
    env.close()
    x = np.asarray(total)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))


def test_ground_truth_equals_exhaustive_monte_carlo_on_the_slippery_lake():
    desc = ["SH", "FG"]
    f = fam(map_name="custom", custom_map="/".join(desc), is_slippery=True, max_turns=4)
    env = f.make(f.instance("train", 0, 0))
    env.reset()
    Q0 = env.tables.values.Q[0, 0, :4]
    for a in range(4):
        mean, se = _mc_uniform(desc, True, 4, a, 2000, seed=a + 1)
        assert abs(mean - Q0[a]) <= 4 * se + 1e-9, (a, mean, se, Q0[a])
    assert Q0.max() - Q0.min() > 0.1  # the actions differ (a wrong table would show)


def test_exported_mdp_reproduces_the_ground_truth_under_the_oracle_dp():
    """The oracle's DP (stages.benchmark.oracle) under the uniform policy on the exported
    TabularMDP gives the family's own ground-truth advantages."""
    f = fam(map_name="4x4", is_slippery=True, max_turns=8)
    gts, played = [], []
    for k in range(3):
        env = f.make(f.instance("train", k, 0), episode_seed=k)
        env.reset()
        rng = random.Random(k)
        while not env.done:
            env.step(f" {rng.choice(MOVES)}\n")
        played.append(list(env.actions))
        gts.append(env.ground_truth([MOVES[a] for a in env.actions]))
    mdps = [g.mdp for g in gts]
    B, H = len(mdps), mdps[0].horizon
    probs = torch.zeros(B, H, 5, dtype=torch.float64)
    probs[..., :4] = 0.25
    V, Q = policy_values(stack_mdps(mdps), probs)
    states = torch.full((B, H), -1, dtype=torch.long)
    actions = torch.full((B, H), -1, dtype=torch.long)
    for b, m in enumerate(mdps):
        states[b, : len(m.states)] = torch.tensor(m.states)
        actions[b, : len(m.states)] = torch.tensor(played[b])
    adv = played_advantages(V, Q, states, actions)
    for b, g in enumerate(gts):
        assert adv[b, : len(g.advantage)].tolist() == pytest.approx(g.advantage, abs=1e-12)
    assert any(abs(a) > 1e-3 for g in gts for a in g.advantage)


def test_invalid_actions_are_recorded_noop_and_end():
    f = fam(map_name="4x4", is_slippery=False, max_turns=5)
    env = f.make(f.instance("train", 0, 0))
    env.reset()
    res = env.step("fly away\n")
    assert res.action is None and res.info["invalid_reason"] == "unknown" and not res.done
    assert res.state_key.endswith("|t=1|s=0")  # no-op: still on the start cell
    assert env.step("\n").info["invalid_reason"] == "empty"
    assert env.step(" 2\n").action == "right"  # the index is accepted too
    gt = env.ground_truth([None, None, "right"])
    assert gt.advantage[0] == pytest.approx(gt.q_value[0] - gt.value[0])

    f = fam(map_name="4x4", is_slippery=False, max_turns=12, invalid_action="end")
    env = f.make(f.instance("train", 0, 0))
    env.reset()
    env.step(" right\n")
    res = env.step("jump\n")
    assert res.done and not res.success and res.reason == "invalid_action" and res.info["terminal_reward"] == 0.0
    gt = env.ground_truth(["right", None])
    assert gt.q_value[1] == 0.0 and gt.value[1] > 0.0  # the invalid action forfeits the episode


def test_seeds_reproducible_and_episodes_differ():
    f = fam(map_name="4x4", is_slippery=True, max_turns=12)
    inst = f.instance("train", 3, 7)
    assert inst == f.instance("train", 3, 7)
    moves = [" right\n", " down\n"] * 6
    runs = [play(f.make(inst, episode_seed=s), moves) for s in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert any(r != runs[0] for r in runs[2:])  # the slippery transitions follow the episode seed


def test_snapshot_restore_replays_the_same_future():
    f = fam(map_name="8x8", is_slippery=True, max_turns=20)
    env = f.make(f.instance("eval", 0, 0), episode_seed=5)
    env.reset()
    env.step(" down\n")
    snap = env.snapshot()
    a = [env.step(t).state_key for t in (" right\n", " down\n", " right\n") if not env.done]
    env.restore(snap)
    b = [env.step(t).state_key for t in (" right\n", " down\n", " right\n") if not env.done]
    assert a == b


def test_random_maps_split_disjoint_and_describe_profile():
    f = fam(map_name="random", random_size=4, train_size=20, eval_size=10)
    train = {"/".join(i.spec["desc"]) for i in f.instances("train", 20, 0)}
    ev = {"/".join(i.spec["desc"]) for i in f.instances("eval", 10, 0)}
    assert train and ev and not train & ev
    d = f.describe()
    assert {"source", "size", "metric", "ground_truth"} <= set(d)
    assert TaskProfile(**f.profile()).stochastic
    corpus = f.warmup_corpus(3, 0)
    assert len(corpus) == 3 and all(t[0] in {f" {m}\n" for m in MOVES} for _, turns in corpus for t in turns)


def test_custom_map_rule():
    assert map_problem("SFF/FHF/FFG") is None
    assert "S, F, H or G" in map_problem("SXF/FFG")
    assert "equal" in map_problem("SFF/FG")


def test_sandboxed_trajectories_equal_in_process(tmp_path):
    backend = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    try:
        kw = dict(map_name="4x4", is_slippery=True, max_turns=8)
        plain, boxed = fam(**kw), fam(sandboxed=True, **kw)
        assert boxed.needs_sandbox and not plain.needs_sandbox
        moves = [" right\n", " down\n", "bad\n", " down\n", " right\n", " down\n", " right\n", " up\n"]
        for seed in (0, 1):
            inst = plain.instance("train", seed, 0)
            box = backend.create()
            try:
                env_b = boxed.make(inst, sandbox=box, episode_seed=seed)
                got = play(env_b, moves)
                assert env_b.stats()["sandbox_execs"] >= 1
            finally:
                box.close()
            assert got == play(plain.make(inst, episode_seed=seed), moves)
    finally:
        backend.close()


def test_one_train_flow_iteration_with_oracle_credit(tmp_path):
    from flows.api import run_plain

    out = run_plain(["experiment=frozenlake", "credit=oracle", "iterations=1", "rollout.tasks_per_iteration=2",
                     "rollout.group_size=2", "eval_episodes=2", "model.warmup_steps=2"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
