"""LongSeqCTR for "avgpool", "din", "din-full": forward, empty histories, what is looked up,
which embedding rows get gradients, fx tracing, and that training reduces the loss."""

from typing import Dict, List

import pytest
import torch
from torchrec import KeyedJaggedTensor
from torchrec.fx import symbolic_trace

from helpers import (B, D, build_small_model, capture, make_batch, nonzero_rows, per_sample, run,
                     sequence_of, with_histories)
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.models.longseq_ctr import LongSeqCTR, LongSeqCTRTrain
from torchrec_longseq.modules.esu import SearchBasedInterest

LAST_N = 4  # histories have >= 10 behaviors, so DIN(last_n=4) must drop most of them
NAMES = ["avgpool", "din", "din-full"]


def make_model(name: str, seed: int = 0) -> LongSeqCTR:
    return build_small_model(name, seed, refresh=False, short_window=LAST_N)


def embedding_weights(model: LongSeqCTR) -> Dict[str, torch.Tensor]:
    """The item and category tables, wherever the model keeps them."""
    out: Dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        for table in ("item", "category"):
            if name.endswith(f".{table}.weight") and "over_arch" not in name:
                out[table] = param
    assert set(out) == {"item", "category"}, [n for n, _ in model.named_parameters()]
    return out


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_finite_logits(name: str) -> None:
    model = make_model(name)
    batch = make_batch()
    logits = run(model, batch)
    assert logits.shape == (B,)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # the history matters: another history for the same candidates changes the logits
    shorter = with_histories(batch, [1] * B)
    assert not torch.allclose(run(model, shorter), logits)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pattern", ["all", "some"])
def test_empty_histories_give_finite_logits_and_gradients(name: str, pattern: str) -> None:
    model = make_model(name)
    batch = make_batch()
    keep = [0] * B if pattern == "all" else [0 if b % 3 == 0 else 2 for b in range(B)]
    empty = with_histories(batch, keep)
    logits = run(model, empty)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, empty.labels).backward()
    for pname, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), pname
    if name != "avgpool" and pattern == "all":
        # nothing to attend to: the attention MLP gets no gradient at all
        for pname, param in sequence_of(model).named_parameters():
            assert param.grad is None or not param.grad.any(), pname


def history_item_ids(kjt: KeyedJaggedTensor) -> List[List[int]]:
    """Item ids per sample under every history key of a lookup KJT (everything but the target)."""
    out = [[] for _ in range(B)]
    for key, jt in kjt.to_dict().items():
        if key.startswith("target_") or "item" not in key:
            continue
        for b, ids in enumerate(per_sample(jt.values(), jt.lengths())):
            out[b] += ids
    return out


def history_ids_total(kjt: KeyedJaggedTensor) -> List[int]:
    """Number of ids per sample under every non-target key (items and categories)."""
    counts = [0] * B
    for key, jt in kjt.to_dict().items():
        if not key.startswith("target_"):
            for b, n in enumerate(jt.lengths().tolist()):
                counts[b] += n
    return counts


def test_din_last_n_looks_up_only_the_last_n() -> None:
    model = make_model("din")
    seen = capture(model.embedding_collection)
    batch = make_batch()
    run(model, batch)
    assert len(seen) == 1  # one EmbeddingCollection call for candidate and history
    history = per_sample(batch.features[HIST_ITEM].values(), batch.features[HIST_ITEM].lengths())
    assert min(len(h) for h in history) > LAST_N
    items = history_item_ids(seen[0])
    assert items == [h[-LAST_N:] for h in history]
    # at most N items and N categories per sample, nothing else from the history
    assert all(n <= 2 * LAST_N for n in history_ids_total(seen[0]))
    targets = seen[0][TARGET_ITEM].values().tolist()
    assert targets == batch.features[TARGET_ITEM].values().tolist()

    # short histories: everything there is (min(L, N))
    seen.clear()
    short = with_histories(batch, [b % (LAST_N + 2) for b in range(B)])
    run(model, short)
    kept = [h[len(h) - b % (LAST_N + 2):] for b, h in enumerate(history)]
    assert any(len(k) == LAST_N + 1 for k in kept) and any(len(k) == 0 for k in kept)
    assert history_item_ids(seen[0]) == [k[-LAST_N:] if k else [] for k in kept]


def test_din_full_looks_up_the_whole_history() -> None:
    model = make_model("din-full")
    seen = capture(model.embedding_collection)
    batch = make_batch()
    run(model, batch)
    assert len(seen) == 1
    history = per_sample(batch.features[HIST_ITEM].values(), batch.features[HIST_ITEM].lengths())
    # the whole history for the full-length attention, then the short-term branch's window
    assert history_item_ids(seen[0]) == [h + h[-LAST_N:] for h in history]


def test_window_zero_has_no_short_term_branch() -> None:
    """``short_window=0``: the long-term path alone. Nothing recent is looked up, the output
    loses the short-term columns, and the logits do not depend on the recent behaviors beyond
    what the search retrieves (here: the whole history, din-full)."""
    model = build_small_model("din-full", refresh=False, short_window=0)
    arch = sequence_of(model)
    assert arch.short_term is None
    assert arch.output_dim == sequence_of(make_model("din-full")).output_dim - 2 * D
    seen = capture(model.embedding_collection)
    batch = make_batch()
    logits = run(model, batch)
    assert torch.isfinite(logits).all()
    history = per_sample(batch.features[HIST_ITEM].values(), batch.features[HIST_ITEM].lengths())
    assert history_item_ids(seen[0]) == history  # the history once, no window after it
    with pytest.raises(ValueError, match="short_window"):
        SearchBasedInterest(arch.search_unit, arch.esu, None, 50)


@pytest.mark.parametrize("name", ["din", "din-full"])
def test_gradients_reach_only_looked_up_rows(name: str) -> None:
    model = make_model(name)
    batch = make_batch()
    logits = run(model, batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    items = per_sample(batch.features[HIST_ITEM].values(), batch.features[HIST_ITEM].lengths())
    cats = per_sample(batch.features[HIST_CATEGORY].values(), batch.features[HIST_CATEGORY].lengths())
    n = LAST_N if name == "din" else None
    used_items = {i for h in items for i in (h[-n:] if n else h)}
    used_items |= set(batch.features[TARGET_ITEM].values().tolist())
    used_cats = {c for h in cats for c in (h[-n:] if n else h)}
    used_cats |= set(batch.features[TARGET_CATEGORY].values().tolist())
    weights = embedding_weights(model)
    for table, used in (("item", used_items), ("category", used_cats)):
        grad = weights[table].grad
        assert grad is not None and torch.isfinite(grad).all()
        rows = nonzero_rows(grad)
        assert rows <= used, (table, sorted(rows - used))
        # and (almost) every looked-up row does get a gradient; a dead ReLU may zero a few
        assert len(rows) >= 0.8 * len(used), (table, len(rows), len(used))
    if name == "din":
        older_only = {i for h in items for i in h[:-LAST_N]} - used_items
        assert len(older_only) > 20  # the test above excluded many rows that were in the batch


def test_avgpool_gradients_reach_the_whole_history() -> None:
    model = make_model("avgpool")
    batch = make_batch()
    logits = run(model, batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    used = set(batch.features[HIST_ITEM].values().tolist()) | set(
        batch.features[TARGET_ITEM].values().tolist())
    rows = nonzero_rows(embedding_weights(model)["item"].grad)
    assert rows <= used
    assert len(rows) >= 0.8 * len(used)


@pytest.mark.parametrize("name", NAMES + ["sdim", "twin"])
def test_fx_trace_matches_eager(name: str) -> None:
    """(SIM and ETA: in their own test files.) Histories cut to 0-2 behaviors included."""
    model = make_model(name)
    model.refresh_derived_tables()
    model.eval()
    traced = symbolic_trace(model)
    for batch in (make_batch(1), with_histories(make_batch(2), [b % 3 for b in range(B)])):
        eager = run(model, batch)
        logits, aux = traced(batch.features, batch.history_time, batch.request_time)
        assert aux == []
        torch.testing.assert_close(logits, eager)


@pytest.mark.parametrize("name", NAMES)
def test_adam_steps_reduce_the_training_loss(name: str) -> None:
    train = LongSeqCTRTrain(make_model(name))
    batch = make_batch(3)
    optimizer = torch.optim.Adam(train.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, (detached, logits, labels) = train(batch)
        assert torch.equal(labels, batch.labels) and logits.shape == (B,)
        assert torch.equal(detached, loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name, field", [("sim-hard", "k"), ("sim-soft", "k"), ("eta", "k"),
                                         ("twin", "twin_k")])
def test_a_negative_k_is_an_error(name: str, field: str) -> None:
    """Each search's module checks its k (a negative one used to train with no retrieval at all
    for SIM hard and ETA, and to crash in the float top-k kernel for SIM soft and TWIN)."""
    from torchrec_longseq.data import SyntheticConfig
    from torchrec_longseq.models.longseq_ctr import ModelConfig, build_model
    with pytest.raises(ValueError, match="k .* must be >= 0, got -1"):
        build_model(name, ModelConfig(**{field: -1}), SyntheticConfig().table_sizes)


def test_heads_and_window_out_of_range_are_errors() -> None:
    from torchrec_longseq.modules.attention import TargetAttention
    from torchrec_longseq.modules.din import DIN
    from torchrec_longseq.modules.time import TimeIntervalEmbedding
    from torchrec_longseq.schema import default_schema
    with pytest.raises(ValueError, match="num_heads >= 1 and head_dim >= 1, got 0 and 8"):
        TargetAttention(8, 8, num_heads=0, head_dim=8)
    with pytest.raises(ValueError, match="last_n must be >= 0, got -5"):
        DIN(default_schema(), 8, [16], TimeIntervalEmbedding(4), last_n=-5)


@pytest.mark.parametrize("name", ["avgpool", "din", "sim-soft", "eta", "sdim", "twin"])
def test_a_batch_of_zero_samples_has_loss_zero(name: str) -> None:
    """Not the NaN of a mean over nothing; the loss of other batches is the usual mean BCE."""
    model = build_small_model(name)
    train = LongSeqCTRTrain(model)
    empty = make_batch(batch_size=0)
    loss, (_, logits, labels) = train(empty)
    assert float(loss.detach()) == 0.0 and logits.shape == (0,) and labels.shape == (0,)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is None or not param.grad.any(), pname
    batch = make_batch(batch_size=4)
    loss, (_, logits, _) = train(batch)
    logits_again, aux = model(batch.features, batch.history_time, batch.request_time)
    expected = sum(torch.nn.functional.binary_cross_entropy_with_logits(x, batch.labels)
                   for x in [logits_again, *aux])
    torch.testing.assert_close(loss, expected)


def test_esu_similarity_names_one_table_of_a_searched_esu() -> None:
    """``esu_similarity`` resolves to the named table's columns of a behavior row (item the
    first 16, category the next 16); a table the sequence does not use and a model whose
    logits it cannot bias (DIN, SDIM) are refused. TWIN's search tables get the table's
    unit vectors (item: 16 more columns in each half of a row)."""
    from torchrec_longseq.data import SyntheticConfig
    from torchrec_longseq.models.longseq_ctr import ModelConfig, build_model
    sizes = SyntheticConfig().table_sizes
    for table, cols in [("item", (0, 16)), ("category", (16, 32))]:
        for name in ["din-full", "sim-hard", "sim-soft", "eta", "twin"]:
            model = build_model(name, ModelConfig(esu_similarity=table), sizes)
            assert sequence_of(model).esu.similarity == cols
            assert sequence_of(model).esu.similarity_scale.shape == (4,)
    twin = build_model("twin", ModelConfig(esu_similarity="item"), sizes)
    rows = sequence_of(twin).search_unit.rows
    assert [r.table.size(1) for r in rows] == [2 * (4 * 8 + 16)] * 2  # 4 heads of 8
    with pytest.raises(ValueError, match="'shop' fills 0"):
        build_model("eta", ModelConfig(esu_similarity="shop"), sizes)
    for name in ["din", "sdim"]:
        with pytest.raises(ValueError, match=f"esu_similarity .*; {name} has none"):
            build_model(name, ModelConfig(esu_similarity="item"), sizes)


def test_avgpool_refuses_a_cooccurrence_weight() -> None:
    """avgpool looks no window up, so the loss would silently not be there."""
    from torchrec_longseq.data import SyntheticConfig
    from torchrec_longseq.models.longseq_ctr import ModelConfig, build_model
    with pytest.raises(ValueError, match="avgpool pools the history"):
        build_model("avgpool", ModelConfig(cooccurrence=1.0), SyntheticConfig().table_sizes)
