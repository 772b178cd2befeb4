"""Attention over a sequence-sharded input, written once over the backend primitives.

:func:`sp_attention` is the entry point; every strategy has one contract:
the result equals full attention over the unsharded sequence at the real positions, forward and
gradients. ``checks`` holds the shared argument checks, ``masks`` the key masks, ``heads`` how
heads split over ranks; ``ulysses``, ``allgather_kv`` and ``ring`` (with ``blocks``, its
tile math) are the strategies, ``select`` the rule of ``strategy="auto"`` (USP comes next).
"""

from .api import sp_attention, sp_ulysses_attention
from .masks import sp_padding_mask

__all__ = ["sp_attention", "sp_padding_mask", "sp_ulysses_attention"]
