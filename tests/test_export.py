"""The exported serving artefact (``serving.export`` / ``serving.load``): loaded in a fresh
process, without the model, it scores requests as the eager ``score_request`` does, for every
model, at history lengths 0, 1, 1,000 and 10,000 and 1 or 200 candidates."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from own_model import build_own_model, own_batch, own_request
from torchrec_longseq import serving
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.export import METADATA
from torchrec_longseq.models.longseq_ctr import MODELS, ModelConfig, build_model
from torchrec_longseq.schema import default_schema

DATA = SyntheticConfig(max_seq_len=300, min_seq_len=300, num_users=100, num_items=400,
                       num_categories=20, subclusters=4)
CONFIG = ModelConfig(k=8, short_window=6, twin_k=10)
SHAPES = [(length, c) for length in (0, 1, 1000, 10_000) for c in (1, 200)]


def random_request(length: int, candidates: int, seed: int) -> serving.Request:
    """A request of the synthetic schema with a random history of ``length`` behaviors (ids
    drawn over the whole tables, sorted random times) and ``candidates`` random items."""
    g = torch.Generator().manual_seed(seed)
    item, category = default_schema().attributes
    times = torch.randint(0, 10**9, (length,), generator=g).sort().values
    items = torch.randint(0, DATA.num_items, (candidates,), generator=g)
    return serving.Request(
        user={"user_id": torch.randint(0, DATA.num_users, (1,), generator=g),
              "context_hour": torch.randint(0, 24, (1,), generator=g)},
        history={item.history_key: torch.randint(0, DATA.num_items, (length,), generator=g),
                 category.history_key: torch.randint(0, DATA.num_categories, (length,),
                                                     generator=g)},
        candidates={item.candidate_key: items,
                    category.candidate_key: items // DATA.items_per_category},
        request_time=10**9 + 1, history_time=times)


# ETA on the torch ops, TWIN with esu_evidence and esu_similarity (per-pair logit terms, the
# latter in its search too), ETA with esu_similarity
VARIANTS = ["eta:torch", "twin:evidence+similarity", "eta:similarity"]


def model_of(name: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, dataclasses.replace(CONFIG, **config), DATA.table_sizes).eval()
    model.refresh_derived_tables()
    return model


LOADER = """
import json, sys, torch
from torchrec_longseq import serving
cases = torch.load(sys.argv[1], weights_only=False)
out = {}
for name, (path, requests, expected) in cases.items():
    scorer = serving.load(path)
    out[name] = [float((scorer(r) - e).abs().max()) if e.numel() else 0.0
                 for r, e in zip(requests, expected)]
    out[name + ":shapes"] = [list(scorer(r).shape) for r in requests]
print(json.dumps(out))
"""


def load_elsewhere(cases: Dict[str, tuple], tmp: Path) -> Dict[str, List[float]]:
    """Load each artefact in a fresh process (``LOADER``: no model built there) and return, per
    case, the largest difference of its logits from the expected ones, per request."""
    torch.save(cases, tmp / "cases.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp / "cases.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[str, List[float]]:
    """Every model exported (the compiled operators), ETA also with ``kernel="torch"`` and with
    the ESU's similarity term, TWIN with the ESU's evidence and similarity term and the
    two-sequence model of ``examples/own_model.py``; each loaded in one fresh process."""
    tmp = tmp_path_factory.mktemp("export")
    requests = [random_request(length, c, seed) for seed, (length, c) in enumerate(SHAPES)]
    example = random_request(257, 37, 99)
    cases = {}
    for name in MODELS + VARIANTS:
        base, _, variant = name.partition(":")
        options = variant.split("+")
        model = model_of(base, esu_evidence="evidence" in options,
                         esu_similarity="item" if "similarity" in options else None)
        kernel = "torch" if variant == "torch" else None
        path = serving.export(model, tmp / name.replace(":", "-"), example, kernel=kernel)
        cases[name] = (str(path), requests, [serving.score_request(model, r) for r in requests])
    data = SyntheticConfig(max_seq_len=300, num_users=100, num_items=400, num_categories=20,
                           subclusters=4)
    torch.manual_seed(0)
    own = build_own_model(data, dim=8, clicks_k=8, buys_k=4).eval()
    batch = own_batch(SyntheticGenerator(data), "test", 0, 8)
    own_requests = [own_request(batch, s, c, data, seed=s) for s, c in [(0, 1), (1, 200), (2, 7)]]
    path = serving.export(own, tmp / "own", own_requests[2])
    cases["own"] = (str(path), own_requests, [serving.score_request(own, r) for r in own_requests])
    return {"tmp": tmp, **load_elsewhere(cases, tmp)}


@pytest.mark.parametrize("name", MODELS + VARIANTS + ["own"])
def test_loaded_artefact_equals_eager_scoring(name: str, exported) -> None:
    """Within 1e-5 of ``score_request`` at L = 0, 1, 1,000, 10,000 and C = 1, 200 (own: the
    two-sequence model of ``examples/own_model.py``, its histories as generated)."""
    diffs = exported[name]
    assert len(diffs) == (3 if name == "own" else len(SHAPES))
    assert max(diffs) <= 1e-5, dict(zip(SHAPES, diffs))
    if name != "own":
        assert exported[name + ":shapes"] == [[c] for _, c in SHAPES]


def test_torch_artefact_calls_no_compiled_operator(exported) -> None:
    """``kernel="torch"``: a graph of torch operators only (it loads where the ``longseq``
    operators cannot be built); the default graph calls them (the ETA search among them)."""
    tmp = exported["tmp"]
    torch_ops = json.loads((tmp / "eta-torch" / METADATA).read_text())["longseq_ops"]
    compiled = json.loads((tmp / "eta" / METADATA).read_text())["longseq_ops"]
    assert torch_ops == [] and "longseq::hamming_topk_shared" in compiled


def test_loaded_artefact_checks_requests(exported) -> None:
    """The artefact checks a request as ``score_request`` does (from the kept schema and table
    sizes), and names what the graph cannot take."""
    scorer = serving.load(exported["tmp"] / "eta-torch")
    good = random_request(50, 3, 0)
    assert scorer(good).shape == (3,)
    bad = serving.Request({**good.user}, {**good.history, "hist_item": good.history[
        "hist_item"].clone().index_fill_(0, torch.tensor([7]), DATA.num_items)},
        good.candidates, good.request_time, good.history_time)
    with pytest.raises(serving.RequestError, match=r"history\['hist_item'\], behavior 7: id 400"):
        scorer(bad)
    two_ids = serving.Request({**good.user, "user_id": torch.tensor([1, 2])}, good.history,
                              good.candidates, good.request_time, good.history_time)
    with pytest.raises(serving.RequestError, match=r"user\['user_id'\]: the exported graph "
                                                   r"takes 1 ids, got 2"):
        scorer(two_ids)
    none = serving.Request(good.user, good.history, {k: v[:0] for k, v in good.candidates.items()},
                           good.request_time, good.history_time)
    assert scorer(none).shape == (0,)


def test_export_refuses_a_lookup_it_cannot_read(monkeypatch, tmp_path) -> None:
    """A lookup module whose tables the graph cannot read (sharded, quantized: here any module
    ``table_weights`` does not know) is refused, naming it, before anything is traced."""
    monkeypatch.setattr(serving, "table_weights", lambda collection: None)
    with pytest.raises(ValueError, match="model.sparse_arch is a EmbeddingBagCollection, not a "
                                         "plain"):
        serving.export(model_of("eta"), tmp_path / "x", random_request(10, 2, 0))


def test_a_training_run_exports_its_trained_model(tmp_path: Path) -> None:
    """``python -m torchrec_longseq.export RUN OUT`` after a 2-rank sharded run: ``from_run``
    rebuilds the model from the run's config.yaml with the checkpoint's state gathered into
    plain tables, which gives the test AUC the sharded run reported (the same test batches of
    both ranks); the artefact scores a request as that model does."""
    from test_train import train  # the 2-rank torchrun of tests/test_train.py
    from torchmetrics.classification import BinaryAUROC

    from torchrec_longseq import export
    from torchrec_longseq.data.synthetic import SyntheticLifelongSequences

    run = tmp_path / "run"
    reported = train(run, "--model", "eta", "--steps", "6", "--checkpoint-every", "6")
    done = subprocess.run([sys.executable, "-m", "torchrec_longseq.export", str(run),
                           str(tmp_path / "artefact")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"exported to {tmp_path / 'artefact'}")
    assert done.stderr == ""  # the known notices filtered, nothing else printed
    model, example = export.from_run(run)
    auc = BinaryAUROC()
    data = SyntheticConfig(seed=0, max_seq_len=100)
    for rank in range(2):
        for batch in SyntheticLifelongSequences(data, "test", 32, num_batches=4, rank=rank,
                                                world_size=2):
            with torch.no_grad():
                logits = model(batch.features, batch.history_time, batch.request_time)[0]
            auc.update(logits, batch.labels.long())
    assert float(auc.compute()) == pytest.approx(reported["auc"], abs=1e-6)
    request = serving.request_from_batch(
        next(iter(SyntheticLifelongSequences(data, "test", 32, num_batches=1))), model, 3, 20)
    torch.testing.assert_close(serving.load(tmp_path / "artefact")(request),
                               serving.score_request(model, request), rtol=0, atol=1e-5)
    assert example.num_candidates == 8


def test_a_run_on_a_prepared_store_exports_with_its_id_mappings(tmp_path: Path) -> None:
    """A 2-rank run on a Taobao-layout store (two sequences with time keys, ETA over clicks and
    SIM hard over buys) exports through the CLI; the artefact carries the store's id mappings
    and scores a test request as the rebuilt model does."""
    import taobao_user_behavior
    from test_train import train

    from torchrec_longseq import export
    from torchrec_longseq.data.prepare import IdMapping
    from torchrec_longseq.data.store import SampleStore, StoreDataset, to_batch

    store = tmp_path / "store"
    taobao_user_behavior.main(["--demo", "5000", "--out", str(store), "--max-seq-len", "100",
                               "--num-shards", "2"])
    run = tmp_path / "run"
    train(run, "--data", str(store), "--model", "eta", "--sequence-model", "buys=sim-hard",
          "--steps", "3", "--checkpoint-every", "3")
    done = subprocess.run([sys.executable, "-m", "torchrec_longseq.export", str(run),
                           str(tmp_path / "artefact")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((store / "meta.json").read_text())
    column = next(c for c, t in meta["tables"].items() if t["kind"] != "hash")
    raw = IdMapping.load(store, column).keys[:5]
    mapped = IdMapping.load(tmp_path / "artefact" / "ids", column)
    assert mapped.lookup(raw).tolist() == [1, 2, 3, 4, 5]  # row r is the r-th sorted raw id
    model, _ = export.from_run(run)
    loaded = SampleStore(store)
    batch = to_batch(next(iter(StoreDataset(loaded, "test", 16).batches())), loaded)
    request = serving.request_from_batch(batch, model, 2, 9)
    torch.testing.assert_close(serving.load(tmp_path / "artefact")(request),
                               serving.score_request(model, request), rtol=0, atol=1e-5)


@pytest.mark.parametrize("length, candidates, named", [(10, 1, "1 candidates"),
                                                       (1, 5, "1 behaviors in sequence 'history'"),
                                                       (0, 5, "0 behaviors in sequence 'history'")])
def test_export_names_an_example_too_small_to_trace(length: int, candidates: int, named: str,
                                                   tmp_path) -> None:
    """torch.export would fix a size of 0 or 1 seen in the example: such an example is refused
    before tracing, naming what is too small."""
    with pytest.raises(ValueError, match=f"the example request has {named};"):
        serving.export(model_of("din"), tmp_path / "x", random_request(length, candidates, 0))
