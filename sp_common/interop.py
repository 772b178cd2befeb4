"""Zero-copy conversion between torch tensors and JAX arrays through DLPack.

Shapes and dtypes are kept: ``[...]`` of dtype d -> ``[...]`` of the same d, for every dtype
both frameworks have (bool, int8/16/32/64, uint8/16/32/64, float16, bfloat16, float32, float64,
complex64, complex128, float8_e4m3fn, float8_e5m2, float8_e4m3fnuz, float8_e5m2fnuz,
float8_e8m0fnu). Neither framework is imported until a function is called.

The result shares memory with its input, so a write to one shows in the other. JAX assumes that
an array never changes, and nothing in JAX sees a write that torch makes: see the Aliasing
section of each function for how to stay safe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax
    import torch

# torch dtypes JAX holds only with 64-bit types on; without them JAX would cast to 32 bits.
_WIDE_TO_NARROW = {
    "torch.int64": "torch.int32",
    "torch.uint64": "torch.uint32",
    "torch.float64": "torch.float32",
    "torch.complex128": "torch.complex64",
}


def torch_to_jax(tensor: torch.Tensor) -> jax.Array:
    """The JAX array of ``tensor``'s data, sharing its memory where it can.

    Shapes: ``[...] -> [...]``, same dtype, on the matching JAX device (a CPU tensor gives a
    CPU array; a CUDA tensor needs a JAX with GPU support).

    - Zero-copy for a contiguous tensor of any dtype above whose data pointer is 64-byte
      aligned, as XLA needs on CPU (torch's own allocations are). JAX itself copies any other
      one: a view that starts inside a buffer (``x[1:]``), ``torch.from_numpy`` of an array
      numpy did not align.
    - Copied first: a strided view that is not contiguous (a transpose, ``x[:, 1:]``,
      ``x[::2]``, ``expand``), and a tensor with torch's lazy conjugate or negative bit set
      (``x.conj()``, which DLPack cannot carry; torch would export a negative view unnegated).
    - A tensor that requires grad is detached: the array holds the values; gradients do not
      flow back to torch through it.
    - 64-bit dtypes (int64, uint64, float64, complex128) need JAX's 64-bit mode
      (``jax.config.update("jax_enable_x64", True)`` or ``with jax.enable_x64(True):``); without
      it this raises TypeError instead of letting JAX cast them to 32 bits.

    Aliasing: the array reads ``tensor``'s memory. A later in-place write to ``tensor``
    (``tensor.add_(1)``, ``tensor[0] = 5``, an optimizer step) changes the array too, behind
    the back of JAX, which assumes arrays never change (a copy JAX made earlier keeps the old
    values). Pass ``tensor.clone()`` when the tensor will be written to.

    Raises:
        TypeError: ``tensor`` is not a ``torch.Tensor``, is not strided (sparse), has a 64-bit
            dtype without JAX's 64-bit mode, or has a dtype JAX cannot import (complex32,
            bit or packed 4-bit types).
    """
    import jax
    import jax.dlpack
    import numpy as np
    import torch

    func = "torch_to_jax"
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{func}: tensor must be a torch.Tensor, got {type(tensor).__module__}."
            f"{type(tensor).__qualname__}; use jax.numpy.asarray(...) for other array types."
        )
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{func}: tensor has layout {tensor.layout}, which DLPack cannot carry; convert it "
            "with tensor.to_dense() first."
        )
    narrow = _WIDE_TO_NARROW.get(str(tensor.dtype))
    if narrow is not None and jax.dtypes.canonicalize_dtype(np.int64) != np.int64:
        raise TypeError(
            f"{func}: tensor has dtype {tensor.dtype} but JAX's 64-bit mode is off, so JAX would "
            f"silently cast it to 32 bits; enable it with jax.config.update('jax_enable_x64', "
            f"True) (or `with jax.enable_x64(True):`), or cast first with tensor.to({narrow})."
        )
    t = tensor.detach().resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    try:
        return jax.dlpack.from_dlpack(t)
    except (BufferError, RuntimeError) as e:  # jax's XlaRuntimeError is a RuntimeError
        raise TypeError(
            f"{func}: JAX cannot import a tensor of dtype {tensor.dtype} on {tensor.device} "
            f"through DLPack ({e}); cast it to a dtype both frameworks have, e.g. "
            "tensor.to(torch.float32)."
        ) from e


def jax_to_torch(array: jax.Array) -> torch.Tensor:
    """The torch tensor of ``array``'s data, sharing its memory (no copy).

    Shapes: ``[...] -> [...]``, same dtype, on the array's device (``cpu`` for a JAX CPU array).
    ``array`` must be a concrete array on a single device: convert outside ``jit`` /
    ``shard_map``, and for an array sharded or replicated over several devices pick one
    device's data first (``array.addressable_data(0)`` for a replicated array,
    ``jax.device_put(array, jax.devices()[0])`` to assemble a sharded one).

    Aliasing: the tensor writes into the array's buffer. JAX assumes arrays never change, so
    an in-place torch write (``t.add_(1)``, ``t[0] = 5``) silently changes ``array``, and every
    JAX value that shares its buffer. Treat the tensor as read-only, or ``clone()`` it before
    writing. JAX will not donate (reuse) a buffer that torch still holds: a ``jit`` with
    ``donate_argnums`` copies instead.

    Raises:
        TypeError: ``array`` is not a ``jax.Array``, is a tracer (inside ``jit`` or
            ``shard_map``), or has a dtype torch lacks (int4, uint4, float4_e2m1fn,
            float8_e4m3b11fnuz, float8_e3m4, ...).
        ValueError: ``array`` spans several devices, or was deleted (donated).
    """
    import jax
    import torch

    func = "jax_to_torch"
    if not isinstance(array, jax.Array):
        raise TypeError(
            f"{func}: array must be a jax.Array, got {type(array).__module__}."
            f"{type(array).__qualname__}; use torch.as_tensor(...) for other array types."
        )
    if isinstance(array, jax.core.Tracer):
        raise TypeError(
            f"{func}: array is a traced value ({type(array).__name__}) inside jit or "
            "shard_map, which has no memory to share; return it from the traced function and "
            "convert the concrete result."
        )
    if array.is_deleted():
        raise ValueError(
            f"{func}: array of shape {array.shape} was deleted (donated to a jit call or "
            "deleted); convert an array that is still alive."
        )
    if len(array.devices()) != 1:
        raise ValueError(
            f"{func}: array of shape {array.shape} spans {len(array.devices())} devices "
            f"({array.sharding}); convert one device's data: array.addressable_data(0) when it "
            "is replicated, or jax.device_put(array, jax.devices()[0]) to gather it first."
        )
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError) as e:
        raise TypeError(
            f"{func}: torch cannot import an array of dtype {array.dtype} through DLPack ({e}); "
            "cast it to a dtype both frameworks have first, e.g. array.astype(jnp.float32)."
        ) from e
