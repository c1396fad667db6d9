"""SimHash signatures, Hamming distance and simhash_topk against bit-by-bit references."""

from typing import List

import pytest
import torch
from hypothesis import given, settings, strategies as st

import torchrec_longseq.retrieval.simhash as simhash
from torchrec_longseq.retrieval.simhash import (
    hamming_distance,
    popcount64,
    popcount64_swar,
    SimHash,
    simhash_signatures,
    simhash_topk,
)

SETTINGS = settings(max_examples=60, deadline=None)

NUM_BITS = st.sampled_from([3, 24, 32, 64, 128])
INT64 = st.one_of(
    st.sampled_from([0, 1, -1, -(2**63), 2**63 - 1, -(2**62), 2**62]),
    st.integers(-(2**63), 2**63 - 1),
)
LENGTHS = st.lists(st.one_of(st.just(0), st.integers(0, 9)), min_size=0, max_size=6)


def to_int64(unsigned: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    return unsigned - 2**64 if unsigned >= 2**63 else unsigned


def reference_bits(x: int) -> List[int]:
    """The 64 bits of an int64, bit 0 first (Python's >> on negative ints is arithmetic)."""
    return [(x >> i) & 1 for i in range(64)]


def reference_pack(bits: List[int]) -> List[int]:
    """Signature bits -> int64 words: bit i goes to word i // 64, bit i % 64."""
    num_words = (len(bits) + 63) // 64
    words = [0] * num_words
    for i, bit in enumerate(bits):
        words[i // 64] |= bit << (i % 64)
    return [to_int64(w) for w in words]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: compiled packing
@SETTINGS
@given(num_bits=NUM_BITS, n=st.integers(0, 5), dim=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_signatures_match_bit_by_bit_reference(dtype: torch.dtype, num_bits: int, n: int,
                                               dim: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # small integers: every dot product is exact, and exactly 0 happens (-> bit 0, strict >)
    embeddings = torch.randint(-2, 3, (n, dim), generator=g).to(dtype)
    projection = torch.randint(-2, 3, (dim, num_bits), generator=g).to(dtype)
    signatures = simhash_signatures(embeddings, projection)

    expected = []
    for r in range(n):
        bits = []
        for i in range(num_bits):
            dot = sum(embeddings[r, j].item() * projection[j, i].item() for j in range(dim))
            bits.append(1 if dot > 0 else 0)
        expected.append(reference_pack(bits))
    num_words = (num_bits + 63) // 64
    assert signatures.dtype == torch.int64
    assert signatures.shape == (n, num_words)
    assert signatures.tolist() == expected
    if num_bits < 64:
        assert ((signatures >> num_bits) == 0).all()


def test_signature_bit_order() -> None:
    # embedding [1] against hyperplanes that are positive exactly at bits 0, 5, 63, 64 and 127
    projection = -torch.ones(1, 128)
    projection[0, [0, 5, 63, 64, 127]] = 1.0
    signatures = simhash_signatures(torch.ones(1, 1), projection)
    assert signatures.tolist() == [[1 + (1 << 5) - 2**63, 1 - 2**63]]


def test_signatures_take_no_gradient() -> None:
    embeddings = torch.randn(3, 4, requires_grad=True)
    signatures = simhash_signatures(embeddings, torch.randn(4, 64))
    assert not signatures.requires_grad


@pytest.mark.parametrize("num_bits", [0, 65, 96, 130, -64])
def test_signatures_reject_bad_num_bits(num_bits: int) -> None:
    with pytest.raises(ValueError, match="num_bits"):
        SimHash(embedding_dim=4, num_bits=num_bits)
    if num_bits > 0:
        with pytest.raises(ValueError, match="num_bits"):
            simhash_signatures(torch.randn(2, 4), torch.randn(4, num_bits))


def test_signatures_reject_dim_mismatch() -> None:
    with pytest.raises(ValueError, match="embedding dim 5"):
        simhash_signatures(torch.randn(2, 5), torch.randn(4, 64))


@SETTINGS
@given(words=st.lists(INT64, min_size=0, max_size=20))
def test_popcount_matches_reference(words: List[int]) -> None:
    x = torch.tensor(words, dtype=torch.int64).reshape(-1)
    expected = [sum(reference_bits(w)) for w in words]
    assert popcount64(x).tolist() == expected
    assert popcount64_swar(x).tolist() == expected
    assert popcount64(x.reshape(-1, 1)).reshape(-1).tolist() == expected  # any shape


@st.composite
def signature_pairs(draw):
    num_bits = draw(NUM_BITS)
    num_words = (num_bits + 63) // 64
    n = draw(st.integers(0, 8))
    word = st.integers(0, 2**32 - 1) if num_bits == 32 else INT64
    rows = st.lists(word, min_size=num_words, max_size=num_words)
    a = draw(st.lists(rows, min_size=n, max_size=n))
    b = draw(st.lists(rows, min_size=n, max_size=n))
    return num_words, a, b


@SETTINGS
@given(pairs=signature_pairs())
def test_hamming_matches_reference(pairs) -> None:
    num_words, a, b = pairs
    ta = torch.tensor(a, dtype=torch.int64).reshape(-1, num_words)
    tb = torch.tensor(b, dtype=torch.int64).reshape(-1, num_words)
    expected = [
        sum(
            x != y
            for wa, wb in zip(ra, rb)
            for x, y in zip(reference_bits(wa), reference_bits(wb))
        )
        for ra, rb in zip(a, b)
    ]
    distance = hamming_distance(ta, tb)
    assert distance.shape == (len(a),)
    assert distance.tolist() == expected
    if a:  # one target broadcast against all rows
        broadcast = hamming_distance(ta, tb[:1])
        assert torch.equal(broadcast, hamming_distance(ta, tb[:1].expand_as(ta)))


def test_hamming_extremes() -> None:
    a = torch.tensor([[0, 0], [-1, -1], [-(2**63), 0]])
    b = torch.tensor([[-1, -1], [-1, -1], [0, 2**63 - 1]])
    assert hamming_distance(a, b).tolist() == [128, 0, 64]


def popcount_python(x: int) -> int:
    return sum(reference_bits(x))


@st.composite
def signature_batch(draw):
    lengths = draw(LENGTHS)
    num_words = draw(st.integers(1, 2))
    # a small pool of words: many equal distances, so the recency tie-break is exercised
    pool = draw(st.lists(INT64, min_size=1, max_size=4))
    row = st.lists(st.sampled_from(pool), min_size=num_words, max_size=num_words)
    history = draw(st.lists(row, min_size=sum(lengths), max_size=sum(lengths)))
    target = draw(st.lists(row, min_size=len(lengths), max_size=len(lengths)))
    return lengths, num_words, history, target


@SETTINGS
@given(batch=signature_batch(), k=st.integers(0, 11))
def test_simhash_topk_matches_brute_force(batch, k: int) -> None:
    lengths, num_words, history, target = batch
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    expected_indices, expected_lengths = [], []
    for b in range(len(lengths)):
        positions = list(range(offsets[b], offsets[b + 1]))
        distance = {
            p: sum(popcount_python(h ^ t) for h, t in zip(history[p], target[b])) for p in positions
        }
        positions.sort(key=lambda p: (distance[p], -p))  # nearest first, then most recent
        expected_indices += positions[:k]
        expected_lengths.append(min(k, len(positions)))

    indices, kept = simhash_topk(
        torch.tensor(history, dtype=torch.int64).reshape(-1, num_words),
        torch.tensor(offsets, dtype=torch.long),
        torch.tensor(target, dtype=torch.int64).reshape(-1, num_words),
        k,
    )
    assert indices.tolist() == expected_indices
    assert kept.tolist() == expected_lengths


def test_simhash_topk_rejects_mismatched_words() -> None:
    with pytest.raises(ValueError, match="words"):
        simhash_topk(
            torch.zeros(3, 2, dtype=torch.long),
            torch.tensor([0, 3]),
            torch.zeros(1, 1, dtype=torch.long),
            2,
        )


def test_simhash_module_state_dict_and_seed() -> None:
    a = SimHash(embedding_dim=8, num_bits=128, seed=3)
    assert a.projection.shape == (8, 128)
    assert "projection" in a.state_dict()
    assert list(dict(a.named_parameters())) == []  # a buffer, never trained
    # same seed -> same projection; another seed -> another projection
    assert torch.equal(a.projection, SimHash(8, 128, seed=3).projection)
    assert not torch.equal(a.projection, SimHash(8, 128, seed=4).projection)
    # loading the state_dict reproduces the signatures whatever the receiver's seed
    b = SimHash(8, 128, seed=4)
    b.load_state_dict(a.state_dict())
    embeddings = torch.randn(6, 8)
    assert torch.equal(a(embeddings), b(embeddings))
    assert a(embeddings).shape == (6, 2)


def test_simhash_module_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    SimHash(8, 64, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_simhash_module_on_meta_then_materialised() -> None:
    meta = SimHash(8, 64, seed=5, device="meta")
    assert meta.projection.is_meta
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.projection, SimHash(8, 64, seed=5).projection)


def test_similar_embeddings_are_nearer() -> None:
    sim = SimHash(embedding_dim=16, num_bits=256, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, generator=g)
    near = x + 0.05 * torch.randn(1, 16, generator=g)
    far = -x
    d_near, d_far = hamming_distance(sim(x), sim(torch.cat([near, far]))).tolist()
    assert d_near < 40 and d_far == 256  # an opposite vector flips every bit


class Retrieve(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hash = SimHash(embedding_dim=4, num_bits=64, seed=1)

    def forward(self, history, offsets, target):
        # call through the module attribute: torch.fx.wrap patches simhash's own globals, so
        # a bare name bound by `from ... import simhash_topk` would not be a leaf
        return simhash.simhash_topk(self.hash(history), offsets, self.hash(target), 3)


def test_fx_symbolic_trace() -> None:
    module = Retrieve()
    traced = torch.fx.symbolic_trace(module)
    targets = {node.target for node in traced.graph.nodes if node.op == "call_function"}
    assert any(getattr(t, "__name__", "") == "simhash_topk" for t in targets)
    g = torch.Generator().manual_seed(0)
    for lengths in ([5, 0, 2], [0, 0], []):
        offsets = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())
        history = torch.randn(sum(lengths), 4, generator=g)
        target = torch.randn(len(lengths), 4, generator=g)
        expected = module(history, offsets, target)
        got = traced(history, offsets, target)
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
