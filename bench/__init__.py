"""Benchmarks of the captioning scripts and the merge, run from the repository root as modules:

    python -m bench.throughput --smoke

Each prints a table and writes JSON; bench/RESULTS.md records the runs. The project (utils/, the model scripts)
and the tests' tiny checkpoint builders (tests/*_checkpoint.py) are imported as packages from the root.
"""
