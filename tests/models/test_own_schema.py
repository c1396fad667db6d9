"""A user's own model (``examples/own_model.py``): their keys and tables, three ids per behavior,
two sequences (ETA over clicks, SIM hard over purchases) sharing one EmbeddingCollection; and a
fourth attribute without a candidate key, through every sequence model; and the kernel choice
(``set_kernel``): with "torch" a model calls no compiled operator, in training or serving."""

import re
from collections import Counter
from typing import List

import pytest
import torch
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.fx import symbolic_trace

import own_model
from helpers import capture, nonzero_rows, per_sample
from torchrec_longseq import (Attribute, SequenceArch, SequenceSchema, StaleDerivedTableError,
                              build_sequence, serving, set_kernel, table_configs)
from torchrec_longseq.data import Batch, SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.validation import check_batch
from torchrec_longseq.models.longseq_ctr import (SEQUENCE_MODELS, LongSeqCTR, LongSeqCTRTrain,
                                                 ModelConfig)
from torchrec_longseq.modules import derived
from torchrec_longseq.retrieval import extension, kernels as compiled

DATA = SyntheticConfig(max_seq_len=64, num_users=1000, num_items=1000, num_categories=10,
                       subclusters=10)
B = 8
K_CLICKS, K_BUYS, WINDOW = 6, 3, ModelConfig().short_window


def make_model(data: SyntheticConfig = DATA, clicks: str = "eta", buys: str = "sim-hard",
               seed: int = 0) -> LongSeqCTR:
    torch.manual_seed(seed)
    return own_model.build_own_model(data, dim=8, clicks_model=clicks, buys_model=buys,
                                     clicks_k=K_CLICKS, buys_k=K_BUYS)


def make_batch(index: int = 0, data: SyntheticConfig = DATA, batch_size: int = B) -> Batch:
    return own_model.own_batch(SyntheticGenerator(data), "train", index, batch_size)


def schemas(model: LongSeqCTR) -> List[SequenceSchema]:
    return [m.schema for m in model.sequence_arch.sequences.values()]


def logits_of(model: LongSeqCTR, batch: Batch) -> torch.Tensor:
    logits, aux = model(batch.features, None, batch.request_time)
    soft = sum(1 for m in model.sequence_arch.sequences.values()
               if type(getattr(m, "search_unit", None)).__name__ == "SoftSearch")
    assert len(aux) == soft and all(a.shape == logits.shape for a in aux)
    return logits


def test_the_users_batch_passes_its_checks_with_extra_keys() -> None:
    model = make_model()
    batch = make_batch()
    check_batch(batch, model.table_rows, schemas(model))
    assert torch.isfinite(logits_of(model, batch)).all()
    # a time key that does not line up with its history is named
    f = batch.features.to_dict()
    f["buy_seq_ts"] = type(f["buy_seq_ts"])(values=f["buy_seq_ts"].values()[1:],
                                            lengths=f["buy_seq_ts"].lengths() - torch.nn.functional.one_hot(
                                                f["buy_seq_ts"].lengths().argmax(), B).int())
    bad = Batch(features=KeyedJaggedTensor.from_jt_dict(f), history_time=batch.history_time,
                request_time=batch.request_time, labels=batch.labels, relevant=batch.relevant)
    with pytest.raises(ValueError, match="feature 'buy_seq_ts', sample .*: length .* differs from 'buy_seq_item'"):
        check_batch(bad, model.table_rows, schemas(model))


@pytest.mark.parametrize("length", [100, 1000, 10_000])
def test_one_lookup_reads_k_plus_window_plus_one_per_sequence(length: int) -> None:
    """Both sequences go through ONE EmbeddingCollection call; per sample it reads the candidate
    once and, per sequence and attribute, at most k + window history ids, whatever L is: the ids
    at the positions each module's search selected, then its recent window."""
    data = SyntheticConfig(max_seq_len=length, min_seq_len=length, num_users=1000,
                           num_items=1000, num_categories=10, subclusters=10)
    model = make_model(data).eval()
    seen = capture(model.embedding_collection)
    batch = make_batch(data=data, batch_size=4)
    logits_of(model, batch)
    assert len(seen) == 1
    kjt = seen[0]
    for key in ("cand_item", "cand_cate", "cand_shop"):
        assert kjt[key].lengths().tolist() == [1] * 4
    for name, module in model.sequence_arch.sequences.items():
        k = K_CLICKS if name == "clicks" else K_BUYS
        schema = module.schema
        times = batch.features[schema.time_key].values()
        selection = module.search(batch.features, times, batch.request_time)
        for key in schema.history_keys:
            got = per_sample(kjt[key].values(), kjt[key].lengths())
            values = batch.features[key].values()
            long = per_sample(values[selection.long[0]], selection.long[1])
            short = per_sample(values[selection.short[0]], selection.short[1])
            assert got == [a + b for a, b in zip(long, short)], (name, key)
            assert max(len(g) for g in got) <= k + WINDOW
            assert batch.features[key].lengths().min() > 2 * (k + WINDOW) or length == 100


def test_gradients_reach_only_looked_up_rows() -> None:
    data = SyntheticConfig(max_seq_len=300, min_seq_len=200, num_users=1000, num_items=1000,
                           num_categories=10, subclusters=10)
    model = make_model(data)
    seen = capture(model.embedding_collection)
    batch = make_batch(data=data)
    logits = logits_of(model, batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels).backward()
    kjt = seen[0]
    weights = {n.split(".")[-2]: p for n, p in model.named_parameters()
               if ".embeddings." in n and "sequence_arch.embedding_collection" in n}
    assert set(weights) == {"item", "cate", "shop"}
    for table, prefix in (("item", "item"), ("cate", "cate"), ("shop", "shop")):
        looked = set(torch.cat([kjt[k].values() for k in kjt.keys() if k.endswith(prefix)]).tolist())
        rows = nonzero_rows(weights[table].grad)
        assert rows and rows <= looked, (table, sorted(rows - looked))
        every = set(torch.cat([batch.features[k].values() for k in batch.features.keys()
                               if k.endswith(prefix)]).tolist())
        if table == "item":  # the histories held many rows that were not looked up
            assert len(every - looked) > 100


def signature_tables(model: LongSeqCTR) -> List[derived.ItemDerivedTable]:
    return [t for m in model.sequence_arch.sequences.values() for t in m.derived_tables()]


def test_derived_tables_stay_exact_without_any_call() -> None:
    """A plain training loop (SGD over every parameter: only looked-up rows move) calls nothing;
    before every forward, every signature table equals hashing the current embeddings."""
    model = make_model(buys="eta")
    train = LongSeqCTRTrain(model)
    optimizer = torch.optim.SGD(train.parameters(), lr=0.5)
    tables = signature_tables(model)
    assert {t.source for t in tables} == {"item", "cate", "shop"} and len(tables) == 6
    initial = None
    for step in range(4):
        loss, _ = train(make_batch(step))
        if initial is None:
            initial = [t.table.clone() for t in tables]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.sequence_arch.refresh_pending()  # what the next forward does first
        for table in tables:
            weight = dict(model.named_parameters())[
                f"sequence_arch.embedding_collection.embeddings.{table.source}.weight"]
            assert torch.equal(table.table, table.derive(weight.detach()))
    assert any((t.table != i).any() for t, i in zip(tables, initial))


def test_refresh_reads_each_table_once(monkeypatch) -> None:
    """Two ETA sequences over the same three tables: one read of the touched rows per table per
    step, however many derived tables derive from it."""
    model = make_model(buys="eta")
    train = LongSeqCTRTrain(model)
    optimizer = torch.optim.SGD(train.parameters(), lr=0.5)
    loss, _ = train(make_batch(0))
    loss.backward()
    optimizer.step()
    reads: List[str] = []
    original = derived.read_rows
    monkeypatch.setattr(derived, "read_rows", lambda lookup, table, items: reads.append(table)
                        or original(lookup, table, items))
    model.sequence_arch.refresh_pending()
    assert sorted(reads) == ["cate", "item", "shop"]
    reads.clear()
    model.sequence_arch.refresh_pending()  # nothing trained since: nothing read
    assert reads == []


def test_a_dense_optimizer_over_the_tables_is_reported() -> None:
    """Adam moves rows that were looked up once on every later step: the exact tables would go
    stale, and the library says so instead."""
    model = make_model()
    train = LongSeqCTRTrain(model)
    optimizer = torch.optim.Adam(train.parameters(), lr=1e-2)
    with pytest.raises(StaleDerivedTableError, match="changed although no forward looked it up.*"
                                                     "sparse optimizer"):
        for step in range(30):
            loss, _ = train(make_batch(step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def test_periodic_tables_accept_a_dense_optimizer() -> None:
    """``refresh_every > 1`` rebuilds the tables whole: no exactness to break, no audit."""
    torch.manual_seed(0)
    ec = EmbeddingCollection(tables=[EmbeddingConfig(
        name="item", embedding_dim=8, num_embeddings=1000, feature_names=["cand_item", "clk_seq_item"])])
    schema = SequenceSchema([Attribute("clk_seq_item", "item", "cand_item")], time_key="clk_seq_ts")
    module = build_sequence("eta", schema, table_configs(ec), ModelConfig(k=4, refresh_every=3))
    arch = SequenceArch(ec, {"clicks": module})
    optimizer = torch.optim.Adam(arch.parameters(), lr=1e-2)
    for step in range(8):
        batch = make_batch(step)
        out, _ = arch(batch.features, None, batch.request_time)
        out.sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def request_of(batch: Batch, sample: int, candidates: int) -> serving.Request:
    return own_model.own_request(batch, sample, candidates, DATA)


@pytest.mark.parametrize("clicks", SEQUENCE_MODELS)
def test_serving_equals_independent_samples(clicks: str, kernels: str) -> None:
    model = set_kernel(make_model(clicks=clicks), kernels).eval()
    batch = make_batch(1)
    logits_of(model, batch)  # the model learns its input's key order
    for sample, candidates in ((0, 16), (3, 1)):
        request = request_of(batch, sample, candidates)
        expected = logits_of(model, serving.request_batch(request, model))
        torch.testing.assert_close(serving.score_request(model, request), expected,
                                   rtol=1e-5, atol=1e-6)


def test_fx_trace_matches_eager() -> None:
    model = make_model().eval()
    batch = make_batch(2)
    eager = logits_of(model, batch)
    traced = symbolic_trace(model)
    logits, aux = traced(batch.features, None, batch.request_time)
    assert aux == []
    torch.testing.assert_close(logits, eager)


# ----------------------------------------------------------------- an attribute without candidate

TYPES = 4  # a behavior type (pv, cart, fav, buy): the candidate has none


def typed_model(name: str) -> LongSeqCTR:
    """One sequence of four attributes: item, category, shop, and a behavior type that only
    behaviors have."""
    base = make_model()
    ec = EmbeddingCollection(tables=[
        *[EmbeddingConfig(name=c.name, embedding_dim=c.embedding_dim,
                          num_embeddings=c.num_embeddings,
                          feature_names=[f for f in c.feature_names if not f.startswith("buy")])
          for c in base.embedding_collection.embedding_configs()],
        EmbeddingConfig(name="btype", embedding_dim=8, num_embeddings=TYPES,
                        feature_names=["clk_seq_type"])])
    schema = SequenceSchema([*own_model.schemas()["clicks"].attributes,
                             Attribute("clk_seq_type", "btype")], time_key="clk_seq_ts")
    torch.manual_seed(0)
    module = build_sequence(name, schema, table_configs(ec),
                            ModelConfig(k=K_CLICKS, twin_k=K_CLICKS, sdim_bits=48, short_window=5))
    return LongSeqCTR(base.sparse_arch, [16], SequenceArch(ec, {"clicks": module}))


def typed_batch(index: int) -> Batch:
    batch = make_batch(index)
    jt = batch.features.to_dict()
    items = jt["clk_seq_item"]
    jt["clk_seq_type"] = type(items)(values=items.values() % TYPES, lengths=items.lengths())
    return Batch(features=KeyedJaggedTensor.from_jt_dict(jt), history_time=batch.history_time,
                 request_time=batch.request_time, labels=batch.labels, relevant=batch.relevant)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_an_attribute_without_candidate_key(name: str, kernels: str) -> None:
    """Four attributes, one of them only on behaviors: every model trains (finite logits and
    gradients), the compiled path equals the torch ops, and serving equals the batch."""
    model = set_kernel(typed_model(name), kernels)
    batch = typed_batch(0)
    check_batch(batch, model.table_rows, schemas(model))
    logits = logits_of(model, batch)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    model.eval()
    reference = logits_of(model, batch)
    set_kernel(model, "torch" if kernels == "auto" else "auto")  # the other implementation
    torch.testing.assert_close(logits_of(model, batch), reference, rtol=1e-5, atol=1e-6)
    set_kernel(model, kernels)
    f = batch.features.to_dict()
    request = request_of(batch, 2, 8)
    start, n = int(f["clk_seq_type"].offsets()[2]), int(f["clk_seq_type"].lengths()[2])
    request.history["clk_seq_type"] = f["clk_seq_type"].values()[start:start + n]
    request.history = {k: v for k, v in request.history.items() if not k.startswith("buy")}
    torch.testing.assert_close(serving.score_request(model, request),
                               logits_of(model, serving.request_batch(request, model)),
                               rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- the kernel choice

# every compiled operator, as registered (``torch.ops.longseq.<name>``)
OPERATORS = re.findall(r'm\.def\("(\w+)\(', extension.sources()["registration.cpp"].decode())
# what each sequence model calls besides the attention (and SIM hard's search over "buys")
SEARCH_OPERATORS = {"sim-hard": {"hard_topk"}, "sim-soft": {"float_topk"},
                    "eta": {"hamming_topk_by_id", "pack_signs"}, "twin": {"twin_topk_by_id"},
                    "sdim": {"pack_signs"}}


def count_operator_calls(monkeypatch) -> Counter:
    """From now on (until the test ends), each call of a compiled operator is counted by name:
    every wrapper in ``retrieval.kernels`` (and the attention's backward) calls them as
    ``torch.ops.longseq.<name>``."""
    if not compiled.build():
        pytest.skip("the longseq operators did not build: nothing compiled to count")
    assert len(OPERATORS) >= 12 and "attention_backward" in OPERATORS
    calls: Counter = Counter()
    for name in OPERATORS:
        real = getattr(torch.ops.longseq, name)
        monkeypatch.setattr(torch.ops.longseq, name,
                            lambda *a, _real=real, _name=name, **kw: (calls.update([_name]),
                                                                      _real(*a, **kw))[1])
    return calls


@pytest.mark.parametrize("clicks", SEQUENCE_MODELS)
def test_torch_kernel_trains_without_compiled_operators(clicks: str, monkeypatch) -> None:
    """``set_kernel(model, "torch")``: a training step (the derived tables' refresh, the
    searches, the attention forward and backward) and an evaluation call no compiled operator;
    with "auto" the same steps on CPU call the attention's and the model's search operators."""
    calls = count_operator_calls(monkeypatch)
    batch = make_batch()
    results = {}
    for kernel in ("auto", "torch"):
        model = set_kernel(make_model(clicks=clicks), kernel)
        calls.clear()
        logits = logits_of(model, batch)
        logits.sum().backward()
        with torch.no_grad():
            results[kernel] = (logits.detach(), logits_of(model.eval(), batch))
        if kernel == "torch":
            assert not calls, dict(calls)
        else:
            expected = {"attention_forward", "attention_backward", "hard_topk",
                        *SEARCH_OPERATORS.get(clicks, ())}
            assert expected <= set(calls), dict(calls)
    for got, expected in zip(results["torch"], results["auto"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_torch_kernel_serves_without_compiled_operators(name: str, monkeypatch) -> None:
    """``score_request`` with ``set_kernel(model, "torch")`` calls no compiled operator (the
    searches over the shared history, the distinct positions, the row gathers); with "auto" it
    calls serving's own operators. Both sequences run the same model."""
    calls = count_operator_calls(monkeypatch)
    batch = make_batch(1)
    request = request_of(batch, 0, 8)
    scores = {}
    for kernel in ("auto", "torch"):
        model = set_kernel(make_model(clicks=name, buys=name), kernel).eval()
        with torch.no_grad():
            logits_of(model, batch)  # the model learns its input's key order
        calls.clear()
        scores[kernel] = serving.score_request(model, request)
        if kernel == "torch":
            assert not calls, dict(calls)
        else:
            assert {"distinct_positions", "gather_rows"} <= set(calls), dict(calls)
    torch.testing.assert_close(scores["torch"], scores["auto"], rtol=1e-5, atol=1e-6)
