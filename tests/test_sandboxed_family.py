"""A task family that executes its transitions in process sandboxes runs through the stages:
the rollout gets one sandbox per episode from the run's backend, and none is left behind."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from environments.base import EnvConfig, Environment, StepResult, TaskFamily, TaskInstance
from environments.registry import _FAMILIES, register_family
from flows.api import run_plain


@dataclass
class EchoConfig(EnvConfig):
    name: str = "sandbox-echo"  # test family: the sandbox echoes the action back
    horizon: int = 2  # turns per episode


class EchoEnv(Environment):
    def __init__(self, sandbox, horizon: int):
        assert sandbox is not None, "the stages must provide a sandbox"
        self.box, self.horizon, self.t = sandbox, horizon, 0

    def reset(self) -> str:
        return "Say A or B.\nt1 say"

    def state_key(self) -> str:
        return f"t={self.t}"

    def step(self, action_text: str) -> StepResult:
        a = action_text.strip()
        res = self.box.exec(["sh", "-c", f"printf %s '{a}' >> log.txt; cat log.txt"], timeout_s=5)
        self.t += 1
        done = self.t >= self.horizon
        ok = res.ok and res.stdout.decode().endswith("A") and a in ("A", "B")
        reward = float(done and ok)
        return StepResult("done" if done else f"t{self.t + 1} say", reward, done, a if a in ("A", "B") else None,
                          self.state_key(), success=bool(done and ok), reason="success" if done and ok else "failure",
                          info={"terminal_reward": reward} if done else {})


class EchoFamily(TaskFamily):
    name = "sandbox-echo"
    Config = EchoConfig
    needs_sandbox = True

    def instances(self, split, n, seed):
        return [TaskInstance(f"echo-{split}-{i}", split, seed + i) for i in range(n)]

    def make(self, instance, sandbox=None, episode_seed=0):
        return EchoEnv(sandbox, self.cfg.horizon)

    def describe(self):
        return {"source": "test", "size": "n/a", "filtering": "none", "metric": "last action echoed is A"}

    def warmup_corpus(self, n, seed):
        rng = random.Random(seed)
        return [("Say A or B.\nt1 say", [(f" {rng.choice('AB')}\n", "t2 say"), (f" {rng.choice('AB')}\n", "done")])
                for _ in range(n)]


if EchoFamily.name not in _FAMILIES:
    register_family(EchoFamily)


def test_sandboxed_family_runs_through_the_stages_and_cleans_up(tmp_path):
    out = run_plain(["env=sandbox-echo", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                     "eval_episodes=4", "model.warmup_steps=5"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
    run_dir = tmp_path / "runs" / out["run_id"]
    assert (run_dir / "sandboxes").is_dir()  # the run's backend was used
    assert list((run_dir / "sandboxes").rglob("*")) == []  # and every sandbox directory was removed
    # no process of ours is still running in a sandbox directory
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                assert str(run_dir / "sandboxes") not in os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                pass
