"""Faults of the world around a training run (issue 7): the tracking server down at start or in
the middle of a run, a corrupt checkpoint on resume, a full disk, NaN rewards from an
environment, two runs at once in one home. kill -9 in each stage is in tests/test_flow.py.

Everything here is real: a real ``mlflow server`` process (SQLite backend, explicit artifact
root) that is killed and started again on the same port, a real tmpfs that fills up, real
concurrent ``creditflow`` processes."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows import api, reporting, train
from flows.config import ConfigError
from flows.runtime import InjectedCrash, RunState
from tests.server_support import _free_port

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "iterations=2",
    "rollout.tasks_per_iteration=4",
    "rollout.group_size=4",
    "eval_episodes=16",
    "env.horizon=3",
    "env.num_decisive=1",
    "tracking.heatmap_every=1",
]


@pytest.fixture()
def home(shared_home, monkeypatch):
    monkeypatch.setenv("CREDITFLOW_HOME", str(shared_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return shared_home


@pytest.fixture()
def hooks():
    yield train.ITERATION_HOOKS
    train.ITERATION_HOOKS.clear()


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _executions(state: RunState) -> collections.Counter:
    return collections.Counter((e["iteration"], e["stage"]) for e in state.executions())


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, explicit artifact root) that can be killed with
    SIGKILL and started again on the same port."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> None:
        art = self.root / "artifacts"
        art.mkdir(exist_ok=True)
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--default-artifact-root", art.as_uri(), "--no-serve-artifacts"]
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, limit: float = 120.0) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not come up: {(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server's process group, and any process of it that left the group (server
        workers, job consumers), then wait until its port refuses connections: the server is
        really gone before the test goes on."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 30
        while self._accepting():
            for pid in self._leftover_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert time.monotonic() < deadline, f"port {self.port} still accepts connections after killing the server"
            time.sleep(0.2)

    def _accepting(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _leftover_pids(self) -> list[int]:
        """Processes whose command line names this server's port or backend store."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if (f"--port {self.port}" in cmd or str(self.root) in cmd) and "pytest" not in cmd:
                    out.append(int(d.name))
        return out


@pytest.fixture()
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    yield server
    server.kill()


# ------------------------------------------------------------------ 1. tracking server down at start
def test_tracking_server_down_at_start_fails_before_compute(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    home = tmp_path / "h"
    env = dict(os.environ, CREDITFLOW_HOME=str(home), MLFLOW_TRACKING_URI=uri)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--quiet", *SMALL], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert uri in proc.stderr and "not reachable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "runs").exists() and not (home / "models").exists()  # no run dir, no model built
    # the Python API: a ConfigError naming the URI (tracking.mlflow_uri), nothing created
    with pytest.raises(ConfigError, match=f"MLflow tracking server {uri} is not reachable"):
        api.start_run(SMALL + [f"tracking.mlflow_uri={uri}"], home=home, progress=False)
    assert not (home / "runs").exists()


# ------------------------------------------------------------------ 2. tracking server down mid-run
@pytest.mark.slow  # real mlflow server / two concurrent training processes: minutes on 2 cores
def test_tracking_server_restarts_mid_run_nothing_dropped(prefect_harness, home, hooks, mlflow_server, capfd):
    """The server is SIGKILLed after iteration 0 and started again on the same port after
    iteration 1: training goes on meanwhile, the journal replays in order, every metric step is
    present exactly once, tags and heatmaps of the outage are there."""

    def hook(state: RunState, it: int) -> None:
        if it == 0:
            mlflow_server.kill()
        elif it == 1:
            assert state.paths.tracking_buffer.is_file()  # step 1 waits in the durable journal
            pending = [json.loads(x) for x in state.paths.tracking_buffer.read_text().splitlines()]
            assert 1 in {e["step"] for e in pending if e["kind"] == "metrics"}
            mlflow_server.start(wait=False)  # comes back while training goes on

    hooks.append(hook)
    out = api.start_run(SMALL + ["iterations=4", f"tracking.mlflow_uri={mlflow_server.uri}",
                                 "tracking.retry_seconds=120"], home=home, progress=False, run_id="cf-test-mlflow-restart")
    assert "unreachable" in capfd.readouterr().err
    tracker = api.tracker_for(home, uri=mlflow_server.uri)
    c = tracker.client
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert _steps(c, run.info.run_id, "progress.iteration") == [0, 1, 2, 3, 4]
    for key in ("reward.success_rate", "update.loss", "credit.mean", "time.update_seconds"):
        assert _steps(c, run.info.run_id, key) == [0, 1, 2, 3], key
    assert "checklist.ca.granularity" in run.data.tags
    heat = {a.path for a in c.list_artifacts(run.info.run_id, "heatmaps")}
    assert {f"heatmaps/credit_iter_{i:04d}.png" for i in range(4)} <= heat
    state = RunState.open(out["run_id"], home)
    assert not state.paths.tracking_buffer.exists()  # drained


def test_tracking_server_gone_too_long_fails_clearly_then_resume_replays(prefect_harness, home, hooks, mlflow_server):
    """The server dies and stays down past tracking.retry_seconds: the run fails with an error that
    names the URI and what is buffered; `resume` after the server is back replays the journal and
    finishes with every step exactly once."""
    from flows.tracking import TrackingUnavailableError

    def hook(state: RunState, it: int) -> None:
        if it == 0:
            mlflow_server.kill()

    hooks.append(hook)
    run_id = "cf-test-mlflow-gone"
    with pytest.raises(TrackingUnavailableError) as info:
        api.start_run(SMALL + ["iterations=3", f"tracking.mlflow_uri={mlflow_server.uri}", "tracking.retry_seconds=2"],
                      home=home, progress=False, run_id=run_id)
    msg = str(info.value)
    # (the server is down, so RunState.open would refuse: read the run directory's files directly)
    buf = home / "runs" / run_id / "tracking_buffer.jsonl"
    assert mlflow_server.uri in msg and str(buf) in msg and "creditflow resume" in msg, msg
    pending = [json.loads(x) for x in buf.read_text().splitlines()]
    buffered = {e["step"] for e in pending if e["kind"] == "metrics"}
    assert 1 in buffered and str(sorted(buffered)) in msg
    assert json.loads((home / "runs" / run_id / "run.json").read_text())["status"] == "failed"
    # while the server is down, resume refuses before any compute
    with pytest.raises(ConfigError, match="not reachable"):
        api.resume_run(run_id, home=home, progress=False)
    hooks.clear()
    mlflow_server.start()
    out = api.resume_run(run_id, home=home, progress=False)
    c = api.tracker_for(home, uri=mlflow_server.uri).client
    assert c.get_run(out["mlflow_run_id"]).info.status == "FINISHED"
    assert _steps(c, out["mlflow_run_id"], "progress.iteration") == [0, 1, 2, 3]
    for key in ("reward.success_rate", "update.loss"):
        assert _steps(c, out["mlflow_run_id"], key) == [0, 1, 2], key
    assert not buf.exists()


def test_store_gone_only_at_the_end_mark_says_everything_else_is_logged(mlflow_server, tmp_path):
    """The store disappears after the last metric reached it: finishing fails clearly, names the
    store and the (empty) journal, and says that `creditflow resume` sets the end mark."""
    from flows.tracking import Tracker, TrackingUnavailableError

    buf = tmp_path / "tracking_buffer.jsonl"
    tracker = Tracker(mlflow_server.uri, "creditflow", tmp_path, buffer=buf, retry_seconds=1)
    tracker.start("end-mark", {})
    assert tracker.log_step(0, {"reward.success_rate": 0.5})
    assert tracker.flush(wait=True)
    mlflow_server.kill()
    with pytest.raises(TrackingUnavailableError) as info:
        tracker.finish("FINISHED")
    msg = str(info.value)
    assert mlflow_server.uri in msg and "terminate the MLflow run" in msg and str(buf) in msg
    assert "`creditflow resume` marks the MLflow run FINISHED" in msg


# ------------------------------------------------------------------ 3. corrupt checkpoint on resume
def test_corrupt_checkpoint_on_resume_is_detected_and_rebuilt_bit_identically(prefect_harness, home):
    from stages.update.checkpoint import CheckpointError, verify_checkpoint

    run_id = "cf-test-corrupt-ckpt"
    with pytest.raises(InjectedCrash):
        api.start_run(SMALL + ["iterations=3", "debug.crash_at=2:env"], home=home, progress=False, run_id=run_id)
    state = RunState.open(run_id, home)
    ckpts = state.paths.checkpoints
    latest, previous = ckpts / "iter_0001", ckpts / "iter_0000"
    recorded = json.loads((latest / "manifest.json").read_text())["files"]["policy.safetensors"]["sha256"]
    backup = home / f"{run_id}-iter_0000.bak"
    shutil.copytree(previous, backup)

    def flip(path: Path) -> None:  # bit rot: same size, different content
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    flip(latest / "policy.safetensors")
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(latest)
    msg = str(info.value)
    assert str(latest / "policy.safetensors") in msg and "sha256 mismatch" in msg and recorded in msg

    # both the latest and the previous checkpoint corrupt: no lossless recovery; said so, nothing trusted
    (previous / "optim.pt").write_bytes((previous / "optim.pt").read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="cannot be resumed losslessly") as info:
        api.resume_run(run_id, home=home, progress=False)
    assert str(latest) in str(info.value) and "optim.pt" in str(info.value)

    # the previous checkpoint usable again: the resume rebuilds iter_0001 by re-running iteration 1's
    # update on its persisted inputs, proves it bit-identical to the lost one, and goes on
    shutil.rmtree(previous)
    shutil.copytree(backup, previous)
    before = _executions(state)
    out = api.resume_run(run_id, home=home, progress=False)
    ran = _executions(state) - before
    assert ran[(1, "update")] == 1 and not any(k[0] in (0, -1) for k in ran), ran
    assert ran[(2, "update")] == 1 and ran[(3, "eval")] == 1
    manifest = verify_checkpoint(latest) if latest.exists() else None
    assert manifest is None or manifest["files"]["policy.safetensors"]["sha256"] == recorded
    c = api.tracker_for(home).client
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "bit-identical" in run.data.tags["creditflow.recovered.iter_0001"]
    assert _steps(c, run.info.run_id, "progress.iteration") == [0, 1, 2, 3]
    assert _steps(c, run.info.run_id, "update.loss") == [0, 1, 2]


# ------------------------------------------------------------------ 4. disk full
def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    if os.geteuid() != 0:
        return False
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


@pytest.mark.parametrize("free_kb", [0, 400])
def test_disk_full_fails_clearly_and_resume_loses_nothing(prefect_harness, shared_home, tmp_path, monkeypatch,
                                                          hooks, free_kb):
    """The run directory's filesystem (a real 24 MB tmpfs) fills up after iteration 0: with no
    space left the next persisted result fails; with ~400 kB left the stage results fit and the
    checkpoint write fails. Either way the run fails with ENOSPC, no persisted result or
    checkpoint is half-written, and after freeing space the resume finishes, losing nothing."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs root to mount a small tmpfs")
    from stages.update.checkpoint import verify_checkpoint

    home = tmp_path / "fullhome"
    (home / "runs").mkdir(parents=True)
    if (shared_home / "models").is_dir():  # reuse the warmed-up tiny policy
        (home / "models").symlink_to(shared_home / "models")
    monkeypatch.setenv("CREDITFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(home / "runs")], check=True)
    filler = home / "runs" / "filler"
    try:
        def fill(state: RunState, it: int) -> None:
            if it != 0:
                return
            with open(filler, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            if free_kb:
                os.truncate(filler, max(filler.stat().st_size - free_kb * 1024, 0))

        hooks.append(fill)
        run_id = f"cf-test-disk-full-{free_kb}"
        with pytest.raises((OSError, train.ResultNotPersistedError)) as info:
            api.start_run(SMALL, home=home, progress=False, run_id=run_id)
        hooks.clear()
        state = RunState.open(run_id, home)
        first = _executions(state)
        if free_kb:  # the stage results fit, the checkpoint did not
            assert isinstance(info.value, OSError) and info.value.errno == 28, info.value
            assert "cannot write checkpoint" in str(info.value) and "iter_0001" in str(info.value)
            assert first[(1, "update")] == 1
        else:  # the first stage of iteration 1 could not persist its result: nothing after it ran
            assert isinstance(info.value, train.ResultNotPersistedError), info.value
            assert "it1-env" in str(info.value) and "creditflow resume" in str(info.value)
            assert (1, "rollout") not in first
        # nothing half-written that a resume would trust: every result record parses, every
        # checkpoint under its final name verifies, no temporary checkpoint directory is left
        for f in state.paths.results.iterdir():
            if f.stat().st_size:
                json.loads(f.read_bytes())
        for ck in state.paths.checkpoints.iterdir():
            if not ck.name.startswith("."):
                verify_checkpoint(ck)
        if free_kb:
            assert not (state.paths.checkpoints / "iter_0001").exists()
        filler.unlink()
        out = api.resume_run(run_id, home=home, progress=False)
        after = _executions(state)
        ran = after - first
        assert all(after[(i, s)] == 1 for i in (-1, 0) for s in ("prepare", "eval", "env", "rollout", "reward",
                                                                    "credit", "update") if (i, s) in after)
        assert (1, "update") in ran and (2, "eval") in ran
        c = api.tracker_for(home).client
        assert c.get_run(out["mlflow_run_id"]).info.status == "FINISHED"
        assert _steps(c, out["mlflow_run_id"], "progress.iteration") == [0, 1, 2]
        assert _steps(c, out["mlflow_run_id"], "update.loss") == [0, 1]
        verify_checkpoint(state.paths.checkpoints / "iter_0001")
    finally:
        subprocess.run(["umount", "-l", str(home / "runs")])


# ------------------------------------------------------------------ 5. NaN rewards from an environment
def _register_nan_family() -> str:
    from environments.base import StepResult
    from environments.registry import _FAMILIES, register_family
    from environments.tasks.bifurcation import BifurcationFamily
    from environments.tasks.bifurcation_env import BifurcationEnv

    name = "bifurcation_nanfault"
    if name in _FAMILIES:
        return name

    class FaultyEnv(BifurcationEnv):
        """Every 4th episode ends with a NaN reward, every 4th+1 returns +inf on its first turn."""

        def __init__(self, *a, fault: str = "", **kw):
            super().__init__(*a, **kw)
            self.fault = fault

        def step(self, action_text: str) -> StepResult:
            res = super().step(action_text)
            if self.fault == "nan" and res.done:
                res.reward = float("nan")
                res.info["terminal_reward"] = float("nan")
            elif self.fault == "inf" and not res.done:
                res.reward = float("inf")
                self.fault = ""
            return res

    @register_family
    class NanFamily(BifurcationFamily):
        name = "bifurcation_nanfault"

        def make(self, instance, sandbox=None, episode_seed: int = 0):
            env = super().make(instance, sandbox, episode_seed)
            env.__class__ = FaultyEnv
            env.fault = {0: "nan", 1: "inf"}.get(episode_seed % 4, "")
            return env

    return name


def test_nan_and_inf_rewards_become_invalid_reward_episodes(prefect_harness, home):
    name = _register_nan_family()
    out = api.start_run(SMALL + [f"env={name}", "env.horizon=3", "env.num_decisive=1"], home=home, progress=False)
    c = api.tracker_for(home).client
    run = c.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    invalid = c.get_metric_history(run.info.run_id, "reward.invalid_reward_episodes")
    done = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "reward.done.invalid_reward")}
    assert sorted(m.step for m in invalid) == [0, 1]
    assert all(m.value > 0 for m in invalid), invalid
    assert all(done[m.step] == m.value for m in invalid)
    # the faulty episodes got reward 0 (the batch mean stays a finite number in [0, 1])
    for m in c.get_metric_history(run.info.run_id, "reward.reward_mean"):
        assert 0.0 <= m.value <= 1.0


# ------------------------------------------------------------------ 6. two runs at once in one home
@pytest.mark.slow  # real mlflow server / two concurrent training processes: minutes on 2 cores
def test_two_runs_at_once_in_one_home(prefect_harness, tmp_path):
    """Two `creditflow train` processes start together in a fresh home (empty SQLite store, no
    cached policy): both finish, distinct run dirs and MLflow runs, nothing clobbered."""
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "together"
    env = dict(os.environ, CREDITFLOW_HOME=str(home), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--quiet", *SMALL, f"seed={s}"], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    ids = [next(l.split()[-1] for l in so.splitlines() if l.startswith("run id:")) for so, _ in outs]
    assert len(set(ids)) == 2
    c = api.tracker_for(home).client
    mlflow_ids = set()
    for seed, run_id in enumerate(ids):
        state = RunState.open(run_id, home)
        assert state.cfg.seed == seed
        assert {e["pid"] for e in state.executions()} == {procs[seed].pid}  # only its own process wrote here
        run = c.get_run(state.info["mlflow_run_id"])
        mlflow_ids.add(run.info.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["creditflow.run_id"] == run_id
        assert run.data.params["seed"] == str(seed)
        assert _steps(c, run.info.run_id, "progress.iteration") == [0, 1, 2]
        for ck in ("init", "iter_0000", "iter_0001"):
            from stages.update.checkpoint import verify_checkpoint

            assert verify_checkpoint(state.paths.checkpoints / ck)["meta"]["run_id"] == run_id
    assert len(mlflow_ids) == 2


def test_same_run_driven_twice_is_refused(prefect_harness, home):
    """While one process drives a run (stopped with SIGSTOP while it holds the lock), a second
    `creditflow resume` of it is refused with a clear message and changes nothing; the first
    then finishes normally."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, CREDITFLOW_HOME=str(home), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    run_id = "cf-test-driven-twice"
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--quiet", "--run-id", run_id, *SMALL],
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    execs = home / "runs" / run_id / "executions.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (execs.is_file() and execs.read_text().strip()):  # it holds the lock once a stage ran
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        os.kill(first.pid, signal.SIGSTOP)
        config_before = (home / "runs" / run_id / "config.yaml").read_text()
        second = subprocess.run([sys.executable, "-m", "flows.cli", "resume", "--quiet", run_id, "iterations=5"],
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 3 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"run {run_id} is being driven by another process" in second.stderr, second.stderr[-3000:]
        assert (home / "runs" / run_id / "config.yaml").read_text() == config_before  # not clobbered
    finally:
        os.kill(first.pid, signal.SIGCONT)
    so, se = first.communicate(timeout=600)
    assert first.returncode == 0, se[-3000:]
    state = RunState.open(run_id, home)
    assert {e["pid"] for e in state.executions()} == {first.pid}
    c = api.tracker_for(home).client
    assert _steps(c, state.info["mlflow_run_id"], "progress.iteration") == [0, 1, 2]


def test_store_lost_while_logging_a_heatmap_fails_the_run_clearly(monkeypatch):
    """Plotting errors are swallowed (a heatmap never kills training), the store's are not: a
    TrackingUnavailableError from logging the figure reaches the caller, so a journal that could
    not be replayed is never hidden."""
    import flows.heatmap
    from flows.tracking import TrackingUnavailableError

    class Gone:
        def log_rendered(self, write, renderer, name):
            raise TrackingUnavailableError("store gone")

    monkeypatch.setattr(flows.heatmap, "heatmap_data", lambda *a, **k: {})
    with pytest.raises(TrackingUnavailableError, match="store gone"):
        reporting.log_heatmap(Gone(), None, None, 0)

    class Broken:
        def log_rendered(self, write, renderer, name):
            raise ValueError("bad figure")

    reporting.log_heatmap(Broken(), None, None, 0)  # a plotting error: warning only
