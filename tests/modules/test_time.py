"""Time-interval bucketing: exact edges, bucket count, invalid configurations."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq.modules.time import TimeIntervalEmbedding, log_bucket_boundaries


def reference_bucket(dt: float, boundaries: list) -> int:
    """Bucket 0: dt < b[0]; bucket i: b[i-1] <= dt < b[i]; last: dt >= b[-1] (a Python scan)."""
    bucket = 0
    for b in boundaries:
        if dt >= b:
            bucket += 1
    return bucket


def test_boundaries_count_ends_and_log_spacing() -> None:
    b = log_bucket_boundaries(8, 60.0, 3e7)
    assert b.dtype == torch.float64 and b.numel() == 7
    assert b[0].item() == 60.0 and b[-1].item() == 3e7  # exactly
    assert (b[1:] > b[:-1]).all()
    ratios = (b[1:] / b[:-1]).tolist()
    expected = (3e7 / 60.0) ** (1 / 6)
    assert all(math.isclose(r, expected, rel_tol=1e-12) for r in ratios)


def test_docstring_example() -> None:
    te = TimeIntervalEmbedding(4, num_buckets=8, min_interval=60, max_interval=3e7)
    assert te.bucketize(torch.tensor([0, 59, 60, 10**9])).tolist() == [0, 0, 1, 7]
    assert te(torch.tensor([0, 59, 60, 10**9])).shape == (4, 4)


@pytest.mark.parametrize("num_buckets,lo,hi", [(8, 60, 3e7), (32, 60.0, 4e7), (3, 1, 2),
                                               (5, 0.5, 1e9)])
def test_edges_below_at_above_every_boundary(num_buckets: int, lo: float, hi: float) -> None:
    te = TimeIntervalEmbedding(2, num_buckets=num_buckets, min_interval=lo, max_interval=hi)
    boundaries = te.boundaries.tolist()
    assert len(boundaries) == num_buckets - 1
    dts, expected = [], []
    for i, edge in enumerate(boundaries):
        # just below the edge is bucket i, at and just above it is bucket i + 1
        for dt, bucket in ((math.nextafter(edge, 0.0), i), (edge, i + 1),
                           (math.nextafter(edge, math.inf), i + 1)):
            dts.append(dt)
            expected.append(bucket)
    got = te.bucketize(torch.tensor(dts, dtype=torch.float64)).tolist()
    assert got == expected


def test_integer_seconds_at_the_end_edges() -> None:
    """Timestamps are int64 seconds: dt = min - 1, min, max - 1, max, 0 and huge."""
    te = TimeIntervalEmbedding(2, num_buckets=32, min_interval=60, max_interval=40_000_000)
    dt = torch.tensor([0, 59, 60, 61, 39_999_999, 40_000_000, 40_000_001, 2**62],
                      dtype=torch.int64)
    assert te.bucketize(dt).tolist() == [0, 0, 1, 1, 30, 31, 31, 31]


@settings(max_examples=40, deadline=None)
@given(num_buckets=st.integers(3, 40), lo=st.floats(1e-3, 1e4), ratio=st.floats(1.01, 1e6),
       dts=st.lists(st.one_of(st.integers(0, 10**11), st.floats(0, 1e11)), min_size=1,
                    max_size=20))
def test_bucketize_matches_scan(num_buckets: int, lo: float, ratio: float, dts: list) -> None:
    te = TimeIntervalEmbedding(3, num_buckets=num_buckets, min_interval=lo, max_interval=lo * ratio)
    boundaries = te.boundaries.tolist()
    got = te.bucketize(torch.tensor([float(d) for d in dts], dtype=torch.float64)).tolist()
    assert got == [reference_bucket(float(d), boundaries) for d in dts]
    assert all(0 <= g < num_buckets for g in got)


def test_every_bucket_is_reachable_and_embedded() -> None:
    te = TimeIntervalEmbedding(5, num_buckets=10, min_interval=60, max_interval=1e7)
    assert te.embedding.num_embeddings == 10
    representatives = [0.0] + te.boundaries.tolist()  # one dt per bucket
    buckets = te.bucketize(torch.tensor(representatives, dtype=torch.float64))
    assert buckets.tolist() == list(range(10))
    out = te(torch.tensor(representatives, dtype=torch.float64))
    torch.testing.assert_close(out, te.embedding.weight)


@pytest.mark.parametrize("num_buckets,lo,hi", [(2, 60, 3e7), (1, 60, 3e7), (0, 60, 3e7),
                                               (8, 0, 3e7), (8, -1, 3e7), (8, 60, 60),
                                               (8, 3e7, 60)])
def test_invalid_configs_raise(num_buckets: int, lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="num_buckets"):
        log_bucket_boundaries(num_buckets, lo, hi)
    with pytest.raises(ValueError, match="num_buckets"):
        TimeIntervalEmbedding(4, num_buckets=num_buckets, min_interval=lo, max_interval=hi)


def test_embedding_gradient_adds_up_per_bucket() -> None:
    """Each bucket's row gets the sum of the output gradients of the intervals in it (hand
    computed: buckets 0, 0, 1 and the last)."""
    te = TimeIntervalEmbedding(3, num_buckets=4, min_interval=60, max_interval=3600)
    intervals = torch.tensor([0, 59, 60, 10**6])
    assert te.bucketize(intervals).tolist() == [0, 0, 1, 3]
    upstream = torch.arange(12, dtype=torch.float32).view(4, 3)
    (te(intervals) * upstream).sum().backward()
    expected = torch.stack([upstream[0] + upstream[1], upstream[2], torch.zeros(3), upstream[3]])
    torch.testing.assert_close(te.embedding.weight.grad, expected)
