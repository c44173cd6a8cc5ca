"""Docker fixtures for the sandbox tests (survey §8.2: safety during training).

* ``docker_engine`` (session): a ``docker.DockerClient`` of a reachable engine. When none answers
  and this is root with ``dockerd`` installed, dockerd is started in the background (log:
  ``$TMPDIR/creditflow-dockerd.log``, ≤30 s); otherwise the test is skipped with the reason and
  the fix (``infra/ensure_docker.sh``).
* ``docker_session_cleanup`` (session, autouse): at the end of the session removes every
  container and snapshot image labelled as created by this test process
  (``creditflow.owner_pid``), so no container outlives the test session even when a test
  failed half-way. It does nothing unless the docker backend was imported.

Import them in ``tests/conftest.py`` (or in a test module) to register them with pytest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import pytest

_STATE: dict[str, Any] = {}
MANAGED = "creditflow.managed=1"


def _ping(timeout: int = 5) -> tuple[Optional[Any], str]:
    try:
        import docker
    except ImportError as exc:
        return None, f"the Python package 'docker' is not installed ({exc})"
    try:
        client = docker.from_env(timeout=120)
        client.ping()
        return client, ""
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


def _start_dockerd() -> str:
    """Start dockerd in the background when possible; '' on success, else why not."""
    exe = shutil.which("dockerd")
    if exe is None:
        return "dockerd is not installed"
    if os.geteuid() != 0:
        return "dockerd is installed but this is not root"
    log = os.path.join(tempfile.gettempdir(), "creditflow-dockerd.log")
    with open(log, "ab") as f:
        subprocess.Popen([exe], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if _ping()[0] is not None:
            return ""
        time.sleep(0.5)
    return f"dockerd did not become ready within 30 s (log: {log})"


def engine_or_reason() -> tuple[Optional[Any], str]:
    """(client, '') for a reachable engine, started if need be; else (None, reason + fix)."""
    if "result" not in _STATE:
        client, why = _ping()
        if client is None:
            started = _start_dockerd()
            if not started:
                client, why = _ping()
            else:
                why = f"{why}; {started}"
        if client is None:
            why = f"no Docker engine reachable ({why}); fix: sudo infra/ensure_docker.sh"
        _STATE["result"] = (client, why)
    return _STATE["result"]


def docker_cfg(**kw: Any) -> Any:
    """The small docker sandbox config of the docker tests (``kw`` overrides fields)."""
    from environments.sandbox import SandboxConfig

    base = dict(backend="docker", exec_timeout_s=5.0, memory_mb=256, max_processes=32, max_file_mb=16,
                work_dir_mb=32, pool_size=1)
    base.update(kw)
    return SandboxConfig(**base)


def labelled(client: Any, **labels: str) -> list[dict[str, Any]]:
    """Containers (all states) carrying ``creditflow.managed=1`` and the given ``creditflow.<k>=v`` labels."""
    filters = [MANAGED] + [f"creditflow.{k}={v}" for k, v in labels.items()]
    return client.api.containers(all=True, filters={"label": filters})


def labelled_images(client: Any, **labels: str) -> list[dict[str, Any]]:
    filters = ["creditflow.kind=snapshot"] + [f"creditflow.{k}={v}" for k, v in labels.items()]
    return client.api.images(filters={"label": filters})


@pytest.fixture(scope="session")
def docker_engine() -> Any:
    client, why = engine_or_reason()
    if client is None:
        pytest.skip(why)
    return client


@pytest.fixture(scope="session", autouse=True)
def docker_session_cleanup() -> Any:
    yield
    if "environments.sandbox.docker" not in sys.modules:
        return
    client, _ = _ping()
    if client is None:
        return
    me = str(os.getpid())
    for c in labelled(client, owner_pid=me):
        try:
            client.api.remove_container(c["Id"], force=True, v=True)
        except Exception:  # noqa: BLE001
            pass
    for img in labelled_images(client, owner_pid=me):
        try:
            client.api.remove_image(img["Id"], force=True)
        except Exception:  # noqa: BLE001
            pass
