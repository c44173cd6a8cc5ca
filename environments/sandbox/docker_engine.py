"""Docker engine access and ownership of a docker sandbox backend's objects (survey §8.2: safety).

The engine client and its reachability checks (:func:`check_docker`, :func:`docker_reachable`);
the labels that tie containers and snapshot images to their owner process, and
:func:`cleanup_stale`, which removes those of dead owners on this host; the ``atexit`` hook and
chained ``SIGTERM`` handler that close every live backend. Part of :mod:`environments.sandbox.docker`.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import threading
import weakref
from typing import Any, Optional

from environments.sandbox.base import SandboxConfig, SandboxUnavailable
from environments.sandbox.image import MANAGED_LABEL

log = logging.getLogger("creditflow.sandbox")

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


#: every backend not yet closed (closed at exit)
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
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
