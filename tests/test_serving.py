"""Serving a request with the history searched once equals scoring its candidates one sample each."""

import pytest
import torch

from torchrec_longseq import serving
from torchrec_longseq.data import SyntheticConfig
from torchrec_longseq.data.batch import HIST_ITEM
from torchrec_longseq.models.longseq_ctr import MODELS, ModelConfig, build_model

DATA = SyntheticConfig(max_seq_len=300, min_seq_len=300, num_users=100, num_items=400,
                       num_categories=20, subclusters=4)
CONFIG = ModelConfig(k=8, short_window=6, twin_k=10)


def make_request(length: int, candidates: int, seed: int = 0) -> serving.Request:
    return serving.synthetic_request(DATA, length, candidates, seed)


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, CONFIG, DATA.table_sizes).eval()
    model.refresh_derived_tables()
    return model


def independent(model, request: serving.Request) -> torch.Tensor:
    batch = serving.request_batch(request)
    assert batch.features[HIST_ITEM].values().numel() == request.num_candidates * \
        request.history_item.numel()
    with torch.no_grad():
        return model(batch.features, batch.history_time, batch.request_time)[0]


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("name", MODELS)
def test_shared_history_equals_independent_samples(name: str, kernels: str, monkeypatch) -> None:
    monkeypatch.setenv("TORCHREC_LONGSEQ_KERNELS", kernels)
    model = model_of(name)
    for length, candidates in [(300, 16), (5, 3), (0, 2), (300, 1)]:
        request = make_request(length, candidates)
        expected = independent(model, request)
        got = serving.score_request(model, request)
        assert got.shape == (candidates,) and torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} L={length} C={candidates}")


@pytest.mark.parametrize("name", ["din", "sim-hard", "sim-soft", "eta", "twin"])
def test_compact_batch_is_bounded(name: str) -> None:
    """Each candidate carries at most k (or TWIN's k) + short window behaviors, whatever L is."""
    model = model_of(name)
    request = make_request(300, 16)
    batch = serving.compact_batch(model, request)
    assert batch is not None
    bound = (CONFIG.twin_k if name == "twin" else CONFIG.k) + CONFIG.short_window
    lengths = batch.features[HIST_ITEM].lengths()
    assert lengths.max() <= bound and lengths.min() >= CONFIG.short_window


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


def test_models_reading_everything_have_no_compact_batch() -> None:
    for name in ["avgpool", "din-full", "sdim"]:
        assert serving.compact_batch(model_of(name), make_request(50, 2)) is None
