"""The project's benchmarks (README.md here: which script answers which question, and the command
behind each committed JSON).

Scripts are run from the repository root as ``python3 bench/<script>.py ...``; each puts the root
on ``sys.path`` so that ``cogvid_core`` and ``bench.common`` (the helpers every script shares)
import. This file makes ``bench`` a regular package, so an installed package of that name cannot
shadow it. The JSON files here are raw measurements: never edited, only added.
"""
