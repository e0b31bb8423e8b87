"""Ensemble members trained as one batched network (rnn_models.grouped): the grouped pass equals
each member's own nn.LSTM, grouped training equals training the members one by one, it resumes
from its checkpoints, and the flow's members go through it."""

import logging
from dataclasses import replace

import pytest
import torch

from rnn_models import synthetic
from rnn_models.checkpoint import Checkpoint
from rnn_models.forecasting import PinballObjective, mae_objective, mse_objective, owa_objective
from rnn_models.grouped import GroupedForecasters, available, fit_grouped, groupable
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import TrainConfig, fit, tensor_batches
from rnn_models.windows import make_windows, window_origins
from tasks import training
from tasks.config import TimeSeriesConfig
from tasks.data import generate_series
from tasks.features import Batches, scale_and_window, split_series
from tasks.panel import load_panel
from tasks.selection import apply, choose_settings, train_models
from tasks.training import (
    MemberSettings,
    Settings,
    ensemble,
    forecaster_ensemble,
    train_ensembles,
    train_forecaster,
    train_member,
)

pytestmark = pytest.mark.skipif(not available(), reason="the grouped C++ operation could not be built here")


def _members(cfg: ForecasterConfig, seeds=(1, 2, 3)) -> list[Forecaster]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(Forecaster(cfg))
    return out


@pytest.mark.parametrize("layers, patch, quantiles, objective", [
    (1, 1, (), mse_objective),
    (2, 1, (), mae_objective),
    (1, 4, (0.1, 0.5, 0.9), PinballObjective((0.1, 0.5, 0.9))),
    (1, 1, (), owa_objective),  # each step's error weighted: (x, y, weights)
])
def test_grouped_pass_equals_each_members_own(layers, patch, quantiles, objective):
    cfg = ForecasterConfig(cell="lstm", input_size=2, hidden_size=32, num_layers=layers, horizon=3, patch=patch,
                           quantiles=quantiles)
    members = _members(cfg)
    group = GroupedForecasters(members)
    x, y = torch.randn(3, 20, 24, 2), torch.randn(3, 20, 3)
    out = group(x)
    own = torch.stack([m(x[k]) for k, m in enumerate(members)])
    torch.testing.assert_close(out, own, rtol=1e-5, atol=1e-6)
    rest = (torch.rand(3, 20, 3),) if objective.weighted else ()
    losses, n = objective(group, (x, y, *rest))  # one loss per member, through autograd
    assert n == 20

    def own_loss(k: int, m: Forecaster) -> torch.Tensor:
        return objective(m, (x[k], y[k], *(r[k] for r in rest)))[0]

    torch.testing.assert_close(losses, torch.stack([own_loss(k, m) for k, m in enumerate(members)]))
    losses.sum().backward()
    grads = [p.grad for p in group.parameters()]
    assert all(g is not None for g in grads)
    group.zero_grad(set_to_none=True)
    sum(own_loss(k, m) for k, m in enumerate(members)).backward()
    for g, p in zip(grads, group.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_only_the_active_members_run_and_get_gradients():
    """A member that left the group (``active``) is neither run nor given a gradient, so its
    optimizer, which is no longer stepped, neither updates nor decays it."""
    members = _members(ForecasterConfig(cell="lstm", hidden_size=16))
    group = GroupedForecasters(members)
    group.active = [0, 2]
    x, y = torch.randn(2, 8, 24, 1), torch.randn(2, 8, 1)
    out = group(x)
    torch.testing.assert_close(out, torch.stack([members[0](x[0]), members[2](x[1])]), rtol=1e-5, atol=1e-6)
    mse_objective(group, (x, y))[0].sum().backward()
    assert all(p.grad is None for p in members[1].parameters())
    assert all(p.grad is not None for m in (members[0], members[2]) for p in m.parameters())
    rnn = members[0].encoder.rnn  # the two biases share a gradient in the operation, not in memory
    assert rnn.bias_ih_l0.grad.untyped_storage().data_ptr() != rnn.bias_hh_l0.grad.untyped_storage().data_ptr()


def test_shapes_it_does_not_cover_are_refused():
    for cfg in (ForecasterConfig(cell="gru"), ForecasterConfig(hidden_size=20), ForecasterConfig(bidirectional=True),
                ForecasterConfig(num_layers=2, dropout=0.2)):
        assert not groupable(Forecaster(cfg))
        with pytest.raises(ValueError, match="groupable"):
            GroupedForecasters([Forecaster(cfg), Forecaster(cfg)])


def _data():
    y = synthetic.sine(700, period=20, noise=0.1, seed=3)["value"].to_numpy()
    tr, va = window_origins(0, 560, 24, 1), window_origins(560, 700, 24, 1)
    x_tr, y_tr, x_va, y_va = (torch.from_numpy(a) for a in (*make_windows(y[:, None], y, tr, 24, 1),
                                                            *make_windows(y[:, None], y, va, 24, 1)))
    return (lambda g: tensor_batches(x_tr, y_tr, batch_size=32, generator=g),
            lambda: tensor_batches(x_va, y_va, batch_size=4096))


# three members that differ in seed, epochs (so they leave the group at different epochs) and
# learning rate (so the one fused AdamW step splits by settings); moving average and plateau on
CFGS = [TrainConfig(epochs=e, lr=lr, seed=s, ema=0.9, lr_patience=1, patience=3, progress=False)
        for s, e, lr in ((1, 3, 3e-3), (2, 5, 1e-2), (3, 4, 3e-3))]
SHAPE = ForecasterConfig(cell="lstm", hidden_size=32)


def test_grouped_training_equals_one_by_one():
    train, val = _data()
    alone = _members(SHAPE)
    expected = [fit(m, train, val, mse_objective, cfg) for m, cfg in zip(alone, CFGS, strict=True)]
    grouped = _members(SHAPE)
    results = fit_grouped(grouped, [train] * 3, [val] * 3, mse_objective, CFGS)
    for a, b, ma, mb in zip(expected, results, alone, grouped, strict=True):
        assert [s.epoch for s in b.history] == [s.epoch for s in a.history]
        assert b.best_epoch == a.best_epoch
        torch.testing.assert_close([s.val_loss for s in b.history], [s.val_loss for s in a.history], rtol=1e-4, atol=0)
        torch.testing.assert_close([s.lr for s in b.history], [s.lr for s in a.history])
        assert b.samples == a.samples
        for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)
    assert len(results[1].history) == 5 and len(results[0].history) == 3  # each left at its own end


class Interrupted(Exception):
    pass


def test_grouped_training_resumes_from_its_checkpoints(tmp_path):
    train, val = _data()
    uninterrupted = _members(SHAPE)
    fit_grouped(uninterrupted, [train] * 3, [val] * 3, mse_objective, CFGS)

    seen = []

    def dies_in_epoch_3(gen):
        for i, batch in enumerate(train(gen)):
            seen.append(i)
            if len(seen) == 3 * 2 * 17 + 5:  # 17 batches an epoch, 3 members: 5 batches into epoch 3
                raise Interrupted
            yield batch

    ckpts = [Checkpoint(tmp_path / f"member-{k}", every_seconds=0) for k in range(3)]
    with pytest.raises(Interrupted):
        fit_grouped(_members(SHAPE), [dies_in_epoch_3] * 3, [val] * 3, mse_objective, CFGS, ckpts)
    assert [c.meta()["epoch"] for c in ckpts] == [2, 2, 2]
    resumed = _members(SHAPE, seeds=(7, 8, 9))  # other weights: the checkpoints must replace them
    fit_grouped(resumed, [train] * 3, [val] * 3, mse_objective, CFGS, ckpts)
    for a, b in zip(uninterrupted, resumed, strict=True):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), name


def test_checkpoints_at_different_places_are_left_to_one_by_one(tmp_path):
    train, val = _data()
    ckpts = [Checkpoint(tmp_path / f"member-{k}") for k in range(2)]

    def interrupt(stats, model):
        raise Interrupted

    with pytest.raises(Interrupted):  # member 0 killed after its first epoch, member 1 before it began
        fit(_members(SHAPE, seeds=(1,))[0], train, val, mse_objective, CFGS[0], interrupt, ckpts[0])
    assert fit_grouped(_members(SHAPE, seeds=(1, 2)), [train] * 2, [val] * 2, mse_objective, CFGS[:2], ckpts) is None


def _train_members(cfg, batches):
    """The flow's ensemble members (tasks.training.ensemble), trained: (members, results)."""
    return train_ensembles({"": ensemble([MemberSettings(cfg, batches)], None, "",
                                         lambda members, fits, _: (members, fits))})[""]


def test_the_flows_members_train_together_as_one_by_one(caplog):
    train, val = _data()
    cfg = TimeSeriesConfig(hidden_size=32, epochs=3, ensemble=3, seed=4)
    batches = Batches(train, val, 1, (536, 116), 24)
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        members, fits = _train_members(cfg, batches)
    assert "member 1/3, member 2/3, member 3/3: training lstm together as one batched network" in caplog.text
    for i, (member, result) in enumerate(zip(members, fits, strict=True)):
        alone, expected = train_member("lstm", cfg, cfg.seed + i, "cpu", batches)
        assert result.best_epoch == expected.best_epoch
        for (name, pa), pb in zip(alone.state_dict().items(), member.state_dict().values(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)


def test_turned_off_the_flows_members_train_one_by_one_and_end_the_same(caplog, monkeypatch):
    """RNNFLOW_GROUPED=0 takes the path a machine without a compiler takes: nn.LSTM, one by one."""
    train, val = _data()
    cfg = TimeSeriesConfig(hidden_size=32, epochs=3, ensemble=3, seed=4)
    batches = Batches(train, val, 1, (536, 116), 24)
    together, _ = _train_members(cfg, batches)
    monkeypatch.setenv("RNNFLOW_GROUPED", "0")
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        alone, fits = _train_members(cfg, batches)
    assert ("member 1/3, member 2/3, member 3/3 train one by one: the grouped operation is turned off "
            "(RNNFLOW_GROUPED=0)") in caplog.text
    assert not available() and all(len(f.history) == 3 for f in fits)
    for a, b in zip(alone, together, strict=True):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)


def test_members_of_other_cells_still_train_one_by_one(caplog):
    train, val = _data()
    cfg = TimeSeriesConfig(hidden_size=16, epochs=1, ensemble=3, ensemble_cells="lstm,gru", seed=4)
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        members, fits = _train_members(cfg, Batches(train, val, 1, (536, 116), 24))
    assert [m.cfg.cell for m in members] == ["lstm", "gru", "lstm"]
    assert "member 1/3, member 3/3: training lstm together" in caplog.text
    assert "member 2/3: training gru" in caplog.text
    assert all(len(f.history) == 1 for f in fits)


def test_auto_candidates_of_one_shape_train_together_as_one_by_one(caplog):
    cfg = TimeSeriesConfig(length=600, epochs=3, hidden_size=32)
    series = generate_series(cfg)
    jobs = {}
    for name in ("plain", "window-norm last", "window-norm mean"):
        trial = replace(apply(cfg, name), ensemble=1)
        jobs[name] = scale_and_window(series, split_series(series, trial), trial), trial
    longer = replace(apply(cfg, "plain"), ensemble=1, lookback=30)  # windows of another length: on its own
    jobs["plain, lookback 30"] = scale_and_window(series, split_series(series, longer), longer), longer
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        together = train_ensembles({n: forecaster_ensemble(series, w, Settings(c), name=n) for n, (w, c) in jobs.items()})
    assert "plain, window-norm last, window-norm mean: training lstm together" in caplog.text
    assert together["plain, lookback 30"].forecaster.lookback == 30
    for name, (windows, trial) in jobs.items():
        alone = train_forecaster(series, windows, Settings(trial)).forecaster
        mine = together[name].forecaster
        assert mine.chains[0].to_list() == windows.chain.to_list() and mine.meta == alone.meta
        for (key, pa), pb in zip(alone.members[0].state_dict().items(), mine.members[0].state_dict().values(),
                                 strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_panel_candidates_train_together_as_one_by_one(tmp_path, caplog):
    path = tmp_path / "meters.csv"
    synthetic.panel(8, 200, seed=3, min_length=200).to_csv(path, index=False)
    cfg = TimeSeriesConfig(source="file", data=str(path), id_column="id", season_length=24, lookback=24, horizon=6,
                           hidden_size=16, epochs=2, batch_size=64, ensemble=1, device="cpu")
    panel = load_panel(cfg.data, "", cfg)
    cfg = cfg.settled(panel.season_length, len(panel), panel.lengths)
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        selection = choose_settings(panel, cfg).selection
    # --loss auto: each candidate its own, owa in log space only (auto.md says which); a group shares its objective
    assert "window-norm mean, window-norm level: training lstm together" in caplog.text and "log + window-norm mean, log + window-norm level: training lstm together" in caplog.text
    assert selection.losses == {"log + window-norm mean": "owa", "log + window-norm level": "owa",
                                "window-norm mean": "mae", "window-norm level": "mae"}
    assert "| log + window-norm mean" in selection.markdown() and "| owa |" in selection.markdown()
    chosen = replace(apply(cfg, selection.choice), ensemble=1)
    alone = train_forecaster(panel, scale_and_window(panel, split_series(panel, chosen), chosen), Settings(chosen))
    for (key, pa), pb in zip(alone.forecaster.members[0].state_dict().items(),
                             selection.trained.forecaster.members[0].state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=key)


def test_a_sweeps_trials_on_one_worker_train_together_as_one_by_one(caplog, monkeypatch):
    """tasks.selection.train_models of several models (a sweep's trials on one worker): --auto's
    candidates of both LSTM trials, then their remaining members, train as one batched network each
    phase; every model ends as it does trained alone."""
    base = TimeSeriesConfig(length=600, epochs=2, hidden_size=16, ensemble=2)
    cfgs = {"trial 0": base, "trial 1": replace(base, lr=3e-3, seed=7), "trial 2": replace(base, hidden_size=32)}
    series = generate_series(base)
    monkeypatch.setattr(training, "GROUP_PER_THREAD", 6)  # both trials' 6 candidates in one group, on any threads
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        together = train_models({name: (series, cfg) for name, cfg in cfgs.items()})
    assert "trial 0: plain, trial 0: window-norm last, trial 0: window-norm mean, trial 1: plain, " in caplog.text
    assert "trial 0: member 2/2, trial 1: member 2/2: training lstm together" in caplog.text
    for name, cfg in cfgs.items():
        alone, mine = train_models({name: (series, cfg)})[name], together[name]
        assert mine.settings.cfg == alone.settings.cfg
        assert mine.settings.selection.scores == pytest.approx(alone.settings.selection.scores, rel=1e-4, nan_ok=True)
        for a, b in zip(alone.trained.forecaster.members, mine.trained.forecaster.members, strict=True):
            for (key, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
                torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def test_a_lone_network_and_a_large_group_go_through_the_grouped_operation(caplog, monkeypatch):
    """One network trains through the grouped operation too, as it would alone through nn.LSTM;
    more networks than GROUP_PER_THREAD per thread are cut into near-equal groups."""
    train, val = _data()
    batches = Batches(train, val, 1, (536, 116), 24)
    cfg = TimeSeriesConfig(hidden_size=16, epochs=2, ensemble=1, seed=4)
    calls = []
    monkeypatch.setattr(training, "fit_grouped", lambda members, *a: calls.append(len(members)) or fit_grouped(
        members, *a))
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        (member,), (result,) = _train_members(cfg, batches)
    assert calls == [1] and "training lstm on cpu: 536 train" in caplog.text
    alone, expected = train_member("lstm", cfg, cfg.seed, "cpu", batches)
    assert result.best_val_loss == pytest.approx(expected.best_val_loss, rel=1e-4)
    for (name, pa), pb in zip(alone.state_dict().items(), member.state_dict().values(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=name)
    monkeypatch.setattr(training, "GROUP_PER_THREAD", 2)  # 2 threads: at most 4 a group
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rnnflow"):
        _train_members(replace(cfg, ensemble=5, epochs=1), batches)
    assert calls[1:] == [2, 3] and "member 1/5, member 2/5: training lstm together" in caplog.text
    assert "member 3/5, member 4/5, member 5/5: training lstm together" in caplog.text
