"""Sandbox backends (survey §8.2). :func:`make_backend` picks one from ``SandboxConfig.backend``."""

from __future__ import annotations

import logging
from typing import Any, Optional

from environments.sandbox.base import ExecResult, Sandbox, SandboxBackend, SandboxConfig, SandboxUnavailable
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
    "SandboxUnavailable",
    "check_docker",
    "make_backend",
]


def check_docker(cfg: Optional[SandboxConfig] = None) -> None:
    """Raise :class:`SandboxUnavailable` (with the reason and the fix) unless a Docker engine answers.

    Cheap (one ping, no container, no image build): meant for config validation before any compute.
    """
    from environments.sandbox.docker import check_docker as _check

    _check(cfg)


def make_backend(cfg: Optional[SandboxConfig] = None, **kwargs: Any) -> SandboxBackend:
    """The backend named by ``cfg.backend``; ``kwargs`` go to the backend's constructor.

    ``docker``: :class:`~environments.sandbox.docker.DockerBackend`; raises
    :class:`SandboxUnavailable` (reason + fix) before any compute when no engine is reachable.
    ``auto``: docker when an engine answers, else process; says which it picked
    (``backend.chosen``, and an INFO log line). ``process``: :class:`ProcessBackend`.
    The returned backend's ``requested`` attribute holds ``cfg.backend``.
    """
    cfg = cfg if cfg is not None else SandboxConfig()
    name = cfg.backend
    if name not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {name!r}; expected one of: {', '.join(BACKENDS)}")
    backend: SandboxBackend
    if name in ("docker", "auto"):
        from environments.sandbox.docker import DockerBackend, docker_reachable

        if name == "docker":
            check_docker(cfg)
            backend = DockerBackend(cfg, **kwargs)
        else:
            ok, why = docker_reachable()
            if ok:
                try:
                    backend = DockerBackend(cfg, **kwargs)
                except SandboxUnavailable as exc:
                    ok, why = False, str(exc)
            if ok:
                log.info("sandbox backend 'auto': chose 'docker' (engine reachable, image %s)", backend.image_digest)
            else:
                backend = ProcessBackend(cfg, **kwargs)
                log.info("sandbox backend 'auto': chose 'process' (%s)", why)
    else:
        backend = ProcessBackend(cfg, **kwargs)
    backend.chosen = backend.name  # type: ignore[attr-defined]
    backend.requested = name  # type: ignore[attr-defined]
    return backend
