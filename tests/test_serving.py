"""Serving a request with the history searched once equals scoring its candidates one sample each."""

import dataclasses
import re

import pytest
import torch

from helpers import sequence_of
from torchrec_longseq import serving
from torchrec_longseq.data import SyntheticConfig
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.data.validation import check_batch
from torchrec_longseq.models.longseq_ctr import MODELS, ModelConfig, build_model

DATA = SyntheticConfig(max_seq_len=300, min_seq_len=300, num_users=100, num_items=400,
                       num_categories=20, subclusters=4)
CONFIG = ModelConfig(k=8, short_window=6, twin_k=10)


def make_request(length: int, candidates: int, seed: int = 0) -> serving.Request:
    return serving.synthetic_request(DATA, length, candidates, seed)


def model_of(name: str, config: ModelConfig = CONFIG) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, config, DATA.table_sizes).eval()
    model.refresh_derived_tables()
    return model


def independent(model, request: serving.Request) -> torch.Tensor:
    batch = serving.request_batch(request, model)
    assert batch.features[HIST_ITEM].values().numel() == request.num_candidates * \
        request.history[HIST_ITEM].numel()
    check_batch(batch, model.table_rows)
    with torch.no_grad():
        return model(batch.features, batch.history_time, batch.request_time)[0]


def through_the_modules(monkeypatch) -> None:
    """Serve as for a lookup module whose tables cannot be read directly (sharded, quantized):
    every lookup through the module's forward on ``request_features``."""
    monkeypatch.setattr(serving, "table_weights", lambda collection: None)


@pytest.mark.parametrize("lookup", ["tables", "modules"])
@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("name", MODELS)
def test_shared_history_equals_independent_samples(name: str, kernels: str, lookup: str,
                                                   monkeypatch) -> None:
    """``kernels``: "auto" the compiled CPU kernels (the default on CPU), "torch" the torch ops
    (``ModelConfig.kernel``), for the batch and the shared-history paths alike."""
    if lookup == "modules":
        through_the_modules(monkeypatch)
    model = model_of(name, dataclasses.replace(CONFIG, kernel=kernels))
    assert {m.kernel for m in model.modules() if hasattr(m, "kernel")} <= {kernels}
    for length, candidates in [(300, 16), (5, 3), (0, 2), (300, 1), (300, 0)]:
        request = make_request(length, candidates)
        expected = independent(model, request)
        got = serving.score_shared(model, request)
        assert got.shape == (candidates,) and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} L={length} C={candidates}")
        torch.testing.assert_close(serving.score_request(model, request), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["eta", "twin"])
def test_shared_history_without_short_term_branch(name: str) -> None:
    """``short_window=0`` (the long-term path alone) serves like the batch too."""
    model = model_of(name, ModelConfig(k=8, short_window=0, twin_k=10))
    assert sequence_of(model).short_term is None
    request = make_request(300, 16)
    torch.testing.assert_close(serving.score_request(model, request), independent(model, request),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["din-full", "sim-hard", "sim-soft", "eta", "twin"])
def test_shared_history_with_esu_evidence(name: str) -> None:
    """``esu_evidence`` (the ESU's per-head evidence next to its heads) serves like the batch,
    with the history shared, through the distinct behaviors' index, and with nothing kept."""
    model = model_of(name, dataclasses.replace(CONFIG, esu_evidence=True))
    assert sequence_of(model).esu.evidence
    for length, candidates in [(300, 16), (5, 3), (0, 2)]:
        request = make_request(length, candidates)
        torch.testing.assert_close(serving.score_request(model, request),
                                   independent(model, request), rtol=1e-5, atol=1e-6,
                                   msg=f"{name} L={length} C={candidates}")


@pytest.mark.parametrize("name", ["din-full", "sim-hard", "sim-soft", "eta", "twin"])
def test_shared_history_with_esu_similarity(name: str) -> None:
    """``esu_similarity`` (a per-pair logit term) serves like the batch: the shared history and
    the distinct behaviors' index laid out per (candidate, behavior) pair."""
    model = model_of(name, dataclasses.replace(CONFIG, esu_similarity="category",
                                               esu_evidence=True))
    assert sequence_of(model).esu.similarity == (16, 32)
    for length, candidates in [(300, 16), (5, 3), (0, 2), (300, 1)]:
        request = make_request(length, candidates)
        torch.testing.assert_close(serving.score_request(model, request),
                                   independent(model, request), rtol=1e-5, atol=1e-6,
                                   msg=f"{name} L={length} C={candidates}")


@pytest.mark.parametrize("name", ["din", "din-full", "sim-hard", "sim-soft", "eta", "twin", "sdim"])
def test_shared_lookup_is_bounded(name: str, monkeypatch) -> None:
    """One EmbeddingCollection call per request, reading the C candidates and at most
    C k (TWIN's k) + window distinct history rows per table (SDIM: the user's distinct behaviors
    + window; the whole-history model: each behavior once), whatever L is; the sequence module's
    own forward (nor its per-sample search) is not called."""
    through_the_modules(monkeypatch)
    model = model_of(name)
    request = make_request(300, 16)
    calls = []
    lookup = model.embedding_collection.forward
    monkeypatch.setattr(model.embedding_collection, "forward",
                        lambda kjt: calls.append(kjt) or lookup(kjt))
    monkeypatch.setattr(model.sequence_arch, "forward", None)  # would raise if called
    monkeypatch.setattr(sequence_of(model), "search", None)
    assert serving.score_shared(model, request).shape == (16,)
    k = 0 if name == "din" else CONFIG.twin_k if name == "twin" else CONFIG.k
    assert len(calls) == 1
    counts = dict(zip(calls[0].keys(), calls[0].length_per_key()))
    assert counts[TARGET_ITEM] == 16
    if name == "sdim":
        pairs = {(int(i), int(c))
                 for i, c in zip(request.history[HIST_ITEM], request.history[HIST_CATEGORY])}
        assert 0 < counts[HIST_ITEM] <= len(pairs) + CONFIG.short_window < 300
    elif name == "din-full":
        assert counts[HIST_ITEM] == 300
    else:
        assert 0 < counts[HIST_ITEM] <= 16 * k + CONFIG.short_window


def test_avgpool_pools_the_history_once(monkeypatch) -> None:
    """Average pooling serves a request with one pooled lookup in which the history appears once
    (the first candidate carries it; the others get its average broadcast)."""
    model = model_of("avgpool")
    request = make_request(300, 16)
    through_the_modules(monkeypatch)
    calls = []
    lookup = model.sparse_arch.forward
    monkeypatch.setattr(model.sparse_arch, "forward", lambda kjt: calls.append(kjt) or lookup(kjt))
    assert serving.score_shared(model, request).shape == (16,)
    assert len(calls) == 1
    counts = dict(zip(calls[0].keys(), calls[0].length_per_key()))
    assert counts[HIST_ITEM] == 300 and counts[TARGET_ITEM] == 16


def test_hard_search_shared_matches_per_candidate_loop() -> None:
    model = model_of("sim-hard")
    request = make_request(300, 16)
    selection = sequence_of(model).search_request(
        {k: request.history[k] for k in (HIST_ITEM, HIST_CATEGORY)},
        {k: request.candidates[k] for k in (TARGET_ITEM, TARGET_CATEGORY)},
        request.request_time - request.history_time)
    positions, lengths = selection.long
    assert lengths.numel() == 16
    cats = request.history[HIST_CATEGORY].tolist()
    start = 0
    for c, n in enumerate(lengths.tolist()):
        target = int(request.candidates[TARGET_CATEGORY][c])
        expected = [p for p, cat in enumerate(cats) if cat == target][-CONFIG.k:]
        assert positions[start:start + n].tolist() == expected
        start += n
    assert start == positions.numel()
    # the recent window: the last short_window positions, shared by every candidate
    window, window_lengths = selection.short
    assert window.tolist() == list(range(300 - CONFIG.short_window, 300))
    assert window_lengths is None


def test_request_features_carry_every_id_once() -> None:
    """The candidates one id each; the user and the given history ids on the first sample only;
    a key neither the request's user and candidates nor the given history has is empty (a
    request missing a key the model reads is ``check_request``'s error, tested below)."""
    request = make_request(300, 4)
    positions = torch.tensor([3, 7, 299])
    history = {HIST_ITEM: request.history[HIST_ITEM][positions]}
    kjt = serving.request_features(
        request, ["user_id", TARGET_ITEM, HIST_ITEM, HIST_CATEGORY, "no_such_feature"], history)
    assert kjt.lengths().tolist() == [1, 0, 0, 0, 1, 1, 1, 1, 3, 0, 0, 0, 0, 0, 0, 0,
                                      0, 0, 0, 0]
    assert kjt[TARGET_ITEM].values().tolist() == request.candidates[TARGET_ITEM].tolist()
    assert kjt[HIST_ITEM].values().tolist() == request.history[HIST_ITEM][positions].tolist()
    assert kjt["user_id"].values().tolist() == request.user["user_id"].tolist()
    assert kjt[HIST_CATEGORY].values().numel() == 0  # not in ``history``: not looked up
    assert kjt["no_such_feature"].values().numel() == 0


def replaced(request: serving.Request, group: str, key, value) -> serving.Request:
    """``request`` with ``group[key]`` (a dict field) or ``group`` (``key=None``) replaced by
    ``value(request)``; ``value=None`` removes ``group[key]``."""
    if key is None:
        return dataclasses.replace(request, **{group: value(request)})
    fields = dict(getattr(request, group))
    if value is None:
        del fields[key]
    else:
        fields[key] = value(request)
    return dataclasses.replace(request, **{group: fields})


def fill(ids: torch.Tensor, at: int, value) -> torch.Tensor:
    return ids.index_fill(0, torch.tensor([at]), value)


@pytest.mark.parametrize("group, key, value, message", [
    ("history", HIST_ITEM, lambda r: fill(r.history[HIST_ITEM], 7, 10**6),
     "history['hist_item'], behavior 7: id 1000000 outside the table of 400 rows"),
    ("history", HIST_CATEGORY, lambda r: fill(r.history[HIST_CATEGORY], 0, -1),
     "history['hist_category'], behavior 0: id -1 outside the table of 20 rows"),
    ("candidates", TARGET_ITEM, lambda r: fill(r.candidates[TARGET_ITEM], 2, 400),
     "candidates['target_item'], candidate 2: id 400 outside the table of 400 rows"),
    ("candidates", TARGET_CATEGORY, lambda r: fill(r.candidates[TARGET_CATEGORY], 3, 20),
     "candidates['target_category'], candidate 3: id 20 outside the table of 20 rows"),
    ("user", "user_id", lambda r: torch.tensor([100]),
     "user['user_id'], value 0: id 100 outside the table of 100 rows"),
    ("user", "context_hour", lambda r: torch.tensor([3, 24]),
     "user['context_hour'], value 1: id 24 outside the table of 24 rows"),
    ("history_time", None, lambda r: fill(r.history_time, 299, r.request_time),
     lambda r: f"history time of 'history', behavior 299: time {r.request_time} is not before "
               f"the request time {r.request_time}"),
    ("history_time", None, lambda r: r.history_time.flip(0),
     "history time of 'history', behavior 1: earlier than behavior 0"),
    ("history", HIST_CATEGORY, lambda r: r.history[HIST_CATEGORY][:-1],
     "sequence 'history': its history keys and times need one value per behavior, got lengths "
     "{'hist_item': 300, 'hist_category': 299, 'time': 300}"),
    ("history_time", None, lambda r: r.history_time[:-1],
     "sequence 'history': its history keys and times need one value per behavior"),
    ("candidates", TARGET_CATEGORY, lambda r: r.candidates[TARGET_CATEGORY][:-1],
     "candidates: every candidate key needs one id per candidate, got "
     "{'target_item': 4, 'target_category': 3}"),
    ("candidates", TARGET_CATEGORY, lambda r: r.candidates[TARGET_CATEGORY].view(2, 2),
     "candidates['target_category']: expected a 1-D integer tensor, got torch.int64 of shape "
     "(2, 2)"),
    ("candidates", TARGET_CATEGORY, lambda r: r.candidates[TARGET_CATEGORY] + 0.9,
     "candidates['target_category']: expected a 1-D integer tensor, got torch.float32"),
    ("history", HIST_ITEM, lambda r: r.history[HIST_ITEM] > 0,
     "history['hist_item']: expected a 1-D integer tensor, got torch.bool"),
    ("history_time", None, lambda r: r.history_time.double(),
     "history_time: expected a 1-D integer tensor, got torch.float64"),
    # a key the model reads, missing
    ("candidates", TARGET_CATEGORY, None,
     "candidates['target_category']: missing (sequence 'history')"),
    ("history", HIST_ITEM, None, "history['hist_item']: missing (sequence 'history')"),
    ("user", "user_id", None, "feature 'user_id' (pooled): missing from the request"),
    ("history_time", None, lambda r: None, "history_time: missing"),
    # not an int request time; a bool id (read as 0 / 1 by the searches)
    ("request_time", None, lambda r: None, "request_time: expected an int, got None"),
    ("request_time", None, lambda r: float(r.request_time), "request_time: expected an int, got"),
    ("user", "user_id", lambda r: torch.tensor([True]),
     "user['user_id']: expected a 1-D integer tensor, got torch.bool of shape (1,)"),
])
def test_bad_requests_name_the_field_and_position(group: str, key, value, message) -> None:
    model = model_of("eta")
    request = make_request(300, 4)
    serving.score_request(model, request)  # the good one passes
    bad = replaced(request, group, key, value)
    if callable(message):
        message = message(request)
    with pytest.raises(serving.RequestError, match=re.escape(message)):
        serving.score_request(model, bad)
    with pytest.raises(serving.RequestError, match=re.escape(message)):
        serving.check_request(bad, model)


def test_table_rows_of_every_feature() -> None:
    assert model_of("eta").table_rows == {
        "user_id": 100, "context_hour": 24, TARGET_ITEM: 400, HIST_ITEM: 400,
        TARGET_CATEGORY: 20, HIST_CATEGORY: 20}
    assert model_of("avgpool").table_rows[HIST_ITEM] == 400


def test_table_weights_read_the_rows_the_modules_look_up() -> None:
    """The plain collections' tables, read by id, give the rows their forward gives (the EBC's
    one-id bags pooled, sum or mean); a weighted EBC's are not read directly (``None``)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.modules.embedding_configs import PoolingType

    model = model_of("eta")
    request = make_request(300, 16)
    used = torch.tensor([3, 7, 7, 120, 299]).unique()
    weights = serving.table_weights(model.embedding_collection)
    assert weights is not None
    (target, rows), = serving.request_rows(model, request, {"history": used}).values()
    history = {k: request.history[k][used] for k in (HIST_ITEM, HIST_CATEGORY)}
    embeddings = model.embedding_collection(
        serving.request_features(request, model.sequence_arch.lookup_keys, history))
    d = weights[HIST_ITEM].size(1)
    assert rows.shape == (used.numel(), d + weights[HIST_CATEGORY].size(1))
    assert torch.equal(rows[:, :d], embeddings[HIST_ITEM].values())
    assert torch.equal(rows[:, d:], embeddings[HIST_CATEGORY].values())
    assert torch.equal(target, torch.cat([embeddings[TARGET_ITEM].values(),
                                          embeddings[TARGET_CATEGORY].values()], dim=1))
    for pooling in (PoolingType.SUM, PoolingType.MEAN):
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"], pooling=pooling)])
        kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([4, 9, 0]),
                                lengths=torch.tensor([1, 1, 1]))
        direct = serving.table_weights(ebc)["f"].index_select(0, torch.tensor([4, 9, 0]))
        assert torch.equal(ebc(kjt)["f"], direct)
    weighted = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])], is_weighted=True)
    assert serving.table_weights(weighted) is None


@pytest.mark.parametrize("name", ["eta", "sim-hard", "own"])
def test_request_from_batch_scores_as_the_batch(name: str) -> None:
    """``request_from_batch(batch, model, i)`` is sample i as a request: its one candidate's
    logit equals the model's on the batch (the synthetic schema with the dense timestamps, and
    the two-sequence own model with time keys; 4 candidates per generated request)."""
    from torchrec_longseq.data import SyntheticGenerator
    if name == "own":
        from own_model import build_own_model, own_batch
        torch.manual_seed(0)
        model = build_own_model(DATA, dim=8, clicks_k=8, buys_k=4).eval()
        batch = own_batch(SyntheticGenerator(DATA), "test", 0, 8)
    else:
        model = model_of(name)
        batch = SyntheticGenerator(DATA).batch("test", 0, 8)
    with torch.no_grad():
        expected = model(batch.features, batch.history_time, batch.request_time)[0]
    for i in range(8):
        request = serving.request_from_batch(batch, model, i)
        assert request.num_candidates == 1
        torch.testing.assert_close(serving.score_request(model, request), expected[i:i + 1],
                                   rtol=1e-5, atol=1e-6)
    assert serving.request_from_batch(batch, model, 2, 4).num_candidates == 4
    with pytest.raises(ValueError, match="samples 6 to 8 of a batch of 8"):
        serving.request_from_batch(batch, model, 6, 3)
