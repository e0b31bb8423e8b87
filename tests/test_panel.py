"""The global model's data: lazy windows over many series, and per-window normalisation."""

import numpy as np
import pytest
import torch

from rnn_models.forecasting import mse_objective
from rnn_models.panel import OwaWeights, Panel, PanelWindows, encoded_batches, window_norm
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import TrainConfig, fit
from rnn_models.transforms import Baseline, Chain, Log, Scale, WindowNorm
from rnn_models.windows import make_windows, window_origins


def _series():
    rng = np.random.default_rng(0)
    return [rng.normal(size=n).cumsum() * scale for n, scale in ((40, 1.0), (8, 10.0), (25, 1000.0), (60, 0.1))]


def test_windows_are_each_series_own_windows_in_order():
    series, L, H = _series(), 6, 3
    start, end = np.array([10, 0, 5, 30]), np.array([40, 8, 20, 55])
    windows = PanelWindows(Panel.from_series(series, ids=list("abcd")), L, H, start, end, stride=2)
    expected_x, expected_y = [], []
    for s, lo, hi in zip(series, start, end, strict=True):
        o = window_origins(lo, hi, L, H, stride=2)
        x, y = make_windows(s[:, None], s, o, L, H)
        expected_x.append(x)
        expected_y.append(y)
    x, y, _ = windows.gather(torch.arange(len(windows)))
    np.testing.assert_array_equal(x.numpy(), np.concatenate(expected_x))
    np.testing.assert_array_equal(y.numpy(), np.concatenate(expected_y))
    assert len(windows) == sum(len(e) for e in expected_y) and windows.counts[1] == 0  # series b: too short
    series_of, _ = windows.locate(torch.arange(len(windows)))
    assert series_of.tolist() == [i for i, e in enumerate(expected_y) for _ in range(len(e))]


def test_shuffled_batches_cover_every_window_once_and_repeat_by_seed():
    windows = PanelWindows(Panel.from_series(_series()), 5, 2, np.zeros(4, int), np.array([40, 8, 25, 60]))
    def targets(seed):
        return torch.cat([y for _, y, _ in windows.batches(7, torch.Generator().manual_seed(seed))])
    a, b, c = targets(1), targets(1), targets(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, every, _ = windows.gather(torch.arange(len(windows)))
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, every.tolist()))


def test_only_the_series_values_are_stored():
    series = [np.arange(1000, dtype=float)] * 50
    windows = PanelWindows(Panel.from_series(series), 96, 24, np.zeros(50, int), np.full(50, 1000))
    stored = windows.panel.values.numel() + sum(t.numel() for t in (windows.counts, windows.ends, windows.first))
    assert len(windows) * (96 + 24) > 100 * stored  # the windows would be 100x the data


@pytest.mark.parametrize("center", ["last", "mean", "level", "log-level"])
def test_window_norm_is_the_twin_of_the_numpy_transform(center):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 12, 3)) * 50 + 7, rng.normal(size=(32, 4))  # the target and two covariates
    want_x, want_y, (c, s) = WindowNorm(center).forward(x, y)
    got_x, got_y, (tc, ts) = window_norm(torch.from_numpy(x), torch.from_numpy(y), center)
    np.testing.assert_allclose(got_x.numpy(), want_x, rtol=1e-10)
    np.testing.assert_allclose(got_y.numpy(), want_y, rtol=1e-10)
    np.testing.assert_allclose((got_y * ts + tc).numpy(), y, rtol=1e-10)  # and it inverts


@pytest.mark.parametrize("steps", [[Log(), WindowNorm("mean")], [Log(), WindowNorm("level")], [WindowNorm("level")],
                                   [Scale(np.zeros(1), np.full(1, 3.0)), WindowNorm("last"), Baseline(4)]])
def test_owa_weights_make_an_error_in_network_units_count_as_owa_counts_it(steps):
    """--loss owa: a small error of d network units, weighted, is what M4's OWA makes of the error
    it decodes to in original units: half |y - f| / |y| over seasonal naive's sMAPE, half |y - f| over
    the window's seasonal-naive error (its lookback's mean absolute change over a season)."""
    rng = np.random.default_rng(0)
    t = np.arange(40)
    x = (rng.uniform(1, 1000, (16, 1, 1)) * (2 + np.sin(2 * np.pi * t / 4))[None, :, None]
         * rng.uniform(0.9, 1.1, (16, 40, 1)))  # positive series of levels 1 to 1000, season 4
    y = x[:, -8:, 0] * rng.uniform(0.8, 1.2, (16, 8))
    chain, weigh, d = Chain(steps), OwaWeights(season=4, smape_ref=0.15), 1e-6
    _, y_net, w = weigh(chain, torch.from_numpy(x), torch.from_numpy(y))
    _, _, ctx = chain.encode(x, y)
    f = chain.decode(y_net.numpy() + d, ctx)  # the forecast a d-unit error decodes to
    scale = np.abs(x[:, 4:, 0] - x[:, :-4, 0]).mean(axis=1, keepdims=True)
    owa = 0.5 * (np.abs(y - f) / (0.15 * np.abs(y)) + np.abs(y - f) / scale)
    np.testing.assert_allclose(w.numpy() * d, owa, rtol=1e-4)


def test_a_global_model_learns_series_of_very_different_scales():
    t = np.arange(300)
    series = [a * np.sin(2 * np.pi * t / 12 + p) + a * 3 for a, p in ((1, 0), (100, 1), (1e4, 2))]
    panel, L, H = Panel.from_series(series), 24, 4
    train = PanelWindows(panel, L, H, np.zeros(3, int), np.full(3, 250))
    val = PanelWindows(panel, L, H, np.full(3, 250), np.full(3, 300))
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(hidden_size=16, horizon=H))
    chain = Chain([WindowNorm("last")])
    result = fit(model, lambda g: encoded_batches(train, chain, 32, g), lambda: encoded_batches(val, chain, 256),
                 mse_objective,
                 TrainConfig(epochs=6, lr=1e-2, patience=0, progress=False))
    assert result.best_val_loss < 0.1 * result.history[0].train_loss
