"""A benchmark cell whose training run fails on a transient error of the Prefect API (an ephemeral
server under load answers 503) is resumed, a bounded number of times, before it is recorded failed
(issue 15: two cells of the first checked-in benchmark failed that way). The training flow is
replaced by a double here: this is a unit test of the retry rule in :func:`flows.benchmark.run_cell`."""

from __future__ import annotations

import httpx
import pytest
from prefect.exceptions import PrefectHTTPStatusError

from flows import benchmark, train


def _http_error(status: int) -> PrefectHTTPStatusError:
    req = httpx.Request("POST", "http://127.0.0.1:4200/api/task_runs/")
    return PrefectHTTPStatusError(f"Server error '{status}'", request=req, response=httpx.Response(status, request=req))


def test_transient_errors_are_told_apart():
    assert benchmark.is_transient(_http_error(503)) and benchmark.is_transient(_http_error(429))
    assert not benchmark.is_transient(_http_error(404)) and not benchmark.is_transient(_http_error(422))
    assert benchmark.is_transient(httpx.ConnectError("refused"))
    assert not benchmark.is_transient(ValueError("a bug"))
    try:  # wrapped by the flow engine: the cause chain is searched
        try:
            raise _http_error(503)
        except PrefectHTTPStatusError as inner:
            raise RuntimeError("task run failed") from inner
    except RuntimeError as outer:
        assert benchmark.is_transient(outer)


@pytest.mark.parametrize("errors, expect_calls, expect_failed", [
    ([503, 502], 3, False),                 # two transient answers, then the resumed run finishes
    ([404], 1, True),                       # not transient: recorded at once
    ([503] * 10, benchmark.CELL_RETRIES + 1, True),  # bounded: gives up after CELL_RETRIES retries
])
def test_run_cell_resumes_after_transient_api_errors(cf_home, monkeypatch, errors, expect_calls, expect_failed):
    monkeypatch.setattr(benchmark, "RETRY_PAUSE_S", 0.0)
    calls: list[tuple[str, bool]] = []

    def fake_train_flow(run_id, home, fresh):
        calls.append((run_id, run_id in train._RUNS))
        if len(calls) <= len(errors):
            raise _http_error(errors[len(calls) - 1])

    monkeypatch.setattr(train, "train_flow", fake_train_flow)
    failure = benchmark.run_cell(str(cf_home), "bench-x-cell", ["iterations=1"], None, False, "bench-x", "cell")
    assert len(calls) == expect_calls
    assert (failure is not None) == expect_failed
    if expect_failed:
        assert "PrefectHTTPStatusError" in failure and str(errors[-1]) in failure
    # every attempt after the first re-opened the run the first one created (per-stage resume)
    assert (cf_home / "runs" / "bench-x-cell").is_dir()
