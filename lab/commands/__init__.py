"""The lab's subcommands of the `pathfx` CLI (entry-point group ``pathfx.commands``), and what they share."""
from __future__ import annotations

import shlex

from pathfx import InputError


def names(text: str) -> tuple:
    """The items of a comma-separated option."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def seeds(text: str) -> tuple:
    try:
        return tuple(int(s) for s in names(text))
    except ValueError:
        raise InputError(f"--seeds '{text}' does not parse: expected integers like 0,1,2") from None


def command_line(args, default: str) -> str:
    """The command that is running, for a report to name (``default`` when called from Python)."""
    argv = getattr(args, "argv", None)
    return "pathfx " + shlex.join(argv) if argv else default
