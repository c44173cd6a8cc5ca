"""``creditflow report`` and the run metadata on one real tiny training run (Prefect + MLflow):

* the run wrote ``metadata.json`` that validates against the shipped schema, and logged the same
  document to MLflow;
* the report of that run (HTML + Markdown) and of a benchmark whose ``summary.json`` this test
  writes by hand in the format of contract.md (2 methods x 3 seeds; one cell is the real run, so
  its heatmap, checklist and task profile come from the run directory and MLflow);
* an unknown id is one clear line;
* a real headless Chromium opens the HTML page: every figure renders (SVG and PNG with non-zero
  size, ``naturalWidth > 0``, no broken image) and the console has no errors.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from flows import api
from flows.report import main as report_main
from flows.report import write_report
from stages.benchmark import metadata as M
from tests.browser_support import find_browser, start_chromium

SMALL = ["iterations=2", "rollout.tasks_per_iteration=4", "rollout.group_size=4", "eval_episodes=16",
         "env.horizon=3", "env.num_decisive=1", "tracking.heatmap_every=1"]
BROWSER, NO_BROWSER = find_browser()


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, shared_home):
    """One real tiny training run (GRPO on a 3-turn bifurcation task) in the session's shared home."""
    out = api.start_run(SMALL, home=shared_home, progress=False, run_id="cf-test-report-run")
    return shared_home, out


def test_a_real_run_writes_metadata_that_validates_and_is_logged_to_mlflow(tiny_run, tmp_path):
    home, out = tiny_run
    doc = json.loads((home / "runs" / out["run_id"] / "metadata.json").read_text())
    M.validate(doc)
    assert doc["kind"] == "training_run" and doc["run"]["run_id"] == out["run_id"]
    assert doc["run"]["mlflow_run_id"] == out["mlflow_run_id"]
    assert doc["method"]["name"] == "grpo" and doc["method"]["granularity"] == "episode"
    assert doc["method"]["taxonomy"]["method"] == "GRPO"  # its Appendix B row (a background row: no number)
    assert doc["task"]["profile"]["setting"] == "agentic" and doc["task"]["profile"]["turns"] == 3
    comp = doc["compute"]
    assert comp["iterations"] == 2 and comp["generated_tokens"] > 0 and comp["env_steps"] > 0
    assert comp["forward_tokens"] >= comp["generated_tokens"]  # prompt + response, x update epochs
    assert 0 <= comp["ca_share"] < 1 and comp["cpu_seconds"] > 0
    gt = doc["ground_truth"]  # bifurcation has exact advantages: both metric families, averaged over 2 iterations
    assert gt["iterations"] == 2 and gt["rmse"] >= 0 and -1 <= gt["pg_cosine"] <= 1
    assert doc["results"]["success_after"]["rate"] == out["success_after"]
    assert len(doc["checklist"]) == 14 and doc["seeds"] == [0]
    tracker = api.tracker_for(home)
    local = tracker.client.download_artifacts(out["mlflow_run_id"], "metadata.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == doc


def _curve(final: float, iterations: int = 5, tokens: int = 1000) -> list[dict]:
    return [{"iteration": i, "generated_tokens": tokens * (i + 1), "forward_tokens": 3 * tokens * (i + 1),
             "env_steps": 48 * (i + 1), "wall_seconds": 2.0 * (i + 1), "success": round(final * (i + 1) / iterations, 4),
             "eval_success": None} for i in range(iterations)]


def _summary(real_run_id: str) -> dict:
    """2 methods x 3 seeds at their best learning rate, in the format of contract.md."""
    finals = {"grpo": [0.5, 0.6, 0.7], "oracle": [0.8, 0.9, 1.0]}
    cells = []
    for method, values in finals.items():
        for seed, final in enumerate(values):
            run_id = real_run_id if (method, seed) == ("grpo", 0) else f"cf-bench-{method}-{seed}"
            cells.append({
                "cell_id": f"{method}-bifurcation-s{seed}", "method": method, "task": "bifurcation/h3", "seed": seed,
                "lr": 1e-3, "run_id": run_id, "mlflow_run_id": "", "status": "budget_spent",
                "reason": "generated_tokens budget spent",
                "spent": {"generated_tokens": 5000, "forward_tokens": 15000 + (600 if method == "oracle" else 0),
                          "ca_forward_tokens": 600 if method == "oracle" else 0, "env_steps": 240, "env_resets": 80,
                          "judge_calls": 0, "wall_seconds": 10.0, "cpu_seconds": 18.0,
                          "ca_seconds": 2.0 if method == "oracle" else 0.1, "iterations": 5},
                "curve": _curve(final), "final_success": final, "final_eval_success": final - 0.05,
                "gt": {"rmse": 0.4 if method == "grpo" else 0.0, "spearman": 0.3 + 0.1 * seed if method == "grpo" else 1.0,
                       "sign_accuracy": 0.7, "zero_advantage_mass": 0.5, "decisive_share": 0.3,
                       "shift_invariant_error": 0.2, "pg_cosine": 0.8, "batch_variance": 0.1},
            })
    return {"benchmark_id": "bm-test", "created": "2026-12-06T12:00:00+00:00",
            "command": "creditflow benchmark methods=[grpo,oracle] seeds=3", "status": "finished",
            "config": {"methods": ["grpo", "oracle"], "seeds": 3}, "mlflow_run_id": "parent123",
            "budget": {"generated_tokens": 5000, "forward_tokens": None, "env_steps": None, "wall_seconds": None,
                       "max_iterations": 50},
            "cells": cells,
            "methods": {"grpo": {"best_lr": 1e-3, "sweep": {"0.001": 0.6, "0.0003": 0.4}},
                        "oracle": {"best_lr": 1e-3, "sweep": {"0.001": 0.9, "0.0003": 0.7}}}}


@pytest.fixture(scope="module")
def reports(tiny_run, tmp_path_factory):
    home, out = tiny_run
    bdir = home / "benchmarks" / "bm-test"
    bdir.mkdir(parents=True, exist_ok=True)
    (bdir / "summary.json").write_text(json.dumps(_summary(out["run_id"]), indent=1))
    root = tmp_path_factory.mktemp("reports")
    run_files = write_report(out["run_id"], home=home, out=root / "run")
    bench_files = write_report("bm-test", home=home, out=root / "bench")
    return out, run_files, bench_files


def _no_network(html: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must be self-contained"
    assert "<script" not in html


def test_report_of_a_run(reports):
    out, (html_path, md_path), _ = reports
    html = html_path.read_text()
    _no_network(html)
    assert html.count("<svg") >= 2 and html.count('src="data:image/png;base64,') == 1  # curves+overhead, heatmap
    for section in ("Decision-tree recommendation", "Success vs compute", "Credit accuracy against ground truth",
                    "Identification", "Gradient validity", "Compute and overhead", "Reporting checklist"):
        assert section in html, section
    md = md_path.read_text()
    images = re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", md)
    assert len(images) == 3 and all((md_path.parent / p).stat().st_size > 0 for p in images)
    assert f"{out['success_after']:.3f}" in md  # its final eval success
    assert "Wilson interval" in md  # one seed: the eval interval, never an across-seed one
    assert "| Compute | Required | Total GPU-hours for training (device-hours, measured) | ✓ filled |" in md


def test_report_of_a_benchmark_summary(reports):
    out, _, (html_path, md_path) = reports
    md = md_path.read_text()
    # grpo finals 0.5/0.6/0.7: mean 0.6, 95% t-interval 0.6 -/+ t(0.975, 2) * 0.1 / sqrt(3) = 0.6 -/+ 0.2484
    assert "| grpo | bifurcation/h3 | 3 | 0.600 [0.352, 0.848] |" in md
    assert "| oracle | bifurcation/h3 | 3 | 0.900 [0.652, 1.000] |" in md  # clipped to [0, 1]
    # share of the GRPO -> oracle gap closed: 0 for GRPO, 1 for the oracle
    row = next(line for line in md.splitlines() if line.startswith("| oracle | bifurcation/h3 | 3 | 0.900"))
    assert row.rstrip(" |").endswith("1.000")
    # Spearman of grpo over seeds: 0.3/0.4/0.5 -> 0.400 [0.152, 0.648]
    assert "0.400 [0.152, 0.648]" in md
    assert "| grpo | 0.001 | 0.400 | 0.600 |" in md  # the sweep, lr columns ascending
    assert "| 2.000 (20.0%) |" in md and "| 600 (3.8%) |" in md  # the oracle's CA share of wall time, of forward tokens
    # the real run's heatmap and checklist come along; the other runs are reported missing
    html = html_path.read_text()
    _no_network(html)
    assert html.count('src="data:image/png;base64,') == 1
    assert "run cf-bench-oracle-1 is not under" in md
    assert "Task profile: setting=agentic" in md


def test_unknown_id_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CREDITFLOW_HOME", str(tmp_path))
    assert report_main(["cf-nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("creditflow: error: no run or benchmark 'cf-nope' under")


@pytest.mark.browser
@pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER or "no browser")
def test_headless_chromium_renders_every_figure(reports, tmp_path):
    _, (run_html, _), (bench_html, _) = reports
    browser, driver = BROWSER
    drv = start_chromium(browser, driver, tmp_path / "chromedriver.log", page_load_timeout=120)
    try:
        for page in (run_html, bench_html):
            drv.get(page.resolve().as_uri())
            figs = drv.execute_script("""
                const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
                return {
                  svgs: [...document.querySelectorAll('figure.plot svg')].map(box),
                  imgs: [...document.images].map(i => ({size: box(i), natural: [i.naturalWidth, i.naturalHeight],
                                                       complete: i.complete})),
                  title: document.title};""")
            assert len(figs["svgs"]) >= 2 and all(w > 0 and h > 0 for w, h in figs["svgs"]), figs
            assert figs["imgs"], figs
            for img in figs["imgs"]:
                assert img["complete"] and min(img["natural"]) > 0 and min(img["size"]) > 0, img
            drv.save_screenshot(str(tmp_path / f"{page.parent.name}.png"))
            errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
            assert not errors, errors
    finally:
        drv.quit()
