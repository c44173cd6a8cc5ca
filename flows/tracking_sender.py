"""The background sender of a :class:`flows.tracking.Tracker`'s journal: ONE thread per tracker.

The flow only appends an entry to the durable journal (fsync'ed) and wakes this thread; the
thread replays the journal in order (``drain``: one pass, ``True`` when it is empty) while the
flow goes on, so MLflow round trips (~30 ms a ``log_batch`` on SQLite) leave the flow's critical
path. Survey §8: the pipeline's orchestration must not dominate an iteration's cost.

* Store down (``drain`` returns ``False``): the thread retries with backoff (0.5 s doubling to
  5 s) without being woken; ``drain`` itself raises once the store has been down for
  ``tracking.retry_seconds``.
* An error of ``drain`` stops the thread and is kept (printed once to stderr);
  :meth:`take_error` hands it to the flow, which raises it at its next tracking call, so the run
  fails (and is marked FAILED) — nothing is silently lost: the entry stays in the journal.
* :meth:`stop` joins the thread (the flow's end and failure path), after which the caller
  drains synchronously; a crash (kill -9) leaves the journal, replayed by ``creditflow resume``.
* Idle for ``IDLE_EXIT_SECONDS`` with the journal sent, the thread ends by itself (``kick``
  then returns ``False`` and the tracker starts a new one), so a run that is never finished in
  this process (an in-process test, an interrupted notebook) leaves no thread behind.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Optional

#: retry backoff of the tracking store (also :meth:`flows.tracking.Tracker._retry`)
BACKOFF_START, BACKOFF_MAX = 0.5, 5.0
#: a healthy sender with nothing to send for this long ends its thread
IDLE_EXIT_SECONDS = 2.0


class JournalSender:
    """One daemon thread calling ``drain`` whenever it is kicked (and on backoff while it fails)."""

    def __init__(self, drain: Callable[[], bool], name: str = "creditflow-mlflow-sender"):
        self._drain = drain
        self._cv = threading.Condition()
        self._wake = False
        self._stop = False
        self._busy = False
        self._exited = False
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def kick(self) -> bool:
        """New entries are in the journal: send them (returns at once). ``False`` when the thread
        has ended (idle exit, error or stop): the caller starts a new sender."""
        with self._cv:
            if self._exited:
                return False
            self._wake = True
            self._cv.notify_all()
            return True

    def take_error(self) -> Optional[BaseException]:
        """The error that stopped the thread (once; ``None`` when there is none)."""
        with self._cv:
            err, self._error = self._error, None
            return err

    def wait_idle(self) -> None:
        """Block until the thread has nothing left to do (drained, waiting on backoff, or stopped)."""
        with self._cv:
            self._cv.wait_for(lambda: not (self._wake or self._busy) or self._stop or self._error is not None)

    def stop(self) -> None:
        """Let the pass in progress finish, then end the thread (the caller drains what is left)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join()

    def _loop(self) -> None:
        delay: Optional[float] = None  # None: healthy, sleep until kicked
        while True:
            with self._cv:
                if not self._wake and not self._stop:
                    self._cv.wait(timeout=IDLE_EXIT_SECONDS if delay is None else delay)
                    if not self._wake and not self._stop and delay is None:
                        self._exited = True  # idle with everything sent: end the thread
                        self._cv.notify_all()
                        return
                if self._stop:
                    self._exited = True
                    self._cv.notify_all()
                    return
                self._wake = False
                self._busy = True
            try:
                ok = self._drain()
            except BaseException as exc:  # kept for the flow; the journal still holds the entry
                print(f"creditflow: MLflow sender stopped: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
                with self._cv:
                    self._error = exc
                    self._exited = True
                    self._busy = False
                    self._cv.notify_all()
                return
            delay = None if ok else (BACKOFF_START if delay is None else min(delay * 2, BACKOFF_MAX))
            with self._cv:
                self._busy = False
                self._cv.notify_all()
