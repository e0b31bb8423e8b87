"""The argument parser of every rnnflow command line. A mistake is one line naming it, with the
closest match when there is one, and exit status 2 (never the whole usage block):

    rnnflow forecast: error: unrecognized option --hiden-size (did you mean --hidden-size?)

A module's command line is named as the user ran it: ``python -m flows.timeseries``, or
``rnnflow forecast`` when ``flows.command`` runs it (``COMMANDS``). Light on purpose: ``rnnflow
--help`` imports this and nothing of torch, Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable

# module -> the rnnflow command that runs it ("flows.timeseries" -> "rnnflow forecast"), filled by
# flows.command while it runs; empty under ``python -m flows.X``
COMMANDS: dict[str, str] = {}
_OWNER = "_rnnflow_parser_with_extras"  # on a namespace: the (sub)parser that left arguments over


def command_line(module: str) -> str:
    """How the user runs ``module``'s command line: ``rnnflow COMMAND`` or ``python -m module``."""
    return COMMANDS.get(module, f"python -m {module}")


def did_you_mean(word: str, candidates: Iterable) -> str:
    """`` (did you mean X?)`` with the candidate closest to ``word``, or '' when none is close."""
    match = difflib.get_close_matches(word, [str(c) for c in candidates], n=1)
    return f" (did you mean {match[0]}?)" if match else ""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line with a did-you-mean. Subcommands'
    parsers (``add_subparsers``) are of this class too."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        if prog and prog.startswith("python -m "):
            prog = command_line(prog.removeprefix("python -m "))
        super().__init__(*args, prog=prog, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(ns, _OWNER):  # a subcommand's parser returns first: it is the one to name
            setattr(ns, _OWNER, self)
        return ns, extras

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        owner = vars(ns).pop(_OWNER, self)
        if extras:
            owner.error(owner.unrecognized(extras))
        return ns

    def unrecognized(self, extras: list[str]) -> str:
        options = [a.partition("=")[0] for a in extras if a.startswith("-") and a != "-"]
        if not options:
            return f"unrecognized argument {extras[0]!r}"
        known = [s for s in self._option_string_actions if s.startswith("--")]
        return f"unrecognized option{'s' if len(options) > 1 else ''} " + ", ".join(
            o + did_you_mean(o, known) for o in options)

    def _check_value(self, action, value):
        # argparse's own check, with the closest choice instead of the list when one is close
        if action.choices is not None and value not in action.choices:
            hint = did_you_mean(value, action.choices) or f" (choose from {', '.join(map(str, action.choices))})"
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint}")
