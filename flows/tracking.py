"""MLflow tracking: one MLflow run per training run, metrics logged exactly once per step.

Embedded default: a SQLite store at ``$CREDITFLOW_HOME/mlflow.db`` with artifacts under
``$CREDITFLOW_HOME/mlartifacts`` (an explicit artifact location, so nothing lands in the
current directory). Each iteration's metrics go out in ONE ``log_batch`` call together with the
sentinel metric ``progress.iteration``; a resumed run first reads which steps the sentinel already
has and skips them, so no metric step is ever logged twice.

Faults of the tracking store (survey §8 pipelines run for days; a tracking server restarts):

* At start, :func:`check_tracking_server` makes ONE request (short timeout) to an ``http(s)``
  tracking URI and raises :class:`TrackingServerUnreachable` (a :class:`~flows.config.ConfigError`:
  exit code 2 from the CLI) naming the URI, before any compute. Local stores are not checked.
* During a run, every metric batch, param batch, tag batch and artifact of a run with a buffer
  (``runs/<id>/tracking_buffer.jsonl``) is first appended to that journal (fsync'ed), then sent
  by ONE background thread (:mod:`flows.tracking_sender`; ``tracking.background_sender``, on by default; ``background=False``: by the caller),
  so the flow does not wait for MLflow. While the store is unreachable, training goes on and
  entries accumulate; the sender retries with backoff, replaying the journal in order, and a
  successful replay empties it. An error of the sender is raised by the flow's next tracking
  call (the run fails; the journal keeps the entry); finishing joins the sender first. Replays are
  idempotent: a metric step the sentinel already has is skipped (a batch that reached the
  server although its response was lost), tags overwrite, artifacts overwrite.
* If the store stays unreachable for ``tracking.retry_seconds`` (counted from the first failed
  attempt), :class:`TrackingUnavailableError` names the URI, the journal and the buffered steps;
  the run fails and ``creditflow resume RUN_ID`` replays the journal once the store is back.
  Finishing a run waits (with backoff) up to that long for the journal to drain: a run is never
  marked FINISHED while some of its data exists only locally.
* Transient errors (connection refused/reset, timeouts, 5xx, SQLite ``database is locked``
  from concurrent writers) are retried with backoff; anything else (a rejected value) raises
  at once. On SQLite, creating the schema and the experiment is serialised with a file lock,
  so two runs starting at once in one home do not race on an empty database.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from flows.secrets import mask_config, mask_text
from flows.tracking_sender import BACKOFF_MAX as _BACKOFF_MAX
from flows.tracking_sender import BACKOFF_START as _BACKOFF_START
from flows.tracking_sender import JournalSender
from flows.tracking_store import (  # noqa: F401 - re-exported: the public names of the tracking API
    TrackingServerUnreachable,
    _store_init_lock,
    _transient,
    check_tracking_server,
    default_tracking_uri,
)

SENTINEL = "progress.iteration"
#: MLflow allows 100 params / 1000 metrics / 100 tags per log_batch
_PARAM_CHUNK, _METRIC_CHUNK, _TAG_CHUNK = 100, 1000, 100
#: default of ``tracking.retry_seconds``
DEFAULT_RETRY_SECONDS = 300.0


def _render(renderer: str, src: Path, out: Path, artifact_file: str) -> bool:
    """Run ``renderer`` (``"module:function"``) on ``src`` into ``out``; a drawing error is a warning
    (``False``): a figure must never kill training."""
    import importlib

    module, _, name = renderer.partition(":")
    try:
        getattr(importlib.import_module(module), name)(src, out)
        return True
    except Exception as exc:  # noqa: BLE001 - plotting must never kill training; say why
        print(f"warning: could not draw {artifact_file}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False


class TrackingUnavailableError(RuntimeError):
    """The tracking store stayed unreachable longer than ``tracking.retry_seconds``."""


class Tracker:
    """Thin wrapper over ``MlflowClient`` (no global active-run state).

    With ``buffer`` (a path), metrics, params, tags and artifacts go through the durable journal
    described in the module docstring, sent by a background thread unless ``background=False``;
    without it (read-only uses: checklist, audit) every call is simply retried on transient errors
    for up to ``retry_seconds``."""

    def __init__(self, uri: str, experiment: str, home: Path, buffer: Optional[Path] = None,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS, background: bool = False):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if uri.startswith(("http://", "https://")):
            # our own retry loop (below) decides how long to wait; MLflow's default (7 retries with
            # exponential backoff, 120 s timeout) would block one call for minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.home = home
        self.retry_seconds = float(retry_seconds)
        self.run_id: Optional[str] = None
        #: params the store has (or the journal will send) once this tracker started/attached the run
        self._server_params: Optional[dict[str, str]] = None
        self._logged: set[int] = set()
        #: the last value this tracker logged or journaled per tag: an unchanged tag is not sent again
        #: (the checklist is re-filled every iteration; most of its ~30 tags stay the same)
        self._tag_values: dict[str, str] = {}
        self.buffer = Path(buffer) if buffer is not None else None
        self._pending: list[dict[str, Any]] = []
        self._down_since: Optional[float] = None
        self._gave_up = False
        self._gave_up_exc: Optional[BaseException] = None
        #: guards ``_pending`` and the journal file (the flow appends, the sender pops)
        self._lock = threading.Lock()
        self._background = background and self.buffer is not None
        self._sender: Optional[JournalSender] = None
        if self.buffer is not None and self.buffer.is_file():
            self._pending = [json.loads(line) for line in self.buffer.read_text().splitlines() if line.strip()]
        with _store_init_lock(uri):  # MlflowClient creates the SQLite schema on an empty database
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._retry("look up the experiment", self._experiment, experiment)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith(("sqlite:", "file:")) or "://" not in self.uri:
            # a local store needs an explicit artifact location, else artifacts land in the cwd;
            # a tracking server decides its own (``--default-artifact-root`` / ``--serve-artifacts``)
            artifacts = (self.home / "mlartifacts").resolve()
            artifacts.mkdir(parents=True, exist_ok=True)
            location = artifacts.as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # another process created it in between (tracking server)
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    # ------------------------------------------------------------------ retries
    def _retry(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, retried with backoff on transient errors for up to ``retry_seconds``."""
        deadline = time.monotonic() + self.retry_seconds
        delay = _BACKOFF_START
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise TrackingUnavailableError(
                        f"MLflow tracking store {self.uri} unreachable for {self.retry_seconds:g}s "
                        f"(tracking.retry_seconds) while trying to {what}: {type(exc).__name__}: "
                        f"{str(exc)[:300]}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    # ------------------------------------------------------------------ the durable journal
    def _enqueue(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to the journal (durable before this returns), then have it sent."""
        entry["id"] = uuid.uuid4().hex[:12]
        line = json.dumps(entry) + "\n"
        with self._lock:
            if self.buffer is not None:
                self.buffer.parent.mkdir(parents=True, exist_ok=True)
                with open(self.buffer, "a") as fh:
                    fh.write(line)
                    fh.flush()
                    os.fsync(fh.fileno())
            self._pending.append(entry)
        if not self._background:
            self.flush()
            return
        self._wake_sender()

    def _wake_sender(self) -> None:
        """Raise what stopped the background sender, else have it send what is pending."""
        self._raise_sender_error()
        if self._pending:
            if self._sender is None or not self._sender.kick():
                self._sender = JournalSender(lambda: self._drain(False))
                self._sender.kick()

    def _raise_sender_error(self) -> None:
        """Raise (once) what stopped the background sender; a give-up names what is buffered now."""
        err = self._sender.take_error() if self._sender is not None else None
        if err is None:
            return
        if err is self._gave_up_exc:
            raise self._gave_up_error(err.__cause__) from err.__cause__
        raise err

    def _stop_sender(self) -> Optional[BaseException]:
        """Join the background sender (the pass in progress completes); returns its unraised error."""
        sender, self._sender = self._sender, None
        if sender is None:
            return None
        sender.stop()
        return sender.take_error()

    def _sent(self, n: int = 1) -> None:
        """The journal's first ``n`` entries reached the store: drop them (journal rewritten once,
        their blobs removed)."""
        with self._lock:
            done, self._pending = self._pending[:n], self._pending[n:]
            self._rewrite_buffer()
        for entry in done:
            if entry["kind"] == "artifact" and self.buffer is not None:
                Path(entry["file"]).unlink(missing_ok=True)

    def _send_prefix(self, server_steps: Optional[set[int]]) -> int:
        """Send the journal's first entry, or the longest run of metric/param/tag entries at its
        head that fits one ``log_batch`` (MLflow's limits: 1000 metrics, 100 params, 100 tags) as
        that one call (one SQLite transaction: all of it reaches the store or none, so a metric
        step's sentinel still arrives with its metrics). Returns how many entries were sent."""
        from mlflow.entities import Metric, Param, RunTag

        with self._lock:
            head = list(self._pending[:64])
        metrics: list[Any] = []
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        n = 0
        for entry in head:
            kind = entry["kind"]
            if kind == "metrics":
                if server_steps is not None and entry["step"] in server_steps:
                    n += 1  # reached the store before the connection broke (the sentinel says so)
                    continue
                add_m, add_p, add_t = len(entry["metrics"]), 0, 0
            elif kind == "params":
                add_m, add_p, add_t = 0, len({k for k, _ in entry["params"]} - set(params)), 0
            elif kind == "tags":
                add_m, add_p, add_t = 0, 0, len(set(entry["tags"]) - set(tags))
            else:
                break
            if (len(metrics) + add_m > _METRIC_CHUNK or len(params) + add_p > _PARAM_CHUNK
                    or len(tags) + add_t > _TAG_CHUNK):
                break
            if kind == "metrics":
                metrics.extend(Metric(k, float(v), int(ts), int(entry["step"])) for k, v, ts in entry["metrics"])
            elif kind == "params":
                if any(params.get(k, v) != v for k, v in entry["params"]):
                    break  # a conflicting value: sent on its own, so the store's error names it
                params.update(entry["params"])
            else:
                tags.update(entry["tags"])  # a later value of a tag wins, as sent one by one
            n += 1
        if n == 0:  # an artifact, or one entry larger than a batch: sent as it is
            self._send(head[0], server_steps)
            return 1
        if metrics or params or tags:
            self.client.log_batch(self.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                                  tags=[RunTag(k, v) for k, v in tags.items()])
        return n

    def _rewrite_buffer(self) -> None:
        if self.buffer is None:
            return
        if not self._pending:
            self.buffer.unlink(missing_ok=True)
            return
        tmp = self.buffer.with_name(f".{self.buffer.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.write("".join(json.dumps(e) + "\n" for e in self._pending))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.buffer)

    def _blob_dir(self) -> Path:
        assert self.buffer is not None
        return self.buffer.with_name(self.buffer.stem + "_files")

    def _send(self, entry: dict[str, Any], server_steps: Optional[set[int]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = entry["kind"]
        if kind == "metrics":
            if server_steps is not None and entry["step"] in server_steps:
                return  # reached the store before the connection broke (the sentinel says so)
            items = [Metric(k, float(v), int(ts), int(entry["step"])) for k, v, ts in entry["metrics"]]
            for i in range(0, len(items), _METRIC_CHUNK):
                # the sentinel is the last metric of the last chunk: it is written only when all others are
                self.client.log_batch(self.run_id, metrics=items[i : i + _METRIC_CHUNK])
        elif kind == "params":
            items = [Param(k, v) for k, v in entry["params"]]
            for i in range(0, len(items), _PARAM_CHUNK):
                self.client.log_batch(self.run_id, params=items[i : i + _PARAM_CHUNK])
        elif kind == "tags":
            items = [RunTag(k, v) for k, v in entry["tags"].items()]
            for i in range(0, len(items), _TAG_CHUNK):
                self.client.log_batch(self.run_id, tags=items[i : i + _TAG_CHUNK])
        elif kind == "artifact":
            src = Path(entry["file"])
            if not src.is_file():
                raise TrackingUnavailableError(f"buffered artifact {src} is missing; cannot log {entry['artifact_file']}")
            parent = str(Path(entry["artifact_file"]).parent)
            with tempfile.TemporaryDirectory() as tmp:
                # log under its own name (the buffered copy has a unique one)
                out = Path(tmp) / Path(entry["artifact_file"]).name
                if entry.get("render"):
                    if not _render(entry["render"], src, out, entry["artifact_file"]):
                        return  # a drawing error: warned, nothing to log (the run goes on)
                else:
                    shutil.copyfile(src, out)
                self.client.log_artifact(self.run_id, str(out), None if parent == "." else parent)
        else:  # pragma: no cover - written by this class only
            raise ValueError(f"unknown tracking buffer entry kind {kind!r}")

    def pending_summary(self) -> str:
        with self._lock:
            pending = list(self._pending)
        steps = sorted({e["step"] for e in pending if e["kind"] == "metrics"})
        kinds = {k: sum(e["kind"] == k for e in pending) for k in ("metrics", "params", "tags", "artifact")}
        return (f"{len(pending)} entries (metric steps {steps}, {kinds['params']} param batches, "
                f"{kinds['tags']} tag batches, "
                f"{kinds['artifact']} artifacts)" + (f" kept in {self.buffer}" if self.buffer else ""))

    def _gave_up_error(self, last: Optional[Exception] = None) -> TrackingUnavailableError:
        """The store stayed away past ``retry_seconds``: what is buffered, where, and how it gets there."""
        cause = f" (last error: {type(last).__name__}: {str(last)[:200]})" if last is not None else ""
        return TrackingUnavailableError(
            f"MLflow tracking store {self.uri} unreachable for more than {self.retry_seconds:g}s "
            f"(tracking.retry_seconds); {self.pending_summary()}; they are replayed by "
            f"`creditflow resume` once the store is back{cause}")

    def flush(self, wait: bool = False) -> bool:
        """Replay the journal in order. Returns True when it is empty.

        ``wait=False``: one attempt (training goes on while the store is down), but raise
        :class:`TrackingUnavailableError` once it has been down for ``retry_seconds``; with the
        background sender it only wakes the sender (raising what stopped it, if anything).
        ``wait=True``: join the sender, then retry with backoff until empty or that deadline."""
        if self._background and not wait:
            self._wake_sender()
            return not self._pending
        err = self._stop_sender()
        if err is not None and err is not self._gave_up_exc:
            raise err  # a rejected entry: it is still first in the journal
        return self._drain(wait)

    def _drain(self, wait: bool) -> bool:
        delay = _BACKOFF_START
        server_steps: Optional[set[int]] = None
        while self._pending:
            try:
                if server_steps is None and (self._down_since is not None or self._replaying):
                    server_steps = self._server_steps()
                while self._pending:
                    n = self._send_prefix(server_steps)
                    self._sent(n)
                if self._down_since is not None:
                    print(f"creditflow: MLflow tracking store {self.uri} is back; buffered entries replayed",
                          file=sys.stderr)
                self._down_since = None
                self._replaying = False
                return True
            except Exception as exc:
                if not _transient(exc):
                    raise
                now = time.monotonic()
                if self._down_since is None:
                    self._down_since = now
                    print(f"creditflow: MLflow tracking store {self.uri} unreachable ({type(exc).__name__}); "
                          f"buffering in {self.buffer} and retrying for up to {self.retry_seconds:g}s",
                          file=sys.stderr)
                if self._gave_up:
                    return False
                if now - self._down_since >= self.retry_seconds or (wait and now + delay - self._down_since
                                                                     > self.retry_seconds):
                    self._gave_up = True
                    err = self._gave_up_exc = self._gave_up_error(exc)
                    raise err from exc
                if not wait:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                server_steps = None
        return True

    _replaying = False

    def _server_steps(self) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(self.run_id, SENTINEL)}

    # ------------------------------------------------------------------ run lifecycle
    def start(self, run_name: str, tags: dict[str, str]) -> str:
        run = self._retry("create the MLflow run", self.client.create_run, self.experiment_id,
                          run_name=mask_text(run_name), tags=mask_config(tags))
        self.run_id = run.info.run_id
        self._server_params = {}
        return self.run_id

    def attach(self, run_id: str) -> None:
        """Re-open an existing MLflow run (resume), learn which steps are already logged, and
        replay what a previous attempt left in the journal."""
        run = self._retry("read the MLflow run", self.client.get_run, run_id)
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            self._retry("reopen the MLflow run", self.client.update_run, self.run_id, status="RUNNING")
        self._logged = self._retry("read logged steps", self._server_steps)
        self._logged |= {int(e["step"]) for e in self._pending if e["kind"] == "metrics"}
        self._server_params = dict(run.data.params)  # and what the journal replays below
        self._server_params.update(p for e in self._pending if e["kind"] == "params" for p in e["params"])
        if self._pending:
            self._replaying = True
            self.flush(wait=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate the MLflow run. FINISHED first drains the journal (waiting up to
        ``retry_seconds``); FAILED makes one attempt and leaves the journal for the resume."""
        if not self.run_id:
            return
        if status == "FINISHED":
            if not self.flush(wait=True):  # gave up earlier: the journal is not empty
                raise self._gave_up_error()
            if self.buffer is not None:  # blobs of a crashed attempt that never reached the journal
                with contextlib.suppress(OSError):
                    shutil.rmtree(self._blob_dir())
            try:
                self._retry("terminate the MLflow run", self.client.set_terminated, self.run_id, status=status)
            except TrackingUnavailableError as exc:  # everything is logged; only the end mark is missing
                raise TrackingUnavailableError(
                    f"{exc}; every metric, tag and artifact of the run reached the store"
                    + (f" (the journal {self.buffer} is empty)" if self.buffer else "")
                    + ": `creditflow resume` marks the MLflow run FINISHED once the store is back") from exc
            return
        try:
            self._stop_sender()  # its error, if any, was raised already or is the reason we fail
            self._drain(wait=False)
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            print(f"creditflow: could not mark MLflow run {self.run_id} {status} at {self.uri} "
                  f"({type(exc).__name__}); " + (self.pending_summary() if self._pending else "nothing buffered"),
                  file=sys.stderr)

    # ------------------------------------------------------------------ logging
    def log_params(self, params: dict[str, str]) -> None:
        """Params not logged yet (a resume keeps the first values: MLflow params are immutable)."""
        from mlflow.entities import Param

        params = mask_config(params)  # secret keys and secret values never reach MLflow
        existing = self._server_params
        if existing is None:  # neither started nor attached by this tracker
            existing = self._retry("read params", self.client.get_run, self.run_id).data.params
        items = [[k, v[:6000]] for k, v in params.items() if k not in existing]
        if self.buffer is not None:  # journaled; a replay of the same values is a no-op in MLflow
            existing.update(items)
            if items:
                self._enqueue({"kind": "params", "params": items})
            return
        for i in range(0, len(items), _PARAM_CHUNK):
            self._retry("log params", self.client.log_batch, self.run_id,
                        params=[Param(k, v) for k, v in items[i : i + _PARAM_CHUNK]])
        existing.update(items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set ``tags`` (masked, truncated); those whose value this tracker already set are skipped."""
        masked = {k: str(v)[:8000] for k, v in mask_config({k: str(v) for k, v in tags.items()}).items()}
        items = {k: v for k, v in masked.items() if self._tag_values.get(k) != v}
        if not items:
            return
        if self.buffer is None:
            from mlflow.entities import RunTag

            tag_list = [RunTag(k, v) for k, v in items.items()]
            for i in range(0, len(tag_list), _TAG_CHUNK):
                self._retry("set tags", self.client.log_batch, self.run_id, tags=tag_list[i : i + _TAG_CHUNK])
        else:
            self._enqueue({"kind": "tags", "tags": items})
        self._tag_values.update(items)  # only once sent or journaled: a failed call is not remembered

    def has_step(self, step: int) -> bool:
        return step in self._logged

    def log_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Log all ``metrics`` at ``step`` in one batch, unless that step is already logged (or
        buffered). Returns whether this call logged it."""
        if step in self._logged:
            return False
        ts = int(time.time() * 1000)
        items = [[k, float(v), ts] for k, v in sorted(metrics.items()) if v is not None and math.isfinite(float(v))]
        items.append([SENTINEL, float(step), ts])
        entry = {"kind": "metrics", "step": int(step), "metrics": items}
        if self.buffer is None:
            self._retry(f"log metrics of step {step}", self._send, entry, None)
        else:
            self._logged.add(step)
            self._enqueue(entry)
        self._logged.add(step)
        return True

    def _log_artifact_file(self, make: Callable[[Path], None], artifact_file: str, render: Optional[str] = None) -> None:
        """``make(path)`` writes the artifact (or, with ``render``, the renderer's input: see
        :meth:`log_rendered`); journaled, or sent at once by a tracker without a buffer."""
        entry: dict[str, Any] = {"kind": "artifact", "artifact_file": artifact_file}
        if render is not None:
            entry["render"] = render
        if self.buffer is None:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / Path(artifact_file).name
                make(out)
                self._retry(f"log artifact {artifact_file}", self._send, {**entry, "file": str(out)}, None)
            return
        blobs = self._blob_dir()
        blobs.mkdir(parents=True, exist_ok=True)
        out = blobs / f"{uuid.uuid4().hex[:12]}-{Path(artifact_file).name}"
        make(out)
        with open(out, "rb") as fh:
            os.fsync(fh.fileno())
        self._enqueue({**entry, "file": str(out)})

    def log_text(self, text: str, artifact_file: str) -> None:
        masked = mask_text(text)
        self._log_artifact_file(lambda p: p.write_text(masked), artifact_file)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=1, default=str), artifact_file)

    def log_file(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self._retry(f"log artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_rendered(self, write_input: Callable[[Path], None], renderer: str, artifact_file: str) -> None:
        """An artifact drawn when it is sent, off the caller's path: ``write_input(path)`` writes the
        renderer's input (small, e.g. a heatmap's arrays) to the journal's blob store now;
        ``renderer`` (``"module:function"``, ``fn(input_path, out_path)``) makes the artifact from it
        in the sender (again on resume, from the journal). A drawing error is a warning, not a fault."""
        self._log_artifact_file(write_input, artifact_file, render=renderer)
