"""Shared test helpers."""
from passes.soundness import lively_init as lively  # noqa: F401
