"""The Sokoban family: dynamics by hand, the generator, the exact solver and its ground truth
(against exhaustive enumeration and Monte Carlo), deadlocks, the oracle's deterministic MDPs,
the sandboxed mode, one iteration of the train flow."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from environments.base import TaskInstance
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks import sokoban_rules as rules
from environments.tasks import sokoban_solver as solver
from environments.tasks.sokoban import SandboxedSokobanEnv, SokobanConfig, SokobanFamily, level_split
from stages.benchmark.oracle import played_advantages, policy_values, stack_mdps
from stages.config_fields import check_dataclass

# player (1,1), box (2,2), target (4,4): 4 pushes and 3 repositioning moves, optimal 7 (by hand:
# the first push needs 1 move to reach the box, turning from right- to down-pushes 2)
OPEN = ["#######",
        "#P____#",
        "#_X___#",
        "#_____#",
        "#___O_#",
        "#######"]
# player (1,1), box (2,2), target (3,2): "right, down" solves it; pushing the box left, right
# or up deadlocks it (against a wall away from the target)
TINY = ["#####",
        "#P__#",
        "#_X_#",
        "#_O_#",
        "#####"]


def family(rows=None, **kw) -> tuple[SokobanFamily, TaskInstance]:
    fam = SokobanFamily(SokobanConfig(**kw))
    inst = TaskInstance("hand", "train", 0, {"rows": rows}) if rows is not None else None
    return fam, inst


def play(env, moves):
    return [env.step(f" {m}\n" if m in rules.ACTIONS else m) for m in moves]


# ----------------------------------------------------------------------------- dynamics


def test_moves_walls_pushes_by_hand():
    fam, inst = family(OPEN, max_turns=20)
    env = fam.make(inst)
    prompt = env.reset()
    assert prompt.endswith("#P____#\n#_X___#\n#_____#\n#___O_#\n#######\nt1:") and "Legend: # wall" in prompt
    r = env.step(" up\n")  # into the wall: valid, nothing moves
    assert r.action == "up" and r.info["valid"] and not r.info["pushed"] and r.observation.startswith("#######\n#P____#")
    assert r.observation.endswith("\nt2:") and not r.done and r.reward == 0.0
    r = env.step("Right")  # lenient parse; no newline -> the observation starts on a fresh line
    assert r.action == "right" and r.observation.startswith("\n#######\n#_P___#")
    r = env.step(" down\n")  # pushes the box from (2,2) to (3,2)
    assert r.info["pushed"] and r.observation.startswith("#######\n#_____#\n#_P___#\n#_X___#")
    r = env.step("<answer>Down</answer>\n")  # RAGEN's wrapper; box (3,2) -> (4,2)
    assert r.action == "down" and "#_X_O_#" in r.observation
    r = env.step(" down\n")  # box against the bottom wall: nothing moves
    assert not r.info["pushed"] and "#_P___#" in r.observation.split("\n")[3]
    r = env.step(" jump\n")
    assert r.action is None and r.info["invalid_reason"] == "not one of up, down, left, right"
    assert r.observation.startswith("invalid action: not one of up, down, left, right\n#######") and not r.done
    assert env.step("\n").info["invalid_reason"] == "empty action"
    # player onto the target: S
    play(env, ["right", "down"])  # the player (3,2) -> (3,3) -> (4,3), then onto the target (4,4)
    r = env.step(" right\n")
    assert "#_X_S_#" in r.observation
    assert env.stats()["invalid_actions"] == 2.0 and env.stats()["pushes"] == 2.0


def test_box_into_box_and_box_on_target_and_success():
    rows = ["#######",
            "#PXX_O#",
            "#####O#",
            "#######"]
    fam, inst = family(rows, max_turns=5)
    env = fam.make(inst)
    env.reset()
    r = env.step(" right\n")  # a box behind the box: nothing moves
    assert not r.info["pushed"] and r.observation.startswith("#######\n#PXX_O#")
    rows2 = ["######", "#PX_O#", "######"]
    fam2, inst2 = family(rows2, max_turns=5)
    env = fam2.make(inst2)
    env.reset()
    r1, r2 = play(env, ["right", "right"])
    assert r1.info["pushed"] and r1.observation.startswith("######\n#_PXO#")
    assert r2.done and r2.success and r2.reward == 1.0 and r2.info["terminal_reward"] == 1.0
    assert r2.reason == "success" and r2.observation == "######\n#__P*#\n######\ndone: success"
    with pytest.raises(RuntimeError, match="is over"):
        env.step(" up\n")
    env.reset()
    rs = play(env, ["left"] * 5)
    assert rs[-1].done and not rs[-1].success and rs[-1].reason == "max_turns" and rs[-1].observation.endswith("done: failure")


def test_rules_reject_malformed_levels():
    for rows, msg in ((["###", "#P#"], "at least 3 rows"), (["####", "#PX#", "####"], "as many targets"),
                      (["#####", "#PPX#", "#O__#", "#####"], "exactly one player"), (["#####", "#PXO_", "#####"], "border")):
        with pytest.raises(ValueError, match=msg):
            rules.parse_level(rows)


# ----------------------------------------------------------------------------- generator


def test_generator_is_reproducible_split_disjoint_and_clean():
    a = SokobanFamily(SokobanConfig(train_size=8))
    b = SokobanFamily(SokobanConfig(train_size=8))
    state = random.getstate(), np.random.get_state()[1].copy()
    train = a.instances("train", 12, seed=3)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])  # globals untouched
    assert [i.spec["rows"] for i in train] == [i.spec["rows"] for i in b.instances("train", 12, seed=3)]
    assert [i.spec["rows"] for i in train] != [i.spec["rows"] for i in a.instances("train", 12, seed=4)]
    ev = a.instances("eval", 12, seed=3)
    assert all(level_split(i.spec["rows"]) == "train" for i in train) and all(level_split(i.spec["rows"]) == "eval" for i in ev)
    assert not {tuple(i.spec["rows"]) for i in train} & {tuple(i.spec["rows"]) for i in ev}
    for inst in train:
        rows = inst.spec["rows"]
        assert len(rows) == 6 and all(len(r) == 6 for r in rows)
        w, h, walls, targets, (p, boxes) = rules.parse_level(rows)
        assert len(boxes) == 1 and not rules.is_solved(targets, (p, boxes))
        assert 1 <= inst.spec["optimal_length"] <= 10  # max_solution_length defaults to max_turns
    c = SokobanFamily(SokobanConfig(min_solution_length=4, max_solution_length=6))
    assert all(4 <= i.spec["optimal_length"] <= 6 for i in c.instances("train", 8, 0))
    # gym-sokoban's room_utils is loaded without its package __init__ (which imports the old gym)
    code = ("import sys; from environments.tasks.sokoban import SokobanFamily; SokobanFamily().instances('train', 2, 0); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gym', 'gym_sokoban', 'pkg_resources')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


def test_config_rules():
    for kw, key in (({"num_boxes": 5}, "num_boxes"), ({"max_turns": 5, "max_solution_length": 6}, "max_solution_length"),
                    ({"dim": 4}, "dim"), ({"reference_policy": "greedy"}, "reference_policy"),
                    ({"min_solution_length": 12}, "min_solution_length")):
        with pytest.raises(ValueError, match=f"env.{key}="):
            check_dataclass(SokobanConfig(**kw), "env")
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^env.num_boxes=9: must be an integer >= 1 and <= 4$"):
        load_config(["env=sokoban", "env.num_boxes=9"])
    assert load_config(["env=sokoban", "credit=oracle"]).env.name == "sokoban"  # exact MDP: the oracle is allowed


# ----------------------------------------------------------------------------- solver, ground truth


def test_solver_optimal_length_and_plan_on_a_hand_made_level():
    space = solver.enumerate_space(OPEN)
    assert space.optimal_length(0) == 7
    fam, inst = family(OPEN, max_turns=7)
    plan = fam.optimal_plan(inst)
    assert len(plan) == 7
    env = fam.make(inst)
    env.reset()
    assert play(env, plan)[-1].success  # the scripted optimal agent solves it in exactly 7 moves
    assert env.privileged()["optimal_plan"] == plan
    # with one turn fewer the level is out of reach: every value is 0 under the optimal policy too
    V, _ = solver.finite_horizon_values(space, 6, "optimal")
    assert V[0, 0] == 0.0
    V, _ = solver.finite_horizon_values(space, 7, "optimal")
    assert V[0, 0] == 1.0
    # the corridor: three pushes, no detour
    assert solver.enumerate_space(["#######", "#P_X_O#", "#######"]).optimal_length(0) == 3


def test_deadlock_detection_and_decisive_turns():
    fam, inst = family(OPEN, max_turns=16)
    env = fam.make(inst)
    env.reset()
    # down, down, right: below the box; up pushes it against the top wall (the target is on row 4)
    rs = play(env, ["down", "down", "right", "up"])
    assert [r.info["deadlock"] for r in rs] == [False, False, False, True]
    assert rs[3].info["new_deadlock"] and rs[3].info["pushed"]
    more = play(env, ["left"] * 12)
    assert more[-1].done and more[-1].reason == "deadlock" and not any(r.info["new_deadlock"] for r in more)
    st = env.stats()
    assert st["deadlock"] == 1.0 and st["deadlock_turn"] == 3.0 and st["optimal_length"] == 7.0
    gt = env.ground_truth(env.actions)
    # turn 3 (below the box) is decisive: "up" deadlocks; the start is not (no move there pushes)
    assert gt.decisive[:4] == [False, False, False, True]
    assert gt.q_value[3] == 0.0 and gt.advantage[3] < 0
    assert all(v == 0.0 for v in gt.value[4:]) and all(a == 0.0 for a in gt.advantage[4:])
    # an episode that avoids the mistake: the decisive turn is still marked
    env.reset()
    play(env, ["down", "down", "right", "right"])
    gt2 = env.ground_truth(env.actions)
    assert gt2.decisive[3] and gt2.q_value[3] > 0 and gt2.advantage[3] > gt.advantage[3]
    assert env.stats()["deadlock"] == 0.0
    # on TINY every push but "down" deadlocks: left of the box is decisive ("right" deadlocks),
    # above it is not (its only push solves the level)
    sp = solver.enumerate_space(TINY)
    assert sp.optimal_length(0) == 2 and not sp.decisive[0]
    above, left_of = sp.index[(1 * 5 + 2, (2 * 5 + 2,))], sp.index[(2 * 5 + 1, (2 * 5 + 2,))]
    assert not sp.decisive[above] and sp.next_state[above, rules.ACTIONS.index("down")] == sp.end
    assert sp.decisive[left_of] and sp.deadlocked[sp.next_state[left_of, rules.ACTIONS.index("right")]]


def _uniform_return(env, rng, horizon):
    ret = 0.0
    for _ in range(horizon):
        r = env.step(f" {rng.choice(rules.ACTIONS)}\n")
        ret += r.reward
        if r.done:
            break
    return ret


def test_dp_values_equal_exhaustive_enumeration_and_monte_carlo():
    H = 6
    fam, inst = family(TINY, max_turns=H)
    env = fam.make(inst)
    tab = fam.tables(TINY)
    # exhaustive: every one of the 4^H move sequences through the real environment, equally likely
    total = 0.0
    for seq in itertools.product(rules.ACTIONS, repeat=H):
        env.reset()
        for m in seq:
            r = env.step(f" {m}\n")
            total += r.reward
            if r.done:
                break
    assert total / 4**H == pytest.approx(tab.V[0, 0], abs=1e-12)
    # Monte Carlo from the start and from a mid-episode state (snapshot/restore), within 4 standard errors
    rng = random.Random(0)
    env.reset()
    play(env, ["down"])  # left of the box at t=1
    snap = env.snapshot()
    s1 = tab.space.index[env._state]
    for t, s, start in ((0, 0, None), (1, s1, snap)):
        rets = []
        for _ in range(3000):
            env.reset()
            if start is not None:
                env.restore(start)
            rets.append(_uniform_return(env, rng, H - t))
        mean, se = float(np.mean(rets)), float(np.std(rets) / np.sqrt(len(rets)))
        assert 0 < tab.V[t, s] < 1 and abs(mean - tab.V[t, s]) < 4 * se + 1e-9, (t, mean, se, tab.V[t, s])
    # the stored advantages are Q - V of the replayed states
    env.reset()
    play(env, ["right", "left", "jump", "right", "down"])
    gt = env.ground_truth(env.actions)
    assert gt.reference_policy == "uniform" and len(gt.value) == 5
    assert gt.advantage[-1] == pytest.approx(1.0 - gt.value[-1]) and gt.q_value[-1] == 1.0
    assert gt.q_value[2] == pytest.approx(tab.V[3, tab.space.index[(1 * 5 + 1, (2 * 5 + 2,))]])  # invalid: stays


def test_oracle_dp_on_the_exported_mdp_matches_the_ground_truth():
    """The deterministic next-state MDP through stages.benchmark.oracle (padded to the batch's
    largest state count) gives the stored uniform advantages, and equals the dense form."""
    fam = SokobanFamily(SokobanConfig(max_turns=6))
    insts = fam.instances("train", 3, 0)
    trajs, played = [], []
    rng = random.Random(1)
    for inst in insts:
        env = fam.make(inst)
        env.reset()
        while True:
            r = env.step(rng.choice([" up\n", " down\n", " left\n", " right\n", "x\n"]))
            if r.done:
                break
        trajs.append(env.ground_truth(env.actions))
        played.append([solver.ACTION_COLUMNS.index(a) for a in env.actions])
    assert len({g.mdp.num_states for g in trajs}) > 1  # padding is exercised
    mdps = [g.mdp for g in trajs]
    B, H, A = len(mdps), 6, 5
    probs = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0], dtype=torch.float64).expand(B, H, A)
    V, Q = policy_values(stack_mdps(mdps), probs)
    states = torch.full((B, H), -1, dtype=torch.long)
    actions = torch.full((B, H), -1, dtype=torch.long)
    for b, (g, cols) in enumerate(zip(trajs, played)):
        states[b, : len(cols)] = torch.tensor(g.mdp.states)
        actions[b, : len(cols)] = torch.tensor(cols)
    adv = played_advantages(V, Q, states, actions)
    for b, g in enumerate(trajs):
        n = len(g.advantage)
        assert torch.allclose(adv[b, :n], torch.tensor(g.advantage, dtype=torch.float64), atol=1e-12)
    # the dense transition form of the first MDP gives the same V and Q
    m = mdps[0]
    S = m.num_states
    dense = [[[[1.0 if n == m.next_state[t][s][a] else 0.0 for n in range(S)] for a in range(A)] for s in range(S)]
             for t in range(H)]
    m_dense = replace(m, transition=dense, next_state=None)
    Vd, Qd = policy_values(stack_mdps([m_dense]), probs[:1])
    V1, Q1 = policy_values(stack_mdps([m]), probs[:1])
    assert torch.allclose(Vd, V1) and torch.allclose(Qd, Q1)
    # the MDP pickles compactly: the per-turn tables are one object repeated
    import pickle
    assert len(pickle.dumps(m)) < 3 * len(pickle.dumps((m.reward[0], m.next_state[0])))


# ----------------------------------------------------------------------------- sandboxed mode


@pytest.fixture
def backend(tmp_path):
    b = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    yield b
    b.close()


def test_sandboxed_trajectories_identical_to_in_process(backend):
    plain = SokobanFamily(SokobanConfig(max_turns=8))
    boxed = SokobanFamily(SokobanConfig(max_turns=8, sandboxed=True))
    assert boxed.needs_sandbox and not plain.needs_sandbox and SokobanFamily.needs_sandbox is False
    with pytest.raises(ValueError, match="needs a sandbox"):
        boxed.make(boxed.instances("train", 1, 0)[0])
    rng = random.Random(5)
    choices = [" up\n", " down\n", " left\n", " right\n", "Up", "<answer>left</answer>\n", "\n", "\udcff\n", "jump\n"]
    for inst in plain.instances("train", 3, seed=2):
        e1, e2 = plain.make(inst), boxed.make(inst, backend.create())
        assert isinstance(e2, SandboxedSokobanEnv)
        assert e1.reset() == e2.reset() and e1.state_key() == e2.state_key()
        while True:
            a = rng.choice(choices)
            r1, r2 = e1.step(a), e2.step(a)
            assert r1 == r2
            if r1.done:
                break
        assert e1.ground_truth(e1.actions) == e2.ground_truth(e2.actions)
        s1, s2 = e1.stats(), e2.stats()
        assert s2.pop("sandbox_execs") == len(e1.actions) and s2.pop("sandbox_seconds") > 0 and s1 == s2
        # snapshot / restore into the sandbox: the same future
        e1.reset(), e2.reset()
        play(e1, ["down"]), play(e2, ["down"])
        snap = e2.snapshot()
        assert snap == e1.snapshot() and json.loads(json.dumps(snap)) == snap
        play(e2, ["left", "left"])
        e2.restore(snap)
        assert e1.step(" right\n") == e2.step(" right\n")


def test_sandbox_faults_end_the_episode(backend):
    fam = SokobanFamily(SokobanConfig(sandboxed=True))
    inst = fam.instances("train", 1, 0)[0]
    box = backend.create()
    env = fam.make(inst, box)
    env.reset()
    box.write_file("sokoban_rules.py", b"import sys\nsys.exit(3)\n")
    r = env.step(" up\n")
    assert r.done and r.reason == "sandbox_error" and r.reward == 0.0 and not r.success
    box = backend.create()
    env = fam.make(inst, box)
    env.reset()
    box.close()
    r = env.step(" up\n")
    assert r.done and r.reason == "sandbox_error" and r.info["terminal_reward"] == 0.0


# ----------------------------------------------------------------------------- family surface


def test_describe_profile_warmup():
    from stages.credit.decision_tree import TaskProfile, recommend

    fam = SokobanFamily(SokobanConfig())
    d = fam.describe()
    assert {"source", "size", "filtering", "metric", "ground_truth", "text_protocol"} <= set(d)
    assert recommend(TaskProfile.from_dict(fam.profile()), top_k=3)
    corpus = fam.warmup_corpus(6, seed=0)
    assert len(corpus) == 6
    for prompt, turns in corpus:
        assert prompt.endswith("\nt1:") and all(a in {f" {m}\n" for m in rules.ACTIONS} for a, _ in turns)
        assert turns[-1][1].endswith(("done: success", "done: failure"))
        assert len(turns) <= fam.cfg.max_turns


# ----------------------------------------------------------------------------- the flow


def test_one_pipeline_iteration(tmp_path):
    """One GRPO iteration through the train flow's stage bodies (flows.api.run_plain, as the other
    families' tests): the ground truth reaches the credit metrics."""
    from flows.api import run_plain

    seen = {}
    out = run_plain(["experiment=sokoban", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                     "eval_episodes=2", "model.warmup_steps=3", "env.train_size=4", "env.eval_size=2"], home=tmp_path,
                    on_iteration=lambda it, reward, credit, update: seen.update(reward=reward, credit=credit))
    assert 0.0 <= out["success_after"] <= 1.0
    batch = seen["reward"].value
    assert all(t.env_name == "sokoban" and t.ground_truth is not None and t.ground_truth.mdp is not None
               for t in batch.trajectories)
    assert all("deadlock" in t.meta and t.privileged["optimal_length"] >= 1 for t in batch.trajectories)
    assert "gt_rmse" in seen["credit"].stats
