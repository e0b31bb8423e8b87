"""The time-series flow's config: data, windows and transforms, the forecaster and its training,
and the checks a config must pass before any data is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rnn_models import CELL_NAMES
from rnn_models.windows import Split, window_origins
from tasks import file_name
from tasks.config.base import (
    ConfigError,
    ModelOptions,
    RegistryOptions,
    TrainingOptions,
    check_common,
    flag,
    option,
    override,
)

TRANSFORM_FIELDS = ("transform", "difference", "window_norm", "baseline")
# With this many series or more, a global model's validation and test parts default to one horizon of each series
# (each part still holds as many forecast origins): the network trains on the most recent data, as M4 scores it
PANEL_SERIES = 100
PANEL_BATCHES = 160  # batches per epoch of a global model: early stopping looks often (docs/BENCHMARKS.md, M4)
LR = (3e-3, 6e-3)  # --lr 0: one series' learning rate, and a global model's (batches 8 times larger; BENCHMARKS, M4)
KEPT = (1, 2)  # --ensemble-candidates 0: one series' (the best), a global model's (docs/BENCHMARKS.md, M4)
# a runner-up's settings join the ensemble only if it scored within 5 % of the best: a member clearly worse on
# validation would pull the average its way
NEAR_BEST = 1.05
PART_SIZES = (0.1, 0.2)  # the validation and test fractions of one series, and of panels of fewer series
# --lookback 0 with --id-column, in seasons: the longer where it leaves out no series the shorter keeps (a longer
# context forecasts M4 Hourly better, docs/BENCHMARKS.md), else the shorter (a week of hourly data)
SEASONS = (7, 10)


def names(text: str) -> list[str]:
    """A comma-separated option's items: "a, b," -> ["a", "b"]."""
    return [c.strip() for c in text.split(",") if c.strip()]


@dataclass
class SeriesOptions:
    title = "data"  # where the series comes from and how its file is read
    source: str = option("sine", "where the series comes from",
                         ("sine", "sin-cos", "arithmetic", "trend-season", "file"))
    data: str = option("", "CSV or Parquet file (with --source file): a path or an fsspec URL, s3://, https://, ...")
    id_column: str = option("", "long-format --data (id, time, value rows): train one global network on the "
                            "windows of every series of this column, each window normalised by itself")
    sha256: str = option("", "expected sha256 of the --data file; the run stops if it differs")
    time_column: str = option("", "time column; default: the first column that parses as dates")
    value_column: str = option("", "target column; default: the only numeric column left")
    covariate_columns: str = option("", "comma-separated past covariates fed beside the target")
    future_covariate_columns: str = option("", "comma-separated covariates known for the horizon too (price, promo)")
    calendar: bool | None = option(None, "calendar features made from the time column for history and horizon: "
                                   "hour of day, day of week, month, ... as the frequency allows; default: --auto "
                                   "tries with and without when the time column holds dates")
    static_columns: str = option("", "comma-separated per-series attributes with --id-column (store type, region, "
                                 "size), one value per series: text one-hot (a learnt embedding), numbers scaled")
    holidays: str = option("", "comma-separated country codes (US,DE): a public-holiday flag among the calendar "
                           "features (implies --calendar)")
    max_gap: int = option(3, "longest run of missing time steps to interpolate; longer gaps are refused")
    length: int = option(1200, "points in a generated series (sine, sin-cos, arithmetic, trend-season)")


@dataclass
class WindowOptions:
    title = "windows and transforms"  # how the series is split, transformed and cut into windows
    lookback: int = option(0, f"input window length L; 0 = 24 for one series; with --id-column {SEASONS[1]} "
                           f"seasons, or {SEASONS[0]} (a week of hourly data) where {SEASONS[1]} would leave out "
                           f"series too short for it that {SEASONS[0]} keeps")
    horizon: int = option(1, "steps forecast at once, H (direct multi-step)")
    stride: int = option(1, "step between training windows")
    val_size: float = option(0.0, "fraction of each series (after train) for validation, early stopping, --auto and "
                             f"--intervals; 0 = {PART_SIZES[0]}, or one horizon of each series with --id-column and "
                             f"{PANEL_SERIES}+ series")
    test_size: float = option(0.0, f"fraction of each series at the end for the backtest; 0 = {PART_SIZES[1]}, or the "
                              f"last horizon of each series with --id-column and {PANEL_SERIES}+ series")
    season_length: int = option(0, "season for MASE and seasonal naive; 0 = from the data (sine period, frequency)")
    scaler: str = option("standard", "scikit-learn scaler fitted on the training part only",
                         ("standard", "minmax", "none"))
    transform: str = option("none", "target transform, inverted on every forecast (log: positive series only)",
                            ("none", "log"))
    difference: str = option("none", "difference the target inputs; each forecast step is then learnt as its "
                             "change from the last value (first) or from the value one season back (seasonal)",
                             ("none", "first", "seasonal"))
    window_norm: str = option("none", "RevIN-style: centre each input window on its own last value or mean and "
                              "divide by its own spread (level: the target by its mean absolute value, so errors "
                              "count relative to the level; after --transform log: centred on its mean log, not "
                              "divided), de-normalise the forecast the same way",
                              ("none", "last", "mean", "level"))
    baseline: str = option("none", "the network learns the correction to this forecast",
                           ("none", "naive", "seasonal-naive"))
    auto: bool = option(True, "choose --transform, --difference, --window-norm and --baseline by validation "
                        "MASE (OWA with --id-column) among a few candidates (the run logs what it chose and why); "
                        "--no-auto to set them")


def parse_levels(name: str, text: str) -> list[float]:
    """``--NAME 0.1,0.9``'s numbers, each strictly between 0 and 1."""
    try:
        levels = [float(q) for q in text.split(",") if q.strip()]
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    bad = [q for q in levels if not 0 < q < 1]
    if bad:
        raise ConfigError(f"--{name} must lie strictly between 0 and 1, got {sorted(bad)}")
    return levels


@dataclass
class ForecasterOptions(ModelOptions):
    """The forecaster's own model options: quantiles and ensemble."""
    bidirectional: bool = option(False, "read the input window both ways")
    patch: int = option(0, "input steps the network reads per recurrent step: the window in segments of P steps "
                        "(SegRNN), so a long lookback costs L/P steps; 0 = 1 for one series, the season with "
                        "--id-column")
    quantiles: str = option("", "comma-separated quantiles, e.g. 0.1,0.5,0.9: trained with pinball loss, one "
                            "q<level> column each beside forecast (the median, always included)")
    intervals: str = option("", "comma-separated levels, e.g. 0.8,0.95: conformal prediction intervals around the "
                            "forecast, calibrated per horizon step on validation errors; columns lo<level>, "
                            "hi<level>")
    ensemble: int = option(3, "train K members (seeds seed, seed+1, ...) and register one model averaging them")
    ensemble_cells: str = option("", "comma-separated cells the ensemble members take in turn (default: --cell)")
    ensemble_candidates: int = option(0, "with --auto: the members take in turn the settings of the N candidates "
                                      "with the lowest validation scores, those within "
                                      f"{round((NEAR_BEST - 1) * 100)} %% of the best (their networks trained by "
                                      f"--auto kept as members); 0 = {KEPT[0]} for one series, {KEPT[1]} with "
                                      "--id-column")


@dataclass
class ForecasterTraining(TrainingOptions):
    """The forecaster's own training options: the moving average and the learning-rate plateau."""
    batch_size: int = override(TrainingOptions, "batch_size", 0,
                               "windows per gradient step; 0 = 32 for one series, 256 with --id-column")
    lr: float = override(TrainingOptions, "lr", 0.0, f"AdamW learning rate; 0 = {LR[0]:g} for one series, {LR[1]:g} "
                         "with --id-column (its batches are 8 times larger)")
    ema: float = option(0.98, "per-step decay of an exponential moving average of the weights; the average is "
                        "what is validated and registered (0 = off)")
    loss: str = option("auto", "training loss in network units: mse, or mae (learns the median, which sMAPE and "
                       "MASE reward), or owa: mae with each step weighted as M4's OWA counts its error (half as a "
                       "share of the actual value over seasonal naive's in-sample sMAPE, half over the window's "
                       "seasonal-naive error); auto = mse for one series; with --id-column owa in log space "
                       "(--transform log), else mae; with --quantiles: pinball", ("auto", "mse", "mae", "owa"))
    minutes: float = option(0.0, "a time budget for the whole model: --auto's candidates train in its first third, "
                            "the --ensemble members in the rest, group after group, each until early stopping or the "
                            "budget ends it (not --epochs); members that do not fit are left out and the run says how "
                            "many fitted (0 = by --epochs)")
    lr_patience: int = option(3, "epochs without a better validation loss before the learning rate is halved "
                              "(0 = constant)")
    batches_per_epoch: int = option(0, "training batches per epoch, drawn at random each epoch from a shuffled pass "
                                    "over the training windows; 0 = a whole pass for one series, at most "
                                    f"{PANEL_BATCHES} with --id-column, so that early stopping and the learning-rate "
                                    "plateau look at validation as often on 400 series as on 40 (a number over "
                                    "a pass's batches: a whole pass)")


@dataclass
class TimeSeriesConfig(RegistryOptions, ForecasterTraining, ForecasterOptions, WindowOptions, SeriesOptions):
    """The time-series flow's config: its bases' fields in reverse order (data, windows, model, training, ...)."""

    def __post_init__(self):
        self.lr = self.lr or LR[self.panel]
        if not self.panel:  # one series: the automatic settings need no data
            self.lookback, self.patch, self.batch_size = self.lookback or 24, self.patch or 1, self.batch_size or 32
            self.loss = self.resolved_loss()
            self.val_size, self.test_size = self.parts(few=True)
        check_common(self, positive=("horizon", "stride", "length", "ensemble"),
                     non_negative=("lookback", "patch", "batch_size", "ensemble_candidates", "batches_per_epoch",
                                   "max_gap", "season_length", "lr_patience", "minutes"),
                     part_sizes=("val_size", "test_size"), probabilities=("ema",))
        if self.source == "file" and not self.data:
            raise ConfigError("--source file needs --data PATH_OR_URL")
        if (self.data or self.future_covariates) and self.source != "file":
            raise ConfigError(f"{'--data' if self.data else '--future-covariate-columns'} is only read with --source "
                              f"file (got --source {self.source})")
        if self.id_column:
            self._check_panel()
        elif self.statics:
            raise ConfigError("--static-columns needs --id-column: attributes tell the series of a global model apart")
        self._check_calendar()
        chosen = [f for f in TRANSFORM_FIELDS if getattr(self, f) != "none"]
        if self.auto and chosen:
            raise ConfigError(f"{flag(chosen[0])} {getattr(self, chosen[0])} is chosen by --auto (the default); "
                              f"add --no-auto to set it yourself")
        if self.ensemble_candidates > 1 and not self.auto:
            raise ConfigError(f"--ensemble-candidates {self.ensemble_candidates} keeps --auto's best candidates: "
                              "drop --no-auto or --ensemble-candidates")
        for cell in self.member_cells:
            if cell not in CELL_NAMES:
                raise ConfigError(f"--ensemble-cells: {cell!r} is not one of {', '.join(CELL_NAMES)}")
        if self.loss == "owa" and self.quantiles:
            raise ConfigError("--loss owa weighs a point forecast's errors; --quantiles trains the pinball loss: "
                              "drop one")
        self.quantile_levels, self.interval_levels  # noqa: B018 - parses, so a bad list stops here

    def _check_panel(self) -> None:
        """What a global model over many series cannot take."""
        if self.source != "file":
            raise ConfigError("--id-column needs --source file --data LONG_FORMAT_FILE")
        if self.covariates:
            raise ConfigError("--covariate-columns cannot be used with --id-column: a global model reads covariates "
                              "known ahead (--future-covariate-columns, --calendar, --static-columns)")
        if not self.auto and self.window_norm == "none":
            raise ConfigError("--id-column trains series of different scales together: with --no-auto set "
                              "--window-norm last or mean")
        if self.difference != "none":
            raise ConfigError(f"--id-column takes no --difference (got {self.difference}); --window-norm and "
                              "--baseline make series comparable")

    def _check_calendar(self) -> None:
        if self.countries:
            if self.calendar is False:
                raise ConfigError("--holidays is a calendar feature: drop --no-calendar")
            self.calendar = True
            from rnn_models.calendar import check_countries  # the holidays library: only when asked for
            try:
                check_countries(self.countries)
            except ValueError as e:
                raise ConfigError(f"--holidays: {e}") from None
        if self.calendar and self.source != "file":
            raise ConfigError(f"--calendar needs dates: read them with --source file (got --source {self.source})")

    @property
    def countries(self) -> list[str]:
        return [c.upper() for c in names(self.holidays)]

    def settled(self, season_length: int, series: int, lengths: Sequence[int]) -> TimeSeriesConfig:
        """The config with --id-column's automatic settings (their help says which), once the season, the
        number of series in the file and the lengths of those trained on are known; the calendar features off
        unless asked for or left to --auto. With PANEL_SERIES or more series a part of 0 stays 0:
        Split.by_fraction gives it one horizon."""
        m = season_length if season_length > 1 else 0
        val_size, test_size = self.parts(few=series < PANEL_SERIES)
        cfg = replace(self, val_size=val_size, test_size=test_size,
                      loss=self.loss if self.auto else self.resolved_loss(), batch_size=self.batch_size or 256,
                      batches_per_epoch=self.batches_per_epoch or PANEL_BATCHES,
                      calendar=self.calendar if self.auto else bool(self.calendar))
        lookback = self.lookback or (cfg.seasons_lookback(m, lengths) if m else 24)
        return replace(cfg, lookback=lookback, patch=self.patch or (m if m and lookback % m == 0 else 1))

    def seasons_lookback(self, m: int, lengths: Sequence[int]) -> int:
        """SEASONS[1] seasons of ``m`` steps, unless that leaves out series of ``lengths`` that SEASONS[0] keeps
        (or none holds either: the error then names the shorter)."""
        short, long = (k * m for k in SEASONS)
        kept = [sum(self.train_windows(n, lookback) >= 1 for n in lengths) for lookback in (short, long)]
        return long if kept[1] == kept[0] > 0 else short

    def train_windows(self, n: int, lookback: int | None = None) -> int:
        """Training windows of a series of ``n`` steps, split by the config's parts."""
        split = Split.by_fraction(n, self.val_size, self.test_size, self.horizon)
        return len(window_origins(0, split.train_end, lookback or self.lookback, self.horizon, self.stride))

    def resolved_loss(self) -> str:
        """--loss auto: mse for one series; for a global model's settings (--auto's candidates each resolve their
        own) owa where it forecasts in log space, the step weights bounded there (each is the share of the level
        one network unit decodes to), unless --quantiles trains the pinball loss; mae otherwise, where an actual
        value near zero would weigh without bound."""
        if self.loss != "auto":
            return self.loss
        if not self.panel:
            return "mse"
        return "owa" if self.transform == "log" and not self.quantiles else "mae"

    @property
    def trained_loss(self) -> str:
        """What training minimises: the pinball loss with --quantiles, else --loss."""
        return "pinball" if self.quantile_levels else self.loss

    def parts(self, few: bool) -> tuple[float, float]:
        """--val-size and --test-size, a 0 resolved: PART_SIZES for one series or a few, else 0 (one horizon each)."""
        return self.val_size or (PART_SIZES[0] if few else 0.0), self.test_size or (PART_SIZES[1] if few else 0.0)

    @property
    def panel(self) -> bool:
        """One global network over the many series of a long-format file."""
        return bool(self.id_column)

    @property
    def kept_candidates(self) -> int:
        """How many of --auto's best candidates' settings the members take in turn (1 without --auto)."""
        return (self.ensemble_candidates or KEPT[self.panel]) if self.auto else 1

    @property
    def member_cells(self) -> list[str]:
        """The cell of each ensemble member, in turn from --ensemble-cells."""
        cells = names(self.ensemble_cells) or [self.cell]
        return [cells[i % len(cells)] for i in range(self.ensemble)]

    @property
    def label(self) -> str:
        """The model's name in backtest tables: rnnflow-lstm, rnnflow-lstm+gru for a mixed ensemble."""
        return "rnnflow-" + "+".join(dict.fromkeys(self.member_cells))

    @property
    def quantile_levels(self) -> tuple[float, ...]:
        """Sorted quantile levels with the median added; () for point forecasts."""
        levels = parse_levels("quantiles", self.quantiles)
        return tuple(sorted({*levels, 0.5})) if levels else ()

    @property
    def interval_levels(self) -> tuple[float, ...]:
        """The conformal intervals' levels, sorted; () for none."""
        return tuple(sorted(set(parse_levels("intervals", self.intervals))))

    covariates = property(lambda self: names(self.covariate_columns))
    statics = property(lambda self: names(self.static_columns))
    future_covariates = property(lambda self: names(self.future_covariate_columns))

    @property
    def registered_name(self) -> str:
        stem = self.source if self.source != "file" else Path(file_name(self.data)).stem or "series"
        return self.model_name or f"{stem}-forecaster"
