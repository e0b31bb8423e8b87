"""The MLflow UI in a real headless Chromium: the run's metrics and the champion alias show.
Screenshots go to docs/img/ for the README."""

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.timeseries import timeseries_flow
from tests.serving import tracking_ui

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="no Chromium here: apt-get install chromium chromium-driver (.ci/run does this where apt works)")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_for(driver, *texts, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.page_source for t in texts))


def test_ui_shows_run_metrics_and_champion(mlflow_store, tmp_path, browser):
    result = timeseries_flow(length=600, lookback=12, hidden_size=16, epochs=3, device="cpu")
    c = MlflowClient(mlflow_store, mlflow_store)
    exp = c.get_experiment_by_name("timeseries-forecasting")
    mase = c.get_run(result["run_id"]).data.metrics["test_mase"]
    IMG.mkdir(parents=True, exist_ok=True)
    with tracking_ui(mlflow_store, str(tmp_path / "ui-artifacts")) as base:
        browser.get(f"{base}/#/experiments/{exp.experiment_id}/runs/{result['run_id']}")
        _wait_for(browser, "test_mase", f"{mase:.3f}"[:4])
        browser.save_screenshot(str(IMG / "mlflow-run.png"))

        browser.get(f"{base}/#/models/sine-forecaster")
        _wait_for(browser, "sine-forecaster", "champion")
        browser.save_screenshot(str(IMG / "mlflow-model.png"))
    assert (IMG / "mlflow-run.png").stat().st_size > 10_000
