"""The Prefect UI and the MLflow UI in a real headless Chromium (issue 7).

Uses the session's real processes (``servers`` in tests/conftest.py: ``prefect server start``
with its UI, ``mlflow server``, ``creditflow serve``) and the tiny training run through the
``creditflow-train`` deployment (``served_training``, shared with tests/test_serve.py), then
clicks through both UIs like a user:

* Prefect UI: Deployments -> ``creditflow-train`` -> its flow run -> state *Completed* shown, and
  the ``creditflow-train`` training subflow under *Subflow Runs*;
* MLflow UI: the experiment's runs table -> the run (named by the creditflow run id) -> its
  ``checklist.*`` tags -> the Artifacts view -> ``heatmaps/credit_iter_0000.png``, with the
  image element loaded (a non-empty bitmap).

Waits are explicit (by visible text / URL), never sleeps. PNG screenshots of every page go to
``tmp_path/screenshots`` and, when ``CREDITFLOW_TEST_ARTIFACTS`` is set, to
``$CREDITFLOW_TEST_ARTIFACTS/test_browser/``. Skips, saying how to install one, where no
browser is found (``tests/browser_support.py``: Debian ``chromium`` + ``chromium-driver`` and
``selenium``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.browser_support import Page, find_browser, start_chromium

BROWSER, NO_BROWSER = find_browser()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,  # the session's servers and training (shared with test_serve) + a browser (in the default suite)
    pytest.mark.skipif(BROWSER is None, reason=NO_BROWSER or "no browser"),
]

HEATMAP = "heatmaps/credit_iter_0000.png"


@pytest.fixture()
def page(tmp_path):
    outdirs = [tmp_path / "screenshots"]
    if os.environ.get("CREDITFLOW_TEST_ARTIFACTS"):
        outdirs.append(Path(os.environ["CREDITFLOW_TEST_ARTIFACTS"]) / "test_browser")
    browser, driver = BROWSER
    drv = start_chromium(browser, driver, tmp_path / "chromedriver.log")
    try:
        yield Page(drv, outdirs, timeout=180)
    finally:
        drv.quit()


# ------------------------------------------------------------------------------ the two UIs
def check_prefect_ui(page: Page, ui_url: str, flow_run, subflow_name: str) -> None:
    """Deployments -> creditflow-train -> the flow run: Completed, with the training subflow."""
    page.open(f"{ui_url}/deployments")
    link = page.wait_element("creditflow-train", tag="a", exact=True)
    page.wait_text("start-training")
    page.screenshot("prefect-deployments")
    page.click(link)
    page.until("the deployment page", lambda: "/deployments/deployment/" in page.driver.current_url)
    run_link = page.wait_element(flow_run.name, tag="a", exact=True)
    page.screenshot("prefect-deployment-creditflow-train")
    page.click(run_link)
    page.until("the flow run page", lambda: f"/runs/flow-run/{flow_run.id}" in page.driver.current_url)
    page.wait_text(flow_run.name)
    # the state badge of the run's header (the log's "Finished in state Completed()" is no match)
    badge = page.wait_element("Completed", exact=True)
    badge_class = badge.find_element("xpath", "./ancestor-or-self::*[contains(@class, 'state')][1]") \
        .get_attribute("class")
    assert "completed" in badge_class, badge.get_attribute("outerHTML")  # a state badge, not any text
    page.wait_text("creditflow-train")  # the deployment, in the run's header
    page.screenshot("prefect-flow-run-completed")
    page.click(page.wait_element("Subflow Runs", exact=True))
    page.wait_element(subflow_name, exact=True)
    page.screenshot("prefect-flow-run-subflows")


def _close_mlflow_assistant(page: Page) -> None:
    """The MLflow Assistant side panel covers a third of the page: close it if it is there."""
    for button in page.driver.find_elements(
            "xpath", "//*[contains(normalize-space(.), 'MLflow Assistant')]/ancestor::*[.//button"
                     "[@aria-label='Close']][1]//button[@aria-label='Close']"):
        if button.is_displayed():
            page.click(button)
            return


def check_mlflow_ui(page: Page, mlflow_url: str, experiment_id: str, run_id: str, run_name: str,
                    tags: dict[str, str], n_runs: int) -> None:
    """Runs table (``n_runs`` runs in the experiment) -> the run -> checklist tags -> Artifacts ->
    the heatmap image."""
    page.open(f"{mlflow_url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    name = page.wait_element(run_name, exact=True)
    page.wait_text(f"{n_runs} matching run")  # "1 matching run", "2 matching runs"
    _close_mlflow_assistant(page)
    page.screenshot("mlflow-experiment-runs")
    page.click(name)
    page.until("the run page", lambda: f"/runs/{run_id}" in page.driver.current_url)
    page.wait_text("About this run")
    page.wait_text(run_id)
    _close_mlflow_assistant(page)
    # the tags: names and values as the run page shows them (long ones are cut with an ellipsis
    # visually, the DOM text is whole)
    tag_el = page.wait_element("checklist.ca.granularity", exact=True)
    shown = page.body_text()
    checklist = sorted(k for k in tags if k.startswith("checklist."))
    missing = [k for k in checklist if k not in shown]
    assert len(checklist) >= 14 and not missing, missing
    assert tags["checklist.compute.device_hours.status"] == "filled"
    page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", tag_el)
    page.screenshot("mlflow-run-checklist-tags")
    # the artifacts view: folder -> file -> preview
    page.click(page.wait_element("Artifacts", exact=True))
    page.until("the artifacts view", lambda: page.driver.current_url.rstrip("/").endswith("/artifacts")
               or "/artifacts/" in page.driver.current_url)
    page.wait_element("checklist.json", exact=True)
    page.click(page.wait_element("heatmaps", exact=True))
    page.click(page.wait_element("credit_iter_0000.png", exact=True))
    page.wait_text(HEATMAP)  # the preview's header names the artifact's path

    def heatmap_image():
        for img in page.driver.find_elements("tag name", "img"):
            src = img.get_attribute("src") or ""
            if src.startswith(("blob:", "data:", "http")) and img.is_displayed() and page.image_loaded(img):
                w = page.driver.execute_script("return arguments[0].naturalWidth;", img)
                if w >= 200:  # the figure, not an icon
                    return img
        return None

    img = page.until("the heatmap image to load", heatmap_image)
    size = page.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight];", img)
    page.screenshot("mlflow-run-artifact-heatmap")
    assert size[0] >= 200 and size[1] >= 100, size


# ------------------------------------------------------------------------------ the test
def test_prefect_and_mlflow_uis_in_headless_chromium(servers, served_training, page):
    from mlflow.tracking import MlflowClient

    from tests.server_support import prefect_client

    api_url, mlflow_url = servers["api_url"], servers["mlflow_url"]
    t0 = time.monotonic()

    def phase(text: str) -> None:  # progress with -s; no assertion on times
        print(f"[browser test] {text}: {time.monotonic() - t0:.1f} s", flush=True)

    fr, run, exp_id = served_training["flow_run"], served_training["mlflow_run"], served_training["experiment_id"]
    ml = MlflowClient(tracking_uri=mlflow_url)
    assert HEATMAP in {a.path for a in ml.list_artifacts(run.info.run_id, "heatmaps")}
    with prefect_client(api_url) as client:
        subflow = client.read_flow_run(run.data.tags["prefect.flow_run_id"])

    check_prefect_ui(page, api_url.removesuffix("/api"), fr, subflow.name)
    phase("Prefect UI checked")
    # the session's servers are shared with tests/test_serve.py: its runs may be in the table too
    n_runs = len(ml.search_runs([exp_id]))
    check_mlflow_ui(page, mlflow_url, exp_id, run.info.run_id, run.info.run_name, run.data.tags, n_runs)
    phase("MLflow UI checked")
    names = [p.name for p in page.shots]
    assert len(names) == 7 and all(p.stat().st_size > 10_000 for p in page.shots), names
    print("[browser test] screenshots:", *map(str, page.shots), sep="\n  ")
