"""The time-series forecasting flow: load -> split -> scale & window -> train -> backtest ->
register. Run ``python -m flows.timeseries --help`` for every option."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from prefect.artifacts import create_markdown_artifact

from flows import exit_process
from flows.cli import checkpoint_dir, checkpointed, config_flow, registration_note, run_from_command_line
from tasks.config import TimeSeriesConfig, safe_name
from tasks.data import SERIES_SUFFIXES, with_calendar
from tasks.features import check_transforms, settle, split_series
from tasks.ingest import read_series
from tasks.tracking import CHAMPION, check_tracking_server

if TYPE_CHECKING:
    from tasks.features import Data, Windows
    from tasks.training import Settings, Trained

DESCRIPTION = "Train a recurrent forecaster (RNN/LSTM/GRU) on a series and register it in MLflow."


@config_flow(TimeSeriesConfig, name="timeseries-forecasting", description=DESCRIPTION)
def timeseries_flow(cfg: TimeSeriesConfig) -> dict:
    # imported here, not at the top: the command line checks its input without importing torch and MLflow
    from flows import steps

    check_tracking_server()  # before any work: a run that cannot be registered is not started

    # --- extract: one series (generated or read), or the many series of a long-format file (--id-column)
    if cfg.source == "file":
        path, sha256 = steps.fetch_data(cfg.data, cfg.sha256, SERIES_SUFFIXES)
        data = (steps.load_panel if cfg.panel else steps.load_series)(path, sha256, cfg)
    else:
        data = steps.generate_series(cfg)

    # --- transform: with --auto the transform options are settled on the validation part first
    data_sha256 = data.sha256 if cfg.source == "file" else ""
    checkpoints = checkpoint_dir(cfg, data_sha256)
    with checkpointed(checkpoints, "timeseries", cfg, data_sha256):
        settings = steps.choose_settings(data, cfg, checkpoints and checkpoints / "auto")
        data = steps.with_calendar(data, settings.cfg)  # the calendar features, if asked for or chosen
        split = steps.split_series(data, settings.cfg)
        windows = steps.scale_and_window(data, split, settings.cfg)
        trained = steps.train_forecaster(data, windows, settings, checkpoints and checkpoints / "model")

        # --- load
        bt, champion, reg = evaluate_and_register(settings, data, windows, trained)
    return report(settings, reg, bt, champion, trained)


def evaluate_and_register(settings: Settings, data: Data, windows: Windows, trained: Trained):
    """Calibrate --intervals on the validation part -> backtest on the test part -> score the
    champion on the same origins -> plot -> register through the champion gate: the flow's last
    steps, and a sweep's for its best trial."""
    from flows import steps

    cfg = settings.cfg
    trained = steps.calibrate_intervals(data, windows, trained, cfg.interval_levels)
    bt = steps.backtest(data, windows, trained.pipeline(), cfg.label)
    champion = steps.score_champion(cfg.registered_name, data, windows, cfg.horizon, cfg.registry_retry_minutes)
    with tempfile.TemporaryDirectory() as tmp:
        plots = steps.plot_backtest(data, bt, trained.first_fit, cfg.label, tmp)
        reg = steps.register_forecaster(settings, data, windows, trained, bt, champion, plots, steps.champion_gate_lock)
    return bt, champion, reg


def report(settings: Settings, reg, bt, champion, trained) -> dict:
    """The run's markdown artifact in Prefect, and what the flow returns."""
    cfg, selection = settings.cfg, settings.selection
    name, label = cfg.registered_name, cfg.label
    vs = (f"Champion v{champion.version} on the same test data: MASE {champion.score:.4g}.\n\n"
          if champion.score is not None else "")
    auto = f"{selection.markdown()}\n\n" if selection else ""
    budget = (f"{len(trained.fits)} of {cfg.ensemble} ensemble members fitted in --minutes {cfg.minutes:g}.\n\n"
              if cfg.minutes else "")
    text = f"{bt.markdown(f'{name} v{reg.version}')}\n\n{auto}{budget}{vs}{registration_note(name, reg)}"
    create_markdown_artifact(text, key=f"{safe_name(name)}-backtest", description=f"{name} v{reg.version} backtest")
    return {"model_name": name, "version": reg.version, "model_uri": reg.model_uri,
            "champion_uri": f"models:/{name}@{CHAMPION}", "promoted": reg.promoted, "reason": reg.reason,
            "run_id": reg.run_id, "scores": bt.scores, "label": label, "report": text,
            "train_seconds": trained.train_seconds, "device": trained.device}


def check_input(cfg: TimeSeriesConfig) -> Path:
    """What can be checked without training, before Prefect starts: the tracking server answers,
    the data reads and parses, its columns exist, it is long enough for the split and transforms.
    Returns the run's checkpoint folder."""
    check_tracking_server()
    if cfg.source != "file":
        return checkpoint_dir(cfg, "")
    data = with_calendar(read_series(cfg, hand_over=True), cfg)
    if cfg.panel:
        check_transforms(data, settle(data, cfg))
    else:
        split_series(data, cfg)
    return checkpoint_dir(cfg, data.sha256)


def main(argv: list[str] | None = None) -> int:
    return run_from_command_line(TimeSeriesConfig, timeseries_flow, argv, "python -m flows.timeseries",
                                 DESCRIPTION, check=check_input)


if __name__ == "__main__":
    exit_process(main())
