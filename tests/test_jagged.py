"""torchrec_longseq.jagged against dense / Python-loop references on hypothesis jagged batches."""

from typing import List

import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq.jagged import (
    last_n,
    lengths_to_offsets,
    segment_ids,
    segment_log1p_sum_exp,
    segment_softmax,
    segment_sum,
)

SETTINGS = settings(max_examples=60, deadline=None)

# many zeros, so empty segments and all-empty batches come up often; B = 0 included
LENGTH = st.one_of(st.just(0), st.integers(0, 7))
LENGTHS = st.lists(LENGTH, min_size=0, max_size=6)


def offsets_of(lengths: List[int]) -> List[int]:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return out


def as_offsets(lengths: List[int]) -> torch.Tensor:
    return torch.tensor(offsets_of(lengths), dtype=torch.long)


def segments_of(lengths: List[int]) -> List[int]:
    return [b for b, length in enumerate(lengths) for _ in range(length)]


@SETTINGS
@given(lengths=LENGTHS, dtype=st.sampled_from([torch.int32, torch.int64]))
def test_lengths_to_offsets(lengths: List[int], dtype: torch.dtype) -> None:
    offsets = lengths_to_offsets(torch.tensor(lengths, dtype=dtype))
    assert offsets.dtype == torch.int64
    assert offsets.tolist() == offsets_of(lengths)


@SETTINGS
@given(lengths=LENGTHS)
def test_segment_ids(lengths: List[int]) -> None:
    seg = segment_ids(as_offsets(lengths), sum(lengths))
    assert seg.tolist() == segments_of(lengths)


@SETTINGS
@given(lengths=LENGTHS, n=st.integers(0, 9))
def test_last_n(lengths: List[int], n: int) -> None:
    offsets = offsets_of(lengths)
    indices, kept = last_n(as_offsets(lengths), n)
    expected = []
    for b, length in enumerate(lengths):
        expected += list(range(offsets[b + 1] - min(length, n), offsets[b + 1]))
    assert indices.tolist() == expected
    assert kept.tolist() == [min(length, n) for length in lengths]


def test_last_n_example() -> None:
    # lengths [2, 0, 3], n = 2 -> [0, 1] | | [3, 4]
    indices, kept = last_n(torch.tensor([0, 2, 2, 5]), 2)
    assert indices.tolist() == [0, 1, 3, 4]
    assert kept.tolist() == [2, 0, 2]


@SETTINGS
@given(
    lengths=LENGTHS,
    extra=st.integers(0, 2),
    dim=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_segment_sum(lengths: List[int], extra: int, dim: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    num_segments = len(lengths) + extra  # trailing segments with no rows
    values = torch.randn(n, dim, generator=g, dtype=torch.float64)
    seg = segments_of(lengths)
    out = segment_sum(values, torch.tensor(seg, dtype=torch.long), num_segments)

    expected = torch.zeros(num_segments, dim, dtype=torch.float64)
    for row, s in enumerate(seg):
        expected[s] += values[row]
    assert out.shape == (num_segments, dim)
    torch.testing.assert_close(out, expected)


def reference_softmax(scores: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    offsets = offsets_of(lengths)
    parts = [
        torch.softmax(scores[offsets[b] : offsets[b + 1]], dim=0)
        for b in range(len(lengths))
        if lengths[b] > 0
    ]
    return torch.cat(parts) if parts else scores.new_zeros(scores.shape)


@SETTINGS
@given(
    lengths=LENGTHS,
    heads=st.integers(1, 3),
    scale=st.sampled_from([1.0, 30.0, 1000.0]),  # 1000: exp overflows without the max shift
    seed=st.integers(0, 2**31 - 1),
)
def test_segment_softmax_forward_backward(
    lengths: List[int], heads: int, scale: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    base = torch.randn(n, heads, generator=g, dtype=torch.float64) * scale
    upstream = torch.randn(n, heads, generator=g, dtype=torch.float64)
    seg = torch.tensor(segments_of(lengths), dtype=torch.long)

    scores = base.clone().requires_grad_(True)
    out = segment_softmax(scores, seg, len(lengths))
    ref_scores = base.clone().requires_grad_(True)
    ref = reference_softmax(ref_scores, lengths)

    assert out.shape == (n, heads)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref)
    if n == 0:
        return
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert not torch.isnan(scores.grad).any()
    torch.testing.assert_close(scores.grad, ref_scores.grad)


def test_segment_softmax_empty_segments_no_nan() -> None:
    # lengths [0, 3, 0, 0, 1] with one trailing segment that has no rows at all
    scores = torch.tensor([[1.0], [2.0], [3.0], [-5.0]], requires_grad=True)
    seg = torch.tensor([1, 1, 1, 4])
    out = segment_softmax(scores, seg, 6)
    out.sum().backward()
    assert not torch.isnan(out).any() and not torch.isnan(scores.grad).any()
    torch.testing.assert_close(out[:3, 0], torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0))
    assert out[3, 0].item() == 1.0
    # per-segment softmax sums to a constant: the gradient of its sum is 0
    torch.testing.assert_close(scores.grad, torch.zeros_like(scores))


def test_segment_softmax_all_empty() -> None:
    scores = torch.empty(0, 2, requires_grad=True)
    out = segment_softmax(scores, torch.empty(0, dtype=torch.long), 3)
    assert out.shape == (0, 2)
    out.sum().backward()
    assert scores.grad.shape == (0, 2)


@SETTINGS
@given(
    lengths=LENGTHS,
    heads=st.integers(1, 3),
    scale=st.sampled_from([1.0, 30.0, 1000.0]),  # 1000: exp overflows without the shift
    seed=st.integers(0, 2**31 - 1),
)
def test_segment_log1p_sum_exp_forward_backward(lengths: List[int], heads: int, scale: float,
                                                seed: int) -> None:
    """Against torch.logsumexp of each segment with a column of zeros added (the null score),
    forward and backward; an empty segment gives exactly 0."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    base = torch.randn(n, heads, generator=g, dtype=torch.float64) * scale
    upstream = torch.randn(len(lengths), heads, generator=g, dtype=torch.float64)
    seg = torch.tensor(segments_of(lengths), dtype=torch.long)
    scores = base.clone().requires_grad_(True)
    out = segment_log1p_sum_exp(scores, seg, len(lengths))
    ref_scores = base.clone().requires_grad_(True)
    offsets = offsets_of(lengths)
    ref = torch.stack([torch.logsumexp(torch.cat([ref_scores[offsets[b]:offsets[b + 1]],
                                                  ref_scores.new_zeros(1, heads)]), dim=0)
                       for b in range(len(lengths))]) if lengths else out.detach() * 0
    assert out.shape == (len(lengths), heads) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    assert all((out[b] == 0).all() for b, length in enumerate(lengths) if length == 0)
    if n == 0:
        return
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(scores.grad, ref_scores.grad)


def test_segment_log1p_sum_exp_by_hand() -> None:
    # segments [ln 2, ln 3] and []: log(1 + 2 + 3) = log 6, and log(1) = 0
    scores = torch.tensor([[2.0], [3.0]]).log()
    out = segment_log1p_sum_exp(scores, torch.tensor([0, 0]), 2)
    torch.testing.assert_close(out, torch.tensor([[6.0], [1.0]]).log())
