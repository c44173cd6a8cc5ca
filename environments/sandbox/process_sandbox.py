"""One process sandbox: a private work directory and the processes run in it (survey §8.2).

:class:`ProcessSandbox` runs each exec as a subprocess (under bubblewrap when the backend isolates)
with rlimits, supervises it (deadline, output caps, pids check) and kills its process tree;
:class:`ProcessSnapshot` is a snapshot handle. See :mod:`environments.sandbox.process` for the
design. Part of that module.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Optional, Union

from environments.sandbox.base import ExecResult, Sandbox, SandboxConfig
from environments.sandbox.process_host import (
    _MIN_PATH, _CHUNK, _POLL_S, _PIDS_CHECK_S, _KILL_FACTOR, _DRAIN_GRACE_S, _BWRAP_ERR, _proc_pids,
    _session_size, _tree_size, _children, _kill_group, _has_exited, _rmtree, _empty_dir, _copy_dir,
)

log = logging.getLogger("creditflow.sandbox")


@dataclass(frozen=True)
class ProcessSnapshot:
    """Handle of a snapshot: a copy of a sandbox's work directory (owned by its backend)."""

    path: str
    sandbox_id: str
    created: float


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
