"""Rank tasks for ``tests/test_compile_dynamic.py``: ``torch.compile(fullgraph=True)`` with dynamic
shapes, either ``dynamic=True`` or ``torch._dynamo.mark_dynamic`` on the sequence dim, over the ops
and over a planned model, each compared with the same program run eagerly on the same rank.

``mode`` is ``"dynamic"`` (``dynamic=True``: every size symbolic, pad values too) or
``"mark_dynamic"`` (only dim 1 of each input symbolic). Each task runs the compiled function on
each sequence length it is given and returns numpy arrays and how many graphs Dynamo cached for
the function (a fullgraph compile that graph-breaks raises, so a returned result already means
one graph per frame; one cached graph after every length means no length recompiled). Graphs are
counted in the code's cache, not with ``CompileCounterWithBackend``: under ``dynamic=True``
inductor specializes a symbolic pad value by restarting the trace, which that counter counts
as a second frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch._dynamo
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from backend_torch.plan import all_reduce_grads, apply_plan
from examples.dit import TORCH_PLAN, init_params, torch_model
from sp_common import (
    sp_all_to_all,
    sp_gather,
    sp_reduce_scatter,
    sp_shard,
    sp_shard_with_padding,
    sp_ulysses_attention,
)
from sp_common.testing.data import to_numpy, to_torch


def _compiled(fn: Callable[..., Any], mode: str, backend: str) -> Any:
    """``fn`` compiled afresh with ``fullgraph=True`` under ``mode``."""
    torch._dynamo.reset()
    dynamic = True if mode == "dynamic" else None
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)


def _graphs(fn: Callable[..., Any]) -> int:
    """How many compiled graphs Dynamo holds for ``fn``'s code (one per recompilation)."""
    return len(_debug_get_cache_entry_list(fn))


def _leaf(a: np.ndarray, mode: str) -> torch.Tensor:
    """A fresh leaf tensor of ``a`` that requires grad; under ``mark_dynamic`` its sequence dim
    (1) is marked dynamic (any other ``mode``, e.g. ``"eager"``, marks nothing)."""
    t = to_torch(a).clone().requires_grad_()
    if mode == "mark_dynamic":
        torch._dynamo.mark_dynamic(t, 1)
    return t


def _self_weighted(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A loss whose gradient at each output is the output itself: on integer-valued data every
    gradient is an exact sum, so compiled and eager gradients compare bitwise."""
    return sum((o * o.detach()).sum() for o in outputs)  # type: ignore[return-value]


def data_movement(xs: list[np.ndarray], mode: str, backend: str) -> dict[str, Any]:
    """Shard, padded shard, gather with ``pad_size``, all-to-all both ways and reduce-scatter on
    inputs ``[2, S, 4]`` whose lengths S the world size does not divide, compiled once and called
    on every ``x`` in ``xs``; forward and input gradient, compiled and eager."""

    def step(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shard, pad = sp_shard_with_padding(t, 1)  # [2, S, 4] -> [2, ceil(S/N), 4]
        whole = torch.cat([t, t], 1)  # [2, 2S, 4]: N=2 divides 2S for every S
        heads = sp_all_to_all(shard, 2, 1)  # -> [2, N*ceil(S/N), 4/N]
        return (
            sp_gather(shard * 2, 1, pad_size=pad),  # -> [2, S, 4]
            sp_shard(whole, 1),  # -> [2, S, 4] (2S/N with N=2)
            heads,
            sp_all_to_all(heads, 1, 2),  # back to [2, ceil(S/N), 4]
            sp_reduce_scatter(whole, 1),
        )

    compiled = _compiled(step, mode, backend)
    runs = []
    for x in xs:
        eager_x = _leaf(x, "eager")
        eager = step(eager_x)
        _self_weighted(eager).backward()
        got_x = _leaf(x, mode)
        got = compiled(got_x)
        _self_weighted(got).backward()
        runs.append(
            {
                "got": [to_numpy(o) for o in got],
                "expected": [to_numpy(o) for o in eager],
                "got_grad": to_numpy(got_x.grad),
                "expected_grad": to_numpy(eager_x.grad),
            }
        )
    return {"runs": runs, "graphs": _graphs(step)}


def ulysses(
    qkvs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], mode: str, backend: str
) -> dict[str, Any]:
    """A padded Ulysses block (``seq_len=q.shape[1]``, a symbolic int while compiling) on
    ``[1, S, 4, 2]`` inputs, compiled once and called on every length; forward and q/k/v
    gradients, compiled and eager, and the graph count after the first length."""

    def block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qs, pad = sp_shard_with_padding(q, 1)
        ks, _ = sp_shard_with_padding(k, 1)
        vs, _ = sp_shard_with_padding(v, 1)
        out = sp_ulysses_attention(qs, ks, vs, seq_len=q.shape[1])
        return sp_gather(out, 1, pad_size=pad)

    compiled = _compiled(block, mode, backend)
    runs, first_graphs = [], None
    for qkv in qkvs:
        results = []
        for fn, how in ((block, "eager"), (compiled, mode)):
            leaves = [_leaf(a, how) for a in qkv]
            out = fn(*leaves)
            _self_weighted((out,)).backward()
            results.append([to_numpy(out), *(to_numpy(t.grad) for t in leaves)])
        first_graphs = _graphs(block) if first_graphs is None else first_graphs
        runs.append({"expected": results[0], "got": results[1]})
    return {"runs": runs, "first_graphs": first_graphs, "graphs": _graphs(block)}


def _planned_run(model: torch.nn.Module, fn: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
    model.zero_grad()
    out = fn(x)
    _self_weighted((out,)).backward()
    all_reduce_grads(model)
    grads = {f"grad {n}": to_numpy(p.grad) for n, p in model.named_parameters()}
    return {"out": to_numpy(out), "grad x": to_numpy(x.grad), **grads}


def planned_dit(
    xs: list[np.ndarray], mode: str, backend: str, whole_model_compile: bool
) -> dict[str, Any]:
    """The example DiT with its plan applied, then compiled: ``torch.compile(lambda t:
    model(t))`` (the plan's boundary hooks traced into the same graph) or, with
    ``whole_model_compile``, ``torch.compile(model)`` (the model's own hooks run as frames of
    their own). Output, input and parameter gradients (summed by ``all_reduce_grads``) for
    every ``x`` in ``xs``, compiled and eager-planned; for the lambda, its graph count after the
    first length. The model keeps one of its transformer blocks: the blocks are alike, and each
    one traced costs seconds."""
    params = init_params()
    model = torch_model({**params, "blocks": params["blocks"][:1]})
    applied = apply_plan(model, TORCH_PLAN)

    def call(t: torch.Tensor) -> torch.Tensor:
        return model(t)

    compiled = _compiled(model if whole_model_compile else call, mode, backend)
    runs, first_graphs = [], None
    for x in xs:
        expected = _planned_run(model, model, _leaf(x, "eager"))
        got = _planned_run(model, compiled, _leaf(x, mode))
        first_graphs = _graphs(call) if first_graphs is None else first_graphs
        runs.append({"expected": expected, "got": got})
    applied.remove()
    return {"runs": runs, "first_graphs": None if whole_model_compile else first_graphs}


def symbolic_errors(length: int) -> dict[str, str]:
    """The errors a compiled function raises while tracing, when a check fails on a symbolic
    value: a marked-dynamic length N does not divide (``sp_shard``, ``sp_all_to_all``), a symbolic
    pad value the dtype cannot hold (``dynamic=True``), and an explicit out-of-range
    ``pad_size``. Returned as text (fullgraph: Dynamo's error carries the library's message)."""
    cases: dict[str, tuple[Callable[..., Any], tuple[Any, ...], bool]] = {
        "sp_shard": (lambda t: sp_shard(t, 1), (torch.zeros(2, length, 4),), False),
        "sp_all_to_all": (lambda t: sp_all_to_all(t, 1, 2), (torch.zeros(2, length, 4),), False),
        "pad_value": (
            lambda t, v: sp_shard_with_padding(t, 1, v)[0],
            (torch.zeros(2, length, 4, dtype=torch.float16), 1e6),
            True,
        ),
        "pad_size": (
            lambda t: sp_gather(t, 1, pad_size=t.shape[1] * 2 + 1),
            (torch.zeros(2, length, 4),),
            False,
        ),
    }
    messages = {}
    for name, (fn, args, dynamic) in cases.items():
        compiled = _compiled(fn, "dynamic" if dynamic else "mark_dynamic", "eager")
        if not dynamic:
            torch._dynamo.mark_dynamic(args[0], 1)
        try:
            compiled(*args)
        except Exception as e:  # Dynamo wraps the library's error in its own type
            messages[name] = f"{type(e).__name__}: {e}"
        else:
            messages[name] = "no error"
    return messages
