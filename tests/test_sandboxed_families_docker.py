"""Docker-sandboxed vs in-process identity of the agentic families frozenlake, gym (tabular), sokoban
and minigrid (its exported table; issue 16; survey §8.2: safety
during training): the same instance, episode seed and action texts (valid, invalid, malformed)
give identical observations, rewards, terminations, actions, state keys, reasons, ground truth
and stats when every transition runs in a locked-down container of the offline sandbox image.

One container serves every episode of the module (each reset rewrites the step script, the
table/level and the state file into its work directory). Skipped, with the reason and the fix,
only when no Docker engine is reachable (``tests/docker_support.py``)."""

from __future__ import annotations

import random

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.tasks.frozenlake import FrozenLakeConfig, FrozenLakeFamily
from environments.tasks.gym_adapter import GymConfig, GymFamily
from environments.tasks.sokoban import SandboxedSokobanEnv, SokobanConfig, SokobanFamily
from tests.docker_support import docker_cfg, docker_engine, docker_session_cleanup, labelled  # noqa: F401

#: valid moves, a near-miss, markup, an empty line, an undecodable byte and a word that is no move
NOISE = ["bad\n", "Up", "<answer>left</answer>\n", "\n", "\udcff\n", "jump\n"]
SANDBOX_STATS = ("sandbox_seconds", "sandbox_execs")


@pytest.fixture(scope="module")
def box(docker_engine):
    """One container of the offline image, shared by every episode of this module."""
    from environments.sandbox.docker import DockerBackend

    backend = DockerBackend(docker_cfg(exec_timeout_s=20.0), client=docker_engine)
    try:
        sb = backend.create()
        assert sb.container_id and backend.image_digest.startswith("sha256:")
        yield sb
    finally:
        backend.close()
        assert labelled(docker_engine, session=backend.session) == []  # nothing outlives the module


def step_both(plain_env, boxed_env, texts):
    """Reset both, play ``texts`` until the episode ends, assert every StepResult is identical;
    returns the number of turns played."""
    assert plain_env.reset() == boxed_env.reset()
    assert plain_env.state_key() == boxed_env.state_key()
    n = 0
    for text in texts:
        r1, r2 = plain_env.step(text), boxed_env.step(text)
        assert r1 == r2, (n, text)
        assert "sandbox_fault" not in r2.info
        n += 1
        if r1.done:
            break
    return n


def same_stats(plain_env, boxed_env) -> float:
    """Stats equal apart from the sandbox's own counters; returns the exec count of the episode."""
    s1, s2 = plain_env.stats(), dict(boxed_env.stats())
    assert s2.pop("sandbox_seconds") > 0
    execs = s2.pop("sandbox_execs")
    assert s1 == s2
    return execs


def test_frozenlake_in_docker_equals_in_process(box):
    kw = dict(map_name="4x4", is_slippery=True, max_turns=8)
    plain, boxed = FrozenLakeFamily(FrozenLakeConfig(**kw)), FrozenLakeFamily(FrozenLakeConfig(sandboxed=True, **kw))
    moves = [" right\n", " down\n", "bad\n", " down\n", " right\n", "Up", " down\n", " right\n"]
    rng = random.Random(3)
    invalid = 0
    for seed in (0, 1, 2):
        inst = plain.instance("train", seed, 0)
        texts = moves if seed == 0 else [rng.choice(moves + NOISE) for _ in range(8)]
        e1, e2 = plain.make(inst, episode_seed=seed), boxed.make(inst, sandbox=box, episode_seed=seed)
        n = step_both(e1, e2, texts)
        assert n >= 1
        assert e1.actions == e2.actions and e1.ground_truth(e1.actions) == e2.ground_truth(e2.actions)
        valid = sum(a is not None for a in e1.actions)
        assert same_stats(e1, e2) == valid  # one exec per valid action, none for invalid ones
        invalid += len(e1.actions) - valid
    assert invalid >= 1  # the invalid-action path was compared too


def test_gym_tabular_in_docker_equals_in_process(box):
    kw = dict(gym_id="CliffWalkingSlippery-v1", max_turns=10)
    plain, boxed = GymFamily(GymConfig(**kw)), GymFamily(GymConfig(sandboxed=True, **kw))
    moves = [" 0\n", " 1\n", " 1\n", "?\n", " 1\n", " 2\n", " 1\n", " 1\n", " 0\n", " 1\n"]
    inst = plain.instance("eval", 2, 0)
    e1, e2 = plain.make(inst, episode_seed=3), boxed.make(inst, sandbox=box, episode_seed=3)
    step_both(e1, e2, moves)
    assert same_stats(e1, e2) == 9.0  # one exec per valid action


def test_sokoban_in_docker_equals_in_process(box):
    plain = SokobanFamily(SokobanConfig(max_turns=8))
    boxed = SokobanFamily(SokobanConfig(max_turns=8, sandboxed=True))
    rng = random.Random(5)
    choices = [" up\n", " down\n", " left\n", " right\n"] + NOISE
    for inst in plain.instances("train", 2, seed=2):
        e1, e2 = plain.make(inst), boxed.make(inst, box)
        assert isinstance(e2, SandboxedSokobanEnv)
        step_both(e1, e2, [rng.choice(choices) for _ in range(8)])
        assert e1.actions == e2.actions and e1.ground_truth(e1.actions) == e2.ground_truth(e2.actions)
        assert same_stats(e1, e2) == len(e1.actions)  # sokoban parses inside the sandbox: every turn execs
        # snapshot / restore into the container: the same future
        e1.reset(), e2.reset()
        assert e1.step(" down\n") == e2.step(" down\n")
        snap = e2.snapshot()
        assert snap == e1.snapshot()
        e2.step(" left\n"), e2.step(" left\n")
        e2.restore(snap)
        assert e1.step(" right\n") == e2.step(" right\n")
        assert e1.state_key() == e2.state_key()


def test_minigrid_table_in_docker_equals_in_process(box):
    from tests.test_minigrid import MG_TEXTS, identical_play
    from environments.tasks.minigrid_env import MiniGridConfig, MiniGridFamily

    kw = dict(gym_id="MiniGrid-DoorKey-5x5-v0", max_turns=20)
    plain, boxed = MiniGridFamily(MiniGridConfig(**kw)), MiniGridFamily(MiniGridConfig(sandboxed=True, **kw))
    rng = random.Random(11)
    for seed in (0, 1):
        identical_play(plain, boxed, box, plain.instance("train", seed, 0), seed,
                       [rng.choice(MG_TEXTS) for _ in range(20)])
