"""The compiled CPU Hamming top-k equals the torch-ops ``simhash_topk`` (and so brute force,
which tests/retrieval/test_simhash.py checks ``simhash_topk`` against)."""

import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq.retrieval import kernels, simhash


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=0, max_size=6),
    words=st.sampled_from([1, 2]),
    num_items=st.integers(1, 30),
    k=st.integers(0, 45),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_torch_ops(lengths, words: int, num_items: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(-(2**63), 2**63 - 1, (num_items, words), generator=g)
    # few distinct bit patterns in the low bits -> many distance ties
    table = table & torch.randint(0, 2**6, (num_items, words), generator=g)
    offsets = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())
    items = torch.randint(0, num_items, (int(offsets[-1]),), generator=g)
    targets = table[torch.randint(0, num_items, (len(lengths),), generator=g)]
    # second table: per-"category" signatures, a different id per behavior
    categories = table.flip(0)[: max(num_items // 2, 1)]
    cat_ids = items % categories.size(0)
    cat_targets = categories[torch.randint(0, categories.size(0), (len(lengths),), generator=g)]
    expected = simhash.simhash_topk(torch.cat([table[items], categories[cat_ids]], 1), offsets,
                                    torch.cat([targets, cat_targets], 1), k)
    found = kernels.hamming_topk_by_id(table, items, targets, categories, cat_ids, cat_targets,
                                       offsets, k)
    assert found is not None
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])


def test_kernel_uses_the_sign_bit() -> None:
    table = torch.tensor([[0], [-(2**63)], [1]])  # item 1 differs from item 0 in bit 63 only
    offsets = torch.tensor([0, 3])
    none = torch.zeros(1, 1, dtype=torch.long)  # a category table that adds distance 0
    indices, lengths = kernels.hamming_topk_by_id(table, torch.tensor([1, 2, 0]), table[:1], none,
                                                  torch.zeros(3, dtype=torch.long), none, offsets, 3)
    assert indices.tolist() == [2, 1, 0] and lengths.tolist() == [3]  # d = 1, 1, 0 -> 0, then 1s latest first


def test_disabled_kernel_returns_none(monkeypatch) -> None:
    monkeypatch.setenv("TORCHREC_LONGSEQ_KERNELS", "0")
    table = torch.zeros(2, 1, dtype=torch.long)
    ids = torch.tensor([0])
    assert kernels.hamming_topk_by_id(table, ids, table[:1], table, ids, table[:1],
                                      torch.tensor([0, 1]), 1) is None
