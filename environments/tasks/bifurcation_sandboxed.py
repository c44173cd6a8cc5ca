"""The sandboxed mode of the bifurcation family (``env.sandboxed=true``): every transition runs
in the episode's sandbox (see :mod:`environments.tasks.bifurcation`, "Sandboxed mode")."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from environments.base import StepResult, TaskInstance
from environments.tasks.bifurcation_dp import OFF, ON
from environments.tasks.bifurcation_env import BifurcationEnv

class SandboxFault(Exception):
    """A sandbox exec of the sandboxed mode failed (``reason``: the ExecResult reason or ``error``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


STEP_SCRIPT = "bif_step.py"
SPEC_FILE = "bif_spec.json"
STATE_FILE = "bif_state.json"


class SandboxedBifurcationEnv(BifurcationEnv):
    """``env.sandboxed=true``: every transition is computed by a stdlib-only script
    (:mod:`environments.tasks.bifurcation_step`) run inside the episode's sandbox, with the
    state kept in the sandbox work directory (``bif_state.json``). The host mirrors the state the
    script reports, so text, rewards, state keys, ground truth and snapshots are exactly those of
    :class:`BifurcationEnv` for the same instance, episode seed and actions. A sandbox fault
    (``ExecResult.reason`` set, a non-zero exit, unreadable output) ends the episode with
    terminal reward 0 and reason ``sandbox_<reason>`` (observation ``"done: failure"``)."""

    def __init__(self, cfg: Any, instance: TaskInstance, sandbox: Any, episode_seed: int = 0, tables: Any = None,
                 exec_timeout_s: Optional[float] = None):
        if sandbox is None:
            raise ValueError("env.sandboxed=true: make(instance, sandbox=...) needs a sandbox")
        super().__init__(cfg, instance, episode_seed=episode_seed, tables=tables)
        self.box = sandbox
        #: None: the sandbox's own limit (``sandbox.exec_timeout_s``)
        self.exec_timeout_s = exec_timeout_s
        self._sandbox_seconds = 0.0
        self._execs = 0
        self._resets = 0

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._sandbox_seconds += time.perf_counter() - t0

    def _write_state(self) -> None:
        spec = {
            "letters": self.letters,
            "decisive": list(self.decisive),
            "answers": list(self.answers),
            "slips": list(self.slips),
            "decisive_reward": float(self.cfg.decisive_reward),
            "terminate_on_error": bool(self.cfg.terminate_on_error),
        }
        state = {"t": self._t, "on": self._s == ON, "done": self._done}
        try:
            self._timed(self.box.write_file, STEP_SCRIPT, _step_script_bytes())
            self._timed(self.box.write_file, SPEC_FILE, json.dumps(spec).encode())
            self._timed(self.box.write_file, STATE_FILE, json.dumps(state).encode())
        except Exception as exc:  # noqa: BLE001
            raise SandboxFault("error", f"{type(exc).__name__}: {exc}") from exc

    def reset(self) -> str:
        prompt = super().reset()
        self._resets += 1
        self._fault: Optional[str] = None
        try:
            self._write_state()
        except SandboxFault as exc:
            self._fault = exc.reason  # reported by the first step
        return prompt

    def _apply(self, t: int, action_text: str) -> tuple[Optional[str], int, float, bool]:
        if getattr(self, "_fault", None):
            raise SandboxFault(self._fault or "error")
        payload = json.dumps({"action": action_text if isinstance(action_text, str) else None}).encode()
        try:
            res = self._timed(self.box.exec, ["python3", "-I", "-S", STEP_SCRIPT], timeout_s=self.exec_timeout_s,
                              stdin=payload)
        except Exception as exc:  # noqa: BLE001 - a broken sandbox is a fault, never a crash
            raise SandboxFault("error", f"{type(exc).__name__}: {exc}") from exc
        self._execs += 1
        if res.reason:
            raise SandboxFault(res.reason)
        try:
            if res.exit_code != 0:
                raise ValueError(f"exit code {res.exit_code}: {res.stderr[-200:]!r}")
            out = json.loads(res.stdout.decode().strip().splitlines()[-1])
            a = out["a"]
            if int(out["t"]) != t + 1 or (a is not None and a not in self.letters):
                raise ValueError(f"unexpected step output {out!r}")
            return a, ON if out["on"] else OFF, float(out["reward"]), bool(out["terminated"])
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise SandboxFault("error", str(exc)) from exc

    def step(self, action_text: str) -> StepResult:
        try:
            return super().step(action_text)
        except SandboxFault as exc:
            t = self._t
            self.actions.append(None)
            self._t, self._s, self._done, self._success = t + 1, OFF, True, False
            prefix = "" if isinstance(action_text, str) and action_text.endswith("\n") else "\n"
            info = {"turn": t, "valid": False, "turn_reward": 0.0, "terminal_reward": 0.0, "sandbox_fault": str(exc)}
            return StepResult(observation=prefix + "done: failure", reward=0.0, done=True, action=None,
                              state_key=self.state_key(), success=False, reason=f"sandbox_{exc.reason}", info=info)

    def restore(self, handle: dict[str, Any], reseed: Optional[int] = None) -> None:
        super().restore(handle, reseed=reseed)
        self._resets += 1
        self._fault = None
        try:
            self._write_state()
        except SandboxFault as exc:
            self._fault = exc.reason

    def stats(self) -> dict[str, float]:
        return {"sandbox_seconds": self._sandbox_seconds, "sandbox_execs": float(self._execs),
                "env_resets": float(max(self._resets, 1))}


_STEP_SCRIPT_CACHE: list[bytes] = []


def _step_script_bytes() -> bytes:
    if not _STEP_SCRIPT_CACHE:
        _STEP_SCRIPT_CACHE.append((Path(__file__).resolve().parent / "bifurcation_step.py").read_bytes())
    return _STEP_SCRIPT_CACHE[0]
