"""Distributed training and evaluation on synthetic lifelong sequences.

Launch with torchrun (one process per rank; gloo on CPU, nccl on GPU)::

    torchrun --standalone --nproc_per_node=2 -m torchrec_longseq.train --model din-full --out runs/x

The tables are sharded by DistributedModelParallel with the planner (table-wise / column-wise
on CPU, the planner's choice on GPU) and trained by a fused row-wise Adagrad applied in backward;
dense parameters use Adam. Validation runs every ``--eval-every`` steps, the test split once at
the end; ``DIR/metrics.json`` gets auc, gauc, logloss (test), samples_per_sec, model and
max_seq_len. ``--early-stop P`` stops when the validation AUC has not improved for ``P``
validations in a row (``--eval-every`` steps apart) and tests the model of the best validation
AUC (kept in ``DIR/best``, see ``EarlyStopping``). ``--regime`` picks the synthetic data's label
rule (``data.synthetic``: ``category``, the default, or ``similarity``). ``--checkpoint-every`` saves with torch.distributed.checkpoint to ``DIR/checkpoint``;
``--resume`` continues from it (the data stream is a pure function of the step, so a resumed run
sees the batches it would have seen). ``--pipeline`` trains through TorchRec's
``TrainPipelineSparseDist``: the next batch's input distribution for the pooled features (the
sharded module fed straight from the batch) starts during this step; the EmbeddingCollection's
input is the search's output, so its lookup stays in the step. Same updates, same results
(tested). The derived tables need no call: the model refreshes them at every forward.
"""

import argparse
import json
import logging
import warnings
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.utils.data import DataLoader
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from torchrec_longseq.data import Batch, SyntheticConfig, SyntheticLifelongSequences
from torchrec_longseq.data.synthetic import REGIMES
from torchrec_longseq.data.store import SampleStore, StoreBatches, StoreDataset
from torchrec_longseq.data.validation import check_batch
from torchrec_longseq import notices
from torchrec_longseq.metrics import CTRMetrics
from torchrec_longseq.modules.sequence import Selection, history_times
from torchrec_longseq import jagged
from torchrec_longseq.models.longseq_ctr import (
    MODELS,
    LongSeqCTR,
    LongSeqCTRTrain,
    ModelConfig,
    build_model,
    build_store_model,
)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int ``>= low`` (argparse names the option in its error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


def weight(text: str) -> float:
    """An argparse type: a float ``>= 0``."""
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a YAML (or JSON) file of these options by name (e.g. "
                   "'model: eta', 'k: 50', 'sequence_model: [clicks=eta, buys=sim-hard]'); "
                   "flags on the command line override it")
    p.add_argument("--data", help="a sample store written by torchrec_longseq.data.prepare "
                   "(default: the synthetic lifelong sequences)")
    p.add_argument("--sequence-model", action="append", default=[], metavar="SEQUENCE=MODEL",
                   help="with --data: the model of one of the store's sequences (default: "
                        "--model for every sequence)")
    p.add_argument("--model", default="din-full", choices=MODELS)
    p.add_argument("--max-seq-len", type=at_least(1), default=2000)
    p.add_argument("--regime", default="category", choices=list(REGIMES),
                   help="the synthetic data's label rule: relevance by category (default) or by "
                        "item similarity with coarse categories (torchrec_longseq.data.synthetic)")
    p.add_argument("--steps", type=at_least(0), default=300, help="training steps (batches per rank)")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="samples per rank and step")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the model")
    p.add_argument("--out", default="runs/train", help="output directory")
    p.add_argument("--embedding-dim", type=at_least(1), default=16)
    p.add_argument("--k", type=at_least(0), default=50, help="behaviors retrieved by SIM / ETA")
    p.add_argument("--heads", type=at_least(1), default=4, help="ESU attention heads")
    p.add_argument("--short-window", type=at_least(0), default=50,
                   help="recent behaviors (DIN, short-term branch; 0: no short-term branch)")
    p.add_argument("--time-buckets", type=at_least(3), default=32, help="log-spaced time-interval buckets")
    p.add_argument("--hash-bits", type=at_least(1), default=64, help="ETA SimHash bits m")
    p.add_argument("--refresh-every", type=at_least(1), default=1,
                   help="ETA / SDIM / TWIN per-item tables: 1 = exact, N = all rows every N steps")
    p.add_argument("--sdim-bits", type=at_least(2), default=48, help="SDIM hash bits m")
    p.add_argument("--sdim-tau", type=at_least(1), default=3, help="SDIM bits per signature tau")
    p.add_argument("--twin-k", type=at_least(0), default=100, help="behaviors kept by TWIN's search")
    p.add_argument("--twin-bias-init", default="zero", choices=["zero", "normal"],
                   help="TWIN's time bias at the start: 0 (default) or N(0, 1) (before issue 24)")
    p.add_argument("--esu-evidence", action="store_true",
                   help="the ESU also outputs log(1 + sum exp(logit)) per head, the attention "
                        "mass its softmax divides away (opt-in, not in the papers; "
                        "docs/fidelity.md)")
    p.add_argument("--cooccurrence", type=weight, default=0.0,
                   help="weight of a co-occurrence loss over the recent window's rows, which "
                        "learns item similarity from histories (opt-in, not in the papers; "
                        "docs/fidelity.md); 0: none")
    p.add_argument("--cooccurrence-pretrain", type=at_least(0), default=0,
                   help="steps of the co-occurrence loss alone (no clicks) on the tables before "
                        "training on clicks (needs --cooccurrence W > 0)")
    p.add_argument("--pretrain-sparse-lr", type=float, default=None,
                   help="the tables' rate during --cooccurrence-pretrain (default: --sparse-lr)")
    p.add_argument("--esu-similarity", default=None, metavar="TABLE",
                   help="add the candidate-behavior cosine of TABLE's rows (e.g. item), times a "
                        "learned scale per head, to the long-term ESU's logits (sim-hard, "
                        "sim-soft, eta, twin (its search too), din-full; opt-in, not in the "
                        "papers; docs/fidelity.md)")
    p.add_argument("--gsu-overlap", action="store_true",
                   help="also report gsu_overlap at evaluation: the share of the ESU's own top-k "
                        "over the whole history that the search returns (an O(L) lookup per "
                        "batch; TWIN's GSU consistency)")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of SIM soft search's auxiliary loss")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the main CTR loss")
    p.add_argument("--dense-lr", type=float, default=3e-3)
    p.add_argument("--sparse-lr", type=float, default=0.05)
    p.add_argument("--eval-every", type=at_least(0), default=100, help="validate every N steps (0: never)")
    p.add_argument("--eval-batches", type=at_least(1), default=20, help="batches per rank per evaluation")
    p.add_argument("--early-stop", type=at_least(0), default=0, metavar="PATIENCE",
                   help="stop when the validation AUC has not improved for PATIENCE validations "
                        "in a row and test the best validated model (needs --eval-every; 0: off)")
    p.add_argument("--checkpoint-every", type=at_least(0), default=0, help="checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint")
    p.add_argument("--sharding", default="auto", choices=["auto", "table_wise", "column_wise", "row_wise"])
    p.add_argument("--num-workers", type=at_least(0), default=1, help="DataLoader workers per rank")
    p.add_argument("--kernel", default="auto", choices=["auto", "compiled", "torch"],
                   help="the searches' and attention's implementation: compiled on CPU when "
                        "built (auto), the compiled operators only, or the torch ops")
    p.add_argument("--pipeline", action="store_true",
                   help="train with TorchRec's TrainPipelineSparseDist")
    return p


def config_argv(path: str) -> List[str]:
    """The options of a YAML / JSON config file as command-line tokens (so they are checked by
    the same parser, and flags given after them win)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        options = yaml.safe_load(f) or {}
    if not isinstance(options, dict):
        raise SystemExit(f"{path}: expected a mapping of options, got {type(options).__name__}")
    known = {a.dest: a for a in parser()._actions}
    argv: List[str] = []
    for name, value in options.items():
        action = known.get(str(name).replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            raise SystemExit(f"{path}: unknown option {name!r}")
        flag = action.option_strings[-1]
        if value is None:  # null: the option's default (a run's resolved config has data: null)
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The options: ``--config FILE``'s, then the command line's (which win)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser().parse_known_args(argv)
    if first.config:
        argv = config_argv(first.config) + argv
    args = parser().parse_args(argv)
    last = {item.partition("=")[0]: item for item in args.sequence_model}  # later ones win
    args.sequence_model = list(last.values())
    return args


def init_distributed() -> torch.device:
    """Join the torchrun group (or make a one-rank group when run as a plain script)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return device


def table_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The embedding tables of every EmbeddingCollection / EmbeddingBagCollection in ``model``,
    by parameter name (``...embeddings.<table>.weight`` / ``...embedding_bags.<table>.weight``)."""
    return {n: p for n, p in model.named_parameters() if "embeddings." in n or "embedding_bags." in n}


def sharding_constraints(model: nn.Module, sharding: str) -> Dict[str, ParameterConstraints]:
    """Per-table sharding types for the planner: one type for all tables, or the CPU-safe set."""
    names = [n.split(".")[-2] for n in table_parameters(model)]
    if sharding == "auto":
        if torch.cuda.is_available():
            return {}
        types = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]
    else:
        types = [sharding]
    return {name: ParameterConstraints(sharding_types=types) for name in names}


def dense_optimizer(model: nn.Module, lr: float) -> KeyedOptimizerWrapper:
    """Adam (the fused kernel: one pass over all tensors) on the parameters that no sparse
    optimizer updates in backward, i.e. everything but the sharded tables."""
    return KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                 lambda params: torch.optim.Adam(params, lr=lr, fused=True))


def sharding_planner(world_size: int, device: torch.device,
                     constraints: Dict[str, ParameterConstraints]) -> EmbeddingShardingPlanner:
    """TorchRec's planner, set up the way it asks: the topology from ``TopologyFactory`` and a
    fixed 15% storage reservation (its default heuristic warns that it over-estimates)."""
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size), kernel_config=KernelConfig(compute_device=device.type))
    return EmbeddingShardingPlanner(topology=topology, constraints=constraints,
                                    storage_reservation=FixedPercentageStorageReservation(0.15))


def shard(model: nn.Module, device: torch.device, sharding: str, sparse_lr: float) -> DistributedModelParallel:
    """Fused row-wise Adagrad on the tables, then DistributedModelParallel with a planned plan."""
    apply_optimizer_in_backward(RowWiseAdagrad, list(table_parameters(model).values()),
                                {"lr": sparse_lr})
    planner = sharding_planner(dist.get_world_size(), device, sharding_constraints(model, sharding))
    plan: ShardingPlan = planner.collective_plan(model, pg=dist.GroupMember.WORLD)
    return DistributedModelParallel(module=model, device=device, plan=plan)


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The ``ModelConfig`` of the run's options."""
    return ModelConfig(embedding_dim=args.embedding_dim, k=args.k, num_heads=args.heads,
                       short_window=args.short_window, time_buckets=args.time_buckets,
                       hash_bits=args.hash_bits, refresh_every=args.refresh_every,
                       sdim_bits=args.sdim_bits, sdim_tau=args.sdim_tau, twin_k=args.twin_k,
                       twin_bias_init=args.twin_bias_init, esu_evidence=args.esu_evidence,
                       esu_similarity=args.esu_similarity, cooccurrence=args.cooccurrence,
                       kernel=args.kernel)


def plain_model(args: argparse.Namespace, config: ModelConfig,
                store: Optional[SampleStore] = None) -> LongSeqCTR:
    """The run's model, unsharded, on CPU: ``--model`` over the synthetic tables, or one module
    per sequence of the store (``--sequence-model`` to pick per sequence)."""
    if store is None:
        if args.sequence_model:
            raise SystemExit("--sequence-model needs --data (the synthetic data has one sequence)")
        synthetic = SyntheticConfig(seed=args.seed, max_seq_len=args.max_seq_len,
                                    regime=args.regime)
        return build_model(args.model, config, synthetic.table_sizes, device=torch.device("cpu"))
    models = {name: args.model for name in store.sequence_names}
    for item in args.sequence_model:
        name, _, model = item.partition("=")
        if name not in models or model not in MODELS:
            raise SystemExit(f"--sequence-model {item}: expected SEQUENCE=MODEL with a sequence "
                             f"of the store ({store.sequence_names}) and a model of {MODELS}")
        models[name] = model
    return build_store_model(models, config, store, device=torch.device("cpu"))


class Data:
    """Where the batches come from: the synthetic generator, or a prepared store (``--data``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = SampleStore(args.data) if args.data else None
        self.synthetic = SyntheticConfig(seed=args.seed, max_seq_len=args.max_seq_len,
                                         regime=args.regime)

    def model(self, config: ModelConfig) -> LongSeqCTR:
        return plain_model(self.args, config, self.store)

    def training(self, start: int, stop: Optional[int] = None) -> Iterator[Batch]:
        """The training stream from step ``start`` on: the synthetic batches of those steps (up
        to ``stop``, by default ``--steps``), or the store's train split epoch after epoch
        (shuffled per epoch; a resumed run reads past the batches it had trained on)."""
        args = self.args
        if self.store is None:
            stop = args.steps if stop is None else stop
            yield from batches(SyntheticLifelongSequences(
                self.synthetic, "train", args.batch_size, num_batches=stop - start,
                rank=self.rank, world_size=self.world, start=start), args.num_workers)
            return
        dataset = StoreBatches(StoreDataset(self.store, "train", args.batch_size, self.rank,
                                            self.world, shuffle_seed=args.seed))
        epoch, seen = 0, 0
        while True:
            dataset.set_epoch(epoch)
            empty = True
            for batch in batches(dataset, args.num_workers):
                empty = False
                seen += 1
                if seen > start:
                    yield batch
            if empty:
                raise SystemExit(f"{args.data}: no training samples for rank {self.rank}")
            epoch += 1

    def evaluation(self, split: str) -> Iterator[Batch]:
        """At most ``--eval-batches`` batches of ``split`` per rank; every rank stops at the same
        count (a store's ranks may hold one batch more or less)."""
        args = self.args
        if self.store is None:
            dataset = SyntheticLifelongSequences(self.synthetic, split, args.batch_size,
                                                 num_batches=args.eval_batches, rank=self.rank,
                                                 world_size=self.world)
        else:
            dataset = StoreBatches(StoreDataset(self.store, split, args.batch_size, self.rank,
                                                self.world))
        stream = batches(dataset, args.num_workers)
        for _ in range(args.eval_batches):
            batch = next(stream, None)
            more = torch.tensor([batch is not None], dtype=torch.int32)
            dist.all_reduce(more, op=dist.ReduceOp.MIN)
            if not more.item():
                return
            yield batch


def batches(dataset, num_workers: int) -> Iterator[Batch]:
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                           persistent_workers=False))


def checked_batches(stream: Iterator[Batch], model: LongSeqCTR) -> Iterator[Batch]:
    """The training batches, each validated (``check_batch``) as it is read."""
    schemas = [m.schema for m in model.sequence_arch.sequences.values()] \
        if model.sequence_arch is not None else []
    for batch in stream:
        check_batch(batch, model.table_rows, schemas)
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, split: str, args: argparse.Namespace,
             device: torch.device) -> Dict[str, float]:
    """AUC / GAUC / log loss over ``--eval-batches`` batches per rank of ``split``; for the
    sequence over the dense history (whose behaviors the generator flags as relevant or not),
    recall@k of what its search selects, and, with ``--gsu-overlap``, for a module that can rank
    the whole history by its own attention (``attention_topk``), the overlap of its search with
    that (TWIN's GSU consistency; an O(L) lookup per batch)."""
    model.eval()
    metrics = CTRMetrics(device)
    ctr = next(m for m in model.modules() if isinstance(m, LongSeqCTR))
    arch = ctr.sequence_arch
    modules = [(n, m) for n, m in arch.sequences.items() if m.schema.time_key is None] \
        if arch is not None else []
    found = torch.zeros(2, dtype=torch.float64, device=device)  # retrieved relevant, achievable
    overlap = torch.zeros(2, dtype=torch.float64, device=device)  # in both top-k, in dense
    schemas = [m.schema for m in arch.sequences.values()] if arch is not None else []
    for batch in data.evaluation(split):
        check_batch(batch, ctr.table_rows, schemas)  # as every training batch
        batch = batch.to(device)
        _, (_, logits, labels) = model(batch)
        metrics.update(batch.user_ids, logits, labels)
        for name, module in modules:
            times = history_times(module.schema, batch.features, batch.history_time)
            offsets = batch.features[module.schema.history_keys[0]].offsets()
            indices, lengths = module.search(batch.features, times, batch.request_time).long
            found += torch.stack(retrieval_recall(batch.relevant, offsets, indices, lengths))
            if args.gsu_overlap and hasattr(module, "attention_topk"):
                everything = Selection(jagged.all_positions(offsets))
                looked = arch.look_up(batch.features, batch.history_time, batch.request_time,
                                      {name: everything})[name]
                dense, _ = module.attention_topk(looked, lengths)
                overlap += torch.stack(set_overlap(indices, dense, times.numel()))
    model.train()
    result = metrics.compute()
    if modules:
        dist.all_reduce(found)
        result["recall"] = float(found[0] / found[1].clamp(min=1))
    if args.gsu_overlap and any(hasattr(m, "attention_topk") for _, m in modules):
        dist.all_reduce(overlap)
        result["gsu_overlap"] = float(overlap[0] / overlap[1].clamp(min=1))
    return result


def set_overlap(found: torch.Tensor, reference: torch.Tensor, num_values: int):
    """``(positions in both, positions in reference)``: both are selections of distinct positions
    into the same jagged history (``num_values`` long)."""
    marked = torch.zeros(num_values, dtype=torch.bool, device=found.device)
    marked[reference] = True
    return marked[found].sum().double(), torch.tensor(float(reference.numel()), dtype=torch.float64,
                                                      device=found.device)


def retrieval_recall(relevant: torch.Tensor, offsets: torch.Tensor, indices: torch.Tensor,
                     lengths: torch.Tensor):
    """``(relevant behaviors selected, sum over samples of min(selected, relevant))``: the
    numerator and denominator of recall@k against the generator's ground truth ``relevant [N]``
    (a search keeps ``min(k, L)`` behaviors, hard search fewer only when fewer match, and every
    relevant behavior matches, so ``min(selected, relevant) = min(k, relevant)``)."""
    n = relevant.numel()
    seg = jagged.segment_ids(offsets, n)
    per_sample = torch.zeros(offsets.numel() - 1, dtype=torch.float64, device=relevant.device)
    per_sample.index_add_(0, seg, relevant.double())
    hits = torch.zeros_like(per_sample).index_add_(0, seg[indices], relevant[indices].double())
    return hits.sum(), torch.minimum(lengths.double(), per_sample).sum()


class EarlyStopping:
    """Early stopping on the validation AUC, keeping the best model.

    ``update(step, auc, model)`` after each validation: a higher AUC than every one before it
    saves the model's state (``torch.distributed.checkpoint``, every rank its shards) to
    ``directory`` and ``{"step", "auc"}`` to ``directory.json``; it returns True (stop) once
    ``patience`` validations in a row have not improved on the best, i.e. ``step - best_step >=
    patience * every``. ``restore(model)`` loads the best state back. Every rank sees the same
    (all-reduced) AUC, so every rank decides the same. A resumed run (from step ``start``) picks
    up the best of the steps it had already run from ``directory.json``.

    Args:
        patience (int): validations without improvement before stopping (>= 1).
        every (int): steps between validations (``--eval-every``).
        directory (Path): where the best state goes.
        start (int): the step training (re)starts from.
    """

    def __init__(self, patience: int, every: int, directory: Path, start: int = 0) -> None:
        self.patience, self.every, self.directory = patience, every, directory
        self.best_auc, self.best_step = float("-inf"), None
        meta = directory.with_suffix(".json")
        if start > 0 and meta.exists():
            best = json.loads(meta.read_text())
            if best["step"] <= start:  # a best from after the checkpoint is found again
                self.best_auc, self.best_step = best["auc"], best["step"]

    def update(self, step: int, auc: float, model: nn.Module) -> bool:
        if auc > self.best_auc:
            self.best_auc, self.best_step = auc, step
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(self.directory))
            if dist.get_rank() == 0:
                self.directory.with_suffix(".json").write_text(
                    json.dumps({"step": step, "auc": auc}))
            return False
        return step - self.best_step >= self.patience * self.every

    def restore(self, model: nn.Module) -> None:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=str(self.directory))
        model.load_state_dict(state["model"])


def pretrain_tables(model: nn.Module, optimizer: CombinedOptimizer, ctr: LongSeqCTR,
                    stream: Iterator[Batch], steps: int, device: torch.device, rank: int,
                    tables: Optional[torch.optim.Optimizer] = None,
                    lr: Optional[float] = None) -> None:
    """``steps`` steps of the co-occurrence losses alone (``SequenceArch.cooccurrence_losses``:
    only the candidates and the recent windows looked up, no search, no attention, no clicks):
    the tables learn which items are alike before the clicks train anything. The dense
    parameters get no gradient, so their optimizer leaves them as they are. ``lr``: the
    tables' optimizer ``tables`` (TorchRec's fused one reads its rate at ``zero_grad`` and
    ``step``) runs at this rate meanwhile, and at its own again after."""
    groups = list(tables.param_groups) if lr is not None else []
    rates = [g["lr"] for g in groups]
    for group in groups:
        group["lr"] = lr
    model.train()
    optimizer.zero_grad()
    for step in range(1, steps + 1):
        batch = next(stream).to(device)
        loss = sum(ctr.sequence_arch.cooccurrence_losses(batch.features, batch.history_time,
                                                         batch.request_time))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 100 == 0 or step == steps):
            print(f"co-occurrence pretraining step {step}: loss {float(loss.detach()):.4f}",
                  flush=True)
    for group, rate in zip(groups, rates):
        group["lr"] = rate
    optimizer.zero_grad()
    ctr.sequence_arch.derived.reset()  # derived tables from the pretrained rows


def checkpoint_state(model: DistributedModelParallel, optimizer: CombinedOptimizer, step: int) -> Dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": torch.tensor(step)}


def quiet_known_notices() -> None:
    """Silence third-party notices that are known to be harmless here, each by its exact
    message (anything else still shows): DDP's ``broadcast_buffers`` deprecation (TorchRec's DMP
    passes it), torch's ``is_fx_tracing`` notice (TorchRec calls it), cpp_extension's "No
    CUDA runtime" (the CPU operators' build on a machine without CUDA) and the distributed
    checkpoint's ShardedTensor deprecation (TorchRec's sharded tables are ShardedTensors) and
    its notice on overwriting a checkpoint (``--checkpoint-every`` and ``--early-stop`` rewrite
    theirs on purpose)."""
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating "
                            "ShardedTensor", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in",
                            category=UserWarning)
    for name, text in (("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
                       ("torch.utils.cpp_extension", "No CUDA runtime is found")):
        logging.getLogger(name).addFilter(notices.Without(text))


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.early_stop and not args.eval_every:
        raise SystemExit("--early-stop needs --eval-every N > 0 (it stops on validation AUC)")
    if args.cooccurrence_pretrain and not args.cooccurrence:
        raise SystemExit("--cooccurrence-pretrain N trains the tables with the co-occurrence "
                         "loss: give it a weight, --cooccurrence W > 0")
    if args.pretrain_sparse_lr is not None and not args.cooccurrence_pretrain:
        raise SystemExit("--pretrain-sparse-lr is the tables' rate during "
                         "--cooccurrence-pretrain N: give it N > 0 steps")
    quiet_known_notices()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # same dense initialisation on every rank
    data = Data(args)
    if rank == 0:  # the run's resolved options, next to its metrics
        import yaml
        (out / "config.yaml").write_text(yaml.safe_dump(
            {k: v for k, v in vars(args).items() if k != "config"}, sort_keys=False))
    model = LongSeqCTRTrain(data.model(model_config(args)), args.alpha, args.beta)
    model = shard(model, device, args.sharding, args.sparse_lr)
    dense = dense_optimizer(model, args.dense_lr)
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])

    start = 0
    ckpt = out / "checkpoint"
    if args.resume:
        if not (ckpt / ".metadata").exists():  # one line (from rank 0), not a traceback per rank
            raise SystemExit(f"--resume: no checkpoint in {ckpt} (save one with "
                             f"--checkpoint-every N)" if rank == 0 else 2)
        dense.init_state()  # Adam's state is lazy: create it (a zero-gradient step) to load into
        state = checkpoint_state(model, optimizer, 0)
        dcp.load(state, checkpoint_id=str(ckpt))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}", flush=True)
    ctr = next(m for m in model.modules() if isinstance(m, LongSeqCTR))
    if ctr.sequence_arch is not None:  # from the (initial or loaded) embeddings, at the next forward
        ctr.sequence_arch.derived.reset()

    history: List[Dict[str, float]] = []
    stopper = EarlyStopping(args.early_stop, args.eval_every, out / "best", start) \
        if args.early_stop else None
    stopped, last_step = False, start
    train_time = 0.0
    # a bar on a terminal; in a log (stdout not a terminal) a line per validation instead
    progress = tqdm(total=args.steps, initial=start, desc=args.model, mininterval=2.0,
                    disable=rank != 0 or not sys.stderr.isatty())
    if start == 0 and args.cooccurrence_pretrain:
        stream = checked_batches(data.training(0, args.cooccurrence_pretrain), ctr)
        pretrain_tables(model, optimizer, ctr, stream, args.cooccurrence_pretrain, device, rank,
                        model.fused_optimizer, args.pretrain_sparse_lr)
    checked = checked_batches(data.training(start), ctr)
    pipeline = TrainPipelineSparseDist(model, optimizer, device) if args.pipeline else None
    for step in range(start + 1, args.steps + 1):
        batch = next(checked) if pipeline is None else None  # read outside the timing
        t0 = time.perf_counter()
        if pipeline is not None:  # its step reads this batch and the one after it itself
            loss = pipeline.progress(checked)[0]  # the model's (loss, logits, labels), detached
        else:
            loss, _ = model(batch.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        train_time += time.perf_counter() - t0
        last_step = step
        progress.update(1)
        progress.set_postfix(loss=f"{loss.detach().item():.4f}")
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            if pipeline is not None:
                pipeline.detach()  # the model's own forwards back, for evaluation
            val = evaluate(model, data, "val", args, device)
            if pipeline is not None:
                pipeline.attach(model)
            history.append({"step": step, **val})
            if rank == 0:
                progress.write(f"step {step} validation " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))
            if stopper is not None and stopper.update(step, val["auc"], model):
                stopped = True
                if rank == 0:
                    progress.write(f"early stop at step {step}: no better validation AUC than "
                                   f"{stopper.best_auc:.4f} (step {stopper.best_step}) for "
                                   f"{args.early_stop} validations")
                break
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            dcp.save(checkpoint_state(model, optimizer, step), checkpoint_id=str(ckpt))
    progress.close()
    if pipeline is not None:
        pipeline.detach()

    val = None if stopped else evaluate(model, data, "val", args, device)
    if stopper is not None and stopper.best_step is not None and (
            stopped or val["auc"] <= stopper.best_auc):
        stopper.restore(model)  # the best validated model (the last one if none is better)
        if ctr.sequence_arch is not None:  # derived tables from the loaded embeddings
            ctr.sequence_arch.derived.reset()
        val = evaluate(model, data, "val", args, device)
    elif stopper is not None:
        stopper.best_step = last_step
    test = evaluate(model, data, "test", args, device)
    steps_run = last_step - start
    result = {
        "model": args.model,
        "max_seq_len": int(data.store.meta["max_seq_len"]) if data.store else args.max_seq_len,
        "data": args.data or "synthetic",
        **({} if args.data else {"regime": args.regime}),
        "auc": test["auc"],
        "gauc": test["gauc"],
        "logloss": test["logloss"],
        "val_auc": val["auc"],
        "val_gauc": val["gauc"],
        "val_logloss": val["logloss"],
        **{key: test[key] for key in ("recall", "gsu_overlap") if key in test},
        "samples_per_sec": steps_run * args.batch_size * world / max(train_time, 1e-9),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "world_size": world,
        "seed": args.seed,
        "validation_history": history,
    }
    if stopper is not None:
        result.update(early_stopped=stopped, stopped_step=last_step, best_step=stopper.best_step)
    if rank == 0:
        print("validation " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))
        print("test " + " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        print(json.dumps({k: v for k, v in result.items() if k != "validation_history"}))
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    return result


if __name__ == "__main__":
    main()
    # With gloo on CPU, tearing down the interpreter (with or without destroy_process_group)
    # sometimes aborts in a C++ thread destructor ("terminate called without an active
    # exception") after all work is done, turning a finished run into a failed one. Everything
    # is written and synchronised by now, so leave without the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
