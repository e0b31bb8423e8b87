"""Checkpoints and resume in the training loop: a run interrupted at an epoch's end or half-way
through one, then resumed from its checkpoint, ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import math

import pytest
import torch

from rnn_models.checkpoint import Checkpoint
from rnn_models.forecasting import mse_objective
from rnn_models.recurrent import CharLM, CharLMConfig, Forecaster, ForecasterConfig
from rnn_models.text import LanguageModelLoss, random_batches, sequential_batches
from rnn_models.training import TrainConfig, fit, fit_members, tensor_batches


class Interrupted(Exception):
    pass


def sine_windows():
    t = torch.arange(400, dtype=torch.float32)
    s = torch.sin(2 * math.pi * t / 25) + 0.1 * torch.randn(400, generator=torch.Generator().manual_seed(1))
    x = torch.stack([s[i : i + 20] for i in range(360)])[..., None]
    y = torch.stack([s[i + 20 : i + 22] for i in range(360)])
    return x[:300], y[:300], x[300:], y[300:]


def train_forecaster(checkpoint=None, stop_at_epoch=0):
    x, y, xv, yv = sine_windows()
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig(cell="lstm", input_size=1, hidden_size=16, horizon=2, dropout=0.2,
                                        num_layers=2))
    cfg = TrainConfig(epochs=7, lr=5e-3, ema=0.9, lr_patience=2, patience=0, seed=3, progress=False)

    def on_epoch(stats, m):
        if stats.epoch == stop_at_epoch:
            raise Interrupted

    result = fit(model, lambda g: tensor_batches(x, y, batch_size=32, generator=g),
                 lambda: tensor_batches(xv, yv, batch_size=64), mse_objective, cfg, on_epoch, checkpoint)
    return model, result


def assert_same(a, b):
    (model_a, res_a), (model_b, res_b) = a, b
    assert [s.val_loss for s in res_a.history] == pytest.approx([s.val_loss for s in res_b.history], abs=1e-6)
    assert res_a.best_epoch == res_b.best_epoch
    assert abs(res_a.best_val_loss - res_b.best_val_loss) < 1e-6
    for (k, va), vb in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)


def test_resumed_at_an_epoch_end_ends_like_an_uninterrupted_run(tmp_path):
    whole = train_forecaster()
    ckpt = Checkpoint(tmp_path / "ckpt")
    with pytest.raises(Interrupted):  # on_epoch runs after epoch 4's checkpoint: the file holds epoch 4
        train_forecaster(Checkpoint(tmp_path / "ckpt"), stop_at_epoch=4)
    assert ckpt.meta()["epoch"] == 4 and not ckpt.meta()["finished"]
    resumed = train_forecaster(Checkpoint(tmp_path / "ckpt"))
    assert_same(whole, resumed)
    assert ckpt.meta()["finished"]
    again = train_forecaster(Checkpoint(tmp_path / "ckpt"))  # a finished checkpoint: nothing left to train
    assert_same(whole, again)


def test_a_checkpoint_missing_its_shuffling_state_would_not_resume_exactly(tmp_path):
    """The positive control: the comparison above sees a resume that drops part of the state."""
    whole = train_forecaster()
    ckpt = Checkpoint(tmp_path / "ckpt")
    with pytest.raises(Interrupted):
        train_forecaster(ckpt, stop_at_epoch=4)
    tensors, meta = ckpt.read()
    tensors["rng.gen"] = torch.Generator().manual_seed(99).get_state()  # another shuffling order from epoch 4
    ckpt.write(tensors, meta)
    resumed = train_forecaster(Checkpoint(tmp_path / "ckpt"))
    assert abs(resumed[1].best_val_loss - whole[1].best_val_loss) > 1e-6


class StopAfter(LanguageModelLoss):
    """A loss that interrupts training at its ``n``-th training call (half-way through an epoch)."""

    def __init__(self, carry_state: bool, n: int):
        super().__init__(carry_state)
        self.n, self.calls = n, 0

    def __call__(self, model, batch):
        if model.training:
            self.calls += 1
            if self.calls == self.n:
                raise Interrupted
        return super().__call__(model, batch)


def train_charlm(sampling, checkpoint=None, stop_after=0):
    ids = torch.randint(0, 20, (6000,), generator=torch.Generator().manual_seed(0))
    train, val = ids[:5000], ids[5000:]
    torch.manual_seed(0)
    model = CharLM(CharLMConfig(vocab_size=20, cell="lstm", hidden_size=24, num_layers=2, dropout=0.3,
                                embedding_dim=8, input_dropout=0.1))
    sample = random_batches if sampling == "random" else sequential_batches
    loss = StopAfter(sampling == "sequential", stop_after) if stop_after else LanguageModelLoss(sampling == "sequential")
    # the char LM's schedule: a warm-up (still under way at the interruption) under a cosine
    cfg = TrainConfig(epochs=3, lr=3e-3, ema=0.0, patience=0, seed=5, progress=False, cosine=True, warmup=100)
    result = fit(model, lambda g: sample(train, 8, 10, g), lambda: sequential_batches(val, 8, 10), loss, cfg,
                 checkpoint=checkpoint)
    return model, result


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_resumed_half_way_through_an_epoch_ends_like_an_uninterrupted_run(tmp_path, sampling):
    """Inside an epoch the checkpoint also holds the position in the epoch, the carried hidden
    state (sequential sampling), the dropout RNG and the warm-up's count of steps."""
    whole = train_charlm(sampling)
    batches_per_epoch = 5000 // (8 * 10)  # about 62
    ckpt = Checkpoint(tmp_path / "ckpt", every_seconds=1e-9)  # a checkpoint after every step
    with pytest.raises(Interrupted):
        train_charlm(sampling, ckpt, stop_after=batches_per_epoch + 25)  # in epoch 2
    meta = ckpt.meta()
    assert meta["epoch"] == 1 and meta["step"] > 0
    resumed = train_charlm(sampling, Checkpoint(tmp_path / "ckpt", every_seconds=0))
    assert_same(whole, resumed)


def test_a_checkpoint_is_written_atomically(tmp_path):
    """Only the complete file is ever visible under the checkpoint's name: a temp file, then rename."""
    ckpt = Checkpoint(tmp_path / "ckpt")
    ckpt.write({"w": torch.ones(3)}, {"epoch": 1})
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [Checkpoint.FILE]
    tensors, meta = ckpt.read()
    assert meta == {"epoch": 1} and torch.equal(tensors["w"], torch.ones(3))


def train_members(checkpoints=None, die_at=0):
    """Three linear members trained together (tests/test_training.py's LinearMembers), the
    training data's iterator dying at its ``die_at``-th batch of any member."""
    from tests.test_training import MEMBER_CFGS, LinearMembers, _linear_data, _linears

    data = [_linear_data(seed) for seed in (1, 2, 3)]
    drawn = []

    def dying(train):
        def batches(gen):
            for batch in train(gen):
                drawn.append(1)
                if len(drawn) == die_at:
                    raise Interrupted
                yield batch
        return batches

    members = _linears((7, 8, 9) if checkpoints and checkpoints[0].exists() else (1, 2, 3))
    results = fit_members(LinearMembers(members), [dying(d[0]) for d in data], [d[1] for d in data], mse_objective,
                          MEMBER_CFGS, checkpoints)
    return members, results


def test_members_resumed_half_way_through_an_epoch_end_like_an_uninterrupted_run(tmp_path):
    """A model of members writes one checkpoint per member; killed inside an epoch (after some
    members left the group), it resumes from them to the same weights, bit for bit."""
    whole, expected = train_members()
    ckpts = [Checkpoint(tmp_path / f"member-{k}", every_seconds=1e-9) for k in range(3)]
    with pytest.raises(Interrupted):  # 10 batches an epoch: 3 members for 3 epochs, then 2: 6 into epoch 4
        train_members(ckpts, die_at=3 * 10 * 3 + 2 * 6)
    assert [c.meta()["epoch"] for c in ckpts] == [3, 3, 3] and [c.meta()["step"] for c in ckpts] == [0, 5, 5]
    resumed, results = train_members([Checkpoint(c.directory, every_seconds=0) for c in ckpts])
    for a, b, ra, rb in zip(whole, resumed, expected, results, strict=True):
        assert [s.val_loss for s in ra.history] == [s.val_loss for s in rb.history]
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb)
