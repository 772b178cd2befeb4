"""The public sharding operations, written once over the backend primitives."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

from .backend import Backend, backend_for, backend_named
from .grad_rules import GatherGradRule, ShardGradRule, gather_rule, shard_rule
from .layouts import Layout, check_layout, from_zigzag, parts, to_zigzag
from .shapes import (
    check_divisible,
    check_pad_size,
    check_pad_value,
    normalize_dim,
    pad_size_for,
)

T = TypeVar("T")


class Resolved(NamedTuple):
    """Where one op on a tensor runs: its framework's backend, the SP group (as the backend
    resolved it) and that group's world size."""

    backend: Backend
    group: Any
    world_size: int


def resolve(func: str, tensor: Any, group: Any) -> Resolved:
    """The backend, group and world size for one call of ``func`` on ``tensor``."""
    backend = backend_for(func, tensor)
    g = backend.resolve_group(func, group)
    return Resolved(backend, g, backend.world_size(g))


# What the local argument checks raise. In debug mode a rank whose local checks raise one of
# these announces it in the cross-rank check (``Backend.check_consistent``) before raising it,
# so that the ranks whose checks passed stop too instead of waiting for it in the collective.
LOCAL_ERRORS = (TypeError, ValueError)


def check_flag(func: str, name: str, value: object) -> None:
    """Raise TypeError unless ``value`` (the argument ``name`` of ``func``) is a bool."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{func}: {name} must be a bool, got {value!r} of type {type(value).__name__}; "
            "pass True or False."
        )


def sp_shard(
    tensor: T,
    dim: int,
    validate: bool = True,
    *,
    group: Any = None,
    grad_rule: ShardGradRule | None = None,
    layout: Layout = "contiguous",
) -> T:
    """This rank's chunk of ``tensor`` along ``dim``.

    Shapes: ``[..., S, ...] -> [..., S / N, ...]`` where N is the SP world size; rank r gets
    elements ``[r * S/N, (r + 1) * S/N)`` of ``dim``.

    Args:
        tensor: a ``torch.Tensor`` or ``jax.Array`` (the same full tensor on every rank).
        dim: the sequence dimension; negative counts from the end.
        validate: a bool. With debug mode on (``sp_debug()``), check first that all ranks agree
            on shape, dtype, ``dim`` and ``grad_rule`` and passed the local checks (torch). The
            local checks (dim range, divisibility) always run.
        group: the SP group for this call: a torch ``ProcessGroup`` or a JAX mesh axis name
            (default: the innermost ``sp_group`` block, else the default group / axis ``"sp"``).
        grad_rule: ``"gather"`` (the default): every rank computes the same loss, so the
            backward gathers the gradient chunks and every rank gets the whole gradient of the
            replicated ``tensor``. ``"local"``: each rank computes its own term of the loss (as
            after ``sp_gather(..., grad_rule="reduce_scatter")``), so the backward is this rank's
            gradient chunk in place with zeros elsewhere; the terms sum to the whole gradient.
            Inside a torch module with an applied ``SPPlan`` the default is ``"local"`` (see
            ``sp_common.grad_rules``).
        layout: ``"contiguous"`` (rank r gets chunk r of N) or ``"zigzag"`` (S cut into 2N
            chunks, rank r gets chunks r and 2N-1-r, concatenated: ``[..., S/N, ...]`` as well;
            see ``sp_common.layouts``). Gather with the same layout.

    Returns:
        torch: a contiguous tensor that owns its memory. JAX: a ``dynamic_slice`` by
        ``axis_index``. World size 1 returns ``tensor`` itself.

    Raises:
        ValueError: ``S`` is not divisible by N (use :func:`sp_shard_with_padding`), ``dim`` is
            out of range, or ``tensor`` is 0-d; in debug mode, ranks that disagree (on every
            rank, see ``sp_common.debug``).
        TypeError: ``tensor`` is not a supported tensor type, or ``validate`` is not a bool.
    """
    func = "sp_shard"
    backend, g, n = resolve(func, tensor, group)
    try:
        check_flag(func, "validate", validate)
        shape = backend.shape(tensor)
        d = normalize_dim(func, dim, shape)
        rule = shard_rule(func, grad_rule, backend.framework)
        lay = check_layout(func, layout)
        if lay == "zigzag" and n > 1:
            check_divisible_zigzag(func, shape, d, n)
        check_divisible(func, shape, d, n)
        if n > 1:
            backend.check_shard_rule(func, tensor, g, rule)
    except LOCAL_ERRORS as e:
        if n > 1 and validate is not False:
            passed = {"dim": dim, "grad_rule": grad_rule, "layout": layout}
            backend.check_consistent(func, g, {"tensor": tensor}, passed, e)
        raise
    if n == 1:
        return tensor
    if validate:
        agreed = {"dim": d, "grad_rule": rule, "layout": lay}
        backend.check_consistent(func, g, {"tensor": tensor}, agreed)
    if lay == "zigzag":
        tensor = to_zigzag(backend, tensor, d, n)
    return backend.shard(tensor, d, g, rule)


def check_divisible_zigzag(func: str, shape: tuple[int, ...], dim: int, n: int) -> None:
    """ValueError unless ``shape[dim]`` splits into 2N equal chunks (``layout="zigzag"``)."""
    size = shape[dim]
    if size % (2 * n):
        raise ValueError(
            f"{func}: size {size} of dim {dim} (shape {tuple(shape)}) is not divisible by 2 x "
            f"the sequence-parallel world size {n} = {2 * n} (layout='zigzag' gives each rank "
            f"2 of 2N chunks); use sp_shard_with_padding(tensor, dim={dim}, layout='zigzag') "
            f"to pad it by {-size % (2 * n)}."
        )


def sp_gather(
    tensor: T,
    dim: int,
    validate: bool = True,
    *,
    pad_size: int = 0,
    group: Any = None,
    grad_rule: GatherGradRule | None = None,
    layout: Layout = "contiguous",
) -> T:
    """All ranks' shards concatenated along ``dim`` in rank order, minus ``pad_size`` at the end.

    Shapes: ``[..., S / N, ...] -> [..., S - pad_size, ...]``.

    Args:
        tensor: this rank's shard; all ranks must pass the same shape and dtype.
        dim: the dimension to concatenate along; negative counts from the end.
        validate: a bool. With debug mode on, check first that all ranks agree on shape, dtype,
            ``dim``, ``pad_size`` and ``grad_rule`` and passed the local checks (torch; a mismatch
            raises ValueError on every rank instead of hanging).
        pad_size: elements to drop from the end of ``dim`` after gathering (the ``pad_size``
            returned by :func:`sp_shard_with_padding`).
        group: the SP group for this call (see :func:`sp_shard`).
        grad_rule: ``"slice"`` (the default): the computation after the gather is replicated
            on every rank, so the backward is this rank's slice of the gradient.
            ``"reduce_scatter"``: ranks compute different terms of one loss, so the backward sums
            the gradients over ranks and keeps this rank's slice. Inside a torch module with an
            applied ``SPPlan`` the default is ``"reduce_scatter"``.
        layout: the layout the shards were made with (``"contiguous"`` or ``"zigzag"``: the
            shards' two chunks are put back in sequence order).

    Returns:
        The gathered tensor. torch: one collective; it gathers straight into the output when
        every dim before ``dim`` has size 1. JAX: ``all_gather(tiled=True)``, device-invariant
        under ``grad_rule="slice"`` (so ``out_specs=P()`` is accepted with ``check_vma=True``).
    """
    func = "sp_gather"
    backend, g, n = resolve(func, tensor, group)
    try:
        check_flag(func, "validate", validate)
        shape = backend.shape(tensor)
        d = normalize_dim(func, dim, shape)
        rule = gather_rule(func, grad_rule, backend.framework)
        lay = check_layout(func, layout)
        if lay == "zigzag" and n > 1 and shape[d] % 2:
            raise ValueError(
                f"{func}: a zigzag shard holds 2 equal chunks, but size {shape[d]} of dim {d} "
                f"(shape {tuple(shape)}) is odd; gather zigzag shards made by sp_shard(..., "
                "layout='zigzag') or pass layout='contiguous'."
            )
        full_shape = (*shape[:d], shape[d] * n, *shape[d + 1 :])
        p = check_pad_size(func, pad_size, full_shape, d)
    except LOCAL_ERRORS as e:
        if n > 1 and validate is not False:
            passed = {"dim": dim, "pad_size": pad_size, "grad_rule": grad_rule, "layout": layout}
            backend.check_consistent(func, g, {"tensor": tensor}, passed, e)
        raise
    if n > 1:
        if validate:
            agreed = {"dim": d, "pad_size": p, "grad_rule": rule, "layout": lay}
            backend.check_consistent(func, g, {"tensor": tensor}, agreed)
        tensor = backend.gather(tensor, d, g, rule)
        if lay == "zigzag":
            tensor = from_zigzag(backend, tensor, d, n)
    return backend.truncate(tensor, d, full_shape[d] - p) if p else tensor


def sp_shard_with_padding(
    tensor: T,
    dim: int,
    pad_value: float = 0.0,
    *,
    group: Any = None,
    grad_rule: ShardGradRule | None = None,
    layout: Layout = "contiguous",
) -> tuple[T, int]:
    """Pad ``tensor`` at the end of ``dim`` to a multiple of N, then shard it.

    Shapes: ``[..., S, ...] -> ([..., ceil(S / N), ...], pad_size)`` with
    ``pad_size = ceil(S / N) * N - S``, a Python int equal on every rank (0 when N divides S, and
    at world size 1, where ``tensor`` itself is returned). Ranks past the real data hold only
    padding when ``S < N``.

    ``pad_value`` is cast to the tensor's dtype; a value the dtype cannot hold (1.5 or NaN for an
    integer dtype, 300 for uint8, 1e6 for float16, inf for float8_e4m3fn, 0.0 for
    float8_e8m0fnu) raises ValueError; any NaN pads the dtype's canonical NaN. Undo the padding with
    ``sp_gather(..., pad_size=pad_size)`` or :func:`sp_unpad`. ``grad_rule`` as in
    :func:`sp_shard`. ``layout="zigzag"`` pads to a multiple of 2N instead
    (``[..., ceil(S / 2N) * 2, ...]``), then shards as ``sp_shard(..., layout="zigzag")``; the
    padding stays at the end of the sequence (in the last rank's first chunk and beyond).
    """
    func = "sp_shard_with_padding"
    backend, g, n = resolve(func, tensor, group)
    try:
        shape = backend.shape(tensor)
        d = normalize_dim(func, dim, shape)
        rule = shard_rule(func, grad_rule, backend.framework)
        fill = check_pad_value(func, pad_value, backend.dtype_info(tensor))
        lay = check_layout(func, layout)
        if n > 1:
            backend.check_shard_rule(func, tensor, g, rule)
    except LOCAL_ERRORS as e:
        if n > 1:
            passed = {"dim": dim, "pad_value": pad_value, "grad_rule": grad_rule, "layout": layout}
            backend.check_consistent(func, g, {"tensor": tensor}, passed, e)
        raise
    if n == 1:
        return tensor, 0
    p = pad_size_for(shape[d], n * parts(lay))
    agreed = {"dim": d, "pad_value": fill, "grad_rule": rule, "layout": lay}
    backend.check_consistent(func, g, {"tensor": tensor}, agreed)
    if lay == "zigzag":
        padded = backend.pad_end(tensor, d, p, fill) if p else tensor
        return backend.shard(to_zigzag(backend, padded, d, n), d, g, rule), p
    if not p:
        return backend.shard(tensor, d, g, rule), 0
    # Only this rank's padded chunk is built (the JAX backend pads, then slices: XLA fuses it).
    return backend.shard_padded(tensor, d, g, p, fill, rule), p


def sp_unpad(tensor: T, dim: int, pad_size: int) -> T:
    """Drop the last ``pad_size`` elements of ``dim`` (any dim, unlike ``x[..., :-pad_size]``).

    Shapes: ``[..., S + pad_size, ...] -> [..., S, ...]``. ``pad_size=0`` returns ``tensor``.
    torch: the result is contiguous.
    """
    backend = backend_for("sp_unpad", tensor)
    shape = backend.shape(tensor)
    d = normalize_dim("sp_unpad", dim, shape)
    p = check_pad_size("sp_unpad", pad_size, shape, d)
    return backend.truncate(tensor, d, shape[d] - p) if p else tensor


def _backend_of(func: str, like: Any) -> Backend:
    return backend_named(func, like) if isinstance(like, str) else backend_for(func, like)


def sp_world_size(like: Any, *, group: Any = None) -> int:
    """The SP world size N for ``like``'s framework.

    ``like`` is a tensor or the name ``"torch"`` / ``"jax"``. torch: the size of ``group`` (default:
    the default process group), 1 when no process group is initialized. JAX: the size of the
    mesh axis (default ``"sp"``), 1 outside ``shard_map`` where the axis is not bound.
    """
    backend = _backend_of("sp_world_size", like)
    return backend.world_size(backend.resolve_group("sp_world_size", group))


def sp_rank(like: Any, *, group: Any = None) -> Any:
    """This rank's index in the SP group, in ``[0, N)``.

    torch: a Python int (0 without a process group). JAX: ``lax.axis_index`` (a traced int32
    inside ``shard_map``), 0 outside it.
    """
    backend = _backend_of("sp_rank", like)
    return backend.rank(backend.resolve_group("sp_rank", group))
