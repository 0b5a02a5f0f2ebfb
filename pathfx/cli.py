"""`pathfx ...`: one subcommand per module of pathfx/commands, and per entry point of the group
``pathfx.commands`` (each module defines NAME, HELP, add_arguments, run)."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import pkgutil
import sys

from passes.errors import PathfxError, VerificationError

from . import commands


def _command_modules():
    mods = [importlib.import_module(f"{commands.__name__}.{info.name}")
            for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_")]
    # other packages plug in their own commands; the CLI does not import them by name
    mods += [ep.load() for ep in importlib.metadata.entry_points(group="pathfx.commands")]
    return sorted(mods, key=lambda m: m.NAME)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pathfx", description="Rescaling groups, ENorm and path reparameterization "
                                                           "over torch.fx graphs")
    sub = p.add_subparsers(dest="command", required=True)
    for mod in _command_modules():
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(sp)
        sp.set_defaults(run=mod.run)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a report can name the command that made it
    try:
        code = args.run(args)
    except VerificationError as e:  # the run worked and found a difference: CI gates on exit 1
        print(f"pathfx: verification failed: {e}", file=sys.stderr)
        return 1
    except PathfxError as e:
        print(f"pathfx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
