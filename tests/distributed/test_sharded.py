"""2-rank gloo tests: DistributedModelParallel on CPU equals the unsharded model (training
forward, and serving a request).

TorchRec does not test EmbeddingCollection sharding on CPU itself, so these do: table-wise,
column-wise and row-wise (EmbeddingCollection only: no CPU kernel for a row-wise
EmbeddingBagCollection) plans, for every model family (pooled EBC, EC, two ECs, a derived table).
Each case spawns 2 processes (~10-20 s).
"""

import os
import signal
import tempfile
import traceback
from typing import Dict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import ShardedTensor
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from torchrec_longseq import serving
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.models.longseq_ctr import LongSeqCTR, LongSeqCTRTrain, ModelConfig, build_model
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.train import sharding_planner, table_parameters

WORLD = 2
DATA = SyntheticConfig(max_seq_len=120, min_seq_len=0, num_users=500, num_items=1000,
                       num_categories=10, subclusters=10)
POOLED_TABLES = {"user", "hour"}


def _worker(rank: int, store: str, fn, args, results) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
        fn(rank, *args)
    except Exception:  # report to the parent: mp.spawn only says "process exited"
        results.put((rank, traceback.format_exc()))
        raise
    results.put((rank, None))  # finished


def spawn(fn, *args) -> None:
    """Run ``fn(rank, *args)`` on ``WORLD`` gloo ranks. Fails with a rank's traceback if one
    raised, and fails as well if a rank did not finish without raising (killed, crashed in a
    compiled kernel, exited): only a rank that reports back counts as done."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    died = ""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        try:
            mp.spawn(_worker, args=(store, fn, args, results), nprocs=WORLD, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # or killed
            died = str(e)
    finished, errors = set(), []
    while not results.empty():
        rank, error = results.get()
        if error is None:
            finished.add(rank)
        else:
            errors.append(f"rank {rank}:\n{error}")
    if errors:
        pytest.fail(errors[0])
    if len(finished) < WORLD:
        pytest.fail(f"ranks {sorted(set(range(WORLD)) - finished)} did not finish: {died}")


def _rank_1_raises(rank: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed")


def _rank_1_exits(rank: int) -> None:
    if rank == 1:
        os._exit(0)  # stops without raising, and with a success code


def _rank_1_is_killed(rank: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as a crash in a compiled kernel or the OOM killer


@pytest.mark.parametrize("fn, message", [(_rank_1_raises, "rank 1 failed"),
                                         (_rank_1_exits, r"ranks \[1\] did not finish"),
                                         (_rank_1_is_killed, r"ranks \[1\] did not finish")])
def test_spawn_fails_when_a_rank_does_not_finish(fn, message: str) -> None:
    """The helper every test here runs through: a rank that raises, exits or dies fails the
    test (it used to pass when a rank died without a Python exception). Ranks that finish pass:
    the tests below."""
    with pytest.raises(pytest.fail.Exception, match=message):
        spawn(fn)


def shard(model: torch.nn.Module, sharding: str) -> DistributedModelParallel:
    constraints = {}
    for name in table_parameters(model):
        table = name.split(".")[-2]
        kind = "table_wise" if (table in POOLED_TABLES or "embedding_bags." in name) and \
            sharding == "row_wise" else sharding
        constraints[table] = ParameterConstraints(sharding_types=[kind])
    planner = sharding_planner(WORLD, torch.device("cpu"), constraints)
    plan = planner.collective_plan(model, pg=dist.GroupMember.WORLD)
    return DistributedModelParallel(module=model, device=torch.device("cpu"), plan=plan)


def copy_weights(sharded: DistributedModelParallel, full: Dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into the sharded model, shard by shard."""
    with torch.no_grad():
        for key, value in sharded.state_dict().items():
            source = full[key]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(source[r:r + h, c:c + w])
            else:
                value.copy_(source)


def full_weights(sharded: DistributedModelParallel, key: str, shape) -> torch.Tensor:
    """Gather a sharded table to every rank."""
    out = torch.zeros(shape) if dist.get_rank() == 0 else None
    sharded.state_dict()[key].gather(dst=0, out=out)
    result = out if out is not None else torch.zeros(shape)
    dist.broadcast(result, src=0)
    return result


def _forward_equal(rank: int, model_name: str, sharding: str) -> None:
    torch.manual_seed(0)
    batch = SyntheticGenerator(DATA).batch("train", 3, 32)
    reference = build_model(model_name, ModelConfig(), DATA.table_sizes)
    reference.refresh_derived_tables()
    expected, expected_aux = reference(batch.features, batch.history_time, batch.request_time)
    state = {k: v.clone() for k, v in reference.state_dict().items()}

    torch.manual_seed(1)  # different initial weights: the copy must do the work
    sharded = shard(build_model(model_name, ModelConfig(), DATA.table_sizes), sharding)
    copy_weights(sharded, state)
    ctr = next(m for m in sharded.modules() if isinstance(m, LongSeqCTR))
    ctr.refresh_derived_tables()
    logits, aux = sharded(batch.features, batch.history_time, batch.request_time)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert len(aux) == len(expected_aux)
    for got, want in zip(aux, expected_aux):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # serving on the sharded model (its lookups called on the request's KJT, a collective: each
    # rank serves its own user) scores as the unsharded model (which reads its tables directly)
    request = serving.synthetic_request(DATA, 100, 7, seed=rank)
    assert serving.table_weights(ctr.sparse_arch) is None
    assert ctr.embedding_collection is None or \
        serving.table_weights(ctr.embedding_collection) is None
    torch.testing.assert_close(serving.score_request(ctr, request),
                               serving.score_request(reference, request), rtol=1e-4, atol=1e-5)


FORWARD_CASES = [
    ("avgpool", "table_wise"),
    ("avgpool", "column_wise"),
    ("din-full", "table_wise"),
    ("din-full", "column_wise"),
    ("din", "row_wise"),
    ("sim-hard", "row_wise"),
    ("sim-soft", "row_wise"),
    ("sim-soft", "table_wise"),
    ("eta", "column_wise"),
    ("sdim", "table_wise"),
    ("twin", "row_wise"),
]


def _all_forward_equal(rank: int) -> None:
    for model_name, sharding in FORWARD_CASES:  # one process group for all: spawning is the cost
        try:
            _forward_equal(rank, model_name, sharding)
        except AssertionError as e:
            raise AssertionError(f"{model_name} sharded {sharding}: {e}") from e


def test_sharded_forward_equals_unsharded() -> None:
    spawn(_all_forward_equal)


def _derived_tables_exact(rank: int, model_name: str, sharding: str, refresh_every: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig(refresh_every=refresh_every)
    model = LongSeqCTRTrain(build_model(model_name, config, DATA.table_sizes))
    apply_optimizer_in_backward(RowWiseAdagrad, list(table_parameters(model).values()), {"lr": 0.5})
    sharded = shard(model, sharding)
    # dense parameters move too (TWIN's tables derive from its projections)
    dense = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(sharded.named_parameters())],
                            lr=0.5)
    ctr = next(m for m in sharded.modules() if isinstance(m, LongSeqCTR))
    tables = [m for m in sharded.modules() if isinstance(m, ItemDerivedTable)]
    assert {t.source for t in tables} == {"item", "category"}
    ctr.refresh_derived_tables()
    initial = [t.table.clone() for t in tables]
    generator = SyntheticGenerator(DATA)
    steps = 4
    for step in range(1, steps + 1):
        loss, _ = sharded(generator.batch("train", step * WORLD + rank, 32))
        loss.backward()
        dense.step()
        dense.zero_grad()
        ctr.sequence_arch.refresh_pending()  # what the next forward does first
    dim = ModelConfig().embedding_dim
    for table, before in zip(tables, initial):
        name = table.source
        key = next(k for k in sharded.state_dict()
                   if k.endswith(f"embedding_collection.embeddings.{name}.weight"))
        weights = full_weights(sharded, key, (table.table.size(0), dim))
        expected = table.derive(weights)
        assert (expected != before).any(1).any(), f"{model_name} {name}: training changed no row"
        # exact mode: after every step; periodic mode: right after the rebuild at step 4.
        # Signatures are bit-exact; float rows (TWIN) up to matmul rounding.
        exact = table.table.dtype == torch.int64
        torch.testing.assert_close(table.table, expected, rtol=0 if exact else 1e-5,
                                   atol=0 if exact else 1e-6)
        # every rank holds the same table
        gathered = [torch.zeros_like(table.table) for _ in range(WORLD)]
        dist.all_gather(gathered, table.table)
        assert torch.equal(gathered[0], gathered[1])


DERIVED_CASES = [
    ("eta", "table_wise", 1),
    ("eta", "column_wise", 1),
    ("eta", "row_wise", 2),
    ("sdim", "column_wise", 1),
    ("twin", "table_wise", 1),
    ("twin", "row_wise", 2),
]


def _all_derived_tables_exact(rank: int) -> None:
    for model_name, sharding, refresh_every in DERIVED_CASES:
        try:
            _derived_tables_exact(rank, model_name, sharding, refresh_every)
        except AssertionError as e:
            raise AssertionError(f"{model_name} sharded {sharding}: {e}") from e


def test_derived_tables_equal_deriving_from_current_weights() -> None:
    """ETA's signatures, SDIM's hash codes and TWIN's projected keys after 4 training steps on
    2 ranks: exact mode (table-wise, column-wise: rows split across ranks by columns) and
    periodic mode (row-wise, every 2 steps; checked right after a rebuild)."""
    spawn(_all_derived_tables_exact)


# ------------------------------------------------------------------------- a user's own model

OWN_DATA = SyntheticConfig(max_seq_len=200, num_users=1000, num_items=1000, num_categories=10,
                           subclusters=10)


def _own_model(seed: int):
    import own_model  # examples/, on sys.path through conftest (spawned ranks import it too)
    torch.manual_seed(seed)
    return own_model.build_own_model(OWN_DATA, dim=8, clicks_model="eta", buys_model="sim-hard",
                                     clicks_k=6, buys_k=3)


def _own_forward_equal(rank: int, sharding: str) -> None:
    import own_model
    generator = SyntheticGenerator(OWN_DATA)
    batch = own_model.own_batch(generator, "train", 3, 16)
    reference = _own_model(0)
    expected, _ = reference(batch.features, None, batch.request_time)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    train = LongSeqCTRTrain(_own_model(1))
    apply_optimizer_in_backward(RowWiseAdagrad, list(table_parameters(train).values()), {"lr": 0.5})
    sharded = shard(train, sharding)
    copy_weights(sharded, {f"model.{k}": v for k, v in state.items()})
    ctr = next(m for m in sharded.modules() if isinstance(m, LongSeqCTR))
    ctr.refresh_derived_tables()
    seen = []
    ctr.sequence_arch.embedding_collection.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0]))
    logits, aux = ctr(batch.features, None, batch.request_time)
    assert aux == [] and len(seen) == 1  # both sequences in one lookup
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    request = own_model.own_request(own_model.own_batch(generator, "train", 5 + rank, 4), 1, 9,
                                    OWN_DATA)
    torch.testing.assert_close(serving.score_request(ctr, request),
                               serving.score_request(reference.eval(), request),
                               rtol=1e-4, atol=1e-5)
    # train: the exact signature tables follow the sharded weights
    apply = [m for m in sharded.modules() if isinstance(m, ItemDerivedTable)]
    assert {t.source for t in apply} == {"item", "cate", "shop"}
    before = [t.table.clone() for t in apply]
    for step in range(3):
        loss, _ = sharded(own_model.own_batch(generator, "train", 10 + step * WORLD + rank, 16))
        loss.backward()
    ctr.sequence_arch.refresh_pending()
    for table in apply:
        key = next(k for k in sharded.state_dict()
                   if k.endswith(f"embedding_collection.embeddings.{table.source}.weight"))
        weights = full_weights(sharded, key, (table.table.size(0), 8))
        assert torch.equal(table.table, table.derive(weights)), table.source
    assert any((t.table != b).any() for t, b in zip(apply, before))  # training changed rows


def _all_own_forward_equal(rank: int) -> None:
    for sharding in ("table_wise", "column_wise", "row_wise"):
        try:
            _own_forward_equal(rank, sharding)
        except AssertionError as e:
            raise AssertionError(f"own model sharded {sharding}: {e}") from e


def test_own_model_sharded_equals_unsharded() -> None:
    """The user's model (their keys and tables, three ids per behavior, ETA over clicks and SIM
    hard over purchases): sharded table-, column- and row-wise on 2 ranks, its forward (one
    lookup for both sequences) and serving equal the unsharded model's; after training steps
    (fused row-wise Adagrad on the tables) ETA's signature tables equal hashing the sharded
    weights."""
    spawn(_all_own_forward_equal)
