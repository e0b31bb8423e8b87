"""The training steps: device choice, seeding, checkpoints, and the lean loop from ``rnn_models``."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rnn_models import forecasting
from rnn_models.checkpoint import Checkpoint
from rnn_models.forecasting import ForecastObjective, ForecastPipeline, PinballObjective
from rnn_models.grouped import available as grouped_available
from rnn_models.grouped import fit_grouped, groupable_shape
from rnn_models.grouped import turned_off as grouped_turned_off
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import FitResult, TrainConfig, fit, resolve_device
from rnn_models.transforms import Chain
from tasks import run_logger
from tasks.config import CharLMFlowConfig, TimeSeriesConfig, project
from tasks.features import Batches, Data, Windows, batches, scale_and_window
from tasks.panel import PanelData

if TYPE_CHECKING:
    from tasks.selection import Selection


@dataclass
class Trained:
    """What leaves the training task: the pipeline on the CPU, never a model on a device."""

    forecaster: ForecastPipeline
    fits: list[FitResult]  # one per ensemble member
    device: str

    @property
    def first_fit(self) -> FitResult:
        """The first member's training, the one whose curves the run shows."""
        return self.fits[0]

    @property
    def train_seconds(self) -> float:
        """Every member's training (a member kept from --auto counts its own training)."""
        return sum(f.train_seconds for f in self.fits)

    @property
    def val_loss(self) -> float:
        return sum(f.best_val_loss for f in self.fits) / len(self.fits)

    def pipeline(self) -> ForecastPipeline:
        return self.forecaster


@dataclass
class Settings:
    """A forecaster's settled config, and --auto's choice that settled it (None without --auto):
    what ``tasks.selection.choose_settings`` gives the training step."""

    cfg: TimeSeriesConfig
    selection: Selection | None = None
    deadline: float | None = None  # with --minutes: when (time.time()) the model's training must end
    # --ensemble-candidates: the runners-up's settings the members take in turn after ``cfg``'s, each with the
    # network --auto trained with them on the model's data (None: trained anew)
    runners_up: list[tuple[TimeSeriesConfig, Trained | None]] = field(default_factory=list)


@functools.cache
def init_lock() -> threading.Lock:
    """Weight initialisation draws from torch's global RNG: trials running in threads of one
    process take turns so each seed still gives the same weights. (A function, not a global
    lock, so that tasks shipped to Dask workers do not try to pickle a lock.)"""
    return threading.Lock()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # seeds CUDA too; CPU kernels are deterministic, so same seed, same weights


def open_checkpoint(directory: Path | None, cfg: TimeSeriesConfig | CharLMFlowConfig, what: str
                    ) -> Checkpoint | None:
    """The checkpoint of one training in ``directory``: what an earlier attempt left is resumed
    from (and said), or dropped with ``--no-resume``. None: no checkpoints."""
    if directory is None:
        return None
    ckpt = Checkpoint(directory, cfg.checkpoint_minutes * 60)
    if ckpt.exists() and not cfg.resume:
        ckpt.remove()
    elif ckpt.exists():
        meta = ckpt.meta()
        of = "" if meta["epochs"] >= EPOCHS_UNBOUNDED else f" of {meta['epochs']}"
        within = f", {meta['step']} batches into epoch {meta['epoch'] + 1}" if meta["step"] else ""
        done = "already trained" if meta["finished"] else f"resuming from epoch {meta['epoch']}{of}{within}"
        run_logger().info("%s%s (checkpoint %s)", what, done, ckpt.directory)
    return ckpt


EPOCHS_UNBOUNDED = 1_000_000  # with --minutes the budget, not the epoch count, ends training


def train_forecaster(data: Data, windows: Windows, settings: Settings, checkpoints: Path | None = None) -> Trained:
    """Train the config's network, or its ``--ensemble`` members (seed + i), on one series or on
    the windows of many. ``settings.selection``'s network, trained by --auto on these windows
    with this config, is kept as member 1. ``checkpoints``: a folder for each member's checkpoint
    (member-1, ...), resumed from if there."""
    return train_ensembles({"": forecaster_ensemble(data, windows, settings, checkpoints)})[""]


@dataclass
class Network:
    """One forecaster network to train (``train_networks``): how the log names it, its cell,
    config, seed, data and checkpoint folder."""

    name: str  # "member 2/3", "window-norm last", "trial 4: member 1/3"; "" for a run's only network
    cell: str
    cfg: TimeSeriesConfig
    seed: int
    batches: Batches
    checkpoints: Path | None
    deadline: float | None = None  # --minutes: when the budget it trains in ends
    optional: bool = False  # an ensemble member after the first: left out once the budget is spent

    @property
    def device(self) -> str:
        return resolve_device(self.cfg.device)

    def train_config(self) -> TrainConfig:
        """How ``fit`` trains it: with --minutes, until early stopping or the time left to its
        deadline when it starts (at least a twentieth of the budget), whatever --epochs says."""
        if self.deadline is None:
            return project(TrainConfig, self.cfg, device=self.device, seed=self.seed, minutes=0.0)
        left = max((self.deadline - time.time()) / 60, self.cfg.minutes / 20)
        return project(TrainConfig, self.cfg, device=self.device, seed=self.seed, minutes=left,
                       epochs=EPOCHS_UNBOUNDED)

    def left_out(self) -> bool:
        return self.optional and self.deadline is not None and time.time() >= self.deadline

    @property
    def who(self) -> str:
        """The log lines' prefix."""
        return f"{self.name}: " if self.name else ""

    def group_key(self) -> tuple:
        """What networks trained as one batched network share: the network itself (cell, sizes,
        head), the device, one optimizer step for all (as many training windows, of one length, in
        batches of one size, as many per epoch), the objective, and whether gradients are clipped."""
        cfg, b = self.cfg, self.batches
        return (astuple(member_config(self.cell, cfg, b.input_size, b.future_size)), self.device, b.length,
                b.sizes[0], cfg.batch_size, cfg.batches_per_epoch, cfg.loss, cfg.quantile_levels, bool(cfg.clip))


@dataclass
class Ensemble:
    """One model's networks to train (its ensemble's members; one for an ``--auto`` candidate) and
    how they become its ``Trained`` once trained (``finish``, given their results in order)."""

    networks: list[Network]
    finish: Callable[[list[tuple[Forecaster, FitResult]]], Trained]


def train_ensembles(models: dict[Hashable, Ensemble]) -> dict[Hashable, Trained]:
    """Each model trained. The networks of all of them go to ``train_networks`` at once, so those
    of one shape train as one batched network whichever model they belong to: an ensemble's
    members, --auto's candidates, the models of a sweep's trials on one worker."""
    results = iter(train_networks([net for e in models.values() for net in e.networks]))
    return {key: e.finish([next(results) for _ in e.networks]) for key, e in models.items()}


@dataclass
class MemberSettings:
    """Settings an ensemble's members take in turn: the config, its windows as the loop reads them,
    their transforms, and the network --auto trained with them, kept as their first member (or None)."""

    cfg: TimeSeriesConfig
    batches: Batches
    chain: Chain | None = None
    first: Trained | None = None


def ensemble(plans: list[MemberSettings], checkpoints: Path | None, name: str,
             make: Callable[[list[Forecaster], list[FitResult], list[MemberSettings]], Trained],
             deadline: float | None = None) -> Ensemble:
    """The first plan's config's ``--ensemble`` members, which take the plans' settings in turn
    (member i: plan i mod n, seed + i div n, the config's cells in turn); a plan's ``first``
    network (trained by --auto) is kept as its first member where its cell is that member's.
    ``make`` builds the model from the members, their results and their plans. ``deadline``: the
    --minutes budget's end, after which members not yet trained, beyond the first, are left out."""
    cfg, n = plans[0].cfg, len(plans)
    K, cells = cfg.ensemble, cfg.member_cells
    slots: list[tuple[Forecaster, FitResult] | Network] = []
    for i in range(K):
        plan, who = plans[i % n], label(name, f"member {i + 1}/{K}" if K > 1 else "")
        if i < n and plan.first is not None and cells[i] == cells[0]:
            run_logger().info("%s%s trained by --auto%s, kept", f"{who}: " if who else "", cells[i],
                              f" ({plan.chain.describe()})" if n > 1 and plan.chain else "")
            slots.append((plan.first.forecaster.members[0], plan.first.first_fit))
        else:
            slots.append(Network(who, cells[i], plan.cfg, plan.cfg.seed + i // n, plan.batches,
                                 checkpoints and checkpoints / f"member-{i + 1}", deadline, optional=i > 0))

    def finish(results: list[tuple[Forecaster, FitResult] | None]) -> Trained:
        trained = iter(results)  # the networks' results, in the slots' order
        done = [(next(trained) if isinstance(slot, Network) else slot, plans[i % n]) for i, slot in enumerate(slots)]
        done = [(r, plan) for r, plan in done if r is not None]  # members left out by --minutes dropped
        return make([r[0].cpu() for r, _ in done], [r[1] for r, _ in done], [plan for _, plan in done])

    return Ensemble([s for s in slots if isinstance(s, Network)], finish)


def label(*parts: str) -> str:
    """How the log names a network: ``label("trial 3", "member 2/3")`` is "trial 3: member 2/3"."""
    return ": ".join(p for p in parts if p)


def forecaster_ensemble(data: Data, windows: Windows, settings: Settings, checkpoints: Path | None = None,
                        name: str = "") -> Ensemble:
    """The networks of the config's model on ``windows`` (``train_forecaster``), named ``name`` in
    the log (an --auto candidate, a sweep's trial)."""
    cfg, device = settings.cfg, resolve_device(settings.cfg.device)
    meta = model_meta(data, cfg, windows)
    own = [(cfg, windows, settings.selection and settings.selection.trained)]
    own += [(c, scale_and_window(data, windows.split, c), first) for c, first in settings.runners_up]
    plans = [MemberSettings(c, batches(data, w, c, device), w.chain, first) for c, w, first in own]
    return ensemble(plans, checkpoints, name, lambda members, fits, of: Trained(
        ForecastPipeline(members, [plan.chain for plan in of], meta), fits, device), settings.deadline)


def model_meta(data: Data, cfg: TimeSeriesConfig, windows: Windows) -> dict:
    """What the registered model says of its data: what a request must hold, where it came from."""
    meta = {"lookback": cfg.lookback, "value_column": data.value_column, "covariate_columns": data.covariate_columns,
            "frequency": data.freq, "season_length": data.season_length, "trained_on": data.source,
            "data_sha256": data.sha256}
    if windows.future_scale:
        meta.update(future_covariate_columns=data.future_columns, future_scale=windows.future_scale.to_list()[0])
    if data.calendar_columns:  # made from the time column at predict time
        meta.update(time_column=data.time_column, calendar={"columns": data.calendar_columns,
                                                            "countries": data.countries})
    if isinstance(data, PanelData):
        meta.update(id_column=data.id_column, time_column=data.time_column, series=len(data))
        if data.statics:  # encoded from a request's attribute columns at predict time
            meta.update(statics=data.statics.to_dict())
    return meta


def train_networks(networks: list[Network]) -> list[tuple[Forecaster, FitResult] | None]:
    """Each network trained, in order (None: left out, its --minutes budget spent). On the CPU, for
    the shapes it covers, through the grouped operation (``rnn_models.grouped``, faster than
    ``nn.LSTM`` even for one network), those of one shape (``Network.group_key``) together as one
    batched network, at most ``GROUP_PER_THREAD`` per thread at a time; the rest one after another
    through ``nn.LSTM`` and autograd."""
    done: dict[int, tuple[Forecaster, FitResult] | None] = {}
    groups: dict[tuple, list[int]] = {}
    for i, net in enumerate(networks):
        groups.setdefault(net.group_key(), []).append(i)
    for alike in groups.values():
        for which in batched_groups(networks, alike):
            train_group(networks, [i for i in which if not skipped(networks, i, done)], done)
    for i, net in enumerate(networks):
        if i not in done and not skipped(networks, i, done):
            log_start(net)
            done[i] = train_member(net.cell, net.cfg, net.seed, net.device, net.batches,
                                   open_checkpoint(net.checkpoints, net.cfg, net.who), net.train_config())
            log_member(net.who, done[i][1])
    return [done[i] for i in range(len(networks))]


def batched_groups(networks: list[Network], alike: list[int]) -> list[list[int]]:
    """``alike`` (networks of one shape, by index) in the groups that train as one batched network,
    as near equal in size as can be; none where the grouped operation cannot train them."""
    first = networks[alike[0]]
    refusal = why_not_grouped(first.cell, first.cfg, first.device, first.batches.input_size,
                              first.batches.future_size)
    if refusal:
        if len(alike) > 1:
            run_logger().info("%s train one by one: %s", ", ".join(networks[i].name for i in alike), refusal)
        return []
    n = -(-len(alike) // (GROUP_PER_THREAD * torch.get_num_threads()))
    return [alike[g * len(alike) // n:(g + 1) * len(alike) // n] for g in range(n)]


def train_group(networks: list[Network], which: list[int], done: dict) -> None:
    """The networks ``which`` trained together as one batched network, their results put in ``done``."""
    if not which:
        return
    nets = [networks[i] for i in which]
    if len(nets) > 1:
        run_logger().info("%s: training %s together as one batched network on %s: %d train / %d validation "
                          "windows each", ", ".join(net.name for net in nets), nets[0].cell, nets[0].device,
                          *nets[0].batches.sizes)
    else:
        log_start(nets[0])
    done.update(zip(which, fit_together(nets) or [], strict=False))


def skipped(networks: list[Network], i: int, done: dict) -> bool:
    """Whether network ``i`` is left out (``done[i]`` None): an optional one, its budget spent."""
    if not networks[i].left_out():
        return False
    run_logger().info("%sleft out: the --minutes budget was spent", networks[i].who)
    done[i] = None
    return True


# more networks per thread in one group gain nothing on this CPU and, on one thread, start to lose
# to cache misses (docs/BENCHMARKS.md, "A sweep's trials trained together")
GROUP_PER_THREAD = 4


def log_start(net: Network) -> None:
    run_logger().info("%straining %s on %s: %d train / %d validation windows", net.who, net.cell, net.device,
                      *net.batches.sizes)


def why_not_grouped(cell: str, cfg: TimeSeriesConfig, device: str, input_size: int, future_size: int = 0) -> str:
    """Why networks of ``cfg`` with ``cell`` cannot train as one batched network here; '' if they can."""
    if device != "cpu":
        return "the grouped operation runs on the CPU"
    # forecasters train in float32 on the CPU
    if not groupable_shape(member_config(cell, cfg, input_size, future_size)):
        return "not a shape the grouped operation covers (rnn_models.grouped.groupable)"
    if not grouped_available():
        return ("the grouped operation is turned off (RNNFLOW_GROUPED=0)" if grouped_turned_off()
                else "the grouped operation could not be built")
    return ""


def fit_together(networks: list[Network]) -> list[tuple[Forecaster, FitResult]] | None:
    """Networks of one shape trained as one batched network (``rnn_models.grouped.fit_grouped``;
    ``why_not_grouped`` must have said yes), each one's result logged. None, said in the log, where
    the checkpoints of an interrupted run stopped at different places."""
    ckpts = [open_checkpoint(net.checkpoints, net.cfg, net.who) for net in networks]
    models = [new_member(net.cell, net.cfg, net.seed, net.device, net.batches.input_size, net.batches.future_size)
              for net in networks]
    results = fit_grouped(models, [net.batches.train for net in networks], [net.batches.val for net in networks],
                          forecast_objective(networks[0].cfg),
                          [net.train_config() for net in networks], ckpts)
    if results is None:
        run_logger().info("(not as one batched network: their checkpoints stopped at different places; one by one)")
        return None
    for net, result in zip(networks, results, strict=True):
        log_member(net.who, result)
    return list(zip(models, results, strict=True))


def log_member(who: str, result: FitResult) -> None:
    run_logger().info("%sbest epoch %d of %d, validation loss %.5f, %.1f s (%.0f windows/s)", who, result.best_epoch,
                      len(result.history), result.best_val_loss, result.train_seconds, result.samples_per_second)
    if result.diverged:
        run_logger().warning("%s%s", who, result.divergence)


def new_member(cell: str, cfg: TimeSeriesConfig, seed: int, device: str, input_size: int,
               future_size: int = 0) -> Forecaster:
    """A network of the config's shape with ``cell``, its weights drawn from ``seed``."""
    with init_lock():
        seed_everything(seed)
        return Forecaster(member_config(cell, cfg, input_size, future_size)).to(device)


def member_config(cell: str, cfg: TimeSeriesConfig, input_size: int, future_size: int = 0) -> ForecasterConfig:
    """The network of ``cfg`` with ``cell`` for windows of ``input_size`` features, ``future_size`` of
    them known ahead (the data's: --future-covariate-columns and calendar features)."""
    return project(ForecasterConfig, cfg, cell=cell, input_size=input_size, quantiles=cfg.quantile_levels,
                   future_size=future_size)


def forecast_objective(cfg: TimeSeriesConfig) -> ForecastObjective:
    return (PinballObjective(cfg.quantile_levels) if cfg.trained_loss == "pinball"
            else getattr(forecasting, f"{cfg.trained_loss}_objective"))  # mse, mae, owa


def train_member(cell: str, cfg: TimeSeriesConfig, seed: int, device: str, batches: Batches,
                 checkpoint: Checkpoint | None = None, tcfg: TrainConfig | None = None) -> tuple[Forecaster, FitResult]:
    """One network of the config's shape with ``cell``, trained on ``batches`` (as ``tcfg`` says, if given)."""
    model = new_member(cell, cfg, seed, device, batches.input_size, batches.future_size)
    tcfg = tcfg or project(TrainConfig, cfg, device=device, seed=seed, minutes=0.0)
    result = fit(model, batches.train, batches.val, forecast_objective(cfg), tcfg, checkpoint=checkpoint)
    return model, result
