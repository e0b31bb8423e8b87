"""Unit tests of the recurrent building blocks: shapes, parity with nn.RNN, hand BPTT."""

import numpy as np
import pytest
import torch
from torch import nn

from rnn_models.cells import ElmanCell, ElmanRNN, elman_bptt
from rnn_models.recurrent import (
    CELLS,
    CharLM,
    CharLMConfig,
    Forecaster,
    ForecasterConfig,
    Recurrent,
    RecurrentConfig,
    detach_state,
)


def test_elman_matches_nn_rnn_with_copied_weights():
    torch.manual_seed(0)
    ref = nn.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    ours = ElmanRNN(3, 5, num_layers=2, bidirectional=True)
    for layer in range(2):
        for d, suffix in enumerate(("", "_reverse")):
            ours.cells[layer * 2 + d].copy_from(ref, layer, suffix)
    x = torch.randn(4, 7, 3)
    h0 = torch.randn(4, 4, 5)
    out_ref, h_ref = ref(x, h0)
    out, h = ours(x, h0)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-6)


def test_hand_written_bptt_matches_autograd():
    torch.manual_seed(1)
    cell = ElmanCell(2, 4).double()
    xs = torch.randn(6, 2, dtype=torch.float64)
    h0 = torch.randn(4, dtype=torch.float64, requires_grad=True)
    targets = torch.randn(6, 4, dtype=torch.float64)
    h, loss = h0[None], 0.0
    for t in range(6):
        h = cell(xs[t][None], h)
        loss = loss + (h[0] * targets[t]).sum()  # dL/dh_t = targets[t]
    loss.backward()
    dw, db, dh0 = elman_bptt(cell.weight.detach().numpy(), cell.bias.detach().numpy(), xs.numpy(),
                             h0.detach().numpy(), targets.numpy())
    np.testing.assert_allclose(dw, cell.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, cell.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dh0, h0.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_and_forecaster_shapes(cell, bidirectional):
    cfg = ForecasterConfig(cell=cell, input_size=3, hidden_size=6, num_layers=2, dropout=0.1,
                           bidirectional=bidirectional, horizon=4)
    enc = Recurrent(cfg)
    out, state = enc(torch.randn(5, 9, 3))
    dirs = 2 if bidirectional else 1
    assert out.shape == (5, 9, 6 * dirs)
    h = state[0] if cell == "lstm" else state
    assert h.shape == (2 * dirs, 5, 6)
    assert Forecaster(cfg)(torch.randn(5, 9, 3)).shape == (5, 4)


def test_forecaster_gradients_reach_every_parameter():
    model = Forecaster(ForecasterConfig(cell="gru", input_size=2, hidden_size=4, num_layers=2, horizon=3))
    model(torch.randn(3, 5, 2)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_detach_state_cuts_the_graph(cell):
    lm = CharLM(CharLMConfig(cell=cell, vocab_size=7, hidden_size=4))
    _, state = lm(torch.randint(0, 7, (2, 3)))
    detached = detach_state(state)
    for s in detached if isinstance(detached, tuple) else (detached,):
        assert not s.requires_grad and s.grad_fn is None


def test_unknown_cell_is_named():
    with pytest.raises(ValueError, match=r"unknown cell 'transformer'; expected one of \['elman', 'gru', 'lstm', 'rnn'\]"):
        RecurrentConfig(cell="transformer")
