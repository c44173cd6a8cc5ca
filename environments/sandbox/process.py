"""Process sandbox backend: a private work directory plus rlimited subprocesses (survey §8.2).

The cheapest backend: a sandbox is a private temporary directory; ``exec`` runs a subprocess
in it with a hard wall-clock timeout, resource limits and capped output. Create, snapshot,
fork, reset and close are directory operations (milliseconds), which keeps environment reset
cost low for MC credit methods that re-run episodes from intermediate turns.

What each exec gets
-------------------
* ``cwd`` = the work directory; environment stripped to ``PATH=/usr/local/bin:/usr/bin:/bin``,
  ``HOME=TMPDIR=<workdir>``, ``LANG=C.UTF-8``. A ``str`` command runs under ``/bin/sh -c``; a
  sequence is run as argv directly. ``stdin`` is fed concurrently (no pipe deadlock);
  without it the program reads ``/dev/null``.
* Its own session and process group (``start_new_session=True``). When the main process
  exits, and on every fault, the whole group is killed with ``SIGKILL``, so background
  children never outlive an exec (anything they had not yet written is lost).
* rlimits set in the child before ``exec`` (``preexec_fn``): ``RLIMIT_AS`` = ``memory_mb``,
  ``RLIMIT_CPU`` = ``cpu_seconds`` (soft; ``SIGXCPU``) and ``cpu_seconds + 1`` (hard; ``SIGKILL``),
  ``RLIMIT_FSIZE`` = ``max_file_mb``, ``RLIMIT_CORE`` = 0 and, for non-root users only,
  ``RLIMIT_NPROC`` (see below). Requests above the current hard limit are clamped to it.
  Note: ``RLIMIT_AS`` limits *virtual* memory, so runtimes that reserve large address ranges
  (JVM, Go, some JITs) need a larger ``memory_mb`` than their resident use.
* Processes: ``RLIMIT_NPROC`` counts *every* process and thread of the real user, not those
  of the sandbox, and the kernel does not enforce it for root. For a non-root user it is set
  to (the user's current task count + ``max_processes``), a coarse guard against fork bombs;
  as root it is not set. In both cases a pids check (a scan of ``/proc`` every 0.2 s counting
  the exec's processes: its session, or under bwrap everything in its pid namespace) kills
  them with reason ``process_limit`` when more than ``max_processes`` are alive. A fast fork
  bomb can overshoot between two checks; cgroups (the docker backend) are the real limit.
* Output: stdout and stderr are read concurrently (``selectors``); each keeps at most
  ``max_output_bytes``; the rest is drained and dropped (``truncated=True``, reason
  ``output_limit``). A process that produces more than 10x the cap on one stream is killed.

Isolation (``sandbox.isolation``; the backend's ``isolation`` attribute says which was chosen,
``isolation_note`` why): ``auto`` (default) = ``bwrap`` when bubblewrap is on ``PATH`` and works
(probed once per option set and user, with the exact options used), else ``none`` with a
warning; ``bwrap`` = required (:class:`SandboxUnavailable` naming the reason when it does not
work); ``none`` = plain subprocesses. Under bwrap each exec gets its own namespaces:

* mount: a fresh root holding only ``/usr``, ``/bin``, ``/sbin``, ``/lib*`` (read-only binds, or
  the same symlinks as the host), a few ``/etc`` files that sh/coreutils/python3 need
  (``ld.so.cache``, ``alternatives``, ``passwd``, ``group``, ``nsswitch.conf``, ``hosts``,
  ``resolv.conf``, ``ssl``, ``python3*``, … : no ``shadow``), a minimal ``/dev``, a ``/proc`` of
  its own pid namespace, an empty private ``/tmp`` and the work dir, bound read-write at its
  host path (so ``HOME``/cwd are unchanged and the host-side cwd scan below still sees it).
  ``/``, ``/tmp``, ``/dev`` and the empty directories leading to the work dir are read-only:
  writes outside the work dir fail (``TMPDIR`` is the work dir), except to a private 16 MiB
  ``/dev/shm`` (as in the docker backend). The host's
  ``/root``, ``/home``, ``/work``, ``/var``, ``/opt``, the trainer's virtualenv and every other
  sandbox are not visible; programs use the system ``python3``. ``ro_binds`` (constructor)
  adds read-only host paths.
* network: unshared (only ``lo``) unless ``network=True``; ``network_isolated`` says so.
* pid (+ ipc, uts, cgroup where possible): bwrap runs as the namespace's init; when the
  command ends or the exec kills bwrap and that init, the kernel kills everything left in the
  namespace, including processes that called ``setsid`` (``--die-with-parent``,
  ``--new-session``). As root, all capabilities are dropped (``--cap-drop ALL``).
* exit status: bwrap reports a command killed by signal N as 128+N; the backend maps it back
  to ``exit_code=-N`` (so a program that itself exits with 129..192 reads as killed by a
  signal); bwrap's own failure (e.g. no such program) is reason ``error``.

Cost: a bwrap exec forks two extra processes and creates namespaces and ~15 mounts: about
+17-20 ms per exec, measured on a loaded 2-core box (medians of 40: ``true`` 8 -> 25 ms,
``python3 -c pass`` 32 -> 52 ms). ``/etc`` is one bind of a per-process copy of the files
above (a bind per file costs ~1 ms each). create/snapshot/fork/reset/close are unchanged.

Without isolation this backend is a fault boundary, not a security boundary: the program runs
as the trainer's user with the trainer's filesystem view and network (``read_file``/
``write_file`` are confined; the program itself is not), and a process that calls ``setsid``
escapes the group kill (``reset`` and ``close`` kill any process whose working directory is
inside the work directory). Under bwrap it is a reasonable confinement for buggy or careless
code (no network, no host files, no writes outside the work dir), but it still runs as the
trainer's user, shares the kernel and has no memory/pids cgroup: use the docker backend for
code that may be adversarial.

``ExecResult.reason`` vocabulary (first match wins):
``timeout`` (wall-clock limit; ``timed_out=True``), ``output_limit`` (killed for output),
``process_limit`` (pids check), then from the exit signal ``cpu_limit`` (``SIGXCPU``),
``file_limit`` (``SIGXFSZ``), ``killed`` (any other signal, e.g. ``SIGKILL`` from the hard CPU
limit or the OOM killer, ``SIGSEGV``), then ``output_limit`` when output was truncated but the
program finished, ``error`` when the program could not be started, else ``""``.
``exit_code`` is ``None`` when the sandbox killed the program (timeout, output or process
limit) or could not start it, the negative signal number when a signal ended it, else the
exit status. Python programs that exceed ``RLIMIT_AS`` usually raise ``MemoryError`` and exit
with status 1 (reason ``""``): that is a failure of the program, not of the sandbox.
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from environments.sandbox.base import ExecResult, Sandbox, SandboxBackend, SandboxConfig, SandboxUnavailable

log = logging.getLogger("creditflow.sandbox")

_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"
_CHUNK = 65536
#: poll interval when pidfd is unavailable (exit detection)
_POLL_S = 0.05
#: interval of the pids check
_PIDS_CHECK_S = 0.2
#: a stream producing more than this many times the cap gets its process killed
_KILL_FACTOR = 10
#: after the group is killed, how long to wait for pipes held open by escaped processes
_DRAIN_GRACE_S = 1.0
_MIB = 1 << 20
#: values of ``SandboxConfig.isolation``
ISOLATIONS = ("auto", "bwrap", "none")
#: top-level host paths the bwrap view exposes read-only (symlinks are recreated as symlinks)
_BWRAP_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: files and directories under /etc that programs (sh, coreutils, python3) need; no secrets
_BWRAP_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "passwd", "group", "nsswitch.conf",
    "localtime", "timezone", "hosts", "host.conf", "resolv.conf", "gai.conf", "protocols", "services",
    "networks", "ssl", "ca-certificates", "mime.types", "os-release", "debian_version", "locale.alias",
    "magic", "magic.mime",
)
#: per process: a copy of those /etc entries, bound read-only as the sandbox's /etc (one mount
#: per exec instead of one per file; each mount costs about a millisecond)
_ETC_VIEWS: dict[int, str] = {}
_ETC_LOCK = threading.Lock()
#: size of the private /dev/shm under bwrap (as in the docker backend)
_SHM_BYTES = 16 * _MIB
#: made read-only after the work dir is bound: writes outside the work dir (and /dev/shm) fail
_BWRAP_RO = ["--remount-ro", "/dev", "--remount-ro", "/tmp", "--remount-ro", "/"]
#: bwrap's own failure (setup or execvp of the command) is exit status 1 with this prefix on stderr
_BWRAP_ERR = b"bwrap: "
#: outcome of the bwrap probe, per (options, euid): None = works, else why not
_BWRAP_PROBES: dict[tuple[tuple[str, ...], int], Optional[str]] = {}


@dataclass(frozen=True)
class ProcessSnapshot:
    """Handle of a snapshot: a copy of a sandbox's work directory (owned by its backend)."""

    path: str
    sandbox_id: str
    created: float


# ----------------------------------------------------------------------------- /proc helpers


def _proc_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


def _stat_fields(pid: int) -> Optional[list[bytes]]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def _session_size(sid: int) -> int:
    n = 0
    for pid in _proc_pids():
        fields = _stat_fields(pid)
        if fields is not None and len(fields) > 3 and fields[3] == str(sid).encode() and fields[0] != b"Z":
            n += 1
    return n


def _tree_size(root: int) -> int:
    """Live (non-zombie) descendants of ``root``, not counting ``root`` itself."""
    children: dict[bytes, list[bytes]] = {}
    live: set[bytes] = set()
    for pid in _proc_pids():
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 2:
            continue
        key = str(pid).encode()
        children.setdefault(fields[1], []).append(key)
        if fields[0] != b"Z":
            live.add(key)
    n, todo = 0, [str(root).encode()]
    while todo:
        for child in children.get(todo.pop(), ()):
            n += child in live
            todo.append(child)
    return n


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/PID/task/PID/children``; [] where unsupported)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


def _etc_view() -> str:
    """The sandbox's /etc: copies of the ``_BWRAP_ETC`` entries (and ``/etc/python3*``), made once
    per process (recreated if removed), deleted at exit. Directories keep their symlinks (e.g.
    ``alternatives`` -> ``/usr/...``); ``ssl/private`` is left out."""
    with _ETC_LOCK:
        path = _ETC_VIEWS.get(os.getpid())
        if path is not None and os.path.isdir(path):
            return path
        path = tempfile.mkdtemp(prefix="creditflow-etc-")
        try:
            names = set(_BWRAP_ETC) | {n for n in os.listdir("/etc") if n.startswith("python3")}
        except OSError:
            names = set(_BWRAP_ETC)
        for name in sorted(names):
            src, dst = os.path.join("/etc", name), os.path.join(path, name)
            try:
                if os.path.isdir(src):
                    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("private"))
                elif os.path.isfile(src):
                    shutil.copyfile(src, dst)  # follows a symlink (localtime, resolv.conf)
            except OSError:
                pass
        os.chmod(path, 0o755)
        atexit.register(shutil.rmtree, path, True)
        _ETC_VIEWS[os.getpid()] = path
        return path


def _user_task_count(uid: int) -> int:
    n = 0
    for pid in _proc_pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        fields = _stat_fields(pid)
        try:
            n += int(fields[17]) if fields else 1  # num_threads
        except (IndexError, ValueError):
            n += 1
    return n


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its pid, hence its group id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _rmtree(path: str) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        # the sandboxed program may have removed write/search permissions; restore and retry
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def _empty_dir(path: str) -> None:
    os.chmod(path, stat.S_IRWXU)
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmtree(entry.path)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _ignore_special(src: str, names: list[str]) -> list[str]:
    """copytree filter: skip FIFOs, sockets and devices (copying a FIFO would block)."""
    skipped = []
    for name in names:
        try:
            mode = os.lstat(os.path.join(src, name)).st_mode
        except OSError:
            skipped.append(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skipped.append(name)
    return skipped


def _copy_dir(src: str, dst: str) -> None:
    shutil.copytree(src, dst, symlinks=True, ignore=_ignore_special)


# ----------------------------------------------------------------------------- sandbox


class ProcessSandbox(Sandbox):
    """A private work directory; see the module docstring for what ``exec`` enforces."""

    def __init__(self, backend: "ProcessBackend", workdir: str, origin: Optional[ProcessSnapshot] = None):
        self.backend = backend
        self.cfg: SandboxConfig = backend.cfg
        self.workdir = workdir
        self.id = os.path.basename(workdir)
        #: the snapshot this sandbox was forked from (``reset`` returns to it)
        self.origin = origin
        self._closed = False
        self._lock = threading.RLock()

    # -- helpers -------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {"PATH": _MIN_PATH, "HOME": self.workdir, "TMPDIR": self.workdir, "LANG": "C.UTF-8"}

    def _resolve(self, path: Union[str, "os.PathLike[str]"]) -> str:
        p = self.rel_path(path)
        root = os.path.realpath(self.workdir)
        full = os.path.realpath(os.path.join(root, p))
        if full == root or not full.startswith(root + os.sep):
            raise ValueError(f"sandbox path {p!r} escapes the work directory")
        return full

    def _kill_stragglers(self) -> None:
        """Kill processes whose cwd is inside the work directory (escaped the group kill)."""
        root = os.path.realpath(self.workdir)
        me = os.getpid()
        for pid in _proc_pids():
            if pid == me:
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + os.sep):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    # -- Sandbox API ---------------------------------------------------------------------

    def _exec(self, argv: list[str], timeout: float, stdin: Optional[bytes], shell: bool) -> ExecResult:
        argv = self.backend._wrap(argv, self.workdir)
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
                preexec_fn=self.backend._preexec(),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return ExecResult(
                exit_code=None,
                stdout=b"",
                stderr=f"cannot start {argv[0]!r}: {exc}".encode(),
                wall_seconds=time.monotonic() - t0,
                reason="error",
            )
        res = self._supervise(proc, bytes(stdin) if stdin is not None else None, timeout, t0)
        if self.backend.isolation == "bwrap" and res.exit_code is not None and not res.reason:
            rc = res.exit_code
            if rc == 1 and res.stderr.startswith(_BWRAP_ERR):
                # bwrap could not set up the sandbox or exec the command (e.g. no such program)
                res.exit_code, res.reason = None, "error"
            elif 128 < rc <= 128 + 64:
                # bwrap reports a command killed by signal N as exit status 128+N (the shell
                # convention); map it back so the reasons below match the unisolated backend
                sig = rc - 128
                res.exit_code = -sig
                res.reason = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_limit"}.get(sig, "killed")
        return res

    def _supervise(self, proc: subprocess.Popen, stdin: Optional[bytes], timeout: float, t0: float) -> ExecResult:
        cap = max(int(self.cfg.max_output_bytes), 0)
        kill_at = max(cap * _KILL_FACTOR, _CHUNK)
        max_procs = int(self.cfg.max_processes)
        pid = proc.pid
        isolated = self.backend.isolation == "bwrap"
        # the command's processes: without isolation, the exec's session (pid = session id);
        # under bwrap, the pid namespace: everything below bwrap, less its init (orphans are
        # reparented to that init, so they stay below bwrap even after setsid)
        count_procs = (lambda p: _tree_size(p) - 1) if isolated else _session_size
        assert proc.stdout is not None and proc.stderr is not None
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        bufs = {out_fd: bytearray(), err_fd: bytearray()}
        seen = {out_fd: 0, err_fd: 0}
        sel = selectors.DefaultSelector()
        pidfd = -1
        killed_reason = ""
        in_fd = -1
        try:
            for fd in (out_fd, err_fd):
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ, "out")
            stdin_view = memoryview(stdin) if stdin is not None else None
            if proc.stdin is not None:
                in_fd = proc.stdin.fileno()
                if stdin_view is not None and len(stdin_view):
                    os.set_blocking(in_fd, False)
                    sel.register(in_fd, selectors.EVENT_WRITE, "in")
                else:
                    proc.stdin.close()
                    in_fd = -1
            if hasattr(os, "pidfd_open"):
                try:
                    pidfd = os.pidfd_open(pid)
                    sel.register(pidfd, selectors.EVENT_READ, "exit")
                except OSError:
                    pidfd = -1

            def read(fd: int) -> bool:
                """Read one chunk; False at EOF."""
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    return True
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(fd)
                    return False
                room = cap - len(bufs[fd])
                if room > 0:
                    bufs[fd] += chunk[:room]
                seen[fd] += len(chunk)
                return True

            deadline = t0 + timeout
            next_pids = t0 + _PIDS_CHECK_S
            exited = False
            while not exited:
                now = time.monotonic()
                if now >= deadline:
                    killed_reason = "timeout"
                    break
                if max_procs > 0 and now >= next_pids:
                    next_pids = now + _PIDS_CHECK_S
                    if count_procs(pid) > max_procs:
                        killed_reason = "process_limit"
                        break
                wait = min(deadline, next_pids) - now
                if pidfd < 0:
                    wait = min(wait, _POLL_S)
                for key, _ in sel.select(timeout=max(wait, 0.0)):
                    if key.data == "exit":
                        exited = True
                    elif key.data == "in":
                        assert stdin_view is not None
                        try:
                            n = os.write(in_fd, stdin_view[:_CHUNK])
                            stdin_view = stdin_view[n:]
                            done = not len(stdin_view)
                        except BlockingIOError:
                            done = False
                        except OSError:  # BrokenPipe: the program stopped reading
                            done = True
                        if done:
                            sel.unregister(in_fd)
                            proc.stdin.close()  # type: ignore[union-attr]
                            in_fd = -1
                    else:
                        read(key.fd)
                if max(seen.values()) > kill_at:
                    killed_reason = "output_limit"
                    break
                if pidfd < 0 and not exited:
                    exited = _has_exited(pid)
            # the main process has exited or we stopped it: kill the group (leader not yet
            # reaped, so the group id cannot have been reused), then drain what is buffered.
            # Under bwrap the namespace's init runs in its own session: kill it first (its pid
            # namespace dies with it); --die-with-parent would also kill it when bwrap dies
            if isolated:
                for child in _children(pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            _kill_group(pid)
            drain_end = time.monotonic() + _DRAIN_GRACE_S
            while any(fd in sel.get_map() for fd in (out_fd, err_fd)):
                left = drain_end - time.monotonic()
                if left <= 0:
                    break
                events = sel.select(timeout=left)
                for key, _ in events:
                    if key.data == "out":
                        read(key.fd)
                    elif key.data == "exit":
                        sel.unregister(pidfd)
                        os.close(pidfd)
                        pidfd = -1
                    elif key.data == "in":
                        sel.unregister(in_fd)
                        proc.stdin.close()  # type: ignore[union-attr]
                        in_fd = -1
            _kill_group(pid)
        finally:
            sel.close()
            if pidfd >= 0:
                os.close(pidfd)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # uninterruptible sleep; leave it to the kernel
                log.error("sandbox %s: process %d did not die after SIGKILL", self.id, pid)
        wall = time.monotonic() - t0
        rc = proc.returncode
        truncated = any(seen[fd] > cap for fd in seen)
        reason = killed_reason
        if not reason and rc is not None and rc < 0:
            sig = -rc
            reason = {signal.SIGXCPU: "cpu_limit", signal.SIGXFSZ: "file_limit"}.get(sig, "killed")
        if not reason and truncated:
            reason = "output_limit"
        return ExecResult(
            exit_code=None if killed_reason else rc,
            stdout=bytes(bufs[out_fd]),
            stderr=bytes(bufs[err_fd]),
            wall_seconds=wall,
            timed_out=killed_reason == "timeout",
            truncated=truncated,
            reason=reason,
        )

    def write_file(self, path: str, data: bytes) -> None:
        self._check_open()
        data = self.write_data(path, data)
        full = self._resolve(path)
        with self._lock:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(data)

    def read_file(self, path: str) -> bytes:
        self._check_open()
        full = self._resolve(path)
        with open(full, "rb") as f:
            return f.read()

    def snapshot(self) -> ProcessSnapshot:
        self._check_open()
        with self._lock:
            return self.backend._snapshot(self)

    def reset(self) -> None:
        """Back to the state right after creation: empty, or the snapshot it was forked from."""
        self._check_open()
        with self._lock:
            self._kill_stragglers()
            _empty_dir(self.workdir)
            if self.origin is not None:
                if not os.path.isdir(self.origin.path):
                    raise RuntimeError(
                        f"sandbox {self.id}: cannot reset, its origin snapshot {self.origin.path} was dropped"
                    )
                for entry in os.scandir(self.origin.path):
                    dst = os.path.join(self.workdir, entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        _copy_dir(entry.path, dst)
                    elif entry.is_symlink():
                        os.symlink(os.readlink(entry.path), dst)
                    elif entry.is_file(follow_symlinks=False):
                        shutil.copy2(entry.path, dst)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._kill_stragglers()
            finally:
                if os.path.isdir(self.workdir):
                    _rmtree(self.workdir)
                self.backend._forget(self)

    def __repr__(self) -> str:
        return f"ProcessSandbox({self.workdir!r}{', closed' if self._closed else ''})"


# ----------------------------------------------------------------------------- backend


class ProcessBackend(SandboxBackend):
    """Creates :class:`ProcessSandbox` es under a private root directory.

    ``base_dir``: where the root directory goes (default: the system temp dir).
    ``ro_binds``: extra host paths to expose read-only (at the same path) under bwrap
    isolation, e.g. a toolchain outside ``/usr``; ignored without isolation.
    ``cfg.isolation`` picks the isolation (see the module docstring); ``isolation`` says which
    one this backend uses (``"bwrap"`` or ``"none"``) and ``isolation_note`` why.
    """

    name = "process"

    def __init__(
        self,
        cfg: Optional[SandboxConfig] = None,
        base_dir: Optional[str] = None,
        ro_binds: Sequence[str] = (),
    ):
        self.cfg = cfg if cfg is not None else SandboxConfig()
        requested = getattr(self.cfg, "isolation", "auto") or "auto"
        if requested not in ISOLATIONS:
            raise ValueError(f"unknown sandbox isolation {requested!r}; expected one of: {', '.join(ISOLATIONS)}")
        self.chosen = self.name
        if base_dir is not None:
            os.makedirs(base_dir, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="creditflow-sbx-", dir=base_dir)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)
        self._sandboxes: dict[str, ProcessSandbox] = {}
        self._snapshots: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._nproc_cache: tuple[float, int] = (0.0, 0)
        self._ro_binds = [os.path.abspath(os.fspath(p)) for p in ro_binds]
        self._bwrap: Optional[list[str]] = None
        #: "bwrap" (namespaces) or "none"
        self.isolation = "none"
        self.isolation_note = "isolation='none' requested"
        if requested != "none":
            why = self._probe_bwrap()
            if why is None:
                self.isolation = "bwrap"
                self.isolation_note = f"isolation={requested!r}: bubblewrap works here"
            elif requested == "bwrap":
                self._finalizer()
                raise SandboxUnavailable(
                    f"sandbox.isolation='bwrap' but {why}. Install bubblewrap (e.g. apt-get install "
                    "bubblewrap) where unprivileged user namespaces are allowed or run as root, or set "
                    "sandbox.isolation=auto|none (no isolation: programs see the host filesystem and network)"
                )
            else:
                self.isolation_note = f"isolation='auto': {why}; running without namespaces"
                log.warning(
                    "process sandbox: %s; sandboxed programs see the host filesystem%s "
                    "(use the docker backend, or install bubblewrap, for isolation)",
                    self.isolation_note, "" if self.cfg.network else " and can reach the network",
                )
        #: whether execs run without network access
        self.network_isolated = self.isolation == "bwrap" and not self.cfg.network

    # -- internals used by ProcessSandbox -------------------------------------------------

    def _bwrap_prefix(self, exe: str) -> list[str]:
        """bwrap options up to (not including) the work dir bind; see the module docstring."""
        a = [exe, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try"]
        if not self.cfg.network:
            a.append("--unshare-net")
        if os.geteuid() == 0:
            a += ["--cap-drop", "ALL"]
        for top in _BWRAP_SYSTEM:
            if os.path.islink(top):
                a += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                a += ["--ro-bind", top, top]
        a += ["--ro-bind", _etc_view(), "/etc"]
        for path in self._ro_binds:
            a += ["--ro-bind", path, path]
        a += ["--dev", "/dev", "--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm", "--proc", "/proc", "--tmpfs", "/tmp"]
        return a

    def _probe_bwrap(self) -> Optional[str]:
        """None when bwrap runs a command with this backend's options here; else why not."""
        exe = shutil.which("bwrap")
        if exe is None:
            return "bubblewrap (bwrap) is not installed (not on PATH)"
        prefix = self._bwrap_prefix(exe)
        key = (tuple(prefix), os.geteuid())
        if key not in _BWRAP_PROBES:
            argv = prefix + ["--bind", self.root, self.root] + _BWRAP_RO + ["--chdir", self.root, "--", "/bin/sh", "-c", ":"]
            try:
                r = subprocess.run(argv, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
                why = None if r.returncode == 0 else (
                    f"bubblewrap ({exe}) does not work here: {r.stderr.decode(errors='replace').strip()[:300]}")
            except (OSError, subprocess.SubprocessError) as exc:
                why = f"bubblewrap ({exe}) does not work here: {exc}"
            _BWRAP_PROBES[key] = why
        why = _BWRAP_PROBES[key]
        if why is None:
            self._bwrap = prefix
        return why

    def _wrap(self, argv: list[str], workdir: str) -> list[str]:
        if self._bwrap is None:
            return argv
        # the work dir at its host path (cwd-based straggler scans and HOME keep working); then
        # the root and /tmp (both tmpfs) read-only: writes outside the work dir fail
        return self._bwrap + ["--bind", workdir, workdir] + _BWRAP_RO + ["--chdir", workdir, "--"] + argv

    def _limits(self) -> list[tuple[int, int, int]]:
        cfg = self.cfg
        want: list[tuple[int, int, int]] = [(resource.RLIMIT_CORE, 0, 0)]
        if cfg.memory_mb and cfg.memory_mb > 0:
            want.append((resource.RLIMIT_AS, cfg.memory_mb * _MIB, cfg.memory_mb * _MIB))
        if cfg.cpu_seconds and cfg.cpu_seconds > 0:
            want.append((resource.RLIMIT_CPU, int(cfg.cpu_seconds), int(cfg.cpu_seconds) + 1))
        if cfg.max_file_mb and cfg.max_file_mb > 0:
            want.append((resource.RLIMIT_FSIZE, cfg.max_file_mb * _MIB, cfg.max_file_mb * _MIB))
        if cfg.max_processes and cfg.max_processes > 0 and os.geteuid() != 0:
            now = time.monotonic()
            stamp, count = self._nproc_cache
            if now - stamp > 1.0:
                count = _user_task_count(os.getuid())
                self._nproc_cache = (now, count)
            n = count + int(cfg.max_processes)
            want.append((resource.RLIMIT_NPROC, n, n))
        out = []
        for res, soft, hard in want:
            _, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            out.append((res, soft, hard))
        return out

    def _preexec(self) -> Any:
        limits = self._limits()
        setrlimit = resource.setrlimit

        def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
            for res, soft, hard in limits:
                try:
                    setrlimit(res, (soft, hard))
                except (ValueError, OSError):
                    pass

        return preexec

    def _new_dir(self, prefix: str) -> str:
        return tempfile.mkdtemp(prefix=prefix, dir=self.root)

    def _register(self, sb: ProcessSandbox) -> ProcessSandbox:
        with self._lock:
            self._sandboxes[sb.id] = sb
        return sb

    def _forget(self, sb: ProcessSandbox) -> None:
        with self._lock:
            self._sandboxes.pop(sb.id, None)

    def _snapshot(self, sb: ProcessSandbox) -> ProcessSnapshot:
        self._check_open()
        path = os.path.join(self.root, f"snap-{uuid.uuid4().hex[:12]}")
        _copy_dir(sb.workdir, path)
        with self._lock:
            self._snapshots.add(path)
        return ProcessSnapshot(path=path, sandbox_id=sb.id, created=time.time())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("process sandbox backend is closed")

    # -- SandboxBackend API ---------------------------------------------------------------

    def create(self) -> ProcessSandbox:
        self._check_open()
        return self._register(ProcessSandbox(self, self._new_dir("sb-")))

    def fork(self, snapshot: Any) -> ProcessSandbox:
        self._check_open()
        if not isinstance(snapshot, ProcessSnapshot):
            raise TypeError(f"fork needs a ProcessSnapshot, got {type(snapshot).__name__}")
        if snapshot.path not in self._snapshots or not os.path.isdir(snapshot.path):
            raise ValueError(f"snapshot {snapshot.path} does not belong to this backend or was dropped")
        workdir = os.path.join(self.root, f"sb-{uuid.uuid4().hex[:12]}")
        _copy_dir(snapshot.path, workdir)
        os.chmod(workdir, stat.S_IRWXU)
        return self._register(ProcessSandbox(self, workdir, origin=snapshot))

    def drop_snapshot(self, snapshot: ProcessSnapshot) -> None:
        """Delete a snapshot's copy (sandboxes forked from it can no longer ``reset``)."""
        with self._lock:
            self._snapshots.discard(snapshot.path)
        if os.path.isdir(snapshot.path):
            _rmtree(snapshot.path)

    @property
    def sandboxes(self) -> list[ProcessSandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sb in self.sandboxes:
            sb.close()
        with self._lock:
            self._snapshots.clear()
        _rmtree(self.root)
        self._finalizer.detach()

    def __enter__(self) -> "ProcessBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
