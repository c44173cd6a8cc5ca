"""The console display of a training run: what the flow says while it trains.

The flow (:mod:`flows.train`) calls the same hooks whatever is shown — ``run_started``,
``stage_started`` / ``stage_done`` for every stage, ``prepared``, ``evaluated``,
``iteration_started`` / ``iteration_done``, ``close`` — and :func:`for_console` picks the display:

* on a terminal, :class:`LiveProgress`: a live display (rich) of iteration k/N with a bar, the
  elapsed time and an ETA, the stage running now (and for how long), and the last iteration's
  success, loss and stage times; the header, the evals and a summary line stay in the scrollback;
* off a terminal (a pipe, CI, a test), :class:`PlainProgress`: plain lines, one per iteration
  (``[iter k/N]`` with every stage's wall time, ``*`` for a stage loaded from persisted results
  on resume, success, loss, ETA) and the summary — no ANSI codes;
* ``progress=False``: :class:`RunProgress` itself, which shows nothing.

The ETA is the mean wall time of the iterations this process ran (iterations loaded whole from
persisted results on resume do not count) times the iterations left.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, TextIO

#: stages of the header phase (not part of an iteration)
PRELUDE = -1


def duration(seconds: Optional[float]) -> str:
    """``42s``, ``3m10s``, ``1h05m``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class StageTime:
    name: str
    seconds: float
    cached: bool

    def text(self) -> str:
        return f"{self.name}{'*' if self.cached else ''} {self.seconds:.2f}s"


@dataclass
class IterationSummary:
    iteration: int  # 0-based
    stages: list[StageTime]
    success: float
    loss: float
    wall_seconds: float

    @property
    def all_cached(self) -> bool:
        return bool(self.stages) and all(s.cached for s in self.stages)

    def stage_text(self) -> str:
        return " | ".join(s.text() for s in self.stages)


@dataclass
class RunProgress:
    """The run's progress as the flow reports it; shows nothing (``progress=False``).
    Subclasses display it; every hook only records here, then calls :meth:`_show`."""

    clock: Any = time.monotonic
    run_id: str = ""
    iterations: int = 0
    started_at: Optional[float] = None
    iteration: Optional[int] = None  # the iteration running now (0-based)
    iteration_started_at: Optional[float] = None
    stage: Optional[str] = None  # the stage running now
    stage_iteration: Optional[int] = None  # the iteration the stage running now belongs to
    stage_started_at: Optional[float] = None
    stages: list[StageTime] = field(default_factory=list)  # of the iteration running now
    done: list[IterationSummary] = field(default_factory=list)
    summarized: bool = False
    training_started_at: Optional[float] = None  # the first iteration's start
    last_done_at: Optional[float] = None  # the last iteration's end

    # ------------------------------------------------------------------ hooks (called by the flow)
    def run_started(self, run_id: str, method: str, env: str, model: str, iterations: int) -> None:
        self.run_id, self.iterations, self.started_at = run_id, int(iterations), self.clock()
        self._line(f"creditflow run {run_id}: method={method} env={env} model={model} iterations={iterations}")

    def stage_started(self, iteration: int, name: str) -> None:
        self.stage, self.stage_iteration, self.stage_started_at = name, iteration, self.clock()
        self._changed()

    def stage_done(self, iteration: int, name: str, seconds: float, cached: bool) -> None:
        if iteration != PRELUDE and iteration == self.iteration:
            self.stages.append(StageTime(name, float(seconds), bool(cached)))
        self.stage, self.stage_started_at = None, None
        self._changed()

    def prepared(self, model: str, num_parameters: int, cached: bool) -> None:
        self._line(f"  prepare {'(cached)' if cached else ''} model {model} {num_parameters:,} params")

    def evaluated(self, when: str, value: dict[str, Any]) -> None:
        """``when``: ``before`` / ``after`` training; ``value``: success_rate, ci95, episodes."""
        if when == "after":
            self._summary()
        label = {"before": "eval before training: ", "after": "eval after training:  "}.get(when, f"eval {when}: ")
        lo, hi = value["ci95"]
        self._line(f"  {label}success {value['success_rate']:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
                   f"{value['episodes']} episodes)")

    def iteration_started(self, iteration: int) -> None:
        """(Called again for the same iteration when it restarts, e.g. after a checkpoint rebuild.)"""
        self.iteration, self.iteration_started_at, self.stages = iteration, self.clock(), []
        if self.training_started_at is None:
            self.training_started_at = self.iteration_started_at
        self._changed()

    def iteration_done(self, iteration: int, metrics: dict[str, float]) -> None:
        """``metrics``: ``success`` (the training batch's success rate) and ``loss``."""
        wall = self.clock() - (self.iteration_started_at if self.iteration_started_at is not None else self.clock())
        summary = IterationSummary(iteration, list(self.stages), float(metrics.get("success", math.nan)),
                                   float(metrics.get("loss", math.nan)), wall)
        self.done.append(summary)
        self.last_done_at = self.clock()
        self.iteration, self.iteration_started_at, self.stages = None, None, []
        self._iteration_line(summary)
        self._changed()

    def close(self) -> None:
        """The run ended (finished or not): stop any live display, say what was trained."""
        self._summary()

    def _summary(self) -> None:
        if not self.summarized:
            text = self.summary_text()
            if text is not None:
                self.summarized = True
                self._line(text)

    # ------------------------------------------------------------------ derived
    @property
    def completed(self) -> int:
        return len({s.iteration for s in self.done})

    def eta_seconds(self) -> Optional[float]:
        """Mean wall time of the iterations this process computed x iterations left (less the
        running one's elapsed time); ``None`` before one iteration was computed."""
        ran = [s.wall_seconds for s in self.done if not s.all_cached]
        left = self.iterations - self.completed
        if left <= 0:
            return 0.0
        if not ran:
            return None
        running = self.clock() - self.iteration_started_at if self.iteration_started_at is not None else 0.0
        return max(sum(ran) / len(ran) * left - running, 0.0)

    def elapsed_seconds(self) -> float:
        return self.clock() - self.started_at if self.started_at is not None else 0.0

    def iteration_text(self, s: IterationSummary) -> str:
        return (f"  [iter {s.iteration + 1}/{self.iterations}] {s.stage_text()} | success {s.success:.2f} "
                f"loss {s.loss:.4f}")

    def summary_text(self) -> Optional[str]:
        if not self.done:
            return None
        first, last = self.done[0], self.done[-1]
        took = (self.last_done_at or 0.0) - (self.training_started_at or 0.0)
        return (f"  trained {self.completed}/{self.iterations} iterations in {duration(took)}; "
                f"training-batch success {first.success:.2f} (iteration {first.iteration + 1}) -> "
                f"{last.success:.2f} (iteration {last.iteration + 1})")

    # ------------------------------------------------------------------ display (subclasses)
    def _line(self, text: str) -> None:
        """A line that stays (header, prepare, evals)."""

    def _iteration_line(self, summary: IterationSummary) -> None:
        """An iteration finished."""

    def _changed(self) -> None:
        """The state changed (a live display redraws)."""


@dataclass
class PlainProgress(RunProgress):
    """Plain lines on a stream that is not a terminal: one per iteration, then the summary."""

    stream: Optional[TextIO] = None

    def _write(self, text: str) -> None:
        out = self.stream if self.stream is not None else sys.stdout
        print(text, file=out, flush=True)

    def _line(self, text: str) -> None:
        self._write(text)

    def _iteration_line(self, summary: IterationSummary) -> None:
        self._write(f"{self.iteration_text(summary)} | eta {duration(self.eta_seconds())}")


@dataclass
class LiveProgress(RunProgress):
    """A rich Live display on a terminal (``console``: a :class:`rich.console.Console`)."""

    console: Any = None
    refresh_per_second: float = 4.0
    _live: Any = None

    def __post_init__(self) -> None:
        if self.console is None:
            from rich.console import Console

            self.console = Console()

    def _ensure_live(self) -> None:
        if self._live is None:
            from rich.live import Live

            # transient: when the run ends the panel gives way to the summary line
            self._live = Live(self, console=self.console, refresh_per_second=self.refresh_per_second,
                              transient=True, redirect_stdout=True, redirect_stderr=True)
            self._live.start()

    def _line(self, text: str) -> None:
        from rich.text import Text

        self._ensure_live()
        self.console.print(Text(text))

    def _iteration_line(self, summary: IterationSummary) -> None:
        """The curve stays in the scrollback, one short line per iteration (stage times: in the panel)."""
        from rich.text import Text

        self._ensure_live()
        self.console.print(Text(f"  [iter {summary.iteration + 1}/{self.iterations}] success {summary.success:.2f} "
                                f"loss {summary.loss:.4f}  ({duration(summary.wall_seconds)})"))

    def _changed(self) -> None:
        if self._live is not None:
            self._live.refresh()

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        if not self.summarized and self.summary_text() is not None:
            from rich.text import Text

            self.summarized = True
            self.console.print(Text(self.summary_text()))

    def __rich__(self) -> Any:
        """The live panel: bar + k/N + elapsed + ETA; the stage running now; the last iteration."""
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        head = Table.grid(padding=(0, 1))
        head.add_column(no_wrap=True)
        head.add_column(no_wrap=True)
        head.add_column(no_wrap=True)
        k = self.completed
        n = max(self.iterations, 1)
        head.add_row(Text(f"iteration {k}/{self.iterations}", style="bold"),
                     ProgressBar(total=n, completed=k, width=30),
                     Text(f"elapsed {duration(self.elapsed_seconds())}  ETA {duration(self.eta_seconds())}"))
        rows: list[Any] = [head]
        if self.stage is not None:
            it = self.stage_iteration
            where = ("" if it is None else " (before training)" if it == PRELUDE
                     else f" (iteration {it + 1})" if self.iteration == it else
                     " (after training)" if it >= self.iterations else f" (after iteration {it + 1})")
            since = self.clock() - self.stage_started_at if self.stage_started_at is not None else 0.0
            now = Text("now: ", style="dim")
            now.append(self.stage, style="bold cyan")
            now.append(f"{where} {since:.1f}s")
            rows.append(now)
        if self.done:
            last = self.done[-1]
            text = Text(f"last: iteration {last.iteration + 1}  ", style="dim")
            text.append(f"success {last.success:.2f}  loss {last.loss:.4f}", style="bold")
            rows.append(text)
            # (a row of its own: on a narrow terminal a wrapped panel row would leave its tail behind)
            rows.append(Text(f"      {last.stage_text()}", no_wrap=True, overflow="ellipsis"))
        return Group(*rows)


def for_console(enabled: bool, stream: Optional[TextIO] = None) -> RunProgress:
    """The display for ``stream`` (default stdout): live on a terminal, plain lines otherwise,
    nothing when not ``enabled``."""
    if not enabled:
        return RunProgress()
    out = stream if stream is not None else sys.stdout
    from rich.console import Console

    console = Console(file=out)
    if console.is_terminal and not console.is_dumb_terminal:
        return LiveProgress(console=console)
    return PlainProgress(stream=stream)
