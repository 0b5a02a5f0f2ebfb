"""Compiler passes of pathfx: pure functions over torch.fx GraphModules."""
