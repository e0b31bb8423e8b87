"""Plain PyTorch (and numpy): recurrent models, the training loop, windows, text batching.

``CELL_NAMES``, ``PRECISIONS`` and ``NonFiniteLossError`` are importable without importing torch, so that a
command line can check its options and name a failed run before paying for torch's import."""

CELL_NAMES = ("rnn", "lstm", "gru", "elman")  # the keys of rnn_models.recurrent.CELLS
PRECISIONS = ("auto", "bf16", "fp32")  # what rnn_models.training.autocast takes


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""
