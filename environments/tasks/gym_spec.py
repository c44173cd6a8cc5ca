"""Gymnasium ids, ``env.gym_kwargs`` and ANSI text: the adapter's plumbing around ``gymnasium.make``.

:func:`resolve_gym_id` imports the package that registers an id (``"module:Id"``, Gymnasium's own
convention, or ``MiniGrid-*``), :func:`parse_kwargs` reads ``env.gym_kwargs`` in the two forms the
command line keeps, :func:`make_gym` picks the ``ansi`` rendering where the environment offers one,
and :func:`strip_ansi` turns an ANSI rendering into plain text (a highlighted cell becomes
``[cell]``). Used by :mod:`environments.tasks.gym_adapter`.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, Optional

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: a coloured segment (the agent's cell in FrozenLake, the passenger in Taxi): kept as [text]
_HIGHLIGHT = re.compile(r"\x1b\[(?:4[0-7]|10[0-7])[0-9;]*m([^\x1b]*)\x1b\[0m")
#: packages whose import registers the ids with this prefix
_ID_PACKAGES = {"MiniGrid-": "minigrid", "BabyAI-": "minigrid"}


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escapes; a segment drawn on a coloured background becomes ``[segment]``."""
    return _ANSI.sub("", _HIGHLIGHT.sub(r"[\1]", text))


def resolve_gym_id(gym_id: str) -> str:
    """The registered id of ``gym_id`` after importing the package that registers it:
    ``"module:Id"`` imports ``module`` (gymnasium's own convention), ``MiniGrid-*`` imports
    ``minigrid``. Raises ``ValueError`` with gymnasium's reason when the id is unknown."""
    import gymnasium

    mod, sep, name = str(gym_id).rpartition(":")
    if not sep:
        name = str(gym_id)
        mod = next((pkg for prefix, pkg in _ID_PACKAGES.items() if name.startswith(prefix)), "")
    if mod:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ValueError(f"cannot import {mod!r} ({exc})") from exc
    try:
        gymnasium.spec(name)
    except gymnasium.error.Error as exc:
        raise ValueError(str(exc).splitlines()[0]) from exc
    return name


def _gym_id_problem(value: str) -> Optional[str]:
    try:
        resolve_gym_id(value)
    except ValueError as exc:
        return f"not a registered Gymnasium id ({exc})"
    return None


def parse_kwargs(text: str) -> dict[str, Any]:
    """``env.gym_kwargs``: a JSON object (``'{"is_slippery": false}'``) or ``key=value`` pairs
    separated by commas (``is_slippery=false,map_name=8x8``; each value read as JSON when it
    parses, else as a string), the form that survives the command line's dotlist parser."""
    text = str(text).strip()
    if not text:
        return {}
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    out: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not key=value")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw.strip()
    return out


def _kwargs_problem(value: str) -> Optional[str]:
    try:
        parse_kwargs(value)
    except ValueError as exc:
        return f"must be a JSON object or key=value,... of gymnasium.make keyword arguments ({exc})"
    return None


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in info.items():
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
            v = v.item()
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[str(k)] = v
    return out


def make_gym(gym_id: str, kwargs: dict[str, Any], max_turns: int) -> Any:
    """``gymnasium.make`` with an ``ansi`` rendering where the environment offers one."""
    import gymnasium

    name = resolve_gym_id(gym_id)
    kwargs = dict(kwargs)
    modes: list[str] = []
    entry = gymnasium.spec(name).entry_point  # "module:Class": the class's metadata lists its render modes
    if "render_mode" not in kwargs and isinstance(entry, str):
        mod, _, cls = entry.partition(":")
        try:
            modes = list(getattr(getattr(importlib.import_module(mod), cls), "metadata", {}).get("render_modes", []))
        except (ImportError, AttributeError):
            modes = []
    if "render_mode" not in kwargs and "ansi" in modes:
        kwargs["render_mode"] = "ansi"
    return gymnasium.make(name, max_episode_steps=int(max_turns), **kwargs)
