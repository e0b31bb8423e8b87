"""Manage registered models: ``python -m flows.models list|show|promote|rollback|compare|register``.

promote and compare score the versions again, side by side on the same data (the champion's
evaluation data for promote), rather than trusting numbers from different test sets. register
finishes a run whose tracking server went away after training, from the folder it kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows import exit_process
from flows.parsing import Parser, command_line
from tasks.reevaluate import METRIC, evaluation_data, kind_of, score
from tasks.registry import (
    RegistryError,
    champion_version,
    client,
    get_version,
    refusals_in_one_line,
    rollback_champion,
    set_champion,
)
from tasks.tracking import CHAMPION, TrackingRefused

KEY_METRIC = {"forecaster": "test_mase", "charlm": "val_bpc"}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_list(args) -> str:
    c = client()
    rows = []
    for m in sorted(c.search_registered_models(), key=lambda m: m.name):
        for v in sorted(c.search_model_versions(f"name='{m.name}'"), key=lambda v: int(v.version)):
            kind, aliases = v.tags.get("kind", "?"), [a for a, n in m.aliases.items() if str(n) == str(v.version)]
            rows.append([m.name, v.version, ",".join(aliases) or "-", kind,
                         f"{KEY_METRIC.get(kind, '?')}={v.tags.get(KEY_METRIC.get(kind, ''), '?')}", v.run_id[:12]])
    if not rows:
        return "no registered models"
    return _table(rows, ["model", "version", "aliases", "kind", "key metric", "run"])


def cmd_show(args) -> str:
    v = get_version(args.name, args.ref)
    run = client().get_run(v.run_id)
    out = [f"{v.name} v{v.version}  aliases: {', '.join(v.aliases) or '-'}  run: {v.run_id}",
           f"source: {v.tags.get('source', '?')}",
           f"data sha256: {v.tags.get('data_sha256') or v.tags.get('corpus_sha256', '?')}",
           f"promotion: {v.tags.get('promotion_reason', '-')}", "", "metrics:"]
    out += [f"  {k} = {val:.6g}" for k, val in sorted(run.data.metrics.items())]
    out += ["", "params:"] + [f"  {k} = {val}" for k, val in sorted(run.data.params.items())]
    return "\n".join(out)


def cmd_promote(args) -> str:
    candidate = get_version(args.name, args.version)
    current = champion_version(args.name)
    if current is not None and str(current.version) == str(candidate.version):
        return f"{args.name} v{candidate.version} is already {CHAMPION}"
    if current is not None and not args.force:
        data = evaluation_data(current)
        new, old = score(candidate, data), score(current, data)
        metric = METRIC[data.kind]
        if not new < old:
            raise RegistryError(f"refusing: v{candidate.version}'s {metric} {new:.4g} is not better than champion "
                                f"v{current.version}'s {old:.4g} on {data.description}; use --force to promote anyway")
        why = f"promoted by hand: {metric} {new:.4g} < {old:.4g} on {data.description}"
    else:
        why = "promoted by hand" + (" (--force)" if args.force else ": no champion yet")
    set_champion(args.name, candidate.version, why)
    return f"{args.name}@{CHAMPION} -> v{candidate.version} ({why})"


def cmd_rollback(args) -> str:
    old, new = rollback_champion(args.name)
    return f"{args.name}@{CHAMPION} -> v{new} (rolled back from v{old})"


def cmd_compare(args) -> str:
    a, b = get_version(args.name, args.a), get_version(args.name, args.b)
    base = get_version(args.name, args.on) if args.on else a
    data = evaluation_data(base)
    rows = [[f"v{v.version}", ",".join(v.aliases) or "-", kind_of(v), f"{score(v, data):.5g}"] for v in (a, b)]
    return f"on {data.description}:\n" + _table(rows, ["version", "aliases", "kind", METRIC[data.kind]])


def cmd_register(args) -> int:
    """Register the model trained in a kept checkpoint folder: the run is finished by its own
    flow, which resumes from the folder's finished checkpoints (nothing is trained again),
    backtests, and applies the same champion gate; the folder goes once it is registered."""
    import importlib

    from flows.cli import checkpoint_dir, load_run, run_config
    from tasks.config import CharLMFlowConfig, ConfigError, TimeSeriesConfig

    folder = Path(args.path).resolve()
    try:
        flow, params, data_sha256 = load_run(folder)
        cfg = {"timeseries": TimeSeriesConfig, "charlm": CharLMFlowConfig}[flow](
            **{**params, "resume": True, **({"model_name": args.name} if args.name else {})})
        target = checkpoint_dir(cfg, data_sha256)  # the folder a run of this name looks in
        if target != folder and target.exists():
            raise ConfigError(f"{target} exists already; remove it or register under another --name")
    except ConfigError as e:  # not a checkpoint folder, a --name MLflow would refuse, or one taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    if target != folder:
        folder.rename(target)
    module = importlib.import_module(f"flows.{flow}")

    def check(cfg):
        if module.check_input(cfg) != target:
            raise ConfigError(f"{folder}: the data it was trained on (sha256 {data_sha256[:12] or 'generated'}) has "
                              f"changed since, so the model would be trained again; run the flow instead")
        return target

    return run_config(cfg, getattr(module, f"{flow}_flow"), check)


def parser() -> Parser:
    p = Parser(prog="python -m flows.models",
               description=__doc__.split("\n")[0].replace("python -m flows.models", command_line("flows.models")))
    sub = p.add_subparsers(dest="command", required=True)

    def command(run, help: str, *positionals: str) -> Parser:
        s = sub.add_parser(run.__name__.removeprefix("cmd_"), help=help)
        for name in positionals:
            s.add_argument(name)
        s.set_defaults(command=run)
        return s

    command(cmd_list, "registered models, versions, aliases and key metrics")
    s = command(cmd_show, "one version: params, metrics, source run, data hash", "name")
    s.add_argument("ref", nargs="?", default=CHAMPION, help="version number or alias (default: champion)")
    s = command(cmd_promote, "make a version the champion if it is better on the champion's data", "name", "version")
    s.add_argument("--force", action="store_true", help="promote even if it is not better")
    command(cmd_rollback, "move champion back to the previous champion", "name")
    s = command(cmd_compare, "score two versions again on the same data", "name", "a", "b")
    s.add_argument("--on", default="", help="whose data to score on (default: the first version's)")
    s = command(cmd_register, "register the model a run kept on disk when the tracking server was away")
    s.add_argument("path", help="the checkpoint folder the run named")
    s.add_argument("--name", default="", help="registered model name (default: the run's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is cmd_register:
        return cmd_register(args)
    verb = args.command.__name__.removeprefix("cmd_")
    try:
        with refusals_in_one_line(f"{verb} model {args.name!r}" if "name" in args else f"{verb} models"):
            print(args.command(args))
    except (RegistryError, TrackingRefused) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())
