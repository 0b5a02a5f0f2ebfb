"""The lab's subcommands of the `pathfx` CLI (declared as entry points in pyproject.toml)."""
