"""env=textgame env.sandboxed=true: the TextWorld Express game runs inside the episode's process
sandbox (a JVM started in the sandbox per engine call, the episode replayed). Sandboxed and
in-process play of the same games give identical observations, rewards, dones, state keys,
privileged information, statistics and ground truth; snapshots restore into the sandbox; sandbox
faults end the episode with a recorded reason; the config loader refuses the Docker backend and
too little memory in one line; one train-flow iteration runs sandboxed.

Each engine call costs a JVM start in the sandbox (~2 s here), so the games are short."""

from __future__ import annotations

import json
import shutil

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.textgame import TextGameConfig, TextGameFamily
from environments.tasks.textgame_sandboxed import DOCKER_REFUSAL, SandboxedTextGameEnv

pytestmark = pytest.mark.skipif(shutil.which("java") is None or shutil.which("bwrap") is None,
                                reason="needs a Java runtime and bubblewrap (infra/ensure_system.sh)")


@pytest.fixture
def backend(tmp_path):
    b = ProcessBackend(SandboxConfig(exec_timeout_s=60), base_dir=str(tmp_path / "sbx"))
    yield b
    b.close()


def _pair(**kw):
    kw = {"ground_truth": "mc", "gt_rollouts": 2, **kw}
    return TextGameFamily(TextGameConfig(**kw)), TextGameFamily(TextGameConfig(sandboxed=True, **kw))


def _identical(plain, boxed, box, inst, texts, episode_seed=3):
    e1, e2 = plain.make(inst, episode_seed=episode_seed), boxed.make(inst, box, episode_seed=episode_seed)
    assert isinstance(e2, SandboxedTextGameEnv) and not isinstance(e1, SandboxedTextGameEnv)
    assert e1.reset() == e2.reset() and e1.state_key() == e2.state_key() and e1.valid == e2.valid
    parsed = []
    for text in texts:
        r1, r2 = e1.step(text), e2.step(text)
        assert r1 == r2 and "sandbox_fault" not in r2.info, text
        parsed.append(r1.action)
        if r1.done:
            break
    assert e1.actions == e2.actions and e1.rooms == e2.rooms and e1.score == e2.score
    assert e1.privileged() == e2.privileged()
    assert e1.ground_truth(parsed) == e2.ground_truth(parsed)
    s1, s2 = e1.stats(), dict(e2.stats())
    valid = sum(a is not None for a in parsed)
    assert s2.pop("sandbox_execs") == valid + 1 and s2.pop("sandbox_seconds") > 0
    for k in ("gt_mc_seconds",):
        s1.pop(k), s2.pop(k)
    assert s1 == s2
    return e1, e2


def test_sandboxed_play_identical_to_in_process(backend):
    plain, boxed = _pair(max_steps=6)
    assert boxed.needs_sandbox and not plain.needs_sandbox and TextGameFamily.needs_sandbox is False
    assert "sandbox" in boxed.describe()["execution"]
    with pytest.raises(ValueError, match="needs a sandbox"):
        boxed.make(boxed.instance("train", 0, 0))
    inst = plain.instance("eval", 0, 0)
    gold = plain.make(inst).gold_path()
    assert len(gold) == 3  # look around, take the object, put it where it belongs (derby hat, hat rack)
    # invalid and empty commands (answered on the host, no exec), the gold path in other case/spacing
    texts = ["fly away\n", "\n", "  " + gold[0].upper() + "  \n", gold[1] + "\n", gold[2]]
    e1, e2 = _identical(plain, boxed, backend.create(), inst, texts)
    assert e1.done and e1._success and [a is None for a in e1.actions] == [False] * 3
    # snapshot / restore into the sandbox: the same future
    e1.reset(), e2.reset()
    step = e1.valid[0] + "\n"
    assert e1.step(step) == e2.step(step)
    snap = e2.snapshot()
    assert snap == e1.snapshot() and json.loads(json.dumps(snap)) == snap
    e2.step(e2.valid[-1] + "\n")
    e2.restore(snap)
    nxt = e1.valid[-1] + "\n"
    assert e2.rooms == e1.rooms and e1.step(nxt) == e2.step(nxt)
    # a game with an object tree (cookingworld: the state key hashes the true state)
    plain, boxed = _pair(game="cookingworld", params="numLocations=1,numIngredients=1,numDistractorItems=0,includeDoors=0",
                         max_steps=2)
    inst = plain.instance("eval", 0, 0)
    e1, _ = _identical(plain, boxed, backend.create(), inst, ["look around\n", "take cookbook\n"])
    assert "|tree=" in e1.state_key() and e1.done


def test_sandbox_faults_end_the_episode(tmp_path):
    fam = TextGameFamily(TextGameConfig(sandboxed=True))
    inst = fam.instance("train", 0, 0)
    backend = ProcessBackend(SandboxConfig(exec_timeout_s=60), base_dir=str(tmp_path / "sbx"))
    try:
        box = backend.create()
        env = fam.make(inst, box)
        env.reset()
        box.write_file("textgame_step.py", b"import sys\nsys.exit(3)\n")
        r = env.step(env.valid[0] + "\n")
        assert r.done and r.reason == "sandbox_error" and r.reward == 0.0 and not r.success
        assert "exit code 3" in r.info["sandbox_fault"] and env.actions == []
        # a fault at reset: the prompt says so and the first step ends the episode
        box = backend.create()
        env = fam.make(inst, box)
        box.close()
        assert "sandbox fault: error" in env.reset()
        r = env.step("look around\n")
        assert r.done and r.reason == "sandbox_error" and r.info["terminal_reward"] == 0.0
    finally:
        backend.close()
    # the sandbox's time limit: reason sandbox_timeout
    backend = ProcessBackend(SandboxConfig(exec_timeout_s=0.3), base_dir=str(tmp_path / "sbx2"))
    try:
        env = fam.make(inst, backend.create())
        env.reset()
        r = env.step("look around\n")
        assert r.done and r.reason == "sandbox_timeout"
    finally:
        backend.close()
    with pytest.raises(ValueError, match="process backend only"):
        fam.make(inst, object())


def test_config_refuses_docker_and_small_memory_in_one_line():
    from flows.config import ConfigError, load_config

    for overrides, fragment in (
        (["sandbox.backend=docker"], "sandbox.backend=docker: " + DOCKER_REFUSAL),
        (["sandbox.backend=auto"], "sandbox.backend=auto: env=textgame env.sandboxed=true runs on the process"),
        (["sandbox.memory_mb=256"], "sandbox.memory_mb=256: must be >= 512 for env=textgame env.sandboxed=true"),
    ):
        with pytest.raises(ConfigError) as err:
            load_config(["env=textgame", "env.sandboxed=true", *overrides])
        assert str(err.value).startswith(fragment) and "\n" not in str(err.value)
    assert load_config(["env=textgame", "env.sandboxed=true"]).env.sandboxed is True
    assert load_config(["env=textgame", "sandbox.backend=docker", "sandbox.memory_mb=256"]).env.sandboxed is False


@pytest.mark.slow
def test_one_train_flow_iteration_sandboxed(tmp_path):
    """experiment=textgame with env.sandboxed=true through the train flow: one process sandbox per
    episode, every sandbox directory gone afterwards."""
    from flows.api import run_plain

    out = run_plain(["experiment=textgame", "env.sandboxed=true", "sandbox.exec_timeout_s=60", "env.max_steps=1",
                     "iterations=1", "rollout.tasks_per_iteration=1", "rollout.group_size=2", "eval_episodes=1",
                     "model.warmup_steps=2"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
    sandboxes = tmp_path / "runs" / out["run_id"] / "sandboxes"
    assert sandboxes.is_dir() and list(sandboxes.rglob("*")) == []
