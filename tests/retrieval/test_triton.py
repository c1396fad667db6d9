"""The Triton kernels (``retrieval.triton_kernels``) against their references: every search
against its torch-ops path (and, where the C++ operators are built, against the operator itself:
the same positions in the same order), the attention's forward and backward against the torch
ops and their autograd, bad inputs, the registration as the operators' CUDA kernels and the
dispatch of ``retrieval.kernels``.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``tests/conftest.py``
sets ``TRITON_INTERPRET=1`` before triton is imported when CUDA is unavailable); with one, on
CUDA tensors, compiled. The interpreter runs every program in numpy, one at a time, so the
shapes are small and the examples few."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq import jagged
from torchrec_longseq.modules import sdim, twin
from torchrec_longseq.retrieval import extension, hard, kernels, simhash, topk

tk = pytest.importorskip("torchrec_longseq.retrieval.triton_kernels",
                         reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tk.interpreted():
    pytest.skip("no GPU and Triton's interpreter is off (TRITON_INTERPRET=1 must be set before "
                "triton_kernels is imported: tests/conftest.py does it)", allow_module_level=True)

# the C++ operators, the exact reference: built wherever a C++ compiler is found (a failing
# build then fails the comparisons with them, as tests/helpers.py's needs_compiler has it)
BUILT = extension.compiler() is not None
if BUILT:
    kernels.build()
EXAMPLES = 12  # hypothesis examples per test: the interpreter is slow
JAGGED = st.lists(st.one_of(st.integers(0, 12), st.integers(12, 300)), min_size=0, max_size=4)


def offsets_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())


def on(*tensors):
    """The tensors on the kernels' device (``None`` kept)."""
    return [None if t is None else t.to(DEVICE) for t in tensors]


def assert_same(got, expected) -> None:
    """Exactly the same tensors (dtype, shape, values), compared on CPU."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        a, b = a.cpu(), b.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
        assert torch.equal(a, b), (a, b)


def hamming_inputs(lengths, words: int, num_items: int, ties: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-(2**63), 2**63 - 1, (num_items, words), generator=g)
    if ties:  # few distinct bit patterns -> many equal distances
        table = table & torch.randint(0, 2**6, (num_items, words), generator=g)
    categories = torch.randint(-(2**63), 2**63 - 1, (7, 1), generator=g) & 0xF0F0F
    n, b = sum(lengths), len(lengths)
    items = torch.randint(0, num_items, (n,), generator=g)
    category_ids = torch.randint(0, 7, (n,), generator=g)
    targets = table[torch.randint(0, num_items, (b,), generator=g)]
    category_targets = categories[torch.randint(0, 7, (b,), generator=g)]
    return table, items, targets, categories, category_ids, category_targets


@settings(max_examples=EXAMPLES, deadline=None)
@given(lengths=JAGGED, words=st.sampled_from([1, 2]), num_items=st.sampled_from([1, 5, 300]),
       k=st.one_of(st.integers(0, 12), st.integers(12, 400)), ties=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_hamming_topk_by_id(lengths, words: int, num_items: int, k: int, ties: bool,
                            seed: int) -> None:
    """Nearest first, ties to the later position, k below and above the lengths, empty
    segments, one- and two-word item signatures (distances up to 192)."""
    table, items, targets, categories, category_ids, category_targets = hamming_inputs(
        lengths, words, num_items, ties, seed)
    offsets = offsets_of(lengths)
    expected = simhash.simhash_topk(torch.cat([table[items], categories[category_ids]], 1),
                                    offsets, torch.cat([targets, category_targets], 1), k)
    args = (table, items, targets, categories, category_ids, category_targets, offsets[:-1],
            offsets[1:])
    found = tk.hamming_topk_by_id(*on(*args), k)
    assert_same(found, expected)
    if BUILT:
        assert_same(found, torch.ops.longseq.hamming_topk_by_id(*args, k))


@settings(max_examples=EXAMPLES, deadline=None)
@given(length=st.one_of(st.integers(0, 12), st.integers(12, 300)), candidates=st.integers(0, 4),
       words=st.sampled_from([1, 2]), k=st.one_of(st.integers(0, 12), st.integers(12, 400)),
       seed=st.integers(0, 2**31 - 1))
def test_hamming_topk_shared(length: int, candidates: int, words: int, k: int,
                             seed: int) -> None:
    """One history for every candidate: the per-segment result on a copy per candidate."""
    table, items, targets, categories, category_ids, category_targets = hamming_inputs(
        [length] + [0] * max(candidates - 1, 0), words, 5, True, seed)
    targets, category_targets = targets[:candidates], category_targets[:candidates]
    history = torch.cat([table[items], categories[category_ids]], 1)
    expected = jagged.positions_in_copy(simhash.simhash_topk(
        history.repeat(candidates, 1), jagged.copies_offsets(length, candidates, items.device),
        torch.cat([targets, category_targets], 1), k), length)
    args = (table, items, targets, categories, category_ids, category_targets)
    found = tk.hamming_topk_shared(*on(*args), k)
    assert_same(found, expected)
    if BUILT:
        assert_same(found, torch.ops.longseq.hamming_topk_shared(*args, k))


def test_hamming_uses_every_bit() -> None:
    """The sign bit and the high words count: distances 0, 1 (bit 63), 1 (bit 0 of word 2), 2,
    and the nearest first, the later of equal ones first."""
    table = torch.tensor([[0, 0], [-(2**63), 0], [0, 1], [1, 2**62]])
    none = torch.zeros(1, 1, dtype=torch.long)
    found = tk.hamming_topk_by_id(*on(table, torch.tensor([3, 1, 2, 0]), table[:1], none,
                                      torch.zeros(4, dtype=torch.long), none,
                                      torch.tensor([0]), torch.tensor([4])), 4)
    assert found[0].tolist() == [3, 2, 1, 0] and found[1].tolist() == [4]


@settings(max_examples=EXAMPLES, deadline=None)
@given(lengths=JAGGED, num_categories=st.integers(1, 5),
       k=st.one_of(st.integers(0, 8), st.integers(8, 400)), seed=st.integers(0, 2**31 - 1))
def test_hard_topk(lengths, num_categories: int, k: int, seed: int) -> None:
    """The k most recent matches, chronological; targets that match nothing; and the shared
    history (the whole of the values for every candidate)."""
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    categories = torch.randint(0, num_categories, (int(offsets[-1]),), generator=g)
    targets = torch.randint(0, num_categories + 1, (len(lengths),), generator=g)
    found = tk.hard_topk(*on(categories, targets, offsets[:-1], offsets[1:]), k)
    assert_same(found, hard.hard_search(categories, offsets, targets, k, kernel="torch"))
    shared = tk.hard_topk_shared(*on(categories, targets), k)
    assert_same(shared, hard.hard_search(categories, None, targets, k, kernel="torch"))
    if BUILT:
        assert_same(found, torch.ops.longseq.hard_topk(categories, targets, offsets[:-1],
                                                       offsets[1:], k))
        assert_same(shared, torch.ops.longseq.hard_topk_shared(categories, targets, k))


@settings(max_examples=EXAMPLES, deadline=None)
@given(lengths=JAGGED, levels=st.sampled_from([1, 3, 1000, 10**7]),
       k=st.one_of(st.integers(0, 12), st.integers(12, 400)), zeros=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_float_topk(lengths, levels: int, k: int, zeros: bool, seed: int) -> None:
    """Largest first, ties to the later position: few distinct values (every radix digit
    tied), many, negative and positive, and -0.0 equal to 0.0."""
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    n = int(offsets[-1])
    scores = (torch.randint(0, levels, (n,), generator=g).float() - levels / 2) * 0.37
    if zeros:
        signs = torch.randint(0, 2, (n,), generator=g).bool()
        scores[::3] = torch.where(signs[::3], -0.0, 0.0)
    found = tk.float_topk(*on(scores, offsets[:-1], offsets[1:]), k)
    assert_same(found, topk.jagged_topk(scores, offsets, k, kernel="torch"))
    if BUILT:
        assert_same(found, torch.ops.longseq.float_topk(scores, offsets[:-1], offsets[1:], k))


def test_float_topk_extremes() -> None:
    """Infinities, the largest and smallest floats and denormals keep their order."""
    values = [float("-inf"), -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 3.4e38,
              float("inf")]
    order = torch.randperm(22, generator=torch.Generator().manual_seed(0))
    scores = torch.tensor(values * 2)[order]
    offsets = torch.tensor([0, 22])
    for k in (1, 5, 21, 22):
        found = tk.float_topk(*on(scores, offsets[:-1], offsets[1:]), k)
        assert_same(found, topk.jagged_topk(scores, offsets, k, kernel="torch"))


def twin_inputs(lengths, heads: int, bucketed: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    n, b, width = sum(lengths), len(lengths), 4 * heads
    # small integers: the scores are exact in float32 in any summation order, and tie often
    item_rows = torch.randint(-2, 3, (7, 2 * width), generator=g).float()
    category_rows = torch.randint(-2, 3, (3, 2 * width), generator=g).float()
    items = torch.randint(0, 7, (n,), generator=g)
    categories = torch.randint(0, 3, (n,), generator=g)
    target_items = torch.randint(0, 7, (b,), generator=g)
    target_categories = torch.randint(0, 3, (b,), generator=g)
    bias = torch.randint(-2, 3, (n, heads), generator=g).float()
    if bucketed:  # a time bucket's bias: 4 values in 4 runs
        levels = torch.randint(-2, 3, (4, heads), generator=g).float()
        bias = levels[torch.arange(n) * 4 // max(n, 1)]
    return item_rows, category_rows, items, categories, target_items, target_categories, bias


@settings(max_examples=EXAMPLES, deadline=None)
@given(lengths=JAGGED, heads=st.sampled_from([1, 2]), k=st.integers(0, 60),
       shared=st.booleans(), bucketed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_twin_topk_by_id(lengths, heads: int, k: int, shared: bool, bucketed: bool,
                         seed: int) -> None:
    """TWIN's search, per segment and over one shared history, against ``twin_topk``'s torch
    ops (the ESU's logits averaged over heads, then the float top-k) and the C++ operator."""
    item_rows, category_rows, items, categories, target_items, target_categories, bias = \
        twin_inputs(lengths, heads, bucketed, seed)
    offsets = None if shared else offsets_of(lengths)
    width = item_rows.size(1) // 2
    queries = item_rows[target_items, :width] + category_rows[target_categories, :width]
    expected = twin.twin_topk([item_rows, category_rows], [items, categories], queries, offsets,
                              bias, heads, k, kernel="torch", head_dim=width // heads)
    starts, ends = kernels.segments(offsets, items.numel(), len(lengths))
    args = (item_rows, items, category_rows, categories, queries, bias.mean(dim=1), starts, ends)
    scale = 1.0 / (heads * 4**0.5)
    found = tk.twin_topk_by_id(*on(*args), k, scale, shared)
    assert_same(found, expected)
    if BUILT:
        assert_same(found, torch.ops.longseq.twin_topk_by_id(*args, k, scale, shared))


@settings(max_examples=EXAMPLES, deadline=None)
@given(lengths=JAGGED, tau=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_sdim_collisions(lengths, tau: int, seed: int) -> None:
    """The colliding distinct (item, category) pairs with their per-group counts: as sets per
    sample against the torch ops (which list them by id), and exactly (order of first
    occurrence) against the C++ operator."""
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    n, b = int(offsets[-1]), len(lengths)
    groups = 6 // tau
    item_codes = torch.randint(0, 2**6, (9, 1), generator=g)  # few bits: collisions are common
    category_codes = torch.randint(0, 2**6, (4, 1), generator=g)
    items = torch.randint(0, 9, (n,), generator=g)
    categories = torch.randint(0, 4, (n,), generator=g)
    target_items = torch.randint(0, 9, (b,), generator=g)
    target_categories = torch.randint(0, 4, (b,), generator=g)
    args = (item_codes, items, category_codes, categories, target_items, target_categories,
            offsets[:-1], offsets[1:])
    found = [t.cpu() for t in tk.sdim_collisions(*on(*args), tau, groups)]
    expected = sdim.collisions_by_id([item_codes, category_codes], [items, categories],
                                     [target_items, target_categories], [items, categories],
                                     offsets, tau, groups, kernel="torch")
    assert torch.equal(found[1], expected[1])

    def rows(positions, weights):
        return sorted(zip(positions.tolist(), map(tuple, weights.tolist())))
    assert rows(found[0], found[2]) == rows(expected[0], expected[2])
    # within a sample, the pairs in order of first occurrence
    found_offsets = offsets_of(found[1].tolist()).tolist()
    assert all(torch.equal(found[0][s:e], found[0][s:e].sort().values)
               for s, e in zip(found_offsets[:-1], found_offsets[1:]))
    if BUILT:
        assert_same(found, torch.ops.longseq.sdim_collisions(*args, tau, groups))


def test_sdim_wide_groups() -> None:
    """32 one-bit groups per word (the sign bit among them) and 64-bit groups."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-(2**63), 2**63 - 1, (6, 1), generator=g)
    codes[3] = codes[0] ^ (1 << 31)  # differs from item 0 in group 31 only
    items = torch.tensor([0, 3, 1, 0, 5, 3, 3])
    categories = torch.tensor([1, 1, 2, 1, 0, 1, 1])
    offsets = torch.tensor([0, 7])
    for tau, groups in ((1, 32), (2, 32), (64, 1)):
        args = (codes, items, codes, categories, torch.tensor([0]), torch.tensor([1]),
                offsets[:-1], offsets[1:])
        found = [t.cpu() for t in tk.sdim_collisions(*on(*args), tau, groups)]
        expected = sdim.collisions_by_id([codes, codes], [items, categories],
                                         [torch.tensor([0]), torch.tensor([1])],
                                         [items, categories], offsets, tau, groups,
                                         kernel="torch")
        assert sorted(zip(found[0].tolist(), map(tuple, found[2].tolist()))) == \
            sorted(zip(expected[0].tolist(), map(tuple, expected[2].tolist()))), tau
        if BUILT:
            assert_same(found, torch.ops.longseq.sdim_collisions(*args, tau, groups))


# ---- the attention

def attention_reference(qa, keys, offsets, bias, index):
    """The torch ops: ``[B, H, K]`` softmax-weighted sums of ``keys[index]`` per segment."""
    m = int(offsets[-1]) if index is None else index.numel()
    rows = keys if index is None else keys[index]
    seg = jagged.segment_ids(offsets, m)
    logits = (qa[seg] * rows[:m].unsqueeze(1)).sum(-1)  # [M, H]
    if bias is not None:
        logits = logits + (bias if index is None else bias[index])[:m]
    weights = jagged.segment_softmax(logits, seg, qa.size(0))
    return jagged.segment_sum(weights.unsqueeze(-1) * rows[:m].unsqueeze(1), seg, qa.size(0))


def attention_inputs(lengths, heads: int, key_dim: int, with_bias: bool, rows, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    m = int(offsets[-1])
    n = m if rows is None else rows
    qa = torch.randn(len(lengths), heads, key_dim, generator=g, dtype=dtype)
    keys = 2 * torch.randn(n, key_dim, generator=g, dtype=dtype)
    bias = torch.randn(n, heads, generator=g, dtype=dtype) if with_bias else None
    index = None if rows is None else torch.randint(0, rows, (m,), generator=g)
    return qa, keys, offsets, bias, index


ATTENTION = dict(lengths=st.lists(st.integers(0, 20), min_size=0, max_size=4),
                 heads=st.integers(1, 5), key_dim=st.integers(1, 24), with_bias=st.booleans(),
                 rows=st.one_of(st.none(), st.integers(1, 9)),
                 dtype=st.sampled_from([torch.float32, torch.float64]),
                 seed=st.integers(0, 2**31 - 1))


def tolerance(dtype: torch.dtype):
    """Against the torch ops in float64 (the reference's own float32 rounding aside)."""
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)


@settings(max_examples=EXAMPLES, deadline=None)
@given(**ATTENTION)
def test_attention_forward_and_backward(lengths, heads: int, key_dim: int, with_bias: bool,
                                        rows, dtype: torch.dtype, seed: int) -> None:
    """The operator pair against the torch ops: ``agg``, the softmax weights per position, and
    the backward's per-position gradients against autograd through the torch ops (of the
    gathered rows, where an index reads them); heads and key widths that are not powers of 2,
    empty segments."""
    qa, keys, offsets, bias, index = attention_inputs(lengths, heads, key_dim, with_bias, rows,
                                                      dtype, seed)
    agg, weights = tk.attention_forward(*on(qa, keys, offsets, bias, index))
    gathered = keys if index is None else keys[index]  # per position: a leaf of its own
    gathered_bias = None if bias is None else (bias if index is None else bias[index])
    leaves = [t.double().requires_grad_() for t in (qa, gathered)]
    if bias is not None:
        leaves.append(gathered_bias.double().requires_grad_())
    reference = attention_reference(leaves[0], leaves[1], offsets,
                                    leaves[2] if bias is not None else None, None)
    assert agg.dtype == dtype and weights.dtype == dtype
    torch.testing.assert_close(agg.cpu().double(), reference.detach(), **tolerance(dtype))
    m = int(offsets[-1])
    seg = jagged.segment_ids(offsets, m)
    logits = (leaves[0][seg] * leaves[1][:m].unsqueeze(1)).sum(-1)
    if bias is not None:
        logits = logits + leaves[2][:m]
    torch.testing.assert_close(weights.cpu().double()[:m],
                               jagged.segment_softmax(logits, seg, len(lengths)).detach(),
                               **tolerance(dtype))
    upstream = torch.randn(qa.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    expected = torch.autograd.grad((reference * upstream.double()).sum(), leaves,
                                   allow_unused=True)
    grads = tk.attention_backward(*on(upstream, qa, keys, offsets, weights.cpu(), index))
    # dqa, dkeys per position, dlogits per position (the bias's gradient)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        want = torch.zeros(got.shape, dtype=torch.float64) if want is None else want
        torch.testing.assert_close(got.cpu().double()[:want.size(0)], want, **tolerance(dtype))
    if BUILT:
        exact = torch.ops.longseq.attention_forward(qa, keys, offsets, bias, index)
        torch.testing.assert_close(agg.cpu(), exact[0], **tolerance(dtype))


@settings(max_examples=EXAMPLES, deadline=None)
@given(**ATTENTION)
def test_attention_autograd(lengths, heads: int, key_dim: int, with_bias: bool, rows,
                            dtype: torch.dtype, seed: int) -> None:
    """``triton_kernels.attention`` (the path without the C++ library): output and the
    gradients of ``qa``, ``keys`` and ``bias``, summed per key row where an index reads rows
    several times, against autograd through the torch ops."""
    inputs = attention_inputs(lengths, heads, key_dim, with_bias, rows, dtype, seed)
    qa, keys, offsets, bias, index = inputs
    upstream = torch.randn(qa.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    results = []
    for device, fn, as_dtype in ((DEVICE, tk.attention, dtype),
                                 ("cpu", attention_reference, torch.float64)):
        leaves = [t.to(device, as_dtype).requires_grad_() for t in (qa, keys, bias)
                  if t is not None]
        out = fn(leaves[0], leaves[1], offsets.to(device),
                 leaves[2] if bias is not None else None,
                 None if index is None else index.to(device))
        grads = torch.autograd.grad((out * upstream.to(device, as_dtype)).sum(), leaves,
                                    allow_unused=True)
        results.append([out.detach().cpu()] + [torch.zeros_like(leaf).cpu() if grad is None
                                                else grad.cpu()
                                                for leaf, grad in zip(leaves, grads)])
    for got, expected in zip(*results):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, **tolerance(dtype))


# ---- bad inputs (raised at once on CPU; on CUDA the checks are device-side assertions, which
# end the CUDA context, so these run under the interpreter only)

CPU_ONLY = pytest.mark.skipif(DEVICE != "cpu", reason="device-side assertions end the CUDA context")
SIGNATURES = torch.arange(10).view(10, 1) * 0x0101010101
CATEGORY_SIGNATURES = torch.arange(5).view(5, 1) * 0x0F0F


@CPU_ONLY
@pytest.mark.parametrize("call, message", [
    (lambda: tk.hamming_topk_by_id(SIGNATURES, torch.tensor([1, 10]), SIGNATURES[:1],
                                   CATEGORY_SIGNATURES, torch.tensor([0, 1]),
                                   CATEGORY_SIGNATURES[:1], torch.tensor([0]), torch.tensor([2]),
                                   1), "item ids outside the table of 10 rows"),
    (lambda: tk.hamming_topk_shared(SIGNATURES, torch.tensor([1, 2]), SIGNATURES[:1],
                                    CATEGORY_SIGNATURES, torch.tensor([0, -1]),
                                    CATEGORY_SIGNATURES[:1], 1),
     "category ids outside the table of 5 rows"),
    (lambda: tk.hamming_topk_by_id(SIGNATURES, torch.tensor([1, 2]), SIGNATURES[:1],
                                   CATEGORY_SIGNATURES, torch.tensor([0]),
                                   CATEGORY_SIGNATURES[:1], torch.tensor([0]), torch.tensor([2]),
                                   1), "2 item ids but 1 category ids"),
    (lambda: tk.hard_topk(torch.tensor([1, 2]), torch.tensor([1, 2]), torch.tensor([0, 1]),
                          torch.tensor([2, 3]), 1), r"not inside the 2 values"),
    (lambda: tk.hard_topk(torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([0, 1]),
                          torch.tensor([1, 2]), 1), "2 segments for 1 targets"),
    (lambda: tk.hard_topk_shared(torch.tensor([1.5]), torch.tensor([1]), 1),
     "categories must be integer ids, got torch.float32"),
    (lambda: tk.float_topk(torch.randn(4), torch.tensor([0]), torch.tensor([4]), -1),
     "k must be >= 0"),
    (lambda: tk.float_topk(torch.randn(4, dtype=torch.float64), torch.tensor([0]),
                           torch.tensor([4]), 1), "float32 scores"),
    (lambda: tk.twin_topk_by_id(torch.zeros(7, 8), torch.tensor([1, 7, 2]), torch.zeros(3, 8),
                                torch.tensor([0, 1, 2]), torch.zeros(1, 4), torch.zeros(3),
                                torch.tensor([0]), torch.tensor([3]), 1, 1.0, False),
     "item ids outside the table of 7 rows"),
    (lambda: tk.twin_topk_by_id(torch.zeros(7, 8), torch.tensor([1, 2, 3]), torch.zeros(3, 8),
                                torch.tensor([0, 1, 2]), torch.zeros(1, 4), torch.zeros(2),
                                torch.tensor([0]), torch.tensor([3]), 2, 1.0, False),
     "one item id, category id and bias per behavior: got 3, 3 and 2"),
    (lambda: tk.sdim_collisions(torch.zeros(6, 1, dtype=torch.long), torch.tensor([0, 1]),
                                torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 2]),
                                torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                                torch.tensor([2]), 3, 8), "category ids outside the table of 2"),
    (lambda: tk.sdim_collisions(torch.zeros(6, 1, dtype=torch.long), torch.tensor([0, 1]),
                                torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 1]),
                                torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                                torch.tensor([2]), 3, 22), r"groups_per_word \* tau"),
    (lambda: tk.attention_forward(torch.randn(1, 2, 8), torch.randn(40, 8), torch.tensor([0, 40]),
                                  torch.randn(1, 2), None),
     r"bias must be \[40 keys, 2 heads\], got \[1, 2\]"),
    (lambda: tk.attention_forward(torch.randn(2, 2, 3), torch.randn(4, 3),
                                  torch.tensor([0, 3, 2]), None, None),
     "offsets must be non-decreasing"),
    (lambda: tk.attention_forward(torch.randn(1, 2, 3), torch.randn(4, 3), torch.tensor([0, 2]),
                                  None, torch.tensor([1, 4])), "index outside the 4 keys"),
])
def test_bad_inputs_raise(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


# ---- registration and dispatch

OPERATORS = ["hamming_topk_by_id", "hamming_topk_shared", "hard_topk", "hard_topk_shared",
             "float_topk", "twin_topk_by_id", "sdim_collisions", "attention_forward",
             "attention_backward"]


@pytest.mark.skipif(not BUILT, reason="no C++ compiler: the longseq operators are not built")
def test_registered_as_the_cuda_kernels() -> None:
    """``register()`` gives every searched operator a CUDA kernel (without a GPU too: the
    registration needs only the operators' schemas), the others keep none; each operator's CUDA
    kernel, called through the dispatcher (its arguments boxed by the schema: ints, the float
    and the bool, ``None`` for an optional tensor), returns the C++ operator's results."""
    tk.register()
    for name in OPERATORS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"longseq::{name}", "CUDA"), name
    for name in ("pack_signs", "distinct_positions", "gather_rows"):
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"longseq::{name}", "CUDA")
    hamming = hamming_inputs([5, 0, 9], 2, 4, True, 0)
    offsets = offsets_of([5, 0, 9])
    twin_args = twin_inputs([5, 0, 9], 1, False, 0)
    qa, keys, _, bias, index = attention_inputs([2, 0, 3], 2, 3, True, 4, torch.float32, 0)
    forward = torch.ops.longseq.attention_forward(qa, keys, offsets_of([2, 0, 3]), bias, index)
    calls = {
        "hamming_topk_by_id": (*hamming, offsets[:-1], offsets[1:], 3),
        "hamming_topk_shared": (*hamming, 3),
        "hard_topk": (torch.arange(14) % 3, torch.tensor([0, 1, 2]), offsets[:-1], offsets[1:],
                      2),
        "hard_topk_shared": (torch.arange(14) % 3, torch.tensor([0, 1, 2]), 2),
        "float_topk": (torch.arange(14.0) % 4, offsets[:-1], offsets[1:], 3),
        "twin_topk_by_id": (twin_args[0], twin_args[2], twin_args[1], twin_args[3],
                            twin_args[0][twin_args[4], :4], twin_args[6][:, 0], offsets[:-1],
                            offsets[1:], 3, 0.5, False),
        "sdim_collisions": (torch.arange(9).view(9, 1), torch.arange(14) % 9,
                            torch.arange(4).view(4, 1), torch.arange(14) % 4,
                            torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), offsets[:-1],
                            offsets[1:], 1, 2),
        "attention_forward": (qa, keys, offsets_of([2, 0, 3]), None, index),
        "attention_backward": (torch.ones(qa.shape), qa, keys, offsets_of([2, 0, 3]),
                               forward[1], index),
    }
    assert sorted(calls) == sorted(OPERATORS)
    for name, args in calls.items():
        kernel = torch.library.get_kernel(f"longseq::{name}", "CUDA")
        got = kernel.call_boxed(torch._C.DispatchKeySet("CUDA"),
                                *[a.to(DEVICE) if isinstance(a, torch.Tensor) else a
                                  for a in args])
        expected = getattr(torch.ops.longseq, name)(*args)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.cpu(), b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA tensors")
def test_kernels_dispatch_cuda_tensors_to_triton() -> None:
    """``kernel="auto"`` and ``"compiled"`` run the Triton kernels on CUDA tensors (through
    the operator when it is built), ``"torch"`` the torch ops; the searches' and the
    attention's results agree, through ``eta.signature_topk`` too."""
    from torchrec_longseq.modules import eta

    table, items, targets, categories, category_ids, category_targets = [
        t.cuda() for t in hamming_inputs([30, 0, 200], 1, 40, True, 0)]
    offsets = offsets_of([30, 0, 200]).cuda()
    for kernel in ("auto", "compiled"):
        found = kernels.hamming_topk_by_id(table, items, targets, categories, category_ids,
                                           category_targets, offsets, 7, kernel)
        assert found is not None and found[0].is_cuda
        assert_same(found, simhash.simhash_topk(
            torch.cat([table[items], categories[category_ids]], 1), offsets,
            torch.cat([targets, category_targets], 1), 7))
        assert kernels.float_topk(torch.randn(230, device="cuda"), offsets, 3, kernel) is not None
    assert kernels.hamming_topk_by_id(table, items, targets, categories, category_ids,
                                      category_targets, offsets, 7, "torch") is None
    ids = torch.arange(40, device="cuda")
    via_module = eta.signature_topk([table, categories], [items, category_ids],
                                    [ids[:3], ids[:3] % 7], offsets, 7)
    torch_ops = eta.signature_topk([table, categories], [items, category_ids],
                                   [ids[:3], ids[:3] % 7], offsets, 7, "torch")
    assert_same(via_module, torch_ops)
    qa, keys, attention_offsets, bias, _ = on(*attention_inputs([3, 0, 5], 2, 6, True, None,
                                                                torch.float32, 0))
    qa.requires_grad_()
    out = kernels.target_attention(qa, keys, attention_offsets, bias)
    assert out is not None
    (dqa,) = torch.autograd.grad(out.sum(), qa)
    ref_qa = qa.detach().cpu().requires_grad_()
    reference = attention_reference(ref_qa, keys.cpu(), attention_offsets.cpu(), bias.cpu(), None)
    (expected,) = torch.autograd.grad(reference.sum(), ref_qa)
    torch.testing.assert_close(out.detach().cpu(), reference.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dqa.cpu(), expected, atol=1e-5, rtol=1e-4)
    if BUILT:  # through the operator: its CUDA kernel is the Triton function
        for name in OPERATORS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"longseq::{name}", "CUDA")


def test_package_works_without_triton() -> None:
    """With triton unimportable the package imports, the CPU kernels and the torch ops run,
    and the kernels module reports why CUDA tensors would take the torch ops."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from torchrec_longseq.retrieval import hard, kernels\n"
        "c, o, t = torch.tensor([1, 0, 1]), torch.tensor([0, 3]), torch.tensor([1])\n"
        "assert hard.hard_search(c, o, t, 1)[0].tolist() == [2]\n"
        "assert hard.hard_search(c, o, t, 1, kernel='torch')[0].tolist() == [2]\n"
        "assert kernels._triton() is None and 'triton' in kernels._TRITON_ERROR\n"
        "assert 'torchrec_longseq.retrieval.triton_kernels' not in sys.modules or "
        "sys.modules['torchrec_longseq.retrieval.triton_kernels'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# every kernel compiled for a GPU (sm_90, the H100 / H200 the project is lent) by Triton's own
# compiler and ptxas, in a process without the interpreter: what the interpreter cannot check
# (types, layouts, unsupported operations) is checked without a GPU. Each kernel with the
# argument types the wrappers pass and the constants of a typical call.
COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchrec_longseq.retrieval import triton_kernels as tk

assert not tk.interpreted()
P64, P32, PF, PD = "*i64", "*i32", "*fp32", "*fp64"
cases = [
    (tk._hamming_topk_kernel, dict(A=P64, a_ids=P64, a_targets=P64, WA="i32", C=P64, c_ids=P64,
     c_targets=P64, WC="i32", starts=P64, ends=P64, out_off=P64, out=P64, k="i32"),
     dict(BLOCK=128, BINS=256)),
    (tk._hard_topk_kernel, dict(cats=P64, targets=P64, starts=P64, ends=P64, out=P64,
     lengths=P64, k="i32", width="i32"), dict(BLOCK=256)),
    (tk._float_topk_kernel, dict(scores=PF, starts=P64, ends=P64, out_off=P64, out=P64,
     comp=P64, k="i32"), dict(BLOCK=256, RANKS=64)),
    (tk._twin_topk_kernel, dict(I=PF, items=P64, C=PF, cats=P64, Q=PF, bias=PF, scale_ptr=PD,
     starts=P64, ends=P64, out_off=P64, out=P64, comp=P64, score_off=P64, scores=PF, k="i32",
     w="i32"), dict(BLOCK=128, WIDTH=32, RANKS=64)),
    (tk._sdim_kernel, dict(IC=P64, items=P64, CC=P64, cats=P64, target_items=P64,
     target_cats=P64, starts=P64, ends=P64, seg_off=P64, table_off=P64, slot_key=P64,
     slot_first=P64, slot_count=P32, pos_slot=P64, positions=P64, weights=PF, lengths=P64,
     tau="i32", gpw="i32", group_mask="i32"), dict(BLOCK=128)),
]
for P in (PF, PD):
    for has_index in (True, False):
        for has_bias in (True, False):
            cases.append((tk._attention_forward_kernel, dict(qa=P, keys=P, offsets=P64, bias=P,
                          index=P64, agg=P, weights=P, H="i32", K="i32"),
                          dict(HAS_BIAS=has_bias, HAS_INDEX=has_index, BLOCK=16, HP=4, KP=128)))
        cases.append((tk._attention_backward_kernel, dict(grad=P, qa=P, keys=P, offsets=P64,
                      weights=P, index=P64, dqa=P, dkeys=P, dlogits=P, H="i32", K="i32"),
                      dict(HAS_INDEX=has_index, BLOCK=16, HP=4, KP=128)))
for fn, signature, constants in cases:
    signature = {**signature, **{name: "constexpr" for name in constants}}
    assert list(signature) == fn.arg_names, (fn.arg_names, list(signature))
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature,
                  constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()}),
        target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], fn.__name__
print(len(cases), "compiled")
"""


def test_kernels_compile_for_a_gpu() -> None:
    """Every kernel (and each attention variant: float32 / float64, bias, index) compiles to a
    cubin for sm_90, without a GPU."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert "17 compiled" in result.stdout
