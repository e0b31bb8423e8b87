"""The training loop: fixed-seed regression, reproducibility, early stopping, NaN handling."""

import math
import time

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rnn_models import synthetic
from rnn_models.checkpoint import Checkpoint
from rnn_models.forecasting import mse_objective
from rnn_models.gradients import MemberGradients
from rnn_models.members import Members
from rnn_models.recurrent import Forecaster, ForecasterConfig
from rnn_models.training import (
    Budget,
    NonFiniteLossError,
    TrainConfig,
    TrainingRun,
    autocast,
    cosine,
    fit,
    fit_members,
    native_bf16_cpu,
    tensor_batches,
)
from rnn_models.windows import make_windows, window_origins


def _data():
    y = synthetic.sine(300, period=20, noise=0.05, seed=3)["value"].to_numpy()
    feats = y[:, None]
    tr = window_origins(0, 240, 12, 2)
    va = window_origins(240, 300, 12, 2)
    return [torch.from_numpy(a) for a in (*make_windows(feats, y, tr, 12, 2), *make_windows(feats, y, va, 12, 2))]


def _train(epochs=4, seed=0, lr=1e-2, clip=1.0, patience=0, on_epoch=None, ema=0.0, objective=mse_objective):
    x_tr, y_tr, x_va, y_va = _data()
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(cell="lstm", input_size=1, hidden_size=8, horizon=2))
    cfg = TrainConfig(epochs=epochs, lr=lr, clip=clip, patience=patience, seed=seed, progress=False, ema=ema)
    result = fit(model, lambda g: tensor_batches(x_tr, y_tr, batch_size=16, generator=g),
                 lambda: tensor_batches(x_va, y_va, batch_size=64), objective, cfg, on_epoch=on_epoch)
    return model, result


# Recorded from this loop on CPU (torch 2.13): a change to the loop that changes what it
# computes (order of batches, clipping, optimizer, restoring weights) shows up here.
EXPECTED_TRAIN = [0.468738, 0.289331, 0.061491, 0.017907]
EXPECTED_VAL = [0.376337, 0.150376, 0.022208, 0.010737]


def test_fixed_seed_loss_regression():
    _, result = _train()
    train = [s.train_loss for s in result.history]
    val = [s.val_loss for s in result.history]
    np.testing.assert_allclose(train, EXPECTED_TRAIN, rtol=1e-4)
    np.testing.assert_allclose(val, EXPECTED_VAL, rtol=1e-4)
    assert val[-1] < val[0] / 2  # and it learns


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = _train(epochs=2, seed=5)
    b, _ = _train(epochs=2, seed=5)
    c, _ = _train(epochs=2, seed=6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_early_stopping_restores_the_best_weights():
    snapshots = {}

    def keep(stats, model):
        snapshots[stats.epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    # a large learning rate makes validation loss bounce, so with seed 0 it stops at epoch 10 of 40
    # (best 7); 40 leaves room for another platform's float rounding to move that a little
    model, result = _train(epochs=40, lr=0.3, patience=3, on_epoch=keep)
    assert result.stopped_early and len(result.history) < 40
    assert result.best_epoch == min(result.history, key=lambda s: s.val_loss).epoch
    assert len(result.history) - result.best_epoch == 3  # stopped after exactly `patience` worse epochs
    assert sorted(snapshots) == [s.epoch for s in result.history]
    last = snapshots[result.history[-1].epoch]
    assert not all(torch.equal(v, last[k]) for k, v in model.state_dict().items())  # not the last epoch's
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[result.best_epoch][k]), k


def test_ema_validates_and_keeps_the_moving_average_of_the_weights():
    seen = []  # (training?, weights) at every call of the objective: before each step, and when validating

    def recording(model, batch):
        seen.append((model.training, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return mse_objective(model, batch)

    decay = 0.8
    model, result = _train(epochs=2, lr=3e-2, ema=decay, objective=recording)
    steps = len(seen) // 2 - 1  # per epoch: train batches, then one validation batch
    assert [t for t, _ in seen] == ([True] * steps + [False]) * 2
    # weights after steps 1..n of epoch 1: what the next training call (or epoch 2's first) sees
    after = [w for _, w in seen[1:steps]] + [seen[steps + 1][1]]
    expected = dict(after[0])  # the average starts as a copy of the first step's weights
    for w in after[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in expected}
    validated = seen[steps][1]  # what epoch 1 validated
    for k in expected:
        torch.testing.assert_close(validated[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(validated[k], after[-1][k]) for k in expected)  # not the raw weights
    kept = seen[steps if result.best_epoch == 1 else -1][1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, kept[k])  # the best epoch's average is what fit returns


def test_nan_loss_stops_with_a_clear_error():
    with pytest.raises(NonFiniteLossError, match=r"epoch 1: loss became (nan|inf).*lower --lr"):
        _train(epochs=3, lr=1e30, clip=0.0)


def test_samples_per_second_is_reported():
    _, result = _train(epochs=2)
    assert result.samples == 2 * len(_data()[0])
    assert result.train_seconds > 0 and math.isfinite(result.samples_per_second)



def test_a_time_budget_ends_training_mid_epoch():
    x_tr, y_tr, x_va, y_va = _data()
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(cell="lstm", input_size=1, hidden_size=8, horizon=2))

    def slow_batches(g):  # 15 batches of >= 20 ms each: one epoch outlasts the 0.1 s budget
        for b in tensor_batches(x_tr, y_tr, batch_size=16, generator=g):
            time.sleep(0.02)
            yield b

    cfg = TrainConfig(epochs=50, lr=1e-2, patience=0, progress=False, minutes=0.1 / 60)
    result = fit(model, slow_batches, lambda: tensor_batches(x_va, y_va, batch_size=64), mse_objective, cfg)
    assert len(result.history) == 1 and result.samples < len(x_tr)  # cut short, then validated
    assert math.isfinite(result.best_val_loss) and result.best_epoch == 1


def test_the_budget_sets_a_cosine_learning_rate_over_its_time():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    budget = Budget(opt, seconds=100.0, floor=0.1)
    for frac, scale in ((0.0, 1.0), (0.5, 0.55), (1.0, 0.1)):
        budget.start = time.perf_counter() - frac * 100.0
        assert budget.step() is (frac == 1.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * scale, rel=1e-3)


def test_the_warm_up_raises_the_scheduled_learning_rate_linearly_over_its_steps():
    """Step k (from 0) of a warm-up of W steps runs at (k + 1) / W of the schedule's rate, here
    a cosine over the epochs; the schedule itself is untouched (the epochs' logged rates)."""
    x_tr, y_tr, x_va, y_va = _data()  # 227 training windows: 15 steps an epoch of 16
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(cell="lstm", input_size=1, hidden_size=8, horizon=2))
    cfg = TrainConfig(epochs=3, lr=0.02, patience=0, progress=False, cosine=True, warmup=20)
    used: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        result = fit(model, lambda g: tensor_batches(x_tr, y_tr, batch_size=16, generator=g),
                     lambda: tensor_batches(x_va, y_va, batch_size=64), mse_objective, cfg)
    finally:
        hook.remove()
    per_epoch = len(used) // 3
    scheduled = [0.02 * cosine(k // per_epoch / 3) for k in range(len(used))]
    assert used == pytest.approx([s * min(1.0, (k + 1) / 20) for k, s in enumerate(scheduled)], rel=1e-9)
    assert used[0] == pytest.approx(0.02 / 20) and used[-1] == pytest.approx(scheduled[-1])
    assert [s.lr for s in result.history] == pytest.approx([0.02 * cosine(e / 3) for e in range(3)], rel=1e-9)


def test_cosine_sets_each_epochs_learning_rate_from_the_start_value_down():
    x_tr, y_tr, x_va, y_va = _data()
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(cell="lstm", input_size=1, hidden_size=8, horizon=2))
    cfg = TrainConfig(epochs=4, lr=0.02, patience=0, progress=False, cosine=True)
    result = fit(model, lambda g: tensor_batches(x_tr, y_tr, batch_size=16, generator=g),
                 lambda: tensor_batches(x_va, y_va, batch_size=64), mse_objective, cfg)
    assert [s.lr for s in result.history] == pytest.approx([0.02 * cosine(e / 4) for e in range(4)], rel=1e-9)
    assert result.history[0].lr == 0.02 and result.history[-1].lr < 0.005
    _, constant = _train(epochs=2, lr=0.02)
    assert [s.lr for s in constant.history] == [0.02, 0.02]


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("auto", torch.float32),
                                              ("bf16", torch.bfloat16)])
def test_precision_on_cpu(precision, dtype):
    if precision == "bf16" and not native_bf16_cpu():
        pytest.skip("this CPU has no bf16 arithmetic: oneDNN runs no LSTM in bf16 here (the flows refuse it in one line)")
    lstm = torch.nn.LSTM(3, 8, batch_first=True)
    with autocast("cpu", precision):
        out, _ = lstm(torch.randn(2, 5, 3))
    assert out.dtype == dtype  # auto is float32 on CPU unless a flow asks for bf16 (the char LM's auto does)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        autocast("cpu", "fp16")


class LinearMembers(Members):
    """Any model made of members: K linear layers, run at once on (K, B, F) batches."""

    def forward(self, x):
        running = [self.members[k] for k in self.active]
        w = torch.stack([m.weight for m in running])  # (K, O, F)
        b = torch.stack([m.bias for m in running])  # (K, O)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (K, B, O)


def _linear_data(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 4, generator=gen)
    y = x @ torch.randn(4, 2, generator=gen) + 0.1 * torch.randn(200, 2, generator=gen)
    return (lambda g: tensor_batches(x[:160], y[:160], batch_size=16, generator=g),
            lambda: tensor_batches(x[160:], y[160:], batch_size=64))


def _linears(seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(torch.nn.Linear(4, 2))
    return out


# members that differ in data, seed, epochs (they leave at different epochs), learning rate and
# clipping (0.05 binds at every step); moving average, plateau and warm-up on
MEMBER_CFGS = [TrainConfig(epochs=e, lr=lr, clip=clip, seed=s, ema=0.9, lr_patience=1, warmup=5, patience=0,
                           progress=False) for s, e, lr, clip in ((1, 3, 3e-2, 0.05), (2, 5, 1e-2, 1.0),
                                                                 (3, 4, 3e-2, 0.0))]


def test_a_model_of_members_trains_each_member_as_fit_trains_it_alone():
    data = [_linear_data(seed) for seed in (1, 2, 3)]
    alone = _linears((1, 2, 3))
    expected = [fit(m, train, val, mse_objective, cfg) for m, (train, val), cfg in zip(alone, data, MEMBER_CFGS, strict=True)]
    together = _linears((1, 2, 3))
    results = fit_members(LinearMembers(together), [d[0] for d in data], [d[1] for d in data], mse_objective,
                          MEMBER_CFGS)
    for a, b, ma, mb in zip(expected, results, alone, together, strict=True):
        assert [s.epoch for s in b.history] == [s.epoch for s in a.history]
        np.testing.assert_allclose([s.val_loss for s in b.history], [s.val_loss for s in a.history], rtol=1e-5)
        assert [s.lr for s in b.history] == [s.lr for s in a.history] and b.samples == a.samples
        for pa, pb in zip(ma.parameters(), mb.parameters(), strict=True):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)
            assert pb.grad is None  # the members' gradient buffer is let go after each pass


def _poisoned_from(epoch, batches):
    """``batches`` (a member's training data), NaN from its ``epoch``-th pass on."""
    passes = []

    def poisoned(g):
        passes.append(None)
        for x, y in batches(g):
            yield (x * math.nan, y) if len(passes) >= epoch else (x, y)
    return poisoned


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_a_member_whose_loss_becomes_nan_keeps_its_best_weights_and_the_others_train_on(ema, tmp_path):
    data = [_linear_data(seed) for seed in (1, 2)]
    cfgs = [TrainConfig(epochs=5, lr=1e-2, patience=0, seed=s, ema=ema, progress=False) for s in (1, 2)]
    alone = _linears((2,))[0]
    expected = fit(alone, *data[1], mse_objective, cfgs[1])
    weights = {}  # (member, epoch): its weights after the epoch

    def on_epoch(stats, member):
        weights[id(member), stats.epoch] = {k: v.clone() for k, v in member.state_dict().items()}

    def train(members):
        return fit_members(LinearMembers(members), [_poisoned_from(3, data[0][0]), data[1][0]],
                           [d[1] for d in data], mse_objective, cfgs, on_epoch=on_epoch,
                           checkpoints=[Checkpoint(tmp_path / str(k)) for k in range(2)])

    members = _linears((1, 2))
    wild, calm = train(members)
    assert wild.diverged == 3 and [s.epoch for s in wild.history] == [1, 2, 3] and wild.best_epoch in (1, 2)
    assert not math.isfinite(wild.history[-1].train_loss)
    assert wild.divergence == (f"its loss became NaN or infinite at epoch 3 (lr 0.01): "
                               f"kept epoch {wild.best_epoch}'s weights")
    for k, v in members[0].state_dict().items():
        assert torch.isfinite(v).all()
        if not ema:  # (with a moving average the weights kept are the average's, not those on_epoch sees)
            assert torch.equal(v, weights[id(members[0]), wild.best_epoch][k])
    assert not calm.diverged and [s.epoch for s in calm.history] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([s.val_loss for s in calm.history], [s.val_loss for s in expected.history], rtol=1e-5)
    again = _linears((7, 8))  # resumed from the checkpoints: both finished, where and as they ended
    resumed = train(again)
    assert [(r.diverged, r.best_epoch, len(r.history)) for r in resumed] == [(3, wild.best_epoch, 3), (0, 5, 5)]
    for ours, theirs in zip(members, again, strict=True):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_each_member_is_clipped_to_its_own_norm_as_clip_grad_norm_clips_it():
    members = _linears((1, 2, 3))
    cfgs = [TrainConfig(clip=clip) for clip in (0.01, 100.0, 0.0)]  # binds, does not bind, off
    runs = [TrainingRun(m, mse_objective, cfg) for m, cfg in zip(members, cfgs, strict=True)]
    gradients = MemberGradients(runs)
    for k, m in enumerate(members):
        for p in m.parameters():
            p.grad.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
    expected = [_linears((0,))[0] for _ in members]  # each member's copy, clipped alone
    for copy, m, cfg in zip(expected, members, cfgs, strict=True):
        for c, p in zip(copy.parameters(), m.parameters(), strict=True):
            c.grad = p.grad.clone()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(copy.parameters(), cfg.clip)
    gradients.clip()
    for copy, m in zip(expected, members, strict=True):
        for c, p in zip(copy.parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(p.grad, c.grad)
    gradients.release()
    assert all(p.grad is None for m in members for p in m.parameters())


def test_an_auto_candidate_diverging_in_its_first_epoch_is_dropped_with_its_reason_and_the_others_kept():
    from tasks.config import TimeSeriesConfig
    from tasks.data import generate_series
    from tasks.features import scale_and_window, split_series
    from tasks.selection import train_candidates
    from tasks.training import Settings, forecaster_ensemble

    base = TimeSeriesConfig(length=300, lookback=12, hidden_size=8, epochs=3, patience=0, ensemble=1, device="cpu",
                            auto=False)
    series = generate_series(base)
    candidates = {}
    for name, lr in (("calm", 1e-3), ("wild", 1e30)):
        cfg = TimeSeriesConfig(**{**base.__dict__, "lr": lr, "clip": 0.0, "ema": 0.0})
        windows = scale_and_window(series, split_series(series, cfg), cfg)
        candidates[name] = forecaster_ensemble(series, windows, Settings(cfg), name=name)
    trained, diverged = train_candidates(candidates)
    assert list(trained) == ["calm"] and list(diverged) == ["wild"]
    assert str(diverged["wild"]).startswith("epoch ") and "lower --lr" in str(diverged["wild"])
