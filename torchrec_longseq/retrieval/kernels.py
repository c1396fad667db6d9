"""Small compiled CPU kernels for the O(L) scans: ETA's Hamming top-k straight from the signature
tables, SIM's hard search, float top-k per segment (SIM soft search), TWIN's search and SDIM's
collisions; and for the ESU's per-behavior work, the jagged target attention with its key and
value projections absorbed (``target_attention``, forward and backward); and for serving, the
distinct history positions a request reads (``distinct_positions``) and the rows of several
tables side by side (``gather_rows``). Each has a torch-ops twin that the tests compare it with.
On CUDA tensors the searches and the attention run Triton kernels (``retrieval.triton_kernels``,
registered as the operators' CUDA kernels); the others take their torch ops there.

ETA's kernel:

``simhash_topk`` in torch ops makes ~15 passes over the N history values (gather the
signatures, expand the targets, xor, popcount, histogram, threshold, select). On CPU each pass
costs 5-30 ns per value, so at L = 10,000 the search dominates a training step. This kernel reads
each behavior's packed signatures from the per-item and per-category tables by id and popcounts
the xor with the candidate's signature (hardware popcount) into one byte per behavior; the
threshold distance (the k-th smallest) is guessed from every 8th distance and confirmed with
counting passes over the bytes, 16 at a time; the k closest are collected scanning from the most
recent behavior backwards (ties go to the more recent one), skipping 16 bytes at a time where
none is close enough. Samples run in parallel (``at::parallel_for``, OpenMP, on torch's thread
count). For one history shared by many candidates (serving) ``hamming_topk_shared`` computes the
distances once per distinct (item, category) behavior and collects positions per behavior.

TWIN's kernel scores 8 behaviors at a time from transposed key blocks (each dot product summed
in the same order on every path, so serving's shared search selects exactly what per-sample
search selects); the float top-k (TWIN, SIM soft) is one pass with a sampled threshold.

The C++ is in ``torchrec_longseq/csrc/`` (``common.h``, the shared checks and helpers; one
``.cpp`` per family: ``hamming``, ``hard``, ``topk``, ``twin``, ``sdim``, ``attention``,
``simhash``, ``serving``), registered with the PyTorch dispatcher as the operators
``torch.ops.longseq.<op>`` (the schemas in ``csrc/registration.cpp``, a CPU kernel per family).
This module registers their fake (meta) kernels, so that they trace under ``torch.fx``,
``torch.compile(fullgraph=True)`` and ``torch.export`` (outputs whose size depends on the data
get a new dynamic size), and the attention's autograd formula (the backward is the
``attention_backward`` operator).

Built on first use, or by ``build()`` (``retrieval.extension``): g++ and ninja (both in the lock
file / Debian), about a minute, into the torch extensions cache (``TORCH_EXTENSIONS_DIR``) under a
name keyed by a hash of the sources, the flags and torch's and Python's versions, so later
processes load it in a second or two. Without a C++ compiler, or if the build fails, one warning
(with the build error) and the wrappers below return ``None`` for the rest of the process (no
retry): every caller then takes its torch-ops path, which gives identical results (CUDA tensors
then call the Triton functions directly). The torch-ops ``simhash_topk`` stays the reference the
tests compare it with, and the path for CUDA tensors without triton.

Which implementation runs is an argument, ``kernel`` (``KERNELS``), of every wrapper here and an
attribute of every module that calls one (``set_kernel(model, kernel)`` sets them all):

* ``"auto"`` (the default): the compiled operator for CPU tensors when it is built; for CUDA
  tensors the Triton kernel where the operator has one (the searches and the attention:
  ``hamming_topk_by_id`` / ``_shared``, ``hard_topk`` / ``_shared``, ``float_topk``,
  ``twin_topk_by_id``, ``sdim_collisions``, ``attention_forward`` / ``_backward``) and triton
  can be imported; the torch ops otherwise (no compiler, no triton, ``pack_signs``,
  ``distinct_positions`` and ``gather_rows`` on CUDA);
* ``"compiled"``: the compiled operator (CPU) or Triton kernel (CUDA) wherever one covers the
  input (an error for other devices, or where the operators could not be built or triton not
  imported); inputs no operator covers take the torch ops (float64 or integer scores of the
  top-k, SDIM with other than two hashed attributes of as many signatures);
* ``"torch"``: the torch ops, on any device (the reference the tests compare with).

A wrapper returns ``None`` where the compiled operator does not run, and its caller takes its
torch-ops path; a few inputs always take it (float64 scores of the float top-k).

On CUDA the wrappers call ``torch.ops.longseq.<op>`` when the C++ library is loaded (its CUDA
kernel is the Triton function, registered by ``_ops``), so ``torch.compile`` and
``torch.export`` see the same operators; where the library did not build they call the Triton
functions directly (the attention through ``triton_kernels.attention``, an autograd function).
triton is imported on the first CUDA tensor only (``_triton``): the package imports and runs
without it.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from torchrec_longseq.retrieval import extension

KERNELS = ("auto", "compiled", "torch")


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def set_kernel(module: nn.Module, kernel: str) -> nn.Module:
    """Run every search, attention and derivation in ``module`` (a model, or any part of one)
    with ``kernel`` (``KERNELS``): sets the ``kernel`` attribute of each submodule that has one.
    Returns ``module``."""
    check_kernel(kernel)
    for m in module.modules():
        if hasattr(m, "kernel"):
            m.kernel = kernel
    return module


def build(verbose: bool = False) -> bool:
    """Builds (or loads from the cache) and registers the ``longseq`` operators now rather than at
    the first search: True when they are registered; False after one warning (no C++ compiler,
    or the build failed), and then the wrappers return ``None`` for the rest of the process."""
    return _ops() is not None if extension.build(verbose) else False


@torch.compiler.assume_constant_result
def _available() -> bool:
    """Whether the operators are registered, building them at the first call (a constant to
    ``torch.compile``: the build is not traced)."""
    return _ops() is not None


_REGISTERED = False
_TRITON = None  # retrieval.triton_kernels once imported
_TRITON_ERROR: Optional[str] = None  # why it could not be


def _triton():
    """``retrieval.triton_kernels``, imported at the first call (so triton only where a CUDA
    tensor meets a kernel), or None where triton cannot be imported (the error is kept)."""
    global _TRITON, _TRITON_ERROR
    if _TRITON is None and _TRITON_ERROR is None:
        try:
            from torchrec_longseq.retrieval import triton_kernels
            _TRITON = triton_kernels
        except ImportError as e:
            _TRITON_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    """Whether the Triton kernels can run (triton imports): a constant to ``torch.compile``."""
    return _triton() is not None


def _ops():
    """``torch.ops.longseq`` with the Python registrations done (the fakes, the attention's
    autograd and, with CUDA and triton, the Triton kernels as the CUDA kernels), or None where
    the build failed."""
    global _REGISTERED
    if not extension.available():
        return None
    if not _REGISTERED:
        _register_fakes_and_autograd()
        if torch.cuda.is_available() and _triton() is not None:
            _triton().register()
        _REGISTERED = True
    return torch.ops.longseq


def _op(name: str, t: torch.Tensor):
    """What runs operator ``name`` on ``t``'s device (where ``_applies``): the registered
    operator (its CPU kernel; on CUDA the Triton kernel registered as its CUDA kernel), or on
    CUDA without the C++ library the Triton function itself (same signature)."""
    if t.device.type == "cpu" or _available():
        return getattr(torch.ops.longseq, name)
    return getattr(_triton(), name)


def _module():
    """``torch.ops.longseq`` (building the operators first); raises where they are unavailable."""
    ops = _ops()
    if ops is None:
        raise RuntimeError(f"the longseq operators are unavailable: {extension.error()}")
    return ops


def hamming_topk_by_id(
    item_table: torch.Tensor, item_ids: torch.Tensor, item_targets: torch.Tensor,
    category_table: torch.Tensor, category_ids: torch.Tensor, category_targets: torch.Tensor,
    offsets: Optional[torch.Tensor], k: int, kernel: str = "auto",
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The compiled Hamming top-k (Triton on CUDA), or ``None`` where it does not apply
    (``kernel``, CUDA without triton).

    The signature of behavior ``j`` is the concatenation ``[item_table[item_ids[j]],
    category_table[category_ids[j]]]``, the candidate's ``[item_targets[b],
    category_targets[b]]``; neither is materialised.

    Args:
        item_table (Tensor): ``[I, Wi]`` int64 packed signatures per item.
        item_ids (Tensor): ``[N]`` history item ids.
        item_targets (Tensor): ``[B, Wi]`` candidate item signatures.
        category_table (Tensor): ``[C, Wc]`` int64 packed signatures per category.
        category_ids (Tensor): ``[N]`` history category ids.
        category_targets (Tensor): ``[B, Wc]`` candidate category signatures.
        offsets (Optional[Tensor]): ``[B + 1]`` history offsets, or ``None``: one history shared
            by all B candidates (serving).
        k (int): at most this many per sample.

    Returns:
        ``(indices [M], lengths [B])`` exactly as ``simhash_topk`` on the concatenated
        signatures (smallest distance first, ties to the later position).
    """
    if not _applies(item_table, kernel, triton=True):
        return None
    if offsets is None:  # one history: each distinct (item, category) behavior hashed once
        indices, lengths = _op("hamming_topk_shared", item_table)(
            item_table, item_ids, item_targets, category_table, category_ids, category_targets,
            int(k))
        return indices, lengths
    starts, ends = segments(offsets, item_ids.numel(), item_targets.size(0))
    indices, lengths = _op("hamming_topk_by_id", item_table)(
        item_table, item_ids, item_targets, category_table, category_ids, category_targets,
        starts, ends, int(k))
    return indices, lengths


def pack_signs(projections: torch.Tensor, kernel: str = "auto") -> Optional[torch.Tensor]:
    """``retrieval.simhash.simhash_signatures``'s packing compiled (or ``None``): ``[N, m]``
    float32 projections -> ``[N, ceil(m / 64)]`` int64, bit ``i`` set where
    ``projections[:, i] > 0``."""
    if not _applies(projections, kernel) or projections.dtype != torch.float32:
        return None
    return torch.ops.longseq.pack_signs(projections)


def segments(offsets: Optional[torch.Tensor], num_values: int,
             batch: int, device: Optional[torch.device] = None
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(starts [B], ends [B])`` of the jagged segments: from ``offsets [B + 1]``, or, for
    ``offsets=None``, every one of the ``batch`` candidates reading all ``num_values`` values (one
    user's history shared by its candidates, as in serving), on ``device`` (default CPU)."""
    if offsets is None:
        return (torch.zeros(batch, dtype=torch.long, device=device),
                torch.full((batch,), num_values, dtype=torch.long, device=device))
    return offsets[:-1], offsets[1:]


def _applies(t: torch.Tensor, kernel: str, triton: bool = False) -> bool:
    """Whether ``kernel`` runs the compiled operator on ``t`` (see the module docstring);
    ``triton``: the operator has a Triton kernel, which CUDA tensors run."""
    if kernel == "torch":
        return False
    if triton and t.device.type == "cuda":
        check_kernel(kernel)
        if kernel == "compiled" and not _triton_available():
            raise RuntimeError(f"kernel='compiled' on CUDA tensors runs the Triton kernels, but "
                               f"triton cannot be imported: {_TRITON_ERROR}")
        return _triton_available()
    if kernel == "compiled":
        if t.device.type != "cpu":
            raise ValueError(f"kernel='compiled' runs on CPU tensors, got {t.device}")
        if not _available():
            raise RuntimeError(f"kernel='compiled', but the compiled operators could not be "
                               f"built: {extension.error()}")
        return True
    check_kernel(kernel)
    return t.device.type == "cpu" and _available()


def hard_topk(history_category: torch.Tensor, offsets: Optional[torch.Tensor],
              target_category: torch.Tensor, k: int,
              kernel: str = "auto") -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``retrieval.hard.hard_search`` compiled (or ``None``): each segment is scanned from its
    most recent behavior backwards and the scan stops at the ``k``-th match, so the cost is the
    distance back to the ``k``-th match, not L. ``offsets=None`` (one history, serving): one
    backward scan serves every candidate, stopping when each asked-for category has ``k``."""
    if not _applies(history_category, kernel, triton=True):
        return None
    if offsets is None:  # one history: one scan collects every asked-for category's k
        indices, lengths = _op("hard_topk_shared", history_category)(history_category,
                                                                      target_category, int(k))
        return indices, lengths
    starts, ends = segments(offsets, history_category.numel(), target_category.numel())
    indices, lengths = _op("hard_topk", history_category)(history_category, target_category,
                                                          starts, ends, int(k))
    return indices, lengths


def float_topk(scores: torch.Tensor, offsets: torch.Tensor,
               k: int, kernel: str = "auto") -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``retrieval.topk.jagged_topk(scores, offsets, k)`` (largest first, ties to the later
    position) compiled: a partial sort per segment, O(L log k). ``None`` where it does not apply;
    scores must not be NaN."""
    if not _applies(scores, kernel, triton=True) or scores.dtype != torch.float32:
        return None  # float64: the torch ops
    indices, lengths = _op("float_topk", scores)(scores.detach(), offsets[:-1], offsets[1:],
                                                 int(k))
    return indices, lengths


def twin_topk_by_id(item_rows: torch.Tensor, items: torch.Tensor, category_rows: torch.Tensor,
                    categories: torch.Tensor, queries: torch.Tensor, bias: torch.Tensor,
                    offsets: Optional[torch.Tensor], k: int,
                    scale: float,
                    kernel: str = "auto") -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """TWIN's search in one pass per sample: score ``scale * q_b . (item_rows[i, w:] +
    category_rows[c, w:]) + bias`` for every behavior, read by id (``queries [B, w]``, rows
    ``[*, 2 w]``, ``bias [N]``), then the top ``k`` as ``float_topk``. ``None`` where it does not
    apply."""
    if not _applies(item_rows, kernel, triton=True):
        return None
    starts, ends = segments(offsets, items.numel(), queries.size(0), items.device)
    # offsets None: one history, whose keys the kernel reads and transposes once
    indices, lengths = _op("twin_topk_by_id", item_rows)(
        item_rows, items, category_rows, categories, queries.detach(), bias.detach(), starts,
        ends, int(k), float(scale), offsets is None)
    return indices, lengths


def sdim_collisions(item_codes: torch.Tensor, items: torch.Tensor, category_codes: torch.Tensor,
                    categories: torch.Tensor, target_items: torch.Tensor,
                    target_categories: torch.Tensor, offsets: Optional[torch.Tensor], tau: int,
                    groups_per_word: int,
                    kernel: str = "auto"
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """SDIM's ``collision_weights`` read from the code tables (``[rows, 1]`` int64) by id, with a
    hash map per sample instead of a sort: ``(positions [U], lengths [B], weights [U, G])``, the
    distinct pairs in order of first occurrence. Ids must be below 2^31. ``None`` where it does
    not apply."""
    if not _applies(item_codes, kernel, triton=True):
        return None
    positions, lengths, weights = _op("sdim_collisions", item_codes)(
        item_codes, items, category_codes, categories, target_items, target_categories,
        *segments(offsets, items.numel(), target_items.numel(), items.device), int(tau),
        int(groups_per_word))
    return positions, lengths, weights


def distinct_positions(indices: torch.Tensor, n: int,
                       window: int,
                       kernel: str = "auto") -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(used [U], inverse [M])``: the positions of a history of ``n`` behaviors that
    ``indices [M]`` or its last ``window`` behaviors read, ascending, and each index's row among
    them (``used[inverse] == indices``; the window is ``used``'s last ``window`` rows); ``None``
    where the kernel does not apply (``serving.distinct_positions`` has the torch ops)."""
    if not _applies(indices, kernel):
        return None
    used, inverse = torch.ops.longseq.distinct_positions(indices, n, window)
    return used, inverse


def gather_rows(tables: List[torch.Tensor], ids: List[torch.Tensor],
                positions: Optional[torch.Tensor], kernel: str = "auto") -> Optional[torch.Tensor]:
    """``[U, sum of widths]``: row ``u`` is ``[tables[0][ids[0][p]], tables[1][ids[1][p]], ...]``
    with ``p = positions[u]`` (``u`` for ``positions=None``), one copy instead of a gather per
    table and per id list and a concatenation; ``None`` where it does not apply (GPU, kernels
    off, or autograd recording: the copy has no gradient). Ids out of range raise an error."""
    if not all(_applies(t, kernel) for t in tables) or (
            torch.is_grad_enabled() and any(t.requires_grad for t in tables)):
        return None
    return torch.ops.longseq.gather_rows(tables, ids, positions)


def target_attention(qa: torch.Tensor, keys: torch.Tensor, offsets: torch.Tensor,
                     bias: Optional[torch.Tensor],
                     index: Optional[torch.Tensor] = None,
                     kernel: str = "auto") -> Optional[torch.Tensor]:
    """Softmax attention per jagged segment with the key projection absorbed into the query, or
    ``None`` where it does not apply (kernels off, not float32 / float64, CUDA without
    triton).

    ``logits[n, h] = qa[b, h] . keys[r] + bias[r, h]`` for the positions ``n`` of sample ``b``,
    with ``r = index[n]`` (or ``n`` without an index), softmax per sample and head, ``-> [B, H,
    K]`` the weighted sums of the keys (zeros for an empty sample). Differentiable in ``qa``,
    ``keys`` and ``bias``.

    Args:
        qa (Tensor): ``[B, H, K]`` queries in key space (``W_k,h^T q_h``, scaled).
        keys (Tensor): ``[N, K]`` behaviors, jagged by ``offsets [B + 1]`` (non-overlapping).
        bias (Optional[Tensor]): ``[N, H]`` logit biases.
        index (Optional[Tensor]): ``[M]`` rows of ``keys`` (and ``bias``) that the positions
            read, jagged by ``offsets``: serving's distinct behaviors, each keyed once and read by
            every candidate that retrieved it (as attending over ``keys[index]``, without the
            gather).
    """
    if (not _applies(qa, kernel, triton=True) or qa.dtype not in (torch.float32, torch.float64)
            or keys.dtype != qa.dtype or (bias is not None and bias.dtype != qa.dtype)):
        return None
    if qa.device.type != "cpu" and not _available():  # no C++ library: Triton's own autograd
        return _triton().attention(qa, keys, offsets, bias, index)
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        agg, _ = torch.ops.longseq.attention_forward(qa, keys, offsets, bias, index)
        return agg
    # no gradient (serving, evaluation): straight to the CPU (or CUDA) kernel, past the Python
    # layer of the registered autograd formula
    with torch._C._AutoDispatchBelowAutograd():
        agg, _ = torch.ops.longseq.attention_forward(qa, keys, offsets, bias, index)
    return agg


# ---- what the operators need from Python: fake (meta) kernels and the attention's autograd

def _new_size() -> torch.SymInt:
    """A size that depends on the data (the number of selected positions)."""
    return torch.library.get_ctx().new_dynamic_size()


def _selection(segments: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fake ``(indices [M], lengths [segments])``, M depending on the data."""
    return (like.new_empty(_new_size(), dtype=torch.long),
            like.new_empty(segments, dtype=torch.long))


def _fake_hamming_topk_by_id(item_table, item_ids, item_targets, category_table, category_ids,
                             category_targets, starts, ends, k):
    return _selection(starts.numel(), item_ids)


def _fake_hamming_topk_shared(item_table, item_ids, item_targets, category_table, category_ids,
                              category_targets, k):
    # every candidate takes min(n, k) positions of the one history: no data-dependent size
    b = item_targets.size(0)
    want = torch.sym_max(0, torch.sym_min(item_ids.numel(), k))
    return item_ids.new_empty(b * want, dtype=torch.long), item_ids.new_empty(b, dtype=torch.long)


def _fake_hard_topk(categories, targets, starts, ends, k):
    return _selection(starts.numel(), categories)


def _fake_hard_topk_shared(categories, targets, k):
    return _selection(targets.numel(), categories)


def _fake_float_topk(scores, starts, ends, k):
    return _selection(starts.numel(), scores)


def _fake_twin_topk_by_id(item_rows, items, category_rows, categories, queries, bias, starts,
                          ends, k, scale, shared):
    return _selection(starts.numel(), items)


def _fake_sdim_collisions(item_codes, items, category_codes, categories, target_items,
                          target_categories, starts, ends, tau, groups_per_word):
    u = _new_size()
    return (items.new_empty(u, dtype=torch.long), items.new_empty(starts.numel(), dtype=torch.long),
            items.new_empty(u, 2 * groups_per_word, dtype=torch.float32))


def _fake_pack_signs(projections):
    return projections.new_empty(projections.size(0), (projections.size(1) + 63) // 64,
                                 dtype=torch.long)


def _fake_attention_forward(qa, keys, offsets, bias, index):
    positions = keys.size(0) if index is None else index.numel()
    return qa.new_empty(qa.shape), qa.new_empty(positions, qa.size(1))


def _fake_attention_backward(grad, qa, keys, offsets, weights, index):
    return (qa.new_empty(qa.shape), keys.new_empty(weights.size(0), keys.size(1)),
            weights.new_empty(weights.shape))


def _fake_distinct_positions(indices, n, window):
    return (indices.new_empty(_new_size(), dtype=torch.long),
            indices.new_empty(indices.numel(), dtype=torch.long))


def _fake_gather_rows(tables, ids, positions):
    rows = ids[0].numel() if positions is None else positions.numel()
    return tables[0].new_empty(rows, sum(t.size(1) for t in tables))


def _attention_setup_context(ctx, inputs, output) -> None:
    qa, keys, offsets, bias, index = inputs
    agg, weights = output
    ctx.mark_non_differentiable(weights)  # softmax weights: saved for the backward, no gradient
    ctx.save_for_backward(qa, keys, offsets, weights, index)
    ctx.has_bias = bias is not None


def _attention_backward(ctx, grad, _grad_weights):
    qa, keys, offsets, weights, index = ctx.saved_tensors
    dqa, dkeys, dlogits = torch.ops.longseq.attention_backward(grad, qa, keys, offsets, weights,
                                                               index)
    if index is not None:  # per position: added up per key row
        dkeys = keys.new_zeros(keys.shape).index_add_(0, index, dkeys)
        dlogits = dlogits.new_zeros(keys.size(0), dlogits.size(1)).index_add_(0, index, dlogits)
    return dqa, dkeys.to(keys.dtype), None, dlogits if ctx.has_bias else None, None


def _register_fakes_and_autograd() -> None:
    for name, fake in [
        ("hamming_topk_by_id", _fake_hamming_topk_by_id),
        ("hamming_topk_shared", _fake_hamming_topk_shared),
        ("hard_topk", _fake_hard_topk),
        ("hard_topk_shared", _fake_hard_topk_shared),
        ("float_topk", _fake_float_topk),
        ("twin_topk_by_id", _fake_twin_topk_by_id),
        ("sdim_collisions", _fake_sdim_collisions),
        ("pack_signs", _fake_pack_signs),
        ("attention_forward", _fake_attention_forward),
        ("attention_backward", _fake_attention_backward),
        ("distinct_positions", _fake_distinct_positions),
        ("gather_rows", _fake_gather_rows),
    ]:
        torch.library.register_fake(f"longseq::{name}", fake)
    torch.library.register_autograd("longseq::attention_forward", _attention_backward,
                                    setup_context=_attention_setup_context)
