"""Host-side pieces of the process sandbox backend (survey §8.2: safety during training).

Constants, the ``/proc`` scans that count and kill an exec's processes (session, tree, a uid's
tasks), the per-process ``/etc`` view bound under bubblewrap, and the work-dir copy/removal that
snapshot, fork and reset use. Part of :mod:`environments.sandbox.process`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import stat
import tempfile
import threading
from typing import Any, Optional


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
    """The sandbox's /etc: copies of the ``_BWRAP_ETC`` entries (and ``/etc/python3*``, and
    ``/etc/java-*``: Debian's JREs keep their ``conf`` there, ``java.security`` included, without
    which a JVM does not start — env=textgame env.sandboxed=true), made once
    per process (recreated if removed), deleted at exit. Directories keep their symlinks (e.g.
    ``alternatives`` -> ``/usr/...``); ``ssl/private`` is left out."""
    with _ETC_LOCK:
        path = _ETC_VIEWS.get(os.getpid())
        if path is not None and os.path.isdir(path):
            return path
        path = tempfile.mkdtemp(prefix="creditflow-etc-")
        try:
            names = set(_BWRAP_ETC) | {n for n in os.listdir("/etc") if n.startswith(("python3", "java-"))}
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
