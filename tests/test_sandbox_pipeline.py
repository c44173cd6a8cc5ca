"""Sandbox faults through the real pipeline (survey §8.2, safety during training).

A task family whose environments run a hostile program in their sandbox on the first step: fork
bomb, infinite loop, memory exhaustion, disk filling, network attempt, reading a host file,
writing outside the work dir, gigabytes of stdout, a process that ignores SIGTERM, binary output.
Each episode must end with a recorded reason (reward 0, reason in the trajectory and counted in
MLflow as ``reward.done.<reason>``), the run must finish, and no container or process may be left.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass

import pytest

from environments.base import EnvConfig, Environment, StepResult, TaskFamily, TaskInstance
from environments.registry import _FAMILIES, register_family
from flows import api

SECRET_DIR = f"/tmp/cf-host-secret-{uuid.uuid4().hex[:8]}"
SECRET = "host-secret-" + uuid.uuid4().hex

#: fault -> shell program run in the sandbox's work directory
FAULTS = {
    "fork_bomb": "bomb() { bomb | bomb & }; bomb; sleep 30",
    "infinite_loop": "while :; do :; done",
    "memory": "python3 -c \"x = bytearray(2 << 30); print(len(x))\"",
    "disk_fill": "head -c 400000000 /dev/zero > big.bin && echo wrote",
    "network": "python3 -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=2); print('connected')\"",
    "host_file": f"cat {SECRET_DIR}/secret.txt",
    "write_outside": "echo pwned > /etc/cf-pwned && echo wrote-outside",
    "stdout_flood": "head -c 3000000000 /dev/zero",
    "ignore_sigterm": "trap '' TERM; while :; do sleep 1; done",
    "binary_output": "printf '\\377\\376\\000\\200garbage'; head -c 2000 /dev/urandom",
}


@dataclass
class FaultConfig(EnvConfig):
    name: str = "test-sandbox-faults"  # test family: each instance runs one hostile program
    exec_timeout_s: float = 3.0  # hard limit of the program


class FaultEnv(Environment):
    def __init__(self, sandbox, kind: str, timeout: float):
        assert sandbox is not None
        self.box, self.kind, self.timeout = sandbox, kind, timeout
        self.seconds = 0.0

    def reset(self) -> str:
        return "Say A.\nt1 say"

    def state_key(self) -> str:
        return self.kind

    def stats(self) -> dict[str, float]:
        return {"sandbox_seconds": self.seconds, "sandbox_execs": 1.0}

    def step(self, action_text: str) -> StepResult:
        res = self.box.exec(["sh", "-c", FAULTS[self.kind]], timeout_s=self.timeout)
        self.seconds += res.wall_seconds
        out = res.stdout.decode("utf-8", "replace")[:200]
        if res.reason:
            reason = f"sandbox_{res.reason}"
        elif res.exit_code != 0:
            reason = "program_failed"
        else:
            reason = "program_ok"
        ok = reason == "program_ok"
        return StepResult(f"done {out}", 0.0, True, action_text.strip() or None, "end", success=False,
                          reason=reason, info={"terminal_reward": 0.0, "exit_code": res.exit_code, "ok": ok})


class FaultFamily(TaskFamily):
    name = "test-sandbox-faults"
    Config = FaultConfig
    needs_sandbox = True

    def instance(self, split, index, seed):
        kinds = sorted(FAULTS)
        return TaskInstance(f"fault-{split}-{index}", split, seed + index, {"kind": kinds[index % len(kinds)]})

    def make(self, instance, sandbox=None, episode_seed=0):
        return FaultEnv(sandbox, instance.spec["kind"], float(self.cfg.exec_timeout_s))

    def describe(self):
        return {"source": "test", "size": str(len(FAULTS)), "filtering": "none", "metric": "contained"}

    def warmup_corpus(self, n, seed):
        rng = random.Random(seed)
        return [("Say A.\nt1 say", [(f" {rng.choice('AB')}\n", "done")]) for _ in range(n)]


if FaultFamily.name not in _FAMILIES:
    register_family(FaultFamily)

#: what each fault must end as; security faults must not succeed in Docker
EXPECTED = {
    "fork_bomb": {"sandbox_timeout", "sandbox_killed", "sandbox_process_limit", "program_failed"},
    "infinite_loop": {"sandbox_timeout"},
    "memory": {"sandbox_oom", "sandbox_killed", "program_failed"},
    "disk_fill": {"program_failed", "sandbox_file_limit", "sandbox_killed"},
    "network": {"program_failed"},
    "host_file": {"program_failed"},
    "write_outside": {"program_failed"},
    "stdout_flood": {"sandbox_output_limit"},
    "ignore_sigterm": {"sandbox_timeout"},
    "binary_output": {"program_ok"},
}


@pytest.fixture()
def host_secret():
    os.makedirs(SECRET_DIR, exist_ok=True)
    with open(f"{SECRET_DIR}/secret.txt", "w") as fh:
        fh.write(SECRET)
    yield
    for name in os.listdir(SECRET_DIR):
        os.remove(os.path.join(SECRET_DIR, name))
    os.rmdir(SECRET_DIR)


def test_sandbox_faults_end_episodes_and_the_run_goes_on_in_docker(prefect_harness, tmp_path, host_secret,
                                                                   docker_engine, monkeypatch):
    from tests.docker_support import labelled

    seen: dict = {}
    from flows import train

    original = train.reward_stage.fn

    def spy(run_id, stage_key, chash, iteration, batch):
        out = original(run_id, stage_key, chash, iteration, batch)
        for t in out.value.trajectories:
            seen[t.task_id] = (t.done_reason, t.reward, t.turns[-1].observation)
        return out

    # the spy only records what the real reward stage returned (it runs the real stage)
    monkeypatch.setattr(train.reward_stage, "fn", spy)
    n = len(FAULTS)
    out = api.start_run(["env=test-sandbox-faults", "sandbox.backend=docker", "iterations=1", "credit=reinforce_pp",  # a group of one: no group baseline
                         f"rollout.tasks_per_iteration={n}", "rollout.group_size=1", "eval_episodes=2",
                         "sandbox.memory_mb=256", "sandbox.max_output_bytes=1000000", "sandbox.work_dir_mb=64",
                         "tracking.heatmap_every=0", "model.warmup_steps=2"],
                        home=tmp_path, progress=False)
    kinds = {f"fault-train-{i}": sorted(FAULTS)[i] for i in range(n)}
    assert set(seen) >= set(kinds)
    for task_id, kind in kinds.items():
        reason, reward, obs = seen[task_id]
        assert reason in EXPECTED[kind], (kind, reason, obs)
        assert reward == 0.0
        assert SECRET not in obs and "wrote-outside" not in obs and "connected" not in obs
    run = api.tracker_for(tmp_path).client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["creditflow.sandbox"] == "docker"
    assert run.data.tags["creditflow.sandbox.image_digest"]
    m = run.data.metrics
    counted = {k[len("reward.done."):]: v for k, v in m.items() if k.startswith("reward.done.")}
    assert sum(counted.values()) == n and counted.get("sandbox_timeout", 0) >= 2
    assert m["rollout.sandbox_seconds"] > 0 and m["rollout.env_start_seconds"] > 0
    assert m["rollout.sandboxes_created"] == n
    assert not os.path.exists("/etc/cf-pwned")
    # this process's containers (other processes on the machine may be running their own)
    assert labelled(docker_engine, owner_pid=str(os.getpid())) == [], "containers left behind after the run"
