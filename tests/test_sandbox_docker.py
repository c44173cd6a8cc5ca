"""Docker sandbox backend: lockdown, exec, files, snapshot/fork (archive and commit), pool, cleanup
after close / crash / SIGTERM / exit, make_backend, offline image (survey §8.2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from environments.sandbox import ProcessBackend, SandboxUnavailable, check_docker, make_backend
from tests.docker_support import docker_cfg as _cfg
from tests.docker_support import docker_engine, docker_session_cleanup, labelled, labelled_images  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 30.0


@pytest.fixture
def backend(docker_engine):
    from environments.sandbox.docker import DockerBackend

    b = DockerBackend(_cfg(), client=docker_engine)
    yield b
    b.close()
    assert labelled(docker_engine, session=b.session) == []


@pytest.fixture
def sb(backend):
    return backend.create()


def _procs(sb) -> int:
    r = sb.exec("n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n")
    return int(r.stdout)


# ----------------------------------------------------------------------------- make_backend


def test_make_backend_docker_and_auto(docker_engine, tmp_path):
    b = make_backend(_cfg(), base_dir=str(tmp_path))
    try:
        assert b.name == "docker" and b.chosen == "docker" and b.requested == "docker"
        assert b.image_digest.startswith("sha256:")
    finally:
        b.close()
    b = make_backend(_cfg(backend="auto"), base_dir=str(tmp_path))
    try:
        assert b.chosen == "docker" and b.requested == "auto"
    finally:
        b.close()
    check_docker(_cfg())  # no raise


def test_unreachable_engine_is_a_clear_error(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such-docker.sock")
    with pytest.raises(SandboxUnavailable, match="no.*reachable|none is reachable") as exc:
        make_backend(_cfg())
    assert "fix:" in str(exc.value) and "sandbox.backend=process" in str(exc.value)
    with pytest.raises(SandboxUnavailable):
        check_docker(_cfg())
    caplog.set_level("INFO", logger="creditflow.sandbox")
    b = make_backend(_cfg(backend="auto"), base_dir=str(tmp_path / "sbx"))
    try:
        assert isinstance(b, ProcessBackend) and b.chosen == "process" and b.requested == "auto"
        assert any("chose 'process'" in r.getMessage() for r in caplog.records)
    finally:
        b.close()


# ----------------------------------------------------------------------------- lockdown


def test_container_is_locked_down(backend, sb, docker_engine):
    hc = docker_engine.api.inspect_container(sb.container_id)["HostConfig"]
    assert hc["ReadonlyRootfs"] and hc["NetworkMode"] == "none" and hc["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["Memory"] == 256 << 20 and hc["MemorySwap"] == 256 << 20 and hc["PidsLimit"] == 32 + 4
    assert hc["NanoCpus"] == 10 ** 9 and "size=32m" in hc["Tmpfs"]["/work"]
    labels = docker_engine.api.inspect_container(sb.container_id)["Config"]["Labels"]
    assert labels["creditflow.managed"] == "1" and labels["creditflow.owner_pid"] == str(os.getpid())
    r = sb.exec("id -u; pwd; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status")
    lines = r.stdout.decode().split("\n")
    assert lines[0] == "1000" and lines[1] == "/work"
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines
    assert sb.exec("touch /usr/x").exit_code != 0


def test_network_opt_in(docker_engine):
    from environments.sandbox.docker import DockerBackend

    with DockerBackend(_cfg(network=True), client=docker_engine) as b:
        s = b.create()
        assert docker_engine.api.inspect_container(s.container_id)["HostConfig"]["NetworkMode"] == "bridge"
        r = s.exec("cat /proc/net/dev")
        assert b"eth0" in r.stdout


# ----------------------------------------------------------------------------- exec


def test_exec_basics(sb):
    r = sb.exec("echo hello; echo oops >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code, r.reason) == (b"hello\n", b"oops\n", 3, "")
    assert sb.exec(["echo", "hi"]).stdout == b"hi\n"
    r = sb.exec(["/nonexistent/program"])
    assert r.reason == "error" and r.exit_code is None
    assert sb.exec("/nonexistent/program").exit_code == 127
    env = json.loads(sb.exec(["python3", "-c", "import os, json; print(json.dumps(dict(os.environ)))"]).stdout)
    assert env["HOME"] == "/work" and env["TMPDIR"] == "/work"
    with pytest.raises(ValueError):
        sb.exec("echo", timeout_s=0)
    with pytest.raises(ValueError):
        sb.exec([])
    with pytest.raises(TypeError):
        sb.exec("cat", stdin=123)  # type: ignore[arg-type]


def test_stdin_large_no_deadlock(backend):
    backend.cfg.max_output_bytes = 8_000_000
    sb = backend.create()
    data = os.urandom(3_000_000)
    r = sb.exec("cat", stdin=data, timeout_s=30)
    assert r.ok and r.stdout == data
    assert sb.exec("wc -c", stdin=b"").stdout.strip() == b"0"


def test_background_children_never_outlive_an_exec(sb):
    base = _procs(sb)
    r = sb.exec("sleep 30 & setsid sleep 30 & echo done")
    assert r.ok and r.stdout == b"done\n"
    assert _procs(sb) == base
    t0 = time.monotonic()
    r = sb.exec("sleep 30 & sleep 30", timeout_s=0.5)
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert r.reason == "timeout" and r.timed_out and r.exit_code is None
    assert _procs(sb) == base


def test_output_over_cap_but_finished_keeps_exit_code(backend):
    backend.cfg.max_output_bytes = 1000
    sb = backend.create()
    r = sb.exec(["python3", "-c", "import sys; sys.stdout.write('y' * 5000); sys.stderr.write('e' * 10)"])
    assert r.truncated and r.reason == "output_limit" and r.exit_code == 0
    assert r.stdout == b"y" * 1000 and r.stderr == b"e" * 10


def test_cpu_and_file_limits(docker_engine):
    from environments.sandbox.docker import DockerBackend

    with DockerBackend(_cfg(cpu_seconds=1, max_file_mb=1), client=docker_engine) as b:
        s = b.create()
        r = s.exec(["python3", "-c", "while True: pass"], timeout_s=20)
        assert r.reason in ("cpu_limit", "killed") and not r.timed_out, r
        r = s.exec("head -c 3000000 /dev/zero > big")  # (python ignores SIGXFSZ: it gets EFBIG instead)
        assert r.reason == "file_limit" and r.exit_code == -int(signal.SIGXFSZ), r


# ----------------------------------------------------------------------------- files


def test_file_api_and_confinement(sb):
    sb.write_file("a/b/c.txt", b"data")
    assert sb.read_file("a/b/c.txt") == b"data" and sb.read_file("a/../a/b/c.txt") == b"data"
    assert sb.exec("cat a/b/c.txt").stdout == b"data"
    for bad in ("/etc/passwd", "../escape", "a/../../escape", "", ".", "a/.."):
        with pytest.raises(ValueError):
            sb.write_file(bad, b"x")
        with pytest.raises(ValueError):
            sb.read_file(bad)
    sb.exec("ln -s /etc/passwd link")
    with pytest.raises(ValueError):
        sb.read_file("link")
    with pytest.raises(FileNotFoundError):
        sb.read_file("missing")
    with pytest.raises(IsADirectoryError):
        sb.read_file("a")
    with pytest.raises(ValueError):
        sb.write_file("huge", b"0" * ((sb.cfg.max_file_mb << 20) + 1))


# ----------------------------------------------------------------------------- snapshot / fork / reset / pool


@pytest.mark.parametrize("mode", ["archive", "commit"])
def test_snapshot_fork_independent(docker_engine, mode):
    from environments.sandbox.docker import DockerBackend, DockerSnapshot

    b = DockerBackend(_cfg(snapshot_mode=mode), client=docker_engine)
    try:
        sb = b.create()
        sb.write_file("state.txt", b"v1")
        sb.exec("mkdir -p d && echo inner > d/f && ln -s state.txt link && chmod 700 d")
        snap = sb.snapshot()
        assert isinstance(snap, DockerSnapshot) and snap.mode == mode
        if mode == "commit":
            assert labelled_images(docker_engine, session=b.session)
        sb.write_file("state.txt", b"v2")
        child = b.fork(snap)
        assert child.container_id != sb.container_id
        assert child.read_file("state.txt") == b"v1" and child.read_file("d/f") == b"inner\n"
        assert child.exec("cat link; stat -c %a d; stat -c %U state.txt").stdout == b"v1700\nsandbox\n"
        child.write_file("state.txt", b"child")
        assert sb.read_file("state.txt") == b"v2"
        other = b.fork(snap)
        other.write_file("extra", b"1")
        other.exec("sleep 30 &")
        other.reset()
        assert other.exec("ls -A").stdout == b"d\nlink\nstate.txt\n"
        b.drop_snapshot(snap)
        with pytest.raises(ValueError):
            b.fork(snap)
    finally:
        b.close()
    assert labelled(docker_engine, session=b.session) == []
    assert labelled_images(docker_engine, session=b.session) == []


def test_reset_empties_and_pool_reuses_clean_containers(backend):
    backend.warm()
    sb = backend.create()
    base = _procs(sb)
    sb.write_file("x.txt", b"1")
    sb.exec("mkdir -p deep/er && touch deep/er/f .hidden && chmod 000 deep/er && sleep 30 & true")
    sb.reset()
    assert sb.exec("ls -A").stdout == b"" and _procs(sb) == base
    sb.write_file("y", b"2")
    cid = sb.container_id
    sb.close()
    again = backend.create()
    assert again.container_id == cid  # the pool handed the same container back
    assert again.exec("ls -A").stdout == b""


def test_close_idempotent_and_rejects_use(backend, docker_engine):
    sb = backend.create()
    sb.close()
    sb.close()
    with pytest.raises(RuntimeError):
        sb.exec("echo hi")
    with pytest.raises(RuntimeError):
        sb.write_file("f", b"1")
    s2 = backend.create()
    s2.snapshot()
    backend.close()
    backend.close()
    assert s2.closed
    assert labelled(docker_engine, session=backend.session) == []
    with pytest.raises(RuntimeError):
        backend.create()


# ----------------------------------------------------------------------------- cleanup guarantees

CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from environments.sandbox import SandboxConfig
from environments.sandbox.docker import DockerBackend
b = DockerBackend(SandboxConfig(backend="docker", pool_size=1))
s = b.create()
s.exec("sleep 300 &")
print(b.session, flush=True)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(0)           # no close(): atexit must clean up
time.sleep(120)           # wait for SIGTERM / SIGKILL
"""


def _child(mode: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT)), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    session = p.stdout.readline().strip()
    assert session, p.stderr.read()
    return p, session


def _gone(client, session: str, within: float = 20.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not labelled(client, session=session):
            return True
        time.sleep(0.2)
    return False


def test_exit_without_close_leaves_nothing(docker_engine):
    p, session = _child("exit")
    assert p.wait(timeout=60) == 0
    assert _gone(docker_engine, session)


def test_sigterm_leaves_nothing(docker_engine):
    p, session = _child("term")
    assert labelled(docker_engine, session=session)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == -signal.SIGTERM
    assert _gone(docker_engine, session)


def test_crash_leftovers_removed_by_cleanup_stale(docker_engine):
    from environments.sandbox.docker import cleanup_stale

    p, session = _child("kill")
    p.kill()
    p.wait(timeout=30)
    assert labelled(docker_engine, session=session)  # kill -9: nothing could run
    assert cleanup_stale(docker_engine) >= 1
    assert labelled(docker_engine, session=session) == []
    # containers of a live owner are left alone
    from environments.sandbox.docker import DockerBackend

    with DockerBackend(_cfg(), client=docker_engine) as b:
        s = b.create()
        cleanup_stale(docker_engine)
        assert s.exec("echo still-here").stdout == b"still-here\n"


# ----------------------------------------------------------------------------- offline image


def test_image_build_is_idempotent_and_minimal(docker_engine, capsys):
    from environments.sandbox.image import DEFAULT_TAG, build_image, main

    image_id, _secs = build_image(DEFAULT_TAG, client=docker_engine)
    img = docker_engine.images.get(DEFAULT_TAG)
    assert img.id == image_id and img.labels["creditflow.managed"] == "1" and img.labels["creditflow.content_hash"]
    assert img.attrs["Config"]["User"] == "1000:1000"
    assert main(["--tag", DEFAULT_TAG]) == 0  # a second build finds the same content hash: same image
    assert image_id in capsys.readouterr().out
    out = docker_engine.containers.run(
        DEFAULT_TAG, ["sh", "-c", "python3 -c 'import json, sqlite3, ssl, ctypes, decimal; print(1)'; "
                      "ls /usr/lib/python3*/ | grep -cE '^(test|idlelib|site-packages)$'; id -u"],
        remove=True, network_mode="none",
    )
    assert out.split() == [b"1", b"0", b"1000"]
