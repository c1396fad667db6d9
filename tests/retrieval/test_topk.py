"""jagged_topk and hard_search against brute-force per-sample Python references, on both paths:
the compiled kernels (``kernel="auto"``, the CPU default) and the torch ops (GPU tensors,
``kernel="torch"``)."""

from typing import List, Tuple

import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq.retrieval.hard import hard_search
from torchrec_longseq.retrieval.topk import jagged_topk, jagged_topk_smallest_int

SETTINGS = settings(max_examples=80, deadline=None)

LENGTHS = st.lists(st.one_of(st.just(0), st.integers(0, 9)), min_size=0, max_size=6)
K = st.integers(0, 11)  # 0, smaller than, equal to and larger than the segment lengths
KERNEL = st.sampled_from(["auto", "torch"])  # the compiled kernels on CPU, the torch ops


def offsets_of(lengths: List[int]) -> List[int]:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return out


def reference_topk(
    scores: List[float], lengths: List[int], k: int, largest: bool
) -> Tuple[List[int], List[int]]:
    """Per sample: sort (score best-first, position latest-first) in plain Python, keep k."""
    offsets = offsets_of(lengths)
    indices, kept = [], []
    for b in range(len(lengths)):
        positions = list(range(offsets[b], offsets[b + 1]))
        sign = -1 if largest else 1
        positions.sort(key=lambda p: (sign * scores[p], -p))
        chosen = positions[: max(k, 0)]
        indices += chosen
        kept.append(len(chosen))
    return indices, kept


@st.composite
def scored_batch(draw):
    lengths = draw(LENGTHS)
    n = sum(lengths)
    kind = draw(st.sampled_from(["int", "float_ties", "float"]))
    if kind == "int":
        scores = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))  # heavy ties
        tensor = torch.tensor(scores, dtype=torch.long)
    elif kind == "float_ties":
        pool = [-1.5, -0.0, 0.0, 0.25, 2.0, float("inf"), float("-inf")]
        scores = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
        tensor = torch.tensor(scores, dtype=torch.float32)
    else:
        scores = draw(
            st.lists(st.floats(-1e6, 1e6, width=32), min_size=n, max_size=n)
        )
        tensor = torch.tensor(scores, dtype=torch.float32)
    if n == 0:
        tensor = tensor.reshape(0)
    return lengths, scores, tensor


@SETTINGS
@given(batch=scored_batch(), k=K, largest=st.booleans(), kernel=KERNEL)
def test_jagged_topk_matches_reference(batch, k: int, largest: bool, kernel: str) -> None:
    lengths, scores, tensor = batch
    offsets = torch.tensor(offsets_of(lengths), dtype=torch.long)
    indices, kept = jagged_topk(tensor, offsets, k, largest=largest, kernel=kernel)
    expected_indices, expected_kept = reference_topk(scores, lengths, k, largest)
    assert indices.dtype == torch.long and kept.dtype == torch.long
    assert indices.tolist() == expected_indices
    assert kept.tolist() == expected_kept


@SETTINGS
@given(lengths=LENGTHS, k=K, max_score=st.integers(0, 6), data=st.data())
def test_jagged_topk_smallest_int_matches_reference(lengths, k: int, max_score: int, data) -> None:
    n = sum(lengths)
    scores = data.draw(st.lists(st.integers(0, max_score), min_size=n, max_size=n))
    offsets = torch.tensor(offsets_of(lengths), dtype=torch.long)
    indices, kept = jagged_topk_smallest_int(
        torch.tensor(scores, dtype=torch.long).reshape(n), offsets, k, max_score
    )
    expected_indices, expected_kept = reference_topk(scores, lengths, k, largest=False)
    assert indices.tolist() == expected_indices
    assert kept.tolist() == expected_kept


def test_jagged_topk_example() -> None:
    # lengths [4, 0, 3]; ties go to the later position
    scores = torch.tensor([1.0, 3.0, 3.0, 0.0, 5.0, 5.0, 5.0])
    offsets = torch.tensor([0, 4, 4, 7])
    indices, kept = jagged_topk(scores, offsets, 2)
    assert indices.tolist() == [2, 1, 6, 5]
    assert kept.tolist() == [2, 0, 2]
    indices, kept = jagged_topk(scores, offsets, 2, largest=False)
    assert indices.tolist() == [3, 0, 6, 5]

def reference_hard(
    history: List[int], lengths: List[int], target: List[int], k: int
) -> Tuple[List[int], List[int]]:
    """Per sample: positions of the target's category, the k most recent, chronological."""
    offsets = offsets_of(lengths)
    indices, kept = [], []
    for b in range(len(lengths)):
        matches = [p for p in range(offsets[b], offsets[b + 1]) if history[p] == target[b]]
        chosen = matches[max(len(matches) - k, 0) :] if k > 0 else []
        indices += chosen
        kept.append(len(chosen))
    return indices, kept


@st.composite
def category_batch(draw):
    lengths = draw(LENGTHS)
    n = sum(lengths)
    history = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    # category 4 never occurs in a history: samples with no match at all
    target = draw(st.lists(st.integers(0, 4), min_size=len(lengths), max_size=len(lengths)))
    return lengths, history, target


@SETTINGS
@given(batch=category_batch(), k=K, kernel=KERNEL)
def test_hard_search_matches_reference(batch, k: int, kernel: str) -> None:
    lengths, history, target = batch
    offsets = torch.tensor(offsets_of(lengths), dtype=torch.long)
    indices, kept = hard_search(torch.tensor(history, dtype=torch.long), offsets,
                                torch.tensor(target, dtype=torch.long), k, kernel=kernel)
    expected_indices, expected_kept = reference_hard(history, lengths, target, k)
    assert indices.tolist() == expected_indices
    assert kept.tolist() == expected_kept


def test_hard_search_example() -> None:
    # lengths [5, 0, 2]; sample 2 has no behavior of category 9
    history = torch.tensor([1, 2, 1, 1, 2, 9 - 1, 9 - 2])
    offsets = torch.tensor([0, 5, 5, 7])
    indices, kept = hard_search(history, offsets, torch.tensor([1, 1, 9]), 2)
    assert indices.tolist() == [2, 3]
    assert kept.tolist() == [2, 0, 0]


def test_fx_trace_calls_helpers_as_leaves() -> None:
    import torchrec_longseq.retrieval.hard as hard
    import torchrec_longseq.retrieval.topk as topk

    class Retrieve(torch.nn.Module):
        def forward(self, scores, category, offsets, target):
            a = topk.jagged_topk(scores, offsets, 2, largest=False)
            b = hard.hard_search(category, offsets, target, 2)
            return a, b

    module = Retrieve()
    traced = torch.fx.symbolic_trace(module)
    args = (
        torch.tensor([3.0, 1.0, 2.0, 0.5]),
        torch.tensor([1, 2, 1, 1]),
        torch.tensor([0, 3, 3, 4]),
        torch.tensor([1, 0, 1]),
    )
    expected = module(*args)
    got = traced(*args)
    for (e_i, e_l), (g_i, g_l) in zip(expected, got):
        assert torch.equal(e_i, g_i) and torch.equal(e_l, g_l)
