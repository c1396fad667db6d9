"""Serving a request with the history searched once equals scoring its candidates one sample each."""

import pytest
import torch

from torchrec_longseq import serving
from torchrec_longseq.data import SyntheticConfig
from torchrec_longseq.data.batch import HIST_ITEM, TARGET_ITEM
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
    batch = serving.request_batch(request)
    assert batch.features[HIST_ITEM].values().numel() == request.num_candidates * \
        request.history_item.numel()
    with torch.no_grad():
        return model(batch.features, batch.history_time, batch.request_time)[0]


def through_the_modules(monkeypatch) -> None:
    """Serve as for a lookup module whose tables cannot be read directly (sharded, quantized):
    every lookup through the module's forward on ``request_features``."""
    monkeypatch.setattr(serving, "table_weights", lambda collection: None)


@pytest.mark.parametrize("lookup", ["tables", "modules"])
@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("name", MODELS)
def test_shared_history_equals_independent_samples(name: str, kernels: str, lookup: str,
                                                   monkeypatch) -> None:
    monkeypatch.setenv("TORCHREC_LONGSEQ_KERNELS", kernels)
    if lookup == "modules":
        through_the_modules(monkeypatch)
    model = model_of(name)
    for length, candidates in [(300, 16), (5, 3), (0, 2), (300, 1), (300, 0)]:
        request = make_request(length, candidates)
        expected = independent(model, request)
        # score_shared, not score_request: that one falls back to independent samples for a
        # module it does not know, which would then be compared with themselves
        got = serving.score_shared(model, request)
        assert got is not None
        assert got.shape == (candidates,) and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} L={length} C={candidates}")
        torch.testing.assert_close(serving.score_request(model, request), got, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["eta", "twin"])
def test_shared_history_without_short_term_branch(name: str) -> None:
    """``short_window=0`` (the long-term path alone) serves like the batch too."""
    model = model_of(name, ModelConfig(k=8, short_window=0, twin_k=10))
    assert model.sequence_arch.short_term is None
    request = make_request(300, 16)
    torch.testing.assert_close(serving.score_request(model, request), independent(model, request),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["din", "din-full", "sim-hard", "sim-soft", "eta", "twin", "sdim"])
def test_shared_lookup_is_bounded(name: str, monkeypatch) -> None:
    """One EmbeddingCollection call per request, reading the C candidates and at most
    C k (TWIN's k) + window distinct history rows per table (SDIM: the user's distinct behaviors
    + window; the whole-history model: each behavior once), whatever L is; the sequence module's
    own forward is not called."""
    through_the_modules(monkeypatch)
    model = model_of(name)
    request = make_request(300, 16)
    calls = []
    lookup = model.embedding_collection.forward
    monkeypatch.setattr(model.embedding_collection, "forward",
                        lambda kjt: calls.append(kjt) or lookup(kjt))
    monkeypatch.setattr(model.sequence_arch, "forward", None)  # would raise if called
    assert serving.score_shared(model, request) is not None
    k = 0 if name == "din" else CONFIG.twin_k if name == "twin" else CONFIG.k
    assert len(calls) == 1
    counts = dict(zip(calls[0].keys(), calls[0].length_per_key()))
    assert counts[TARGET_ITEM] == 16
    if name == "sdim":
        pairs = {(int(i), int(c)) for i, c in zip(request.history_item, request.history_category)}
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
    assert serving.score_shared(model, request) is not None
    assert len(calls) == 1
    counts = dict(zip(calls[0].keys(), calls[0].length_per_key()))
    assert counts[HIST_ITEM] == 300 and counts[TARGET_ITEM] == 16


def test_hard_search_shared_matches_per_candidate_loop() -> None:
    model = model_of("sim-hard")
    request = make_request(300, 16)
    positions, lengths = serving.shared_search(model.sequence_arch.search, request)
    cats = request.history_category.tolist()
    start = 0
    for c, n in enumerate(lengths.tolist()):
        target = int(request.candidate_category[c])
        expected = [p for p, cat in enumerate(cats) if cat == target][-CONFIG.k:]
        assert positions[start:start + n].tolist() == expected
        start += n


def test_request_features_carry_every_id_once() -> None:
    """The candidates one id each; the user and the history positions on the first sample only;
    a key a request does not have is an error naming it."""
    request = make_request(300, 4)
    positions = torch.tensor([3, 7, 299])
    kjt = serving.request_features(request, ["user_id", TARGET_ITEM, HIST_ITEM], positions)
    assert kjt.lengths().tolist() == [1, 0, 0, 0, 1, 1, 1, 1, 3, 0, 0, 0]
    assert kjt[TARGET_ITEM].values().tolist() == request.candidate_item.tolist()
    assert kjt[HIST_ITEM].values().tolist() == request.history_item[positions].tolist()
    assert kjt["user_id"].values().tolist() == [request.user_id]
    with pytest.raises(KeyError, match="no_such_feature"):
        serving.request_features(request, ["no_such_feature"], positions)


@pytest.mark.parametrize("field, value, message", [
    ("history_item", lambda r: r.history_item.index_fill(0, torch.tensor([7]), 10**6),
     "history_item, behavior 7: id 1000000 outside the table of 400 rows"),
    ("history_category", lambda r: r.history_category.index_fill(0, torch.tensor([0]), -1),
     "history_category, behavior 0: id -1 outside"),
    ("candidate_item", lambda r: r.candidate_item.index_fill(0, torch.tensor([2]), 400),
     "candidate_item, candidate 2: id 400 outside the table of 400 rows"),
    ("candidate_category", lambda r: r.candidate_category.index_fill(0, torch.tensor([3]), 20),
     "candidate_category, candidate 3: id 20 outside"),
    ("user_id", lambda r: 100, "user_id: id 100 outside the table of 100 rows"),
    ("history_time", lambda r: r.history_time.index_fill(0, torch.tensor([299]), r.request_time),
     "history_time, behavior 299: time .* is not before the request time"),
    ("history_time", lambda r: r.history_time.flip(0), "history_time, behavior 1: earlier than"),
    ("history_category", lambda r: r.history_category[:-1], "behaviors: the fields"),
    ("candidate_category", lambda r: r.candidate_category.view(2, 2), "candidates: the fields"),
    ("candidate_category", lambda r: r.candidate_category + 0.9,
     "candidate_category: expected integers, got torch.float32"),
    ("history_item", lambda r: r.history_item > 0, "history_item: expected integers, got torch.bool"),
    ("history_time", lambda r: r.history_time.double(), "history_time: expected integers"),
])
def test_bad_requests_name_the_field_and_position(field: str, value, message: str) -> None:
    model = model_of("eta")
    request = make_request(300, 4)
    serving.score_request(model, request)  # the good one passes
    bad = serving.Request(**{**request.__dict__, field: value(request)})
    with pytest.raises(serving.RequestError, match=message):
        serving.score_request(model, bad)


def test_table_rows_of_every_feature() -> None:
    assert model_of("eta").table_rows == {
        "user_id": 100, "context_hour": 24, TARGET_ITEM: 400, HIST_ITEM: 400, "short_item": 400,
        "target_category": 20, "hist_category": 20, "short_category": 20}
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
    target, rows = serving.request_rows(model, request, used)
    embeddings = model.embedding_collection(
        serving.request_features(request, serving.LOOKUP_KEYS, used))
    assert torch.equal(rows[:, :weights[HIST_ITEM].size(1)], embeddings[HIST_ITEM].values())
    assert torch.equal(target[:, :weights[TARGET_ITEM].size(1)], embeddings[TARGET_ITEM].values())
    assert torch.equal(target, serving.behavior_rows(embeddings, TARGET_ITEM, "target_category"))
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
