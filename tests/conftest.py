"""Shared fixtures: one Prefect test harness per session (its ephemeral server costs ~10-17 s),
an isolated CREDITFLOW_HOME per test, analytics off."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from tests.docker_support import docker_engine, docker_session_cleanup  # noqa: E402,F401  (Docker fixtures)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def cf_home(tmp_path, monkeypatch):
    home = tmp_path / "cfhome"
    monkeypatch.setenv("CREDITFLOW_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def shared_home(tmp_path_factory):
    """A home shared by tests that can reuse the cached warmed-up tiny policy."""
    return tmp_path_factory.mktemp("shared-cfhome")


@pytest.fixture(scope="session")
def servers(tmp_path_factory, shared_home):
    """Real ``prefect server start`` (with its UI) + ``mlflow server`` + ``creditflow serve``, once per
    session (tests/server_support.py); shared by tests/test_serve.py and tests/test_browser.py."""
    from tests.server_support import running_servers

    with running_servers(tmp_path_factory.mktemp("servers"), shared_home) as srv:
        yield srv


@pytest.fixture(scope="session")
def served_training(servers):
    """One clean tiny training run started through the ``creditflow-train`` deployment, completed."""
    from tests.server_support import train_through_deployment

    return train_through_deployment(servers)
