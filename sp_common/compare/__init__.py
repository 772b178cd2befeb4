"""``sp-compare``: the sp_common ops on torch ranks and a JAX mesh, side by side (tooling).

``cli`` parses and runs, ``cases`` defines the cases and their numpy references, ``run_torch`` /
``run_jax`` run them on each framework, ``report`` writes the table, JSON and plot. Importing
this package imports no framework and no optional dependency.
"""

from .cli import main

__all__ = ["main"]
