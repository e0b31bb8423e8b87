"""Runs at once share the cores (rnn_models.cores): a training process takes its share while
others train, all of it again when they stop, and never more than it began with."""

import os

import torch

from rnn_models import cores


def _look_again() -> int:
    cores.local.next_check = 0.0
    cores.SHARE.rebalance()
    return torch.get_num_threads()


def test_a_training_process_takes_its_share_and_gives_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNFLOW_CORES_DIR", str(tmp_path))
    monkeypatch.setattr(cores, "cores_here", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with cores.SHARE.claim():
            assert (tmp_path / f"{os.getpid()}.pid").exists() and torch.get_num_threads() == 4  # alone: every core
            other, dead = tmp_path / f"{os.getppid()}.pid", tmp_path / "999999999.pid"
            other.touch()  # a second process training (one that is alive)
            dead.touch()  # the claim of a process that died without removing it
            assert _look_again() == 2 and not dead.exists()
            other.unlink()
            assert _look_again() == 4
        assert torch.get_num_threads() == 4 and not list(tmp_path.iterdir())  # the claim is gone with the training
        torch.set_num_threads(1)  # a sweep trial's one thread stays one, however many cores are free
        with cores.SHARE.claim():
            assert _look_again() == 1
    finally:
        torch.set_num_threads(before)


def test_turned_off_a_process_claims_nothing_and_keeps_its_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNFLOW_CORES_DIR", str(tmp_path))
    monkeypatch.setenv("RNNFLOW_SHARE_CORES", "0")
    (tmp_path / f"{os.getppid()}.pid").touch()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cores.SHARE.claim():
            assert _look_again() == 2 and not (tmp_path / f"{os.getpid()}.pid").exists()
    finally:
        torch.set_num_threads(before)
