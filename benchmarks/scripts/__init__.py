"""Scripts that print tables and write results; run from the repository root with PYTHONPATH=.
(`python benchmarks/scripts/NAME.py ...`), and importable as `benchmarks.scripts.NAME`."""
