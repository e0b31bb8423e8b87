"""The MLflow UI in a real headless Chromium: the run's metrics and the champion alias show.
Screenshots go to the test's temporary folder; `make readme-images` refreshes docs/img/."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.timeseries import timeseries_flow
from tests.serving import CHROMIUM, DRIVER, chrome, tracking_ui

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
    reason="no Chromium here: apt-get install chromium chromium-driver (.ci/run does this where apt works)")


@pytest.fixture
def browser(tmp_path):
    pytest.importorskip("selenium.webdriver")
    driver = chrome(tmp_path / "chrome")
    try:
        yield driver
    finally:
        driver.quit()


def _page_text(driver, *texts, timeout=60) -> str:
    """The page's visible text once every one of ``texts`` shows in it (the UI renders late)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        body = d.find_element(By.TAG_NAME, "body").text
        return body if all(t in body for t in texts) else False

    try:
        return WebDriverWait(driver, timeout).until(shown)
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        raise AssertionError(f"{driver.current_url}: {missing} not shown within {timeout} s; "
                             f"the page reads: {body[:1500]!r}") from None


def test_ui_shows_run_metrics_and_champion(mlflow_store, tmp_path, browser):
    result = timeseries_flow(length=600, lookback=12, hidden_size=16, epochs=3, device="cpu")
    c = MlflowClient(mlflow_store, mlflow_store)
    exp = c.get_experiment_by_name("timeseries-forecasting")
    run = c.get_run(result["run_id"])
    mase = run.data.metrics["test_mase"]
    with tracking_ui(mlflow_store, str(tmp_path / "ui-artifacts")) as base:
        browser.get(f"{base}/#/experiments/{exp.experiment_id}/runs/{result['run_id']}")
        text = _page_text(browser, "test_mase", run.info.run_name)
        assert f"test_mase\n{str(mase)[:5]}" in text  # the metric's value beside its name
        browser.save_screenshot(str(tmp_path / "mlflow-run.png"))

        browser.get(f"{base}/#/models/sine-forecaster")
        text = _page_text(browser, "sine-forecaster", "Version 1", "@ champion")  # the alias badge
        assert "Version 2" not in text and text.index("Version 1") < text.index("@ champion")
        browser.save_screenshot(str(tmp_path / "mlflow-model.png"))
    assert (tmp_path / "mlflow-run.png").stat().st_size > 10_000
    assert (tmp_path / "mlflow-model.png").stat().st_size > 10_000
