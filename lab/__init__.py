"""The lab: training harness, data sets, diagnostics, experiments and their report, plots.

It stands beside the compiler and uses only pathfx's public API (and the zoo's models); `import
pathfx` never loads it. Its commands (`pathfx train`, `experiments`, `observe`, `diagnose`,
`enorm`) reach the CLI through the entry-point group ``pathfx.commands``.
"""
