"""Refresh the README's pictures (docs/img/): both UIs in headless Chromium and a forecast with
its intervals. A real Prefect server and MLflow store in a throwaway folder: the deployments are
served (schedule and degradation trigger), one is run by hand twice (two registered versions,
the champion gate between them) and trains a sine forecaster with 80 % and 95 % conformal
intervals; then the pictures are taken:

    prefect-flow-run.png     the run's page in the Prefect UI, its task graph
    prefect-deployment.png   the nightly-retrain deployment: its schedule and trigger
    prefect-artifact.png     the backtest artifact the run left
    mlflow-run.png           the run in the MLflow UI
    mlflow-model.png         the registered model: its versions and aliases
    forecast.png             the run's test-part forecasts with their intervals (its MLflow plot)

Needs Chromium and its driver (Debian: apt-get install chromium chromium-driver) and selenium.
    .venv/bin/python scripts/readme-images.py [OUT_DIR]   OUT_DIR: default docs/img
`make readme-images` runs it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ has the servers' and the browser's harness

from tests.prefect_server import api, flow_runs, prefect_cli, prefect_server, served_deployments  # noqa: E402
from tests.serving import CHROMIUM, DRIVER, chrome, tracking_ui  # noqa: E402

DEPLOYMENT = "timeseries-forecasting/nightly-retrain"
PARAMS = {"length": 800, "lookback": 40, "horizon": 6, "epochs": 20, "intervals": "0.8,0.95", "device": "cpu"}


def wait_for(driver, *texts, timeout=90, settle=3.0) -> None:
    """Until the page's text holds every one of texts; then a moment for canvases and charts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
    time.sleep(settle)


def shoot(driver, url: str, path: Path, *texts: str, height: int = 1000) -> None:
    from selenium.webdriver.common.by import By

    driver.set_window_size(1400, height)
    driver.get(url)
    wait_for(driver, *texts)
    for side_panel in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):  # MLflow's assistant
        with contextlib.suppress(Exception):
            side_panel.click()
            time.sleep(1)
    driver.save_screenshot(str(path))
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def main(out: Path) -> None:
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        sys.exit(f"readme-images: no Chromium at {CHROMIUM} or no driver at {DRIVER}: "
                 "apt-get install chromium chromium-driver")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="readme-images-") as tmp:
        tmp = Path(tmp)
        (tmp / "mlruns").mkdir()
        store = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"  # throwaway: the project's own store is left alone
        with prefect_server(tmp, store) as env, \
                served_deployments(env, tmp, "--retrain-on", "both", "--timeseries-params", json.dumps(PARAMS)):
            for seed in (0, 1):  # a second version for the model page's versions and aliases
                ran = prefect_cli(env, "deployment", "run", DEPLOYMENT, "--param", f"seed={seed}", "--watch",
                                  timeout=900)
                if ran.returncode != 0:
                    sys.exit(f"readme-images: the deployment run failed:\n{ran.stdout[-3000:]}{ran.stderr[-3000:]}")
            run = [r for r in flow_runs(env, "nightly-retrain") if r["state_type"] == "COMPLETED"][-1]
            named = {"deployments": {"name": {"any_": ["nightly-retrain"]}}}
            (deployment,) = api(env, "POST", "/deployments/filter", named)
            (artifact,) = api(env, "POST", "/artifacts/filter", {"artifacts": {"key": {"like_": "backtest"},
                                                                           "flow_run_id": {"any_": [run["id"]]}}})
            ui = env["PREFECT_API_URL"].removesuffix("/api")
            driver = chrome(tmp / "chrome")
            try:
                shoot(driver, f"{ui}/runs/flow-run/{run['id']}", out / "prefect-flow-run.png", "nightly-retrain",
                      "Completed")
                shoot(driver, f"{ui}/deployments/deployment/{deployment['id']}", out / "prefect-deployment.png",
                      "nightly-retrain", "retrain a degraded champion")
                shoot(driver, f"{ui}/artifacts/artifact/{artifact['id']}", out / "prefect-artifact.png", "champion")
                with tracking_ui(store, str(tmp / "ui-artifacts")) as base:
                    from mlflow import MlflowClient

                    client = MlflowClient(store, store)
                    versions = client.search_model_versions("name='sine-forecaster'")
                    assert len(versions) == 2, f"two runs, {len(versions)} registered versions"
                    version = max(versions, key=lambda v: int(v.version))
                    mlflow_run = client.get_run(version.run_id)
                    shoot(driver, f"{base}/#/experiments/{mlflow_run.info.experiment_id}/runs/{version.run_id}",
                          out / "mlflow-run.png", "test_mase")
                    shoot(driver, f"{base}/#/models/sine-forecaster", out / "mlflow-model.png", "@ champion",
                          height=1350)  # each version's row lists its tags: two rows need the height
                    plot = client.download_artifacts(version.run_id, "plots/forecast.png", str(tmp))
                    shutil.copyfile(plot, out / "forecast.png")
                    print(f"wrote {out / 'forecast.png'} ({(out / 'forecast.png').stat().st_size:,} bytes)")
            finally:
                driver.quit()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img")
