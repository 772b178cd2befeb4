"""diffusers (torch): diffusion transformers sharded on the token sequence, attention through
``sp_attention``.

Two attention processors replace diffusers' own, module by module, and two ready plans shard
the tokens where the models create them::

    import sp_common.integrations.diffusers as sp_diffusers

    with sp_diffusers.apply_flux_plan(model):  # model: a FluxTransformer2DModel
        out = model(hidden_states=x, encoder_hidden_states=text, img_ids=img_ids,
                    txt_ids=txt_ids, pooled_projections=pooled, timestep=t)
        # x [B, I, C], text [B, T, J], img_ids [I, 3], txt_ids [T, 3]: the same on every rank
        # out.sample [B, I, C], gathered on every rank
        loss(out.sample).backward()
        all_reduce_grads(model)  # now every grad equals the unsharded model's

- :class:`SPFluxAttnProcessor` (for ``FluxAttention``): Flux's joint text + image attention.
  The plan shards and pads each stream on its own (``hidden_states`` and its ``img_ids`` under
  the name ``"image"``, ``encoder_hidden_states`` and its ``txt_ids`` under ``"text"``), so each
  rank holds ``[its text chunk | its image chunk]``, with the rotary embeddings of exactly those
  tokens; attention masks both paddings with a ``key_mask`` and is exact for any ``T`` and ``I``.
- :class:`SPAttnProcessor` (for diffusers' ``Attention`` with ``AttnProcessor2_0``, as DiT's
  blocks use): self-attention over the sharded tokens, ``seq_len`` from the plan.
- :func:`flux_plan` / :func:`dit_plan`: the ``SPPlan`` s; :func:`apply_flux_plan` /
  :func:`apply_dit_plan` set the processors and apply the plan; ``remove()`` (or leaving the
  ``with`` block) restores both. DiT's tokens are made inside the model by ``pos_embed`` from
  the latent image ``[B, C, H, W]``, so the plan shards the input of the first transformer
  block (``[B, S, D] -> [B, s, D]``) and gathers the output of ``proj_out_2``, before the
  model's unpatchify.

Never silent: what ``sp_attention`` does not implement raises ``ValueError`` naming it (an
``attention_mask``, cross-attention, 4-d spatial inputs, group or spatial norms, another
processor such as an IP-adapter's), and the Flux processor on a sharded sequence outside its plan
(where it cannot know the two streams' lengths) raises instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import torch
    from diffusers import DiTTransformer2DModel, FluxTransformer2DModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import (
        FluxAttnProcessor,
        _get_qkv_projections,
    )
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sp_common.integrations.diffusers needs torch and diffusers; install them with "
        "pip install 'sp-sharding[torch,integrations-diffusers]'."
    ) from e

from ..api import sp_shard_with_padding, sp_world_size
from ..attention import sp_attention
from ..attention.api import Strategy
from ..plan import GatherOutput, PlanError, PlanRun, ShardInput, SPPlan, active_run, apply_plan

__all__ = [
    "IMAGE",
    "TEXT",
    "DiffusersPlan",
    "SPAttnProcessor",
    "SPFluxAttnProcessor",
    "apply_dit_plan",
    "apply_flux_plan",
    "dit_plan",
    "flux_plan",
    "set_sp_attention",
]

# The plans' names: the image tokens (gathered at the output) and the text tokens (consumed).
IMAGE = "image"
TEXT = "text"
IMAGE_IDS = "img_ids"
TEXT_IDS = "txt_ids"


def _refuse(func: str, what: str, todo: str) -> ValueError:
    return ValueError(
        f"{func}: {what}, which sequence-parallel attention does not implement; {todo}"
    )


class SPAttnProcessor:
    """Self-attention of a diffusers ``Attention`` module (what ``AttnProcessor2_0`` computes)
    through ``sp_attention`` over this rank's tokens.

    Shapes: ``hidden_states [B, s, C] -> [B, s, C_out]`` (``s``: this rank's tokens of the
    sequence the plan sharded under ``sequence``; its real length reaches attention from the
    plan, ``planned_seq_len``). Outside a plan the sequence is taken as unpadded and contiguous
    (sharded by hand with ``sp_shard``, or world size 1: plain attention).

    Raises:
        ValueError: ``encoder_hidden_states`` (cross-attention), an ``attention_mask``, a 4-d
            ``[B, C, H, W]`` input, a group or spatial norm (their statistics span the whole
            sequence), or a keyword this processor does not know.
    """

    def __init__(self, strategy: Strategy = "ulysses", sequence: str = IMAGE) -> None:
        self.strategy = strategy
        self.sequence = sequence

    def __call__(
        self,
        attn: Any,  # diffusers' Attention / FluxAttention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        func = "SPAttnProcessor (sp_common.integrations.diffusers)"
        todo = (
            "run this model unsharded with its own processor (model.set_default_attn_processor())"
        )
        if kwargs:
            raise _refuse(func, f"keyword arguments {sorted(kwargs)}", todo)
        if encoder_hidden_states is not None:
            raise _refuse(func, "encoder_hidden_states is given (cross-attention)", todo)
        if attention_mask is not None:
            raise _refuse(func, "an attention_mask is given", "call the model without it.")
        if hidden_states.ndim != 3:
            raise _refuse(
                func,
                f"hidden_states has shape {tuple(hidden_states.shape)}, not [B, s, C] tokens "
                "(a UNet's spatial [B, C, H, W] input)",
                todo,
            )
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise _refuse(func, "a group or spatial norm over the whole sequence", todo)
        residual = hidden_states
        batch, heads = hidden_states.shape[0], attn.heads
        query, key, value = (
            attn.to_q(hidden_states),
            attn.to_k(hidden_states),
            attn.to_v(hidden_states),
        )
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        run = active_run()
        seq_len = run.lengths.get(self.sequence) if run is not None else None
        # AttnProcessor2_0 leaves the scale to scaled_dot_product_attention: 1/sqrt(head_dim).
        out = sp_attention(query, key, value, strategy=self.strategy, seq_len=seq_len)
        out = attn.to_out[1](attn.to_out[0](out.reshape(batch, -1, heads * head_dim)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SPFluxAttnProcessor:
    """Flux's joint text + image attention (what ``FluxAttnProcessor`` computes) through
    ``sp_attention``, in the double-stream and the single-stream blocks.

    Shapes, with ``s_t`` / ``s_i`` this rank's (padded) text / image tokens::

        double-stream: hidden_states [B, s_i, C], encoder_hidden_states [B, s_t, C]
                       -> (image [B, s_i, C], text [B, s_t, C])
        single-stream: hidden_states [B, s_t + s_i, C] (text chunk first) -> [B, s_t + s_i, C]
        image_rotary_emb: (cos, sin) [s_t + s_i, D] of the same tokens

    q, k, v are ``[B, s_t + s_i, H, D]`` on each rank: rank r's text chunk then its image chunk.
    The joint sequence over all ranks is a permutation of the real one, which attention without
    a causal mask does not see, so a ``key_mask`` that drops both paddings makes it exact. The
    lengths come from the plan (:func:`flux_plan`: the names ``"text"`` and ``"image"``).

    Raises:
        ValueError: an ``attention_mask`` or another keyword; a sharded sequence (world size
            > 1) outside a planned forward pass that sharded ``"text"`` and ``"image"``.
    """

    def __init__(self, strategy: Strategy = "ulysses") -> None:
        self.strategy = strategy

    def __call__(
        self,
        attn: Any,  # diffusers' Attention / FluxAttention
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        func = "SPFluxAttnProcessor (sp_common.integrations.diffusers)"
        if kwargs:
            raise _refuse(
                func,
                f"keyword arguments {sorted(kwargs)} (joint_attention_kwargs)",
                "call the model without them.",
            )
        if attention_mask is not None:
            raise _refuse(
                func, "an attention_mask is given", "call the model without it (no prompt mask)."
            )
        query, key, value, text_q, text_k, text_v = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_q, text_k, text_v = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (text_q, text_k, text_v)
            )
            query = torch.cat([attn.norm_added_q(text_q), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_k), key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            rope: Any = image_rotary_emb  # diffusers annotates the (cos, sin) pair as tuple[Tensor]
            query = apply_rotary_emb(query, rope, sequence_dim=1)
            key = apply_rotary_emb(key, rope, sequence_dim=1)
        key_mask = _joint_key_mask(func, query, encoder_hidden_states)
        seq_len = None if key_mask is None else sp_world_size(query) * query.shape[1]
        out = sp_attention(
            query, key, value, strategy=self.strategy, seq_len=seq_len, key_mask=key_mask
        )
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split_with_sizes(
            [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def _joint_key_mask(
    func: str, query: torch.Tensor, text: torch.Tensor | None
) -> torch.Tensor | None:
    """This rank's key mask ``[s_t + s_i]`` (True = a real token) of the joint sequence ``[text
    chunk | image chunk]``, from the plan's lengths and pads; None at world size 1."""
    n = sp_world_size(query)
    if n == 1:
        return None
    run = active_run()
    if run is None or TEXT not in run.lengths or IMAGE not in run.lengths:
        raise ValueError(
            f"{func}: the sequence is sharded over {n} ranks, but no planned forward pass sharded "
            f"the streams {TEXT!r} and {IMAGE!r}, so the text and image lengths (and their "
            "padding) are unknown; apply the plan: apply_flux_plan(model)."
        )
    local_text, local_image = (_local_len(run, name, n) for name in (TEXT, IMAGE))
    have = (query.shape[1], None if text is None else text.shape[1])
    if have[0] != local_text + local_image or have[1] not in (None, local_text):
        raise PlanError(
            f"{func}: this rank holds {have[0]} joint tokens (text {have[1]}), but the plan "
            f"sharded {local_text} text and {local_image} image tokens per rank; shard "
            "encoder_hidden_states and hidden_states only through flux_plan()."
        )
    masks = [
        sp_shard_with_padding(
            torch.ones(run.lengths[name], dtype=torch.bool, device=query.device),
            0,
            pad_value=False,
            layout=run.layouts[name],
        )[0]
        for name in (TEXT, IMAGE)
    ]
    return torch.cat(masks)


def _local_len(run: PlanRun, name: str, n: int) -> int:
    return (run.lengths[name] + run.pads[name]) // n


def flux_plan() -> SPPlan:
    """The ``SPPlan`` of a ``FluxTransformer2DModel``: both streams and their rotary ids sharded
    at the model (each padded to a multiple of N on its own), the image gathered at ``proj_out``.

    Shapes: ``hidden_states [B, I, C] -> [B, ceil(I/N), C]`` and ``img_ids [I, 3] ->
    [ceil(I/N), 3]`` (name ``"image"`` / ``"img_ids"``); ``encoder_hidden_states [B, T, J] ->
    [B, ceil(T/N), J]`` and ``txt_ids [T, 3] -> [ceil(T/N), 3]`` (``"text"`` / ``"txt_ids"``,
    consumed); ``proj_out``'s ``[B, ceil(I/N), C_out] -> [B, I, C_out]``.
    """
    return SPPlan(
        {
            "": (
                ShardInput("hidden_states", dim=1, ndim=3, pad=True, name=IMAGE),
                ShardInput(
                    "encoder_hidden_states", dim=1, ndim=3, pad=True, name=TEXT, gather=False
                ),
                ShardInput("img_ids", dim=0, ndim=2, pad=True, name=IMAGE_IDS, gather=False),
                ShardInput("txt_ids", dim=0, ndim=2, pad=True, name=TEXT_IDS, gather=False),
            ),
            "proj_out": GatherOutput(dim=1, ndim=3, name=IMAGE),
        }
    )


def dit_plan() -> SPPlan:
    """The ``SPPlan`` of a ``DiTTransformer2DModel``: the patch tokens sharded after
    ``pos_embed`` made them (at the first transformer block), gathered at ``proj_out_2``.

    Shapes: ``[B, S, D] -> [B, ceil(S/N), D]`` (``S = (H/p) * (W/p)``, name ``"image"``) and
    ``[B, ceil(S/N), p*p*C] -> [B, S, p*p*C]``; the model's unpatchify then sees every token.
    """
    return SPPlan(
        {
            "transformer_blocks.0": ShardInput(
                "hidden_states", dim=1, ndim=3, pad=True, name=IMAGE
            ),
            "proj_out_2": GatherOutput(dim=1, ndim=3, name=IMAGE),
        }
    )


class DiffusersPlan:
    """An applied plan and the processors it set; ``remove()`` (or leaving the ``with`` block)
    restores the model's own processors and takes the plan's hooks off."""

    def __init__(self, restore: Callable[[], None], plan_handle: Any = None) -> None:
        self._restore = restore
        self._plan_handle = plan_handle

    def remove(self) -> None:
        if self._plan_handle is not None:
            self._plan_handle.remove()
        self._restore()

    def __enter__(self) -> DiffusersPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def set_sp_attention(model: torch.nn.Module, *, strategy: Strategy = "ulysses") -> DiffusersPlan:
    """Replace every attention processor of ``model``: ``FluxAttnProcessor`` by
    :class:`SPFluxAttnProcessor`, ``AttnProcessor2_0`` / ``AttnProcessor`` by
    :class:`SPAttnProcessor`; return the handle that puts the old ones back.

    Raises:
        ValueError: a module with another processor (IP-adapter, LoRA-fused or custom
            processors), named by its path and class; nothing is replaced then.
    """
    replaced: list[tuple[Any, Any, Any]] = []
    for path, module in model.named_modules():
        old = getattr(module, "processor", None)
        if old is None or not callable(getattr(module, "set_processor", None)):
            continue
        if type(old) is FluxAttnProcessor:
            new: Any = SPFluxAttnProcessor(strategy)
        elif type(old) in (AttnProcessor2_0, AttnProcessor):
            new = SPAttnProcessor(strategy)
        else:
            raise ValueError(
                f"set_sp_attention: {path} ({type(module).__name__}) has the processor "
                f"{type(old).__name__}, which has no sequence-parallel version; call "
                "model.set_default_attn_processor() (or FluxAttnProcessor()) first, or run the "
                "model unsharded."
            )
        replaced.append((module, old, new))
    if not replaced:
        raise ValueError(
            f"set_sp_attention: {type(model).__name__} has no attention processors to replace; "
            "pass a diffusers transformer (e.g. FluxTransformer2DModel)."
        )
    for module, _, new in replaced:
        module.set_processor(new)

    def restore() -> None:
        for module, old, _ in replaced:
            module.set_processor(old)

    return DiffusersPlan(restore)


def _apply(model: Any, cls: Any, plan: SPPlan, strategy: Strategy) -> DiffusersPlan:
    func = f"apply_{'flux' if cls is FluxTransformer2DModel else 'dit'}_plan"
    if not isinstance(model, cls):
        raise TypeError(
            f"{func}: model is a {type(model).__name__}, expected a {cls.__name__}; write an "
            "SPPlan for it and call set_sp_attention(model) with apply_plan(model, plan)."
        )
    processors = set_sp_attention(model, strategy=strategy)
    try:
        plan_handle = apply_plan(model, plan)
    except BaseException:
        processors.remove()
        raise
    return DiffusersPlan(processors.remove, plan_handle)


def apply_flux_plan(
    model: FluxTransformer2DModel, *, strategy: Strategy = "ulysses"
) -> DiffusersPlan:
    """Shard a ``FluxTransformer2DModel`` on both token streams: :func:`set_sp_attention` and
    :func:`flux_plan`. Each call passes the full, unsharded inputs, the same on every rank::

        hidden_states [B, I, C], encoder_hidden_states [B, T, J], img_ids [I, 3],
        txt_ids [T, 3], pooled_projections [B, P], timestep [B] -> sample [B, I, C_out]

    Any ``I`` and ``T`` (padded to multiples of N, each on its own). After ``backward()`` call
    ``sp_common.all_reduce_grads(model)``. 3-d ids (deprecated in diffusers) raise ``PlanError``:
    pass ``img_ids[0]``.
    """
    return _apply(model, FluxTransformer2DModel, flux_plan(), strategy)


def apply_dit_plan(
    model: DiTTransformer2DModel, *, strategy: Strategy = "ulysses"
) -> DiffusersPlan:
    """Shard a ``DiTTransformer2DModel`` on its patch tokens: :func:`set_sp_attention` and
    :func:`dit_plan`. Each call passes the full latent, the same on every rank::

        hidden_states [B, C, H, W], timestep [B], class_labels [B] -> sample [B, C_out, H, W]

    ``S = (H/p) * (W/p)`` tokens, any count (padded to a multiple of N). After ``backward()`` call
    ``sp_common.all_reduce_grads(model)``.
    """
    return _apply(model, DiTTransformer2DModel, dit_plan(), strategy)
