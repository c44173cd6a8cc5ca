"""The sandboxed mode of the bifurcation family (``env.sandboxed=true``): every transition runs
in the episode's sandbox (see :mod:`environments.tasks.bifurcation`, "Sandboxed mode")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from environments.base import StepResult, TaskInstance
from environments.sandbox.step_script import SandboxFault, StepScriptEnv
from environments.tasks.bifurcation_dp import OFF, ON
from environments.tasks.bifurcation_env import BifurcationEnv


STEP_SCRIPT = "bif_step.py"
SPEC_FILE = "bif_spec.json"
STATE_FILE = "bif_state.json"


class SandboxedBifurcationEnv(StepScriptEnv, BifurcationEnv):
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
        self._init_step_script(sandbox)
        #: None: the sandbox's own limit (``sandbox.exec_timeout_s``)
        self.exec_timeout_s = exec_timeout_s
        self._resets = 0

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
        self._timed(self.box.write_file, STEP_SCRIPT, _step_script_bytes())
        self._timed(self.box.write_file, SPEC_FILE, json.dumps(spec).encode())
        self._timed(self.box.write_file, STATE_FILE, json.dumps(state).encode())

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
        out = self._run_step_script(STEP_SCRIPT, {"action": action_text if isinstance(action_text, str) else None},
                                    timeout_s=self.exec_timeout_s)
        try:
            a = out["a"]
            if int(out["t"]) != t + 1 or (a is not None and a not in self.letters):
                raise ValueError(f"unexpected step output {out!r}")
            return a, ON if out["on"] else OFF, float(out["reward"]), bool(out["terminated"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SandboxFault("error", str(exc)) from exc

    def step(self, action_text: str) -> StepResult:
        try:
            return super().step(action_text)
        except SandboxFault as exc:
            self._s = OFF
            return self._fault_step(exc, action_text)

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
