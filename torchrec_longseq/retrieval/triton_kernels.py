"""Triton kernels of the ``longseq`` operators, for CUDA tensors.

One function per operator, with the operator's signature and results (the schemas in
``csrc/registration.cpp``): ETA's Hamming top-k read by id (per segment and for one shared
history), SIM's hard search (per segment and shared), the float top-k per segment (SIM soft),
TWIN's search, SDIM's collisions, and the jagged target attention with absorbed projections
(forward and backward). ``register()`` makes them the CUDA kernels of the operators
(``torch.ops.longseq.<op>`` on CUDA tensors then runs them, under ``torch.compile`` and
``torch.export`` too: the fake kernels are the CPU operators' own, ``retrieval.kernels``);
``retrieval.kernels`` registers them when the C++ library is loaded and CUDA is available, and
calls these functions directly on CUDA tensors where the C++ library did not build (with
``attention``, an autograd function, for the attention's gradient).

Every operation is one kernel launch over a grid of one program per segment (per candidate for
a shared history); all heads, all positions and all words of a segment are handled inside its
program. The selections are exact: the same positions in the same order as the C++ operators
(and the torch-ops references), ties to the more recent behavior.

* **Hamming top-k** (``hamming_topk_by_id``, ``hamming_topk_shared``). Pass 1 computes each
  behavior's distance (the signature words read by id, xor, a SWAR popcount) into a histogram
  over ``[0, 64 W]`` (``tl.histogram``); its cumulative sum gives the threshold distance ``t``
  and, per distance, how many are closer. Pass 2 scans from the most recent behavior backwards
  (stopping once ``k`` are taken) and writes each behavior at or below ``t`` straight to its
  output slot: ``closer[d] + (same-distance behaviors after it)``, taking only the most recent
  ``k - closer[t]`` at ``t``. No sort.
* **Hard search** (``hard_topk``, ``hard_topk_shared``). A backward scan counts matches until
  the ``k``-th; a second scan of the same blocks writes the matches chronologically.
* **Float top-k** (``float_topk``; TWIN's scores too). Scores become order-preserving 32-bit
  keys (``-0.0`` and ``0.0`` equal); a radix select (four passes of 8-bit digit histograms)
  finds the ``k``-th largest key; a backward scan collects the keys above it and the most
  recent ones equal to it (as ``key * 2^31 + position``, which orders ties to the later
  position); each collected key's output rank is the number of collected keys above it
  (``O(k^2)`` compares per segment, in 64 x 64 tiles).
* **TWIN** (``twin_topk_by_id``): the scores ``(float) (scale * q . (I[item, w:] + C[cat, w:]))
  + bias`` (the product in float64, as the C++ kernel) of the segment into a scratch row, then
  the float top-k on it.
* **SDIM** (``sdim_collisions``): per segment an open-addressing table (``2 L + 1`` slots,
  ``atomic_cas``) of the colliding (item, category) pairs with each pair's first position
  (``atomic_min``) and count (``atomic_add``); a second, forward scan writes the pairs whose
  first position it meets, so the pairs come in order of first occurrence as in the C++ kernel.
* **Attention** (``attention_forward``, ``attention_backward``): per segment, all heads at once:
  pass 1 the logits' maximum and exponential sum (online), pass 2 the weights (written, the
  backward reads them) and the weighted sums of the keys; the backward's pass 1 the per-head
  ``sum_n w dL/dw``, pass 2 ``dlogits``, ``dkeys`` per position and ``dqa``. Keys are read
  through ``index`` in place where given.

Host synchronisations. A registered operator whose output size depends on the data returns it
compacted, so the output size is read on the host: one sync per call for the Hamming top-k by
segment, the float top-k and TWIN (the sum of ``min(L_b, k)``, read before the launch: the
kernel then writes the compacted output directly), one for the hard search (the kernel writes
``[B, min(k, N)]`` and the lengths; the compaction's boolean mask), two for SDIM (the scratch's
size before the launch, the compaction after). ``hamming_topk_shared`` and the attention sync
nothing. The checks of the ids and segments are queued on the device (``torch._assert_async``,
no sync: a bad id stops the CUDA context as an out-of-range ``index_select`` would); on CPU
tensors (the interpreter, below) they raise ``RuntimeError`` at once.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set
before this module is imported; the tests do so where no GPU is present), which executes them
with numpy, one program at a time: it is what checks them without a GPU, not a CPU backend.

Limits, checked on the host: segments shorter than 2^31 positions; SDIM's ids below 2^31 and
``groups_per_word * tau <= 64``. Scores must not be NaN (as for the C++ kernels). TWIN's scores
are dot products summed in a different order than the C++ kernel's and the torch ops' (a tree
of ``tl.sum``): scores that differ in the last bits can rank differently on near ties; with
scores exact in float32 (integer-valued data, as in the tests) the selections are identical.

Importing this module imports ``triton``; ``retrieval.kernels`` imports it lazily, on the first
CUDA tensor (the package imports and runs without triton).
"""

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "attention",
    "attention_backward",
    "attention_forward",
    "float_topk",
    "hamming_topk_by_id",
    "hamming_topk_shared",
    "hard_topk",
    "hard_topk_shared",
    "interpreted",
    "register",
    "sdim_collisions",
    "twin_topk_by_id",
]

_HAMMING_BLOCK = 128  # behaviors per step of the Hamming scans ([BLOCK, BLOCK] tie counts)
_HARD_BLOCK = 256
_TOPK_BLOCK = 256  # scores per step of the radix passes and the collection
_RANKS = 64  # the float top-k's ranking tile: [RANKS, RANKS] compares
_SDIM_BLOCK = 128
_ATTENTION_ELEMENTS = 8192  # [BLOCK, H, K] products per step of the attention


# ------------------------------------------------------------------------------ device functions

@triton.jit
def _popcount64(x):
    """Set bits of every int64 lane (SWAR; the sign bit counted apart, so every shift is of a
    non-negative value) -> int64 in [0, 64]."""
    sign = (x < 0).to(tl.int64)
    v = x & 0x7FFFFFFFFFFFFFFF
    v = v - ((v >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    v = v + (v >> 32)
    return (v & 0x7F) + sign


@triton.jit
def _hamming_block(A, a_ids, a_target, WA, C, c_ids, c_target, WC, pos, valid,
                   BLOCK: tl.constexpr):
    """``[BLOCK]`` int32 distances of the behaviors at ``pos``: popcount of ``A[a_ids[p]] ^
    a_target`` over its ``WA`` words plus the same for the category table. Lanes not ``valid``
    get some distance in ``[0, 64 (WA + WC)]`` (nothing is read for them); the callers mask
    them."""
    ai = tl.load(a_ids + pos, mask=valid, other=0)
    ci = tl.load(c_ids + pos, mask=valid, other=0)
    d = tl.zeros([BLOCK], dtype=tl.int32)
    for w in range(WA):
        x = tl.load(A + ai * WA + w, mask=valid, other=0) ^ tl.load(a_target + w)
        d += _popcount64(x).to(tl.int32)
    for w in range(WC):
        x = tl.load(C + ci * WC + w, mask=valid, other=0) ^ tl.load(c_target + w)
        d += _popcount64(x).to(tl.int32)
    return d


@triton.jit
def _order_key(s):
    """float32 -> int64 key in [0, 2^32) with the scores' order (``-0.0`` as ``0.0``)."""
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648


@triton.jit
def _select_largest(scores, first, n, want, out, comp, BLOCK: tl.constexpr,
                    RANKS: tl.constexpr):
    """``out[0:want] = first + i`` for the ``want`` (``1 <= want <= n``) largest of
    ``scores[0:n]`` (float32), largest first, ties to the larger ``i``. ``comp[0:want]`` is
    scratch (int64)."""
    lanes = tl.arange(0, BLOCK)
    digits = tl.arange(0, 256)
    take_all = want >= n
    threshold = want * 0  # the want-th largest key, found 8 bits at a time
    ties = want  # how many to take among the keys equal to the threshold
    if want < n:
        for r in tl.static_range(4):
            shift = 24 - 8 * r  # a constant: the loop is unrolled
            hist = tl.zeros([256], dtype=tl.int32)
            for s in range(0, n, BLOCK):
                loc = s + lanes
                valid = loc < n
                key = _order_key(tl.load(scores + loc, mask=valid, other=0.0))
                match = valid & ((key >> (shift + 8)) == (threshold >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=match)
            at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # digit >= each
            digit = tl.max(tl.where(at_least >= ties, digits, 0), 0)
            ties -= tl.sum(tl.where(digits > digit, hist, 0), 0)
            threshold = threshold | (digit.to(tl.int64) << shift)
    # collect, most recent first: every key above the threshold, the most recent ties
    taken = want * 0
    tied = want * 0
    end = n
    while (end > 0) & (taken < want):
        loc = end - BLOCK + lanes
        valid = loc >= 0
        key = _order_key(tl.load(scores + loc, mask=valid, other=0.0))
        eq = (valid & (key == threshold)).to(tl.int64)
        after = tied + tl.sum(eq, 0) - tl.cumsum(eq, 0)  # equal keys later than each
        sel = valid & (take_all | (key > threshold) | ((eq != 0) & (after < ties)))
        si = sel.to(tl.int64)
        slot = taken + tl.cumsum(si, 0) - si
        tl.store(comp + slot, key * 2147483648 + loc, mask=sel)
        taken += tl.sum(si, 0)
        tied += tl.sum(eq, 0)
        end -= BLOCK
    tl.debug_barrier()  # the collected keys, written by all of the program's threads
    ranks = tl.arange(0, RANKS)
    for i0 in range(0, want, RANKS):
        i = i0 + ranks
        vi = i < want
        ci = tl.load(comp + i, mask=vi, other=-1)
        rank = tl.zeros([RANKS], dtype=tl.int64)
        for j0 in range(0, want, RANKS):
            j = j0 + ranks
            cj = tl.load(comp + j, mask=j < want, other=-1)
            rank += tl.sum((cj[None, :] > ci[:, None]).to(tl.int64), 1)
        tl.store(out + rank, first + (ci & 0x7FFFFFFF), mask=vi)


@triton.jit
def _collision_mask(di, dc, tau, gpw, group_mask):
    """SDIM: bit ``g`` set where group ``g`` (bits ``g tau`` .. ``g tau + tau - 1``) of the item
    codes' xor ``di`` is 0, bit ``gpw + g`` for the category codes' ``dc`` (int64 lanes)."""
    m = di * 0
    for g in range(gpw):
        m |= (((di >> (g * tau)) & group_mask) == 0).to(tl.int64) << g
        m |= (((dc >> (g * tau)) & group_mask) == 0).to(tl.int64) << (gpw + g)
    return m


# ------------------------------------------------------------------------------ kernels

@triton.jit
def _hamming_topk_kernel(A, a_ids, a_targets, WA, C, c_ids, c_targets, WC, starts, ends,
                         out_off, out, k, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """Program ``b``: the ``min(L_b, k)`` behaviors of ``[starts[b], ends[b])`` nearest target
    ``b`` to ``out[out_off[b]:]``, nearest first, ties to the later position."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(starts + b)
    hi = tl.load(ends + b)
    want = tl.minimum(hi - lo, k)
    if want > 0:
        a_target = a_targets + b * WA
        c_target = c_targets + b * WC
        lanes = tl.arange(0, BLOCK)
        bins = tl.arange(0, BINS)
        hist = tl.zeros([BINS], dtype=tl.int32)
        for s in range(lo, hi, BLOCK):
            pos = s + lanes
            valid = pos < hi
            d = _hamming_block(A, a_ids, a_target, WA, C, c_ids, c_target, WC, pos, valid, BLOCK)
            hist += tl.histogram(d, BINS, mask=valid)
        at_most = tl.cumsum(hist, 0)
        t = tl.sum((at_most < want).to(tl.int32), 0)  # the threshold distance
        closer = at_most - hist  # per distance: how many are closer
        ties = want - tl.sum(tl.where(bins < t, hist, 0), 0)  # taken at distance t
        dst = out + tl.load(out_off + b)
        seen = tl.zeros([BINS], dtype=tl.int32)  # per distance: scanned so far (later ones)
        after = lanes[None, :] > lanes[:, None]  # [row, col]: col is later than row
        taken = want * 0
        end = hi
        while (end > lo) & (taken < want):
            pos = end - BLOCK + lanes
            valid = pos >= lo
            d = _hamming_block(A, a_ids, a_target, WA, C, c_ids, c_target, WC, pos, valid, BLOCK)
            near = valid & (d <= t)
            if tl.sum(near.to(tl.int32), 0) > 0:
                same = after & (d[None, :] == d[:, None]) & valid[None, :]
                rank = tl.gather(seen, d, 0) + tl.sum(same.to(tl.int32), 1)
                sel = near & ((d < t) | (rank < ties))
                tl.store(dst + tl.gather(closer, d, 0) + rank, pos, mask=sel)
                taken += tl.sum(sel.to(tl.int64), 0)
            seen += tl.histogram(d, BINS, mask=valid)
            end -= BLOCK


@triton.jit
def _hard_topk_kernel(cats, targets, starts, ends, out, lengths, k, width,
                      BLOCK: tl.constexpr):
    """Program ``b``: the ``k`` most recent positions of ``[starts[b], ends[b])`` whose category
    is ``targets[b]``, chronological, to ``out[b width:]`` (``width >= min(k, L_b)``); their
    count to ``lengths[b]``."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(starts + b)
    hi = tl.load(ends + b)
    target = tl.load(targets + b)
    lanes = tl.arange(0, BLOCK)
    found = lo * 0
    end = hi
    while (end > lo) & (found < k):  # count back to the k-th match
        pos = end - BLOCK + lanes
        valid = pos >= lo
        c = tl.load(cats + pos, mask=valid, other=0)
        found += tl.sum((valid & (c == target)).to(tl.int64), 0)
        end -= BLOCK
    count = tl.minimum(found, k)
    tl.store(lengths + b, count)
    row = out + b * width
    seen = lo * 0
    e = hi
    while e > end:  # the same blocks again: the r-th match from the end goes to count - 1 - r
        pos = e - BLOCK + lanes
        valid = pos >= lo
        c = tl.load(cats + pos, mask=valid, other=0)
        m = (valid & (c == target)).to(tl.int64)
        r = seen + tl.sum(m, 0) - tl.cumsum(m, 0)
        sel = (m != 0) & (r < count)
        tl.store(row + count - 1 - r, pos, mask=sel)
        seen += tl.sum(m, 0)
        e -= BLOCK


@triton.jit
def _float_topk_kernel(scores, starts, ends, out_off, out, comp, k, BLOCK: tl.constexpr,
                       RANKS: tl.constexpr):
    """Program ``b``: the ``min(L_b, k)`` largest scores of ``[starts[b], ends[b])``."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(starts + b)
    hi = tl.load(ends + b)
    want = tl.minimum(hi - lo, k)
    if want > 0:
        o = tl.load(out_off + b)
        _select_largest(scores + lo, lo, hi - lo, want, out + o, comp + o, BLOCK, RANKS)


@triton.jit
def _twin_topk_kernel(I, items, C, cats, Q, bias, scale_ptr, starts, ends, out_off, out, comp,
                      score_off, scores, k, w, BLOCK: tl.constexpr, WIDTH: tl.constexpr,
                      RANKS: tl.constexpr):
    """Program ``b``: TWIN's scores of ``[starts[b], ends[b])`` into ``scores[score_off[b]:]``,
    then their top ``min(L_b, k)``."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(starts + b)
    hi = tl.load(ends + b)
    n = hi - lo
    want = tl.minimum(n, k)
    if want > 0:
        scale = tl.load(scale_ptr)  # float64
        cols = tl.arange(0, WIDTH)
        cm = cols < w
        q = tl.load(Q + b * w + cols, mask=cm, other=0.0)
        mine = scores + tl.load(score_off + b)
        lanes = tl.arange(0, BLOCK)
        for s in range(0, n, BLOCK):
            loc = s + lanes
            valid = loc < n
            p = lo + loc
            it = tl.load(items + p, mask=valid, other=0)
            ca = tl.load(cats + p, mask=valid, other=0)
            m2 = valid[:, None] & cm[None, :]
            key = (tl.load(I + it[:, None] * (2 * w) + w + cols[None, :], mask=m2, other=0.0)
                   + tl.load(C + ca[:, None] * (2 * w) + w + cols[None, :], mask=m2, other=0.0))
            dot = tl.sum(q[None, :] * key, 1)
            score = (dot.to(tl.float64) * scale).to(tl.float32)
            score = score + tl.load(bias + p, mask=valid, other=0.0)
            tl.store(mine + loc, score, mask=valid)
        tl.debug_barrier()  # the scores, written by all of the program's threads
        o = tl.load(out_off + b)
        _select_largest(mine, lo, n, want, out + o, comp + o, BLOCK, RANKS)


@triton.jit
def _sdim_kernel(IC, items, CC, cats, target_items, target_cats, starts, ends, seg_off,
                 table_off, slot_key, slot_first, slot_count, pos_slot, positions, weights,
                 lengths, tau, gpw, group_mask, BLOCK: tl.constexpr):
    """Program ``b``: the distinct (item, category) pairs of ``[starts[b], ends[b])`` colliding
    with target ``b`` in some group, in order of first occurrence: first position to
    ``positions[seg_off[b]:]``, per group the pair's count or 0 to ``weights`` (``2 gpw`` a
    row), their number to ``lengths[b]``. ``slot_*[table_off[b]:]`` is the segment's hash table
    (``2 L_b + 1`` slots, keys -1), ``pos_slot[seg_off[b]:]`` each position's slot (scratch)."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(starts + b)
    hi = tl.load(ends + b)
    n = hi - lo
    base = tl.load(seg_off + b)
    table = tl.load(table_off + b)
    cap = 2 * n + 1
    ti = tl.load(IC + tl.load(target_items + b))
    tc = tl.load(CC + tl.load(target_cats + b))
    lanes = tl.arange(0, BLOCK)
    for s in range(0, n, BLOCK):
        loc = s + lanes
        valid = loc < n
        p = lo + loc
        a = tl.load(items + p, mask=valid, other=0)
        c = tl.load(cats + p, mask=valid, other=0)
        m = _collision_mask(tl.load(IC + a, mask=valid, other=0) ^ ti,
                            tl.load(CC + c, mask=valid, other=0) ^ tc, tau, gpw, group_mask)
        active = valid & (m != 0)
        key = a * 2147483648 + c
        h = (a * 2654435761 + c * 40503) % cap
        slot = h * 0 - 1
        while tl.sum(active.to(tl.int32), 0) > 0:  # linear probing; idle lanes never match -2
            old = tl.atomic_cas(slot_key + table + h, tl.where(active, -1, -2).to(tl.int64),
                                tl.where(active, key, -2).to(tl.int64))
            hit = active & ((old == -1) | (old == key))
            slot = tl.where(hit, h, slot)
            active = active & (hit == 0)
            h = tl.where(active, (h + 1) % cap, h)
        collides = slot >= 0
        tl.atomic_min(slot_first + table + slot, p, mask=collides)
        tl.atomic_add(slot_count + table + slot, 1, mask=collides)
        tl.store(pos_slot + base + loc, slot, mask=valid)
    tl.debug_barrier()  # the table, filled by all of the program's threads
    found = n * 0
    G = 2 * gpw
    for s in range(0, n, BLOCK):
        loc = s + lanes
        valid = loc < n
        p = lo + loc
        slot = tl.load(pos_slot + base + loc, mask=valid, other=-1)
        collides = slot >= 0
        first = tl.load(slot_first + table + slot, mask=collides, other=-1, cache_modifier=".cg")
        rep = collides & (first == p)  # the pair's first occurrence
        ri = rep.to(tl.int64)
        o = base + found + tl.cumsum(ri, 0) - ri
        tl.store(positions + o, p, mask=rep)
        count = tl.load(slot_count + table + slot, mask=rep, other=0,
                        cache_modifier=".cg").to(tl.float32)
        a = tl.load(items + p, mask=rep, other=0)
        c = tl.load(cats + p, mask=rep, other=0)
        m = _collision_mask(tl.load(IC + a, mask=rep, other=0) ^ ti,
                            tl.load(CC + c, mask=rep, other=0) ^ tc, tau, gpw, group_mask)
        for g in range(G):
            tl.store(weights + o * G + g, tl.where(((m >> g) & 1) != 0, count, 0.0), mask=rep)
        found += tl.sum(ri, 0)
    tl.store(lengths + b, found)


@triton.jit
def _attention_rows(keys, index, pos, valid, cols, cm, K, HAS_INDEX: tl.constexpr):
    """``(rows [BLOCK], z [BLOCK, KP])``: the key rows the positions read and the keys."""
    if HAS_INDEX:
        rows = tl.load(index + pos, mask=valid, other=0)
    else:
        rows = pos
    z = tl.load(keys + rows[:, None] * K + cols[None, :], mask=valid[:, None] & cm[None, :],
                other=0.0)
    return rows, z


@triton.jit
def _attention_logits(keys, index, bias, q, pos, valid, heads, hm, cols, cm, H, K,
                      HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr):
    """``(z [BLOCK, KP], logit [BLOCK, HP])``: the keys the positions read and ``q[h] . z +
    bias[row, h]``."""
    rows, z = _attention_rows(keys, index, pos, valid, cols, cm, K, HAS_INDEX)
    logit = tl.sum(z[:, None, :] * q[None, :, :], 2)  # [BLOCK, HP]
    if HAS_BIAS:
        logit += tl.load(bias + rows[:, None] * H + heads[None, :],
                         mask=valid[:, None] & hm[None, :], other=0.0)
    return z, logit


@triton.jit
def _attention_forward_kernel(qa, keys, offsets, bias, index, agg, weights, H, K,
                              HAS_BIAS: tl.constexpr, HAS_INDEX: tl.constexpr,
                              BLOCK: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr):
    """Program ``b``: softmax per head over the positions ``[offsets[b], offsets[b + 1])`` of
    ``qa[b, h] . keys[r] + bias[r, h]``; the weights to ``weights[n, h]``, ``agg[b, h] = sum_n
    w[n, h] keys[r]``."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(offsets + b)
    hi = tl.load(offsets + b + 1)
    heads = tl.arange(0, HP)
    cols = tl.arange(0, KP)
    lanes = tl.arange(0, BLOCK)
    hm = heads < H
    cm = cols < K
    hk = hm[:, None] & cm[None, :]
    q = tl.load(qa + b * H * K + heads[:, None] * K + cols[None, :], mask=hk, other=0.0)
    top = tl.full([HP], float("-inf"), q.dtype)
    total = tl.zeros([HP], q.dtype)
    for s in range(lo, hi, BLOCK):  # the maximum and the sum of exponentials, online
        pos = s + lanes
        valid = pos < hi
        z, logit = _attention_logits(keys, index, bias, q, pos, valid, heads, hm, cols, cm, H, K,
                                     HAS_BIAS, HAS_INDEX)
        logit = tl.where(valid[:, None], logit, float("-inf"))
        new_top = tl.maximum(top, tl.max(logit, 0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logit - new_top[None, :]), 0)
        top = new_top
    inverse = 1.0 / tl.where(total > 0, total, 1.0)
    acc = tl.zeros([HP, KP], q.dtype)
    for s in range(lo, hi, BLOCK):
        pos = s + lanes
        valid = pos < hi
        z, logit = _attention_logits(keys, index, bias, q, pos, valid, heads, hm, cols, cm, H, K,
                                     HAS_BIAS, HAS_INDEX)
        w = tl.where(valid[:, None], tl.exp(logit - top[None, :]) * inverse[None, :], 0.0)
        tl.store(weights + pos[:, None] * H + heads[None, :], w, mask=valid[:, None] & hm[None, :])
        acc += tl.sum(w[:, :, None] * z[:, None, :], 0)
    tl.store(agg + b * H * K + heads[:, None] * K + cols[None, :], acc, mask=hk)


@triton.jit
def _attention_backward_kernel(grad, qa, keys, offsets, weights, index, dqa, dkeys, dlogits, H,
                               K, HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr,
                               HP: tl.constexpr, KP: tl.constexpr):
    """Program ``b``: with ``g = grad[b]`` and ``dw[n, h] = g[h] . keys[r]``: ``dlogits[n, h] =
    w (dw - sum_n' w dw)``, ``dkeys[n] = sum_h w g[h] + dlogits[n, h] qa[b, h]``, ``dqa[b, h] =
    sum_n dlogits[n, h] keys[r]``."""
    b = tl.program_id(0).to(tl.int64)
    lo = tl.load(offsets + b)
    hi = tl.load(offsets + b + 1)
    heads = tl.arange(0, HP)
    cols = tl.arange(0, KP)
    lanes = tl.arange(0, BLOCK)
    hm = heads < H
    cm = cols < K
    hk = hm[:, None] & cm[None, :]
    g = tl.load(grad + b * H * K + heads[:, None] * K + cols[None, :], mask=hk, other=0.0)
    q = tl.load(qa + b * H * K + heads[:, None] * K + cols[None, :], mask=hk, other=0.0)
    s_h = tl.zeros([HP], q.dtype)
    for s in range(lo, hi, BLOCK):
        pos = s + lanes
        valid = pos < hi
        rows, z = _attention_rows(keys, index, pos, valid, cols, cm, K, HAS_INDEX)
        w = tl.load(weights + pos[:, None] * H + heads[None, :],
                    mask=valid[:, None] & hm[None, :], other=0.0)
        s_h += tl.sum(w * tl.sum(z[:, None, :] * g[None, :, :], 2), 0)
    dq = tl.zeros([HP, KP], q.dtype)
    for s in range(lo, hi, BLOCK):
        pos = s + lanes
        valid = pos < hi
        rows, z = _attention_rows(keys, index, pos, valid, cols, cm, K, HAS_INDEX)
        vh = valid[:, None] & hm[None, :]
        w = tl.load(weights + pos[:, None] * H + heads[None, :], mask=vh, other=0.0)
        dl = w * (tl.sum(z[:, None, :] * g[None, :, :], 2) - s_h[None, :])
        tl.store(dlogits + pos[:, None] * H + heads[None, :], dl, mask=vh)
        dz = tl.sum(w[:, :, None] * g[None, :, :] + dl[:, :, None] * q[None, :, :], 1)
        tl.store(dkeys + pos[:, None] * K + cols[None, :], dz, mask=valid[:, None] & cm[None, :])
        dq += tl.sum(dl[:, :, None] * z[:, None, :], 0)
    tl.store(dqa + b * H * K + heads[:, None] * K + cols[None, :], dq, mask=hk)


# ------------------------------------------------------------------------------ host side

def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` when this
    module was imported): then on CPU tensors (numpy), else on CUDA tensors only."""
    return isinstance(_hamming_topk_kernel, InterpretedFunction)


def _device(*tensors: Optional[torch.Tensor]) -> torch.device:
    """The one device of ``tensors`` (``None`` skipped): CUDA, or CPU under the interpreter."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.device != device:
            raise RuntimeError(f"the Triton kernels need every tensor on one device: got "
                               f"{device} and {t.device}")
    if device.type == "cuda" or (device.type == "cpu" and interpreted()):
        return device
    raise RuntimeError(f"the Triton kernels run on CUDA tensors (on CPU tensors only under "
                       f"Triton's interpreter, TRITON_INTERPRET=1 set before "
                       f"retrieval.triton_kernels is imported), got {device}")


@contextlib.contextmanager
def _on(device: torch.device) -> Iterator[None]:
    """Launches on ``device`` (its CUDA device current)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def _check(ok: torch.Tensor, message: str) -> None:
    """Asserts a boolean scalar: raises at once on CPU; on CUDA a device-side assertion queued
    behind the work (no host sync)."""
    if ok.device.type == "cuda":
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise RuntimeError(message)


def _ids(t: torch.Tensor, what: str) -> torch.Tensor:
    """Integer ids (not bool, not float) as contiguous int64, as the C++ kernels take them."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RuntimeError(f"{what} must be integer ids, got {t.dtype}")
    return t.to(torch.long).contiguous()


def _check_k(k: int) -> None:
    if k < 0:
        raise RuntimeError(f"k must be >= 0, got {k}")


def _check_rows(ids: torch.Tensor, rows: int, what: str) -> None:
    """Every id indexes a table of ``rows`` rows."""
    if ids.numel():
        _check(((ids >= 0) & (ids < rows)).all(),
               f"{what} outside the table of {rows} rows (ids must be in [0, {rows}))")


def _segments(starts: torch.Tensor, ends: torch.Tensor, n: int,
              targets: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(starts, ends)`` as int64, one segment per target, each inside the ``n`` values."""
    starts, ends = _ids(starts, "starts"), _ids(ends, "ends")
    if starts.numel() != targets or ends.numel() != targets:
        raise RuntimeError(f"{starts.numel()} segments for {targets} targets")
    if targets:
        _check(((starts >= 0) & (starts <= ends) & (ends <= n)).all(),
               f"a segment [starts[b], ends[b]) is not inside the {n} values")
        _check((ends - starts < 2**31).all(), "segments must be shorter than 2^31 positions")
    return starts, ends


def _signatures(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int64 or t.dim() != 2:
        raise RuntimeError(f"signatures must be int64 [rows, W], got {t.dtype} "
                           f"{list(t.shape)}")
    return t.contiguous()


def _exclusive(lengths: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum: where each segment's output starts."""
    return torch.cumsum(lengths, 0) - lengths


def _sizes(*totals: torch.Tensor) -> Sequence[int]:
    """Scalar tensors read on the host: one sync for all of them."""
    return [int(v) for v in torch.stack(list(totals)).tolist()]


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _hamming(item_table: torch.Tensor, item_ids: torch.Tensor, item_targets: torch.Tensor,
             category_table: torch.Tensor, category_ids: torch.Tensor,
             category_targets: torch.Tensor, k: int
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                        torch.Tensor]:
    """The Hamming searches' inputs checked (int64 signatures, integer ids, ``k >= 0``)."""
    item_table, category_table = _signatures(item_table), _signatures(category_table)
    item_targets, category_targets = _signatures(item_targets), _signatures(category_targets)
    item_ids, category_ids = _ids(item_ids, "item ids"), _ids(category_ids, "category ids")
    if item_ids.numel() != category_ids.numel():
        raise RuntimeError(f"{item_ids.numel()} item ids but {category_ids.numel()} category ids")
    if item_targets.size(0) != category_targets.size(0):
        raise RuntimeError("one item and one category target each")
    if item_targets.size(1) != item_table.size(1) or \
            category_targets.size(1) != category_table.size(1):
        raise RuntimeError("targets must have their table's words")
    _check_k(k)
    _check_rows(item_ids, item_table.size(0), "item ids")
    _check_rows(category_ids, category_table.size(0), "category ids")
    return item_table, item_ids, item_targets, category_table, category_ids, category_targets


def _launch_hamming(item_table: torch.Tensor, item_ids: torch.Tensor, item_targets: torch.Tensor,
                    category_table: torch.Tensor, category_ids: torch.Tensor,
                    category_targets: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    out_off: torch.Tensor, out: torch.Tensor, k: int) -> None:
    batch = starts.numel()
    wa, wc = item_table.size(1), category_table.size(1)
    if batch == 0 or out.numel() == 0:
        return
    with _on(out.device):
        _hamming_topk_kernel[(batch,)](
            item_table, item_ids, item_targets, wa, category_table, category_ids,
            category_targets, wc, starts, ends, out_off, out, k, BLOCK=_HAMMING_BLOCK,
            BINS=_pow2(64 * (wa + wc) + 1))


def hamming_topk_by_id(item_table: torch.Tensor, item_ids: torch.Tensor,
                       item_targets: torch.Tensor, category_table: torch.Tensor,
                       category_ids: torch.Tensor, category_targets: torch.Tensor,
                       starts: torch.Tensor, ends: torch.Tensor,
                       k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """ETA's Hamming top-k per segment, signatures read by id (``longseq::hamming_topk_by_id``).

    Args:
        item_table (Tensor): ``[I, Wi]`` int64 packed signatures per item.
        item_ids (Tensor): ``[N]`` the history's item ids.
        item_targets (Tensor): ``[B, Wi]`` the candidates' item signatures.
        category_table (Tensor): ``[C, Wc]`` int64.
        category_ids (Tensor): ``[N]``.
        category_targets (Tensor): ``[B, Wc]``.
        starts (Tensor): ``[B]`` first position of each segment.
        ends (Tensor): ``[B]`` one past its last.
        k (int): at most this many per segment.

    Returns:
        ``(indices [M], lengths [B])``: per segment its ``min(L_b, k)`` positions nearest in
        Hamming distance (of the concatenated signatures), nearest first, ties to the later
        position; ``M = sum(lengths)`` (read on the host: one sync).
    """
    tables = _hamming(item_table, item_ids, item_targets, category_table, category_ids,
                      category_targets, k)
    device = _device(*tables, starts, ends)
    starts, ends = _segments(starts, ends, tables[1].numel(), tables[2].size(0))
    lengths = (ends - starts).clamp(min=0, max=k)
    (total,) = _sizes(lengths.sum())
    indices = torch.empty(total, dtype=torch.long, device=device)
    _launch_hamming(*tables, starts, ends, _exclusive(lengths), indices, k)
    return indices, lengths


def hamming_topk_shared(item_table: torch.Tensor, item_ids: torch.Tensor,
                        item_targets: torch.Tensor, category_table: torch.Tensor,
                        category_ids: torch.Tensor, category_targets: torch.Tensor,
                        k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``hamming_topk_by_id`` with every candidate's segment the whole ``[N]`` history
    (``longseq::hamming_topk_shared``, serving): ``(indices [B min(N, k)], lengths [B])``, no
    host sync (each candidate takes ``min(N, k)``)."""
    tables = _hamming(item_table, item_ids, item_targets, category_table, category_ids,
                      category_targets, k)
    device = _device(*tables)
    n, batch = tables[1].numel(), tables[2].size(0)
    if n >= 2**31:
        raise RuntimeError("the history must be shorter than 2^31 positions")
    want = max(0, min(n, k))
    lengths = torch.full((batch,), want, dtype=torch.long, device=device)
    indices = torch.empty(batch * want, dtype=torch.long, device=device)
    starts = torch.zeros(batch, dtype=torch.long, device=device)
    _launch_hamming(*tables, starts, starts + n, lengths.cumsum(0) - want, indices, k)
    return indices, lengths


def _hard(categories: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor,
          ends: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    device = _device(categories, targets, starts, ends)
    batch = targets.numel()
    width = min(k, categories.numel())  # a segment finds at most min(k, L_b) <= width
    padded = torch.empty(batch, width, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    if batch:
        with _on(device):
            _hard_topk_kernel[(batch,)](categories, targets, starts, ends, padded, lengths, k,
                                        width, BLOCK=_HARD_BLOCK)
    keep = torch.arange(width, device=device) < lengths.unsqueeze(1)
    return padded[keep], lengths  # the boolean mask: one sync


def hard_topk(categories: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor,
              ends: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """SIM's hard search per segment (``longseq::hard_topk``).

    Args:
        categories (Tensor): ``[N]`` the history's ids of the matched attribute.
        targets (Tensor): ``[B]`` the candidates' ids.
        starts (Tensor): ``[B]``; ends (Tensor): ``[B]`` the segments.
        k (int): at most this many per segment.

    Returns:
        ``(indices [M], lengths [B])``: per segment the ``k`` most recent positions whose id is
        the target's, chronological (the kernel scans back to the ``k``-th match only).
    """
    categories = _ids(categories, "categories")
    targets = _ids(targets, "target categories")
    _check_k(k)
    starts, ends = _segments(starts, ends, categories.numel(), targets.numel())
    return _hard(categories, targets, starts, ends, k)


def hard_topk_shared(categories: torch.Tensor, targets: torch.Tensor,
                     k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``hard_topk`` with every candidate's segment the whole ``[N]`` history
    (``longseq::hard_topk_shared``, serving)."""
    categories = _ids(categories, "categories")
    targets = _ids(targets, "target categories")
    _check_k(k)
    device = _device(categories, targets)
    starts = torch.zeros(targets.numel(), dtype=torch.long, device=device)
    return _hard(categories, targets, starts, starts + categories.numel(), k)


def float_topk(scores: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
               k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of float32 scores per segment (``longseq::float_topk``).

    Args:
        scores (Tensor): ``[N]`` float32, not NaN.
        starts (Tensor): ``[B]``; ends (Tensor): ``[B]`` the segments.
        k (int): at most this many per segment.

    Returns:
        ``(indices [M], lengths [B])``: per segment its ``min(L_b, k)`` largest, largest first,
        ties (``-0.0 == 0.0``) to the later position; ``M`` read on the host (one sync).
    """
    if scores.dtype != torch.float32:
        raise RuntimeError(f"float_topk: float32 scores, got {scores.dtype}")
    scores = scores.contiguous()
    _check_k(k)
    device = _device(scores, starts, ends)
    starts, ends = _segments(starts, ends, scores.numel(), starts.numel())
    lengths = (ends - starts).clamp(min=0, max=k)
    (total,) = _sizes(lengths.sum())
    indices = torch.empty(total, dtype=torch.long, device=device)
    comp = torch.empty(total, dtype=torch.long, device=device)
    if total:
        with _on(device):
            _float_topk_kernel[(starts.numel(),)](scores, starts, ends, _exclusive(lengths),
                                                  indices, comp, k, BLOCK=_TOPK_BLOCK,
                                                  RANKS=_RANKS)
    return indices, lengths


def twin_topk_by_id(item_rows: torch.Tensor, items: torch.Tensor, category_rows: torch.Tensor,
                    categories: torch.Tensor, queries: torch.Tensor, bias: torch.Tensor,
                    starts: torch.Tensor, ends: torch.Tensor, k: int, scale: float,
                    shared: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """TWIN's search (``longseq::twin_topk_by_id``).

    Args:
        item_rows (Tensor): ``[I, 2 w]`` float rows (the second half, the keys, is read).
        items (Tensor): ``[N]`` the history's item ids.
        category_rows (Tensor): ``[C, 2 w]``.
        categories (Tensor): ``[N]``.
        queries (Tensor): ``[B, w]`` the candidates' queries.
        bias (Tensor): ``[N]`` per behavior.
        starts (Tensor): ``[B]``; ends (Tensor): ``[B]`` the segments.
        k (int): at most this many per segment.
        scale (float): the dot products' factor.
        shared (bool): every segment is the same history (the C++ kernel groups its keys; here
            each candidate scores it, with identical results).

    Returns:
        ``(indices [M], lengths [B])``: per segment the top ``min(L_b, k)`` of ``(float) (scale
        * q_b . (item_rows[i, w:] + category_rows[c, w:])) + bias``, as ``float_topk``.
    """
    item_rows = item_rows.to(torch.float32).contiguous()
    category_rows = category_rows.to(torch.float32).contiguous()
    queries = queries.to(torch.float32).contiguous()
    bias = bias.to(torch.float32).contiguous()
    items, categories = _ids(items, "item ids"), _ids(categories, "category ids")
    if items.numel() != categories.numel() or bias.numel() != items.numel():
        raise RuntimeError(f"one item id, category id and bias per behavior: got {items.numel()}, "
                           f"{categories.numel()} and {bias.numel()}")
    _check_k(k)
    device = _device(item_rows, items, category_rows, categories, queries, bias, starts, ends)
    starts, ends = _segments(starts, ends, items.numel(), queries.size(0))
    w = queries.size(1)
    if item_rows.size(1) != 2 * w or category_rows.size(1) != 2 * w:
        raise RuntimeError("rows must be [*, 2 w] for queries [B, w]")
    _check_rows(items, item_rows.size(0), "item ids")
    _check_rows(categories, category_rows.size(0), "category ids")
    seg_len = (ends - starts).clamp(min=0)
    lengths = seg_len.clamp(max=k)
    total, scored = _sizes(lengths.sum(), seg_len.sum())
    indices = torch.empty(total, dtype=torch.long, device=device)
    if total:
        comp = torch.empty(total, dtype=torch.long, device=device)
        scores = torch.empty(scored, dtype=torch.float32, device=device)
        width = _pow2(w)
        with _on(device):
            _twin_topk_kernel[(starts.numel(),)](
                item_rows, items, category_rows, categories, queries, bias,
                torch.tensor([scale], dtype=torch.float64, device=device), starts, ends,
                _exclusive(lengths), indices, comp, _exclusive(seg_len), scores, k, w,
                BLOCK=max(16, min(128, 4096 // width)), WIDTH=width, RANKS=_RANKS)
    return indices, lengths


def sdim_collisions(item_codes: torch.Tensor, items: torch.Tensor, category_codes: torch.Tensor,
                    categories: torch.Tensor, target_items: torch.Tensor,
                    target_categories: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    tau: int, groups_per_word: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDIM's collisions read by id (``longseq::sdim_collisions``).

    Args:
        item_codes (Tensor): ``[I, 1]`` int64 code words; category_codes (Tensor): ``[C, 1]``.
        items (Tensor): ``[N]``; categories (Tensor): ``[N]`` the history's ids (below 2^31).
        target_items (Tensor): ``[B]``; target_categories (Tensor): ``[B]``.
        starts (Tensor): ``[B]``; ends (Tensor): ``[B]`` the segments.
        tau (int): bits per group; groups_per_word (int): groups per word
            (``groups_per_word * tau <= 64``).

    Returns:
        ``(positions [U], lengths [B], weights [U, 2 groups_per_word])``: per segment the
        distinct (item, category) pairs that collide with the target in at least one group, in
        order of first occurrence (their first position), and per group the pair's number of
        occurrences where it collides there, else 0 (float32). Two host syncs.
    """
    item_codes = item_codes.to(torch.long).contiguous()
    category_codes = category_codes.to(torch.long).contiguous()
    items, categories = _ids(items, "item ids"), _ids(categories, "category ids")
    target_items = _ids(target_items, "target items")
    target_categories = _ids(target_categories, "target categories")
    if items.numel() != categories.numel() or target_items.numel() != target_categories.numel():
        raise RuntimeError("one item and one category id each")
    device = _device(item_codes, items, category_codes, categories, target_items,
                     target_categories, starts, ends)
    starts, ends = _segments(starts, ends, items.numel(), target_items.numel())
    if item_codes.dim() != 2 or item_codes.size(1) != 1 or category_codes.dim() != 2 or \
            category_codes.size(1) != 1:
        raise RuntimeError("one code word per id")
    if not 1 <= groups_per_word <= 32:
        raise RuntimeError("at most 64 signatures")
    if tau < 1 or groups_per_word * tau > 64:
        raise RuntimeError(f"groups_per_word * tau must be in [1, 64], got {groups_per_word} * "
                           f"{tau}")
    for ids, rows, what in ((items, item_codes.size(0), "item ids"),
                            (categories, category_codes.size(0), "category ids"),
                            (target_items, item_codes.size(0), "target items"),
                            (target_categories, category_codes.size(0), "target categories")):
        _check_rows(ids, rows, what)
    for ids, what in ((items, "item ids"), (categories, "category ids")):
        if ids.numel():
            _check((ids < 2**31).all(), f"{what} must be below 2^31")
    groups = 2 * groups_per_word
    batch = starts.numel()
    seg_len = (ends - starts).clamp(min=0)
    scanned, table_size = _sizes(seg_len.sum(), (2 * seg_len + 1).sum())
    seg_off = _exclusive(seg_len)
    positions = torch.empty(scanned, dtype=torch.long, device=device)
    weights = torch.empty(scanned, groups, dtype=torch.float32, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    if batch:
        slot_key = torch.full((table_size,), -1, dtype=torch.long, device=device)
        slot_first = torch.full((table_size,), 2**62, dtype=torch.long, device=device)
        slot_count = torch.zeros(table_size, dtype=torch.int32, device=device)
        pos_slot = torch.empty(scanned, dtype=torch.long, device=device)
        group_mask = -1 if tau >= 64 else (1 << tau) - 1
        with _on(device):
            _sdim_kernel[(batch,)](
                item_codes, items, category_codes, categories, target_items, target_categories,
                starts, ends, seg_off, _exclusive(2 * seg_len + 1), slot_key, slot_first,
                slot_count, pos_slot, positions, weights, lengths, tau, groups_per_word,
                group_mask, BLOCK=_SDIM_BLOCK)
    # each segment's pairs lie at the start of its region of the scanned positions
    segment = torch.repeat_interleave(torch.arange(batch, device=device), seg_len,
                                      output_size=scanned)
    keep = torch.arange(scanned, device=device) - seg_off[segment] < lengths[segment]
    return positions[keep], lengths, weights[keep]  # the boolean mask: the second sync


def _attention_inputs(qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                      index: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                 int]:
    """The attention's shapes, offsets and index checked: ``(qa, keys in qa's dtype, offsets,
    index, positions)``."""
    if qa.dim() != 3 or keys.dim() != 2 or qa.size(2) != keys.size(1):
        raise RuntimeError("attention: qa [B, H, K] and keys [N, K]")
    if qa.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"attention: float32 or float64, got {qa.dtype}")
    if offsets.numel() != qa.size(0) + 1:
        raise RuntimeError("attention: offsets must be [B + 1]")
    qa = qa.contiguous()
    keys = keys.to(qa.dtype).contiguous()
    offsets = _ids(offsets, "offsets")
    if index is not None:
        index = _ids(index, "index")
    positions = keys.size(0) if index is None else index.numel()
    if qa.size(0):
        _check(((offsets[:-1] >= 0) & (offsets[:-1] <= offsets[1:])
                & (offsets[1:] <= positions)).all(),
               f"attention: offsets must be non-decreasing within the {positions} positions")
    if index is not None and index.numel():
        _check(((index >= 0) & (index < keys.size(0))).all(),
               f"attention: index outside the {keys.size(0)} keys")
    return qa, keys, offsets, index, positions


def _attention_block(heads: int, key_dim: int) -> Tuple[int, int, int]:
    """``(BLOCK, HP, KP)``: positions per step, heads and key columns padded to powers of 2."""
    hp, kp = _pow2(heads), _pow2(key_dim)
    return max(2, min(64, _ATTENTION_ELEMENTS // (hp * kp))), hp, kp


def attention_forward(qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                      bias: Optional[torch.Tensor],
                      index: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The jagged target attention with absorbed projections (``longseq::attention_forward``).

    Args:
        qa (Tensor): ``[B, H, K]`` float32 or float64 queries in key space.
        keys (Tensor): ``[N, K]`` (cast to ``qa``'s dtype).
        offsets (Tensor): ``[B + 1]`` the segments of the positions (non-overlapping).
        bias (Optional[Tensor]): ``[N, H]`` logit biases (an empty one is none).
        index (Optional[Tensor]): ``[M]`` the key row each position reads (else position n
            reads row n).

    Returns:
        ``(agg [B, H, K], weights [M or N, H])``: ``agg[b, h] = sum_n w[n, h] keys[r]`` with
        ``w`` the softmax over the segment of ``qa[b, h] . keys[r] + bias[r, h]`` (zeros for an
        empty segment), and the weights (0 at positions outside every segment).
    """
    qa, keys, offsets, index, positions = _attention_inputs(qa, keys, offsets, index)
    batch, heads, key_dim = qa.shape
    has_bias = bias is not None and bias.numel() > 0
    if has_bias:
        if bias.dim() != 2 or bias.size(0) != keys.size(0) or bias.size(1) != heads:
            raise RuntimeError(f"attention: bias must be [{keys.size(0)} keys, {heads} heads], "
                               f"got {list(bias.shape)}")
        bias = bias.to(qa.dtype).contiguous()
    device = _device(qa, keys, offsets, bias if has_bias else None, index)
    agg = torch.empty_like(qa)
    weights = torch.zeros(positions, heads, dtype=qa.dtype, device=device)
    if batch:
        block, hp, kp = _attention_block(heads, key_dim)
        with _on(device):
            _attention_forward_kernel[(batch,)](
                qa, keys, offsets, bias if has_bias else qa,
                index if index is not None else offsets, agg, weights, heads, key_dim,
                HAS_BIAS=has_bias, HAS_INDEX=index is not None, BLOCK=block, HP=hp, KP=kp)
    return agg, weights


def attention_backward(grad: torch.Tensor, qa: torch.Tensor, keys: torch.Tensor,
                       offsets: torch.Tensor, weights: torch.Tensor, index: Optional[torch.Tensor]
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``attention_forward``'s ``agg`` (``longseq::attention_backward``).

    Args:
        grad (Tensor): ``[B, H, K]`` the gradient of ``agg``.
        qa (Tensor), keys (Tensor), offsets (Tensor), index (Optional[Tensor]): as the forward.
        weights (Tensor): ``[M or N, H]`` the forward's weights.

    Returns:
        ``(dqa [B, H, K], dkeys [M or N, K], dlogits [M or N, H])``, per position (with an index
        the caller adds them up per key row); 0 at positions outside every segment. ``dkeys``
        in ``keys``' dtype.
    """
    key_dtype = keys.dtype
    qa, keys, offsets, index, positions = _attention_inputs(qa, keys, offsets, index)
    batch, heads, key_dim = qa.shape
    grad = grad.to(qa.dtype).contiguous()
    weights = weights.to(qa.dtype).contiguous()
    if grad.shape != qa.shape or weights.shape != (positions, heads):
        raise RuntimeError(f"attention_backward: grad {list(grad.shape)} and weights "
                           f"{list(weights.shape)} for qa {list(qa.shape)} and {positions} "
                           f"positions")
    device = _device(grad, qa, keys, offsets, weights, index)
    dqa = torch.zeros_like(qa)
    dkeys = torch.zeros(positions, key_dim, dtype=qa.dtype, device=device)
    dlogits = torch.zeros(positions, heads, dtype=qa.dtype, device=device)
    if batch:
        block, hp, kp = _attention_block(heads, key_dim)
        with _on(device):
            _attention_backward_kernel[(batch,)](
                grad, qa, keys, offsets, weights, index if index is not None else offsets, dqa,
                dkeys, dlogits, heads, key_dim, HAS_INDEX=index is not None, BLOCK=block,
                HP=hp, KP=kp)
    return dqa, dkeys.to(key_dtype), dlogits


class _Attention(torch.autograd.Function):
    """``attention_forward``'s ``agg`` with ``attention_backward`` as its gradient, for CUDA
    tensors where the C++ library (and with it the registered operator and its autograd
    formula) is unavailable."""

    @staticmethod
    def forward(ctx, qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                bias: Optional[torch.Tensor], index: Optional[torch.Tensor]) -> torch.Tensor:
        agg, weights = attention_forward(qa, keys, offsets, bias, index)
        ctx.save_for_backward(qa, keys, offsets, weights, index)
        ctx.has_bias = bias is not None
        return agg

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qa, keys, offsets, weights, index = ctx.saved_tensors
        dqa, dkeys, dlogits = attention_backward(grad, qa, keys, offsets, weights, index)
        if index is not None:  # per position: added up per key row
            dkeys = keys.new_zeros(keys.shape).index_add_(0, index, dkeys)
            dlogits = dlogits.new_zeros(keys.size(0), dlogits.size(1)).index_add_(0, index,
                                                                                 dlogits)
        return dqa, dkeys, None, dlogits if ctx.has_bias else None, None


def attention(qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
              bias: Optional[torch.Tensor], index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``attention_forward``'s ``[B, H, K]`` aggregate, differentiable in ``qa``, ``keys`` and
    ``bias`` (the same formula as the operator's registered autograd)."""
    return _Attention.apply(qa, keys, offsets, bias, index)


# ------------------------------------------------------------------------------ registration

OPERATORS: Dict[str, object] = {
    "hamming_topk_by_id": hamming_topk_by_id,
    "hamming_topk_shared": hamming_topk_shared,
    "hard_topk": hard_topk,
    "hard_topk_shared": hard_topk_shared,
    "float_topk": float_topk,
    "twin_topk_by_id": twin_topk_by_id,
    "sdim_collisions": sdim_collisions,
    "attention_forward": attention_forward,
    "attention_backward": attention_backward,
}

_LIBRARY: Optional[torch.library.Library] = None


def register() -> None:
    """Registers the functions above as the CUDA kernels of their ``longseq`` operators (once
    per process; the operators must be defined: the C++ library loaded, ``retrieval.kernels``
    does it when it loads them and CUDA is available)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("longseq", "IMPL")
    for name, fn in OPERATORS.items():
        library.impl(name, fn, "CUDA")
    _LIBRARY = library
