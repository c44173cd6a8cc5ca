"""Helpers for the environment tests: play two environments side by side."""

from __future__ import annotations

from typing import Iterable, Optional

from environments.base import Environment


def play_alike(e1: Environment, e2: Environment, texts: Iterable[str]) -> list[Optional[str]]:
    """Step ``e1`` and ``e2`` with each of ``texts`` until the episode ends, asserting that both
    return the same :class:`~environments.base.StepResult` every step; the parsed actions."""
    actions = []
    for a in texts:
        r1, r2 = e1.step(a), e2.step(a)
        assert r1 == r2
        actions.append(r1.action)
        if r1.done:
            break
    return actions
