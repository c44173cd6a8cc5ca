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
  the same symlinks as the host), a few ``/etc`` files that sh/coreutils/python3 (and a Debian JRE: ``/etc/java-*``) need
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

import logging
import os
import resource
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from typing import Any, Optional, Sequence

from environments.sandbox.base import SandboxBackend, SandboxConfig, SandboxUnavailable
from environments.sandbox.process_host import (
    _MIB, ISOLATIONS, _BWRAP_SYSTEM, _SHM_BYTES, _BWRAP_RO, _BWRAP_PROBES, _etc_view, _user_task_count,
    _rmtree, _copy_dir,
)
from environments.sandbox.process_sandbox import (  # noqa: F401 - public names of this module
    ProcessSandbox, ProcessSnapshot,
)

log = logging.getLogger("creditflow.sandbox")

__all__ = ["ISOLATIONS", "ProcessBackend", "ProcessSandbox", "ProcessSnapshot"]


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
