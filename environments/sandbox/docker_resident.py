"""Resident executor of a docker sandbox: one long-lived exec per container (survey §8.2: reset cost).

``docker exec`` costs ~50-60 ms per command here (exec create + start + inspect through the
engine), which capped a code episode at ~3.6 episodes/s. As SWE-ReX and the OpenHands runtime
do, each container instead keeps one long-lived exec, a small Python server (:data:`EXECUTOR_SRC`,
passed as ``python3 -I -S -c SRC``: the root filesystem is read-only and the image need not
change), and commands travel over that exec's hijacked socket.

Protocol (over the exec's stdin and its demultiplexed stdout stream)
--------------------------------------------------------------------
At start the executor sends ``b"h" + u32 0`` (hello: until it arrives, a failure means the
command never ran and the per-exec path runs it). A request: ``u32 n`` + ``n`` bytes of JSON ``{argv, stdin, timeout, cap, kill_at}`` + ``stdin``
bytes (``stdin`` is the byte count, -1 for none); the executor streams them into the command
while it runs. Reply: any number of ``b"o"|b"e" + u32 n + n bytes`` output frames (at most
``cap`` bytes per stream are sent) and one ``b"r" + u32 n + JSON`` frame ``{rc, killed, seen,
error, oom, cpu}``. ``{"op": "write" | "read", "path": p}`` and ``{"op": "wipe"}`` requests are
file operations the executor does itself (no fork): the write/read of a path resolved inside
``/work`` (exit codes 98 outside, 95 a directory, 96 missing, as the per-exec shell snippets) and
the reset of ``/work`` and ``/dev/shm`` after killing every process. ``rc`` is the status the way the shell reports it (128+N for a death by
signal N), so the backend reads it exactly as the old per-exec path's wrapper status.

Semantics (the same as the per-exec path)
-----------------------------------------
The executor runs as uid 1000 in ``/work`` like every exec (``cap_drop=ALL`` rules out a root
executor that setuids its children). Each command runs in its own session with the executor's
environment; the executor's own handlers and ignored signals do not reach it (``SIGPIPE`` and
``SIGXFSZ`` are restored; ``SIGXCPU`` has a Python handler, reset at exec). Process trees end
the way they did: ``kill(-1, SIGKILL)`` as uid 1000, which on Linux signals every process the
caller may signal *except the caller itself* (kill(2), NOTES) -- so the executor survives it and
``setsid``, double forks and daemons do not. It is repeated until nothing is left (fork bombs),
before each command, when a command returns (background children), at the deadline and when a
stream passes ``kill_at`` bytes. The container's init and main process run as root and are out of
reach. The exit status comes from ``waitpid`` via a pidfd; ``oom`` is the cgroup's ``oom_kill``
counter read by the executor after each command (no second exec); ``cpu`` is the executor's own
CPU time, because the per-process ``cpu`` ulimit applies to it too: the backend retires an
executor past half of ``cpu_seconds``.

Failure and fallback
--------------------
A command can kill the executor (``kill -9 -1``, ``pkill -u 1000``; the OOM killer could pick it),
or the host may see no reply by the deadline plus a grace. Then the backend ends the exec's
processes through the per-exec path's kill helper, returns ``killed``/``oom``/``timeout`` for that
command, and starts a new executor on the next exec; while one cannot start (pids exhausted), the
per-exec path runs the command. The executor has no privilege the commands lack (same uid, same
container): a command that ptraces it can only falsify its own results.
"""

from __future__ import annotations

import json
import logging
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger("creditflow.sandbox")

#: the executor (runs inside the container under ``python3 -I -S -c``); see the module docstring
EXECUTOR_SRC = r'''
import json, os, resource, selectors, shutil, signal, subprocess, sys, time
signal.signal(signal.SIGXCPU, lambda *a: None)
R, W = 0, 1
CHUNK = 65536
def readn(n):
    buf = bytearray()
    while len(buf) < n:
        b = os.read(R, n - len(buf))
        if not b:
            sys.exit(0)
        buf += b
    return bytes(buf)
def send(kind, data):
    msg = memoryview(kind + len(data).to_bytes(4, "big") + data)
    while msg:
        msg = msg[os.write(W, msg):]
def killall():
    for _ in range(200):
        try:
            os.kill(-1, 9)
        except ProcessLookupError:
            return
        except OSError:
            return
def oom():
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == "oom_kill":
                        return int(v)
        except (OSError, ValueError):
            pass
    return -1
def run(h):
    argv, left_in, cap, kill_at = h["argv"], h["stdin"], h["cap"], h["kill_at"]
    deadline = time.monotonic() + h["timeout"]
    res = {"rc": None, "killed": "", "seen": [0, 0], "error": ""}
    try:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if left_in >= 0 else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/work", start_new_session=True)
    except OSError as e:
        readn(max(left_in, 0))
        res["error"] = "creditflow: cannot start %s: %s" % (argv[0], e)
        return res
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(p.pid)
    sel.register(pidfd, selectors.EVENT_READ, "pid")
    sel.register(p.stdout.fileno(), selectors.EVENT_READ, 0)
    sel.register(p.stderr.fileno(), selectors.EVENT_READ, 1)
    sent = [0, 0]
    pending = b""
    cin = p.stdin.fileno() if p.stdin else -1
    if cin >= 0:
        os.set_blocking(cin, False)
        if left_in > 0:
            sel.register(R, selectors.EVENT_READ, "in")
        else:
            p.stdin.close(); cin = -1
    status = None
    streams = 2
    while streams or status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            res["killed"] = "timeout"
            break
        for key, _ in sel.select(left):
            d = key.data
            if d == "pid":
                status = os.waitpid(p.pid, 0)[1]
                sel.unregister(pidfd); os.close(pidfd); pidfd = -1
                killall()
            elif d == "in":
                b = os.read(R, min(left_in, CHUNK))
                if not b:
                    sys.exit(0)
                left_in -= len(b)
                if cin >= 0:
                    if not pending:
                        sel.register(cin, selectors.EVENT_WRITE, "w")
                    pending += b
                if left_in == 0 or len(pending) > 4 * CHUNK:
                    sel.unregister(R)
            elif d == "w":
                broken = False
                try:
                    pending = pending[os.write(cin, pending[:CHUNK]):]
                except BlockingIOError:
                    continue
                except OSError:  # the command stopped reading: the rest of stdin is discarded
                    pending, broken = b"", True
                if broken or not pending:
                    sel.unregister(cin)
                    if broken or left_in == 0:
                        p.stdin.close(); cin = -1
                if left_in > 0 and len(pending) <= 4 * CHUNK and R not in sel.get_map():
                    sel.register(R, selectors.EVENT_READ, "in")
            else:
                try:
                    b = os.read(key.fd, CHUNK)
                except OSError:
                    b = b""
                if not b:
                    sel.unregister(key.fd); streams -= 1
                    continue
                res["seen"][d] += len(b)
                room = cap - sent[d]
                if room > 0:
                    part = b[:room]
                    sent[d] += len(part)
                    send(b"oe"[d:d + 1], part)
        if max(res["seen"]) > kill_at:
            res["killed"] = "output_limit"
            break
    killall()
    if status is None:
        status = os.waitpid(p.pid, 0)[1]
    p.returncode = 0
    sel.close()
    if pidfd >= 0:
        os.close(pidfd)
    for f in (p.stdin, p.stdout, p.stderr):
        try:
            f and f.close()
        except OSError:
            pass
    if left_in > 0:
        readn(left_in)
    res["rc"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    return res
send(b"h", b"")
def resolve(path):
    p = os.path.realpath(os.path.join("/work", path))
    return p if p.startswith("/work/") and len(p) > 6 else None
def unlock(d):
    if not os.path.islink(d):
        try:
            os.chmod(d, 0o700)
        except OSError:
            pass
def fileop(h):
    op, left_in = h["op"], max(h["stdin"], 0)
    res = {"rc": 0, "killed": "", "seen": [0, 0], "error": ""}
    p = resolve(h.get("path", ""))
    try:
        if op == "wipe":
            killall()
            for root in ("/work", "/dev/shm"):
                for name in os.listdir(root):
                    q = os.path.join(root, name)
                    if os.path.isdir(q) and not os.path.islink(q):
                        unlock(q)
                        for d, dirs, _ in os.walk(q):
                            for x in dirs:
                                unlock(os.path.join(d, x))
                        shutil.rmtree(q, ignore_errors=True)
                    else:
                        try:
                            os.unlink(q)
                        except OSError:
                            pass
            res["rc"] = 1 if os.listdir("/work") else 0
        elif p is None:
            res["rc"] = 98
        elif op == "write":
            if os.path.isdir(p):
                res["rc"] = 95
            else:
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "wb") as f:
                    while left_in:
                        b = os.read(R, min(left_in, CHUNK))
                        if not b:
                            sys.exit(0)
                        left_in -= len(b)
                        f.write(b)
        elif op == "read":
            if not os.path.exists(p):
                res["rc"] = 96
            elif os.path.isdir(p):
                res["rc"] = 95
            else:
                with open(p, "rb") as f:
                    while True:
                        b = f.read(min(CHUNK * 16, h["cap"] - res["seen"][0]))
                        if not b:
                            break
                        res["seen"][0] += len(b)
                        send(b"o", b)
    except OSError as e:
        res["rc"] = 1
        send(b"e", ("%s: %s\n" % (h.get("path", ""), e)).encode(errors="replace"))
    if left_in:
        readn(left_in)
    return res
while True:
    h = json.loads(readn(int.from_bytes(readn(4), "big")))
    if h.get("op", "exec") != "exec":
        res = fileop(h)
    else:
        killall()
        res = run(h)
    res["oom"] = oom()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu"] = ru.ru_utime + ru.ru_stime
    send(b"r", json.dumps(res).encode())
'''

_CHUNK = 65536
#: extra seconds the host waits for a reply past the command's own deadline before it gives up
REPLY_GRACE_S = 10.0


class ExecutorGone(RuntimeError):
    """The resident executor died (``hung=False``) or stopped answering (``hung=True``)."""

    def __init__(self, msg: str, hung: bool = False, started: bool = True):
        super().__init__(msg)
        self.hung = hung
        #: False when the executor never came up (no hello): the command was not run
        self.started = started


@dataclass
class Reply:
    rc: Optional[int]
    stdout: bytes
    stderr: bytes
    seen_out: int
    seen_err: int
    killed: str
    error: str
    oom: int
    cpu: float
    wall: float


class Resident:
    """Host side of one container's resident executor (one command at a time; callers hold a lock)."""

    def __init__(self, api: Any, container_id: str, user: str, workdir: str, env: dict[str, str]):
        self.api = api
        self.container_id = container_id
        self.exec_id = api.exec_create(
            container_id, ["python3", "-I", "-S", "-c", EXECUTOR_SRC], stdin=True, user=user,
            workdir=workdir, environment=env,
        )["Id"]
        self._resp = api.exec_start(self.exec_id, socket=True)
        self.sock: socket.socket = getattr(self._resp, "_sock", self._resp)
        self.sock.setblocking(False)
        self._demux = bytearray()  # docker's 8-byte-header frames not yet parsed
        self._data = bytearray()  # stream 1 payload: the executor's reply frames
        self.diag = bytearray()  # stream 2: the executor's own stderr (tracebacks)
        self.alive = True
        self.cpu = 0.0
        self.commands = 0
        self.ready = False  # the executor's hello frame arrived

    def _feed(self, chunk: bytes) -> None:
        buf = self._demux
        buf += chunk
        pos = 0
        while len(buf) - pos >= 8:
            size = int.from_bytes(buf[pos + 4 : pos + 8], "big")
            if len(buf) - pos < 8 + size:
                break
            if buf[pos] == 1:
                self._data += buf[pos + 8 : pos + 8 + size]
            elif buf[pos] == 2:
                self.diag = (self.diag + buf[pos + 8 : pos + 8 + size])[-2048:]
            pos += 8 + size
        del buf[:pos]

    def run(self, argv: list[str], stdin: Optional[bytes], timeout: float, cap: int, kill_at: int,
            op: Optional[dict] = None) -> Reply:
        """One command (``op``: a file operation the executor does itself, no fork: ``{"op": "write"
        | "read", "path": ...}`` or ``{"op": "wipe"}``); raises :class:`ExecutorGone` when the
        executor dies or does not answer."""
        t0 = time.monotonic()
        head = json.dumps({"argv": argv, "stdin": -1 if stdin is None else len(stdin), "timeout": timeout,
                           "cap": cap, "kill_at": kill_at, **(op or {})}).encode()
        out = memoryview(len(head).to_bytes(4, "big") + head + (bytes(stdin) if stdin else b""))
        bufs = {b"o": bytearray(), b"e": bytearray()}
        if not self.alive:
            raise ExecutorGone("the resident executor is closed", started=False)
        result: Optional[dict] = None
        deadline = t0 + timeout + REPLY_GRACE_S + (len(stdin) / 5e6 if stdin else 0.0)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        try:
            while result is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise ExecutorGone("no reply from the resident executor", hung=True)
                for _key, mask in sel.select(timeout=left):
                    if mask & selectors.EVENT_WRITE and out:
                        try:
                            out = out[self.sock.send(out[:_CHUNK]):]
                        except BlockingIOError:
                            pass
                        except OSError as exc:
                            self.close()
                            raise ExecutorGone(f"resident executor gone ({exc})") from None
                        if not out:
                            sel.modify(self.sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = self.sock.recv(_CHUNK * 4)
                        except BlockingIOError:
                            continue
                        except OSError:
                            chunk = b""
                        if not chunk:
                            self.close()
                            raise ExecutorGone("the resident executor died"
                                               + (f": {bytes(self.diag[-300:])!r}" if self.diag else ""),
                                               started=self.ready)
                        self._feed(chunk)
                        data = self._data
                        pos = 0
                        while len(data) - pos >= 5:
                            size = int.from_bytes(data[pos + 1 : pos + 5], "big")
                            if len(data) - pos < 5 + size:
                                break
                            kind = bytes(data[pos : pos + 1])
                            payload = data[pos + 5 : pos + 5 + size]
                            pos += 5 + size
                            if kind == b"r":
                                result = json.loads(bytes(payload))
                                break
                            if kind == b"h":
                                self.ready = True
                            else:
                                bufs[kind] += payload
                        del data[:pos]
        finally:
            sel.close()
        self.commands += 1
        self.cpu = float(result.get("cpu", 0.0))
        seen = result.get("seen", [0, 0])
        return Reply(rc=result.get("rc"), stdout=bytes(bufs[b"o"]), stderr=bytes(bufs[b"e"]), seen_out=seen[0],
                     seen_err=seen[1], killed=result.get("killed", ""), error=result.get("error", ""),
                     oom=int(result.get("oom", -1)), cpu=self.cpu, wall=time.monotonic() - t0)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait for the executor's hello (it has started); False (and closed) when it does not come."""
        end = time.monotonic() + timeout
        while not self.ready and self.alive and time.monotonic() < end:
            sel = selectors.DefaultSelector()
            sel.register(self.sock, selectors.EVENT_READ)
            try:
                if not sel.select(timeout=max(end - time.monotonic(), 0.0)):
                    continue
                try:
                    chunk = self.sock.recv(_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
            finally:
                sel.close()
            if not chunk:
                break
            self._feed(chunk)
            data = self._data
            if len(data) >= 5 and data[:1] == b"h":
                del data[:5]
                self.ready = True
        if not self.ready:
            self.close()
        return self.ready

    def close(self) -> None:
        """Close the socket (the executor reads EOF and exits; a hung one is killed by the caller)."""
        self.alive = False
        for c in (self.sock, self._resp):
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
