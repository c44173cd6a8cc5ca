"""Docker sandbox backend: pooled, locked-down containers (survey §8.2: reset cost, safety).

Survey §8.2 names the two costs of agentic environments this backend addresses: *environment
reset cost* (spinning up a container takes ~0.2 s here, which MC credit methods that re-run
episodes from intermediate turns pay again and again) and *safety during training* (rollouts
execute untrusted, policy-written code). Hence warm containers in a pool, a work-directory
snapshot that forks in one exec, and a container that can neither reach the network nor
write outside its work directory.

Container
---------
Created from ``cfg.image`` (default ``creditflow/sandbox:latest``, built offline from the host by
:mod:`environments.sandbox.image` on first use) with

* ``network_mode=none`` unless ``cfg.network`` (then the default bridge);
* read-only root filesystem; the only writable places are the work dir ``/work`` (a tmpfs of
  ``work_dir_mb``, owned by uid 1000, so filling the disk stops there with ``ENOSPC``) and a
  private ``/dev/shm`` of 16 MiB (wiped on reset). ``/tmp`` is read-only: ``TMPDIR=HOME=/work``;
* memory = swap limit ``memory_mb`` (the cgroup OOM killer ends the largest process), CPU quota
  ``cpus``, pids limit ``max_processes`` + 4 (init, the idle main process, the kill helper);
* ``cap_drop=ALL``, ``no-new-privileges``, ulimits ``core=0``, ``nofile=1024``,
  ``fsize=max_file_mb`` (``SIGXFSZ``) and ``cpu=cpu_seconds`` (``SIGXCPU``; per process);
* ``init=True`` (docker-init reaps orphans) running ``sleep infinity`` as root-without-capabilities.
  Every exec runs as the unprivileged uid 1000 in ``/work``. Because that uid owns nothing but
  the sandbox's own processes, ``kill -9 -1`` run as uid 1000 kills the whole process tree of an
  exec (``setsid``, double forks and daemons included) but never init; this is how every exec
  ends.

Exec
----
``docker exec`` has no timeout, so the backend drives the exec's raw hijacked socket itself
(non-blocking, ``selectors``): stdin is fed concurrently and the write side half-closed at its
end; stdout/stderr frames are demultiplexed; each stream keeps at most ``max_output_bytes``.
The command runs under a tiny ``sh`` wrapper that, when the command returns, kills every
remaining process of the sandbox (``kill -9 -1``) so background children never outlive an
exec. At the deadline, or when a stream passes 10x the cap, a second exec runs ``kill -9 -1``
(retried; a fork bomb that takes every pid is handled too) and the exec is abandoned. If even
that fails, the container is restarted: its processes *and its work dir* are gone (logged,
``stderr`` says so). Reasons are those of the process backend: ``timeout``, ``output_limit``,
then from the exit status ``cpu_limit`` (``SIGXCPU``), ``file_limit`` (``SIGXFSZ``), ``oom``
(``SIGKILL`` and the cgroup's ``oom_kill`` counter went up), ``killed`` (any other signal),
``output_limit`` (truncated but finished), ``error`` (could not start). The wrapper reports a
death by signal N the way the shell does (status 128+N), so an exit status 129..192 is read as
signal N and comes back as ``exit_code=-N``; a program that *exits* with such a status is
indistinguishable. A pids-limit hit is not detected as such (fork fails inside the sandbox and
the program usually ends at the timeout).

Snapshot and fork (why a tar, not ``docker commit``)
----------------------------------------------------
All mutable state of a sandbox lives in ``/work`` (the root filesystem is read-only), and
``docker commit`` does not capture tmpfs contents, nor can ``get_archive``/``put_archive`` see
or write them (the daemon reads the container's root filesystem, not its tmpfs; writes to a
read-only root are refused). So ``snapshot()`` streams ``tar -C /work -cf -`` out of the
container through an exec and keeps the bytes; ``fork()`` takes a warm container from the pool
and untars them (one exec, ~0.07 s). ``snapshot_mode="commit"`` is the path the issue asked
for, kept for comparison and for snapshots that must outlive the process: the tar is put into a
helper container created from the image, ``docker commit`` makes an image of it, and ``fork``
creates and starts a container from that image and copies the snapshot into ``/work``
(create + start + exec, ~0.35 s: it cannot use the pool). ``benchmarks/sandbox.py`` measures both.
Neither mode captures *processes* (CRIU checkpoints do not work here): a snapshot is the work
dir's files; servers started by an exec must be started again after a fork.

Pool, reset, cleanup
--------------------
``pool_size`` containers are kept warm in all, those in use included: a background thread tops
the idle ones up to ``pool_size`` minus the sandboxes in use, so set it to the number of
sandboxes used at once (more than that are created cold, ~0.2 s, and removed on close).
``create()`` hands out a warm container; ``Sandbox.close()`` resets it (one exec: kill all, wipe
``/work`` and ``/dev/shm``) and returns it to the pool, or removes it when the pool is full or
the container is unhealthy (a container forked from a committed snapshot image is never pooled). ``reset()``
is the same exec plus, for forks, the untar of the origin snapshot.
Everything the backend creates carries the labels ``creditflow.managed=1``,
``creditflow.owner_pid``, ``creditflow.owner_start`` (the owner's start time, against pid
reuse), ``creditflow.owner_host`` and ``creditflow.session``. ``backend.close()`` removes its
containers and snapshot images; an ``atexit`` hook and a chained ``SIGTERM`` handler (installed
when the backend is created in the main thread) close every live backend; :func:`cleanup_stale`,
run when a backend starts, removes labelled containers and images whose owner process on this
host is dead (a crash, ``kill -9``).
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import selectors
import signal
import socket
import tarfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from environments.sandbox.docker_resident import ExecutorGone, Resident
from environments.sandbox.base import ExecResult, Sandbox, SandboxBackend, SandboxConfig, SandboxUnavailable
from environments.sandbox.image import DEFAULT_TAG, MANAGED_LABEL, SANDBOX_UID, ensure_image

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


# ----------------------------------------------------------------------------- engine access


def _docker_client(timeout: int = 60) -> Any:
    try:
        import docker
    except ImportError as exc:
        raise SandboxUnavailable(
            f"the docker sandbox backend needs the Python package 'docker' ({exc}); "
            "fix: pip install docker, or use sandbox.backend=process"
        ) from None
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no engine"
        raise SandboxUnavailable(
            f"the docker sandbox backend needs a Docker engine, but none is reachable "
            f"({type(exc).__name__}: {exc}); fix: start one (sudo infra/ensure_docker.sh), or point "
            "DOCKER_HOST at one, or use sandbox.backend=process"
        ) from None
    return client


def check_docker(cfg: Optional[SandboxConfig] = None) -> None:
    """Raise :class:`SandboxUnavailable` (reason + fix) unless a Docker engine answers. Cheap; no compute."""
    _docker_client(timeout=5).close()


def docker_reachable() -> tuple[bool, str]:
    """(whether a Docker engine answers, the reason when not)."""
    try:
        check_docker()
    except SandboxUnavailable as exc:
        return False, str(exc)
    return True, ""


# ----------------------------------------------------------------------------- ownership / cleanup


def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2 :].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _owner_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or not _proc_start(pid) or _proc_start(pid) == start


def _hostname() -> str:
    return socket.gethostname()


def cleanup_stale(client: Any = None) -> int:
    """Remove labelled containers and snapshot images whose owner process on this host is dead.

    Returns how many containers and images were removed. Objects of live owners, and of owners on
    other hosts (same engine, other machine), are left alone.
    """
    client = client or _docker_client()
    host = _hostname()
    removed = 0

    def dead(labels: dict[str, str]) -> bool:
        if labels.get("creditflow.owner_host") != host:
            return False
        try:
            pid = int(labels.get("creditflow.owner_pid", ""))
        except ValueError:
            return False
        return not _owner_alive(pid, labels.get("creditflow.owner_start", ""))

    for c in client.api.containers(all=True, filters={"label": f"{MANAGED_LABEL}=1"}):
        if dead(c.get("Labels") or {}):
            try:
                client.api.remove_container(c["Id"], force=True, v=True)
                removed += 1
            except Exception as exc:  # noqa: BLE001 - already gone or being removed
                log.debug("cleanup_stale: %s: %s", c["Id"][:12], exc)
    for img in client.api.images(filters={"label": "creditflow.kind=snapshot"}):
        if dead(img.get("Labels") or {}):
            try:
                client.api.remove_image(img["Id"], force=True)
                removed += 1
            except Exception as exc:  # noqa: BLE001
                log.debug("cleanup_stale: image %s: %s", img["Id"][:19], exc)
    if removed:
        log.info("sandbox cleanup_stale: removed %d leftover container(s)/image(s) of dead owners", removed)
    return removed


_LIVE: "weakref.WeakSet[DockerBackend]" = weakref.WeakSet()
_HOOKS_INSTALLED = False
_HOOK_LOCK = threading.Lock()


def _close_all_backends() -> None:
    for b in list(_LIVE):
        try:
            b.close()
        except Exception as exc:  # noqa: BLE001 - best effort at exit
            log.warning("closing docker sandbox backend at exit: %s", exc)


def _install_exit_hooks() -> None:
    global _HOOKS_INSTALLED
    with _HOOK_LOCK:
        if _HOOKS_INSTALLED:
            return
        _HOOKS_INSTALLED = True
        atexit.register(_close_all_backends)
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except ValueError:
            return
        if previous is signal.SIG_IGN or previous is None:
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            _close_all_backends()
            if callable(previous):
                previous(signum, frame)
            else:  # SIG_DFL: die of SIGTERM as if we had not been here
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:
            pass


# ----------------------------------------------------------------------------- snapshot handle


@dataclass(frozen=True)
class DockerSnapshot:
    """Handle of a snapshot of a sandbox's work dir (owned by its backend).

    ``archive`` mode: ``data`` is the tar of ``/work``. ``commit`` mode: ``image_id`` is a
    committed image holding the tar's contents under ``/creditflow-snapshot``.
    """

    id: str
    sandbox_id: str
    created: float
    mode: str
    size: int
    data: bytes = field(default=b"", repr=False)
    image_id: str = ""


# ----------------------------------------------------------------------------- exec machinery


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


class DockerSandbox(Sandbox):
    """One container of the pool; see the module docstring for what ``exec`` enforces."""

    def __init__(self, backend: "DockerBackend", container_id: str, origin: Optional[DockerSnapshot] = None):
        self.backend = backend
        self.cfg: SandboxConfig = backend.cfg
        self.container_id = container_id
        self.id = container_id[:12]
        #: in-sandbox path of the work directory
        self.workdir = _WORK
        #: the snapshot this sandbox was forked from (``reset`` returns to it)
        self.origin = origin
        self._closed = False
        self._lock = threading.RLock()
        self._oom_seen = 0
        self._healthy = True

    # -- helpers -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"sandbox {self.id} is closed")

    @staticmethod
    def _check_path(path: Union[str, "os.PathLike[str]"]) -> str:
        p = os.fspath(path)
        if not isinstance(p, str):
            raise TypeError(f"sandbox paths are str, got {type(p).__name__}")
        if not p or "\x00" in p:
            raise ValueError(f"invalid sandbox path {p!r}")
        if os.path.isabs(p):
            raise ValueError(f"sandbox path {p!r} must be relative to the work directory")
        norm = os.path.normpath(p)
        if norm in (".", "..") or norm.startswith("../"):
            raise ValueError(f"sandbox path {p!r} escapes the work directory")
        return p

    def _raw_exec(
        self,
        argv: list[str],
        stdin: Optional[bytes],
        timeout: float,
        cap: int,
        kill_at: Optional[int] = None,
    ) -> _Raw:
        """Run ``argv`` in the container; never raises for what the program does."""
        api = self.backend.api
        t0 = time.monotonic()
        kill_at = max(cap * _KILL_FACTOR, _CHUNK) if kill_at is None else kill_at
        eid = api.exec_create(
            self.container_id, argv, stdin=stdin is not None, user=_USER, workdir=_WORK, environment=_ENV
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
                        try:
                            chunk = sock.recv(_CHUNK)
                        except BlockingIOError:
                            continue
                        except OSError:
                            chunk = b""
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
                killer = threading.Thread(target=self._kill_all, name=f"sandbox-kill-{self.id}", daemon=True)
                killer.start()
                sel.modify(sock, selectors.EVENT_READ)
                end = time.monotonic() + 30.0
                while time.monotonic() < end:
                    if not killer.is_alive():
                        end = min(end, time.monotonic() + _DRAIN_GRACE_S)
                    if not sel.select(timeout=0.05):
                        continue
                    try:
                        chunk = sock.recv(_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
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

    def _run(self, argv: list[str], stdin: Optional[bytes], timeout: float, cap: int,
             kill_at: Optional[int] = None, fallback: Optional[list[str]] = None,
             native: Optional[dict[str, str]] = None) -> _Raw:
        """Run ``argv`` through the container's resident executor, or through ``docker exec``
        (``fallback``, default ``argv``) when ``cfg.docker_exec="exec"`` or no executor can start.
        ``native``: a file operation the executor does in-process instead of running ``argv``.
        ``killed_reason="executor"``: the executor died during the command (see docker_resident)."""
        kill_at = max(cap * _KILL_FACTOR, _CHUNK) if kill_at is None else kill_at
        res = self.backend._resident(self.container_id)
        if res is None:
            return self._raw_exec(fallback or argv, stdin, timeout, cap, kill_at)
        t0 = time.monotonic()
        try:
            rep = res.run(argv, stdin, timeout, cap, kill_at, op=native)
        except ExecutorGone as exc:
            self.backend._drop_resident(self.container_id)
            if not exc.started:  # it never ran the command: the per-exec path does
                log.debug("sandbox %s: resident executor did not start (%s); docker exec", self.id, exc)
                return self._raw_exec(fallback or argv, stdin, timeout, cap, kill_at)
            log.info("sandbox %s: %s; killing what is left, a new executor starts on the next exec", self.id, exc)
            self._kill_all()
            return _Raw(None, b"", f"creditflow: {exc}\n".encode(), 0, 0,
                        "timeout" if exc.hung else "executor", time.monotonic() - t0)
        if self.cfg.cpu_seconds and rep.cpu > 0.5 * float(self.cfg.cpu_seconds):
            self.backend._drop_resident(self.container_id)  # before the cpu ulimit ends it mid-command
        if rep.error:
            line = f"creditflow: cannot start {argv[0]}\n".encode(errors="replace")
            return _Raw(127, rep.stdout, rep.stderr + rep.error.encode(errors="replace") + b"\n", 0, 0, "",
                        rep.wall, stderr_tail=line, oom=rep.oom)
        return _Raw(None if rep.killed else rep.rc, rep.stdout, rep.stderr, rep.seen_out, rep.seen_err,
                    rep.killed, rep.wall, stderr_tail=rep.stderr[-256:], oom=rep.oom if rep.oom >= 0 else None)

    def _kill_all(self) -> None:
        """Kill every process of the sandbox user; restart the container if no exec can start."""
        api = self.backend.api
        for attempt in range(12):
            try:
                eid = api.exec_create(self.container_id, ["/bin/sh", "-c", _KILL_ALL], user=_USER)["Id"]
                api.exec_start(eid)
                if api.exec_inspect(eid).get("ExitCode") == 0:
                    return
            except Exception as exc:  # noqa: BLE001 - pids exhausted: runc cannot start the helper
                log.debug("sandbox %s: kill helper attempt %d failed: %s", self.id, attempt, exc)
            time.sleep(0.05 * (attempt + 1))
        log.warning("sandbox %s: cannot start the kill helper; restarting the container (work dir lost)", self.id)
        self._restart()

    def _restart(self) -> None:
        api = self.backend.api
        self.backend._drop_resident(self.container_id)
        api.restart(self.container_id, timeout=0)
        self._oom_seen = 0
        self.restarted = True

    def _oom_count(self) -> int:
        try:
            r = self._raw_exec(
                ["/bin/sh", "-c", "cat /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events 2>/dev/null"],
                None, 10.0, 4096,
            )
        except Exception:  # noqa: BLE001
            return self._oom_seen
        for line in r.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "oom_kill" and parts[1].isdigit():
                return int(parts[1])
        return self._oom_seen

    # -- Sandbox API ---------------------------------------------------------------------

    def exec(
        self,
        cmd: Union[str, Sequence[str]],
        timeout_s: Optional[float] = None,
        stdin: Optional[bytes] = None,
    ) -> ExecResult:
        self._check_open()
        argv, timeout, stdin = self.exec_args(cmd, timeout_s, stdin)
        cap = max(int(self.cfg.max_output_bytes), 0)
        with self._lock:
            self._check_open()
            self.restarted = False
            t0 = time.monotonic()
            try:
                raw = self._run(
                    argv,
                    bytes(stdin) if stdin is not None else None,
                    timeout,
                    cap,
                    fallback=["/bin/sh", "-c", _WRAPPER, "sh"] + argv,
                )
            except Exception as exc:  # noqa: BLE001 - engine/container trouble is a result, not a raise
                self._healthy = False
                return ExecResult(None, b"", f"docker exec failed: {type(exc).__name__}: {exc}".encode(),
                                  time.monotonic() - t0, reason="error")
            rc = raw.exit_code
            truncated = raw.seen_out > cap or raw.seen_err > cap
            reason = raw.killed_reason
            stderr = raw.stderr
            if reason == "executor":  # the command (or the OOM killer) killed the resident executor
                count = self._oom_count()
                reason = "oom" if count > self._oom_seen else "killed"
                self._oom_seen = count
            if not reason and rc == 127 and argv and not isinstance(cmd, str) and raw.stderr_tail.endswith(
                _CANNOT_START + argv[0].encode(errors="replace") + b"\n"
            ):
                return ExecResult(None, raw.stdout, stderr, raw.wall, reason="error")
            if not reason and rc is not None and 128 < rc <= 192:
                sig = rc - 128
                rc = -sig
                if sig == _SIGXCPU:
                    reason = "cpu_limit"
                elif sig == _SIGXFSZ:
                    reason = "file_limit"
                elif sig == _SIGKILL:
                    count = raw.oom if raw.oom is not None else self._oom_count()
                    reason = "oom" if count > self._oom_seen else "killed"
                    self._oom_seen = count
                else:
                    reason = "killed"
            if not reason and truncated:
                reason = "output_limit"
            if getattr(self, "restarted", False):
                stderr += b"\ncreditflow: the sandbox container was restarted; its work dir was lost\n"
            return ExecResult(
                exit_code=rc,
                stdout=raw.stdout,
                stderr=stderr,
                wall_seconds=raw.wall,
                timed_out=raw.killed_reason == "timeout",
                truncated=truncated,
                reason=reason,
            )

    def _file_op(self, op: str, script: str, path: str, stdin: Optional[bytes], cap: int) -> _Raw:
        """``op`` (write | read) done by the resident executor itself, else ``script`` in an exec;
        both exit 98 (path escapes /work), 95 (a directory), 96 (missing)."""
        raw = self._run(["/bin/sh", "-c", _RESOLVE + script, "sh", path], stdin, max(self.cfg.exec_timeout_s, 30.0), cap,
                        native={"op": op, "path": path})
        if raw.exit_code == 98:
            raise ValueError(f"sandbox path {path!r} escapes the work directory")
        return raw

    def write_file(self, path: str, data: bytes) -> None:
        self._check_open()
        data = self.write_data(path, data)
        p = self._check_path(path)
        with self._lock:
            self._check_open()
            raw = self._file_op("write", '[ -d "$p" ] && exit 95; mkdir -p -- "$(dirname -- "$p")" && cat > "$p"', p, bytes(data), 4096)
        if raw.exit_code == 95:
            raise IsADirectoryError(f"sandbox path {path!r} is a directory")
        if raw.exit_code != 0:
            raise OSError(f"write_file {path!r} failed (exit {raw.exit_code}): {raw.stderr.decode(errors='replace')}")

    def read_file(self, path: str) -> bytes:
        self._check_open()
        p = self._check_path(path)
        cap = int(self.cfg.max_file_mb) * _MIB + 1
        with self._lock:
            self._check_open()
            raw = self._file_op("read", '[ -e "$p" ] || exit 96; [ -d "$p" ] && exit 95; exec cat -- "$p"', p, None, cap)
        if raw.exit_code == 96:
            raise FileNotFoundError(f"sandbox path {path!r} does not exist")
        if raw.exit_code == 95:
            raise IsADirectoryError(f"sandbox path {path!r} is a directory")
        if raw.exit_code != 0:
            raise OSError(f"read_file {path!r} failed (exit {raw.exit_code}): {raw.stderr.decode(errors='replace')}")
        if raw.seen_out >= cap:
            raise ValueError(f"read_file {path!r}: larger than max_file_mb={self.cfg.max_file_mb}")
        return raw.stdout

    def _tar_workdir(self) -> bytes:
        cap = int(self.cfg.work_dir_mb) * _MIB * 2 + _MIB
        raw = self._run(["tar", "-C", _WORK, "-cf", "-", "."], None, max(self.cfg.exec_timeout_s, 60.0), cap, kill_at=cap)
        if raw.exit_code != 0 or raw.seen_out > cap:
            raise RuntimeError(f"sandbox {self.id}: snapshot failed (exit {raw.exit_code}): {raw.stderr[-500:]!r}")
        return raw.stdout

    def snapshot(self) -> DockerSnapshot:
        self._check_open()
        with self._lock:
            return self.backend._snapshot(self)

    def _wipe(self, mode: str, stdin: Optional[bytes] = None) -> None:
        raw = self._run(["/bin/sh", "-c", _WIPE_BODY, "sh", mode], stdin, 60.0, 65536,
                        fallback=["/bin/sh", "-c", _WIPE, "sh", mode], native={"op": "wipe"} if mode == "empty" else None)
        if raw.exit_code != 0:
            raise RuntimeError(f"sandbox {self.id}: reset failed (exit {raw.exit_code}): {raw.stderr[-500:]!r}")

    def reset(self) -> None:
        """Back to the state right after creation: empty, or the snapshot it was forked from."""
        self._check_open()
        with self._lock:
            self._ensure_running()
            if self.origin is None:
                self._wipe("empty")
            elif self.origin.mode == "commit":
                self._wipe("copy")
            else:
                if not self.backend._has_snapshot(self.origin):
                    raise RuntimeError(f"sandbox {self.id}: cannot reset, its origin snapshot {self.origin.id} was dropped")
                self._wipe("untar", self.origin.data)

    def _ensure_running(self) -> None:
        try:
            state = self.backend.api.inspect_container(self.container_id)["State"]
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"sandbox {self.id}: container is gone ({exc})") from None
        if not state.get("Running"):
            self.backend.api.start(self.container_id)
            self._oom_seen = 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.backend._release(self)

    def __repr__(self) -> str:
        return f"DockerSandbox({self.id}{', closed' if self._closed else ''})"


# ----------------------------------------------------------------------------- backend


class DockerBackend(SandboxBackend):
    """Pooled docker sandboxes; see the module docstring.

    ``base_dir`` is accepted for signature compatibility with the process backend and unused
    (all state lives in the Docker engine). ``client``: a ``docker.DockerClient`` to use.
    """

    name = "docker"

    def __init__(self, cfg: Optional[SandboxConfig] = None, base_dir: Optional[str] = None, client: Any = None):
        self.cfg = cfg if cfg is not None else SandboxConfig()
        if self.cfg.snapshot_mode not in ("archive", "commit"):
            raise ValueError(f"sandbox.snapshot_mode must be archive or commit, got {self.cfg.snapshot_mode!r}")
        if self.cfg.docker_exec not in ("resident", "exec"):
            raise ValueError(f"sandbox.docker_exec must be resident or exec, got {self.cfg.docker_exec!r}")
        self.chosen = self.name
        self.client = client if client is not None else _docker_client()
        self.api = self.client.api
        self.session = uuid.uuid4().hex[:12]
        self.labels = {
            MANAGED_LABEL: "1",
            "creditflow.owner_pid": str(os.getpid()),
            "creditflow.owner_start": _proc_start(os.getpid()),
            "creditflow.owner_host": _hostname(),
            "creditflow.session": self.session,
        }
        self._lock = threading.Lock()
        self._closed = False
        self._containers: set[str] = set()  # every container of this backend (pooled, in use, starting)
        self._idle: list[str] = []
        self._sandboxes: dict[str, DockerSandbox] = {}
        self._snapshots: dict[str, DockerSnapshot] = {}
        self._stale_images: set[str] = set()  # snapshot images whose removal must be retried at close
        self._residents: dict[str, Resident] = {}  # container id -> its resident executor
        self._resident_retry: dict[str, float] = {}  # container id -> when to try starting one again
        _LIVE.add(self)
        _install_exit_hooks()
        try:
            cleanup_stale(self.client)
        except Exception as exc:  # noqa: BLE001 - never block a run on housekeeping
            log.warning("sandbox cleanup_stale failed: %s", exc)
        self.image = self.cfg.image or DEFAULT_TAG
        try:
            self.image_id = ensure_image(self.client, self.image)
        except Exception as exc:  # noqa: BLE001
            if self.cfg.image:
                try:
                    self.image_id = self.client.images.pull(self.image).id
                except Exception as exc2:  # noqa: BLE001
                    raise SandboxUnavailable(
                        f"sandbox image {self.image!r} is not available locally and cannot be pulled ({exc2}); "
                        "fix: load or build it, or leave sandbox.image empty for the offline default"
                    ) from None
            else:
                raise SandboxUnavailable(f"cannot build the default sandbox image offline ({exc}); "
                                         "see infra/sandbox/README.md") from None
        attrs = self.client.images.get(self.image_id).attrs
        #: what to record in the run's MLflow tags: the registry digest when there is one, else the image id
        self.image_digest = (attrs.get("RepoDigests") or [self.image_id])[0]
        self._wakeup = threading.Event()
        self._refiller = threading.Thread(target=self._refill_loop, name="creditflow-sandbox-pool", daemon=True)
        self._refiller.start()
        if self.cfg.pool_size > 0:
            self._wakeup.set()

    # -- containers ----------------------------------------------------------------------

    def _host_config(self) -> Any:
        from docker.types import Ulimit

        cfg = self.cfg
        ulimits = [Ulimit(name="core", soft=0, hard=0), Ulimit(name="nofile", soft=1024, hard=1024)]
        if cfg.max_file_mb and cfg.max_file_mb > 0:
            ulimits.append(Ulimit(name="fsize", soft=cfg.max_file_mb * _MIB, hard=cfg.max_file_mb * _MIB))
        if cfg.cpu_seconds and cfg.cpu_seconds > 0:
            ulimits.append(Ulimit(name="cpu", soft=int(cfg.cpu_seconds), hard=int(cfg.cpu_seconds) + 1))
        kw: dict[str, Any] = dict(
            network_mode="bridge" if cfg.network else "none",
            read_only=True,
            tmpfs={_WORK: f"rw,exec,nosuid,nodev,size={int(cfg.work_dir_mb)}m,uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0755"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            ulimits=ulimits,
            init=True,
            ipc_mode="private",
            shm_size="16m",
        )
        if cfg.memory_mb and cfg.memory_mb > 0:
            kw.update(mem_limit=f"{int(cfg.memory_mb)}m", memswap_limit=f"{int(cfg.memory_mb)}m")
        if cfg.max_processes and cfg.max_processes > 0:
            kw["pids_limit"] = int(cfg.max_processes) + _PIDS_HEADROOM
        if cfg.cpus and cfg.cpus > 0:
            kw["nano_cpus"] = int(float(cfg.cpus) * 1e9)
        return self.api.create_host_config(**kw)

    def _start_container(self, image: Optional[str] = None, kind: str = "sandbox") -> str:
        c = self.api.create_container(
            image or self.image_id,
            command=["sleep", "infinity"],
            user="0:0",
            working_dir=_WORK,
            environment=_ENV,
            labels={**self.labels, "creditflow.kind": kind},
            host_config=self._host_config(),
        )
        cid = c["Id"]
        with self._lock:
            self._containers.add(cid)
            closed = self._closed
        if closed:
            self._remove_container(cid)
            raise RuntimeError("docker sandbox backend is closed")
        try:
            self.api.start(cid)
        except Exception:
            self._remove_container(cid)
            raise
        return cid

    def _resident(self, cid: str, wait: bool = False) -> Optional[Resident]:
        """The container's resident executor, started when missing; None for ``docker_exec="exec"``
        or while one cannot start (retried after a second)."""
        if self.cfg.docker_exec != "resident":
            return None
        with self._lock:
            r = self._residents.get(cid)
            if r is not None and r.alive:
                return r
            if self._closed or time.monotonic() < self._resident_retry.get(cid, 0.0):
                return None
        try:
            r = Resident(self.api, cid, _USER, _WORK, _ENV)
            if wait and not r.wait_ready():
                raise RuntimeError("no hello from the executor")
        except Exception as exc:  # noqa: BLE001 - pids exhausted, container gone: docker exec instead
            log.debug("sandbox %s: cannot start the resident executor: %s", cid[:12], exc)
            with self._lock:
                self._resident_retry[cid] = time.monotonic() + 1.0
            return None
        with self._lock:
            self._residents[cid] = r
        return r

    def _drop_resident(self, cid: str) -> None:
        with self._lock:
            r = self._residents.pop(cid, None)
        if r is not None:
            r.close()

    def _remove_container(self, cid: str) -> None:
        self._drop_resident(cid)
        try:
            self.api.remove_container(cid, force=True, v=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            if "No such container" not in str(exc) and "already in progress" not in str(exc):
                log.warning("removing sandbox container %s: %s", cid[:12], exc)
        with self._lock:
            self._containers.discard(cid)

    def _refill_loop(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while True:
                with self._lock:
                    if self._closed or len(self._idle) >= self._pool_target():
                        break
                try:
                    cid = self._start_container()
                except Exception as exc:  # noqa: BLE001
                    if not self._closed:
                        log.warning("sandbox pool refill failed: %s", exc)
                    break
                self._resident(cid, wait=True)  # warm: the executor is up before the container is handed out
                with self._lock:
                    self._idle.append(cid)
            if self._closed:
                return

    def _pool_target(self) -> int:
        """Idle containers to keep: ``pool_size`` warm containers in all, counting those in use."""
        return max(int(self.cfg.pool_size) - len(self._sandboxes), 0)

    def _take(self) -> str:
        with self._lock:
            self._check_open()
            cid = self._idle.pop() if self._idle else None
        if cid is None:
            cid = self._start_container()
        return cid

    def _register(self, sb: DockerSandbox) -> DockerSandbox:
        with self._lock:
            self._sandboxes[sb.id] = sb
        self._wakeup.set()  # top the pool up in the background
        return sb

    def _release(self, sb: DockerSandbox) -> None:
        """A closed sandbox's container: reset and back to the pool, or removed."""
        with self._lock:
            self._sandboxes.pop(sb.id, None)
            keep = not self._closed and sb._healthy and len(self._idle) < self._pool_target()
        if keep:
            try:
                sb._ensure_running()
                sb._wipe("empty")
            except Exception as exc:  # noqa: BLE001
                log.debug("sandbox %s: not returned to the pool: %s", sb.id, exc)
                keep = False
        if keep and sb.origin is not None and sb.origin.mode == "commit":
            keep = False  # a container of a snapshot image holds that snapshot; not a clean pool member
        if keep:
            with self._lock:
                if not self._closed:
                    self._idle.append(sb.container_id)
                    return
        self._remove_container(sb.container_id)

    def _has_snapshot(self, snap: DockerSnapshot) -> bool:
        with self._lock:
            return snap.id in self._snapshots

    def _snapshot(self, sb: DockerSandbox) -> DockerSnapshot:
        self._check_open()
        data = sb._tar_workdir()
        sid = uuid.uuid4().hex[:12]
        if self.cfg.snapshot_mode == "archive":
            snap = DockerSnapshot(sid, sb.id, time.time(), "archive", len(data), data=data)
        else:
            snap = DockerSnapshot(sid, sb.id, time.time(), "commit", len(data), image_id=self._commit(data, sid))
        with self._lock:
            self._snapshots[sid] = snap
        return snap

    def _commit(self, work_tar: bytes, sid: str) -> str:
        """Commit an image = the sandbox image + the work dir's files under /creditflow-snapshot."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(work_tar)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
            root = tarfile.TarInfo(_SNAP_DIR.lstrip("/"))
            root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o755, SANDBOX_UID, SANDBOX_UID
            dst.addfile(root)
            for m in src.getmembers():
                name = os.path.normpath(m.name)
                if name == ".":
                    continue
                m.name = f"{_SNAP_DIR.lstrip('/')}/{name}"
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        helper = self.api.create_container(
            self.image_id, command=["sleep", "infinity"], labels={**self.labels, "creditflow.kind": "snapshot-helper"}
        )["Id"]
        with self._lock:
            self._containers.add(helper)
        try:
            self.api.put_archive(helper, "/", buf.getvalue())
            image_id = self.api.commit(
                helper, repository="creditflow/sandbox-snapshot", tag=sid,
                conf={"Labels": {**self.labels, "creditflow.kind": "snapshot"}, "User": "0:0"},
            )["Id"]
        finally:
            self._remove_container(helper)
        return image_id

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("docker sandbox backend is closed")

    # -- SandboxBackend API ---------------------------------------------------------------

    def create(self) -> DockerSandbox:
        return self._register(DockerSandbox(self, self._take()))

    def fork(self, snapshot: Any) -> DockerSandbox:
        self._check_open()
        if not isinstance(snapshot, DockerSnapshot):
            raise TypeError(f"fork needs a DockerSnapshot, got {type(snapshot).__name__}")
        if not self._has_snapshot(snapshot):
            raise ValueError(f"snapshot {snapshot.id} does not belong to this backend or was dropped")
        if snapshot.mode == "commit":
            cid = self._start_container(snapshot.image_id, kind="sandbox")
            sb = DockerSandbox(self, cid, origin=snapshot)
            try:
                sb._wipe("copy")
            except Exception:
                self._remove_container(cid)
                raise
            return self._register(sb)
        sb = DockerSandbox(self, self._take(), origin=snapshot)
        try:
            sb._wipe("untar", snapshot.data)
        except Exception:
            self._remove_container(sb.container_id)
            raise
        return self._register(sb)

    def drop_snapshot(self, snapshot: DockerSnapshot) -> None:
        """Forget a snapshot (and remove its image); sandboxes forked from it can no longer ``reset``."""
        with self._lock:
            self._snapshots.pop(snapshot.id, None)
        if snapshot.image_id:
            try:
                self.api.remove_image(snapshot.image_id, force=True)
            except Exception as exc:  # noqa: BLE001 - still used by a forked container: retried at close
                log.debug("removing snapshot image %s: %s", snapshot.image_id[:19], exc)
                with self._lock:
                    self._stale_images.add(snapshot.image_id)

    @property
    def sandboxes(self) -> list[DockerSandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    @property
    def containers(self) -> list[str]:
        """Ids of every container this backend holds (in use, pooled, starting)."""
        with self._lock:
            return list(self._containers)

    def warm(self, n: Optional[int] = None, timeout_s: float = 60.0) -> int:
        """Wait until ``n`` containers (default: as many as the pool should hold now) are idle; returns how many are."""
        self._wakeup.set()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                want = self._pool_target() if n is None else min(n, self._pool_target())
                if len(self._idle) >= want or self._closed:
                    return len(self._idle)
            time.sleep(0.02)
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sandboxes = list(self._sandboxes.values())
            self._sandboxes.clear()
            self._idle.clear()
            snaps = list(self._snapshots.values())
            self._snapshots.clear()
        self._wakeup.set()
        for sb in sandboxes:
            sb._closed = True
        self._refiller.join(timeout=30)
        with self._lock:
            cids = list(self._containers)
        # in parallel (the engine does the work); plain threads: executors refuse to start at exit
        workers = [threading.Thread(target=self._remove_container, args=(c,), daemon=True) for c in cids]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        for snap in snaps:
            self.drop_snapshot(snap)
        for image_id in list(self._stale_images):
            try:
                self.api.remove_image(image_id, force=True)
            except Exception as exc:  # noqa: BLE001
                if "No such image" not in str(exc):
                    log.warning("removing snapshot image %s: %s", image_id[:19], exc)
        self._stale_images.clear()
        _LIVE.discard(self)

    def __enter__(self) -> "DockerBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
