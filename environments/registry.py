"""The registry of task families (stage 1 of survey §8): name -> :class:`~environments.base.TaskFamily`.

A family module registers its class with :func:`register_family`; ``env.name`` in the run config
picks it. The built-in families (:mod:`environments.tasks`) register when that package is
imported: the registry does not import them (they import it), so whoever looks families up by
name imports ``environments.tasks`` first (``flows.config`` does).
"""

from __future__ import annotations

from environments.base import TaskFamily

_FAMILIES: dict[str, type[TaskFamily]] = {}


def register_family(cls: type[TaskFamily]) -> type[TaskFamily]:
    """Class decorator adding ``cls`` to the registry under ``cls.name``."""
    if cls.name in _FAMILIES:
        raise ValueError(f"task family {cls.name!r} registered twice")
    _FAMILIES[cls.name] = cls
    return cls


def family_names() -> list[str]:
    """Names of the registered families, sorted."""
    return sorted(_FAMILIES)


def get_family_class(name: str) -> type[TaskFamily]:
    """The family registered as ``name``; ``KeyError`` listing the known ones otherwise."""
    if name not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES)) or "none registered (importing environments.tasks registers the built-in ones)"
        raise KeyError(f"unknown env {name!r}; known task families: {known}")
    return _FAMILIES[name]
