"""ETA's SimHash search inside a model: the signature table follows the item embeddings.

The table is checked against hashing the current item table independently (the retrieval
library's ``simhash_signatures`` on the weight, and a bit-by-bit Python reference), after the
initial build, after exact touched-row refreshes and in periodic mode. The "inference path"
(hash the full embeddings of all L behaviors on the fly, then retrieve, look up and attend with
plain indexing) must give the same retrieval and logits as the model's table-based path.
"""

from typing import List, Tuple

import pytest
import torch
from torchrec.fx import symbolic_trace

from helpers import (B, DATA, WINDOW, build_small_model, gsu_search, make_batch, per_sample, run,
                     sequence_of)
from torchrec_longseq.data.batch import (HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM,
                                         Batch)
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.modules.esu import SearchBasedInterest
from torchrec_longseq.modules.eta import SimHashSearch
from torchrec_longseq.retrieval.simhash import simhash_signatures, simhash_topk

K = 4
LR = 200.0  # item embeddings start at ~0.03 and get ~1e-4 gradients: move them visibly
MODEL = dict(k=K, num_heads=2, head_dim=4, hash_bits=64)  # on top of helpers.model_config


def make_model(seed: int = 0, refresh: bool = True, **overrides) -> LongSeqCTR:
    return build_small_model("eta", seed, refresh=refresh, **{**MODEL, **overrides})


def module_of(model: LongSeqCTR) -> SearchBasedInterest:
    module = sequence_of(model)
    assert isinstance(module, SearchBasedInterest)
    return module


def search_of(model: LongSeqCTR) -> SimHashSearch:
    search = module_of(model).search_unit
    assert isinstance(search, SimHashSearch)
    return search


def signatures_of(model: LongSeqCTR) -> ItemDerivedTable:
    table = search_of(model).signatures[0]  # index 0: the item block, 1: the category block
    assert table.source == "item"
    return table


def category_signatures_of(model: LongSeqCTR) -> ItemDerivedTable:
    table = search_of(model).signatures[1]
    assert table.source == "category"
    return table


def refresh_pending(model: LongSeqCTR) -> None:
    """What the next forward does first: re-derive the rows looked up by the training forwards
    since the last refresh (exact mode), or rebuild every ``refresh_every`` training forwards."""
    model.sequence_arch.refresh_pending()


def search(model: LongSeqCTR, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    search_of(model)  # (checks the GSU's type)
    return gsu_search(model, batch)


def projection_of(model: LongSeqCTR) -> torch.Tensor:
    return signatures_of(model).derive.projection


def item_weight(model: LongSeqCTR) -> torch.nn.Parameter:
    return model.embedding_collection.embeddings["item"].weight


def rehash(model: LongSeqCTR) -> torch.Tensor:
    """The signature table as it should be: the current item table hashed from scratch."""
    return simhash_signatures(item_weight(model).detach(), projection_of(model))


def sgd_step(model: LongSeqCTR, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
    logits = run(model, batch)
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    optimizer.step()


def stale_rows(model: LongSeqCTR) -> List[int]:
    return (signatures_of(model).table != rehash(model)).any(1).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------- initial build

def test_refreshed_table_equals_hashing_the_item_table() -> None:
    model = make_model(refresh=False)
    table = signatures_of(model).table
    assert table.shape == (DATA.num_items, 1) and table.dtype == torch.int64
    assert not table.any()  # nothing derived before the first refresh
    model.refresh_derived_tables()
    assert torch.equal(table, rehash(model))
    assert len(set(table.flatten().tolist())) > 0.9 * DATA.num_items  # really hashed

    # bit by bit in Python (float64 dot products), for a few rows
    weight = item_weight(model).detach().double().tolist()
    projection = projection_of(model).double()
    assert projection.shape == (8, 64)
    h = projection.tolist()
    unsure = 0
    for row in (0, 1, 17, 500, 999):
        word = table[row, 0].item()
        for i in range(64):
            dot = sum(weight[row][j] * h[j][i] for j in range(8))
            if abs(dot) < 1e-6:  # float32 vs float64 could disagree on the sign
                unsure += 1
                continue
            assert (word >> i) & 1 == int(dot > 0), (row, i, dot)
    assert unsure <= 2


# ----------------------------------------------------------------------------- exact refresh

def test_touched_row_refresh_keeps_the_table_exact() -> None:
    model = make_model()
    model.train()
    optimizer = torch.optim.SGD([item_weight(model)], lr=LR)  # only looked-up rows change
    table = signatures_of(model).table
    changed = 0
    for step in range(1, 4):
        before = table.clone()
        sgd_step(model, make_batch(step), optimizer)
        assert stale_rows(model)  # the step moved signatures: the table is behind until refreshed
        refresh_pending(model)
        assert torch.equal(table, rehash(model))
        changed += int((table != before).any(1).sum())
    assert changed > 20  # non-vacuous: many signatures did change


def test_untouched_rows_are_not_tracked() -> None:
    """The contract: only rows the forward looked up are re-hashed. A row changed behind the
    model's back (never looked up) stays stale until a full refresh."""
    model = make_model()
    model.train()
    batch = make_batch()
    f = batch.features
    in_batch = set(f[HIST_ITEM].values().tolist()) | set(f[TARGET_ITEM].values().tolist())
    outside = min(set(range(DATA.num_items)) - in_batch)
    optimizer = torch.optim.SGD([item_weight(model)], lr=LR)
    old = signatures_of(model).table[outside].clone()
    sgd_step(model, batch, optimizer)
    with torch.no_grad():
        item_weight(model)[outside] *= -1  # flips every bit with a nonzero projection
    refresh_pending(model)
    assert stale_rows(model) == [outside]
    assert torch.equal(signatures_of(model).table[outside], old)
    model.refresh_derived_tables()  # a full refresh repairs it
    assert stale_rows(model) == []


def test_traced_training_forward_still_records_touched_rows() -> None:
    model = make_model()
    model.train()
    traced = symbolic_trace(model)
    optimizer = torch.optim.SGD([item_weight(model)], lr=LR)
    sgd_step(traced, make_batch(5), optimizer)
    assert stale_rows(model)
    refresh_pending(model)
    assert stale_rows(model) == []


def test_eval_forward_records_nothing() -> None:
    model = make_model()
    model.eval()
    batch = make_batch()
    run(model, batch)
    target = batch.features[TARGET_ITEM].values()[0]
    with torch.no_grad():
        item_weight(model)[target] *= -1
    refresh_pending(model)  # no training step happened: nothing to re-hash
    assert stale_rows(model) == [int(target)]


# ----------------------------------------------------------------------------- periodic refresh

def test_periodic_refresh_rebuilds_every_n_steps() -> None:
    model = make_model(refresh_every=3)
    model.train()
    table = signatures_of(model).table
    g = torch.Generator().manual_seed(0)
    for step in range(1, 7):
        run(model, make_batch(step))  # training forwards do not matter in periodic mode
        with torch.no_grad():  # change 50 random rows, looked up or not
            rows = torch.randperm(DATA.num_items, generator=g)[:50]
            item_weight(model)[rows] = torch.randn(50, 8, generator=g)
        before = table.clone()
        assert stale_rows(model)
        refresh_pending(model)
        if step % 3 == 0:
            assert torch.equal(table, rehash(model)), step
        else:
            assert torch.equal(table, before), step
            assert stale_rows(model), step


def test_refresh_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh_every"):
        make_model(refresh=False, refresh_every=0)


# ----------------------------------------------------------------------------- inference path

def hamming_reference(a: List[int], b: List[int]) -> int:
    return sum(bin((x ^ y) & (2**64 - 1)).count("1") for x, y in zip(a, b))


def on_the_fly_retrieval(model: LongSeqCTR, batch: Batch, k: int
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hash the full embeddings of every behavior and target now (no signature table), then
    retrieve: once with ``simhash_topk``, once with a Python loop; both must agree."""
    f = batch.features
    weight, projection = item_weight(model).detach(), projection_of(model)
    cat_weight = model.embedding_collection.embeddings["category"].weight.detach()
    cat_projection = category_signatures_of(model).derive.projection
    # the behavior embedding [item; category] hashed with diag(H_item, H_category)
    hist = torch.cat([simhash_signatures(weight[f[HIST_ITEM].values()], projection),
                      simhash_signatures(cat_weight[f[HIST_CATEGORY].values()], cat_projection)], 1)
    target = torch.cat([simhash_signatures(weight[f[TARGET_ITEM].values()], projection),
                        simhash_signatures(cat_weight[f[TARGET_CATEGORY].values()], cat_projection)], 1)
    indices, lengths = simhash_topk(hist, f[HIST_ITEM].offsets(), target, k)

    expected, start = [], 0
    for b, n in enumerate(f[HIST_ITEM].lengths().tolist()):
        dist = [hamming_reference(hist[start + p].tolist(), target[b].tolist()) for p in range(n)]
        order = sorted(range(n), key=lambda p: (dist[p], -p))[:k]
        expected.append([start + p for p in order])
        start += n
    assert per_sample(indices, lengths) == expected
    return indices, lengths


def plain_forward(model: LongSeqCTR, batch: Batch, indices: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """The model's computation with plain indexing of the weights: no KJT, no EmbeddingCollection,
    per-sample Python for the recent window and the time intervals."""
    f = batch.features
    seq = module_of(model)
    bags = model.sparse_arch.embedding_bags
    items = model.embedding_collection.embeddings["item"].weight
    cats = model.embedding_collection.embeddings["category"].weight
    hist_item, hist_cat = f[HIST_ITEM].values(), f[HIST_CATEGORY].values()

    def rows(positions: List[int]) -> torch.Tensor:
        p = torch.tensor(positions, dtype=torch.long)
        return torch.cat([items[hist_item[p]], cats[hist_cat[p]]], dim=1)

    def offsets(counts: List[int]) -> torch.Tensor:
        return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.long)

    owner, recent, recent_counts, start = [], [], [], 0
    for b, n in enumerate(f[HIST_ITEM].lengths().tolist()):
        owner += [b] * n
        window = list(range(start + max(n - WINDOW, 0), start + n))
        recent += window
        recent_counts.append(len(window))
        start += n

    def intervals(positions: List[int]) -> torch.Tensor:
        return torch.tensor([int(batch.request_time[owner[p]]) - int(batch.history_time[p])
                             for p in positions], dtype=torch.long)

    retrieved = indices.tolist()
    pooled = torch.cat([bags["user"].weight[f["user_id"].values()],
                        bags["hour"].weight[f["context_hour"].values()]], dim=1)
    target = torch.cat([items[f[TARGET_ITEM].values()], cats[f[TARGET_CATEGORY].values()]], 1)
    long_term = seq.esu(target, rows(retrieved), offsets(lengths.tolist()), intervals(retrieved))
    # ETA's short-term branch: multi-head target attention of its own over the window
    short_term = seq.short_term(target, rows(recent), offsets(recent_counts), intervals(recent))
    return model.over_arch(torch.cat([pooled, target, long_term, short_term], dim=1)).squeeze(1)


def test_inference_path_equals_training_path() -> None:
    model = make_model()
    model.train()
    initial = signatures_of(model).table.clone()
    optimizer = torch.optim.SGD([item_weight(model)], lr=LR)  # move the table, keep the rest
    for step in range(1, 4):  # train with exact refreshes, so the table has moved
        sgd_step(model, make_batch(10 + step), optimizer)
        refresh_pending(model)
    assert (signatures_of(model).table != initial).any(1).sum() > 20
    model.eval()
    for batch in (make_batch(0), make_batch(1)):
        indices, lengths = on_the_fly_retrieval(model, batch, K)
        found, found_lengths = search(model, batch)
        assert torch.equal(found, indices) and torch.equal(found_lengths, lengths)
        torch.testing.assert_close(run(model, batch), plain_forward(model, batch, indices, lengths))


def test_plain_forward_can_tell_a_wrong_retrieval() -> None:
    """The logit comparison above is sensitive to which behaviors were retrieved."""
    model = make_model()
    model.eval()
    batch = make_batch()
    indices, lengths = on_the_fly_retrieval(model, batch, K)
    offsets = torch.tensor([0] + batch.features[HIST_ITEM].lengths().cumsum(0).tolist())
    first = torch.cat([torch.arange(int(offsets[b]), int(offsets[b]) + int(n))
                       for b, n in enumerate(lengths.tolist())])  # the oldest instead
    assert not torch.equal(first, indices)
    assert not torch.allclose(run(model, batch), plain_forward(model, batch, first, lengths))


# ----------------------------------------------------------------------------- state_dict

def test_state_dict_carries_table_and_projection() -> None:
    model = make_model()
    with torch.no_grad():  # a projection other than the default seed's
        projection_of(model).copy_(
            torch.randn(8, 64, generator=torch.Generator().manual_seed(9)))
    model.refresh_derived_tables()  # a new projection needs a full rebuild
    model.train()
    optimizer = torch.optim.SGD([item_weight(model)], lr=LR)
    sgd_step(model, make_batch(1), optimizer)
    refresh_pending(model)
    state = model.state_dict()
    table = signatures_of(model).table
    prefix = "sequence_arch.sequences.history.search_unit.signatures.0"
    assert torch.equal(state[f"{prefix}.table"], table)
    assert torch.equal(state[f"{prefix}.derive.projection"], projection_of(model))

    fresh = make_model(seed=1)
    batch = make_batch(2)
    model.eval()
    fresh.eval()
    assert not torch.equal(signatures_of(fresh).table, signatures_of(model).table)
    assert not torch.allclose(run(fresh, batch), run(model, batch))
    fresh.load_state_dict(state)
    assert torch.equal(projection_of(fresh), projection_of(model))
    assert torch.equal(run(fresh, batch), run(model, batch))  # no refresh needed
    fresh.refresh_derived_tables()  # and the loaded table is what the loaded weights hash to
    assert torch.equal(signatures_of(fresh).table, signatures_of(model).table)


# ----------------------------------------------------------------------------- widths

@pytest.mark.parametrize("num_bits", [32, 64, 128])
def test_signature_widths_work_end_to_end(num_bits: int) -> None:
    model = make_model(hash_bits=num_bits)
    table = signatures_of(model).table
    words = (num_bits + 63) // 64
    assert table.shape == (DATA.num_items, words)
    assert projection_of(model).shape == (8, num_bits)
    assert torch.equal(table, rehash(model))
    if num_bits == 32:
        assert ((table >= 0) & (table < 2**32)).all()  # high half of the word stays 0
    else:
        assert (table < 0).any()  # bit 63 is used
    model.train()
    batch = make_batch()
    logits = run(model, batch)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    model.eval()
    indices, lengths = on_the_fly_retrieval(model, batch, K)
    found, found_lengths = search(model, batch)
    assert torch.equal(found, indices) and torch.equal(found_lengths, lengths)


def test_invalid_signature_width_raises() -> None:
    with pytest.raises(ValueError, match="96"):
        make_model(refresh=False, hash_bits=96)


@pytest.mark.parametrize("bad", [2**31, 2**40, -1, -(2**40)])
def test_unchecked_ids_outside_the_tables_raise(bad: int, kernels: str) -> None:
    """A batch that skipped ``check_batch`` with a history id outside the item table raises an
    error naming the position (the compiled scan used to read out of bounds; 2^31 segfaulted)."""
    from torchrec import KeyedJaggedTensor
    from torchrec_longseq import set_kernel
    from torchrec_longseq.retrieval import extension
    model = set_kernel(build_small_model("eta"), kernels)
    batch = make_batch()
    keys = batch.features.keys()
    values = batch.features.values().clone()
    lengths = batch.features.lengths().view(len(keys), -1)
    start = int(lengths[:keys.index(HIST_ITEM)].sum())
    values[start + 3] = bad
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=batch.features.lengths())
    kernel_error = (RuntimeError, f"item ids at position 3 is {bad}, outside the table")
    compiled = kernels == "auto" and extension.compiler() is not None  # else the torch ops
    error, match = kernel_error if compiled else (IndexError, "out of (range|bounds)")
    with pytest.raises(error, match=match):
        model(kjt, batch.history_time, batch.request_time)
