"""What a person sees on the console (issue 13): the progress display of flows/progress.py, the
run's log file of flows/runlog.py, and the CLI end to end in a subprocess — the progress lines on
stdout, nothing on stderr, the libraries' lines in the log file (and Prefect's still at its API)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from flows.progress import PRELUDE, LiveProgress, PlainProgress, RunProgress, duration, for_console
from flows.runlog import RunLog

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STAGES = ("env", "rollout", "reward", "credit", "update")
TINY = ["iterations=1", "rollout.tasks_per_iteration=4", "rollout.group_size=4", "eval_episodes=8",
        "env.horizon=3", "env.num_decisive=1"]


class Clock:
    """A clock the test moves by hand (no wall-clock figure is asserted)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _drive(progress: RunProgress, clock: Clock, iterations_done: int = 1, per_stage: float = 2.0) -> None:
    """The hooks in the order the flow calls them: header, prepare, eval, some iterations."""
    progress.run_started("cf-test", "grpo", "bifurcation", "tiny-qwen2", 20)
    progress.stage_started(PRELUDE, "prepare")
    clock.now += 3
    progress.stage_done(PRELUDE, "prepare", 3.0, False)
    progress.prepared("tiny-qwen2", 162752, False)
    progress.evaluated("before", {"success_rate": 0.25, "ci95": (0.16, 0.368), "episodes": 64})
    for it in range(iterations_done):
        progress.iteration_started(it)
        for name in STAGES:
            progress.stage_started(it, name)
            clock.now += per_stage
            progress.stage_done(it, name, per_stage, cached=False)
        progress.iteration_done(it, {"success": 0.25 + 0.1 * it, "loss": -0.0114})


def test_duration_text():
    assert [duration(s) for s in (None, float("nan"), 0.4, 42, 190, 3900)] == ["-", "-", "0s", "42s", "3m10s", "1h05m"]


def test_live_display_shows_iteration_stage_eta_and_the_last_iteration():
    from rich.console import Console

    clock = Clock()
    out = io.StringIO()
    live = LiveProgress(clock=clock, console=Console(file=out, force_terminal=True, width=140), refresh_per_second=1)
    try:
        _drive(live, clock, iterations_done=1, per_stage=2.0)  # iteration 1 took 10 s (5 stages x 2 s)
        live.iteration_started(1)
        live.stage_started(1, "env")
        clock.now += 0.5
        live.stage_done(1, "env", 0.5, cached=False)
        live.stage_started(1, "rollout")
        clock.now += 1.5
        panel = io.StringIO()
        Console(file=panel, force_terminal=True, width=140).print(live)
    finally:
        live.close()
    text = ANSI.sub("", panel.getvalue())
    assert "iteration 1/20" in text  # k done of N
    assert "━" in text  # the bar
    # ETA: 10 s per computed iteration x 19 left, less the 2 s the running one has taken
    assert "ETA 3m08s" in text
    assert "now: rollout (iteration 2) 1.5s" in text
    assert "last: iteration 1" in text and "success 0.25" in text and "loss -0.0114" in text
    assert "env 2.00s | rollout 2.00s | reward 2.00s | credit 2.00s | update 2.00s" in text
    # the scrollback keeps the header, the evals, one short line per iteration and the summary
    shown = ANSI.sub("", out.getvalue())
    assert "creditflow run cf-test: method=grpo env=bifurcation model=tiny-qwen2 iterations=20" in shown
    assert "eval before training: success 0.250 (95% CI 0.160-0.368, 64 episodes)" in shown
    assert "[iter 1/20] success 0.25 loss -0.0114  (10s)" in shown
    assert "trained 1/20 iterations in 10s; training-batch success 0.25 (iteration 1)" in shown


def test_live_display_names_the_evals_outside_iterations():
    from rich.console import Console

    clock = Clock()
    live = LiveProgress(clock=clock, console=Console(file=io.StringIO(), force_terminal=True, width=140))
    try:
        live.run_started("cf-test", "grpo", "bifurcation", "tiny-qwen2", 2)
        live.stage_started(PRELUDE, "eval")
        panel = io.StringIO()
        Console(file=panel, force_terminal=True, width=140).print(live)
        assert "now: eval (before training)" in ANSI.sub("", panel.getvalue())
        assert "ETA -" in ANSI.sub("", panel.getvalue())  # nothing computed yet: no guess
        live.stage_started(2, "eval")
        panel = io.StringIO()
        Console(file=panel, force_terminal=True, width=140).print(live)
        assert "now: eval (after training)" in ANSI.sub("", panel.getvalue())
    finally:
        live.close()


def test_plain_lines_one_per_iteration_no_ansi():
    clock = Clock()
    out = io.StringIO()
    plain = PlainProgress(clock=clock, stream=out)
    _drive(plain, clock, iterations_done=2, per_stage=1.0)
    plain.evaluated("after", {"success_rate": 0.5, "ci95": (0.4, 0.6), "episodes": 64})
    plain.close()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert lines[0] == "creditflow run cf-test: method=grpo env=bifurcation model=tiny-qwen2 iterations=20"
    assert lines[1] == "  prepare  model tiny-qwen2 162,752 params"
    assert lines[3] == ("  [iter 1/20] env 1.00s | rollout 1.00s | reward 1.00s | credit 1.00s | update 1.00s"
                        " | success 0.25 loss -0.0114 | eta 1m35s")
    assert lines[4].startswith("  [iter 2/20] ") and lines[4].endswith("| success 0.35 loss -0.0114 | eta 1m30s")
    assert lines[5] == "  trained 2/20 iterations in 10s; training-batch success 0.25 (iteration 1) -> 0.35 (iteration 2)"
    assert lines[6].startswith("  eval after training:  success 0.500")
    assert len(lines) == 7  # close() does not repeat the summary


def test_eta_ignores_iterations_loaded_from_results():
    """On resume, an iteration whose stages all load from persisted results takes no time: it must
    not make the ETA look short."""
    clock = Clock()
    p = RunProgress(clock=clock)
    p.run_started("cf-test", "grpo", "bifurcation", "tiny", 4)
    p.iteration_started(0)
    for name in STAGES:
        p.stage_done(0, name, 0.0, cached=True)
    p.iteration_done(0, {"success": 0.5, "loss": 0.0})
    assert p.eta_seconds() is None
    p.iteration_started(1)
    clock.now += 6
    p.iteration_done(1, {"success": 0.5, "loss": 0.0})
    assert p.eta_seconds() == pytest.approx(12.0)  # 6 s x 2 left


def test_for_console_picks_the_display(capsys):
    assert isinstance(for_console(True, io.StringIO()), PlainProgress)  # not a terminal
    silent = for_console(False)
    assert type(silent) is RunProgress
    _drive(silent, Clock())
    silent.close()
    assert capsys.readouterr().out == ""


def test_run_log_takes_library_logs_and_warnings_off_the_console(tmp_path, capfd):
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    lib = logging.getLogger("cftest.quiet_lib")
    own = logging.StreamHandler(sys.stderr)  # a library's own console handler, not propagating (like MLflow's)
    lib.addHandler(own)
    lib.propagate = False
    try:
        with RunLog().start(tmp_path / "run" / "creditflow.log") as log:
            logging.getLogger("cftest.some_lib").warning("library warning line")
            lib.error("quiet library line")
            warnings.warn("a python warning", UserWarning)
            try:
                raise ValueError("boom")
            except ValueError as exc:
                log.log_exception("run cf-x failed", exc)
        assert console in root.handlers and own in lib.handlers  # put back
        ours = str(tmp_path / "run" / "creditflow.log")
        assert not [h for h in root.handlers + lib.handlers if getattr(h, "baseFilename", None) == ours]
        err = capfd.readouterr().err
        assert "library warning line" not in err and "quiet library line" not in err and "a python warning" not in err
        text = (tmp_path / "run" / "creditflow.log").read_text()
        assert "WARNING cftest.some_lib: library warning line" in text
        assert "ERROR   cftest.quiet_lib: quiet library line" in text
        assert "UserWarning: a python warning" in text
        assert "run cf-x failed" in text and "Traceback" in text and "ValueError: boom" in text
        logging.getLogger("cftest.some_lib").warning("after the run")  # the console has it again
        assert "after the run" in capfd.readouterr().err
    finally:
        root.removeHandler(console)
        lib.removeHandler(own)


# ------------------------------------------------------------------ the CLI, end to end
@pytest.fixture(scope="module")
def console_home(tmp_path_factory):
    return tmp_path_factory.mktemp("console-home")  # fresh: the first run builds the tiny policy (its save/load bars)


def _cli_env(home: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONWARNINGS", "PREFECT_LOGGING_LEVEL", "HF_HUB_DISABLE_PROGRESS_BARS",
                        "TRANSFORMERS_VERBOSITY", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    env.update(CREDITFLOW_HOME=str(home), PYTHONPATH=str(ROOT), PREFECT_API_URL=str(PREFECT_API_URL.value()))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_cli_run_prints_progress_lines_only_and_logs_the_libraries(prefect_harness, console_home):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", *TINY], env=_cli_env(console_home),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    out = proc.stdout
    for bad in ("INFO", "WARNING", "Warning", "Traceback", "\x1b[", "it/s]", "█", "Loading weights",
                "Writing model shards", "Finished in state"):
        assert bad not in out, (bad, out)
    lines = out.splitlines()
    assert lines[0].startswith("creditflow run cf-") and lines[0].endswith("iterations=1")
    assert any(re.fullmatch(r"  \[iter 1/1\] env [0-9.]+s \| rollout [0-9.]+s \| reward [0-9.]+s \| credit [0-9.]+s"
                            r" \| update [0-9.]+s \| success [0-9.]+ loss -?[0-9.]+ \| eta 0s", line) for line in lines), out
    assert any(line.startswith("  eval after training:  success ") for line in lines)
    run_id = next(line.split()[-1] for line in lines if line.startswith("run id:"))
    log_lines = [line for line in lines if line.startswith("log:")]
    assert len(log_lines) == 1
    log = Path(log_lines[0].split(None, 1)[1])
    assert log == console_home / "runs" / run_id / "creditflow.log"
    text = log.read_text()
    assert f"Flow run '{run_id}' - Beginning flow run '{run_id}'" in text  # Prefect's INFO lines, in the file
    assert "Task run 'update" in text and "Finished in state Completed()" in text

    # ... and still at Prefect's API (what the UI shows as the run's logs)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run_id = json.loads((console_home / "runs" / run_id / "run.json").read_text())["prefect_flow_runs"][0]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert any("Finished in state Completed()" in entry.message for entry in logs), [e.message for e in logs]


def test_cli_crash_is_one_line_pointing_to_the_log(prefect_harness, console_home):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--quiet", *TINY, "debug.crash_at=0:reward"],
                          env=_cli_env(console_home), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout == ""  # --quiet, and no summary for a run that did not finish
    err = proc.stderr.splitlines()
    assert len(err) == 3, proc.stderr
    assert re.fullmatch(r"creditflow: error: InjectedCrash: injected crash in stage 'reward' of iteration 0 "
                        r"\(debug\.crash_at=0:reward\) \(at runtime\.py:\d+\)", err[0]), err[0]
    log = Path(err[1].split("traceback and library logs: ", 1)[1])
    run_id = log.parent.name
    assert err[2] == f"  continue with: creditflow resume {run_id}"
    text = log.read_text()
    assert f"run {run_id} failed" in text and "Traceback (most recent call last)" in text
    assert "InjectedCrash" in text and "Task run 'reward" in text  # Prefect's own report of the failed task
