"""Sandbox backends (survey §8.2). :func:`make_backend` picks one from ``SandboxConfig.backend``."""

from __future__ import annotations

import logging
from typing import Any, Optional

from environments.sandbox.base import ExecResult, Sandbox, SandboxBackend, SandboxConfig
from environments.sandbox.process import ProcessBackend, ProcessSandbox, ProcessSnapshot

log = logging.getLogger("creditflow.sandbox")

BACKENDS = ("process", "docker", "auto")

__all__ = [
    "BACKENDS",
    "ExecResult",
    "ProcessBackend",
    "ProcessSandbox",
    "ProcessSnapshot",
    "Sandbox",
    "SandboxBackend",
    "SandboxConfig",
    "make_backend",
]


def make_backend(cfg: Optional[SandboxConfig] = None, **kwargs: Any) -> SandboxBackend:
    """The backend named by ``cfg.backend``; ``kwargs`` go to the backend's constructor.

    ``auto`` would prefer docker when a Docker engine is reachable; the docker backend is not
    implemented yet, so ``auto`` chooses ``process`` and says so (``backend.chosen``, and an
    INFO log line). The returned backend's ``requested`` attribute holds ``cfg.backend``.
    """
    cfg = cfg if cfg is not None else SandboxConfig()
    name = cfg.backend
    if name == "docker":
        raise NotImplementedError("docker sandbox backend: not implemented yet (issue 4)")
    if name not in ("process", "auto"):
        raise ValueError(f"unknown sandbox backend {name!r}; expected one of: {', '.join(BACKENDS)}")
    backend = ProcessBackend(cfg, **kwargs)
    backend.chosen = "process"
    backend.requested = name  # type: ignore[attr-defined]
    if name == "auto":
        log.info("sandbox backend 'auto': chose 'process' (docker backend not implemented yet, issue 4)")
    return backend
