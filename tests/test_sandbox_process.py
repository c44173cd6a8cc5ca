"""Process sandbox backend: exec, limits, faults as results, confinement, snapshot/fork/reset/close.

Every behaviour test runs twice: without isolation (``isolation=none``) and under bubblewrap
namespaces (``isolation=bwrap``; skipped, with the reason, where bwrap does not work).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from environments.sandbox import ProcessBackend, ProcessSnapshot, SandboxConfig, SandboxUnavailable, make_backend
from environments.sandbox import process as process_mod

#: the sandbox's python: the system one (under bwrap the trainer's venv is not visible)
PY = "python3"
#: loose hang guard for operations that must return "quickly" (never a speed assertion)
HANG_GUARD_S = 20.0


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (zombies are dead, merely unreaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    return data[data.rfind(")") + 2 :].split()[0] != "Z"


def _wait_dead(pid: int, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _bwrap_works() -> tuple[bool, str]:
    try:
        b = ProcessBackend(SandboxConfig(isolation="bwrap"))
    except SandboxUnavailable as exc:
        return False, str(exc)
    b.close()
    return True, ""


BWRAP_OK, BWRAP_WHY = _bwrap_works()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap isolation unavailable here: {BWRAP_WHY}")


def _host_procs_under(root: str) -> list[int]:
    """Live host processes whose cwd is inside ``root`` (works for processes in a pid namespace too)."""
    root = os.path.realpath(root)
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + os.sep)) and _alive(int(pid)):
            found.append(int(pid))
    return found


def _wait_no_procs_under(root: str, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while _host_procs_under(root) and time.monotonic() < end:
        time.sleep(0.05)
    return _host_procs_under(root) == []


def _gone(sb, pid_file: str) -> bool:
    """Nothing of the exec survives. The pid in ``pid_file`` is a host pid only without isolation
    (under bwrap it is a pid of the exec's own namespace), so it is checked only then."""
    ok = _wait_no_procs_under(sb.workdir)
    if sb.backend.isolation == "none":
        ok = _wait_dead(int(sb.read_file(pid_file))) and ok
    return ok


@pytest.fixture(params=["none", pytest.param("bwrap", marks=needs_bwrap)])
def backend(request, tmp_path):
    b = ProcessBackend(SandboxConfig(isolation=request.param), base_dir=str(tmp_path / "sbx"))
    assert b.isolation == request.param
    yield b
    b.close()


@pytest.fixture
def sb(backend):
    return backend.create()


def test_isolation_choice(tmp_path, monkeypatch):
    b = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path))  # auto
    assert b.isolation == ("bwrap" if BWRAP_OK else "none") and b.isolation_note
    assert b.network_isolated == BWRAP_OK
    b.close()
    b = ProcessBackend(SandboxConfig(isolation="none"), base_dir=str(tmp_path))
    assert b.isolation == "none" and not b.network_isolated
    b.close()
    with pytest.raises(ValueError, match="'jail'"):
        ProcessBackend(SandboxConfig(isolation="jail"), base_dir=str(tmp_path))
    # bwrap missing: auto falls back (and says so); bwrap required is a clear error
    monkeypatch.setattr(process_mod.shutil, "which", lambda name, *a, **k: None)
    b = ProcessBackend(SandboxConfig(isolation="auto"), base_dir=str(tmp_path))
    assert b.isolation == "none" and not b.network_isolated and "not installed" in b.isolation_note
    assert b.create().exec("echo ok").ok
    b.close()
    before = set(os.listdir(tmp_path))
    with pytest.raises(SandboxUnavailable, match="isolation='bwrap'.*bubblewrap"):
        ProcessBackend(SandboxConfig(isolation="bwrap"), base_dir=str(tmp_path))
    assert set(os.listdir(tmp_path)) == before  # no root directory left behind


@needs_bwrap
def test_bwrap_view(tmp_path):
    """Under bwrap: the system read-only, host files outside the work dir hidden, no network."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret.txt").write_text("s3cret")
    b = ProcessBackend(SandboxConfig(isolation="bwrap"), base_dir=str(tmp_path / "sbx"))
    try:
        sb = b.create()
        r = sb.exec(f"cat {host}/secret.txt; ls /root /home /work /etc/shadow /var; ls {tmp_path}")
        assert b"s3cret" not in r.stdout and r.stdout.split() == [b"sbx"], r  # only the path to the work dir
        for path in ("/usr/x", "/etc/x", "/tmp/x", "/dev/x", "/x", f"{tmp_path}/x"):
            assert sb.exec(f"echo x > {path}").exit_code != 0, path
        assert not (tmp_path / "x").exists()
        r = sb.exec("echo w > f && cat f && python3 -c 'print(1)'")
        assert r.ok and r.stdout == b"w\n1\n" and sb.read_file("f") == b"w\n", r
        r = sb.exec("cat /proc/net/dev; ls /proc | grep -c '^[0-9]'")
        ifaces = {line.split(b":")[0].strip() for line in r.stdout.splitlines()[2:-1]}
        assert ifaces == {b"lo"}, r
        assert int(r.stdout.splitlines()[-1]) <= 4, r  # own pid namespace: bwrap init, sh, ls, grep
    finally:
        b.close()
    b = ProcessBackend(SandboxConfig(isolation="bwrap", network=True), base_dir=str(tmp_path / "sbx2"))
    try:
        assert not b.network_isolated
        r = b.create().exec("cat /proc/net/dev")
        assert r.ok and len(r.stdout.splitlines()) == len(Path("/proc/net/dev").read_bytes().splitlines()), r
    finally:
        b.close()


def test_make_backend_choices(tmp_path):
    b = make_backend(SandboxConfig(backend="process"), base_dir=str(tmp_path))
    assert isinstance(b, ProcessBackend) and b.chosen == "process"
    b.close()
    from environments.sandbox.docker import docker_reachable

    b = make_backend(SandboxConfig(backend="auto"), base_dir=str(tmp_path))
    # auto: docker when an engine answers, else the process backend; it says which it chose
    assert b.requested == "auto" and b.chosen == ("docker" if docker_reachable()[0] else "process")
    b.close()
    with pytest.raises(ValueError, match="'podman'"):
        make_backend(SandboxConfig(backend="podman"))


def test_exec_echo(sb):
    r = sb.exec("echo hello; echo oops >&2; exit 3")
    assert r.stdout == b"hello\n" and r.stderr == b"oops\n"
    assert r.exit_code == 3 and r.reason == "" and not r.timed_out and not r.truncated
    assert not r.ok
    r = sb.exec(["echo", "hi"])
    assert r.ok and r.stdout == b"hi\n"


def test_exec_runs_in_workdir_with_minimal_env(sb):
    r = sb.exec([PY, "-c", "import os, json; print(json.dumps([os.getcwd(), dict(os.environ)]))"])
    cwd, env = json.loads(r.stdout)
    assert os.path.realpath(cwd) == os.path.realpath(sb.workdir)
    assert env["HOME"] == sb.workdir
    assert set(env) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PWD"}  # bwrap sets PWD


def test_stdin_large_no_deadlock(backend):
    backend.cfg.max_output_bytes = 8_000_000
    sb = backend.create()
    data = os.urandom(3_000_000)
    t0 = time.monotonic()
    r = sb.exec("cat", stdin=data, timeout_s=30)
    assert r.ok and r.stdout == data
    assert time.monotonic() - t0 < HANG_GUARD_S


def test_missing_program_is_a_result_not_an_exception(sb):
    r = sb.exec(["/nonexistent/program"])
    assert r.reason == "error" and r.exit_code is None
    r = sb.exec("/nonexistent/program")
    assert r.exit_code == 127


def test_timeout_kills_process_and_background_child(sb):
    t0 = time.monotonic()
    r = sb.exec("sleep 30 & echo $! > bg.pid; sleep 30", timeout_s=0.5)
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert r.reason == "timeout" and r.timed_out and r.exit_code is None
    assert _gone(sb, "bg.pid")


def test_background_child_killed_after_normal_exit(sb):
    r = sb.exec("sleep 30 & echo $! > bg.pid; echo done", timeout_s=10)
    assert r.ok and r.stdout == b"done\n"
    assert _gone(sb, "bg.pid")


def test_sigterm_ignoring_process_killed_at_timeout(sb):
    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "open('me.pid', 'w').write(str(os.getpid()))\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.01)\n"
    )
    t0 = time.monotonic()
    r = sb.exec([PY, "-c", code], timeout_s=1.0)
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert r.reason == "timeout" and r.stdout == b"ready\n"
    assert _gone(sb, "me.pid")


def test_huge_output_truncated_and_killed(backend):
    backend.cfg.max_output_bytes = 1_000_000
    sb = backend.create()
    code = "import sys\nfor _ in range(50): sys.stdout.write('x' * 1_000_000)\n"
    t0 = time.monotonic()
    r = sb.exec([PY, "-c", code], timeout_s=60)
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert r.truncated and r.reason == "output_limit"
    assert len(r.stdout) == 1_000_000 and set(r.stdout) == {ord("x")}
    assert r.exit_code is None  # killed: produced more than 10x the cap


def test_output_over_cap_but_finished_keeps_exit_code(backend):
    backend.cfg.max_output_bytes = 1000
    sb = backend.create()
    r = sb.exec([PY, "-c", "import sys; sys.stdout.write('y' * 5000); sys.stderr.write('e' * 10)"])
    assert r.truncated and r.reason == "output_limit" and r.exit_code == 0
    assert r.stdout == b"y" * 1000 and r.stderr == b"e" * 10


def test_memory_hog_fails(backend):
    backend.cfg.memory_mb = 256
    sb = backend.create()
    r = sb.exec([PY, "-c", "x = bytearray(2 * 1024 ** 3); print('allocated')"], timeout_s=30)
    assert b"allocated" not in r.stdout
    assert not r.ok
    assert r.reason in ("killed", "oom") or b"MemoryError" in r.stderr


def test_cpu_limit(backend):
    backend.cfg.cpu_seconds = 1
    sb = backend.create()
    r = sb.exec([PY, "-c", "while True: pass"], timeout_s=30)
    assert r.reason in ("cpu_limit", "killed") and not r.timed_out


def test_file_size_limit(backend):
    backend.cfg.max_file_mb = 1
    sb = backend.create()
    r = sb.exec([PY, "-c", "open('big', 'wb').write(b'0' * 3_000_000)"])
    assert not r.ok
    assert os.path.getsize(os.path.join(sb.workdir, "big")) <= 1 << 20


def test_process_limit(backend):
    backend.cfg.max_processes = 8
    sb = backend.create()
    t0 = time.monotonic()
    r = sb.exec("for i in $(seq 40); do sleep 20 & done; wait", timeout_s=30)
    assert time.monotonic() - t0 < HANG_GUARD_S
    if backend.isolation == "bwrap" or os.geteuid() == 0:
        # the pids check sees the exec's processes (its session; under bwrap, its pid namespace)
        assert r.reason == "process_limit" and r.exit_code is None, r
    else:  # RLIMIT_NPROC may stop the forks first
        assert r.reason in ("process_limit", "killed") or r.exit_code != 0
    assert _wait_no_procs_under(sb.workdir)


def test_process_limit_counts_setsid_children(backend):
    """A program that detaches its children with setsid: under bwrap they are still counted."""
    backend.cfg.max_processes = 8
    sb = backend.create()
    code = "import os, time\nfor _ in range(20):\n    if os.fork() == 0:\n        os.setsid(); time.sleep(20); os._exit(0)\ntime.sleep(20)\n"
    r = sb.exec([PY, "-c", code], timeout_s=5)
    if backend.isolation == "bwrap":
        assert r.reason == "process_limit", r
        assert _wait_no_procs_under(sb.workdir)  # the namespace died with the exec: no reset needed
    else:  # documented: setsid escapes the session count and the group kill; reset cleans up
        assert r.reason in ("timeout", "process_limit"), r
        sb.reset()
        assert _wait_no_procs_under(sb.workdir)


def test_signal_exit_is_reported_as_signal(backend):
    sb = backend.create()
    r = sb.exec([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert r.exit_code == -9 and r.reason == "killed", r
    r = sb.exec("exit 7")
    assert r.exit_code == 7 and r.reason == "", r


def test_invalid_utf8_output_bytes(sb):
    payload = b"\xff\xfe\x00abc\xc3\x28\n"
    r = sb.exec([PY, "-c", f"import sys; sys.stdout.buffer.write({payload!r}); sys.stderr.buffer.write(b'\\x80')"])
    assert r.ok and r.stdout == payload and r.stderr == b"\x80"


def test_file_confinement(sb, tmp_path):
    sb.write_file("a/b/c.txt", b"data")
    assert sb.read_file("a/b/c.txt") == b"data"
    assert sb.read_file("a/../a/b/c.txt") == b"data"
    assert sb.exec("cat a/b/c.txt").stdout == b"data"
    for bad in ("/etc/passwd", "../escape", "a/../../escape", "", ".", "a/.."):
        with pytest.raises(ValueError):
            sb.write_file(bad, b"x")
        with pytest.raises(ValueError):
            sb.read_file(bad)
    # a symlink planted by the sandboxed program cannot be used to leave the work directory
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    sb.exec(["ln", "-s", str(outside), "link"])
    sb.exec(["ln", "-s", str(tmp_path), "dirlink"])
    with pytest.raises(ValueError):
        sb.read_file("link")
    with pytest.raises(ValueError):
        sb.write_file("dirlink/new.txt", b"x")
    assert not (tmp_path / "new.txt").exists()
    with pytest.raises(ValueError):
        sb.write_file("huge", b"0" * ((sb.cfg.max_file_mb << 20) + 1))


def test_snapshot_fork_independent(backend, sb):
    sb.write_file("state.txt", b"v1")
    sb.exec("mkdir -p d && echo inner > d/f && ln -s state.txt link")
    snap = sb.snapshot()
    assert isinstance(snap, ProcessSnapshot)
    sb.write_file("state.txt", b"v2")
    sb.exec("rm -r d")

    child = backend.fork(snap)
    assert child.workdir != sb.workdir
    assert child.read_file("state.txt") == b"v1"
    assert child.read_file("d/f") == b"inner\n"
    assert os.path.islink(os.path.join(child.workdir, "link"))
    assert child.exec("cat link").stdout == b"v1"
    child.write_file("state.txt", b"child")
    assert sb.read_file("state.txt") == b"v2"

    other = backend.fork(snap)  # a snapshot can be forked many times
    assert other.read_file("state.txt") == b"v1"
    # reset of a forked sandbox returns it to its creation state: the snapshot
    other.write_file("extra", b"1")
    other.reset()
    assert other.read_file("state.txt") == b"v1" and not os.path.exists(os.path.join(other.workdir, "extra"))

    backend.drop_snapshot(snap)
    with pytest.raises(ValueError):
        backend.fork(snap)


def test_snapshot_skips_fifos(backend, sb):
    sb.exec("mkfifo pipe && echo x > file")
    snap = sb.snapshot()
    child = backend.fork(snap)
    assert child.read_file("file") == b"x\n"
    assert not os.path.exists(os.path.join(child.workdir, "pipe"))


def test_reset_empties(sb):
    sb.write_file("x.txt", b"1")
    sb.exec("mkdir -p deep/er && touch deep/er/f && chmod 000 deep/er")
    sb.reset()
    assert os.listdir(sb.workdir) == []
    assert sb.exec("echo again").stdout == b"again\n"


def test_close_removes_dir_idempotent_and_rejects_use(backend):
    sb = backend.create()
    sb.write_file("f", b"1")
    wd = sb.workdir
    sb.close()
    sb.close()
    assert not os.path.exists(wd)
    assert sb not in backend.sandboxes
    with pytest.raises(RuntimeError):
        sb.exec("echo hi")
    with pytest.raises(RuntimeError):
        sb.write_file("f", b"1")


def test_context_manager_and_backend_close(tmp_path):
    b = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path))
    with b.create() as s1:
        wd1 = s1.workdir
    assert not os.path.exists(wd1)
    s2, s3 = b.create(), b.create()
    snap = s2.snapshot()
    b.close()
    b.close()
    assert s2.closed and s3.closed
    assert not os.path.exists(s2.workdir) and not os.path.exists(snap.path)
    assert not os.path.exists(b.root)
    with pytest.raises(RuntimeError):
        b.create()


def test_bad_arguments_raise(sb):
    with pytest.raises(ValueError):
        sb.exec("echo", timeout_s=0)
    with pytest.raises(ValueError):
        sb.exec([])
    with pytest.raises(TypeError):
        sb.exec("cat", stdin=123)  # type: ignore[arg-type]
