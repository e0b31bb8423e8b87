"""Windowing, splitting, scaling and metrics: the arithmetic that decides what a score means."""

import numpy as np
import pytest

from rnn_models import metrics
from rnn_models.transforms import Scale
from rnn_models.windows import Split, make_windows, window_origins


def test_windows_never_put_a_target_across_a_boundary():
    split = Split.by_fraction(100, 0.1, 0.2, horizon=3)
    assert (split.train_end, split.val_end) == (70, 80)
    for name in ("train", "val", "test"):
        start, end = split.part(name)
        o = window_origins(start, end, lookback=5, horizon=3)
        assert o.min() >= max(start, 5) and o.max() + 3 <= end
    # validation inputs may read history from the training part, targets may not
    o = window_origins(*split.part("val"), lookback=5, horizon=3)
    assert o[0] == 70 and o[-1] == 77


def test_make_windows_shapes_and_values():
    feats = np.arange(20, dtype=float).reshape(10, 2)  # (T=10, F=2)
    x, y = make_windows(feats, feats[:, 0], np.array([3, 5]), lookback=3, horizon=2)
    assert x.shape == (2, 3, 2) and y.shape == (2, 2)
    np.testing.assert_array_equal(x[0, :, 0], [0, 2, 4])
    np.testing.assert_array_equal(y[1], [10, 12])


def test_split_keeps_a_full_horizon_in_each_part():
    split = Split.by_fraction(50, 0.01, 0.01, horizon=4)
    assert split.val_end - split.train_end == 4 and split.n - split.val_end == 4


@pytest.mark.parametrize("kind", ["standard", "minmax", "none"])
def test_scaler_fits_on_training_rows_only_and_inverts_exactly(kind):
    train = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    later = np.array([[100.0, -5.0]])  # must not influence the fit
    s = Scale(method=kind)
    s.fit(train)
    z, y, _ = s.forward(np.vstack([train, later])[None], np.array([[1.0, 3.0, 5.0, 100.0]]))
    z = z[0]
    if kind == "standard":
        np.testing.assert_allclose(z[:3].mean(axis=0), 0, atol=1e-12)
    if kind == "minmax":
        np.testing.assert_allclose(z[:3].min(axis=0), 0, atol=1e-12)
        np.testing.assert_allclose(z[:3].max(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(z * s.scale + s.offset, np.vstack([train, later]), rtol=1e-12)
    np.testing.assert_allclose(y, z[None, :, 0])  # the target is scaled with feature 0's numbers
    np.testing.assert_allclose(s.inverse(y, None), [[1, 3, 5, 100]], rtol=1e-12)


def test_metrics_on_hand_computed_values():
    y = np.array([[1.0, 2.0], [3.0, 4.0]])
    f = np.array([[1.0, 3.0], [1.0, 4.0]])
    assert metrics.mae(y, f) == pytest.approx(0.75)
    assert metrics.rmse(y, f) == pytest.approx(np.sqrt(5 / 4))
    assert metrics.smape(y, f) == pytest.approx(100 * (0 + 2 * 1 / 5 + 2 * 2 / 4 + 0) / 4)
    assert metrics.smape(np.zeros((1, 1)), np.zeros((1, 1))) == 0.0
    assert metrics.mase(y, f, scale=0.5) == pytest.approx(1.5)


def test_naive_and_seasonal_naive_use_only_the_past():
    series = np.arange(30, dtype=float)
    origins = np.array([10, 20])
    np.testing.assert_array_equal(metrics.naive_forecast(series, origins, 3), [[9, 9, 9], [19, 19, 19]])
    # season 4, horizon 6: steps 1-4 look back one season, steps 5-6 two seasons
    np.testing.assert_array_equal(metrics.seasonal_naive_forecast(series, origins, 6, 4)[0], [6, 7, 8, 9, 6, 7])
    assert metrics.seasonal_naive_scale(series[:10], 4) == 4.0
