"""The compiled CPU kernels equal their torch-ops twins (which the other tests check against
brute force): ETA's Hamming top-k, SIM's hard search, float top-k, TWIN's search, SDIM's
collisions, and the target attention (whose gradients are also checked numerically); and
serving's distinct positions and side-by-side row gather against brute force. The torch-ops
side of each comparison is the same call with ``kernel="torch"``."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq import jagged, set_kernel
from torchrec_longseq.modules import eta, sdim, twin
from torchrec_longseq.retrieval import hard, kernels, simhash, topk
from helpers import needs_compiler

pytestmark = needs_compiler  # every test here is of the compiled operators


# the searches of the two-attribute (item, category) layout, in the kernels' argument order

def signature_topk(item_table, items, target_items, category_table, categories,
                   target_categories, offsets, k, kernel="auto"):
    """``eta.signature_topk`` over an item and a category signature table."""
    return eta.signature_topk([item_table, category_table], [items, categories],
                              [target_items, target_categories], offsets, k, kernel)


def twin_topk(item_rows, category_rows, items, categories, target_items, target_categories,
              offsets, bias, num_heads, k, kernel="auto"):
    """``twin.twin_topk`` over an item and a category table of projected rows, the candidates'
    queries summed from their rows' query halves."""
    width = item_rows.size(1) // 2
    queries = item_rows[target_items, :width] + category_rows[target_categories, :width]
    return twin.twin_topk([item_rows, category_rows], [items, categories], queries, offsets,
                          bias, num_heads, k, kernel, head_dim=width // num_heads)


def collisions_by_id(item_codes, items, category_codes, categories, target_items,
                     target_categories, offsets, tau, groups_per_word, kernel="auto"):
    """``sdim.collisions_by_id`` over an item and a category code table."""
    return sdim.collisions_by_id([item_codes, category_codes], [items, categories],
                                 [target_items, target_categories], [items, categories],
                                 offsets, tau, groups_per_word, kernel)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.one_of(st.integers(0, 40), st.integers(40, 9000)), min_size=0,
                     max_size=6),
    words=st.sampled_from([1, 2]),
    num_items=st.integers(1, 300),
    k=st.one_of(st.integers(0, 45), st.integers(45, 5000)),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_torch_ops(lengths, words: int, num_items: int, k: int, ties: bool,
                                 seed: int) -> None:
    """Short and long segments (the kernel counts and skips distances 16 or 32 bytes at a time,
    in blocks of 255 vectors), one- and two-word blocks (distances in bytes, or 16 bits above
    255), k below and above the length, and many or few equal distances."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-(2**63), 2**63 - 1, (num_items, words), generator=g)
    if ties:  # few distinct bit patterns in the low bits -> many distance ties
        table = table & torch.randint(0, 2**6, (num_items, words), generator=g)
    offsets = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())
    items = torch.randint(0, num_items, (int(offsets[-1]),), generator=g)
    target_ids = torch.randint(0, num_items, (len(lengths),), generator=g)
    targets = table[target_ids]
    # second table: per-"category" signatures, a different id per behavior
    categories = table.flip(0)[: max(num_items // 2, 1)]
    cat_ids = items % categories.size(0)
    cat_target_ids = torch.randint(0, categories.size(0), (len(lengths),), generator=g)
    cat_targets = categories[cat_target_ids]
    expected = simhash.simhash_topk(torch.cat([table[items], categories[cat_ids]], 1), offsets,
                                    torch.cat([targets, cat_targets], 1), k)
    found = kernels.hamming_topk_by_id(table, items, targets, categories, cat_ids, cat_targets,
                                       offsets, k)
    assert found is not None
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    # ETA's own torch-ops path (GPU tensors, kernel="torch")
    fallback = signature_topk(table, items, target_ids, categories, cat_ids, cat_target_ids,
                              offsets, k, kernel="torch")
    assert torch.equal(fallback[0], expected[0]) and torch.equal(fallback[1], expected[1])


@settings(max_examples=40, deadline=None)
@given(
    length=st.one_of(st.integers(0, 40), st.integers(40, 3000)),
    candidates=st.integers(0, 5),
    words=st.sampled_from([1, 2]),
    num_items=st.sampled_from([1, 3, 30, 5000]),
    k=st.one_of(st.integers(0, 45), st.integers(45, 2000)),
    seed=st.integers(0, 2**31 - 1),
)
def test_shared_history_kernel_equals_torch_ops(length: int, candidates: int, words: int,
                                                num_items: int, k: int, seed: int) -> None:
    """``offsets=None`` (one history for every candidate): grouped by distinct (item, category)
    behavior when they repeat (few items), scanned by position when they do not (many); both
    equal the torch ops on one copy of the history per candidate."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-(2**63), 2**63 - 1, (num_items, words), generator=g)
    table = table & torch.randint(0, 2**6, (num_items, words), generator=g)  # many ties
    categories = torch.randint(-(2**63), 2**63 - 1, (7, words), generator=g) & 0xF0F
    items = torch.randint(0, num_items, (length,), generator=g)
    cat_ids = torch.randint(0, 7, (length,), generator=g)
    target_ids = torch.randint(0, num_items, (candidates,), generator=g)
    cat_target_ids = torch.randint(0, 7, (candidates,), generator=g)
    targets, cat_targets = table[target_ids], categories[cat_target_ids]
    history = torch.cat([table[items], categories[cat_ids]], 1)
    expected = jagged.positions_in_copy(simhash.simhash_topk(
        history.repeat(candidates, 1), jagged.copies_offsets(length, candidates, items.device),
        torch.cat([targets, cat_targets], 1), k), length)
    found = kernels.hamming_topk_by_id(table, items, targets, categories, cat_ids, cat_targets,
                                       None, k)
    assert found is not None
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    # ETA's own torch-ops path for one shared history
    fallback = signature_topk(table, items, target_ids, categories, cat_ids, cat_target_ids,
                              None, k, kernel="torch")
    assert torch.equal(fallback[0], expected[0]) and torch.equal(fallback[1], expected[1])


def test_kernel_uses_the_sign_bit() -> None:
    table = torch.tensor([[0], [-(2**63)], [1]])  # item 1 differs from item 0 in bit 63 only
    offsets = torch.tensor([0, 3])
    none = torch.zeros(1, 1, dtype=torch.long)  # a category table that adds distance 0
    indices, lengths = kernels.hamming_topk_by_id(table, torch.tensor([1, 2, 0]), table[:1], none,
                                                  torch.zeros(3, dtype=torch.long), none, offsets, 3)
    assert indices.tolist() == [2, 1, 0] and lengths.tolist() == [3]  # d = 1, 1, 0 -> 0, then 1s latest first


def test_torch_kernel_returns_none() -> None:
    """``kernel="torch"``: every wrapper declines, and its caller takes the torch ops; with
    "auto" and "compiled" the same calls run the compiled operators."""
    table = torch.zeros(2, 1, dtype=torch.long)
    ids, offsets = torch.tensor([0]), torch.tensor([0, 1])
    rows = torch.zeros(2, 8)
    calls = [
        lambda kernel: kernels.hamming_topk_by_id(table, ids, table[:1], table, ids, table[:1],
                                                  offsets, 1, kernel),
        lambda kernel: kernels.hamming_topk_by_id(table, ids, table[:1], table, ids, table[:1],
                                                  None, 1, kernel),
        lambda kernel: kernels.pack_signs(torch.randn(2, 3), kernel),
        lambda kernel: kernels.hard_topk(ids, offsets, ids, 1, kernel),
        lambda kernel: kernels.hard_topk(ids, None, ids, 1, kernel),
        lambda kernel: kernels.float_topk(torch.randn(1), offsets, 1, kernel),
        lambda kernel: kernels.twin_topk_by_id(rows, ids, rows, ids, torch.zeros(1, 4),
                                               torch.zeros(1), offsets, 1, 0.5, kernel),
        lambda kernel: kernels.sdim_collisions(table, ids, table, ids, ids, ids, offsets, 3, 8,
                                               kernel),
        lambda kernel: kernels.distinct_positions(ids, 1, 1, kernel),
        lambda kernel: kernels.gather_rows([rows], [ids], None, kernel),
        lambda kernel: kernels.target_attention(torch.randn(1, 2, 3), torch.randn(1, 3), offsets,
                                                None, None, kernel),
    ]
    for i, call in enumerate(calls):
        assert call("torch") is None, i
    if kernels.build():
        for i, call in enumerate(calls):
            assert call("auto") is not None, i
            assert call("compiled") is not None, i


def test_kernel_choice_is_per_call() -> None:
    """No setting outlives a call: the torch ops in one call, the compiled kernel in the next."""
    categories, offsets, targets = torch.tensor([1, 0, 1]), torch.tensor([0, 3]), torch.tensor([1])
    assert kernels.hard_topk(categories, offsets, targets, 1, "torch") is None
    found = kernels.hard_topk(categories, offsets, targets, 1)
    assert found is not None
    assert torch.equal(hard.hard_search(categories, offsets, targets, 1, kernel="torch")[0],
                       found[0])


JAGGED = st.lists(st.integers(0, 40), min_size=0, max_size=6)


def offsets_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())


@settings(max_examples=60, deadline=None)
@given(lengths=JAGGED, num_categories=st.integers(1, 6), k=st.integers(0, 45),
       seed=st.integers(0, 2**31 - 1))
def test_hard_kernel_equals_torch_ops(lengths, num_categories: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    categories = torch.randint(0, num_categories, (int(offsets[-1]),), generator=g)
    targets = torch.randint(0, num_categories + 1, (len(lengths),), generator=g)  # may match none
    found = kernels.hard_topk(categories, offsets, targets, k)
    expected = hard.hard_search(categories, offsets, targets, k, kernel="torch")
    assert found is not None
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


@settings(max_examples=60, deadline=None)
@given(length=st.one_of(st.integers(0, 40), st.integers(40, 3000)), candidates=st.integers(0, 8),
       num_categories=st.sampled_from([1, 3, 40]), k=st.one_of(st.integers(0, 10),
                                                                 st.integers(10, 500)),
       seed=st.integers(0, 2**31 - 1))
def test_shared_hard_kernel_equals_torch_ops(length: int, candidates: int, num_categories: int,
                                             k: int, seed: int) -> None:
    """``offsets=None`` (one history for every candidate; one backward scan that stops once
    every asked-for category has k): equal to the torch ops on a copy per candidate, with
    repeated candidate categories, categories absent from the history, k = 0 and k > L."""
    g = torch.Generator().manual_seed(seed)
    categories = torch.randint(0, num_categories, (length,), generator=g)
    targets = torch.randint(0, num_categories + 1, (candidates,), generator=g)  # may match none
    found = kernels.hard_topk(categories, None, targets, k)
    expected = hard.hard_search(categories, None, targets, k, kernel="torch")
    assert found is not None
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 3000), num_bits=st.sampled_from([1, 7, 63, 64, 128, 192]),
       seed=st.integers(0, 2**31 - 1))
def test_pack_signs_equals_torch_ops(n: int, num_bits: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # a third of the projections exactly 0 (bit 0), the rest of either sign
    embeddings = torch.randint(-1, 2, (n, 3), generator=g).float()
    projection = torch.randint(-1, 2, (3, num_bits), generator=g).float()
    packed = kernels.pack_signs(embeddings @ projection)
    expected = simhash.simhash_signatures(embeddings, projection, kernel="torch")
    assert packed is not None and packed.dtype == torch.int64
    assert torch.equal(packed, expected)


LONG_JAGGED = st.lists(st.one_of(st.integers(0, 40), st.integers(40, 5000)), min_size=0,
                      max_size=5)


@settings(max_examples=80, deadline=None)
@given(lengths=LONG_JAGGED, levels=st.sampled_from([1, 2, 5, 1000, 10**6]),
       k=st.one_of(st.integers(0, 45), st.integers(45, 3000)), strided=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_float_topk_kernel_equals_torch_ops(lengths, levels: int, k: int, strided: bool,
                                            seed: int) -> None:
    """Segments long enough for the kernel's sampled threshold (L >= 64 k), and its buffer cut
    back to k several times; few distinct values (many ties, which go to the later position) or
    many."""
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    scores = torch.randint(0, levels, (int(offsets[-1]),), generator=g).float() - 1.5
    if strided:  # the values the kernel samples (every 16th) are the largest: its guess is too
        scores[::16] += levels  # high for k > ~L / 400 and it must fall back to the full pass
    found = kernels.float_topk(scores, offsets, k)
    expected = topk.jagged_topk(scores, offsets, k, kernel="torch")
    assert found is not None
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


@settings(max_examples=40, deadline=None)
@given(lengths=LONG_JAGGED, heads=st.sampled_from([1, 2]), k=st.integers(0, 150),
       shared=st.booleans(), bucketed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_twin_kernel_equals_torch_ops(lengths, heads: int, k: int, shared: bool, bucketed: bool,
                                     seed: int) -> None:
    """Per segment, and ``shared`` (one history of all the lengths for every candidate; its 21
    possible (item, category) keys repeat, so the kernel scores each once). ``bucketed``: the
    bias takes one of 4 values in 4 runs of positions, as a time bucket's does, so a shared
    history has at most 84 cells of one key and one bias, and the kernel ranks the cells first;
    otherwise a bias per position."""
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    n, b, width = int(offsets[-1]), len(lengths), 4 * heads  # head_dim 4: sqrt is exact
    if shared:
        offsets = None
    # small integers: the scores are exact in float32 in any summation order, and tie often
    item_rows = torch.randint(-2, 3, (7, 2 * width), generator=g).float()
    category_rows = torch.randint(-2, 3, (3, 2 * width), generator=g).float()
    items = torch.randint(0, 7, (n,), generator=g)
    categories = torch.randint(0, 3, (n,), generator=g)
    target_items = torch.randint(0, 7, (b,), generator=g)
    target_categories = torch.randint(0, 3, (b,), generator=g)
    bias = torch.randint(-2, 3, (n, heads), generator=g).float()
    if bucketed:
        levels = torch.randint(-2, 3, (4, heads), generator=g).float()
        bias = levels[torch.arange(n) * 4 // max(n, 1)]
    args = (item_rows, category_rows, items, categories, target_items, target_categories,
            offsets, bias, heads, k)
    ran = []  # whether twin_topk's kernel call applied (else both sides are the torch ops)
    real = kernels.twin_topk_by_id
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "twin_topk_by_id", lambda *a: ran.append(real(*a)) or ran[-1])
        found = twin_topk(*args)
    assert len(ran) == 1 and ran[0] is not None
    ran.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "twin_topk_by_id", lambda *a: ran.append(real(*a)) or ran[-1])
        expected = twin_topk(*args, kernel="torch")
    assert ran and all(r is None for r in ran)  # the torch ops
    assert torch.equal(found[1], expected[1])
    assert torch.equal(found[0], expected[0])


def test_twin_shared_kernel_with_a_nan_score_equals_per_segment() -> None:
    """A NaN score (a NaN bias here) leaves the shared search's cell threshold unusable: it then
    ranks the positions themselves, and selects what the per-segment search selects on copies
    of the history (no read past its selection)."""
    g = torch.Generator().manual_seed(0)
    n, b, width = 300, 3, 8
    item_rows = torch.randint(-2, 3, (7, 2 * width), generator=g).float()
    category_rows = torch.randint(-2, 3, (3, 2 * width), generator=g).float()
    items, categories = torch.randint(0, 7, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    queries = torch.randint(-2, 3, (b, width), generator=g).float()
    bias = torch.randint(-2, 3, (n,), generator=g).float()
    bias[[5, 77]] = float("nan")
    shared = kernels.twin_topk_by_id(item_rows, items, category_rows, categories, queries, bias,
                                     None, 20, 0.25)
    copies = kernels.twin_topk_by_id(item_rows, items.repeat(b), category_rows,
                                     categories.repeat(b), queries, bias.repeat(b),
                                     jagged.copies_offsets(n, b, items.device), 20, 0.25)
    assert shared[1].tolist() == [20] * b
    assert torch.equal(shared[1], copies[1])
    assert torch.equal(shared[0], jagged.positions_in_copy(copies, n)[0])


@settings(max_examples=60, deadline=None)
@given(lengths=JAGGED, tau=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_sdim_kernel_equals_torch_ops(lengths, tau: int, seed: int) -> None:
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
            offsets, tau, groups)
    found = kernels.sdim_collisions(*args)
    expected = collisions_by_id(*args, kernel="torch")
    assert found is not None
    assert torch.equal(found[1], expected[1])
    # the same (position, weights) per sample; the kernel lists pairs by first occurrence, the
    # torch ops by id: compare as sets
    def rows(positions, weights):
        return sorted(zip(positions.tolist(), map(tuple, weights.tolist())))
    assert rows(found[0], found[2]) == rows(expected[0], expected[2])


def attention_paths(module, *inputs):
    """Output and input/parameter gradients of ``module(*inputs)`` with the kernel, then with the
    torch ops (same weights, same upstream gradient)."""
    results = []
    real = kernels.target_attention
    for kernel in ("auto", "torch"):
        set_kernel(module, kernel)
        ran = []  # what the attention's kernel call returned
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "target_attention",
                       lambda *a: ran.append(real(*a)) or ran[-1])
            tensors = [t for t in (*inputs, *module.parameters())
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            for t in tensors:
                t.grad = None
            out = module(*inputs)
            upstream = torch.linspace(-1, 1, out.numel()).view_as(out)
            (out * upstream).sum().backward()
            results.append([out.detach()] + [t.grad.clone() for t in tensors])
        assert len(ran) == 1 and (ran[0] is None) == (kernel == "torch"), kernel
    set_kernel(module, "auto")
    return results


@settings(max_examples=40, deadline=None)
@given(lengths=JAGGED, heads=st.integers(1, 9), head_dim=st.integers(1, 5),
       key_dim=st.integers(1, 40), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_attention_kernel_equals_torch_ops(lengths, heads: int, head_dim: int, key_dim: int,
                                           with_bias: bool, seed: int) -> None:
    """TargetAttention's kernel path (W_k absorbed into the query, W_v applied after the sum)
    against its torch-ops path, forward and every gradient, with and without TWIN's bias."""
    from torchrec_longseq.modules.attention import TargetAttention

    torch.manual_seed(seed)
    att = TargetAttention(6, key_dim, heads, head_dim)
    offsets = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())
    n = int(offsets[-1])
    query = torch.randn(len(lengths), 6, requires_grad=True)
    keys = (3 * torch.randn(n, key_dim)).requires_grad_()
    bias = torch.randn(n, heads, requires_grad=True) if with_bias else None
    qa = torch.randn(len(lengths), heads, key_dim)
    assert kernels.target_attention(qa, keys, offsets, bias) is not None  # the kernel path runs
    kernel, ops = attention_paths(att, query, keys, offsets, bias)
    for got, expected in zip(kernel, ops):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_attention_kernel_gradcheck() -> None:
    """Numerical gradients (float64) of the kernel in ``qa``, ``keys`` and ``bias``, with an
    empty sample and a one-behavior sample."""
    torch.manual_seed(0)
    offsets = torch.tensor([0, 3, 3, 4, 9])
    qa = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, b: kernels.target_attention(q, k, offsets, b), (qa, keys, bias))
    assert torch.autograd.gradcheck(
        lambda q, k: kernels.target_attention(q, k, offsets, None), (qa, keys))


def test_attention_kernel_keys_outside_the_segments() -> None:
    """Keys before the first segment and after the last get a zero gradient (also with freed
    memory holding NaNs), and those inside the gradient of the kernel on the keys the segments
    cover; numerical gradients in float64."""
    torch.manual_seed(0)
    offsets = torch.tensor([2, 4, 4, 7])
    for dtype in (torch.float32, torch.float64):
        qa = torch.randn(3, 2, 5, dtype=dtype, requires_grad=True)
        keys = torch.randn(9, 5, dtype=dtype, requires_grad=True)
        garbage = torch.full((64, 64), float("nan"), dtype=dtype)
        del garbage  # freed memory holding NaNs: what an unzeroed gradient would show
        upstream = torch.randn(3, 2, 5, dtype=dtype)
        dqa, dkeys = torch.autograd.grad(
            (kernels.target_attention(qa, keys, offsets, None) * upstream).sum(), (qa, keys))
        covered = keys[2:7].detach().requires_grad_()
        dqa_in, dcovered = torch.autograd.grad(
            (kernels.target_attention(qa, covered, offsets - 2, None) * upstream).sum(),
            (qa, covered))
        assert torch.equal(dkeys[:2], torch.zeros(2, 5, dtype=dtype))
        assert torch.equal(dkeys[7:], torch.zeros(2, 5, dtype=dtype))
        torch.testing.assert_close(dkeys[2:7], dcovered)
        torch.testing.assert_close(dqa, dqa_in)
    assert torch.autograd.gradcheck(
        lambda q, k: kernels.target_attention(q, k, offsets, None), (qa, keys))


@settings(max_examples=40, deadline=None)
@given(lengths=JAGGED, rows=st.integers(1, 12), heads=st.integers(1, 9),
       key_dim=st.integers(1, 40), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_indexed_attention_kernel_equals_gathered_rows(lengths, rows: int, heads: int,
                                                       key_dim: int, with_bias: bool,
                                                       seed: int) -> None:
    """``index``: the kernel reading ``keys[index[n]]`` in place (rows read by several
    positions, in any order) equals the kernel on the gathered rows, output and the gradients
    of ``qa``, ``keys`` and ``bias`` (added up per row); heads 1-9 cover the four-at-a-time
    loop and its remainder."""
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    m = int(offsets[-1])
    index = torch.randint(0, rows, (m,), generator=g)
    qa = torch.randn(len(lengths), heads, key_dim, generator=g).requires_grad_()
    keys = torch.randn(rows, key_dim, generator=g).requires_grad_()
    bias = torch.randn(rows, heads, generator=g).requires_grad_() if with_bias else None
    inputs = [t for t in (qa, keys, bias) if t is not None]
    upstream = torch.randn(len(lengths), heads, key_dim, generator=g)
    indexed = kernels.target_attention(qa, keys, offsets, bias, index)
    grads = torch.autograd.grad((indexed * upstream).sum(), inputs, allow_unused=True)
    gathered = kernels.target_attention(
        qa, keys[index], offsets, None if bias is None else bias[index])
    expected = torch.autograd.grad((gathered * upstream).sum(), inputs, allow_unused=True)
    torch.testing.assert_close(indexed, gathered, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, expected):
        if want is None:  # nothing read (no positions)
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_indexed_attention_kernel_gradcheck_and_bad_index() -> None:
    """Numerical gradients (float64) with an index that reads a row twice and skips one; an
    index outside the keys is an error naming it, not a read out of bounds."""
    torch.manual_seed(0)
    offsets = torch.tensor([0, 3, 3, 5])
    index = torch.tensor([2, 0, 2, 3, 0])
    qa = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, b: kernels.target_attention(q, k, offsets, b, index), (qa, keys, bias))
    with pytest.raises(RuntimeError, match="index 3 is 4, outside the 4 keys"):
        kernels.target_attention(qa, keys, offsets, bias, torch.tensor([2, 0, 2, 4, 0]))
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        kernels.target_attention(qa, keys, offsets, bias, index[:4])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), reads=st.integers(0, 400), window=st.integers(0, 300),
       seed=st.integers(0, 2**31 - 1))
def test_distinct_positions_kernel_equals_brute_force(n: int, reads: int, window: int,
                                                      seed: int) -> None:
    """Serving's distinct positions: the sorted set of the indices and the last ``window``
    positions, and each index's row in it, from the kernel and from the torch ops alike."""
    from torchrec_longseq import serving

    window = min(window, n)
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, max(n, 1), (reads if n else 0,), generator=g)
    expected = sorted(set(indices.tolist()) | set(range(n - window, n)))
    torch_ops = serving.distinct_positions(indices, n, window, "torch")
    for used, inverse in (serving.distinct_positions(indices, n, window), torch_ops):
        assert used.tolist() == expected
        assert [expected[i] for i in inverse.tolist()] == indices.tolist()
    assert kernels.distinct_positions(indices, n, window) is not None


def test_distinct_positions_kernel_rejects_a_position_outside_the_history() -> None:
    with pytest.raises(RuntimeError, match="index 1 is 5, outside the history of 5"):
        kernels.distinct_positions(torch.tensor([0, 5]), 5, 1)
    with pytest.raises(RuntimeError, match="window 6 outside"):
        kernels.distinct_positions(torch.tensor([0]), 5, 6)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 30), n=st.integers(0, 50), reads=st.integers(0, 60),
       widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
       positioned=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gather_rows_equals_index_select_and_cat(rows: int, n: int, reads: int, widths,
                                                 dtype: torch.dtype, positioned: bool,
                                                 seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(rows, w, generator=g).to(dtype) for w in widths]
    ids = [torch.randint(0, rows, (n,), generator=g) for _ in widths]
    positions = torch.randint(0, max(n, 1), (reads if n else 0,), generator=g) \
        if positioned else None
    picked = ids if positions is None else [i[positions] for i in ids]
    expected = torch.cat([t[i] for t, i in zip(tables, picked)], 1)
    with torch.no_grad():
        got = kernels.gather_rows(tables, ids, positions)
    assert got is not None and torch.equal(got, expected)


def test_gather_rows_checks_ids_and_leaves_autograd_to_torch() -> None:
    table = torch.randn(4, 3, requires_grad=True)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="id 4 outside the table of 4 rows"):
            kernels.gather_rows([table], [torch.tensor([0, 4])], None)
        with pytest.raises(RuntimeError, match="position 0 is 2, outside the 2 ids"):
            kernels.gather_rows([table], [torch.tensor([0, 1])], torch.tensor([2]))
    assert kernels.gather_rows([table], [torch.tensor([0, 1])], None) is None  # grad recorded


SIGNATURES = torch.arange(10).view(10, 1) * 0x0101010101  # 10 item rows
CATEGORY_SIGNATURES = torch.arange(5).view(5, 1) * 0x0F0F  # 5 category rows


@pytest.mark.parametrize("call, error, message", [
    # k < 0 (both paths: the search functions check it before choosing one)
    (lambda: topk.jagged_topk(torch.randn(4), torch.tensor([0, 4]), -1), ValueError,
     "k .* must be >= 0, got -1"),
    (lambda: hard.hard_search(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([1]), -2),
     ValueError, "must be >= 0, got -2"),
    (lambda: kernels._module().float_topk(torch.randn(4), torch.tensor([0]), torch.tensor([4]),
                                          -1), RuntimeError, "k must be >= 0"),
    # segments outside the values, or not one per target
    (lambda: topk.jagged_topk(torch.randn(4), torch.tensor([0, 4, 8]), 2), RuntimeError,
     r"segment 1 = \[4, 8\) is not inside the 4 values"),
    (lambda: hard.hard_search(torch.tensor([1, 2, 1, 1]), torch.tensor([0, 2, 4]),
                              torch.tensor([1]), 2), RuntimeError, "2 segments for 1 targets"),
    (lambda: signature_topk(SIGNATURES, torch.tensor([1, 2, 3, 4]), torch.tensor([1]),
                                CATEGORY_SIGNATURES, torch.tensor([1, 2, 3, 4]), torch.tensor([1]),
                                torch.tensor([0, 2, 4]), 2), RuntimeError, "2 segments for 1"),
    (lambda: signature_topk(SIGNATURES, torch.tensor([1, 2, 3, 4]), torch.tensor([1]),
                                CATEGORY_SIGNATURES, torch.tensor([1, 2]), torch.tensor([1]),
                                torch.tensor([0, 4]), 2), RuntimeError,
     "4 item ids but 2 category ids"),
    # ids of a float or bool type (a float id would be truncated: 1.7 read as category 1)
    (lambda: hard.hard_search(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([1.7]), 2),
     ValueError, "target_ids: expected integer ids, got torch.float32"),
    (lambda: kernels._module().hard_topk(torch.tensor([1, 2]), torch.tensor([True]),
                                         torch.tensor([0]), torch.tensor([2]), 2), RuntimeError,
     "target categories must be integer ids, got Bool"),
    # ids outside the tables, where the kernels' own check is cheap next to their work: one
    # shared history (serving), TWIN's dot products, SDIM's hash maps
    (lambda: signature_topk(SIGNATURES, torch.tensor([1, 2, 10**9, 4]), torch.tensor([1]),
                                CATEGORY_SIGNATURES, torch.tensor([1, 2, 3, 4]), torch.tensor([1]),
                                None, 2), RuntimeError,
     "item ids at position 2 is 1000000000, outside the table of 10 rows"),
    (lambda: signature_topk(SIGNATURES, torch.tensor([1, 2, 3, 4]), torch.tensor([1]),
                                CATEGORY_SIGNATURES, torch.tensor([1, -1, 3, 4]), torch.tensor([1]),
                                None, 2), RuntimeError,
     "category ids at position 1 is -1, outside the table of 5 rows"),
    (lambda: twin_topk(torch.zeros(7, 8), torch.zeros(3, 8), torch.tensor([1, 7, 2]),
                            torch.tensor([0, 1, 2]), torch.tensor([1]), torch.tensor([1]),
                            torch.tensor([0, 3]), torch.zeros(3, 1), 1, 2), RuntimeError,
     "item ids at position 1 is 7, outside the table of 7 rows"),
    (lambda: kernels._module().sdim_collisions(
        torch.zeros(6, 1, dtype=torch.long), torch.tensor([0, 1]),
        torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 2]), torch.tensor([0]),
        torch.tensor([0]), torch.tensor([0]), torch.tensor([2]), 3, 8), RuntimeError,
     "category ids at position 1 is 2, outside the table of 2 rows"),
    # TWIN's bias: one per behavior; the attention's: [keys, heads]
    (lambda: kernels._module().twin_topk_by_id(
        torch.zeros(7, 8), torch.tensor([1, 2, 3]), torch.zeros(3, 8), torch.tensor([0, 1, 2]),
        torch.zeros(1, 4), torch.zeros(2), torch.tensor([0]), torch.tensor([3]), 2, 1.0, False),
     RuntimeError, "one item id, category id and bias per behavior: got 3, 3 and 2"),
    (lambda: kernels.target_attention(torch.randn(1, 2, 8), torch.randn(40, 8),
                                      torch.tensor([0, 40]), torch.randn(1, 2), None),
     RuntimeError, r"bias must be \[40 keys, 2 heads\], got \[1, 2\]"),
])
def test_kernels_and_searches_reject_bad_inputs(call, error, message: str) -> None:
    """What a caller can get wrong raises instead of reading out of bounds or truncating. (The
    per-sample Hamming search does not check its ids: a check costs 30-65% of its scan, so it
    relies on check_batch, as documented.)"""
    with pytest.raises(error, match=message):
        call()


def test_float64_scores_take_the_torch_ops() -> None:
    """The float top-k kernel works in float32: float64 scores go to the torch ops rather than
    being rounded (1 + 1e-12 and 1 would tie)."""
    scores = torch.tensor([1.0 + 1e-12, 1.0], dtype=torch.float64)
    assert kernels.float_topk(scores, torch.tensor([0, 2]), 1) is None
    assert topk.jagged_topk(scores, torch.tensor([0, 2]), 1)[0].tolist() == [0]
