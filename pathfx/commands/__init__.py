"""Subcommands of the `pathfx` CLI."""
