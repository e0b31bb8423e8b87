"""The command line: generated from the config dataclass, errors that name the option."""

import subprocess
import sys
from dataclasses import fields

from tasks.config import TimeSeriesConfig, flag


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flows.timeseries", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_config_field():
    out = _cli("--help")
    assert out.returncode == 0
    for f in fields(TimeSeriesConfig):
        assert flag(f.name) in out.stdout, f.name
    assert "{rnn,lstm,gru,elman}" in out.stdout and "{standard,minmax,none}" in out.stdout


def test_bad_option_value_exits_2_naming_it():
    out = _cli("--horizon", "0")
    assert out.returncode == 2 and "--horizon must be at least 1, got 0" in out.stderr
    out = _cli("--cell", "tcn")
    assert out.returncode == 2 and "invalid choice: 'tcn'" in out.stderr
