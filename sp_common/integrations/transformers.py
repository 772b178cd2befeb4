"""transformers (torch): causal LMs sharded on the sequence, attention through ``sp_attention``.

Importing this module registers the attention implementation ``"sp_attention"`` with
transformers' ``AttentionInterface`` (and its mask function with ``AttentionMaskInterface``), so
any model whose attention goes through that interface (Llama, Qwen3, Mistral, ...) runs it::

    import sp_common.integrations.transformers as sp_hf

    model = LlamaForCausalLM(config)  # config built with attn_implementation="sp_attention"
    with sp_hf.apply_causal_lm_plan(model):
        out = model(input_ids=ids, labels=labels)  # ids, labels: [B, S], the same on every rank
        out.loss.backward()                        # out.logits: [B, S, V], gathered
        all_reduce_grads(model)                    # now every grad equals the unsharded one

:func:`apply_causal_lm_plan` applies an ``SPPlan`` (``input_ids [B, S] -> [B, s]`` at the
model, the output embedding's ``[B, s, V] -> [B, S, V]`` gathered) and shards the optional
inputs with the sequence: ``position_ids`` (built as ``arange(S)`` when the call passes none,
then sharded, so that RoPE sees each token's global position) and the 2-d padding
``attention_mask``. A length the world size does not divide is padded; the real length reaches
attention through the plan (``planned_seq_len``), and so does the layout (``layout="zigzag"``
balances causal work). The hook always passes the model a mask (all ones when the call has
none), so that transformers never reads the shards' positions, which jump under zigzag and at
the padding, as packed sequences; a call whose own ``position_ids`` jump, with no mask, is
refused as packed sequences. Sharding by hand (``sp_shard`` of the tokens and positions, no
plan) works for lengths the world size divides: outside a plan attention takes the sequence as
unpadded and contiguous.

Positions, the silent failure this module guards against: a transformers model called on a
sharded sequence without ``position_ids`` numbers every rank's tokens from 0. The plan always
shards the positions, and records that it did. Without the plan (sequences sharded by hand, or
a plan of your own that does not shard them) the attention function checks, once per
``position_ids`` tensor (so once per forward pass), whether a rank that does not hold the first
tokens sees the positions ``0 .. s-1``, and then raises ``ValueError`` on every rank (one small
all-gather of a flag). It cannot check a model that does not pass ``position_ids`` down to
attention.

Masks: causal (or non-causal, from ``module.is_causal``) attention, grouped KV heads and a 2-d
padding mask are exact. Everything else transformers can build (sliding windows, chunked or
packed-sequence masks, image-token overlays, custom 4-d masks, soft-capping, attention sinks,
attention dropout, a KV cache) raises ``ValueError`` naming it, never silently ignored.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any, Literal

try:
    import torch
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sp_common.integrations.transformers needs torch and transformers; install them with "
        "pip install 'sp-sharding[torch,integrations-transformers]'."
    ) from e

from ..api import sp_gather, sp_rank, sp_world_size
from ..attention import sp_attention
from ..attention.api import Strategy
from ..layouts import Layout, check_layout
from ..plan import (
    GatherOutput,
    PlanError,
    PlanRun,
    ShardInput,
    SPPlan,
    active_run,
    apply_plan,
    planned_seq_len,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CausalLMPlan",
    "apply_causal_lm_plan",
    "causal_lm_plan",
    "register_sp_attention",
    "sp_attention_forward",
    "sp_attention_mask",
]

ATTN_IMPLEMENTATION = "sp_attention"
# The plan's names: the token sequence (paired with the gather of the logits), and the two
# inputs consumed with it.
SEQUENCE = "sequence"
POSITIONS = "position_ids"
PADDING_MASK = "attention_mask"

# Keyword arguments transformers passes to attention functions that change what attention
# computes; sp_attention implements none of them, so a value other than None raises.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping (Gemma 2)",
    "sliding_window": "sliding-window attention",
    "s_aux": "attention sinks (gpt-oss)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (T5-style)",
    "cu_seq_lens_q": "packed sequences (cumulative lengths)",
    "cu_seq_lens_k": "packed sequences (cumulative lengths)",
}


def register_sp_attention(
    name: str = ATTN_IMPLEMENTATION, *, strategy: Strategy = "ulysses"
) -> str:
    """Register :func:`sp_attention_forward` with ``strategy`` as the attention implementation
    ``name`` (and :func:`sp_attention_mask` as its mask function); return ``name``, to pass as
    ``attn_implementation=name``. Importing this module registers ``"sp_attention"`` with the
    default strategy (``"ulysses"``); register another name for another strategy, e.g.
    ``register_sp_attention("sp_ring", strategy="ring")``. Strategies differ only in cost.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"register_sp_attention: name must be a non-empty str, got {name!r}; pass e.g. "
            "'sp_attention'."
        )
    AttentionInterface.register(name, functools.partial(sp_attention_forward, strategy=strategy))
    AttentionMaskInterface.register(name, functools.partial(sp_attention_mask, name=name))
    return name


def sp_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    *,
    name: str = ATTN_IMPLEMENTATION,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function of the ``"sp_attention"`` implementation (transformers'
    ``AttentionMaskInterface``; ``create_causal_mask`` calls it with this rank's lengths).

    Shapes: ``attention_mask`` bool ``[B, s]`` (this rank's shard of the 2-d padding mask, True =
    token) or None ``->`` the same, passed to :func:`sp_attention_forward` as the key mask
    (causality is not materialized: ``sp_attention`` applies it over the global positions).

    Raises:
        ValueError: a mask other than the plain causal one (sliding window, chunked, packed
            sequences, image-token overlays, bidirectional), a KV cache (``q_offset``,
            ``kv_offset`` or ``kv_length != q_length``), or a padding mask of another shape.
    """
    func = f"attn_implementation={name!r} (sp_common.integrations.transformers)"
    if mask_function is not causal_mask_function:
        what = getattr(mask_function, "__qualname__", repr(mask_function))
        raise ValueError(
            f"{func}: the model builds the mask {what!r}, not the plain causal mask; "
            "sp_attention computes causal attention with a 2-d padding mask only (sliding "
            "windows, chunked or packed-sequence masks, bidirectional and image-token overlays "
            "are not implemented). Run this model with attn_implementation='sdpa' unsharded, or "
            "configure it without them (e.g. use_sliding_window=False)."
        )
    offsets = [int(o) for o in (q_offset, kv_offset)]
    if any(offsets) or kv_length != q_length:
        raise ValueError(
            f"{func}: q_offset={offsets[0]}, kv_offset={offsets[1]}, kv_length={kv_length} for "
            f"q_length={q_length}: the model attends a KV cache, which sequence-parallel "
            "attention does not implement; call the model with use_cache=False and no cache, "
            "and generate with attn_implementation='sdpa'."
        )
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != (batch_size, kv_length):
        raise ValueError(
            f"{func}: attention_mask has shape {tuple(attention_mask.shape)}, expected "
            f"[batch, keys] = [{batch_size}, {kv_length}] (this rank's shard of the [B, S] "
            "padding mask); shard it with the sequence (apply_causal_lm_plan does)."
        )
    if active_run() in _UNMASKED:
        return None  # the call had no mask: no key mask (sp_attention's seq_len drops padding)
    return attention_mask.to(torch.bool)


def sp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    strategy: Strategy = "ulysses",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' ``AttentionInterface``: ``sp_attention`` over
    this rank's shard of the sequence.

    Shapes (transformers' layout, ``s`` = this rank's tokens)::

        query [B, Hq, s, D], key [B, Hkv, s, D], value [B, Hkv, s, Dv]
        -> (attn_output [B, s, Hq, Dv], None)

    ``attention_mask``: None or this rank's bool padding mask ``[B, s]`` (what
    :func:`sp_attention_mask` returns). Causal unless ``is_causal=False`` is passed or
    ``module.is_causal`` is False. ``seq_len`` and ``layout`` come from the planned forward
    pass when one is running (:func:`apply_causal_lm_plan`), else the sequence is taken as
    unpadded and contiguous. No attention weights are returned.

    Raises:
        ValueError: attention dropout, an unsupported keyword (soft-capping, sliding window,
            sinks, position bias, packed sequences), ``output_attentions=True``, a mask that is
            not a 2-d padding mask, or ``position_ids`` numbered from 0 on a rank that does not
            hold the first tokens (see the module docstring).
    """
    func = "sp_attention_forward (attn_implementation='sp_attention')"
    if dropout:
        raise ValueError(
            f"{func}: dropout={dropout!r}; sp_attention has no attention dropout. Set the "
            "config's attention_dropout=0.0 (or call model.eval())."
        )
    for keyword, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(keyword) is not None:
            raise ValueError(
                f"{func}: {keyword}={kwargs[keyword]!r} asks for {what}, which sp_attention "
                "does not implement; configure the model without it or use "
                "attn_implementation='sdpa' unsharded."
            )
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"{func}: output_attentions=True, but sequence-parallel attention never forms the "
            "attention weights; call the model with output_attentions=False."
        )
    key_mask = _key_mask(func, attention_mask, query)
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    run = active_run()
    seq_len = planned_seq_len(SEQUENCE) if run is not None and SEQUENCE in run.lengths else None
    layout = _planned_layout(run)
    _check_positions(func, kwargs.get("position_ids"), query, layout, run)
    out = sp_attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        strategy=strategy,
        causal=causal,
        seq_len=seq_len,
        key_mask=key_mask,
        scale=scaling,
        layout=layout,
    )
    return out, None


def _key_mask(func: str, mask: Any, query: torch.Tensor) -> torch.Tensor | None:
    """``mask`` as ``sp_attention``'s key mask (bool ``[B, s]``), or ValueError for anything
    that is not a 2-d padding mask of this rank's keys."""
    if mask is None:
        return None
    batch, s = query.shape[0], query.shape[2]
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, s):
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise ValueError(
            f"{func}: attention_mask is {shape}, expected None or this rank's 2-d padding mask "
            f"[B, s] = [{batch}, {s}]; sp_attention takes causal attention plus a padding mask "
            "only. Pass the model a 2-d attention_mask [B, S] (1 = token, 0 = padding) instead "
            "of a 4-d or block mask, or use attn_implementation='sdpa' unsharded."
        )
    return mask.to(torch.bool)


def _planned_layout(run: PlanRun | None) -> Layout:
    """The layout the planned forward pass sharded its sequences in (``contiguous`` outside
    one; ``sp_attention`` raises if the plan used several)."""
    used = sorted(set(run.layouts.values())) if run is not None else []
    return check_layout("sp_attention_forward", used[0] if used else "contiguous")


# The position_ids tensor last checked on this thread: every layer of one forward pass gets the
# same tensor, so the check (and its all-gather) runs once per pass.
_CHECKED = threading.local()


def _check_positions(
    func: str, position_ids: Any, like: torch.Tensor, layout: Layout, run: PlanRun | None
) -> None:
    """ValueError on every rank when some rank that does not hold the sequence's first tokens
    sees ``position_ids`` ``0 .. s-1``: the model numbered its shard from 0 (it was called on a
    sharded sequence without positions). Skipped when the plan sharded the positions."""
    if run is not None and POSITIONS in run.lengths:
        return
    if not isinstance(position_ids, torch.Tensor) or sp_world_size(like) == 1:
        return
    last = getattr(_CHECKED, "ref", None)
    if last is not None and last() is position_ids:
        return
    s = position_ids.shape[-1]
    holds_first = layout == "contiguous" and sp_rank(like) == 0
    local = torch.arange(s, device=position_ids.device)
    numbered_locally = not holds_first and bool((position_ids == local).all())
    flag = torch.tensor([int(numbered_locally)], dtype=torch.int32, device=position_ids.device)
    ranks = [r for r, f in enumerate(sp_gather(flag, 0).tolist()) if f]
    _CHECKED.ref = weakref.ref(position_ids)
    if ranks:
        raise ValueError(
            f"{func}: position_ids on ranks {ranks} are 0..{s - 1}, numbered from 0 on the "
            "rank's own shard, so RoPE would give their tokens the wrong positions: the model "
            "was called on a sharded sequence without position_ids. Use "
            "apply_causal_lm_plan(model) (it shards input_ids and builds the positions), or "
            "pass position_ids sharded like the tokens: "
            "sp_shard(torch.arange(S)[None], dim=1, layout=...)."
        )


# Planned forward passes whose call passed no attention_mask: the mask the input hook built is
# all ones, so the mask function passes no key mask (the same decision on every rank).
_UNMASKED: weakref.WeakSet[PlanRun] = weakref.WeakSet()

InputName = Literal["input_ids", "inputs_embeds"]


def _output_path(model: torch.nn.Module) -> str:
    """The path of ``model``'s output embedding (``lm_head``), where the plan gathers."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for path, module in model.named_modules():
        if head is not None and module is head:
            return path
    raise PlanError(
        f"causal_lm_plan: {type(model).__name__} has no output embedding (get_output_embeddings() "
        f"is {head!r}), so there is no [B, s, V] logits output to gather; pass "
        "gather_at='<path of the module whose [B, s, H] output to gather>' (e.g. 'norm')."
    )


def causal_lm_plan(
    model: torch.nn.Module,
    *,
    inputs: InputName = "input_ids",
    layout: Layout = "contiguous",
    gather_at: str | None = None,
) -> SPPlan:
    """The ``SPPlan`` of a transformers causal LM: shard ``inputs`` at the model, gather the
    logits at the output embedding (or the 3-d output of ``gather_at``).

    Shapes: ``input_ids [B, S] -> [B, s]`` (``inputs_embeds [B, S, H] -> [B, s, H]``), padded to
    a multiple of N (zigzag: 2N) under the name ``"sequence"``; logits ``[B, s, V] -> [B, S, V]``.

    On its own it shards neither ``position_ids`` nor ``attention_mask``:
    :func:`apply_causal_lm_plan` applies it together with the hook that does.
    """
    if inputs not in ("input_ids", "inputs_embeds"):
        raise ValueError(
            f"causal_lm_plan: inputs={inputs!r}; pass 'input_ids' or 'inputs_embeds' (the "
            "argument the model is called with)."
        )
    ndim = 2 if inputs == "input_ids" else 3
    path = _output_path(model) if gather_at is None else gather_at
    return SPPlan(
        {
            "": ShardInput(inputs, dim=1, ndim=ndim, pad=True, name=SEQUENCE, layout=layout),
            path: GatherOutput(dim=1, ndim=3, name=SEQUENCE),
        }
    )


class CausalLMPlan:
    """A causal LM's applied plan and its input hook; ``remove()`` (or leaving the ``with``
    block) takes both off, leaving the model as it was."""

    def __init__(self, plan_handle: Any, hook_handle: Any) -> None:
        self._plan_handle = plan_handle
        self._hook_handle = hook_handle

    def remove(self) -> None:
        self._hook_handle.remove()
        self._plan_handle.remove()

    def __enter__(self) -> CausalLMPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_causal_lm_plan(
    model: PreTrainedModel,
    *,
    inputs: InputName = "input_ids",
    layout: Layout = "contiguous",
    gather_at: str | None = None,
) -> CausalLMPlan:
    """Shard a transformers causal LM on the sequence: :func:`causal_lm_plan` plus a hook that
    shards ``position_ids`` and ``attention_mask`` with the tokens, on every forward pass.

    Each call passes the full, unsharded inputs, the same on every rank::

        input_ids [B, S] (or inputs_embeds [B, S, H]), position_ids [B | 1, S] (default
        arange(S)), attention_mask [B, S] (optional 0/1 padding), labels [B, S] (unsharded)
        -> logits [B, S, V] (gathered); loss from them, the same on every rank

    After ``backward()`` call ``sp_common.all_reduce_grads(model)``: the gradients are then the
    unsharded model's. The model's ``attn_implementation`` must be one registered by
    :func:`register_sp_attention` (``"sp_attention"``). ``use_cache`` is set to False (a cache
    would hold this rank's keys only); ``use_cache=True``, a cache, or ``logits_to_keep`` other
    than 0 raise ``PlanError``.
    """
    implementation = str(getattr(model.config, "_attn_implementation", None))
    registered = AttentionInterface._global_mapping.get(implementation)
    if getattr(registered, "func", None) is not sp_attention_forward:
        raise PlanError(
            f"apply_causal_lm_plan: {type(model).__name__} has "
            f"attn_implementation={implementation!r}, which does not shard attention; build it "
            f"with attn_implementation={ATTN_IMPLEMENTATION!r} (or one from "
            "register_sp_attention), or call model.set_attn_implementation('sp_attention')."
        )
    plan_handle = apply_plan(
        model, causal_lm_plan(model, inputs=inputs, layout=layout, gather_at=gather_at)
    )
    try:
        hook = _input_hook(model, layout)
        hook_handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    except BaseException:
        plan_handle.remove()
        raise
    return CausalLMPlan(plan_handle, hook_handle)


def _input_hook(model: torch.nn.Module, layout: Layout) -> Callable[..., Any]:
    """A forward pre-hook, run after the plan sharded the tokens: shard ``position_ids``
    (``arange(S)`` when not given) and ``attention_mask`` like them, switch the cache off."""
    params = inspect.signature(model.forward).parameters
    positional = [
        n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    where = f"apply_causal_lm_plan: {type(model).__name__}.forward"
    positions = ShardInput(
        POSITIONS, dim=1, ndim=2, pad=True, name=POSITIONS, gather=False, layout=layout
    )
    real_tokens, all_tokens = (
        ShardInput(
            PADDING_MASK, 1, 2, True, pad_value, name=PADDING_MASK, gather=False, layout=layout
        )
        for pad_value in (0.0, 1.0)
    )

    def hook(mod: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        run = active_run()
        assert run is not None  # the plan's own pre-hook started it
        kwargs = {**dict(zip(positional, args, strict=False)), **kwargs}
        for name in ("cache", "past_key_values"):
            if kwargs.get(name) is not None:
                raise PlanError(
                    f"{where}: {name} is given; sequence-parallel attention does not implement "
                    "a KV cache. Call the model without it (generate unsharded, with "
                    "attn_implementation='sdpa')."
                )
        if kwargs.get("use_cache"):
            raise PlanError(
                f"{where}: use_cache=True; a cache would hold this rank's keys only. Pass "
                "use_cache=False (or leave it out: the plan sets it)."
            )
        if "use_cache" in params:
            kwargs["use_cache"] = False
        if kwargs.get("logits_to_keep", 0) != 0:
            raise PlanError(
                f"{where}: logits_to_keep={kwargs['logits_to_keep']!r} would slice this rank's "
                "shard, not the sequence; leave it at 0 and slice the gathered logits."
            )
        total = planned_seq_len(SEQUENCE)
        sequence = next(
            kwargs[n] for n in ("input_ids", "inputs_embeds") if kwargs.get(n) is not None
        )
        given, mask = kwargs.get(POSITIONS), kwargs.get(PADDING_MASK)
        for arg, value in ((POSITIONS, given), (PADDING_MASK, mask)):
            if value is not None and (value.ndim != 2 or value.shape[1] != total):
                raise PlanError(
                    f"{where}: {arg} has shape {tuple(value.shape)}, expected [B, S] with "
                    f"S = {total} (the unsharded length of the tokens); pass it unsharded, like "
                    "the tokens (a 4-d or custom mask is not supported: pass the 2-d padding "
                    "mask)."
                )
        if given is None:
            given = torch.arange(total, device=sequence.device)[None]
        elif mask is None and bool((torch.diff(given, dim=-1) != 1).any()):
            # transformers would read these jumps as packed sequences (a mask per document).
            raise PlanError(
                f"{where}: position_ids restart or jump within a row and no attention_mask is "
                "given, which transformers reads as packed sequences; sequence-parallel "
                "attention has no document mask. Pass one sequence per row (with a 2-d "
                "attention_mask for its padding)."
            )
        # A mask is always passed (all ones when the call has none, padding included: seq_len
        # excludes it), so that transformers never reads the shards' positions, which jump
        # under zigzag or at the padding, as packed sequences.
        if mask is None:
            mask, padding = torch.ones(sequence.shape[0], total, dtype=torch.long), all_tokens
            _UNMASKED.add(run)
        else:
            padding = real_tokens
        kwargs[POSITIONS] = run.shard("", positions, given, grad_rule="local")
        kwargs[PADDING_MASK] = run.shard("", padding, mask.to(sequence.device), grad_rule="local")
        return (), kwargs

    return hook


register_sp_attention()
