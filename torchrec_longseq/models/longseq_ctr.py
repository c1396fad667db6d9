"""``LongSeqCTR``: a CTR model with a lifelong behavior sequence, composed like TorchRec's DLRM.

Parts::

    features (KJT) ──► sparse arch: EmbeddingBagCollection ─ pooled user, context (and, for
                  │                                           avg-pool, the whole history)
                  └──► sequence arch (DIN, SIM, ETA, ...) ─ searches the history on ids, looks
                       up the candidate and the selection in the EmbeddingCollection (item and
                       category tables shared by candidate and history), attends
    [pooled, sequence output] ──► over arch (MLP) ──► logit

``build_model`` assembles the configurations the train entry point offers.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    KeyedTensor,
    PoolingType,
)

from torchrec_longseq.data.batch import (
    CONTEXT_HOUR,
    HIST_CATEGORY,
    HIST_ITEM,
    TARGET_CATEGORY,
    TARGET_ITEM,
    USER_ID,
    Batch,
)
from torchrec_longseq.modules.attention import DINAttention, mlp
from torchrec_longseq.modules import derived
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.modules.din import DIN
from torchrec_longseq.modules.esu import ExactSearchUnit, SearchBasedInterest, WholeHistory
from torchrec_longseq.modules.eta import SimHashSearch
from torchrec_longseq.modules.sim import (
    SEARCH_HIST,
    SEARCH_HIST_CATEGORY,
    SEARCH_TARGET,
    SEARCH_TARGET_CATEGORY,
    HardSearch,
    SoftSearch,
)
from torchrec_longseq.modules.sdim import SDIM
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.modules.twin import TwinSearch
from torchrec_longseq.modules.lookup import CATEGORY_KEYS, CATEGORY_TABLE, ITEM_KEYS, ITEM_TABLE


class LongSeqCTR(nn.Module):
    """Pooled features + one sequence module + MLP -> one logit per sample.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): pooled features.
        over_arch_layers (List[int]): hidden widths of the final MLP (a last layer of 1 is added).
        embedding_collection (Optional[EmbeddingCollection]): item and category tables for the
            candidate and the history (features ``target_*`` and ``hist_*``).
        sequence_arch (Optional[nn.Module]): called as ``sequence_arch(features, history_time,
            request_time, embedding_collection)``, returns ``(output [B, output_dim], aux_logits)``
            where ``aux_logits [B]`` is an auxiliary task's logit (SIM soft search) or ``None``.

    Example::

        model = build_model("din", ModelConfig(), table_sizes)
        logits, aux = model(batch.features, batch.history_time, batch.request_time)
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        over_arch_layers: List[int],
        embedding_collection: Optional[EmbeddingCollection] = None,
        sequence_arch: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if (embedding_collection is None) != (sequence_arch is None):
            raise ValueError("embedding_collection and sequence_arch come together")
        self.sparse_arch = embedding_bag_collection
        self.embedding_collection = embedding_collection
        self.sequence_arch = sequence_arch
        configs = embedding_bag_collection.embedding_bag_configs()
        # a sharded EBC orders its output by shard placement: regroup in this fixed order
        self.pooled_keys = [f for c in configs for f in c.feature_names]
        lookups = list(configs) + list(embedding_collection.embedding_configs()
                                       if embedding_collection is not None else [])
        # rows of the table each feature is looked up in (kept: a sharded module has no configs)
        self.table_rows: Dict[str, int] = {feature: c.num_embeddings for c in lookups
                                           for feature in c.feature_names}
        in_dim = sum(c.embedding_dim * len(c.feature_names) for c in configs)
        if sequence_arch is not None:
            in_dim += sequence_arch.output_dim
        self.over_arch = nn.Sequential(mlp(in_dim, over_arch_layers), nn.Linear(over_arch_layers[-1], 1))

    @torch.no_grad()
    def refresh_derived_tables(self, step: Optional[int] = None) -> None:
        """Bring every per-item derived table (ETA's signatures) up to date with the embeddings.

        ``step=None`` rebuilds them from the whole item table (at start, after loading weights);
        otherwise call it after optimizer step ``step``: exact tables re-derive the rows that step
        touched, periodic ones rebuild every ``refresh_every`` steps. A collective under DMP.
        """
        if self.embedding_collection is None:
            return
        tables = [t for t in self.modules() if isinstance(t, ItemDerivedTable)]
        exact = [t for t in tables if step is not None and t.exact]
        if exact:  # the touched rows, read from the (local shards of the) tables
            derived.refresh_touched(exact, self.embedding_collection)
        for table in tables:  # whole rebuilds: at start, and every refresh_every steps if periodic
            if step is None or (not table.exact and step % table.refresh_every == 0):
                table.refresh(self.embedding_collection)

    def forward(
        self, features: KeyedJaggedTensor, history_time: torch.Tensor, request_time: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns ``(logits [B], aux_logits [B] or None)``."""
        pooled = self.pooled(features)
        aux: Optional[torch.Tensor] = None
        sequence: Optional[torch.Tensor] = None
        if self.sequence_arch is not None:
            sequence, aux = self.sequence_arch(
                features, history_time, request_time, self.embedding_collection
            )
        return self.head(pooled, sequence), aux

    def pooled(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The pooled features (user, context; avg-pool's history) ``[B, P]``, in a fixed order."""
        return self.pooled_of(self.sparse_arch(features))

    def pooled_of(self, pooled: KeyedTensor) -> torch.Tensor:
        """The EBC's output ``pooled`` as ``[B, P]`` in the order of ``pooled_keys``."""
        return KeyedTensor.regroup([pooled], [self.pooled_keys])[0]

    def head(self, pooled: torch.Tensor, sequence: Optional[torch.Tensor]) -> torch.Tensor:
        """``pooled [B, P]`` and the sequence module's output ``[B, S]`` -> logits ``[B]``."""
        if sequence is not None:
            pooled = torch.cat([pooled, sequence], dim=1)
        return self.over_arch(pooled).squeeze(1)


class LongSeqCTRTrain(nn.Module):
    """Training wrapper: ``batch -> (loss, (loss, logits, labels))`` as TorchRec's ``DLRMTrain``.

    ``loss = beta * BCE(logits) + alpha * BCE(aux_logits)`` when the model has an auxiliary task.
    """

    def __init__(self, model: LongSeqCTR, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.alpha, self.beta = alpha, beta

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits, aux = self.model(batch.features, batch.history_time, batch.request_time)
        loss = self.beta * nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        if aux is not None:
            loss = loss + self.alpha * nn.functional.binary_cross_entropy_with_logits(aux, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


@dataclass
class ModelConfig:
    """Hyper-parameters shared by the model builders.

    ``k`` behaviors are retrieved by SIM / ETA; the ESU has ``num_heads`` heads of
    ``head_dim``; intervals go to ``time_buckets`` log buckets between one minute and ~15
    months; SIM soft search uses a ``search_dim``-wide table; ETA hashes to ``hash_bits`` bits
    and rebuilds its signature table every ``refresh_every`` steps (1 = exact; the same for
    SDIM's code tables and TWIN's key tables); SDIM hashes to ``sdim_bits`` bits in signatures of
    ``sdim_tau`` bits; TWIN keeps ``twin_k`` behaviors. The short-term branch (and DIN) sees
    the last ``short_window`` behaviors; 0 builds SIM, ETA, TWIN and din-full without one.
    """

    embedding_dim: int = 16
    over_arch_layers: List[int] = field(default_factory=lambda: [128, 64])
    attention_hidden: List[int] = field(default_factory=lambda: [64, 32])
    short_window: int = 50
    k: int = 50
    num_heads: int = 4
    head_dim: int = 8
    time_buckets: int = 32
    time_embedding_dim: int = 8
    search_dim: int = 8
    hash_bits: int = 64
    refresh_every: int = 1
    sdim_bits: int = 48
    sdim_tau: int = 3
    twin_k: int = 100


MODELS = ["avgpool", "din", "din-full", "sim-hard", "sim-soft", "eta", "sdim", "twin"]


def build_model(
    name: str, config: ModelConfig, table_sizes: Dict[str, int], device: Optional[torch.device] = None
) -> LongSeqCTR:
    """The model called ``name`` (one of ``MODELS``) for tables of ``table_sizes`` rows
    (keyed by feature name, as ``SyntheticConfig.table_sizes``). ``device="meta"`` builds
    the tables without memory, for DistributedModelParallel to materialise shards."""
    d = config.embedding_dim
    pooled = [
        EmbeddingBagConfig(name="user", embedding_dim=d, num_embeddings=table_sizes[USER_ID],
                           feature_names=[USER_ID]),
        EmbeddingBagConfig(name="hour", embedding_dim=d, num_embeddings=table_sizes[CONTEXT_HOUR],
                           feature_names=[CONTEXT_HOUR]),
    ]
    if name == "avgpool":
        # the history averaged on the shard: O(B D) communication whatever L is
        pooled += [
            EmbeddingBagConfig(name="item", embedding_dim=d, num_embeddings=table_sizes[HIST_ITEM],
                               feature_names=[TARGET_ITEM, HIST_ITEM], pooling=PoolingType.MEAN),
            EmbeddingBagConfig(name="category", embedding_dim=d,
                               num_embeddings=table_sizes[HIST_CATEGORY],
                               feature_names=[TARGET_CATEGORY, HIST_CATEGORY],
                               pooling=PoolingType.MEAN),
        ]
        ebc = EmbeddingBagCollection(tables=pooled, device=device)
        return LongSeqCTR(ebc, config.over_arch_layers)
    ebc = EmbeddingBagCollection(tables=pooled, device=device)
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name=ITEM_TABLE, embedding_dim=d, num_embeddings=table_sizes[HIST_ITEM],
                            feature_names=ITEM_KEYS),
            EmbeddingConfig(name=CATEGORY_TABLE, embedding_dim=d,
                            num_embeddings=table_sizes[HIST_CATEGORY],
                            feature_names=CATEGORY_KEYS),
        ],
        device=device,
    )
    time = TimeIntervalEmbedding(config.time_embedding_dim, config.time_buckets)
    if name == "din":
        seq: nn.Module = DIN(d, config.attention_hidden, time, last_n=config.short_window)
    elif name == "sdim":
        seq = SDIM((table_sizes[HIST_ITEM], table_sizes[HIST_CATEGORY]), d,
                   config.attention_hidden, time, config.sdim_bits, config.sdim_tau,
                   config.short_window, config.refresh_every)
    elif name == "twin":
        # the interval is a cross feature: one logit bias per head, shared by GSU and ESU (and
        # the short-term branch's time feature)
        bias = TimeIntervalEmbedding(config.num_heads, config.time_buckets)
        esu = ExactSearchUnit(2 * d, bias, config.num_heads, config.head_dim, time_as_bias=True)
        search = TwinSearch((table_sizes[HIST_ITEM], table_sizes[HIST_CATEGORY]), d, esu,
                            config.twin_k, config.refresh_every)
        seq = SearchBasedInterest(search, esu, _short_term(config, config.num_heads),
                                  config.short_window)
    elif name == "eta":
        # ETA's paper (and FuxiCTR's ETA): multi-head target attention over the retrieved k and,
        # with its own parameters, over the recent window
        recent = TimeIntervalEmbedding(config.time_embedding_dim, config.time_buckets)
        short_term = (ExactSearchUnit(2 * d, recent, config.num_heads, config.head_dim)
                      if config.short_window else None)
        seq = SearchBasedInterest(_search(name, config, table_sizes, device),
                                  ExactSearchUnit(2 * d, time, config.num_heads, config.head_dim),
                                  short_term, config.short_window)
    elif name in ("din-full", "sim-hard", "sim-soft"):
        seq = SearchBasedInterest(
            _search(name, config, table_sizes, device),
            ExactSearchUnit(2 * d, time, config.num_heads, config.head_dim),
            _short_term(config, config.time_embedding_dim),
            config.short_window,
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    return LongSeqCTR(ebc, config.over_arch_layers, ec, seq)


def _short_term(config: ModelConfig, context_dim: int) -> Optional[DINAttention]:
    """DIN over the last ``short_window`` behaviors (``None`` for a window of 0: no branch)."""
    if config.short_window == 0:
        return None
    return DINAttention(2 * config.embedding_dim, config.attention_hidden, context_dim)


def _search(name: str, config: ModelConfig, table_sizes: Dict[str, int],
            device: Optional[torch.device]) -> nn.Module:
    if name == "din-full":
        return WholeHistory()
    if name == "sim-hard":
        return HardSearch(config.k)
    if name == "sim-soft":
        # initialised in [-0.5, 0.5] (TorchRec's default is +-1/sqrt(rows)): with tiny vectors
        # every score is ~0, the softmax of the auxiliary task is uniform and its gradient
        # cannot separate behaviors, so soft search would not learn to search
        table = EmbeddingCollection(
            tables=[EmbeddingConfig(name="search_item", embedding_dim=config.search_dim,
                                    num_embeddings=table_sizes[HIST_ITEM],
                                    feature_names=[SEARCH_TARGET, SEARCH_HIST],
                                    weight_init_min=-0.5, weight_init_max=0.5),
                    EmbeddingConfig(name="search_category", embedding_dim=config.search_dim,
                                    num_embeddings=table_sizes[HIST_CATEGORY],
                                    feature_names=[SEARCH_TARGET_CATEGORY, SEARCH_HIST_CATEGORY],
                                    weight_init_min=-0.5, weight_init_max=0.5)],
            device=device,
        )
        return SoftSearch(table, 2 * config.search_dim, config.k, config.attention_hidden)
    return SimHashSearch((table_sizes[HIST_ITEM], table_sizes[HIST_CATEGORY]), config.embedding_dim,
                         config.hash_bits, config.k, config.refresh_every)
