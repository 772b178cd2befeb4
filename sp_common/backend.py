"""The primitive set every framework backend implements, and how a backend is found.

A backend is found from the type of the tensor, only among frameworks the user has already
imported (as einops does): passing a torch tensor never imports JAX, and the reverse. The result is
cached per type, so dispatch costs one dict lookup after the first call.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

from .grad_rules import GatherGradRule, ShardGradRule
from .shapes import DtypeInfo

_FRAMEWORKS = ("torch", "jax")


def _load(framework: str) -> Backend[Any]:
    """Import the backend package of ``framework``. Plain import statements, not importlib:
    torch.compile can trace an import statement, so the first op may run inside a compiled
    function."""
    if framework == "torch":
        import backend_torch

        return backend_torch.BACKEND
    import backend_jax

    return backend_jax.BACKEND


# A backend's resolved SP group: torch ``ProcessGroup | None``, JAX an axis name.
GroupT = TypeVar("GroupT")

_SUPPORTED = "torch.Tensor or jax.Array (including tracers inside jit/shard_map)"


class Backend(Generic[GroupT]):
    """Primitives over one framework. sp_common composes them; a backend never pads, unpads or
    checks arguments on its own (only framework-specific limits, such as the dtypes gloo can
    sum).

    ``group`` arguments are already resolved with :meth:`resolve_group`.
    """

    framework: ClassVar[str]

    def is_tensor(self, x: object) -> bool:
        raise NotImplementedError

    def shape(self, x: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype_info(self, x: Any) -> DtypeInfo:
        """The facts about ``x``'s dtype that the argument checks need."""
        raise NotImplementedError

    def resolve_group(self, func: str, group: Any) -> GroupT:
        """The explicit group, else the active ``sp_group`` block's, else the default."""
        raise NotImplementedError

    def world_size(self, group: GroupT) -> int:
        raise NotImplementedError

    def rank(self, group: GroupT) -> Any:
        raise NotImplementedError

    def shard(self, x: Any, dim: int, group: GroupT, grad_rule: ShardGradRule) -> Any:
        """This rank's chunk of ``x`` along ``dim`` (size divisible by the world size).
        Backward: gather of the gradient (``"gather"``), or this rank's gradient chunk in place
        with zeros elsewhere (``"local"``)."""
        raise NotImplementedError

    def check_shard_rule(self, func: str, x: Any, group: GroupT, grad_rule: ShardGradRule) -> None:
        """Raise ValueError where the backend can tell that ``grad_rule`` does not match ``x``
        (``"gather"`` of a tensor whose gradient is per rank, ``"local"`` of a replicated one);
        a no-op where it cannot tell."""

    def gather(self, x: Any, dim: int, group: GroupT, grad_rule: GatherGradRule) -> Any:
        """All ranks' chunks concatenated along ``dim`` in rank order. Backward: this rank's
        slice (``"slice"``) or the reduce-scatter sum (``"reduce_scatter"``)."""
        raise NotImplementedError

    def reduce_scatter(self, x: Any, dim: int, group: GroupT) -> Any:
        """Sum over ranks, keep this rank's chunk of ``dim``. Backward: gather."""
        raise NotImplementedError

    def all_to_all(self, x: Any, scatter_dim: int, gather_dim: int, group: GroupT) -> Any:
        """Chunk j of ``scatter_dim`` to rank j, received chunks concatenated along
        ``gather_dim``. Backward: the all-to-all with the dims swapped."""
        raise NotImplementedError

    def valid_mask(self, like: Any, total: int, valid: int) -> Any:
        """A bool vector of length ``total``, True at positions below ``valid`` (torch: on
        ``like``'s device; JAX: placed by the enclosing computation)."""
        raise NotImplementedError

    def attention(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        scale: float,
        causal: bool,
        key_mask: Any,
        q_positions: Any = None,
        k_positions: Any = None,
    ) -> Any:
        """Local softmax attention, the kernel every strategy calls.

        Shapes: q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, Dv]`` ->
        ``[B, Sq, Hq, Dv]`` in q's dtype, with ``Hkv`` dividing ``Hq`` (query head h reads
        key/value head ``h // (Hq / Hkv)``). Query i attends key j where ``key_mask[b, j]``
        (bool ``[B | 1, Sk]``; None: every key) and, if ``causal``, the key's sequence position
        is at most the query's: ``k_positions[j] <= q_positions[i]`` (int vectors of length
        Sq and Sk, traced in JAX where they depend on ``axis_index``; None: ``0 .. S-1``). A
        query with no key to attend gets zeros (and zero gradients). Accurate to the dtype:
        half types accumulate in float32, float64 in float64."""
        raise NotImplementedError

    def ring_attention(self, spec: Any, q: Any, k: Any, v: Any, key_mask: Any) -> Any:
        """``sp_common.attention.ring.ring_forward``'s output with
        ``sp_common.attention.ring.ring_backward`` as its gradient (q, k, v; ``key_mask``
        ``[B | 1, s]`` bool or None has none). Differentiable once."""
        raise NotImplementedError

    def two_axes(self, func: str, group: GroupT) -> tuple[Any, Any]:
        """``(ring_group, ulysses_group)`` of a group of two axes (JAX: a tuple of two mesh axis
        names; torch: the group a 2-D ``DeviceMesh`` resolved to, ring dim first); ValueError
        naming ``func`` for a group of one axis."""
        raise NotImplementedError

    def ring_shift(self, tensors: tuple[Any, ...], group: GroupT) -> Any:
        """Start sending each tensor to rank ``r + 1`` and receiving rank ``r - 1``'s (no
        autograd); the returned object's ``wait()`` gives the received tensors (same shapes and
        dtypes, bitwise). JAX: the object is a pytree (it may be carried by a loop)."""
        raise NotImplementedError

    def loop(self, start: int, stop: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
        """``carry = body(t, carry)`` for t = start .. stop-1 (JAX: a ``fori_loop`` with t
        traced when there are two or more steps; the carry then keeps its types)."""
        for t in range(start, stop):
            carry = body(t, carry)
        return carry

    def branch(
        self, pred: Any, if_true: Callable[[Any], Any], if_false: Callable[[Any], Any], x: Any
    ) -> Any:
        """``if_true(x)`` if ``pred`` else ``if_false(x)``; ``pred`` a bool (JAX: or a traced
        bool scalar, both branches then traced and returning the same types)."""
        return if_true(x) if pred else if_false(x)

    def block_forward(
        self, q5: Any, k: Any, v: Any, allowed: Any, scale: float, causal: bool = False
    ) -> tuple[Any, Any]:
        """One ring block's ``(o5, lse)``: ``sp_common.attention.blocks.block_forward`` (its
        layouts there), a Python loop over key tiles unless the backend has a better one.
        ``causal``: also the causal mask of queries and keys at the same positions (a rank's
        own block), which a kernel may apply without a mask tensor."""
        from .attention.blocks import block_forward, with_causal

        return block_forward(self, q5, k, v, with_causal(self, q5, k, allowed, causal), scale)

    def block_grads(
        self,
        q5: Any,
        k: Any,
        v: Any,
        allowed: Any,
        scale: float,
        lse: Any,
        do5: Any,
        delta: Any,
        o5: Any = None,
        causal: bool = False,
    ) -> tuple[Any, Any, Any]:
        """One ring block's ``(dq5, dk, dv)``: ``sp_common.attention.blocks.block_grads``
        (``o5``, the final output of these queries, for kernels that want it with ``lse``;
        ``causal`` as :meth:`block_forward`'s)."""
        from .attention.blocks import block_grads, with_causal

        allowed = with_causal(self, q5, k, allowed, causal)
        return block_grads(self, q5, k, v, allowed, scale, lse, do5, delta)

    def einsum(self, spec: str, a: Any, b: Any) -> Any:
        """``einsum(spec, a, b)`` of two tensors of one floating dtype."""
        raise NotImplementedError

    def exp(self, x: Any) -> Any:
        """Elementwise ``e ** x``."""
        raise NotImplementedError

    def logsumexp(self, x: Any, dim: int) -> Any:
        """``log(sum(exp(x), dim))``, ``-inf`` where every element is ``-inf``."""
        raise NotImplementedError

    def logaddexp(self, a: Any, b: Any) -> Any:
        """Elementwise ``log(e ** a + e ** b)`` (``-inf`` for two ``-inf``)."""
        raise NotImplementedError

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """Elementwise ``a`` where ``cond`` else ``b`` (either may be a Python float)."""
        raise NotImplementedError

    def concat(self, xs: list[Any], dim: int) -> Any:
        """``xs`` concatenated along ``dim`` (one tensor: itself)."""
        raise NotImplementedError

    def zeros_like(self, x: Any) -> Any:
        """Zeros of ``x``'s shape and dtype (JAX: varying over the axes ``x`` varies over)."""
        raise NotImplementedError

    def repeat_interleave(self, x: Any, dim: int, repeats: int) -> Any:
        """Each element of ``dim`` repeated ``repeats`` times in place (``[a, b] -> [a, a, b,
        b]``). Backward: the sum over the repeats."""
        raise NotImplementedError

    def take(self, x: Any, dim: int, indices: tuple[int, ...]) -> Any:
        """The elements ``indices`` of ``dim``, in that order (a copy). Backward: scattered
        back."""
        raise NotImplementedError

    def arange(self, like: Any, length: int) -> Any:
        """The int vector ``0 .. length-1`` (torch: on ``like``'s device)."""
        raise NotImplementedError

    def to_float32(self, x: Any) -> Any:
        """``x`` cast to float32 (differentiable)."""
        raise NotImplementedError

    def cast_like(self, x: Any, like: Any) -> Any:
        """``x`` cast to ``like``'s dtype (differentiable; a no-op where they agree)."""
        raise NotImplementedError

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        """``x`` with ``shape`` (one ``-1`` allowed)."""
        raise NotImplementedError

    def logical_and(self, a: Any, b: Any) -> Any:
        """Elementwise ``a & b`` of bool tensors, broadcast."""
        raise NotImplementedError

    def pad_end(self, x: Any, dim: int, pad: int, value: Any) -> Any:
        """``x`` with ``pad`` elements of ``value`` appended along ``dim``."""
        raise NotImplementedError

    def shard_padded(
        self, x: Any, dim: int, group: GroupT, pad: int, value: Any, grad_rule: ShardGradRule
    ) -> Any:
        """This rank's chunk of ``x`` padded with ``pad`` elements of ``value`` at the end of
        ``dim`` (as ``shard(pad_end(x, ...))``, which is the default). A backend may build only
        this rank's chunk instead of the whole padded tensor."""
        return self.shard(self.pad_end(x, dim, pad, value), dim, group, grad_rule)

    def truncate(self, x: Any, dim: int, length: int) -> Any:
        """``x`` cut to its first ``length`` elements along ``dim`` (drops the padding at the
        end; torch: contiguous)."""
        raise NotImplementedError

    def is_plan_target(self, target: object, mesh: object) -> bool:
        """Whether ``apply_plan(target, plan, mesh=mesh)`` belongs to this framework (torch: an
        ``nn.Module``; JAX: a function together with a mesh)."""
        return False

    def apply_plan(self, target: Any, plan: Any, mesh: Any, options: Mapping[str, Any]) -> Any:
        """Apply the ``SPPlan`` ``plan`` to ``target`` (see :func:`sp_common.apply_plan`)."""
        raise NotImplementedError

    def all_reduce_grads(self, model: Any, group: Any) -> None:
        """Sum a planned model's per-rank gradient terms over the SP group (torch only)."""
        raise NotImplementedError

    def check_consistent(
        self,
        func: str,
        group: GroupT,
        tensors: Mapping[str, object],
        values: Mapping[str, object],
        failure: Exception | None = None,
    ) -> None:
        """In debug mode (``sp_common.debug``), one small collective in which every rank of
        ``group`` announces its call to ``func``: the shape and dtype of each of ``tensors`` (by
        argument name), the argument ``values`` that must be equal on every rank, and
        ``failure``, the error its local checks raised (None when they passed; a rank that failed
        calls this before raising, so its peers never wait for it). Raises the ValueError of
        ``sp_common.debug.disagreement`` on every rank unless all ranks announce the same; when
        they do, returns (and the caller goes on, or raises its own error where every rank failed
        alike). Outside debug mode, and where the framework makes ranks agree by construction
        (JAX's SPMD), a no-op that costs next to nothing."""


_by_type: dict[type, Backend[Any]] = {}


def backend_for(func: str, x: object) -> Backend[Any]:
    """The backend for tensor ``x``; TypeError naming ``func`` for anything else."""
    backend = _by_type.get(type(x))
    if backend is not None:
        return backend
    for framework in _FRAMEWORKS:
        if framework in sys.modules:
            candidate = _load(framework)
            if candidate.is_tensor(x):
                _by_type[type(x)] = candidate
                return candidate
    raise TypeError(
        f"{func}: tensor must be a {_SUPPORTED}, got {type(x).__module__}.{type(x).__qualname__}; "
        "convert it first (torch.as_tensor(...) or jax.numpy.asarray(...))."
    )


def plan_backend(func: str, target: object, mesh: object) -> Backend[Any]:
    """The backend whose plans apply to ``target`` (and ``mesh``), among imported frameworks;
    TypeError naming ``func`` otherwise."""
    for framework in _FRAMEWORKS:
        if framework in sys.modules:
            candidate = _load(framework)
            if candidate.is_plan_target(target, mesh):
                return candidate
    raise TypeError(
        f"{func}: target is {type(target).__name__}; pass a torch.nn.Module, or a JAX function "
        "together with mesh=..."
    )


def backend_named(func: str, framework: str) -> Backend[Any]:
    """The backend of ``framework`` (``"torch"`` or ``"jax"``), importing it on request."""
    if framework not in _FRAMEWORKS:
        raise ValueError(
            f"{func}: unknown framework {framework!r}; pass 'torch', 'jax' or a tensor."
        )
    return _load(framework)
