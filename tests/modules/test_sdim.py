"""SDIM's hash-collision interest: ``collision_weights``, ``bucket_mean`` and the whole module.

References are independent of the package's jagged helpers: per-sample Python loops that read
every signature's bits from the code words with Python integers, sum the colliding behaviors one
by one (no merging of repeated behaviors), l2-normalise and average. The model test hashes every
behavior from the embedding tables themselves (no code table) with the model's SimHash blocks.
The model's entry point ``collisions_by_id`` (and the model) run both with the compiled CPU
pass (``kernel="auto"``, the default) and with the torch ops (``kernel="torch"``).

More than 64 signatures (``m / tau > 64``) are rejected: the compiled pass keeps a pair's
matching signatures in one 64-bit mask.
"""

import random
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec import EmbeddingConfig

from helpers import (B, D, DATA, WINDOW, build_small_model, capture, make_batch, make_features,
                     needs_compiler, nonzero_rows, per_sample, sequence_of)
from torchrec_longseq import set_kernel
from torchrec_longseq.data.batch import (HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM,
                                         Batch)
from torchrec_longseq.data.synthetic import SyntheticConfig
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.modules.sdim import SDIM, bucket_mean, collision_weights, collisions_by_id
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.schema import default_schema

SETTINGS = settings(max_examples=40, deadline=None)
ATOL, RTOL = 1e-5, 1e-4
MASK64 = (1 << 64) - 1
MODEL = dict(sdim_bits=48, sdim_tau=3)  # on top of helpers.model_config


# ----------------------------------------------------------------------------- helpers

def signed64(word: int) -> int:
    """An unsigned 64-bit pattern as the int64 value with the same bits."""
    word &= MASK64
    return word - (1 << 64) if word >= 1 << 63 else word


def group_bits(word: int, group: int, tau: int) -> int:
    """Bits ``tau * group`` to ``tau * group + tau - 1`` of a 64-bit word (Python ints)."""
    return ((word & MASK64) >> (tau * group)) & ((1 << tau) - 1)


def collides(code: List[int], target: List[int], signature: int, tau: int,
             groups_per_word: int) -> bool:
    word, group = divmod(signature, groups_per_word)
    return group_bits(code[word], group, tau) == group_bits(target[word], group, tau)


def reference_interest(vectors: torch.Tensor, codes: List[List[int]], target: List[int],
                       tau: int, groups_per_word: int) -> torch.Tensor:
    """One sample's SDIM interest, by brute force: for every signature, the plain sum of every
    behavior (repeats counted one by one) whose bits equal the target's, l2-normalised (zero stays
    zero), averaged over all ``W * groups_per_word`` signatures. ``vectors [L, D]``."""
    num_signatures = len(target) * groups_per_word
    total = vectors.new_zeros(vectors.size(1))
    for g in range(num_signatures):
        hits = [j for j, code in enumerate(codes) if collides(code, target, g, tau, groups_per_word)]
        if not hits:
            continue  # a zero vector
        s = vectors[torch.tensor(hits)].sum(0)
        total = total + s / s.norm()
    return total / num_signatures


def expected_collisions(items: List[int], cats: List[int], codes: List[List[int]],
                        target: List[int], tau: int, groups_per_word: int
                        ) -> Dict[Tuple[int, int], Tuple[int, List[bool]]]:
    """One sample's colliding distinct (item, category) pairs -> (count, match per signature)."""
    out: Dict[Tuple[int, int], Tuple[int, List[bool]]] = {}
    num_signatures = len(target) * groups_per_word
    for item, cat, code in zip(items, cats, codes):
        match = [collides(code, target, g, tau, groups_per_word) for g in range(num_signatures)]
        if any(match):
            count = out.get((item, cat), (0, match))[0]
            out[(item, cat)] = (count + 1, match)
    return out


def grad_of(out: torch.Tensor, upstream: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """d (out * upstream).sum() / d leaf; zeros when ``out`` does not depend on ``leaf``."""
    if not out.requires_grad:
        return torch.zeros_like(leaf)
    return torch.autograd.grad((out * upstream).sum(), leaf, allow_unused=True,
                               materialize_grads=True)[0]


def offsets_of(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.long)


def random_words(rng: random.Random, num_words: int, tau: int, groups_per_word: int,
                 garbage: bool) -> List[int]:
    """Code words whose groups take one of 3 values (so signatures often collide); with
    ``garbage``, the bits above the last group are random (no signature reads them)."""
    used = tau * groups_per_word
    words = []
    for _ in range(num_words):
        word = 0
        for g in range(groups_per_word):
            word |= rng.choice([0, 1, (1 << tau) - 1]) << (tau * g)
        if garbage and used < 64:
            word |= rng.getrandbits(64 - used) << used
        words.append(signed64(word))
    return words


# ----------------------------------------------------------------------------- hand example

def test_collision_weights_hand_example() -> None:
    # tau = 2, two signatures per word, one word. Target 0b10_01: g0 = 01, g1 = 10.
    # sample 0: A 0b00_01 (g0 only), B 0b10_10 (g1 only), C 0b01_10 (none), A again
    # sample 1: empty; sample 2: 0b00_00 collides nowhere (target 0b11_11)
    codes = torch.tensor([[0b0001], [0b1010], [0b0110], [0b0001], [0b0000]])
    target = torch.tensor([[0b1001], [0b1001], [0b1111]])
    offsets = torch.tensor([0, 4, 4, 5])
    items = torch.tensor([1, 2, 3, 1, 4])
    cats = torch.tensor([0, 0, 1, 0, 1])
    positions, lengths, weights = collision_weights(codes, target, offsets, [items, cats], 2, 2)
    assert lengths.tolist() == [2, 0, 0]
    got = {int(items[p]): w.tolist() for p, w in zip(positions, weights)}
    assert got == {1: [2.0, 0.0], 2: [0.0, 1.0]}  # A twice, in signature 0; B in signature 1
    assert all(0 <= int(p) < 4 for p in positions)

    vectors = torch.tensor([[3.0, 4.0], [0.0, -2.0], [1.0, 1.0], [3.0, 4.0], [5.0, 5.0]])
    out = bucket_mean(vectors[positions], offsets_of(lengths.tolist()), weights)
    # signature 0: 2 A -> A / |A| = (0.6, 0.8); signature 1: B / |B| = (0, -1); mean of the two
    torch.testing.assert_close(out, torch.tensor([[0.3, -0.1], [0.0, 0.0], [0.0, 0.0]]))


# ----------------------------------------------------------------------------- property test

@SETTINGS
@given(
    lengths=st.lists(st.one_of(st.just(0), st.integers(0, 8)), min_size=0, max_size=5),
    tau=st.integers(1, 4),
    words=st.integers(1, 3),
    full_word=st.booleans(),
    small_groups=st.integers(1, 3),
    num_items=st.integers(1, 5),
    num_categories=st.integers(1, 3),
    garbage=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_collision_weights_and_bucket_mean_match_brute_force(
    lengths: List[int], tau: int, words: int, full_word: bool, small_groups: int,
    num_items: int, num_categories: int, garbage: bool, seed: int,
) -> None:
    """Codes and vectors are functions of (item, category), as in the model, through small tables
    of random group values: collisions, repeated behaviors and samples with none all happen."""
    groups_per_word = 64 // tau if full_word else small_groups  # full word: sign bit read (tau 1, 2, 4)
    num_signatures = words * groups_per_word
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    pairs = [(i, c) for i in range(num_items) for c in range(num_categories)]
    pair_codes = {p: random_words(rng, words, tau, groups_per_word, garbage) for p in pairs}
    table = torch.randn(len(pairs), 3, generator=g).requires_grad_()

    b = len(lengths)
    hist = [[rng.choice(pairs) for _ in range(n)] for n in lengths]
    # the target: a behavior's pair (often in the history) or fresh codes
    targets = [pair_codes[rng.choice(pairs)] if rng.random() < 0.5
               else random_words(rng, words, tau, groups_per_word, garbage) for _ in range(b)]
    flat = [p for h in hist for p in h]
    items = torch.tensor([p[0] for p in flat], dtype=torch.long)
    cats = torch.tensor([p[1] for p in flat], dtype=torch.long)
    codes = torch.tensor([pair_codes[p] for p in flat], dtype=torch.long).view(-1, words)
    target_codes = torch.tensor(targets, dtype=torch.long).view(b, words)
    pair_index = items * num_categories + cats
    offsets = offsets_of(lengths)

    positions, counts, weights = collision_weights(
        codes, target_codes, offsets, [items, cats], tau, groups_per_word)
    assert counts.shape == (b,) and weights.shape == (positions.numel(), num_signatures)
    assert int(counts.sum()) == positions.numel()

    # which (item, category) collide, where, and how often
    start = 0
    for s, n in enumerate(counts.tolist()):
        mine = positions[start:start + n].tolist()
        start += n
        expected = expected_collisions([p[0] for p in hist[s]], [p[1] for p in hist[s]],
                                       [pair_codes[p] for p in hist[s]], targets[s], tau,
                                       groups_per_word)
        assert all(int(offsets[s]) <= p < int(offsets[s + 1]) for p in mine)  # grouped by sample
        got = {flat[p]: weights[start - n + u].tolist() for u, p in enumerate(mine)}
        assert len(got) == n  # one position per distinct pair
        assert got == {pair: [float(count) * m for m in match]
                       for pair, (count, match) in expected.items()}

    if b == 0:  # bucket_mean of an empty batch: see test_bucket_mean_of_an_empty_batch
        return
    out = bucket_mean(table[pair_index[positions]], offsets_of(counts.tolist()), weights)
    assert out.shape == (b, 3) and torch.isfinite(out).all()
    start, refs = 0, []
    for s, n in enumerate(lengths):
        refs.append(reference_interest(table[pair_index[start:start + n]],
                                       [pair_codes[p] for p in hist[s]], targets[s], tau,
                                       groups_per_word))
        start += n
    ref = torch.stack(refs)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for s in range(b):
        if int(counts[s]) == 0:
            assert torch.equal(out[s], torch.zeros(3))  # exactly zero, not NaN

    upstream = torch.randn(b, 3, generator=g)
    got, expected_grad = grad_of(out, upstream, table), grad_of(ref, upstream, table)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected_grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kernels", ["auto", "torch"], ids=["kernels", "torch-ops"])
@SETTINGS
@given(
    lengths=st.lists(st.one_of(st.just(0), st.integers(0, 8)), min_size=0, max_size=5),
    tau=st.integers(1, 4),
    groups=st.integers(1, 32),
    num_items=st.integers(1, 6),
    num_categories=st.integers(1, 3),
    garbage=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_collisions_by_id_match_brute_force(
    kernels: str, lengths: List[int], tau: int, groups: int, num_items: int,
    num_categories: int, garbage: bool, seed: int,
) -> None:
    """The model's entry point: codes read from an item and a category code table (one word
    each), so the signatures are the item word's groups then the category word's. ``kernels``:
    "auto" the compiled CPU pass (the default on CPU), "torch" the torch ops."""
    check_collisions_by_id(lengths, tau, groups, num_items, num_categories, garbage, seed,
                           kernels)


def check_collisions_by_id(lengths: List[int], tau: int, groups: int, num_items: int,
                           num_categories: int, garbage: bool, seed: int,
                           kernel: str = "auto") -> None:
    groups_per_word = min(groups, 64 // tau)
    rng = random.Random(seed)
    item_words = [random_words(rng, 1, tau, groups_per_word, garbage) for _ in range(num_items)]
    cat_words = [random_words(rng, 1, tau, groups_per_word, garbage)
                 for _ in range(num_categories)]
    b = len(lengths)
    hist = [[(rng.randrange(num_items), rng.randrange(num_categories)) for _ in range(n)]
            for n in lengths]
    targets = [(rng.randrange(num_items), rng.randrange(num_categories)) for _ in range(b)]
    flat = [p for h in hist for p in h]
    items = torch.tensor([p[0] for p in flat], dtype=torch.long)
    cats = torch.tensor([p[1] for p in flat], dtype=torch.long)
    positions, counts, weights = collisions_by_id(
        [torch.tensor(item_words), torch.tensor(cat_words)], [items, cats],
        [torch.tensor([t[0] for t in targets], dtype=torch.long),
         torch.tensor([t[1] for t in targets], dtype=torch.long)], [items, cats],
        offsets_of(lengths), tau, groups_per_word, kernel)
    assert counts.tolist() == [len(expected_collisions(
        [p[0] for p in h], [p[1] for p in h], [item_words[i] + cat_words[c] for i, c in h],
        item_words[t[0]] + cat_words[t[1]], tau, groups_per_word)) for h, t in zip(hist, targets)]
    assert weights.shape == (positions.numel(), 2 * groups_per_word)
    offsets, start = offsets_of(lengths), 0
    for s, n in enumerate(counts.tolist()):
        mine = positions[start:start + n].tolist()
        assert all(int(offsets[s]) <= p < int(offsets[s + 1]) for p in mine)
        got = {flat[p]: weights[start + u].tolist() for u, p in enumerate(mine)}
        start += n
        expected = expected_collisions(
            [p[0] for p in hist[s]], [p[1] for p in hist[s]],
            [item_words[i] + cat_words[c] for i, c in hist[s]],
            item_words[targets[s][0]] + cat_words[targets[s][1]], tau, groups_per_word)
        assert got == {pair: [float(count) * m for m in match]
                       for pair, (count, match) in expected.items()}


@needs_compiler
def test_compiled_collisions_reject_more_than_64_signatures() -> None:
    """A pair's matching signatures are one 64-bit mask in the compiled pass: 80 signatures
    (num_bits=80, tau=1) would overflow it, so the kernel refuses (and so does SDIM)."""
    tau, groups_per_word = 1, 40
    item_codes = torch.tensor([[0], [1 << 39]])
    cat_codes = torch.tensor([[0], [-1]])
    with pytest.raises(RuntimeError, match="at most 64 signatures"):
        collisions_by_id([item_codes, cat_codes], [torch.tensor([1]), torch.tensor([1])],
                         [torch.tensor([0]), torch.tensor([0])],
                         [torch.tensor([1]), torch.tensor([1])], torch.tensor([0, 1]), tau,
                         groups_per_word, "auto")


def test_nothing_collides() -> None:
    """Every group of every target differs from every behavior's: no position, exact zeros, no
    NaN, finite (zero) gradient; a sample colliding in a single signature gets that behavior
    normalised over G."""
    tau, groups_per_word, words = 2, 4, 2  # 8 bits used per word, 8 signatures
    behaviors = [[0b0000_0000, 0b0101_0101]] * 3 + [[0b0101_0000, 0b0000_0000]] * 2
    codes = torch.tensor(behaviors, dtype=torch.long)
    target = torch.tensor([[0b1011_1110, 0b1010_1010],  # differs in every group from both
                           [0b1111_1111, -1],
                           [0b1111_1111, 0b1111_1111]], dtype=torch.long)
    offsets = torch.tensor([0, 3, 3, 5])
    items = torch.tensor([1, 1, 2, 3, 3])
    cats = torch.tensor([0, 0, 1, 0, 0])
    table = torch.randn(5, 4).requires_grad_()
    positions, lengths, weights = collision_weights(codes, target, offsets, [items, cats], tau,
                                                    groups_per_word)
    assert positions.numel() == 0 and lengths.tolist() == [0, 0, 0]
    assert weights.shape == (0, words * groups_per_word)
    out = bucket_mean(table[items[positions]], offsets_of(lengths.tolist()), weights)
    assert torch.equal(out, torch.zeros(3, 4))
    out.sum().backward()
    assert torch.isfinite(table.grad).all() and not table.grad.any()

    # the last sample's target now shares exactly the top group (bits 6-7) of word 0 with item 3
    target[2] = torch.tensor([0b0111_1111, 0b1111_1111])
    positions, lengths, weights = collision_weights(codes, target, offsets, [items, cats], tau,
                                                    groups_per_word)
    assert lengths.tolist() == [0, 0, 1] and items[positions].tolist() == [3]
    assert weights.tolist() == [[0, 0, 0, 2, 0, 0, 0, 0]]  # signature 3 only, item 3 twice
    table.grad = None
    out = bucket_mean(table[items[positions]], offsets_of(lengths.tolist()), weights)
    expected = torch.zeros(3, 4)
    expected[2] = table[3].detach() / table[3].detach().norm() / 8
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.isfinite(table.grad).all()
    assert set(table.grad.abs().sum(1).nonzero().flatten().tolist()) == {3}


def test_sign_bit_group_is_compared() -> None:
    """tau = 4 over a whole word: the top group holds the sign bit of the int64 word."""
    codes = torch.tensor([[signed64(0xF << 60)], [signed64(0x7 << 60)]])
    target = torch.tensor([[signed64((0xF << 60) | 0x1)]])
    positions, lengths, weights = collision_weights(
        codes, target, torch.tensor([0, 2]), [torch.tensor([0, 1]), torch.tensor([0, 0])], 4, 16)
    assert lengths.tolist() == [2] and sorted(positions.tolist()) == [0, 1]
    by_item = {int(p): w for p, w in zip(positions, weights)}
    assert by_item[0][15] == 1 and by_item[1][15] == 0  # 0xF matches, 0x7 does not
    assert by_item[0][0] == 0 and by_item[1][0] == 0  # the target's low group is 1, theirs 0
    assert by_item[0][1:15].eq(1).all() and by_item[1][1:15].eq(1).all()


def test_bucket_mean_of_an_empty_batch() -> None:
    offsets = torch.zeros(1, dtype=torch.long)
    out = bucket_mean(torch.zeros(0, 4), offsets, torch.zeros(0, 16))
    assert out.shape == (0, 4)


# ----------------------------------------------------------------------------- validation

def small_tables() -> Dict[str, EmbeddingConfig]:
    """An item table of 10 rows and a category table of 3, both 4 wide (a behavior is 8 wide)."""
    schema = default_schema()
    item, category = schema.attributes
    return {a.table: EmbeddingConfig(name=a.table, embedding_dim=4, num_embeddings=rows,
                                     feature_names=[a.candidate_key, a.history_key])
            for a, rows in ((item, 10), (category, 3))}


@pytest.mark.parametrize("num_bits,tau", [(47, 2), (48, 5), (48, 7), (130, 5), (256, 4), (0, 1),
                                          (-48, 3), (2, 2), (80, 1), (128, 1)])
def test_invalid_bits_and_tau_raise(num_bits: int, tau: int) -> None:
    with pytest.raises(ValueError, match="num_bits"):
        SDIM(default_schema(), small_tables(), [4], TimeIntervalEmbedding(2),
             num_bits=num_bits, tau=tau)


@pytest.mark.parametrize("tau", [0, -3])
def test_non_positive_tau_raises(tau: int) -> None:
    with pytest.raises(ValueError, match=f"tau >= 1.*tau={tau}"):
        SDIM(default_schema(), small_tables(), [4], TimeIntervalEmbedding(2),
             num_bits=48, tau=tau)


@pytest.mark.parametrize("num_bits,tau", [(2, 1), (48, 3), (128, 4), (128, 64)])
def test_valid_bits_and_tau(num_bits: int, tau: int) -> None:
    sdim = SDIM(default_schema(), small_tables(), [4], TimeIntervalEmbedding(2),
                num_bits=num_bits, tau=tau)
    assert sdim.tau == tau and sdim.groups_per_word == num_bits // 2 // tau
    assert sdim.output_dim == 24


# ----------------------------------------------------------------------------- whole module

def make_model(seed: int = 0, data: SyntheticConfig = DATA, **overrides) -> LongSeqCTR:
    model = build_small_model("sdim", seed, data, **{**MODEL, **overrides})
    assert isinstance(sequence_of(model), SDIM)
    return model


def sequence_output(model: LongSeqCTR, batch: Batch) -> torch.Tensor:
    out, aux = model.sequence_arch(batch.features, batch.history_time, batch.request_time)
    assert aux == []
    return out


def split_lookup(kjt, key: str, history_lengths: List[int]
                 ) -> Tuple[List[List[int]], List[List[int]]]:
    """The ids sent under history key ``key``, per sample split into the long-term selection
    and the short-term window that follows it (the window is the last ``min(WINDOW, L)``
    behaviors of a history of ``L``)."""
    looked = per_sample(kjt[key].values(), kjt[key].lengths())
    assert len(looked) == len(history_lengths)
    windows = [min(WINDOW, n) for n in history_lengths]
    assert all(len(ids) >= w for ids, w in zip(looked, windows))
    return ([ids[:len(ids) - w] for ids, w in zip(looked, windows)],
            [ids[len(ids) - w:] for ids, w in zip(looked, windows)])


def dense_codes(model: LongSeqCTR, items: torch.Tensor, cats: torch.Tensor) -> List[List[int]]:
    """Hash each behavior's [e_item; e_category] from the embedding tables now (no code table):
    SimHash's block-diagonal projection, one word per block."""
    item_codes, category_codes = sequence_of(model).codes
    weights = model.embedding_collection.embeddings
    item_words = item_codes.derive(weights["item"].weight.detach()[items])
    cat_words = category_codes.derive(weights["category"].weight.detach()[cats])
    return torch.cat([item_words, cat_words], dim=1).tolist()


def reference_model_interest(model: LongSeqCTR, batch: Batch
                             ) -> Tuple[torch.Tensor, List[Dict[Tuple[int, int], Tuple[int, List[bool]]]]]:
    arch = sequence_of(model)
    f = batch.features
    weights = model.embedding_collection.embeddings
    item_w = weights["item"].weight.detach().double()
    cat_w = weights["category"].weight.detach().double()
    items = per_sample(f[HIST_ITEM].values(), f[HIST_ITEM].lengths())
    cats = per_sample(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths())
    targets = dense_codes(model, f[TARGET_ITEM].values(), f[TARGET_CATEGORY].values())
    refs, collisions = [], []
    for s, (its, cs) in enumerate(zip(items, cats)):
        i, c = torch.tensor(its, dtype=torch.long), torch.tensor(cs, dtype=torch.long)
        codes = dense_codes(model, i, c)
        vectors = torch.cat([item_w[i], cat_w[c]], dim=1)
        refs.append(reference_interest(vectors, codes, targets[s], arch.tau, arch.groups_per_word))
        collisions.append(expected_collisions(its, cs, codes, targets[s], arch.tau,
                                              arch.groups_per_word))
    return torch.stack(refs), collisions


@pytest.mark.parametrize("kernels,bits,tau", [
    ("auto", 48, 3), ("torch", 48, 3), ("auto", 32, 4), ("torch", 32, 4), ("auto", 128, 2),
    ("torch", 128, 2)])
def test_sdim_matches_dense_reference(kernels: str, bits: int, tau: int) -> None:
    """``kernels``: "auto" the compiled CPU collisions (the default), "torch" the torch ops."""
    model = set_kernel(make_model(sdim_bits=bits, sdim_tau=tau), kernels)
    arch = sequence_of(model)
    assert arch.groups_per_word == bits // 2 // tau
    model.eval()
    for index in ((0, 1) if (bits, tau) == (48, 3) else (0,)):
        batch = make_batch(index)
        out = sequence_output(model, batch)
        assert out.shape == (B, 6 * D)
        ref, collisions = reference_model_interest(model, batch)
        torch.testing.assert_close(out[:, 2 * D:4 * D].double(), ref, atol=ATOL, rtol=RTOL)
        # non-vacuous: some behaviors collide and some do not, and the interest is not zero
        lengths = batch.features[HIST_ITEM].lengths().tolist()
        assert all(sum(c for c, _ in col.values()) <= n for col, n in zip(collisions, lengths))
        if tau >= 3:
            assert any(sum(c for c, _ in col.values()) < n for col, n in zip(collisions, lengths))
        assert sum(len(col) for col in collisions) > B
        assert ref.abs().sum(1).gt(0).sum() > B // 2


def test_reference_sees_a_wrong_group_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above depends on the exact groups: reading group g at bit ``tau g + 1``
    instead changes the interest."""
    model = make_model()
    model.eval()
    batch = make_batch()
    out = sequence_output(model, batch)[:, 2 * D:4 * D].double()
    assert (sequence_of(model).tau, sequence_of(model).groups_per_word) == (3, 8)
    monkeypatch.setattr(sys.modules[__name__], "group_bits",
                        lambda word, group, t: ((word & MASK64) >> (t * group + 1)) & ((1 << t) - 1))
    shifted, _ = reference_model_interest(model, batch)
    assert not torch.allclose(out, shifted, atol=1e-3)


@pytest.mark.parametrize("bits,tau", [(48, 3), (48, 6)])
def test_lookup_is_distinct_colliding_behaviors_and_gradients_reach_exactly_them(
    kernels: str, bits: int, tau: int
) -> None:
    data = SyntheticConfig(min_seq_len=200, max_seq_len=200, num_users=1000, num_items=1000,
                           num_categories=10, subclusters=10)
    model = set_kernel(make_model(data=data, sdim_bits=bits, sdim_tau=tau), kernels)
    model.train()
    batch = make_batch(data=data, batch_size=8)
    f = batch.features
    items = per_sample(f[HIST_ITEM].values(), f[HIST_ITEM].lengths())
    cats = per_sample(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths())
    _, collisions = reference_model_interest(model, batch)

    seen = capture(model.embedding_collection)
    out = sequence_output(model, batch)
    assert len(seen) == 1  # one lookup: target, distinct colliding behaviors, recent window
    kjt = seen[0]
    assert kjt[TARGET_ITEM].values().tolist() == f[TARGET_ITEM].values().tolist()
    # under each history key, per sample: the distinct colliding behaviors, then the window
    assert kjt[HIST_ITEM].lengths().tolist() == [len(c) + min(WINDOW, len(h))
                                                 for c, h in zip(collisions, items)]
    history_lengths = [len(h) for h in items]
    looked_items, short_items = split_lookup(kjt, HIST_ITEM, history_lengths)
    looked_cats, short_cats = split_lookup(kjt, HIST_CATEGORY, history_lengths)
    for s in range(len(items)):
        pairs = list(zip(looked_items[s], looked_cats[s]))
        assert len(set(pairs)) == len(pairs)  # each distinct behavior once
        assert set(pairs) == set(collisions[s])  # exactly the colliding ones
        assert len(pairs) <= len(set(items[s])) < len(items[s])  # <= distinct items < L
    assert short_items == [h[-WINDOW:] for h in items]
    assert short_cats == [h[-WINDOW:] for h in cats]

    # gradient of each sample's sequence output alone (no over-arch ReLUs that could be dead)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    weights = model.embedding_collection.embeddings
    tables = [weights["item"].weight, weights["category"].weight]
    targets = (f[TARGET_ITEM].values().tolist(), f[TARGET_CATEGORY].values().tolist())
    left_out = 0
    for s in range(len(items)):
        item_grad, cat_grad = torch.autograd.grad(out[s] @ upstream[s], tables, retain_graph=True)
        assert torch.isfinite(item_grad).all() and torch.isfinite(cat_grad).all()
        colliding_items = {i for i, _ in collisions[s]}
        expected_items = {targets[0][s]} | colliding_items | set(items[s][-WINDOW:])
        expected_cats = ({targets[1][s]} | {c for _, c in collisions[s]}
                         | set(cats[s][-WINDOW:]))
        assert nonzero_rows(item_grad) == expected_items, s
        assert nonzero_rows(cat_grad) == expected_cats, s
        # non-vacuous: behaviors reached only through a collision, and behaviors not reached
        assert colliding_items - set(items[s][-WINDOW:]) - {targets[0][s]}
        left_out += len(set(items[s]) - expected_items)
    assert left_out > 20


def test_repeated_behaviors_are_merged_with_their_count(kernels: str) -> None:
    """The same item 5 times weighs 5 times in its buckets but is looked up once."""
    model = set_kernel(make_model(), kernels)
    model.eval()
    hist_items = [[7, 7, 7, 7, 7, 300], [], [7]]
    hist_cats = [[0, 0, 0, 0, 0, 3], [], [0]]
    features = make_features(hist_items, hist_cats, [7, 8, 7], [0, 0, 0])
    history_time = torch.arange(7, dtype=torch.long)
    request_time = torch.full((3,), 10**6, dtype=torch.long)
    seen = capture(model.embedding_collection)
    out, aux = model.sequence_arch(features, history_time, request_time)
    assert aux == []
    # the target is item 7 itself: it collides in every signature. Under hist_item each sample
    # sends its long-term selection, then its window (the last WINDOW behaviors)
    long_items, short_items = split_lookup(seen[0], HIST_ITEM, [len(h) for h in hist_items])
    assert len(long_items[0]) in (1, 2)
    assert sum(ids.count(7) for ids in long_items) == 2  # once per sample holding it
    assert short_items == [h[-WINDOW:] for h in hist_items]
    batch = Batch(features=features, history_time=history_time, request_time=request_time,
                  labels=torch.zeros(3), relevant=torch.zeros(7, dtype=torch.bool))
    ref, collisions = reference_model_interest(model, batch)
    assert collisions[0][(7, 0)][0] == 5
    torch.testing.assert_close(out[:, 2 * D:4 * D].double(), ref, atol=ATOL, rtol=RTOL)
    assert torch.equal(out[1, 2 * D:4 * D], torch.zeros(2 * D))  # empty history
    assert torch.isfinite(out).all()
