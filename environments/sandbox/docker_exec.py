"""``docker exec`` transport of a docker sandbox (survey §8.2: safety during training).

The per-exec path, kept as the fallback of the resident executor (and as ``docker_exec=exec``):
one ``docker exec`` per command, its raw hijacked socket driven non-blocking (``selectors``),
stdin fed concurrently and half-closed at its end, stdout/stderr frames demultiplexed, each stream
capped; at the deadline a second exec runs ``kill -9 -1`` as uid 1000. Also the in-container shell
snippets and constants both paths share. Part of :mod:`environments.sandbox.docker`.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from environments.sandbox.image import SANDBOX_UID

log = logging.getLogger("creditflow.sandbox")

_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
_WORK = "/work"
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": _WORK,
    "TMPDIR": _WORK,
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
}
_CHUNK = 65536
_KILL_FACTOR = 10  # a stream producing more than this many times the cap gets its exec killed
_DRAIN_GRACE_S = 1.0
_PIDS_HEADROOM = 4
_MIB = 1 << 20
_SNAP_DIR = "/creditflow-snapshot"
#: runs the command; afterwards kills every other process of the sandbox user (background children)
_WRAPPER = (
    'if ! command -v -- "$1" >/dev/null 2>&1; then printf "creditflow: cannot start %s\\n" "$1" >&2; exit 127; fi; '
    '"$@"; rc=$?; kill -9 -1 2>/dev/null; exit $rc'
)
_CANNOT_START = b"creditflow: cannot start "
_KILL_ALL = "kill -9 -1 2>/dev/null; kill -9 -1 2>/dev/null; kill -9 -1 2>/dev/null; exit 0"
#: reset of the work dir; the resident executor kills every process before it, the per-exec path in it
_WIPE_BODY = (
    "chmod -R u+rwX /work 2>/dev/null; "
    "rm -rf /work/* /work/.[!.]* /work/..?* /dev/shm/* /dev/shm/.[!.]* 2>/dev/null; "
    'if [ "$1" = untar ]; then tar -C /work --no-overwrite-dir -xf - || exit 1; fi; '
    'if [ "$1" = copy ]; then cp -a ' + _SNAP_DIR + "/. /work/ || exit 1; fi; "
    'if [ "$1" = empty ] && [ -n "$(ls -A /work)" ]; then exit 1; fi; exit 0'
)
_WIPE = "kill -9 -1 2>/dev/null; kill -9 -1 2>/dev/null; " + _WIPE_BODY
#: resolve a path inside /work (symlinks included) or fail with 98
_RESOLVE = 'p=$(realpath -m -- "$1") || exit 98; case "$p" in /work/?*) ;; *) exit 98;; esac; '
_SIGXCPU, _SIGXFSZ, _SIGKILL = int(signal.SIGXCPU), int(signal.SIGXFSZ), int(signal.SIGKILL)


class _Frames:
    """Incremental parser of docker's multiplexed stream (8-byte header: stream, 0, 0, 0, size)."""

    def __init__(self, cap: int):
        self.cap = cap
        self.buf = bytearray()
        self.out = {1: bytearray(), 2: bytearray()}
        self.seen = {1: 0, 2: 0}
        self.tail = bytearray()  # last bytes of stderr (the wrapper's message survives truncation)

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 8:
            size = int.from_bytes(self.buf[4:8], "big")
            if len(self.buf) < 8 + size:
                break
            stream = self.buf[0]
            payload = bytes(self.buf[8 : 8 + size])
            del self.buf[: 8 + size]
            if stream not in self.out:
                continue
            room = self.cap - len(self.out[stream])
            if room > 0:
                self.out[stream] += payload[:room]
            self.seen[stream] += len(payload)
            if stream == 2:
                self.tail = (self.tail + payload)[-256:]


@dataclass
class _Raw:
    exit_code: Optional[int]
    stdout: bytes
    stderr: bytes
    seen_out: int
    seen_err: int
    killed_reason: str
    wall: float
    stderr_tail: bytes = b""
    #: the cgroup's oom_kill counter after the command (resident executor), None when not read
    oom: Optional[int] = None


def _recv(sock: socket.socket) -> Optional[bytes]:
    """Up to one chunk from a non-blocking socket; None when nothing is there, b"" at its end."""
    try:
        return sock.recv(_CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def raw_exec(
    api: Any,
    container_id: str,
    argv: list[str],
    stdin: Optional[bytes],
    timeout: float,
    cap: int,
    kill_at: Optional[int] = None,
    kill_all: Optional[Callable[[], None]] = None,
    name: str = "",
) -> _Raw:
    """Run ``argv`` in the container through ``docker exec``, driving the hijacked socket; never
    raises for what the program does. At the deadline or past ``kill_at`` output bytes
    ``kill_all`` (default :func:`kill_all_helper`) ends the exec's processes from another thread."""
    t0 = time.monotonic()
    kill_at = max(cap * _KILL_FACTOR, _CHUNK) if kill_at is None else kill_at
    eid = api.exec_create(
        container_id, argv, stdin=stdin is not None, user=_USER, workdir=_WORK, environment=_ENV
    )["Id"]
    resp = api.exec_start(eid, socket=True)
    sock: socket.socket = getattr(resp, "_sock", resp)
    frames = _Frames(cap)
    killed = ""
    sel = selectors.DefaultSelector()
    try:
        sock.setblocking(False)
        view = memoryview(stdin) if stdin is not None else None
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if view is not None else 0)
        sel.register(sock, events)
        if view is not None and not len(view):
            sock.shutdown(socket.SHUT_WR)
            view = None
            sel.modify(sock, selectors.EVENT_READ)
        deadline = t0 + timeout
        eof = False
        while not eof:
            left = deadline - time.monotonic()
            if left <= 0:
                killed = "timeout"
                break
            for _key, mask in sel.select(timeout=left):
                if mask & selectors.EVENT_WRITE and view is not None:
                    try:
                        n = sock.send(view[:_CHUNK])
                        view = view[n:]
                        done = not len(view)
                    except BlockingIOError:
                        done = False
                    except OSError:  # the program stopped reading
                        done = True
                    if done:
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        view = None
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    chunk = _recv(sock)
                    if chunk is None:
                        continue
                    if not chunk:
                        eof = True
                        break
                    frames.feed(chunk)
            if max(frames.seen.values()) > kill_at:
                killed = "output_limit"
                break
        if killed:
            # kill in a helper thread while this one keeps draining the stream: an exec whose
            # output is not consumed can stall the engine, and with it the kill helper's exec
            killer = threading.Thread(target=kill_all or (lambda: kill_all_helper(api, container_id, name)),
                                      name=f"sandbox-kill-{name}", daemon=True)
            killer.start()
            sel.modify(sock, selectors.EVENT_READ)
            end = time.monotonic() + 30.0
            while time.monotonic() < end:
                if not killer.is_alive():
                    end = min(end, time.monotonic() + _DRAIN_GRACE_S)
                if not sel.select(timeout=0.05):
                    continue
                chunk = _recv(sock)
                if chunk is None:
                    continue
                if not chunk:
                    break
                if max(frames.seen.values()) <= kill_at:
                    frames.feed(chunk)
            sock.close()  # abandon whatever is still coming
            killer.join(timeout=60)
    finally:
        sel.close()
        try:
            sock.close()
        except OSError:
            pass
        try:
            resp.close()
        except Exception:  # noqa: BLE001
            pass
    rc: Optional[int] = None
    end = time.monotonic() + 2.0
    while True:
        info = api.exec_inspect(eid)
        if not info.get("Running"):
            rc = info.get("ExitCode")
            break
        if time.monotonic() > end:
            break
        time.sleep(0.005)
    return _Raw(
        exit_code=None if killed else rc,
        stdout=bytes(frames.out[1]),
        stderr=bytes(frames.out[2]),
        seen_out=frames.seen[1],
        seen_err=frames.seen[2],
        killed_reason=killed,
        wall=time.monotonic() - t0,
        stderr_tail=bytes(frames.tail),
    )


def kill_all_helper(api: Any, container_id: str, name: str = "") -> bool:
    """Kill every process of the sandbox user with a ``kill -9 -1`` exec (retried: a fork bomb may
    hold every pid); False when no helper could start (the caller restarts the container)."""
    for attempt in range(12):
        try:
            eid = api.exec_create(container_id, ["/bin/sh", "-c", _KILL_ALL], user=_USER)["Id"]
            api.exec_start(eid)
            if api.exec_inspect(eid).get("ExitCode") == 0:
                return True
        except Exception as exc:  # noqa: BLE001 - pids exhausted: runc cannot start the helper
            log.debug("sandbox %s: kill helper attempt %d failed: %s", name, attempt, exc)
        time.sleep(0.05 * (attempt + 1))
    return False
