"""The background MLflow sender behind the durable journal (flows/tracking_sender.py, issue 14):
exactly-once metric steps, errors that surface at the flow's next tracking call, a crash that
leaves the journal to be replayed. Real MLflow on a real SQLite store; an outage is a real
SQLite write lock held by another connection (``database is locked``: transient)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from flows.tracking import SENTINEL, Tracker, TrackingUnavailableError


def _tracker(tmp_path, **kw) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "creditflow", tmp_path,
                   buffer=tmp_path / "run" / "tracking_buffer.jsonl", **{"background": True, **kw})


def _steps(tracker: Tracker, key: str) -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(tracker.run_id, key))


def _journal(tracker: Tracker) -> list[dict]:
    return [json.loads(x) for x in tracker.buffer.read_text().splitlines()] if tracker.buffer.is_file() else []


_BEFORE: set = set()


def _senders() -> list[threading.Thread]:
    """Sender threads started since the test began (another test's may still be alive: not ours)."""
    return [t for t in threading.enumerate() if t.name == "creditflow-mlflow-sender" and t not in _BEFORE]


@pytest.fixture(autouse=True)
def _threads_before():
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())
    yield


@contextlib.contextmanager
def _store_locked(tmp_path):
    """Another connection holds the SQLite write lock: every MLflow write fails as 'database is locked'."""
    con = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


def test_sender_logs_each_step_once_and_finish_joins_it(tmp_path):
    t = _tracker(tmp_path)
    t.start("sender", {})
    for step in range(5):
        assert t.log_step(step, {"m": float(step), "n": 1.0})
        t.set_tags({"last": step})
    assert not t.log_step(2, {"m": 9.0})  # a step is logged once
    t.log_text("hello", "notes/a.txt")
    assert _senders(), "the journal is sent from a background thread"
    t.finish("FINISHED")
    assert not _senders()  # joined at the end
    run = t.client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["last"] == "4"
    assert _steps(t, SENTINEL) == _steps(t, "m") == [0, 1, 2, 3, 4]
    assert [m.value for m in sorted(t.client.get_metric_history(t.run_id, "m"), key=lambda m: m.step)] == [0, 1, 2, 3, 4]
    assert [a.path for a in t.client.list_artifacts(t.run_id, "notes")] == ["notes/a.txt"]
    assert not t.buffer.exists() and not t._blob_dir().exists()


def test_journal_head_goes_in_one_log_batch_and_unchanged_tags_are_not_journaled_again(tmp_path, monkeypatch):
    """Consecutive metric/param/tag entries reach the store as ONE log_batch (one SQLite transaction,
    the journal rewritten once), in order (a later tag value wins); an artifact ends the batch; a tag
    set again with its value is not journaled again."""
    t = _tracker(tmp_path)
    t.start("batched", {})
    t.flush(wait=True)
    monkeypatch.setattr(t, "_wake_sender", lambda: None)  # let the journal fill, then drain it once
    for step in range(3):
        t.log_step(step, {"m": float(step)})
        t.set_tags({"fixed": "same", "last": step})
    t.log_params({"p": "1"})
    t.log_text("hello", "notes/a.txt")
    t.log_step(3, {"m": 3.0})
    assert [e["kind"] for e in _journal(t)] == ["metrics", "tags", "metrics", "tags", "metrics", "tags",
                                                "params", "artifact", "metrics"]
    assert [sorted(e["tags"]) for e in _journal(t) if e["kind"] == "tags"] == [["fixed", "last"], ["last"], ["last"]]
    calls = []
    real = t.client.log_batch
    monkeypatch.setattr(t.client, "log_batch", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    assert t.flush(wait=True)
    assert [(len(c["metrics"]), len(c["params"]), len(c["tags"])) for c in calls] == [(6, 1, 2), (2, 0, 0)]
    run = t.client.get_run(t.run_id)
    assert run.data.tags["last"] == "2" and run.data.tags["fixed"] == "same" and run.data.params["p"] == "1"
    assert _steps(t, SENTINEL) == _steps(t, "m") == [0, 1, 2, 3]
    assert [a.path for a in t.client.list_artifacts(t.run_id, "notes")] == ["notes/a.txt"]
    assert not t.buffer.exists()
    t.finish("FINISHED")


def test_rejected_entry_surfaces_at_the_next_call_and_stays_in_the_journal(tmp_path, capfd):
    from mlflow.exceptions import MlflowException

    t = _tracker(tmp_path)
    t.start("rejected", {})
    assert t.log_step(0, {"bad name!": 1.0})  # journaled; MLflow rejects the name (not transient)
    with pytest.raises(MlflowException, match="bad name!"):
        for _ in range(600):  # until the sender has tried it (no timing asserted)
            t.flush()
            time.sleep(0.05)
    assert "MLflow sender stopped" in capfd.readouterr().err  # said once, by the sender
    assert [e.get("step") for e in _journal(t)] == [0]  # not lost: still first in the journal
    with pytest.raises(MlflowException):  # a run cannot be FINISHED while the journal holds it
        t.finish("FINISHED")
    t.finish("FAILED")  # the failure path never raises; it says what is buffered
    assert "1 entries (metric steps [0]" in capfd.readouterr().err
    assert not _senders()


def test_crash_while_the_store_is_locked_leaves_the_journal_replayed_exactly_once(tmp_path):
    t = _tracker(tmp_path)
    run_id = t.start("crash", {})
    assert t.log_step(0, {"m": 0.0})
    t.flush(wait=True)
    with _store_locked(tmp_path):
        t.log_params({"lr": "0.1"})
        assert t.log_step(1, {"m": 1.0}) and t.log_step(2, {"m": 2.0})  # the flow goes on
        assert [e["kind"] for e in _journal(t)] == ["params", "metrics", "metrics"]
        t._stop_sender()  # the process dies here: the daemon sender goes with it
    # the params and step 1 reached the store but their answers were lost (the journal still has them)
    t._send(t._pending[0], None)
    t._send(t._pending[1], None)
    assert _steps(t, SENTINEL) == [0, 1]
    resumed = _tracker(tmp_path)
    resumed.attach(run_id)  # replays the journal; the sentinel says step 1 is there already
    assert not resumed.buffer.exists()
    resumed.log_params({"lr": "0.2", "new": "x"})  # params are immutable: the first value stays
    assert not resumed.log_step(2, {"m": 2.0}) and resumed.log_step(3, {"m": 3.0})
    resumed.finish("FINISHED")
    history = resumed.client.get_metric_history(run_id, "m")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # each step exactly once
    assert _steps(resumed, SENTINEL) == [0, 1, 2, 3]
    assert resumed.client.get_run(run_id).data.params == {"lr": "0.1", "new": "x"}


def test_store_locked_past_retry_seconds_fails_naming_the_journal_then_drains(tmp_path):
    t = _tracker(tmp_path, retry_seconds=1)
    t.start("gone", {})
    with _store_locked(tmp_path):
        assert t.log_step(0, {"m": 0.0})
        with pytest.raises(TrackingUnavailableError) as info:
            for step in range(1, 2000):  # training goes on until the sender gives up
                t.log_step(step, {"m": float(step)})
                time.sleep(0.05)
        buffered = sorted(e["step"] for e in _journal(t) if e["kind"] == "metrics")
        msg = str(info.value)
        assert str(t.buffer) in msg and "creditflow resume" in msg and f"metric steps {buffered}" in msg, msg
        t.log_step(buffered[-1] + 1, {"m": -1.0})  # raised once; the journal keeps growing
    t.finish("FINISHED")  # the store is back: everything journaled reaches it, then the end mark
    assert _steps(t, SENTINEL) == list(range(buffered[-1] + 2))
    assert t.client.get_run(t.run_id).info.status == "FINISHED"


def test_idle_sender_ends_its_thread_and_a_later_entry_starts_a_new_one(tmp_path, monkeypatch):
    """A run that is never finished in this process (an in-process test) leaves no thread behind."""
    from flows import tracking_sender

    monkeypatch.setattr(tracking_sender, "IDLE_EXIT_SECONDS", 0.05)
    t = _tracker(tmp_path)
    t.start("idle", {})
    assert t.log_step(0, {"m": 0.0})
    for _ in range(400):  # until the journal is sent and the sender has been idle (no timing asserted)
        if not _senders() or not any(th.is_alive() for th in _senders()):
            break
        time.sleep(0.05)
    assert not any(th.is_alive() for th in _senders()), "an idle sender ends its thread"
    assert not t.buffer.exists() or not _journal(t)
    assert t.log_step(1, {"m": 1.0})  # a new sender is started for the new entry
    t.finish("FINISHED")
    assert _steps(t, "m") == [0, 1] and not any(th.is_alive() for th in _senders())


def test_rendered_artifact_is_drawn_by_the_sender_and_a_drawing_error_is_a_warning(tmp_path, capfd):
    """Heatmaps leave the flow's path: the caller journals the arrays, the sender draws the PNG."""
    import numpy as np

    from flows.heatmap import save_data

    data = {"method": np.array([[0.5, -1.0], [0.0, 2.0]]), "ground_truth": np.array([[1.0, 0.0], [0.0, 1.0]]),
            "decisive": np.array([[True, False], [False, True]]), "title": np.array("t")}
    t = _tracker(tmp_path)
    t.start("rendered", {})
    t.log_rendered(lambda p: save_data(data, p), "flows.heatmap:render_png", "heatmaps/h.png")
    t.log_rendered(lambda p: p.write_bytes(b"not an npz"), "flows.heatmap:render_png", "heatmaps/bad.png")
    t.finish("FINISHED")
    assert [a.path for a in t.client.list_artifacts(t.run_id, "heatmaps")] == ["heatmaps/h.png"]
    png = Path(t.client.download_artifacts(t.run_id, "heatmaps/h.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "could not draw heatmaps/bad.png" in capfd.readouterr().err
    assert not t.buffer.exists() and not t._blob_dir().exists()
