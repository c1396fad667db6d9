"""TWIN: the consistency-preserving search (CP-GSU), its per-item tables, the ESU's time bias.

The search is checked against the full attention logits computed densely from the embedding
tables and the ESU's own projections (padded ``[B, L]`` tensors, float64, nothing read from the
per-item tables); the tables against recomputing ``[e W_q^T, e W_k^T]`` per block from the
current weights after Adam steps; ``ExactSearchUnit(time_as_bias=True)`` against a hand-written
per-head softmax.
"""

import math
from typing import List, Tuple

import pytest
import torch

from helpers import (B, D, TABLES, build_small_model, gsu_search, make_batch, make_features,
                     per_sample, run, sequence_of, with_histories)
from torchrec_longseq import set_kernel
from torchrec_longseq.data.batch import (HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM,
                                         Batch)
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.modules.esu import ExactSearchUnit, SearchBasedInterest
from torchrec_longseq.modules.sequence import table_configs
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.modules.twin import TwinSearch
from torchrec_longseq.schema import default_schema

K = 5
HEADS, HEAD_DIM = 2, 4
GAP = 1e-4  # float32 search vs float64 reference: orders closer than this are not compared
MODEL = dict(num_heads=HEADS, head_dim=HEAD_DIM, twin_k=K)  # on top of helpers.model_config


# ----------------------------------------------------------------------------- helpers

def make_model(seed: int = 0, **overrides) -> LongSeqCTR:
    """Embeddings ~ N(0, 1), so that q . k spreads as much as the time bias (TorchRec's default
    init makes every q . k ~1e-3 and the ranking a matter of time buckets and near-ties), and the
    time bias ~ N(0, 1) (it starts at 0 in a built model: the search would not see it)."""
    model = build_small_model("twin", seed, refresh=False, **{**MODEL, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for table in model.embedding_collection.embeddings.values():
            table.weight.copy_(torch.randn(table.weight.shape, generator=g))
        bias = module_of(model).esu.time_embedding.embedding.weight
        bias.copy_(torch.randn(bias.shape, generator=g))
    model.refresh_derived_tables()
    assert isinstance(search_of(model), TwinSearch)
    return model


def module_of(model: LongSeqCTR) -> SearchBasedInterest:
    module = sequence_of(model)
    assert isinstance(module, SearchBasedInterest)
    return module


def search_of(model: LongSeqCTR) -> TwinSearch:
    return module_of(model).search_unit


def refresh_pending(model: LongSeqCTR) -> None:
    """What the next forward does first: rebuild the tables if a refresh is due."""
    model.sequence_arch.refresh_pending()


def search(model: LongSeqCTR, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
    search_of(model)  # (checks the GSU's type)
    return gsu_search(model, batch)


# ----------------------------------------------------------------------------- dense reference

def dense_scores(model: LongSeqCTR, batch: Batch, bias_sign: float = 1.0,
                 with_dot: bool = True, with_similarity: bool = True
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ESU's attention logits of every behavior, mean over heads, from the embedding tables
    and the ESU's weights: padded ``[B, Lmax]`` float64 (padding -inf) and the mask. With the
    ESU's similarity term (``esu_similarity="item"``), ``a_h cos(t_item, e_item)`` is in the
    logits (``with_similarity=False`` leaves it out, for the non-vacuity checks)."""
    f = batch.features
    esu = module_of(model).esu
    att, time_bias = esu.attention, esu.time_embedding
    h, dh = att.num_heads, att.head_dim
    weights = model.embedding_collection.embeddings
    item_w = weights["item"].weight.detach().double()
    cat_w = weights["category"].weight.detach().double()
    lengths = f[HIST_ITEM].lengths().tolist()
    b, lmax = len(lengths), max(lengths + [1])
    items = torch.zeros(b, lmax, dtype=torch.long)
    cats = torch.zeros(b, lmax, dtype=torch.long)
    times = torch.zeros(b, lmax, dtype=torch.long)
    mask = torch.zeros(b, lmax, dtype=torch.bool)
    start = 0
    for s, n in enumerate(lengths):
        items[s, :n] = f[HIST_ITEM].values()[start:start + n]
        cats[s, :n] = f[HIST_CATEGORY].values()[start:start + n]
        times[s, :n] = batch.history_time[start:start + n]
        mask[s, :n] = True
        start += n
    behaviors = torch.cat([item_w[items], cat_w[cats]], dim=-1)  # [B, L, 2D]
    target = torch.cat([item_w[f[TARGET_ITEM].values()], cat_w[f[TARGET_CATEGORY].values()]], 1)
    q = (target @ att.q_proj.weight.detach().double().T).view(b, 1, h, dh)
    k = (behaviors @ att.k_proj.weight.detach().double().T).view(b, lmax, h, dh)
    dots = (q * k).sum(-1) / math.sqrt(dh)  # [B, L, H]
    intervals = torch.where(mask, batch.request_time[:, None] - times, 0)
    bias = time_bias(intervals).detach().double()  # [B, L, H]
    assert bias.shape == (b, lmax, h)
    logits = (dots if with_dot else 0 * dots) + bias_sign * bias
    if esu.similarity is not None and with_similarity:
        assert esu.similarity == (0, D)  # the item table's columns
        cos = torch.nn.functional.cosine_similarity(item_w[f[TARGET_ITEM].values()][:, None],
                                                    item_w[items], dim=-1)  # [B, L]
        logits = logits + cos[..., None] * esu.similarity_scale.detach().double()
    scores = logits.mean(-1).masked_fill(~mask, float("-inf"))
    # behaviors with the same (item, category, time bucket) have the same logit: make the
    # reference's ties exact, as they are in the search
    buckets = time_bias.bucketize(intervals)
    for s, n in enumerate(lengths):
        seen = {}
        for p in range(n):
            key = (int(items[s, p]), int(cats[s, p]), int(buckets[s, p]))
            if key in seen:
                scores[s, p] = scores[s, seen[key]]
            else:
                seen[key] = p
    return scores, mask


def reference_topk(scores: torch.Tensor, mask: torch.Tensor, k: int
                   ) -> Tuple[List[List[int]], List[bool]]:
    """Per sample: global positions of the top ``k`` (best first, ties to the later position),
    and whether no near-tie (distinct scores closer than ``GAP``) decides them."""
    chosen, clear, start = [], [], 0
    for s in range(scores.size(0)):
        n = int(mask[s].sum())
        sc = scores[s, :n].tolist()
        order = sorted(range(n), key=lambda p: (-sc[p], -p))
        chosen.append([start + p for p in order[:k]])
        best = sorted(set(sc), reverse=True)[:k + 1]  # the distinct values the top k reads
        clear.append(all(a - b > GAP for a, b in zip(best, best[1:])))
        start += n
    return chosen, clear


# ----------------------------------------------------------------------------- GSU = top-k of the ESU logits

def test_search_is_the_top_k_of_the_full_attention_logits(kernels: str) -> None:
    """``kernels``: "auto" the compiled CPU search (the default on CPU), "torch" the torch ops."""
    model = set_kernel(make_model(), kernels)
    model.eval()
    full = make_batch()
    lengths = full.features[HIST_ITEM].lengths().tolist()
    cut = with_histories(make_batch(1), [(0, 1, 4, 5, 6, 9)[b % 6]
                                         for b in range(B)])  # empty, shorter and longer than K
    compared = 0
    for batch in (full, cut):
        indices, found = search(model, batch)
        f = batch.features
        lengths = f[HIST_ITEM].lengths()
        assert found.tolist() == lengths.clamp(max=K).tolist()
        scores, mask = dense_scores(model, batch)
        expected, clear = reference_topk(scores, mask, K)
        got = per_sample(indices, found)
        for s in range(B):
            if clear[s]:
                assert got[s] == expected[s], s  # the same behaviors, in the same order
                compared += 1
            else:
                # a float near-tie inside the top k: the kept set is still sure when the k-th
                # and (k+1)-th scores are apart
                sc = sorted(scores[s, :int(lengths[s])].tolist(), reverse=True)
                if len(sc) <= K or sc[K - 1] - sc[K] > GAP:
                    assert set(got[s]) == set(expected[s]), s
        # non-vacuous: the search is neither "the most recent K" nor the q . k or bias ranking
        if batch is full:
            assert all(n > K for n in lengths.tolist())
            recent = [list(range(int(o) - 1, int(o) - 1 - K, -1))
                      for o in f[HIST_ITEM].offsets()[1:]]
            assert sum(g != r for g, r in zip(got, recent)) > B // 2
            for variant in (dict(bias_sign=-1.0), dict(bias_sign=0.0), dict(with_dot=False)):
                other, _ = reference_topk(*dense_scores(model, batch, **variant), K)
                assert sum(set(g) != set(o) for g, o in zip(got, other)) > B // 4, variant
    assert compared >= 3 * B // 2


def test_exact_ties_go_to_the_more_recent_behavior(kernels: str) -> None:
    """Repeats of one (item, category) in one time bucket have equal logits: the most recent
    ones are kept, most recent first."""
    model = set_kernel(make_model(twin_k=2), kernels)
    model.eval()
    hist_items = [[7, 300, 7, 7, 300, 300], [300, 300, 300], []]
    hist_cats = [[0, 3, 0, 0, 3, 3], [3, 3, 3], []]
    request = 10**7
    history_time = torch.tensor([request - 10**6 + j for j in range(9)])
    batch = Batch(features=make_features(hist_items, hist_cats, [7, 7, 7], [0, 0, 0]),
                  history_time=history_time, request_time=torch.full((3,), request),
                  labels=torch.zeros(3), relevant=torch.zeros(9, dtype=torch.bool))
    buckets = module_of(model).esu.time_embedding.bucketize(request - history_time)
    assert len(set(buckets.tolist())) == 1  # one bucket: only the ids decide
    scores, mask = dense_scores(model, batch)
    item7, item300 = float(scores[0, 0]), float(scores[0, 1])
    assert abs(item7 - item300) > GAP
    indices, lengths = search(model, batch)
    assert lengths.tolist() == [2, 2, 0]
    first = [3, 2] if item7 > item300 else [5, 4]
    assert per_sample(indices, lengths) == [first, [8, 7], []]


def similarity_model(seed: int = 0) -> LongSeqCTR:
    """TWIN with the ESU's similarity term on the item table, each head's scale drawn apart (in
    [1, 4]: the term moves the ranking as much as q . k and the bias do, without deciding it)."""
    model = make_model(seed, esu_similarity="item")
    with torch.no_grad():
        scale = module_of(model).esu.similarity_scale
        scale.copy_(1 + 3 * torch.rand(scale.shape, generator=torch.Generator().manual_seed(seed)))
    model.refresh_derived_tables()
    return model


def test_search_with_similarity_is_the_top_k_of_the_full_logits(kernels: str) -> None:
    """With ``esu_similarity``, the search ranks by the ESU's logits with the term (the tables
    hold each item's unit vector next to its keys, the query the candidate's, scaled by the
    heads' mean scale): the same top ``k`` as the dense reference, which differs from the
    ranking without the term; histories cut to 0-9 behaviors (empty, shorter and longer than
    ``k``) keep ``min(L, k)`` each, the same as the reference's."""
    model = set_kernel(similarity_model(), kernels)
    model.eval()
    cut = with_histories(make_batch(1), [(0, 1, 4, 5, 6, 9)[b % 6] for b in range(B)])
    indices, found = search(model, cut)
    lengths = cut.features[HIST_ITEM].lengths()
    assert found.tolist() == lengths.clamp(max=K).tolist()
    expected, clear = reference_topk(*dense_scores(model, cut), K)
    got = per_sample(indices, found)
    assert all(g == e for g, e, c in zip(got, expected, clear) if c)
    assert sum(clear) >= B // 2
    compared = 0
    for index in range(3):
        batch = make_batch(index)
        indices, found = search(model, batch)
        scores, mask = dense_scores(model, batch)
        expected, clear = reference_topk(scores, mask, K)
        got = per_sample(indices, found)
        for s in range(B):
            if clear[s]:
                assert got[s] == expected[s], (index, s)
                compared += 1
        without, _ = reference_topk(*dense_scores(model, batch, with_similarity=False), K)
        assert sum(set(g) != set(o) for g, o in zip(got, without)) > B // 4
    assert compared >= 2 * B


def test_similarity_tables_hold_unit_vectors() -> None:
    """``[e W_q^T, u, e W_k^T, u]`` for the item table (``u = e / |e|``), zeros in the
    category table's similarity columns; after training steps the rows follow the embeddings,
    the projections and the scale."""
    model = similarity_model()
    weights = model.embedding_collection.embeddings
    width = HEADS * HEAD_DIM

    def check() -> None:
        expected = expected_rows(model)
        for name in ("item", "category"):
            table = rows_of(model, name).table
            assert table.shape == (TABLES[f"hist_{name}"], 2 * (width + D))
            e = weights[name].weight.detach()
            unit = e / e.norm(dim=1, keepdim=True) if name == "item" else torch.zeros_like(e)
            q, k = expected[name].split(width, dim=1)
            torch.testing.assert_close(table, torch.cat([q, unit, k, unit], 1),
                                       atol=1e-5, rtol=1e-5)

    check()
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scale = module_of(model).esu.similarity_scale
    before = scale.detach().clone()
    for step in range(1, 3):
        adam_step(model, make_batch(step), optimizer)
        refresh_pending(model)
        check()
    assert (scale - before).abs().max() > 1e-3  # the scale is trained (the query reads it)
    model.eval()
    batch = make_batch(5)
    indices, found = search(model, batch)
    expected, clear = reference_topk(*dense_scores(model, batch), K)
    got = per_sample(indices, found)
    assert sum(g == e for g, e, c in zip(got, expected, clear) if c) >= B // 2


def test_search_tables_are_the_projected_embeddings() -> None:
    model = make_model()
    expected = expected_rows(model)
    for name in ("item", "category"):
        table = rows_of(model, name).table
        assert table.shape == (TABLES[f"hist_{name}"], 2 * HEADS * HEAD_DIM)
        torch.testing.assert_close(table, expected[name], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- table refresh

def rows_of(model: LongSeqCTR, name: str):
    rows = search_of(model).rows[0 if name == "item" else 1]  # one table per attribute
    assert rows.source == name
    return rows


def expected_rows(model: LongSeqCTR):
    """``[e W_q[:, block]^T, e W_k[:, block]^T]`` from the current weights, per table."""
    att = module_of(model).esu.attention
    wq, wk = att.q_proj.weight.detach(), att.k_proj.weight.detach()
    assert wq.shape == (HEADS * HEAD_DIM, 2 * D) and wk.shape == (HEADS * HEAD_DIM, 2 * D)
    weights = model.embedding_collection.embeddings
    out = {}
    for name, block in (("item", slice(0, D)), ("category", slice(D, 2 * D))):
        e = weights[name].weight.detach()
        out[name] = torch.cat([e @ wq[:, block].T, e @ wk[:, block].T], dim=1)
    return out


def max_staleness(model: LongSeqCTR) -> float:
    expected = expected_rows(model)
    return max(float((rows_of(model, n).table - expected[n]).abs().max()) for n in expected)


def adam_step(model: LongSeqCTR, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(run(model, batch), batch.labels).backward()
    optimizer.step()


def test_tables_follow_the_trained_projections_and_embeddings() -> None:
    model = make_model()
    model.train()
    att = module_of(model).esu.attention
    weights = model.embedding_collection.embeddings
    initial = {"q": att.q_proj.weight.detach().clone(), "k": att.k_proj.weight.detach().clone(),
               "item": weights["item"].weight.detach().clone()}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    assert max_staleness(model) < 1e-5
    for step in range(1, 4):
        adam_step(model, make_batch(step), optimizer)
        assert max_staleness(model) > 1e-3  # the step moved the rows: stale until refreshed
        refresh_pending(model)
        assert max_staleness(model) < 1e-5, step
    # non-vacuous: both the projections and the embeddings were trained
    assert (att.q_proj.weight - initial["q"]).abs().max() > 1e-2
    assert (att.k_proj.weight - initial["k"]).abs().max() > 1e-2
    assert (weights["item"].weight - initial["item"]).abs().max() > 1e-2
    # every row moved, looked up or not (W_q, W_k changed): the whole table is rebuilt
    table = rows_of(model, "item").table
    fresh = make_model()
    assert (table != rows_of(fresh, "item").table).any(1).all()


def test_periodic_refresh_every_three_steps() -> None:
    model = make_model(refresh_every=3)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    tables = [rows_of(model, "item").table, rows_of(model, "category").table]
    for step in range(1, 7):
        before = [t.clone() for t in tables]
        adam_step(model, make_batch(step), optimizer)
        refresh_pending(model)
        if step % 3 == 0:
            assert max_staleness(model) < 1e-5, step
        else:
            assert all(torch.equal(t, b) for t, b in zip(tables, before)), step
            assert max_staleness(model) > 1e-3, step


# ----------------------------------------------------------------------------- ESU with a time bias

def test_esu_time_bias_hand_computed() -> None:
    torch.manual_seed(0)
    time = TimeIntervalEmbedding(2, num_buckets=8)  # dt < 60 s: bucket 0; dt >= 4e7 s: bucket 7
    esu = ExactSearchUnit(3, time, num_heads=2, head_dim=2, time_as_bias=True)
    att = esu.attention
    assert att.k_proj.in_features == 3 and att.v_proj.in_features == 3  # no time in the keys
    with torch.no_grad():
        time.embedding.weight[0] = torch.tensor([2.0, -1.0])
        time.embedding.weight[7] = torch.tensor([-3.0, 0.5])
    target = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    behaviors = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 1.0, 1.0]],
                             requires_grad=True)
    intervals = torch.tensor([10, 10**9, 30])  # buckets 0, 7, 0
    bucket = [0, 7, 0]
    out = esu(target, behaviors, torch.tensor([0, 3, 3]), intervals)  # sample 1: no behavior
    assert out.shape == (2, 4)

    wq, wk, wv = (w.detach().tolist() for w in (att.q_proj.weight, att.k_proj.weight,
                                               att.v_proj.weight))
    bias = time.embedding.weight.detach().tolist()
    t, z = target.detach().tolist()[0], behaviors.detach().tolist()

    def matvec(w: List[List[float]], x: List[float]) -> List[float]:
        return [sum(a * b for a, b in zip(row, x)) for row in w]

    q = matvec(wq, t)
    keys, values = [matvec(wk, x) for x in z], [matvec(wv, x) for x in z]
    expected = []
    for h in range(2):
        cols = [2 * h, 2 * h + 1]
        logits = [sum(q[c] * k[c] for c in cols) / math.sqrt(2) + bias[bucket[j]][h]
                  for j, k in enumerate(keys)]
        top = max(logits)
        e = [math.exp(x - top) for x in logits]
        w = [x / sum(e) for x in e]
        expected += [sum(w[j] * values[j][c] for j in range(3)) for c in cols]
    torch.testing.assert_close(out[0], torch.tensor(expected), atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1], torch.zeros(4))  # zero behaviors: zero output, no NaN

    out.sum().backward()
    for grad in (target.grad, behaviors.grad, time.embedding.weight.grad):
        assert torch.isfinite(grad).all()
    assert torch.equal(target.grad[1], torch.zeros(3))
    # the bias is a logit term: its gradient reaches exactly the buckets used
    assert time.embedding.weight.grad.abs().sum(1).nonzero().flatten().tolist() == [0, 7]

    # the sign of the bias matters: a larger bias for bucket 7 moves weight to behavior 1
    with torch.no_grad():
        time.embedding.weight[7] = torch.tensor([10.0, 10.0])
        assert torch.allclose(esu(target, behaviors, torch.tensor([0, 3, 3]), intervals)[0],
                              att.v_proj.weight @ behaviors[1], atol=1e-3)


def test_time_bias_starts_at_zero() -> None:
    """A built TWIN's time bias is 0 for every bucket and head (issue 24: drawn N(0, 1), it
    ranked the search by random buckets for hundreds of steps), and only it differs from the
    N(0, 1) start (``twin_bias_init="normal"``, the model before issue 24): the other parameters
    are drawn alike."""
    zero = build_small_model("twin", 0, refresh=False, **MODEL)
    normal = build_small_model("twin", 0, refresh=False, twin_bias_init="normal", **MODEL)
    bias = module_of(zero).esu.time_embedding.embedding.weight
    assert bias.shape == (32, HEADS) and torch.equal(bias, torch.zeros_like(bias))
    drawn = module_of(normal).esu.time_embedding.embedding.weight
    assert drawn.std() > 0.5  # N(0, 1)
    differ = [a for a, b in zip(zero.parameters(), normal.parameters()) if not torch.equal(a, b)]
    assert len(differ) == 1 and differ[0] is bias  # (the search shares the ESU's bias module)
    with pytest.raises(ValueError, match="twin_bias_init"):
        build_small_model("twin", 0, twin_bias_init="uniform", **MODEL)


def test_esu_time_bias_width_must_equal_heads() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        ExactSearchUnit(6, TimeIntervalEmbedding(3), num_heads=2, head_dim=4, time_as_bias=True)
    ExactSearchUnit(6, TimeIntervalEmbedding(3), num_heads=2, head_dim=4)  # a feature: any width


def test_twin_search_needs_a_bias_esu_and_times() -> None:
    model = make_model()
    tables = table_configs(model.embedding_collection)
    esu = ExactSearchUnit(2 * D, TimeIntervalEmbedding(4), num_heads=HEADS, head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="time_as_bias"):
        TwinSearch(default_schema(), tables, esu, k=K)
    TwinSearch(default_schema(), tables, module_of(model).esu, k=K)  # a bias ESU: accepted
    batch = make_batch()
    # the history times reach the search through the model (SequenceArch), from history_time
    with pytest.raises(ValueError, match="history_time"):
        model(batch.features, None, batch.request_time)


# ----------------------------------------------------------------------------- empty histories

@pytest.mark.parametrize("pattern", ["all", "some"])
def test_empty_histories_give_finite_logits_and_gradients(kernels: str, pattern: str) -> None:
    model = set_kernel(make_model(), kernels)
    model.train()
    keep = [0] * B if pattern == "all" else [0 if b % 3 == 0 else 2 + b % 5 for b in range(B)]
    batch = with_histories(make_batch(), keep)
    indices, found = search(model, batch)
    assert found.tolist() == [min(n, K) for n in keep]
    logits = run(model, batch)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    esu = module_of(model).esu
    v_grad = esu.attention.v_proj.weight.grad
    if pattern == "all":  # nothing retrieved: the ESU gets no gradient
        assert v_grad is None or not v_grad.any()
    else:
        assert v_grad.abs().sum() > 0
