"""Text games on TextWorld Express (env=textgame): games reproducible by seed and disjoint splits,
the command protocol (invalid commands recorded), gold paths solve the games, snapshots by replay,
Monte Carlo ground truth against an exhaustive computation, the long configuration's >= 50 turns,
config errors, no JVM chatter, and one iteration through the Prefect train flow."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from environments.tasks import textgame_twx as twx
from environments.tasks.textgame import (
    MCGroundTruth,
    TextGameConfig,
    TextGameFamily,
    exhaustive_value,
    mc_value,
    _Replayer,
)
from stages.credit.decision_tree import TaskProfile

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="no Java runtime on PATH: TextWorld Express runs its games in a JVM (infra/ensure_system.sh installs default-jre-headless)")

ROOT = Path(__file__).resolve().parent.parent


def _fam(**kw) -> TextGameFamily:
    return TextGameFamily(TextGameConfig(**kw))


def _play(env, commands):
    prompt = env.reset()
    out = [prompt]
    res = None
    for c in commands:
        res = env.step(c)
        out.append(res.observation)
        if res.done:
            break
    return out, res


def test_family_registered_profile_and_describe():
    fam = _fam()
    assert get_family_class("textgame") is TextGameFamily and not fam.needs_sandbox
    TaskProfile.from_dict(fam.profile())
    d = fam.describe()
    assert {"source", "size", "filtering", "metric", "ground_truth", "text_protocol", "execution"} <= set(d)


def test_games_reproducible_by_seed_and_splits_disjoint():
    a, b = _fam(), _fam()
    train = a.instances("train", 40, 3)
    assert [i.spec for i in train] == [i.spec for i in b.instances("train", 40, 3)]
    assert [i.spec for i in train] != [i.spec for i in a.instances("train", 40, 4)]  # the run seed matters
    ev = a.instances("eval", 40, 3)
    assert {i.spec["fold"] for i in train} == {"train"} and {i.spec["fold"] for i in ev} == {"dev"}
    assert {i.spec["game_seed"] for i in train}.isdisjoint({i.spec["game_seed"] for i in ev})
    # the same game replays exactly (texts, rewards, state keys), whatever the episode seed
    rng = random.Random(0)
    e1, e2 = a.make(train[0], episode_seed=1), b.make(train[0], episode_seed=2)
    e1.reset()
    cmds = []
    for _ in range(5):
        cmds.append(rng.choice(e1.valid) + "\n")
        if e1.step(cmds[-1]).done:
            break
    assert _play(a.make(train[0]), cmds)[0] == _play(e2, cmds)[0]
    assert _play(e1, cmds)[0] == _play(e2, cmds)[0] and e1.state_key() == e2.state_key()
    assert _play(a.make(train[1]), [])[0] != _play(e1, [])[0]
    for e in (e1, e2):
        e.close()


def test_invalid_commands_recorded_and_command_format():
    fam = _fam()
    env = fam.make(fam.instance("train", 0, 0))
    env.reset()
    key = env.state_key()
    for text, why in (("dance wildly\n", "not a valid action"), ("\n", "empty"), (b"\xff\xfe", "not a valid action"),
                      (None, "empty")):
        res = env.step(text)
        assert res.action is None and res.info["invalid_reason"] == why and not res.done
        assert res.observation.lstrip("\n").startswith(f"Unknown action: {why}.")
    assert env.state_key().split("|t=")[1].split("|")[1] == key.split("|t=")[1].split("|")[1]  # state unchanged
    assert env.snapshot()["t"] == 4 and env.snapshot()["actions"] == []  # the turns were used up, nothing sent
    take = next(a for a in env.valid if a.startswith("take "))
    res = env.step("  " + take.upper().replace(" ", "   ") + "  \n")  # case and whitespace do not matter
    assert res.action == take and res.info["valid"] and res.observation.endswith("\n> ")
    assert "Actions: " in res.observation
    res = env.step("look around")  # no newline at the end: the observation starts on a fresh line
    assert res.observation.startswith("\n") and res.action == "look around"
    assert not env.step("inventory\n").done
    res = env.step("look around\n")  # max_steps=8 reached
    assert res.done and res.reason == "max_turns" and res.info["terminal_reward"] == 0.0
    assert res.observation.endswith("done: failure")
    with pytest.raises(RuntimeError):
        env.step("look around\n")
    env.close()


@pytest.mark.parametrize("game,params", [
    ("twc", "numLocations=1,numItemsToPutAway=1,includeDoors=0"),
    ("twc", "numLocations=3,numItemsToPutAway=4,includeDoors=0"),
    ("cookingworld", "numLocations=2,numIngredients=2,numDistractorItems=0,includeDoors=0,limitInventorySize=0"),
    ("coin", "numLocations=4,numDistractorItems=0,includeDoors=0"),
    ("mapreader", "numLocations=4,maxDistanceApart=3,includeDoors=0,maxDistractorItemsPerLocation=0"),
])
def test_gold_path_solves_the_game(game, params):
    for reward in ("success", "score"):
        fam = _fam(game=game, params=params, max_steps=64, reward=reward)
        for inst in fam.instances("eval", 3, 0):
            env = fam.make(inst)
            env.reset()
            gold = env.privileged()["gold_path"]
            assert env.privileged()["optimal_length"] == len(gold) > 0
            ret, res = 0.0, None
            for a in gold:
                res = env.step(a + "\n")
                assert res.action == a
                ret += res.reward
                if res.done:
                    break
            assert res.done and res.success and res.reason == "success" and res.observation.endswith("done: success")
            assert ret == pytest.approx(1.0) and env.privileged()["score"] == pytest.approx(1.0)
            if reward == "success":
                assert res.info["terminal_reward"] == 1.0
            # cookingworld exposes its object tree: the state key is the true state
            assert ("|tree=" in res.state_key) == (game == "cookingworld")
            env.close()


def test_snapshot_restore_replays():
    fam = _fam(game="cookingworld", params="numLocations=2,numIngredients=1,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
               max_steps=30)
    inst = fam.instance("train", 2, 0)
    env = fam.make(inst)
    env.reset()
    rng = random.Random(1)
    for _ in range(4):
        env.step(rng.choice(env.valid) + "\n")
    env.step("nonsense\n")
    snap, key = env.snapshot(), env.state_key()
    nxt = rng.choice(env.valid) + "\n"
    want = env.step(nxt)
    other = fam.make(inst)
    other.restore(snap)
    assert other.state_key() == key
    got = other.step(nxt)
    assert (got.observation, got.state_key, got.reward) == (want.observation, want.state_key, want.reward)
    assert other.stats()["env_resets"] == 1 and other.stats()["engine_steps"] == 5
    env.close()
    other.close()


def test_mc_ground_truth_matches_exhaustive_within_standard_error():
    """V under the uniform policy over validActions: the Monte Carlo estimate (restored by replay)
    agrees with the exact value by enumeration within 4 standard errors; the episode's ground truth
    has Q = r + V(next), A = Q - V, its standard errors and cost."""
    cfg = TextGameConfig(game="coin", params="numLocations=2,numDistractorItems=0,includeDoors=0", max_steps=3,
                         ground_truth="mc", gt_rollouts=200)
    fam = TextGameFamily(cfg)
    checked = 0
    for inst in fam.instances("train", 4, 0):
        rep = _Replayer(inst.spec, cfg)
        try:
            exact = exhaustive_value(rep, [], 3, 10_000)
            mean, se = mc_value(rep, [], 3, 200, random.Random(7))
        finally:
            rep.close()
        assert 0.0 < exact < 1.0 and se > 0
        assert abs(mean - exact) <= 4 * se
        checked += 1
    assert checked == 4
    env = fam.make(fam.instance("train", 0, 0))
    env.reset()
    acts = []
    for cmd in ("nonsense\n", "look around\n", "inventory\n"):
        acts.append(env.step(cmd).action)
    gt = env.ground_truth(acts)
    assert isinstance(gt, MCGroundTruth) and len(gt.advantage) == 3 and gt.rollouts == 200 * 3  # none after the last turn: nothing is left
    for t in range(3):
        assert gt.advantage[t] == pytest.approx(gt.q_value[t] - gt.value[t])
    assert gt.q_value[2] == 0.0  # after the last turn nothing is left
    assert len(gt.value_se) == 4 and all(s >= 0 for s in gt.value_se + gt.advantage_stderr)
    st = env.stats()
    assert st["gt_mc_continuations"] == 600 and st["gt_mc_env_steps"] > 600
    exact_env = TextGameFamily(TextGameConfig(**{**OmegaConf.to_container(OmegaConf.structured(cfg)),
                                                 "ground_truth": "exhaustive"})).make(fam.instance("train", 0, 0))
    exact_env.reset()
    for cmd in ("nonsense\n", "look around\n", "inventory\n"):
        exact_env.step(cmd)
    ex = exact_env.ground_truth(acts)
    for t in range(3):
        assert abs(gt.value[t] - ex.value[t]) <= 4 * gt.value_se[t] + 1e-12
    assert _fam().make(fam.instance("train", 0, 0)).ground_truth(acts) is None  # env.ground_truth=none
    for e in (env, exact_env):
        e.close()


def test_long_config_reaches_50_turns():
    node = OmegaConf.load(ROOT / "configs" / "env" / "textgame_long.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TextGameConfig), node))
    fam = TextGameFamily(cfg)
    assert cfg.max_steps >= 50
    rng = random.Random(0)
    for inst in fam.instances("train", 2, 0):
        env = fam.make(inst)
        env.reset()
        assert env.privileged()["optimal_length"] >= 10
        turns = 0
        while True:
            res = env.step(rng.choice(env.valid) + "\n")
            turns += 1
            if res.done:
                break
        assert turns >= 50 and res.reason == "max_turns" and turns == cfg.max_steps
        env.close()


def test_config_errors_are_one_line():
    from flows.config import ConfigError, load_config

    for override, fragment in (
        ("env.game=zork", "env.game=zork: must be one of twc, cookingworld, coin, mapreader"),
        ("env.params=numLocations:2", "env.params=numLocations:2: must be a comma-separated list"),
        ("env.params=numIngredients=2", "env.params=numIngredients=2: numIngredients is not a parameter of twc"),
        ("env.params=numLocations=99", "env.params=numLocations=99: TextWorld Express refuses it: Number of locations"),
        ("env.max_steps=0", "env.max_steps=0: must be an integer >= 1"),
        ("env.eval_fold=train", "env.eval_fold=train: must be one of dev, test"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(["env=textgame", override])
        assert str(err.value).startswith(fragment) and "\n" not in str(err.value)


def test_engine_start_prints_nothing():
    code = ("from environments.tasks import textgame_twx as t\n"
            "g = t.acquire('twc', 'numLocations=1,numItemsToPutAway=1')\n"
            "g.reset(seed=0, gameFold='train', generateGoldPath=True)\n"
            "g.step('look around')\nt.release(g)\nassert t.jvm_starts() == 1\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_warmup_corpus_is_valid_random_commands():
    fam = _fam()
    corpus = fam.warmup_corpus(12, 0)
    assert corpus == fam.warmup_corpus(12, 0)
    for prompt, turns in corpus:
        assert prompt.startswith("Task: ") and prompt.endswith("\n> ")
        assert turns and all(a.endswith("\n") and not o.startswith("Unknown action") for a, o in turns)


def test_one_iteration_through_the_train_flow(prefect_harness, shared_home):
    """``creditflow train experiment=textgame`` for one iteration, with Monte Carlo ground truth:
    the run finishes, the environment statistics and the ground-truth credit metrics are logged."""
    from flows import api

    out = api.start_run(["experiment=textgame", "iterations=1", "rollout.tasks_per_iteration=2",
                         "rollout.group_size=2", "eval_episodes=2", "model.warmup_steps=2", "env.max_steps=3",
                         "env.ground_truth=mc", "env.gt_rollouts=2", "tracking.heatmap_every=0"],
                        home=shared_home, progress=False)
    run = api.tracker_for(shared_home).client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["env.name"] == "textgame"
    assert any(k.startswith("credit.gt_") for k in run.data.metrics)
    assert 0.0 <= out["success_after"] <= 1.0
