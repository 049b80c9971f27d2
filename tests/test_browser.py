"""The MLflow UI as a user sees it after a pipeline, in headless Chromium (Debian's package, driven by
Playwright): the experiment opens on its training runs, the evaluate run unfolds into one run per method
with its error, and those runs compare side by side. The screenshots go to $DD_DIST_SCREENSHOTS where it is
set (DD_DIST_SCREENSHOTS=docs/demo renews the README's), else to the test's temporary folder."""
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright


CHROMIUM = shutil.which("chromium")
# As root, with no network: no sandbox, and none of Chromium's calls home (refused here, one by one).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
EXPAND = "button[data-component-id*='runnamecellrenderer']"  # the +/- beside a parent run's name
METHODS = ("standard", "mc-4", "distilled")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make setup` installs Debian's chromium "
                                                "package where apt-get can, and it could not here"),
]


def api(url: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served_pipeline(image_folder_pipeline):
    """conftest's image-folder pipeline and its `mlflow server`; yields (url, experiment id, method runs)."""
    url = image_folder_pipeline.url
    experiment = api(url, f"experiments/get-by-name?experiment_name={image_folder_pipeline.experiment}")
    experiment = experiment["experiment"]["experiment_id"]
    runs = api(url, "runs/search", {"experiment_ids": [experiment], "max_results": 100,
                                    "filter": "tags.stage = 'method'"})["runs"]
    methods = {r["info"]["run_name"]: {"id": r["info"]["run_id"],
                                       **{m["key"]: m["value"] for m in r["data"]["metrics"]}} for r in runs}
    assert sorted(methods) == sorted(METHODS)
    return url, experiment, methods


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return Path(os.environ.get("DD_DIST_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(url)
    return page


def close_assistant(page) -> None:
    """MLflow 3.17 opens its chat panel beside every page; it hides the table's right half."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_runs_page_shows_each_method_run_and_its_error(served_pipeline, browser, shots):
    url, experiment, methods = served_pipeline
    # MLflow 3.17 picks the GenAI or the training view from this parameter (or the toggle's saved choice);
    # the experiment's mlflow.experimentKind tag is what earlier 3.x releases read.
    page = open_page(browser, f"{url}/#/experiments/{experiment}?workflowType=machine_learning")
    page.wait_for_selector("[role=row]:has-text('pipeline')")
    body = page.inner_text("body")
    assert "Run Name" in body and "Observability" not in body  # the runs table, not the GenAI overview
    close_assistant(page)
    page.locator("[role=row]", has_text="pipeline").locator(EXPAND).first.click()
    page.locator("[role=row]", has_text="evaluate").locator(EXPAND).first.click()
    page.wait_for_selector("[role=row]:has-text('distilled')")
    page.get_by_role("button", name="Columns", exact=True).click()
    page.locator("[role=menu], [role=dialog]").first.get_by_text("error", exact=True).first.click()
    page.keyboard.press("Escape")
    for method in METHODS:
        name_row = page.locator(".ag-pinned-left-cols-container [role=row]", has=page.get_by_text(method, exact=True))
        index = name_row.first.get_attribute("row-index")
        error = page.locator(f".ag-center-cols-container [role=row][row-index='{index}'] [col-id='metrics.`error`']")
        assert float(error.inner_text()) == pytest.approx(methods[method]["error"], abs=5e-4), method  # shown to 3 places
        name_row.first.locator("input.ag-checkbox-input").check()
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=shots / "mlflow_ui_runs.png")
    # The selected runs, compared: the page the Compare button opens.
    page.get_by_role("button", name="Compare").first.click()
    page.wait_for_selector("text=Run details")
    assert sorted(json.loads(page.url.split("runs=")[1].split("&")[0].replace("%22", '"'))) == \
        sorted(m["id"] for m in methods.values())


def test_compare_page_shows_the_methods_side_by_side(served_pipeline, browser, shots):
    url, experiment, methods = served_pipeline
    ids = json.dumps([methods[m]["id"] for m in METHODS])
    page = open_page(browser, f"{url}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}")
    page.wait_for_selector("text=Run details")
    close_assistant(page)
    page.wait_for_selector("text=forward_passes")
    text = page.inner_text("body")
    assert f"Comparing {len(METHODS)} Runs from 1 Experiment" in text
    for method in METHODS:
        assert method in text
        assert str(round(methods[method]["error"], 3)) in text, method  # the metrics table rounds to 3 places
    page.screenshot(path=shots / "mlflow_ui_compare.png", full_page=True)
