"""One docker sandbox: a pooled container, its exec, files, snapshot and reset (survey §8.2).

:class:`DockerSandbox` runs each command through its container's resident executor
(:mod:`environments.sandbox.docker_resident`), or one ``docker exec`` per command
(:mod:`environments.sandbox.docker_exec`) as the fallback, and maps what happened to an
:class:`~environments.sandbox.base.ExecResult` reason. :class:`DockerSnapshot` is a snapshot handle.
See :mod:`environments.sandbox.docker` for the whole design. Part of that module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from environments.sandbox.base import ExecResult, Sandbox, SandboxConfig
from environments.sandbox.docker_exec import (
    _CANNOT_START, _CHUNK, _KILL_FACTOR, _MIB, _RESOLVE, _SIGKILL, _SIGXCPU, _SIGXFSZ, _WIPE, _WIPE_BODY, _WORK,
    _WRAPPER, _Raw, kill_all_helper, raw_exec,
)
from environments.sandbox.docker_resident import ExecutorGone

log = logging.getLogger("creditflow.sandbox")


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
        #: the container's cgroup oom_kill counter as last seen (pooled containers carry it over)
        self._oom_seen = backend._oom_counts.get(container_id, 0)
        self._healthy = True

    # -- helpers -------------------------------------------------------------------------

    def _check_path(self, path: Union[str, "os.PathLike[str]"]) -> str:
        p = self.rel_path(path)
        norm = os.path.normpath(p)
        if norm in (".", "..") or norm.startswith("../"):
            raise ValueError(f"sandbox path {p!r} escapes the work directory")
        return p

    def _raw_exec(self, argv: list[str], stdin: Optional[bytes], timeout: float, cap: int,
                  kill_at: Optional[int] = None) -> _Raw:
        """One ``docker exec`` (see :func:`~environments.sandbox.docker_exec.raw_exec`)."""
        return raw_exec(self.backend.api, self.container_id, argv, stdin, timeout, cap, kill_at,
                        kill_all=self._kill_all, name=self.id)

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
        if kill_all_helper(self.backend.api, self.container_id, self.id):
            return
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

    def _exec(self, argv: list[str], timeout: float, stdin: Optional[bytes], shell: bool) -> ExecResult:
        cap = max(int(self.cfg.max_output_bytes), 0)
        self.restarted = False
        t0 = time.monotonic()
        try:
            raw = self._run(
                argv,
                stdin,
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
        if not reason and rc == 127 and argv and not shell and raw.stderr_tail.endswith(
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
        if raw.oom is not None:
            self._oom_seen = max(self._oom_seen, raw.oom)
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
