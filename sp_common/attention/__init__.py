"""Attention over a sequence-sharded input, written once over the backend primitives.

Strategies (``ulysses`` today) share one contract: the result equals full attention over the
unsharded sequence at the real positions, forward and gradients.
"""

from .ulysses import sp_padding_mask, sp_ulysses_attention

__all__ = ["sp_padding_mask", "sp_ulysses_attention"]
