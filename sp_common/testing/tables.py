"""The one text-table writer of the tools (tabulate, from the ``compare`` extra)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``rows`` under ``headers`` as a plain text table (columns aligned, a rule under the
    headers). Needs ``tabulate``: ``pip install 'sp-sharding[compare]'``."""
    try:
        from tabulate import tabulate
    except ImportError as e:
        raise ImportError(
            "format_table needs tabulate; install the tools' extra: "
            "pip install 'sp-sharding[compare]'"
        ) from e
    return str(
        tabulate(
            [list(r) for r in rows], headers=list(headers), tablefmt="simple", disable_numparse=True
        )
    )
