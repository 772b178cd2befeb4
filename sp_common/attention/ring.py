"""Ring attention: the key/value shards travel around the SP group, each rank's queries stay,
partial results are merged by their log-sum-exp. Written once over the backend's primitives.

Step t of N: rank r holds the keys and values of rank ``(r - t) mod N``, attends its queries to
them while it already sends them on to rank ``r + 1`` (the transfer overlaps the compute), and
merges the block's ``(o, lse)`` into its running result (``blocks.merge``). The backward pass is
explicit (``ring_backward``): the keys and values go around again, and each block's key/value
gradient travels with it and arrives home after N steps. Nothing the size of the whole sequence
is ever held: a rank keeps its own q, k, v, its output and ``lse`` for the backward (O(S/N)),
and the logits of one (query half, ``KEY_BLOCK`` keys) tile at a time (``blocks``; torch runs its
fused CPU flash kernel per block where it applies, JAX scans the tiles).

Causal attention: each shard is cut into two halves, chunks of the 2N-chunk sequence (the
contiguous layout: chunks 2r, 2r+1; zigzag: r, 2N-1-r). A (query half, key half) pair whose key
chunk comes after the query chunk is skipped, one before it is attended without a causal mask,
the same chunk with one. Under zigzag every rank then does the same work at every step but the
first (two of the four pairs); in the contiguous layout rank r attends r + 1 of the N blocks.
Where the pairs' relations are known when the step runs (torch: every step; JAX: step 0, the
other steps' ranks are traced), the pairs attended are one kernel call (``_calls``): a
rectangle of whole pairs, or the own block under the causal mask of equal positions, which
torch's fused kernel applies as ``is_causal`` without a mask tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..backend import Backend
from ..layouts import Layout, positions
from .blocks import merge
from .checks import AttentionShapes


@dataclass(frozen=True)
class RingSpec:
    """What every step of the ring needs besides the tensors (static: hashable, no arrays)."""

    group: Any  # the ring's group (USP: the ring axis alone)
    n: int  # ranks in the ring
    local: int  # tokens of a block: a shard, or (USP) the inner group's shards concatenated
    real: int
    scale: float
    causal: bool
    layout: Layout  # the layout of the shards over all ``n * inner`` ranks
    inner: int = 1  # USP: the ranks of the Ulysses axis whose shards make one block

    @property
    def shard(self) -> int:
        """Tokens of one rank's shard."""
        return self.local // self.inner

    @property
    def skips(self) -> bool:
        """Whether a block is two chunks in sequence order (causal pairs can be skipped): every
        ring block, and USP blocks in the contiguous layout. A USP block under zigzag is its
        inner ranks' chunk pairs: causal masks, no skipping."""
        return self.inner == 1 or self.layout == "contiguous"


def block_positions(spec: RingSpec, index: Any, member: Any) -> Any:
    """The sequence positions of the tokens at ``index`` of ring member ``member``'s block
    (arithmetic only: ``member`` may be traced)."""
    if spec.inner == 1:
        return positions(spec.layout, index, spec.local, spec.n, member)
    rank = member * spec.inner + index // spec.shard  # the rank of the shard each token is from
    return positions(spec.layout, index % spec.shard, spec.shard, spec.n * spec.inner, rank)


def ring(
    backend: Backend[Any],
    group: Any,
    n: int,
    q: Any,
    k: Any,
    v: Any,
    shapes: AttentionShapes,
    causal: bool,
    key_mask: Any,
    layout: Layout,
) -> Any:
    """This rank's queries over the whole sequence, the keys and values passed around the ring.

    Shapes, with N ranks and ``S_pad = N * s``::

        q [B, s, Hq, D]   k [B, s, Hkv, D]   v [B, s, Hkv, Dv]      sequence-sharded
        -> N steps: attend the held k/v block [B, s, Hkv, D | Dv] (rank r - t's), send it to
           rank r + 1, merge (o, lse)
        out [B, s, Hq, Dv]                                            sequence-sharded

    Any head count (heads never split). Communication: N - 1 sends of this rank's K/V forward
    and the backward's N - 1 of K/V plus N of the float32 (float64) K/V gradients. Memory per
    rank O(S/N). Differentiable once (the backward is the explicit ring; a second derivative
    raises).
    """
    if key_mask is not None and len(backend.shape(key_mask)) == 1:
        key_mask = backend.reshape(key_mask, (1, -1))
    spec = RingSpec(group, n, shapes.local, shapes.real, shapes.scale, causal, layout)
    return backend.ring_attention(spec, q, k, v, key_mask)


def _accumulation(backend: Backend[Any], x: Any) -> Any:
    """``x`` in the dtype the ring computes in: float64 stays, everything else float32."""
    return x if backend.dtype_info(x).name.endswith("float64") else backend.to_float32(x)


def _parts(spec: RingSpec) -> tuple[tuple[int, int], ...]:
    """The ``(start, length)`` of the pieces a shard is cut into: two halves under causal
    attention (the first one the larger), else the whole shard."""
    s = spec.local
    if not spec.causal or s < 2 or not spec.skips:
        return ((0, s),)
    half = (s + 1) // 2
    return ((0, half), (half, s - half))


def _chunk(spec: RingSpec, rank: Any, part: int, parts: int) -> Any:
    """The index of piece ``part`` of ``rank``'s shard among the sequence's chunks, in sequence
    order (arithmetic only: ``rank`` may be traced)."""
    if parts == 1:
        return rank
    if spec.layout == "zigzag":
        return rank if part == 0 else 2 * spec.n - 1 - rank
    return 2 * rank + part


class _Step:
    """What one step of the ring knows about the block it holds: which of its pairs to skip,
    which to attend with a causal mask, and each pair's ``allowed`` mask."""

    def __init__(
        self,
        backend: Backend[Any],
        spec: RingSpec,
        t: Any,
        rank: Any,
        q_pos: Any,
        index: Any,
        mask: Any,
    ) -> None:
        # t: the step, an int (JAX: traced inside the loop); step 0 is always an int
        self.backend, self.spec, self.rank = backend, spec, rank
        self.own = isinstance(t, int) and t == 0
        self.src = rank if self.own else (rank - t) % spec.n
        self.parts = _parts(spec)
        self.q_pos = q_pos
        self.k_pos = block_positions(spec, index, self.src)
        valid = None
        if spec.real < spec.n * spec.local:
            valid = backend.reshape(self.k_pos < spec.real, (1, -1))
        if mask is not None:
            valid = mask if valid is None else backend.logical_and(mask, valid)
        self.valid = valid

    def relation(self, qi: int, kj: int) -> Any:
        """How key piece ``kj`` relates to query piece ``qi``: ``"full"`` (wholly before it, or
        not causal), ``"skip"`` (wholly after), ``"diag"`` (the same chunk), or a traced bool
        (True: skip; else attend with the causal mask) where the ranks are traced."""
        if not self.spec.causal:
            return "full"
        if not self.spec.skips:
            return "diag"
        if self.own:  # the rank's own block: its pieces are in sequence order
            ck, cq = kj, qi
        else:
            count = len(self.parts)
            ck = _chunk(self.spec, self.src, kj, count)
            cq = _chunk(self.spec, self.rank, qi, count)
        if isinstance(ck, int) and isinstance(cq, int):
            return "skip" if ck > cq else "full" if ck < cq else "diag"
        return ck > cq

    def skip(self, qi: int, kj: int) -> Any:
        """Whether the pair is skipped (a bool, or traced)."""
        relation = self.relation(qi, kj)
        return relation == "skip" if isinstance(relation, str) else relation

    def allowed(self, qi: int, kj: int) -> Any:
        """``[B | 1, sq, sk]`` bool (or None: every key) for the pair: the valid keys and, unless
        the key piece is known to come wholly before the query piece, the causal mask."""
        (q0, ql), (k0, kl) = self.parts[qi], self.parts[kj]
        allowed = None if self.valid is None else self.valid[:, None, k0 : k0 + kl]
        relation = self.relation(qi, kj)
        if not (isinstance(relation, str) and relation == "full"):
            k_pos, q_pos = self.k_pos[k0 : k0 + kl], self.q_pos[q0 : q0 + ql]
            causal = (k_pos[None, :] <= q_pos[:, None])[None]
            allowed = causal if allowed is None else self.backend.logical_and(allowed, causal)
        return allowed


@dataclass(frozen=True)
class _Call:
    """One kernel call that covers several pairs of a step: query pieces ``rows`` against key
    pieces ``cols`` (each a range of piece indices), ``causal`` when they are the rank's own
    block's pieces with their causal mask (queries and keys at the same positions)."""

    rows: range
    cols: range
    causal: bool


def _calls(step: _Step) -> list[_Call] | None:
    """Where every pair's relation is known now (torch: always; JAX: at step 0), the fewest
    calls that cover the pairs not skipped: one call when they are a rectangle of ``"full"``
    pairs, or the rank's whole own block under its causal mask when no key is masked (a mask
    would then be ``[s, s]``; per pair it is a quarter of that); else None (a call per pair)."""
    count = len(step.parts)
    relations = {(qi, kj): step.relation(qi, kj) for qi in range(count) for kj in range(count)}
    if not all(isinstance(r, str) for r in relations.values()):
        return None
    live = {pair: r for pair, r in relations.items() if r != "skip"}
    if not live:
        return []
    rows = range(min(q for q, _ in live), max(q for q, _ in live) + 1)
    cols = range(min(k for _, k in live), max(k for _, k in live) + 1)
    if set(live.values()) == {"full"} and len(live) == len(rows) * len(cols):
        return [_Call(rows, cols, False)]
    own = {(qi, kj): "diag" if qi == kj else "full" for qi in range(count) for kj in range(qi + 1)}
    if step.own and step.spec.skips and step.valid is None and live == own:
        return [_Call(range(count), range(count), True)]
    return None


def _span(parts: tuple[tuple[int, int], ...], pieces: range) -> slice:
    """The tokens of the consecutive ``pieces``."""
    first, last = parts[pieces[0]], parts[pieces[-1]]
    return slice(first[0], last[0] + last[1])


def _pieces(x: Any, parts: tuple[tuple[int, int], ...]) -> list[Any]:
    """``x`` cut along dim 1 into ``parts``."""
    return [x[:, start : start + length] for start, length in parts]


class _Pass:
    """The per-call constants of a forward or backward pass over the ring."""

    def __init__(self, backend: Backend[Any], spec: RingSpec, q: Any, k: Any) -> None:
        batch, s, hq, _ = backend.shape(q)
        hkv = backend.shape(k)[2]
        self.backend, self.spec = backend, spec
        self.five = (batch, s, hkv, hq // hkv)  # [B, s, Hkv, G, *]
        self.rank = backend.rank(spec.group)
        self.index = backend.arange(q, s)
        self.q_pos = block_positions(spec, self.index, self.rank)
        self.parts = _parts(spec)

    def as5(self, x: Any) -> Any:
        """``[B, s, Hq, E]`` -> ``[B, s, Hkv, G, E]`` in the accumulation dtype."""
        return self.backend.reshape(_accumulation(self.backend, x), (*self.five, -1))

    def pieces(self, x: Any) -> list[Any]:
        return _pieces(x, self.parts)

    def step(self, t: Any, held: tuple[Any, ...]) -> _Step:
        mask = held[2] if len(held) > 2 else None
        return _Step(self.backend, self.spec, t, self.rank, self.q_pos, self.index, mask)

    def steps(self, body: Callable[[Any, Any, bool], Any], carry: Any) -> Any:
        """``body(t, carry, send)`` for t = 0 .. N-1, ``send`` False only at the last step (its
        block goes nowhere). The middle steps run as the backend's loop (JAX: one traced
        ``fori_loop`` body, whatever N)."""
        n = self.spec.n
        if n == 1:
            return body(0, carry, False)
        carry = body(0, carry, True)
        carry = self.backend.loop(1, n - 1, lambda t, c: body(t, c, True), carry)
        return body(n - 1, carry, False)


def ring_forward(
    backend: Backend[Any], spec: RingSpec, q: Any, k: Any, v: Any, key_mask: Any
) -> tuple[Any, Any, Any]:
    """``(out [B, s, Hq, Dv] in q's dtype, o5, lse)``; the last two are what the backward pass
    needs (see ``blocks``)."""
    run = _Pass(backend, spec, q, k)
    q5 = run.as5(q)
    q_pieces = run.pieces(q5)
    parts = range(len(run.parts))

    def body(t: Any, carry: Any, send: bool) -> Any:
        held, acc = carry
        moving = backend.ring_shift(held, spec.group) if send else None
        step = run.step(t, held)
        k, v = (_accumulation(backend, x) for x in held[:2])
        acc = list(acc)
        calls = _calls(step)
        if calls is None:
            k_pieces, v_pieces = run.pieces(k), run.pieces(v)
            for qi in parts:
                for kj in parts:
                    attend = partial(
                        _attend, backend, step, qi, kj, q_pieces[qi], k_pieces[kj], v_pieces[kj]
                    )
                    acc[qi] = backend.branch(step.skip(qi, kj), _same, attend, acc[qi])
        for call in calls or ():
            rows, cols = _span(run.parts, call.rows), _span(run.parts, call.cols)
            allowed = None if step.valid is None else step.valid[:, None, cols]
            o5, lse = backend.block_forward(
                q5[:, rows], k[:, cols], v[:, cols], allowed, spec.scale, causal=call.causal
            )
            for qi in call.rows:
                start, length = run.parts[qi]
                piece = slice(start - rows.start, start - rows.start + length)
                new = (o5[:, piece], lse[:, piece])
                acc[qi] = new if acc[qi] is None else merge(backend, acc[qi], new)
        return (held if moving is None else moving.wait()), acc

    held = (k, v) if key_mask is None else (k, v, key_mask)
    _, acc = run.steps(body, (held, [None] * len(parts)))
    o5 = backend.concat([o for o, _ in acc], 1)
    lse = backend.concat([lse for _, lse in acc], 1)
    out = backend.reshape(o5, (*backend.shape(q)[:3], backend.shape(v)[3]))
    return backend.cast_like(out, q), o5, lse


def _same(x: Any) -> Any:
    return x


def _attend(
    backend: Backend[Any], step: _Step, qi: int, kj: int, q5: Any, k: Any, v: Any, acc: Any
) -> tuple[Any, Any]:
    """``acc`` (None before the first block) merged with query piece ``qi`` over key piece
    ``kj`` of the held block."""
    new = backend.block_forward(q5, k, v, step.allowed(qi, kj), step.spec.scale)
    return new if acc is None else merge(backend, acc, new)


def _grads(
    backend: Backend[Any],
    step: _Step,
    qi: int,
    kj: int,
    pair: tuple[Any, Any, Any],
    saved: tuple[Any, Any, Any, Any],
    sums: tuple[Any, Any, Any],
) -> tuple[Any, Any, Any]:
    """The running ``(dq piece, dk piece, dv piece)`` plus the pair's terms."""
    gq, gk, gv = backend.block_grads(*pair, step.allowed(qi, kj), step.spec.scale, *saved)
    q_sum, k_sum, v_sum = sums
    return (gq if q_sum is None else q_sum + gq, k_sum + gk, v_sum + gv)


def _add_at(backend: Backend[Any], whole: Any, part: Any, tokens: slice) -> Any:
    """``whole`` plus ``part`` at ``tokens`` of dim 1 (``part`` where ``whole`` is zeros)."""
    if tokens.start == 0 and tokens.stop == backend.shape(whole)[1]:
        return whole + part
    pieces = [whole[:, : tokens.start], whole[:, tokens] + part, whole[:, tokens.stop :]]
    return backend.concat(pieces, 1)


def ring_backward(
    backend: Backend[Any],
    spec: RingSpec,
    q: Any,
    k: Any,
    v: Any,
    key_mask: Any,
    o5: Any,
    lse: Any,
    dout: Any,
) -> tuple[Any, Any, Any]:
    """``(dq, dk, dv)`` in the dtypes of q, k, v: the ring again, each block's key/value
    gradient (float32 or float64) sent on with the block and home after the last step."""
    run = _Pass(backend, spec, q, k)
    q5, do5 = run.as5(q), run.as5(dout)
    delta = backend.einsum("bqhge,bqhge->bqhg", do5, o5)
    q_pieces, do_pieces = run.pieces(q5), run.pieces(do5)
    lse_pieces, delta_pieces, o_pieces = run.pieces(lse), run.pieces(delta), run.pieces(o5)
    parts = range(len(run.parts))

    def body(t: Any, carry: Any, send: bool) -> Any:
        held, dq, grads = carry  # grads: the (dk, dv) on their way here, None at step 0
        moving = backend.ring_shift(held, spec.group) if send else None
        step = run.step(t, held)
        k, v = (_accumulation(backend, x) for x in held[:2])
        dq = list(dq)
        calls = _calls(step)
        if calls is None:
            k_pieces, v_pieces = run.pieces(k), run.pieces(v)
            dk = [backend.zeros_like(x) for x in k_pieces]
            dv = [backend.zeros_like(x) for x in v_pieces]
            for qi in parts:
                for kj in parts:
                    pair = (q_pieces[qi], k_pieces[kj], v_pieces[kj])
                    saved = (lse_pieces[qi], do_pieces[qi], delta_pieces[qi], o_pieces[qi])
                    add = partial(_grads, backend, step, qi, kj, pair, saved)
                    dq[qi], dk[kj], dv[kj] = backend.branch(
                        step.skip(qi, kj), _same, add, (dq[qi], dk[kj], dv[kj])
                    )
            dk_block, dv_block = backend.concat(dk, 1), backend.concat(dv, 1)
        else:
            dk_block, dv_block = backend.zeros_like(k), backend.zeros_like(v)
        for call in calls or ():
            rows, cols = _span(run.parts, call.rows), _span(run.parts, call.cols)
            allowed = None if step.valid is None else step.valid[:, None, cols]
            gq, gk, gv = backend.block_grads(
                q5[:, rows],
                k[:, cols],
                v[:, cols],
                allowed,
                spec.scale,
                lse[:, rows],
                do5[:, rows],
                delta[:, rows],
                o5[:, rows],
                causal=call.causal,
            )
            for qi in call.rows:
                start, length = run.parts[qi]
                piece = gq[:, start - rows.start : start - rows.start + length]
                dq[qi] = piece if dq[qi] is None else dq[qi] + piece
            dk_block = _add_at(backend, dk_block, gk, cols)
            dv_block = _add_at(backend, dv_block, gv, cols)
        if grads is not None:
            arrived_k, arrived_v = grads.wait()
            dk_block, dv_block = dk_block + arrived_k, dv_block + arrived_v
        if spec.n == 1:  # a ring of one (USP without a ring): the block is home
            return held, dq, (dk_block, dv_block)
        grads = backend.ring_shift((dk_block, dv_block), spec.group)
        return (held if moving is None else moving.wait()), dq, grads

    held = (k, v) if key_mask is None else (k, v, key_mask)
    _, dq, grads = run.steps(body, (held, [None] * len(parts), None))
    dk_home, dv_home = grads if spec.n == 1 else grads.wait()
    dq_all = backend.reshape(backend.concat(dq, 1), backend.shape(q))
    return (
        backend.cast_like(dq_all, q),
        backend.cast_like(dk_home, k),
        backend.cast_like(dv_home, v),
    )
