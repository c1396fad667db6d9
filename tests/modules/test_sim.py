"""SIM's searches (hard, soft with its auxiliary task) and the search-then-attend module.

References are independent of the package's jagged helpers: per-sample Python loops over the
history (hard search), dense float64 scores from the table weights (soft search), a padded
dense softmax (the auxiliary input). Whole models are built with ``build_model`` to check what
reaches the main EmbeddingCollection (ids and gradients), empty retrievals, and fx tracing.
"""

import copy
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.fx import symbolic_trace

from helpers import (B, DATA, WINDOW, build_small_model, capture, make_batch, make_features,
                     nonzero_rows, per_sample, sequence_of, with_histories)
from torchrec_longseq.data.batch import (HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM,
                                         Batch)
from torchrec_longseq.data.synthetic import SyntheticConfig
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.modules.esu import ExactSearchUnit
from torchrec_longseq.modules.sim import HardSearch, SoftSearch, soft_search_tables
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.schema import default_schema

K = 4
SEARCH_MODELS = ["sim-hard", "sim-soft", "eta"]
SETTINGS = settings(max_examples=40, deadline=None)
MODEL = dict(k=K, num_heads=2, head_dim=4, search_dim=4)  # on top of helpers.model_config


# ----------------------------------------------------------------------------- helpers

def make_model(name: str, seed: int = 0, data: SyntheticConfig = DATA, **overrides) -> LongSeqCTR:
    return build_small_model(name, seed, data, **{**MODEL, **overrides})


def run(model: LongSeqCTR, batch: Batch) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Logits and the list of auxiliary outputs (``[aux]`` for SIM soft, else ``[]``), unlike
    ``helpers.run``."""
    return model(batch.features, batch.history_time, batch.request_time)


def hard_search(k: int) -> HardSearch:
    return HardSearch(default_schema(), k)


def no_grad(param: torch.nn.Parameter) -> bool:
    return param.grad is None or not param.grad.any()


# ----------------------------------------------------------------------------- hard search

def hard_reference(hist_cats: List[List[int]], target_cats: List[int], k: int
                   ) -> Tuple[List[List[int]], List[int]]:
    """Per sample: global positions of the k most recent behaviors of the target's category,
    chronological; and their counts."""
    out, counts, start = [], [], 0
    for cats, target in zip(hist_cats, target_cats):
        matches = [start + p for p, c in enumerate(cats) if c == target]
        chosen = matches[max(len(matches) - k, 0):] if k > 0 else []
        out.append(chosen)
        counts.append(len(chosen))
        start += len(cats)
    return out, counts


def test_hard_search_hand_example() -> None:
    # sample 0: categories 1 2 1 1 2 1, target 1, k = 2 -> the last two 1s: positions 3, 5
    # sample 1: empty history
    # sample 2: 3 3, target 0 -> no match
    # sample 3: 0 1, target 1, k = 2 > 1 match -> position 6 + 1 = 7
    features = make_features([[10, 20, 11, 12, 21, 13], [], [30, 31], [0, 14]],
                             [[1, 2, 1, 1, 2, 1], [], [3, 3], [0, 1]],
                             [15, 16, 0, 17], [1, 1, 0, 1])
    indices, lengths, aux = hard_search(2).search(features, None, None)
    assert indices.tolist() == [3, 5, 9]
    assert lengths.tolist() == [2, 0, 0, 1]
    assert aux is None


@pytest.mark.parametrize("k", [1, 3, 1000])
def test_hard_search_matches_loop_on_generated_batch(k: int) -> None:
    batch = make_batch()
    f = batch.features
    cats = per_sample(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths())
    targets = f[TARGET_CATEGORY].values().tolist()
    indices, lengths, _ = hard_search(k).search(f, None, None)
    expected, counts = hard_reference(cats, targets, k)
    assert per_sample(indices, lengths) == expected
    assert lengths.tolist() == counts
    all_matches = [sum(c == t for c in h) for h, t in zip(cats, targets)]
    if k == 1000:
        assert all(len(h) < k for h in cats)  # k > L for every sample
        assert counts == all_matches
    else:
        assert any(m > k for m in all_matches)  # the cut to k is exercised
    # the selection is the target's category, and the most recent of them
    hist = f[HIST_CATEGORY].values()
    assert (hist[indices] == torch.repeat_interleave(f[TARGET_CATEGORY].values(), lengths)).all()


@SETTINGS
@given(
    hist_cats=st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=12), min_size=0,
                       max_size=6),
    data=st.data(),
    k=st.integers(0, 15),
)
def test_hard_search_matches_loop_random(hist_cats: List[List[int]], data, k: int) -> None:
    # target category 4 never occurs in a history: "no match"
    targets = data.draw(st.lists(st.integers(0, 4), min_size=len(hist_cats),
                                 max_size=len(hist_cats)))
    items = [[7] * len(h) for h in hist_cats]
    features = make_features(items, hist_cats, [0] * len(targets), targets)
    indices, lengths, _ = hard_search(k).search(features, None, None)
    expected, counts = hard_reference(hist_cats, targets, k)
    assert per_sample(indices, lengths) == expected
    assert lengths.tolist() == counts


# ----------------------------------------------------------------------------- soft search

def search_table(num_items: int, dim: int) -> EmbeddingCollection:
    """An item-only search space (table ``search_item``) over the item table of ``num_items``
    rows: serves the user's own keys ``target_item`` and ``hist_item``."""
    items = EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=num_items,
                            feature_names=[TARGET_ITEM, HIST_ITEM])
    table = soft_search_tables(default_schema(), {"item": items}, dim, history_keys=[HIST_ITEM])
    assert [(c.name, c.feature_names, c.num_embeddings) for c in table.embedding_configs()] == [
        ("search_item", [TARGET_ITEM, HIST_ITEM], num_items)]
    return table


def soft_search(num_items: int, dim: int, projection_dim: int, k: int,
                aux_hidden: List[int]) -> SoftSearch:
    return SoftSearch(default_schema(), search_table(num_items, dim), projection_dim, k,
                      aux_hidden)


def with_category(search: SoftSearch) -> bool:
    """Whether the search space has the category table next to the item's."""
    return "search_category" in search.search_table.embeddings


def table_weight(search: SoftSearch) -> torch.nn.Parameter:
    return search.search_table.embeddings["search_item"].weight


def search_vector(search: SoftSearch, item: int, category: int) -> torch.Tensor:
    """``u``: the item's search embedding, and its category's when the search has that table."""
    u = table_weight(search).detach().double()[item]
    if with_category(search):
        cat = search.search_table.embeddings["search_category"].weight.detach().double()
        u = torch.cat([u, cat[category]])
    return u


def soft_reference(search: SoftSearch, hist_items: List[List[int]], target_items: List[int],
                   hist_cats: Optional[List[List[int]]] = None,
                   target_cats: Optional[List[int]] = None,
                   ) -> Tuple[List[List[int]], List[List[float]]]:
    """Dense float64: per sample, every behavior's score ``(W_b u_i) . (W_a u_a)`` (a function
    of the item (and category) id, so repeated items tie exactly) and the top-k positions
    (global), best first, ties to the later position."""
    hist_cats = hist_cats or [[0] * len(h) for h in hist_items]
    target_cats = target_cats or [0] * len(target_items)
    wa, wb = search.w_a.weight.detach().double(), search.w_b.weight.detach().double()
    chosen, all_scores, start = [], [], 0
    for items, cats, target, target_cat in zip(hist_items, hist_cats, target_items, target_cats):
        query = wa @ search_vector(search, target, target_cat)
        scores = [float((wb @ search_vector(search, i, c)) @ query) for i, c in zip(items, cats)]
        order = sorted(range(len(items)), key=lambda p: (-scores[p], -p))
        chosen.append([start + p for p in order[:search.k]])
        all_scores.append(scores)
        start += len(items)
    return chosen, all_scores


def aux_reference(search: SoftSearch, hist_items: List[List[int]], target_items: List[int],
                  hist_cats: Optional[List[List[int]]] = None,
                  target_cats: Optional[List[int]] = None) -> torch.Tensor:
    """Padded dense float64: softmax of each sample's scores (-inf padding, empty -> 0),
    weighted sum of the search vectors, concatenated with the target's, the same aux MLP."""
    hist_cats = hist_cats or [[0] * len(h) for h in hist_items]
    target_cats = target_cats or [0] * len(target_items)
    _, scores = soft_reference(search, hist_items, target_items, hist_cats, target_cats)
    width = search.w_a.weight.size(1)
    b, longest = len(target_items), max([len(h) for h in hist_items] + [1])
    padded = torch.full((b, longest), float("-inf"), dtype=torch.float64)
    emb = torch.zeros(b, longest, width, dtype=torch.float64)
    for s, (items, cats, sc) in enumerate(zip(hist_items, hist_cats, scores)):
        padded[s, :len(sc)] = torch.tensor(sc, dtype=torch.float64)
        for p, (i, c) in enumerate(zip(items, cats)):
            emb[s, p] = search_vector(search, i, c)
    weights = torch.softmax(padded, dim=1).nan_to_num(0.0)  # an all -inf row (L = 0) -> 0
    pooled = (weights.unsqueeze(2) * emb).sum(1)
    targets = torch.stack([search_vector(search, t, c) for t, c in zip(target_items, target_cats)])
    aux = copy.deepcopy(search.aux).double()
    return aux(torch.cat([pooled, targets], 1)).squeeze(1)


@pytest.fixture(scope="module")
def integer_soft_search() -> SoftSearch:
    """Integer weights: every score is an exact small integer in float32, so ties are exact
    (between repeated items and between different items) and compare exactly to the reference."""
    torch.manual_seed(0)
    search = soft_search(6, 3, projection_dim=2, k=3, aux_hidden=[4])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        table_weight(search).copy_(torch.randint(-2, 3, (6, 3), generator=g).float())
        search.w_a.weight.copy_(torch.randint(-1, 2, (2, 3), generator=g).float())
        search.w_b.weight.copy_(torch.randint(-1, 2, (2, 3), generator=g).float())
    return search


def test_soft_search_hand_example() -> None:
    # 1-d search space, W_a = W_b = 1: score = e_i * e_a. e = [0, 1, 2, -1], target item 1.
    search = soft_search(4, 1, projection_dim=1, k=2, aux_hidden=[2])
    with torch.no_grad():
        table_weight(search).copy_(torch.tensor([[0.0], [1.0], [2.0], [-1.0]]))
        search.w_a.weight.fill_(1.0)
        search.w_b.weight.fill_(1.0)
    # sample 0 scores: items 3 1 2 1 0 -> -1 1 2 1 0: best 2 (pos 2), then the tie 1: pos 3
    # sample 1 empty; sample 2: items 0 0 -> scores 0 0, k = 2 keeps both, later first: 6, 5
    features = make_features([[3, 1, 2, 1, 0], [], [0, 0]], [[0] * 5, [], [0, 0]],
                             [1, 1, 1], [0, 0, 0])
    indices, lengths, aux = search.search(features, None, None)
    assert indices.tolist() == [2, 3, 6, 5]
    assert lengths.tolist() == [2, 0, 2]
    assert aux.shape == (3,) and torch.isfinite(aux).all()


@SETTINGS
@given(
    hist_items=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=10), min_size=1,
                        max_size=5),
    data=st.data(),
    k=st.integers(0, 12),
)
def test_soft_search_matches_dense_reference_with_exact_ties(
    integer_soft_search: SoftSearch, hist_items: List[List[int]], data, k: int
) -> None:
    search = integer_soft_search
    search.k = k
    targets = data.draw(st.lists(st.integers(0, 5), min_size=len(hist_items),
                                 max_size=len(hist_items)))
    features = make_features(hist_items, [[0] * len(h) for h in hist_items], targets,
                             [0] * len(targets))
    indices, lengths, aux = search.search(features, None, None)
    expected, _ = soft_reference(search, hist_items, targets)
    assert per_sample(indices, lengths) == expected
    torch.testing.assert_close(aux.double(), aux_reference(search, hist_items, targets),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def float_soft_search() -> SoftSearch:
    """Float weights in a 16-wide projection: scores are not integers, so whether two copies of
    one item tie exactly depends on the arithmetic (a matmul rounds by column position)."""
    torch.manual_seed(3)
    search = soft_search(5, 8, projection_dim=16, k=4, aux_hidden=[4])
    with torch.no_grad():
        search.w_a.weight.normal_()
        search.w_b.weight.normal_()
    return search


@SETTINGS
@given(history=st.lists(st.integers(0, 4), min_size=0, max_size=80),
       candidates=st.lists(st.integers(0, 4), min_size=1, max_size=20))
def test_soft_search_request_keeps_the_latest_copy_of_a_repeated_item(
        float_soft_search: SoftSearch, history: List[int], candidates: List[int]) -> None:
    """The serving search (one history, C candidates) against the dense float64 reference:
    histories of repeated items at every position up to 80 (past a BLAS kernel's tile edges),
    where copies of one item must tie exactly and the later copy be kept."""
    search = float_soft_search
    _, scores = soft_reference(search, [history] * len(candidates), candidates)
    for sc in scores:  # different items far apart (float32 vs float64 order), copies equal
        distinct = sorted(set(round(v, 9) for v in sc), reverse=True)
        assert all(a - b > 1e-4 for a, b in zip(distinct, distinct[1:])), distinct
    positions, lengths = search.search_request(
        {HIST_ITEM: torch.tensor(history, dtype=torch.long)},
        {TARGET_ITEM: torch.tensor(candidates, dtype=torch.long)},
        torch.zeros(len(history)))
    expected = [sorted(range(len(sc)), key=lambda p: (-sc[p], -p))[:search.k] for sc in scores]
    assert per_sample(positions, lengths) == expected


def test_soft_search_matches_dense_reference_on_model() -> None:
    model = make_model("sim-soft")
    search = sequence_of(model).search_unit
    assert isinstance(search, SoftSearch) and search.k == K
    batch = make_batch()
    f = batch.features
    items = per_sample(f[HIST_ITEM].values(), f[HIST_ITEM].lengths())
    targets = f[TARGET_ITEM].values().tolist()
    cats = per_sample(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths())
    target_cats = f[TARGET_CATEGORY].values().tolist()
    # the model's search space: item and category tables, in schema order
    assert with_category(search)
    assert search.history_keys == [HIST_ITEM, HIST_CATEGORY]
    assert search.candidate_keys == [TARGET_ITEM, TARGET_CATEGORY]
    indices, lengths, aux = search.search(f, batch.history_time, batch.request_time)
    expected, scores = soft_reference(search, items, targets, cats, target_cats)
    # float32 vs float64 scores: the order is only comparable where two different items are
    # farther apart than float32 error; make sure no such near-tie decides this batch's top k
    for sc in scores:
        best = sorted(set(sc), reverse=True)[:K + 1]  # the distinct values the top k reads
        scale = max(abs(v) for v in sc)
        assert all(a - b > 1e-4 * scale for a, b in zip(best, best[1:])), best
    assert any(len(set(h)) < len(h) for h in items)  # repeated items: exact ties do happen
    assert per_sample(indices, lengths) == expected
    torch.testing.assert_close(aux.double(), aux_reference(search, items, targets, cats, target_cats),
                               rtol=1e-4, atol=1e-5)
    _, model_aux = run(model, batch)
    assert len(model_aux) == 1
    torch.testing.assert_close(model_aux[0], aux)


def test_soft_search_aux_loss_trains_the_whole_search_space() -> None:
    model = make_model("sim-soft")
    search = sequence_of(model).search_unit
    full = make_batch()
    lengths = full.features[HIST_ITEM].lengths().tolist()
    keep = [0 if b == 5 else n for b, n in enumerate(lengths)]
    batch = with_histories(full, keep)  # one empty history among full ones
    f = batch.features
    logits, aux_list = run(model, batch)
    (aux,) = aux_list

    # the main logit does not depend on the search space (the top-k choice takes no gradient)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward(
        retain_graph=True)
    for param in search.parameters():
        assert no_grad(param)
    assert not no_grad(model.embedding_collection.embeddings["item"].weight)

    model.zero_grad(set_to_none=True)
    torch.nn.functional.binary_cross_entropy_with_logits(aux, batch.labels).backward()
    # every behavior of every sample (not only the retrieved k) and every target gets a gradient
    expected = set(f[HIST_ITEM].values().tolist()) | set(f[TARGET_ITEM].values().tolist())
    assert nonzero_rows(table_weight(search).grad) == expected
    retrieved = set(f[HIST_ITEM].values()[search.search(f, None, None)[0]].tolist())
    assert len(expected - retrieved - set(f[TARGET_ITEM].values().tolist())) > 50
    assert search.w_a.weight.grad.abs().sum() > 0
    assert search.w_b.weight.grad.abs().sum() > 0
    # the auxiliary loss does not reach the main item table
    assert no_grad(model.embedding_collection.embeddings["item"].weight)


# ----------------------------------------------------------------------------- lookup volume

def ids_per_sample(kjt: KeyedJaggedTensor, keys: List[str]) -> List[int]:
    counts = None
    for key in keys:
        lengths = kjt[key].lengths().long()
        counts = lengths if counts is None else counts + lengths
    return counts.tolist()


@pytest.mark.parametrize("length", [100, 1000, 10000])
@pytest.mark.parametrize("name", SEARCH_MODELS)
def test_lookup_grows_with_k_not_with_history(name: str, length: int) -> None:
    data = SyntheticConfig(min_seq_len=length, max_seq_len=length, num_users=1000,
                           num_items=1000, num_categories=10, subclusters=10)
    k, window = 8, 5
    model = make_model(name, data=data, k=k, short_window=window)
    batch = make_batch(data=data, batch_size=4)
    assert batch.features[HIST_ITEM].lengths().tolist() == [length] * 4
    main = capture(model.embedding_collection)
    search = sequence_of(model).search_unit
    search_side = capture(search.search_table) if name == "sim-soft" else []
    logits, _ = run(model, batch)
    assert torch.isfinite(logits).all()
    assert len(main) == 1  # one lookup for candidate, retrieved and recent
    # the history keys carry the retrieved and the recent window, one after the other
    assert sorted(main[0].keys()) == sorted([TARGET_ITEM, HIST_ITEM, TARGET_CATEGORY,
                                             HIST_CATEGORY])
    items = ids_per_sample(main[0], [TARGET_ITEM, HIST_ITEM])
    categories = ids_per_sample(main[0], [TARGET_CATEGORY, HIST_CATEGORY])
    assert all(n <= k + window + 1 for n in items), items
    assert categories == items
    if name == "sim-hard":
        f = batch.features
        cats = per_sample(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths())
        targets = f[TARGET_CATEGORY].values().tolist()
        matches = [sum(c == t for c in h) for h, t in zip(cats, targets)]
        assert items == [1 + min(m, k) + window for m in matches]
    else:
        assert items == [1 + k + window] * 4  # L >= k: exactly k retrieved
    if name == "sim-soft":
        # documented: the small search table does see the whole history
        assert len(search_side) == 1
        assert search_side[0][HIST_ITEM].lengths().tolist() == [length] * 4


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", SEARCH_MODELS)
def test_main_table_gradients_reach_exactly_the_looked_up_rows(name: str) -> None:
    model = make_model(name)
    model.train()
    long = SyntheticConfig(min_seq_len=64, max_seq_len=64, num_users=1000, num_items=1000,
                           num_categories=10, subclusters=10)
    batch = make_batch(1, data=long)
    f = batch.features
    indices, lengths, _ = sequence_of(model).search_unit.search(f, batch.history_time,
                                                                batch.request_time)
    items = per_sample(f[HIST_ITEM].values(), f[HIST_ITEM].lengths())
    cats = per_sample(f[HIST_CATEGORY].values(), f[HIST_CATEGORY].lengths())
    assert min(len(h) for h in items) > K + WINDOW
    hist_items, hist_cats = f[HIST_ITEM].values(), f[HIST_CATEGORY].values()

    seen = capture(model.embedding_collection)
    over_input = {}
    def keep_input(module, inputs, output) -> None:
        over_input["x"] = inputs[0]

    hook = model.over_arch.register_forward_hook(keep_input)
    logits, _ = run(model, batch)
    hook.remove()
    # samples whose over-arch ReLUs are all dead at this random init pass no gradient at all
    alive = torch.autograd.grad(logits.sum(), over_input["x"], retain_graph=True)[0].abs().sum(1) > 0
    assert alive.sum() >= len(alive) // 2
    # what reached the lookup: target, and per sample under the history key the search's
    # retrieved positions followed by the last WINDOW
    assert len(seen) == 1
    retrieved_items = per_sample(hist_items[indices], lengths)
    retrieved_cats = per_sample(hist_cats[indices], lengths)
    assert seen[0][TARGET_ITEM].values().tolist() == f[TARGET_ITEM].values().tolist()
    assert seen[0][TARGET_CATEGORY].values().tolist() == f[TARGET_CATEGORY].values().tolist()
    assert per_sample(seen[0][HIST_ITEM].values(), seen[0][HIST_ITEM].lengths()) == [
        r + h[-WINDOW:] for r, h in zip(retrieved_items, items)]
    assert per_sample(seen[0][HIST_CATEGORY].values(), seen[0][HIST_CATEGORY].lengths()) == [
        r + c[-WINDOW:] for r, c in zip(retrieved_cats, cats)]

    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    used_items = (set(f[TARGET_ITEM].values().tolist()) | set(hist_items[indices].tolist())
                  | {i for h in items for i in h[-WINDOW:]})
    used_cats = (set(f[TARGET_CATEGORY].values().tolist()) | set(hist_cats[indices].tolist())
                 | {c for h in cats for c in h[-WINDOW:]})
    weights = model.embedding_collection.embeddings
    assert torch.isfinite(weights["item"].weight.grad).all()
    # only looked-up rows, and every row looked up by a sample that passes gradient
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    ids = {"item": (f[TARGET_ITEM].values(), hist_items, items),
           "category": (f[TARGET_CATEGORY].values(), hist_cats, cats)}
    for table, used in (("item", used_items), ("category", used_cats)):
        target, hist, per_b = ids[table]
        used_alive = set()
        for b in alive.nonzero().flatten().tolist():
            used_alive |= {int(target[b])} | set(per_b[b][-WINDOW:])
            used_alive |= set(hist[indices[offsets[b]:offsets[b + 1]]].tolist())
        reached = nonzero_rows(weights[table].weight.grad)
        assert reached <= used, reached - used
        assert used_alive <= reached, used_alive - reached
    # non-vacuous: most of the batch's history was never looked up
    assert len({i for h in items for i in h} - used_items) > 100


# ----------------------------------------------------------------------------- empty retrievals

def test_esu_of_zero_retrieved_behaviors_is_exactly_zero() -> None:
    torch.manual_seed(0)
    esu = ExactSearchUnit(6, TimeIntervalEmbedding(3, num_buckets=8), num_heads=2, head_dim=4)
    target = torch.randn(3, 6, requires_grad=True)
    behaviors = torch.randn(5, 6, requires_grad=True)
    intervals = torch.tensor([10, 100, 1000, 10**5, 10**7])
    out = esu(target, behaviors, torch.tensor([0, 2, 2, 5]), intervals)
    assert out.shape == (3, 8)
    assert torch.equal(out[1], torch.zeros(8))
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(target.grad).all() and torch.isfinite(behaviors.grad).all()
    assert torch.equal(target.grad[1], torch.zeros(6))  # nothing attended: no gradient

    empty = esu(target, behaviors[:0], torch.zeros(4, dtype=torch.long), intervals[:0])
    assert torch.equal(empty, torch.zeros(3, 8))

    # one behavior: softmax weight 1, so the output is W_v z with z = [e, time(dt)] (by hand)
    single = esu(target[:1], behaviors[:1], torch.tensor([0, 1]), intervals[:1])
    z = torch.cat([behaviors[0], esu.time_embedding.embedding.weight[0]])  # 10 s < 60 s: bucket 0
    torch.testing.assert_close(single[0], esu.attention.v_proj.weight @ z)


@pytest.mark.parametrize("time_as_bias", [False, True])
def test_esu_index_reads_the_indexed_behaviors(time_as_bias: bool) -> None:
    """``index``: attending over ``behaviors[index]`` (serving's distinct rows, each keyed once)
    is attending over the gathered rows, outputs and gradients, repeats and empty samples too."""
    torch.manual_seed(0)
    time = TimeIntervalEmbedding(2 if time_as_bias else 3, num_buckets=8)
    esu = ExactSearchUnit(6, time, num_heads=2, head_dim=4, time_as_bias=time_as_bias)
    target = torch.randn(3, 6)
    behaviors = torch.randn(4, 6, requires_grad=True)
    intervals = torch.tensor([10, 1000, 10**5, 10**7])
    index = torch.tensor([3, 0, 3, 1, 1, 2])  # rows read twice, row order not chronological
    offsets = torch.tensor([0, 3, 3, 6])
    indexed = esu(target, behaviors, offsets, intervals, index)
    (grad_indexed,) = torch.autograd.grad(indexed.square().sum(), behaviors)
    gathered = esu(target, behaviors[index], offsets, intervals[index])
    (grad_gathered,) = torch.autograd.grad(gathered.square().sum(), behaviors)
    torch.testing.assert_close(indexed, gathered)
    torch.testing.assert_close(grad_indexed, grad_gathered)
    assert torch.equal(indexed[1], torch.zeros(8)) and indexed[0].abs().sum() > 0


def total_loss(logits: torch.Tensor, aux: List[torch.Tensor], labels: torch.Tensor
               ) -> torch.Tensor:
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    for extra in aux:
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(extra, labels)
    return loss


@pytest.mark.parametrize("pattern", ["all", "some"])
@pytest.mark.parametrize("name", SEARCH_MODELS)
def test_empty_histories_give_finite_logits_and_gradients(name: str, pattern: str) -> None:
    model = make_model(name)
    keep = [0] * B if pattern == "all" else [0 if b % 3 == 0 else 2 + b % 5 for b in range(B)]
    batch = with_histories(make_batch(), keep)
    logits, aux = run(model, batch)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    assert len(aux) == (1 if name == "sim-soft" else 0)
    for extra in aux:
        assert extra.shape == (B,) and torch.isfinite(extra).all()
    total_loss(logits, aux, batch.labels).backward()
    for pname, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), pname
    seq = sequence_of(model)
    if pattern == "all":  # nothing retrieved, nothing recent: ESU and DIN get no gradient
        for module in (seq.esu, seq.short_term):
            for param in module.parameters():
                assert no_grad(param)
        if name == "sim-soft":
            assert no_grad(seq.search_unit.w_a.weight) and no_grad(seq.search_unit.w_b.weight)
    else:
        assert seq.esu.attention.v_proj.weight.grad.abs().sum() > 0


def test_no_behavior_of_the_target_category() -> None:
    model = make_model("sim-hard")
    batch = make_batch()
    f = batch.features
    lengths = f[HIST_ITEM].lengths().tolist()
    targets = f[TARGET_CATEGORY].values().tolist()
    # every behavior of sample b gets a category other than the target's
    other = [[(t + 1 + j % 3) % DATA.num_categories for j in range(n)]
             for t, n in zip(targets, lengths)]
    nomatch = with_histories(batch, lengths, categories=other)
    seq = sequence_of(model)
    _, found, _ = seq.search_unit.search(nomatch.features, nomatch.history_time,
                                         nomatch.request_time)
    assert found.tolist() == [0] * B
    logits, aux = run(model, nomatch)
    assert aux == [] and torch.isfinite(logits).all()
    total_loss(logits, aux, batch.labels).backward()
    for pname, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), pname
    for param in seq.esu.attention.parameters():
        assert no_grad(param)  # nothing retrieved
    assert seq.short_term.score[1].weight.grad.abs().sum() > 0  # the recent window still counts


# ----------------------------------------------------------------------------- fx

@pytest.mark.parametrize("name", SEARCH_MODELS)
def test_fx_trace_matches_eager(name: str) -> None:
    model = make_model(name)
    model.eval()
    traced = symbolic_trace(model)
    batches = [make_batch(2), with_histories(make_batch(3), [b % 4 for b in range(B)])]
    for batch in batches:
        eager, eager_aux = run(model, batch)
        logits, aux = traced(batch.features, batch.history_time, batch.request_time)
        torch.testing.assert_close(logits, eager, rtol=0, atol=0)
        assert len(aux) == len(eager_aux) == (1 if name == "sim-soft" else 0)
        for traced_extra, eager_extra in zip(aux, eager_aux):
            torch.testing.assert_close(traced_extra, eager_extra, rtol=0, atol=0)
