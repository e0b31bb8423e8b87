"""The flows' configurations: each one flat dataclass composed of pieces (``ModelOptions``, ...), at
once the flow's parameters, its command-line options (grouped by piece in ``--help``) and its MLflow
params. Lower layers' configs are projected from it by field name (``project``)."""

from __future__ import annotations

import hashlib
import math
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from rnn_models import CELL_NAMES, PRECISIONS
from tasks import CORPORA, file_name


class ConfigError(ValueError):
    """A parameter has an impossible value; raised before any data is read or model trained."""


def option(default, help: str, choices: tuple[str, ...] | None = None):
    """A config field with its command-line help (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


def override(piece, name: str, default, help: str = ""):
    """``piece``'s option ``name`` with another default, keeping its help unless given a new one."""
    metadata = piece.__dataclass_fields__[name].metadata
    return option(default, help or metadata["help"], metadata["choices"])


TRANSFORM_FIELDS = ("transform", "difference", "window_norm", "baseline")
BUNDLED_CORPUS = CORPORA / "timemachine.txt"
MAX_NAME = 200  # characters in a registered model's name
BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


@dataclass
class ModelOptions:
    title = "model"  # the group in --help (no annotation: not a field); projected onto ForecasterConfig, CharLMConfig
    cell: str = option("lstm", "recurrent cell", CELL_NAMES)
    hidden_size: int = option(64, "hidden units per layer (and direction)")
    num_layers: int = option(1, "stacked recurrent layers")
    dropout: float = option(0.0, "dropout between stacked layers")


@dataclass
class TrainingOptions:
    title = "training"  # projected onto rnn_models.training.TrainConfig
    epochs: int = option(40, "maximum epochs")
    batch_size: int = option(32, "windows per gradient step")
    lr: float = option(3e-3, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay")
    clip: float = option(1.0, "max gradient norm; recurrent nets explode without it (0 = off)")
    patience: int = option(6, "epochs without a better validation loss before stopping (0 = never)")
    device: str = option("auto", "auto takes CUDA (with bf16 autocast) when present", ("auto", "cpu", "cuda"))
    seed: int = option(0, "seed for weights, shuffling, generated data and samples: same seed, same result on CPU")
    resume: bool = option(True, "go on from the checkpoint an interrupted run of the same config and data left "
                          "(checkpoints/ or $RNNFLOW_CHECKPOINTS); --no-resume starts afresh")
    checkpoint_minutes: float = option(5.0, "write a checkpoint every this many minutes inside an epoch too, not only "
                                       "at its end (0 = at epoch ends only)")


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
    max_gap: int = option(3, "longest run of missing time steps to interpolate; longer gaps are refused")
    length: int = option(1200, "points in a generated series (sine, sin-cos, arithmetic, trend-season)")


@dataclass
class WindowOptions:
    title = "windows and transforms"  # how the series is split, transformed and cut into windows
    lookback: int = option(0, "input window length L; 0 = 24 for one series, 7 seasons with --id-column (a week "
                           "of hourly data)")
    horizon: int = option(1, "steps forecast at once, H (direct multi-step)")
    stride: int = option(1, "step between training windows")
    val_size: float = option(0.1, "fraction of the series (after train) for validation / early stopping")
    test_size: float = option(0.2, "fraction of the series at the end for the backtest")
    season_length: int = option(0, "season for MASE and seasonal naive; 0 = from the data (sine period, frequency)")
    scaler: str = option("standard", "scikit-learn scaler fitted on the training part only",
                         ("standard", "minmax", "none"))
    transform: str = option("none", "target transform, inverted on every forecast (log: positive series only)",
                            ("none", "log"))
    difference: str = option("none", "difference the target inputs; each forecast step is then learnt as its "
                             "change from the last value (first) or from the value one season back (seasonal)",
                             ("none", "first", "seasonal"))
    window_norm: str = option("none", "RevIN-style: centre each input window on its own last value or mean and "
                              "divide by its own spread, de-normalise the forecast the same way",
                              ("none", "last", "mean"))
    baseline: str = option("none", "the network learns the correction to this forecast",
                           ("none", "naive", "seasonal-naive"))
    auto: bool = option(True, "choose --transform, --difference, --window-norm and --baseline by validation "
                        "MASE among a few candidates (the run logs what it chose and why); --no-auto to set them")


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
    ensemble: int = option(3, "train K members (seeds seed..seed+K-1) and register one model averaging them")
    ensemble_cells: str = option("", "comma-separated cells the ensemble members take in turn (default: --cell)")


@dataclass
class ForecasterTraining(TrainingOptions):
    """The forecaster's own training options: the moving average and the learning-rate plateau."""
    batch_size: int = override(TrainingOptions, "batch_size", 0,
                               "windows per gradient step; 0 = 32 for one series, 256 with --id-column")
    ema: float = option(0.98, "per-step decay of an exponential moving average of the weights; the average is "
                        "what is validated and registered (0 = off)")
    loss: str = option("auto", "training loss in network units: mse, or mae (learns the median, which sMAPE and "
                       "MASE reward); auto = mse for one series, mae with --id-column; with --quantiles: pinball",
                       ("auto", "mse", "mae"))
    lr_patience: int = option(3, "epochs without a better validation loss before the learning rate is halved "
                              "(0 = constant)")


@dataclass
class RegistryOptions:
    title = "registry"  # where the trained model is registered
    model_name: str = option("", "registered model name; default: after the data, <source or file name>-forecaster "
                             "or <corpus file name>-charlm")
    experiment: str = option("timeseries-forecasting", "MLflow experiment")
    registry_retry_minutes: float = option(2.0, "how long to keep retrying, with back-off, a tracking server that "
                                           "stops answering after training; then the trained model is kept on disk "
                                           "for `python -m flows.models register`")

    def to_params(self) -> dict:
        """Every field of the flow config (both end in this piece): its MLflow run's params."""
        return asdict(self)


@dataclass
class TimeSeriesConfig(RegistryOptions, ForecasterTraining, ForecasterOptions, WindowOptions, SeriesOptions):
    """The time-series flow's config: its bases' fields in reverse order (data, windows, model, training, ...)."""

    def __post_init__(self):
        if not self.panel:  # one series: the automatic settings need no data
            self.lookback, self.patch, self.batch_size = self.lookback or 24, self.patch or 1, self.batch_size or 32
            self.loss = "mse" if self.loss == "auto" else self.loss
        check_common(self, positive=("horizon", "stride", "length", "ensemble"),
                     non_negative=("lookback", "patch", "batch_size", "max_gap", "season_length", "lr_patience"),
                     fractions=("val_size", "test_size"), probabilities=("ema",))
        if self.source == "file" and not self.data:
            raise ConfigError("--source file needs --data PATH_OR_URL")
        if (self.data or self.future_covariates) and self.source != "file":
            raise ConfigError(f"{'--data' if self.data else '--future-covariate-columns'} is only read with --source "
                              f"file (got --source {self.source})")
        if self.id_column:
            self._check_panel()
        chosen = [f for f in TRANSFORM_FIELDS if getattr(self, f) != "none"]
        if self.auto and chosen:
            raise ConfigError(f"{flag(chosen[0])} {getattr(self, chosen[0])} is chosen by --auto (the default); "
                              f"add --no-auto to set it yourself")
        for cell in self.member_cells:
            if cell not in CELL_NAMES:
                raise ConfigError(f"--ensemble-cells: {cell!r} is not one of {', '.join(CELL_NAMES)}")
        self.quantile_levels, self.interval_levels  # noqa: B018 - parses, so a bad list stops here

    def _check_panel(self) -> None:
        """What a global model over many series cannot take."""
        if self.source != "file":
            raise ConfigError("--id-column needs --source file --data LONG_FORMAT_FILE")
        if self.covariates or self.future_covariates:
            raise ConfigError(f"{'--covariate-columns' if self.covariates else '--future-covariate-columns'} cannot "
                              "be used with --id-column: the global model reads the value column only")
        if not self.auto and self.window_norm == "none":
            raise ConfigError("--id-column trains series of different scales together: with --no-auto set "
                              "--window-norm last or mean")
        if self.transform == "log" or self.difference != "none":
            raise ConfigError(f"--id-column takes no --transform or --difference (got {self.transform}, "
                              f"{self.difference}); --window-norm and --baseline make series comparable")

    def settled(self, season_length: int) -> TimeSeriesConfig:
        """The config with --id-column's automatic settings (their help says which), once the season is known."""
        m = season_length if season_length > 1 else 0
        lookback = self.lookback or (7 * m if m else 24)
        patch = self.patch or (m if m and lookback % m == 0 else 1)
        return replace(self, lookback=lookback, patch=patch, loss="mae" if self.loss == "auto" else self.loss,
                       batch_size=self.batch_size or 256)

    @property
    def panel(self) -> bool:
        """One global network over the many series of a long-format file."""
        return bool(self.id_column)

    @property
    def member_cells(self) -> list[str]:
        """The cell of each ensemble member, in turn from --ensemble-cells."""
        cells = [c.strip() for c in self.ensemble_cells.split(",") if c.strip()] or [self.cell]
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

    @property
    def covariates(self) -> list[str]:
        return [c.strip() for c in self.covariate_columns.split(",") if c.strip()]

    @property
    def future_covariates(self) -> list[str]:
        return [c.strip() for c in self.future_covariate_columns.split(",") if c.strip()]

    @property
    def registered_name(self) -> str:
        stem = self.source if self.source != "file" else Path(file_name(self.data)).stem or "series"
        return self.model_name or f"{stem}-forecaster"


@dataclass
class CorpusOptions:
    title = "corpus and batching"  # which text, and how it is cleaned and split
    data: str = option("", "UTF-8 text file, a path or an fsspec URL; default: H. G. Wells' The Time Machine in data/")
    sha256: str = option("", "expected sha256 of the corpus file; the run stops if it differs")
    lower: bool = option(True, "lower-case the corpus (and prompts)")
    letters_only: bool = option(False, "d2l-style clean-up: every run of non-letters becomes one space")
    val_fraction: float = option(0.1, "last part of the corpus held out for validation")
    sampling: str = option("sequential", "sequential carries the state across batches (truncated BPTT); "
                           "random draws independent windows", ("sequential", "random"))
    num_steps: int = option(64, "characters per training sequence (BPTT length)")


@dataclass
class CharModelOptions(ModelOptions):
    """The char LM's model: the recipe docs/BENCHMARKS.md measured, characters embedded."""
    hidden_size: int = override(ModelOptions, "hidden_size", 512, "hidden units per layer")
    num_layers: int = override(ModelOptions, "num_layers", 2)
    dropout: float = override(ModelOptions, "dropout", 0.3,
                              "dropout between stacked layers and on the last layer's output")
    input: str = option("embedding", "how characters enter the network", ("embedding", "onehot"))
    embedding_dim: int = option(64, "embedding width (with --input embedding)")
    input_dropout: float = option(0.1, "dropout on the embedded characters, before the first layer")


@dataclass
class CharTraining(TrainingOptions):
    """The char LM's training defaults, and the time budget."""
    epochs: int = override(TrainingOptions, "epochs", 10)
    batch_size: int = override(TrainingOptions, "batch_size", 32, "sequences per gradient step")
    lr: float = override(TrainingOptions, "lr", 4e-3, "AdamW learning rate at the top of its cosine")
    weight_decay: float = override(TrainingOptions, "weight_decay", 0.1)
    warmup: int = option(100, "optimizer steps over which the learning rate rises linearly to --lr (0 = none)")
    patience: int = override(TrainingOptions, "patience", 3)
    minutes: float = option(0.0, "train until this many minutes have passed, whatever --epochs says, the learning "
                            "rate falling on a cosine over them (0 = train by --epochs, the cosine over the epochs)")
    precision: str = option("auto", "the training step's arithmetic: auto = bf16 on CUDA and on CPUs that compute it "
                            "natively (AVX512-BF16, AMX; about 1.7x faster there), float32 on others; validation and "
                            "the registered model run in float32 on CPU", PRECISIONS)


@dataclass
class SampleOptions:
    title = "samples"  # shown while the model trains, and logged with it
    prefixes: str = option("time traveller,the time machine", "comma-separated prompts sampled during training")
    sample_every: int = option(5, "epochs between samples (0 = only at the end)")
    sample_chars: int = option(120, "characters generated per sample")
    temperature: float = option(0.8, "sampling temperature for the samples (0 = greedy)")
    top_k: int = option(0, "sample from the k most likely characters only (0 = all)")


@dataclass
class CharLMFlowConfig(RegistryOptions, SampleOptions, CharTraining, CharModelOptions, CorpusOptions):
    """The char-LM flow's config; its fields read corpus, model, training, samples, registry."""
    experiment: str = override(RegistryOptions, "experiment", "charlm-training")

    def __post_init__(self):
        check_common(self, positive=("batch_size", "num_steps", "embedding_dim", "sample_chars"),
                     non_negative=("sample_every", "top_k", "warmup", "temperature", "minutes"),
                     fractions=("val_fraction",), probabilities=("input_dropout",))
        if not self.prompts:
            raise ConfigError("--prefixes holds no prompt; give at least one non-empty prefix")

    @property
    def prompts(self) -> list[str]:
        return [p for p in self.prefixes.split(",") if p.strip()]

    @property
    def corpus(self) -> str:
        return self.data or str(BUNDLED_CORPUS)

    @property
    def registered_name(self) -> str:
        return self.model_name or f"{Path(file_name(self.corpus)).stem or 'corpus'}-charlm"


def check_common(cfg, positive=(), non_negative=(), fractions=(), probabilities=()) -> None:
    """The checks every flow config shares, with its own fields of each kind; NaN fails every range."""
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"{flag(f.name)}: {getattr(cfg, f.name)!r} is not one of {', '.join(choices)}")
    ranges = [(("epochs", "hidden_size", "num_layers", *positive), "must be at least 1", lambda v: v >= 1),
              (("patience", "weight_decay", "clip", "checkpoint_minutes", "registry_retry_minutes", *non_negative),
               "must be 0 or more", lambda v: 0 <= v < math.inf),
              (("lr",), "must be a positive number", lambda v: 0 < v < math.inf),
              (("dropout", *probabilities), "must be in [0, 1)", lambda v: 0 <= v < 1),
              (fractions, "must be a fraction in (0, 0.5)", lambda v: 0 < v < 0.5)]
    for names, must, within in ranges:
        for name in names:
            if not within(getattr(cfg, name)):
                raise ConfigError(f"{flag(name)} {must}, got {getattr(cfg, name)}")
    check_model_name(cfg.registered_name, given=bool(cfg.model_name))
    if cfg.device.startswith("cuda"):  # said in one line where PyTorch sees no CUDA GPU
        from rnn_models.training import resolve_device  # imports torch: only when a GPU is asked for
        try:
            resolve_device(cfg.device)
        except ValueError as e:
            raise ConfigError(f"--device {cfg.device}: {e}") from None
    if cfg.sha256 and (len(cfg.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in cfg.sha256)):
        raise ConfigError(f"--sha256 must be 64 hex digits, got {cfg.sha256!r}")


def check_model_name(name: str, given: bool) -> None:
    """Refuse, before anything is trained, a name MLflow's registry would refuse or that is not
    printable. It reaches files and Prefect keys only through ``safe_name``."""
    where = "--model-name" if given else f"the model name {name!r} made from --data (give --model-name)"
    problem = ("is blank" if not name.strip() else
               "cannot contain '/' or ':' (MLflow's rule)" if "/" in name or ":" in name else
               "cannot be a path such as '.' or '..' (MLflow's rule)" if posixpath.normpath(name) != name
               or name.startswith("..") else
               "cannot contain control characters" if any(not c.isprintable() for c in name) else
               f"is longer than {MAX_NAME} characters" if len(name) > MAX_NAME else "")
    if problem:
        raise ConfigError(f"{where}: {name!r} {problem}")


def safe_name(name: str) -> str:
    """``name`` in lower-case ASCII letters, digits and dashes, for file names and Prefect keys; with
    8 hex digits of its hash if it held anything else, so distinct names stay distinct."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]
    return slug if slug == name.lower() else f"{slug or 'model'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_value(kind: type, raw, name: str):
    """A field's value from its text, for the command line, sweep grids and logged MLflow params alike.
    Booleans read true/false, yes/no or 1/0 in any case, and nothing else."""
    if kind is bool and not isinstance(raw, bool):
        key = str(raw).strip().lower()
        if key not in BOOLEANS:
            raise ConfigError(f"{flag(name)}: {raw!r} is not a boolean; use true or false")
        return BOOLEANS[key]
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{flag(name)}: {raw!r} is not a valid {kind.__name__}") from None


def project(cls, cfg, **overrides):
    """A lower layer's config ``cls`` from the fields it shares by name with the flow config ``cfg``."""
    shared = {f.name for f in fields(cls)} & {f.name for f in fields(cfg)}
    return cls(**{**{k: getattr(cfg, k) for k in shared}, **overrides})
