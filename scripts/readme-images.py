"""Refresh the README's screenshots of the MLflow UI (docs/img/mlflow-run.png, mlflow-model.png):
train and register a small sine forecaster in a throwaway store, open the UI in headless
Chromium and photograph the run and the registered model. `make readme-images` runs it.

Needs Chromium and its driver (Debian: apt-get install chromium chromium-driver) and selenium.
    .venv/bin/python scripts/readme-images.py [OUT_DIR]   OUT_DIR: default docs/img
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.serving starts the tracking UI and the browser

from tests.serving import CHROMIUM, DRIVER, chrome  # noqa: E402


def wait_for(driver, *texts, timeout=60) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))


def main(out: Path) -> None:
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        sys.exit(f"readme-images: no Chromium at {CHROMIUM} or no driver at {DRIVER}: "
                 "apt-get install chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="readme-images-") as tmp:
        tmp = Path(tmp)
        store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = store  # a throwaway store: the project's own is left alone
        from mlflow import MlflowClient

        from flows.timeseries import timeseries_flow
        from tests.serving import tracking_ui

        result = timeseries_flow(length=600, lookback=12, hidden_size=16, epochs=3, device="cpu")
        exp = MlflowClient(store, store).get_experiment_by_name("timeseries-forecasting")
        out.mkdir(parents=True, exist_ok=True)
        driver = chrome(tmp / "chrome")
        try:
            with tracking_ui(store, str(tmp / "ui-artifacts")) as base:
                driver.get(f"{base}/#/experiments/{exp.experiment_id}/runs/{result['run_id']}")
                wait_for(driver, "test_mase")
                driver.save_screenshot(str(out / "mlflow-run.png"))

                driver.get(f"{base}/#/models/{result['model_name']}")
                wait_for(driver, result["model_name"], "@ champion")
                driver.save_screenshot(str(out / "mlflow-model.png"))
        finally:
            driver.quit()
    for name in ("mlflow-run.png", "mlflow-model.png"):
        print(f"wrote {out / name} ({(out / name).stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img")
