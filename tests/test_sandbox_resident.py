"""Docker sandbox: the resident executor against the per-exec path (survey §8.2: reset cost, safety).

Both transports (``sandbox.docker_exec=resident`` and ``exec``) must give the same results; the
resident one must serve every command of a sandbox through one long-lived exec, survive the
process-tree kill it performs, and recover when a command kills or stops it.
"""

from __future__ import annotations

import time

import pytest

from tests.docker_support import docker_cfg as _cfg
from tests.docker_support import docker_engine, docker_session_cleanup, labelled  # noqa: F401

HANG_GUARD_S = 30.0


@pytest.fixture
def make(docker_engine):
    from environments.sandbox.docker import DockerBackend

    made = []

    def _make(**kw):
        b = DockerBackend(_cfg(**kw), client=docker_engine)
        made.append(b)
        return b

    yield _make
    for b in made:
        b.close()
        assert labelled(docker_engine, session=b.session) == []


def _procs(sb) -> int:
    r = sb.exec("n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n")
    assert r.ok, r
    return int(r.stdout)


def _outcomes(sb) -> list[tuple]:
    """What a small matrix of commands returns (reason, exit code, output) in this sandbox."""
    out = []
    r = sb.exec("echo hello; echo oops >&2; exit 3")
    out.append((r.reason, r.exit_code, r.stdout, r.stderr))
    r = sb.exec(["/nonexistent/program"])
    out.append((r.reason, r.exit_code))
    r = sb.exec("cat", stdin=b"x" * 300_000)
    out.append((r.reason, r.exit_code, len(r.stdout)))
    r = sb.exec("sleep 30 & setsid sleep 30 & sleep 30", timeout_s=0.5)
    out.append((r.reason, r.exit_code, r.timed_out))
    r = sb.exec("head -c 50000000 /dev/zero")
    out.append((r.reason, r.exit_code, r.truncated, len(r.stdout)))
    r = sb.exec(["python3", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    out.append((r.reason, r.exit_code))
    sb.write_file("d/f.txt", b"abc")
    out.append(sb.read_file("d/f.txt"))
    sb.exec("ln -s /etc e")
    with pytest.raises(ValueError):
        sb.read_file("e/passwd")
    sb.reset()
    out.append(sb.exec("ls -A").stdout)
    return out


def test_resident_and_per_exec_paths_agree(make):
    results = {}
    for mode in ("resident", "exec"):
        b = make(docker_exec=mode, max_output_bytes=100_000)
        sb = b.create()
        base = _procs(sb)
        results[mode] = _outcomes(sb)
        assert _procs(sb) == base, mode  # nothing of the matrix survives
    assert results["resident"] == results["exec"]
    assert results["resident"][0] == ("", 3, b"hello\n", b"oops\n")
    assert results["resident"][3] == ("timeout", None, True)
    assert results["resident"][4] == ("output_limit", None, True, 100_000)
    assert results["resident"][5] == ("killed", -11)


def test_one_executor_serves_every_command(make):
    b = make()
    sb = b.create()
    sb.exec("true")
    res = b._residents[sb.container_id]
    before = res.commands
    exec_id = res.exec_id
    t0 = time.monotonic()
    for i in range(30):
        assert sb.exec(["echo", str(i)]).stdout == f"{i}\n".encode()
    per_exec = (time.monotonic() - t0) / 30
    assert b._residents[sb.container_id] is res and res.exec_id == exec_id
    assert res.commands == before + 30
    # the executor kills every process of uid 1000 after each command, yet it is still there
    assert b.api.exec_inspect(exec_id)["Running"]
    assert per_exec < 1.0  # a hang guard only; the benchmark measures speed


def test_a_command_that_kills_the_executor(make):
    b = make()
    sb = b.create()
    base = _procs(sb)
    r = sb.exec("sleep 30 & kill -9 -1; echo never")
    assert r.reason == "killed" and r.exit_code is None and b"resident executor died" in r.stderr, r
    r = sb.exec("echo alive")
    assert r.ok and r.stdout == b"alive\n", r
    assert _procs(sb) == base  # the kill helper ended the rest; a new executor took over


def test_a_stopped_executor_is_given_up_at_the_deadline(make, monkeypatch):
    from environments.sandbox import docker_resident

    monkeypatch.setattr(docker_resident, "REPLY_GRACE_S", 1.0)
    b = make()
    sb = b.create()
    base = _procs(sb)
    t0 = time.monotonic()
    r = sb.exec("kill -STOP $PPID; sleep 30", timeout_s=1.0)
    assert time.monotonic() - t0 < HANG_GUARD_S
    assert r.reason == "timeout" and r.timed_out and r.exit_code is None, r
    assert sb.exec("echo alive").stdout == b"alive\n"
    assert _procs(sb) == base


def test_per_exec_fallback_when_no_executor_starts(make, monkeypatch):
    from environments.sandbox import docker as docker_mod

    b = make()
    sb = b.create()
    b._drop_resident(sb.container_id)

    def refuse(*a, **k):
        raise RuntimeError("no pids left")

    monkeypatch.setattr(docker_mod, "Resident", refuse)
    r = sb.exec("echo via docker exec", timeout_s=5)
    assert r.ok and r.stdout == b"via docker exec\n", r
    assert sb.container_id not in b._residents
    r = sb.exec("sleep 30", timeout_s=0.5)
    assert r.reason == "timeout", r


def test_oom_of_an_earlier_sandbox_is_not_blamed_on_the_next(make):
    b = make(pool_size=1)
    b.warm()
    a = b.create()
    cid = a.container_id
    r = a.exec(["python3", "-c", "x = bytearray(1024 ** 3)"], timeout_s=20)
    assert r.reason == "oom", r
    a.close()
    b.warm()
    nxt = b.create()
    assert nxt.container_id == cid  # the same pooled container, its oom_kill counter already > 0
    r = nxt.exec(["python3", "-c", "import os; os.kill(os.getpid(), 9)"])
    assert r.reason == "killed" and r.exit_code == -9, r
