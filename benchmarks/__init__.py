"""Benchmarks of sp_common (``make bench``): run ``python -m benchmarks.run`` from the repository
root. Not part of the test suite; see ``run.py``."""
