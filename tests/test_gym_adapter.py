"""Gymnasium adapter (env=gym): ids and kwargs checked as config rules, text observations, action
parsing and invalid actions, rewards / termination / truncation passed through, seeds, true-state
keys, snapshots, and the sandboxed-vs-in-process identity on a second tabular environment."""

from __future__ import annotations

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.gym_adapter import GymConfig, GymFamily
from environments.tasks.gym_spec import resolve_gym_id, strip_ansi
from flows.config import ConfigError, load_config

def fam(**kw) -> GymFamily:
    return GymFamily(GymConfig(**kw))


def play(env, texts):
    out = [env.reset()]
    for text in texts:
        res = env.step(text)
        out.append((res.observation, res.reward, res.done, res.action, res.state_key, res.reason,
                    res.info.get("terminal_reward")))
        if res.done:
            break
    return out


def test_ids_resolve_and_bad_ids_are_config_errors():
    assert resolve_gym_id("CliffWalking-v1") == "CliffWalking-v1"
    assert resolve_gym_id("MiniGrid-Empty-5x5-v0") == "MiniGrid-Empty-5x5-v0"  # imports minigrid
    with pytest.raises(ConfigError, match=r"^env.gym_id=NoSuchEnv-v0: .*registered Gymnasium id"):
        load_config(["env=gym", "env.gym_id=NoSuchEnv-v0"])
    with pytest.raises(ConfigError, match=r"^env.gym_kwargs=.*JSON object"):
        load_config(["env=gym", "env.gym_kwargs=nope"])
    with pytest.raises(ConfigError, match=r"^env.sandboxed=.*transition table"):
        load_config(["env=gym", "env.gym_id=MiniGrid-Empty-5x5-v0", "env.gym_kwargs=size=5", "env.sandboxed=true"])


def test_text_actions_rewards_and_truncation_pass_through():
    f = fam(gym_id="CliffWalking-v1", max_turns=3)
    env = f.make(f.instance("train", 0, 0))
    prompt = env.reset()
    assert "Actions: 0 | 1 | 2 | 3" in prompt and prompt.endswith("t1:") and "\x1b" not in prompt
    assert "x  C  C" in prompt  # gym's ansi rendering: the agent x next to the cliff
    res = env.step(" 0\n")  # up: -1
    assert res.action == "0" and res.reward == -1.0 and not res.done and res.info["turn_reward"] == -1.0
    assert res.state_key.endswith("|t=1|s=24")
    res = env.step("north\n")
    assert res.action is None and res.info["invalid_reason"] == "unknown" and res.reward == 0.0
    res = env.step("1")  # no trailing newline: the observation starts on a fresh line
    assert res.done and res.reason == "max_turns" and res.info["truncated"] and not res.info["terminated"]
    assert res.observation == "\ndone: failure" and res.info["terminal_reward"] == -1.0
    assert env.stats()["invalid_actions"] == 1.0
    assert env.privileged()["states"] == [36, 24, 24]


def test_cliff_is_a_reward_not_an_end_and_the_goal_terminates():
    f = fam(gym_id="CliffWalking-v1", max_turns=20)
    env = f.make(f.instance("train", 0, 0))
    env.reset()
    assert env.step(" 1\n").reward == -100.0  # right from the start: into the cliff, back to start
    for a in ["0"] + ["1"] * 11 + ["2"]:
        res = env.step(a + "\n")
    assert res.done and res.info["terminated"] and res.reason == "failure"  # reward -1 at the goal: not > 0


def test_ansi_highlight_is_kept_as_brackets():
    assert strip_ansi("\n\x1b[41mS\x1b[0mFFF\nFHFH") == "\n[S]FFF\nFHFH"


def test_seeds_snapshots_and_sandboxed_identity(tmp_path):
    kw = dict(gym_id="CliffWalkingSlippery-v1", max_turns=10)
    plain, boxed = fam(**kw), fam(sandboxed=True, **kw)
    moves = [" 0\n", " 1\n", " 1\n", "?\n", " 1\n", " 2\n", " 1\n", " 1\n", " 0\n", " 1\n"]
    inst = plain.instance("eval", 2, 0)
    ref = play(plain.make(inst, episode_seed=3), moves)
    assert ref == play(plain.make(inst, episode_seed=3), moves)
    assert any(play(plain.make(inst, episode_seed=s), moves) != ref for s in (4, 5, 6))

    env = plain.make(inst, episode_seed=3)
    env.reset()
    env.step(moves[0])
    snap = env.snapshot()
    a = [env.step(m).state_key for m in moves[1:5]]
    env.restore(snap)
    assert a == [env.step(m).state_key for m in moves[1:5]]

    backend = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    try:
        box = backend.create()
        env_b = boxed.make(inst, sandbox=box, episode_seed=3)
        assert play(env_b, moves) == ref
        assert env_b.stats()["sandbox_execs"] == 9.0  # one exec per valid action
        box.close()
    finally:
        backend.close()
    with pytest.raises(ValueError, match="needs a sandbox"):
        boxed.make(inst)


def test_kwargs_forms():
    from environments.tasks.gym_spec import parse_kwargs

    assert parse_kwargs('{"is_slippery": false}') == {"is_slippery": False}
    assert parse_kwargs("is_slippery=false,map_name=8x8") == {"is_slippery": False, "map_name": "8x8"}
    assert parse_kwargs("") == {}
    with pytest.raises(ValueError):
        parse_kwargs("nope")
