"""Adapters that run model libraries' attention through ``sp_attention``.

Each adapter is its own module, imported only when named; importing ``sp_common.integrations``
imports no framework and no model library:

- :mod:`sp_common.integrations.transformers`: an attention implementation registered with
  transformers' ``AttentionInterface`` (``attn_implementation="sp_attention"``) and a plan that
  shards a causal LM's tokens and RoPE positions (extra ``integrations-transformers``).
- :mod:`sp_common.integrations.diffusers`: attention processors (Flux's joint text + image
  attention included) and plans for ``FluxTransformer2DModel`` and ``DiTTransformer2DModel``
  (extra ``integrations-diffusers``).
- :mod:`sp_common.integrations.flax`: an ``attention_fn`` for ``nnx.MultiHeadAttention`` and a
  plan for nnx models through ``nnx.split`` / ``nnx.merge`` (extra ``integrations-flax``).
- :mod:`sp_common.integrations.keras`: ``SPMultiHeadAttention`` and the ``SPShard`` /
  ``SPGather`` layers for Keras 3 on the torch and the jax backend, ``sync_gradients`` for
  ``model.fit`` on torch and ``jax_forward`` for ``shard_map`` on JAX (extra
  ``integrations-keras``).
"""

from __future__ import annotations

__all__: list[str] = []
