"""Running a task family's standard-library step script inside an episode's sandbox.

The sandboxed modes of ``bifurcation``, ``sokoban`` and the tabular Gymnasium environments keep
their state in the sandbox's work directory and compute every transition with
``python3 -I -S <script>`` (JSON on stdin, one JSON line on stdout). :class:`StepScriptEnv` is
the part they share: timing the sandbox operations, counting execs, and turning every way the
exec can go wrong (an exception, ``ExecResult.reason``, a non-zero exit, unreadable output) into
one :class:`SandboxFault`, which the family turns into an ended episode with the reason.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

from environments.base import StepResult


class SandboxFault(Exception):
    """A sandbox operation of a sandboxed mode failed (``reason``: the ExecResult reason or ``error``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class StepScriptEnv:
    """Mixin of the sandboxed environments: ``box`` (the sandbox), ``_sandbox_seconds`` and
    ``_execs`` (the per-episode stats) are set by :meth:`_init_step_script`."""

    box: Any
    _sandbox_seconds: float
    _execs: int

    def _init_step_script(self, sandbox: Any) -> None:
        self.box = sandbox
        self._sandbox_seconds = 0.0
        self._execs = 0

    def _timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with its time added to ``_sandbox_seconds``; any exception but
        a :class:`SandboxFault` becomes ``SandboxFault("error", ...)`` (a broken sandbox is a fault,
        never a crash)."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except SandboxFault:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SandboxFault("error", f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._sandbox_seconds += time.perf_counter() - t0

    def _run_step_script(self, script: str, payload: dict[str, Any], timeout_s: Optional[float] = None) -> dict[str, Any]:
        """One exec of ``python3 -I -S script`` with ``payload`` as JSON on stdin; returns the JSON
        object of its last stdout line. ``timeout_s`` None: the sandbox's own limit."""
        res = self._timed(self.box.exec, ["python3", "-I", "-S", script], timeout_s=timeout_s,
                          stdin=json.dumps(payload).encode())
        self._execs += 1
        if res.reason:
            raise SandboxFault(res.reason)
        try:
            if res.exit_code != 0:
                raise ValueError(f"exit code {res.exit_code}: {res.stderr[-200:]!r}")
            out = json.loads(res.stdout.decode().strip().splitlines()[-1])
            if not isinstance(out, dict):
                raise TypeError(f"step output is not an object: {out!r}")
            return out
        except (ValueError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise SandboxFault("error", str(exc)) from exc

    def _fault_step(self, exc: SandboxFault, action_text: Any) -> StepResult:
        """The turn a sandbox fault ends: the episode is over with terminal reward 0, reason
        ``sandbox_<reason>``, observation ``"done: failure"`` (the environment's ``_t``, ``_done``,
        ``_success`` and ``actions`` updated as a played turn would)."""
        t = self._t  # type: ignore[attr-defined]
        self.actions.append(None)  # type: ignore[attr-defined]
        self._t, self._done, self._success = t + 1, True, False  # type: ignore[attr-defined]
        prefix = "" if isinstance(action_text, str) and action_text.endswith("\n") else "\n"
        info = {"turn": t, "valid": False, "turn_reward": 0.0, "terminal_reward": 0.0, "sandbox_fault": str(exc)}
        return StepResult(observation=prefix + "done: failure", reward=0.0, done=True, action=None,
                          state_key=self.state_key(), success=False, reason=f"sandbox_{exc.reason}", info=info)  # type: ignore[attr-defined]
