"""The tracking store around a :class:`flows.tracking.Tracker`: where it is by default, whether a
tracking server answers at start, which of its errors are worth retrying (transient), and the
file lock that serialises creating a SQLite store's schema. See :mod:`flows.tracking` (survey §8:
pipelines run for days; a tracking server restarts)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Optional

from flows.config import ConfigError


class TrackingServerUnreachable(ConfigError):
    """The configured tracking server does not answer at start (reported before any compute)."""


def default_tracking_uri(home: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (e.g. a tracking server), else SQLite under the home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """One request to an ``http(s)`` tracking server; :class:`TrackingServerUnreachable` if nothing
    answers. Any HTTP answer (even 401/404 from a proxy) counts as reachable; local stores
    (sqlite, file, paths) are not checked."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except Exception as exc:  # URLError (refused, DNS), socket timeout, reset
        reason = getattr(exc, "reason", exc)
        raise TrackingServerUnreachable(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it (see infra/README.md) or "
            "point MLFLOW_TRACKING_URI / tracking.mlflow_uri at a running one (unset both for the local "
            "SQLite store)"
        ) from None


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the store was unreachable or busy, not a rejection of what we sent."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    text = f"{type(exc).__name__}: {exc}"
    if "database is locked" in text or "database table is locked" in text:
        return True
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "")
        if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"):
            return True
        # the REST client reports connection failures and 5xx answers as INTERNAL_ERROR
        return code == "INTERNAL_ERROR" and any(s in text for s in (
            "API request to", "Max retries exceeded", "Connection refused", "Connection aborted",
            "RemoteDisconnected", "timed out", "503", "502", "504", "500"))
    return False


def _sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_init_lock(uri: str):
    """Serialise schema + experiment creation on a SQLite store across processes."""
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init-lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
