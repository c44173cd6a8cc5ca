"""The run's log file: library chatter goes to ``<run dir>/creditflow.log``, not to the console.

While a CLI run runs, Python logging of every library (Prefect's flow- and task-run lines, MLflow,
alembic, transformers, huggingface_hub, httpx, urllib3, ...) and Python warnings are written to the
run's log file instead of the terminal, and the progress bars of transformers / huggingface_hub
are off. The console then shows only creditflow's own progress display (:mod:`flows.progress`).

Nothing is dropped or turned down: logger levels stay as they are, so Prefect's INFO lines still
reach its API log handler (the UI shows the task logs) — only the handlers that write to
``sys.stdout`` / ``sys.stderr`` are swapped for one file handler (secrets masked,
:class:`flows.secrets.SecretFilter`). :meth:`RunLog.stop` puts everything back.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"



def _warning_to_log(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                    line: Optional[str] = None) -> None:
    """``warnings.showwarning`` while a run log is open: the warning goes to logger ``py.warnings``
    (as ``logging.captureWarnings`` sends it), i.e. to the run's file, not the console."""
    text = warnings.formatwarning(message, category, filename, lineno, line)
    logging.getLogger("py.warnings").warning("%s", text)

class _Formatter(logging.Formatter):
    """Names the Prefect flow / task run a record belongs to, as Prefect's console did."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for attr, what in (("task_run_name", "Task run"), ("flow_run_name", "Flow run")):
            name = getattr(record, attr, None)
            if name:
                head, sep, tail = text.partition(f"{record.name}: ")
                return f"{head}{sep}{what} {name!r} - {tail}" if sep else text
        return text


#: libraries that put their own console handlers on their loggers when imported (MLflow: on
#: mlflow, alembic, sqlalchemy.engine, huey; transformers: on transformers): imported before the
#: handlers are swapped, so that importing them later in the run does not bring the console back
SELF_CONFIGURING = ("mlflow", "transformers.utils.logging")


def _console_streams() -> list[Any]:
    streams: list[Any] = [sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__]
    mlflow_logging = sys.modules.get("mlflow.utils.logging_utils")
    if mlflow_logging is not None:  # writes to whatever sys.stderr is at the time
        streams.append(getattr(mlflow_logging, "MLFLOW_LOGGING_STREAM", None))
    return [s for s in streams if s is not None]


def _writes_to_console(handler: logging.Handler, streams: list[Any]) -> bool:
    """A stream handler on stdout/stderr (Prefect's console handler, MLflow's, Python's own)."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    if stream is None:
        return False
    if any(stream is s for s in streams):
        return True
    try:
        return stream.fileno() in (1, 2)
    except Exception:  # StringIO and the like: not the console
        return False


def _loggers() -> list[logging.Logger]:
    found = [logging.getLogger()]
    found += [lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    return found


class RunLog:
    """Routes library logging and warnings into one file for the duration of a run.

    ``start(path)`` once the run directory exists; ``stop()`` restores the console handlers,
    the warnings hook and the progress bars (idempotent). Use as a context manager too."""

    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self._handler: Optional[logging.FileHandler] = None
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []
        self._added: list[logging.Logger] = []
        self._prev_showwarning: Any = None
        self._bars: list[Any] = []  # callables that turn progress bars back on

    @property
    def active(self) -> bool:
        return self._handler is not None

    def start(self, path: Path) -> "RunLog":
        if self.active:
            return self
        from flows.secrets import install_log_filter

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        handler.setFormatter(_Formatter(FORMAT))
        handler.addFilter(install_log_filter(loggers=()))  # the process-wide secret filter
        self._handler = handler
        import importlib

        for name in SELF_CONFIGURING:
            importlib.import_module(name)
        streams = _console_streams()
        for lg in _loggers():
            console = [h for h in lg.handlers if _writes_to_console(h, streams)]
            for h in console:
                lg.removeHandler(h)
                self._removed.append((lg, h))
            # the root logger collects every propagating logger; a logger that does not propagate
            # (Prefect's uvicorn / _internal, MLflow's) gets the file where its console handler was
            if lg is logging.getLogger() or (console and not lg.propagate):
                lg.addHandler(handler)
                self._added.append(lg)
        # warnings.showwarning -> logger 'py.warnings' -> the file. Our own hook, put back at stop, rather
        # than logging.captureWarnings: that is a no-op when an earlier caller left it on, even though
        # warnings.showwarning may have been replaced since (a test harness does), and the run's
        # warnings then reached the console
        self._prev_showwarning = warnings.showwarning
        warnings.showwarning = _warning_to_log
        self._disable_progress_bars()
        self._write(logging.INFO, f"{' '.join(sys.argv) or 'python'} (pid {os.getpid()}): "
                                  f"the libraries' logs and warnings of this run follow")
        return self

    def _write(self, level: int, message: str, exc: Optional[BaseException] = None) -> None:
        if self._handler is None:
            return
        info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        self._handler.handle(logging.LogRecord("creditflow", level, __file__, 0, message, None, info))
        self._handler.flush()

    def _disable_progress_bars(self) -> None:
        """tqdm bars of transformers ('Loading weights', 'Writing model shards') and huggingface_hub
        (HF_HUB_DISABLE_PROGRESS_BARS only counts when set before their import; this is for after)."""
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                self._bars.append(hf_logging.enable_progress_bar)
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

            if not are_progress_bars_disabled():
                disable_progress_bars()
                self._bars.append(enable_progress_bars)

    def log_exception(self, message: str, exc: BaseException) -> None:
        """Write ``message`` and the traceback of ``exc`` to the file (a crash's details)."""
        self._write(logging.ERROR, message, exc)

    def stop(self) -> None:
        if self._handler is None:
            return
        for lg in self._added:
            lg.removeHandler(self._handler)
        for lg, h in self._removed:
            lg.addHandler(h)
        self._added, self._removed = [], []
        if self._prev_showwarning is not None:
            if warnings.showwarning is _warning_to_log:  # not replaced again by someone else meanwhile
                warnings.showwarning = self._prev_showwarning
            self._prev_showwarning = None
        for enable in self._bars:
            enable()
        self._bars = []
        self._handler.close()
        self._handler = None

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def format_crash(exc: BaseException) -> str:
    """One line for the console: the error and where it was raised (the full traceback is in the file)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}{where}" if text else f"{type(exc).__name__}{where}"
