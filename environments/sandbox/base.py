"""Sandbox interface for environment construction (survey §8.2: reset cost, safety).

Every backend (``process``: subprocesses in a private directory; ``docker``: pooled containers)
implements the same five operations:
create (the backend's ``create``), exec with a hard timeout, snapshot/fork, reset, close.
A fault inside a sandbox (timeout, crash, memory, huge output) never raises out of ``exec``:
it comes back as an :class:`ExecResult` with ``reason`` set, so the episode can end with a
recorded reason and the run goes on.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union
from stages.config_fields import param


@dataclass
class SandboxConfig:
    """Keys allowed under ``sandbox.`` in the run config."""

    backend: str = param("process", help="process | docker | auto (auto: docker when reachable)", choices=("process", "docker", "auto"))
    exec_timeout_s: float = param(10.0, help="hard wall-clock limit of one exec", gt=0)
    memory_mb: int = param(512, help="address-space / memory limit per sandbox", ge=1)
    cpu_seconds: int = param(30, help="CPU-time limit per exec (process backend rlimit)", ge=1)
    max_processes: int = param(64, help="pids limit (fork bombs)", ge=1)
    max_output_bytes: int = param(1_000_000, help="stdout/stderr kept per exec; the rest is dropped and flagged", ge=1)
    max_file_mb: int = param(64, help="largest file a sandbox may write", ge=1)
    network: bool = param(False, help="allow network access (off by default)")
    isolation: str = param("auto", help="process: auto (bwrap namespaces when available, else none) | bwrap (required) | none", choices=("auto", "bwrap", "none"))
    image: str = param("", help="docker: image to run; \"\" = creditflow/sandbox:latest, built offline from the host on first use")
    pool_size: int = param(4, help="docker: warm containers kept ready (create/fork take one, close resets and returns it)", ge=1)
    cpus: float = param(1.0, help="docker: CPU quota per sandbox, in cores", gt=0)
    work_dir_mb: int = param(128, help="docker: size of the writable work dir (tmpfs at /work); disk filling stops there", ge=1)
    docker_exec: str = param("resident", help="docker: resident (one long-lived executor per container, commands over its socket) | exec (one docker exec per command)", choices=("resident", "exec"))
    snapshot_mode: str = param("archive", help="docker: archive (tar of /work into a pooled container) | commit (docker commit + start)", choices=("archive", "commit"))


class SandboxUnavailable(RuntimeError):
    """The requested sandbox backend cannot run here (e.g. no Docker engine); the message says why and how to fix it."""


@dataclass
class ExecResult:
    exit_code: Optional[int]
    stdout: bytes
    stderr: bytes
    wall_seconds: float
    timed_out: bool = False
    truncated: bool = False
    #: "" when the command ran to completion; otherwise timeout, killed, oom, output_limit, error
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reason == "" and self.exit_code == 0


class Sandbox(abc.ABC):
    """An isolated working directory plus the processes run in it.

    A backend's sandbox sets ``cfg``, ``id``, ``_closed`` and ``_lock`` (a ``threading.RLock``
    held during every operation) and implements :meth:`_exec`; the prologue every exec shares
    (open check, argument checks, the lock) is :meth:`exec`'s.
    """

    cfg: SandboxConfig
    id: str
    _closed: bool
    _lock: Any

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"sandbox {self.id} is closed")

    def exec(
        self,
        cmd: Union[str, Sequence[str]],
        timeout_s: Optional[float] = None,
        stdin: Optional[bytes] = None,
    ) -> ExecResult:
        """Run ``cmd`` inside the sandbox with a hard timeout; kill its whole process tree on expiry.

        A string runs under ``/bin/sh -c``; a list is the argv. Faults come back as the result's
        ``reason``, never as an exception; bad arguments raise ``ValueError``/``TypeError``."""
        self._check_open()
        argv, timeout, stdin = self.exec_args(cmd, timeout_s, stdin)
        with self._lock:
            self._check_open()
            return self._exec(argv, timeout, None if stdin is None else bytes(stdin), isinstance(cmd, str))

    @abc.abstractmethod
    def _exec(self, argv: list[str], timeout: float, stdin: Optional[bytes], shell: bool) -> ExecResult:
        """The backend's exec of validated arguments, called with ``_lock`` held (``shell``: ``argv``
        is ``/bin/sh -c`` of a string command)."""

    def exec_args(self, cmd: Union[str, Sequence[str]], timeout_s: Optional[float],
                  stdin: Optional[bytes]) -> tuple[list[str], float, Optional[bytes]]:
        """Validate and normalise ``exec``'s arguments (shared by the backends): a string runs under
        ``/bin/sh -c``; the timeout defaults to ``cfg.exec_timeout_s`` and must be positive."""
        timeout = self.cfg.exec_timeout_s if timeout_s is None else float(timeout_s)
        if not timeout > 0:
            raise ValueError(f"exec timeout must be > 0 seconds, got {timeout_s!r}")
        if isinstance(cmd, str):
            argv = ["/bin/sh", "-c", cmd]
        else:
            argv = [os.fspath(c) for c in cmd]
            if not argv:
                raise ValueError("exec needs a non-empty command")
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin must be bytes or None, got {type(stdin).__name__}")
        return argv, timeout, stdin

    @staticmethod
    def rel_path(path: Union[str, "os.PathLike[str]"]) -> str:
        """Check a path given to the file API (shared by the backends): a non-empty relative
        ``str`` without NUL; each backend then checks where it resolves to."""
        p = os.fspath(path)
        if not isinstance(p, str):
            raise TypeError(f"sandbox paths are str, got {type(p).__name__}")
        if not p or "\x00" in p:
            raise ValueError(f"invalid sandbox path {p!r}")
        if os.path.isabs(p):
            raise ValueError(f"sandbox path {p!r} must be relative to the work directory")
        return p

    def write_data(self, path: str, data: bytes) -> bytes:
        """Validate ``write_file``'s data (shared by the backends): bytes (str is encoded) of at
        most ``cfg.max_file_mb``."""
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write_file data must be bytes, got {type(data).__name__}")
        if len(data) > int(self.cfg.max_file_mb) * 1024 * 1024:
            raise ValueError(f"write_file {path!r}: {len(data)} bytes exceeds max_file_mb={self.cfg.max_file_mb}")
        return data

    @abc.abstractmethod
    def write_file(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` relative to the sandbox work directory."""

    @abc.abstractmethod
    def read_file(self, path: str) -> bytes:
        """Read ``path`` relative to the sandbox work directory."""

    @abc.abstractmethod
    def snapshot(self) -> Any:
        """Capture the sandbox state; the handle can be passed to the backend's ``fork``."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Return to the state right after creation (cheaper than close + create)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Kill everything and release all resources (idempotent)."""

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SandboxBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def create(self) -> Sandbox:
        """A fresh sandbox."""

    @abc.abstractmethod
    def fork(self, snapshot: Any) -> Sandbox:
        """A new sandbox starting from ``snapshot`` (re-run from an intermediate turn)."""

    def close(self) -> None:
        """Release everything this backend created."""
