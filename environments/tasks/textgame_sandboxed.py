"""``env=textgame env.sandboxed=true``: the TextWorld Express game runs inside the episode's process
sandbox (survey §8.2), with the same observations, rewards, dones and ground truth as in-process.

How
---
At an episode's first reset the host writes into the sandbox's work directory: the step script
(:mod:`environments.tasks.textgame_step`), the py4j client (pure Python, from the trainer's
environment), py4j's jar, TextWorld Express's jar and the two data files it reads from its working
directory (``twc_objects.folds.json``, ``cooking_world.json``): about 2 MB. Every engine call is then
one ``python3 -I -S textgame_step.py`` exec: the script starts a JVM *in the sandbox* (bwrap's
namespaces, the sandbox's rlimits; the system JRE under ``/usr``, its Debian ``conf`` from
``/etc/java-*`` in the sandbox's ``/etc``), generates the game from its seed, **replays the
episode's commands** (TextWorld Express has no state copy and the process sandbox keeps no process
alive between execs) and prints the state reached. A reset is one exec (it also generates the gold
path, on a second game object, so ``privileged()`` costs nothing more); a valid command is one
exec; an invalid command is answered on the host without the engine, exactly as in-process (the
host holds the state's validActions from the last exec). A restore is one exec replaying the
snapshot's commands.

Cost (measured here, 2 loaded cores, nice 19): about 2.3 s per exec (JVM start + py4j), against
milliseconds in-process; a step replays ``t`` commands, so an episode of ``T`` valid commands costs
``T + 1`` execs and ``O(T^2)`` engine steps in the sandbox. It is the safe mode, not the fast one.
The sandbox's ``sandbox.exec_timeout_s`` (default 10 s) bounds each exec; a long episode on a
loaded machine may need more.

What stays on the host
----------------------
The split's seed list (``TextWorld Express``'s folds), the ``env.params`` check of the config
loader, the warm-up corpus (format episodes only) and the ground truth (``env.ground_truth=mc`` /
``exhaustive``: the harness's Monte Carlo, not the policy's environment) use the trainer's JVM as
in-process; the episodes the policy plays never do.

Faults
------
Any failure of an exec (``ExecResult.reason``: ``timeout``, ``killed``, ``cpu_limit``, …, a
non-zero exit, unreadable or inconsistent output) ends the episode: terminal reward 0, reason
``sandbox_<reason>``, ``info["sandbox_fault"]`` the detail (:class:`~environments.sandbox.step_script.StepScriptEnv`).
A fault at reset makes the prompt say so and the first step end the episode the same way.

Backends: the process backend only. The Docker image (:mod:`environments.sandbox.image`) is
assembled offline from the host's standard-library python3 and carries no Java runtime, so the
config loader refuses ``sandbox.backend=docker|auto`` with :data:`DOCKER_REFUSAL`; the JVM needs
``sandbox.memory_mb >= MIN_MEMORY_MB`` (its address-space reservations, kept small by the step
script's ``JAVA_OPTS``).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Optional

from environments.base import StepResult, TaskInstance
from environments.sandbox.step_script import SandboxFault, StepScriptEnv
from environments.tasks import textgame_step
from environments.tasks.textgame_env import TextGameEnv, _clean

STEP_SCRIPT = "textgame_step.py"
#: the JVM does not start with less (RLIMIT_AS; measured with textgame_step.JAVA_OPTS)
MIN_MEMORY_MB = 512
DOCKER_REFUSAL = ("env=textgame env.sandboxed=true runs on the process backend only: the Docker sandbox image is "
                  "built offline from the host's stdlib python3 and has no Java runtime for TextWorld Express; "
                  "set sandbox.backend=process")

_FILES: dict[str, bytes] = {}


def sandbox_files() -> dict[str, bytes]:
    """The files a sandbox needs to run the game: relative path -> bytes (read once per process)."""
    if not _FILES:
        import py4j
        from py4j.java_gateway import find_jar_path
        from textworld_express.constants import BASEPATH, JAR_PATH

        files = {STEP_SCRIPT: Path(textgame_step.__file__).read_bytes(),
                 textgame_step.PY4J_JAR: Path(find_jar_path()).read_bytes(),
                 textgame_step.TWX_JAR: Path(JAR_PATH).read_bytes()}
        for name in ("twc_objects.folds.json", "cooking_world.json"):
            files[name] = Path(BASEPATH, name).read_bytes()
        for src in sorted(glob.glob(os.path.join(os.path.dirname(py4j.__file__), "*.py"))):
            files["py4j/" + os.path.basename(src)] = Path(src).read_bytes()
        _FILES.update(files)
    return dict(_FILES)


class SandboxedTextGameEnv(StepScriptEnv, TextGameEnv):
    """A :class:`TextGameEnv` whose engine calls run in ``sandbox`` (module docstring)."""

    def __init__(self, cfg: Any, instance: TaskInstance, sandbox: Any, episode_seed: int = 0):
        if sandbox is None:
            raise ValueError("env.sandboxed=true: make(instance, sandbox=...) needs a sandbox")
        from environments.sandbox.process_sandbox import ProcessSandbox

        if not isinstance(sandbox, ProcessSandbox):
            raise ValueError(DOCKER_REFUSAL)
        # TextGameEnv's fields without the host game: the engine lives in the sandbox
        self._init_episode(cfg, instance, episode_seed, None)
        self._tree: Any = None
        self._installed = False
        self._fault: Optional[SandboxFault] = None
        self._init_step_script(sandbox)

    # -- the sandbox ----------------------------------------------------------------------

    def _install(self) -> None:
        if not self._installed:
            for rel, data in sandbox_files().items():
                self._timed(self.box.write_file, rel, data)
            self._installed = True

    def _run(self, actions: list[str], gold: bool = False) -> dict[str, Any]:
        """One exec of the step script: the state after replaying ``actions`` from the reset."""
        self._install()
        payload = {"game": self.spec["game"], "params": self.spec["params"], "fold": self.spec["fold"],
                   "seed": int(self.spec["game_seed"]), "actions": list(actions), "tree": True, "gold": gold}
        out = self._run_step_script(STEP_SCRIPT, payload)
        try:
            info, looks = out["info"], out["looks"]
            if int(out["steps"]) != len(actions) or len(looks) != len(actions) + 1 or not isinstance(info, dict):
                raise ValueError("step output does not match the request")
            for key in ("observation", "validActions", "score"):
                info[key]  # noqa: B018 - present, or the output is not the engine's
            if gold and not isinstance(out.get("gold"), list):
                raise ValueError("no gold path in the step output")
        except (KeyError, TypeError, ValueError) as exc:
            raise SandboxFault("error", f"unexpected step output: {exc}") from exc
        self._tree = out.get("tree")
        return out

    # -- TextGameEnv's engine hooks, through the sandbox -------------------------------------

    def _engine_reset(self) -> dict[str, Any]:
        out = self._run([], gold=not self._gold)
        if not self._gold:
            self._gold = [str(a) for a in out["gold"]]
        self._resets += 1
        return out["info"]

    def _engine_step(self, cmd: str) -> tuple[str, float, dict[str, Any]]:
        out = self._run(self.actions + [cmd])
        self._engine_steps += 1
        return out["info"]["observation"], out["reward"], out["info"]

    def _object_tree(self) -> Any:
        return self._tree

    def gold_path(self) -> list[str]:
        if not self._gold:
            self._gold = [str(a) for a in self._run([], gold=True)["gold"]]
        return list(self._gold)

    def reset(self) -> str:
        self._fault = None
        try:
            return super().reset()
        except SandboxFault as exc:
            self._fault = exc
            self._started, self._done, self._success, self._t = True, False, False, 0
            self.actions, self.rooms = [], {}
            self._set_state({"validActions": [], "score": 0.0, "look": "", "observation": ""})
            return f"Task: unavailable (sandbox fault: {exc.reason})" + self._render("")

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        try:
            if self._fault is not None:
                raise self._fault
            return super().step(action_text)
        except SandboxFault as exc:
            res = self._fault_step(exc, action_text)
            self.actions.pop()  # the None _fault_step records: ``actions`` are the engine's commands
            return res

    def restore(self, handle: dict[str, Any]) -> None:
        """Back to ``handle``'s state: one exec replaying its commands (the visited rooms rebuilt
        from the replayed states, as the in-process replay does)."""
        out = self._run(list(handle["actions"]))
        self._resets += 1
        self._engine_steps += len(handle["actions"])
        self.actions, self.rooms = list(handle["actions"]), {}
        for look in out["looks"]:
            look = _clean(look)
            self.rooms[look.split(".", 1)[0]] = look
        self._set_state(out["info"])
        self._t, self._done, self._started = int(handle["t"]), bool(handle["done"]), bool(handle["started"])
        self._success = bool(self.info.get("tasksuccess"))
        self._fault = None

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "sandbox_seconds": self._sandbox_seconds, "sandbox_execs": float(self._execs)}

    def close(self) -> None:
        """Nothing on the host to give back (the sandbox is the rollout's)."""
        self.game = None
