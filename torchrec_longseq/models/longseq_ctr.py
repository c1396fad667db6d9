"""``LongSeqCTR``: a CTR model with lifelong behavior sequences, composed like TorchRec's DLRM.

Parts::

    features (KJT) ──► sparse arch: EmbeddingBagCollection ─ pooled user, context (and, for
                  │                                           avg-pool, the whole history)
                  └──► sequence arch (SequenceArch: one module per sequence: DIN, SIM, ETA,
                       ...) ─ searches each history on ids, looks up the candidate and the
                       selections in one EmbeddingCollection call, attends
    [pooled, sequence outputs] ──► over arch (MLP) ──► logit

``build_model`` assembles the configurations the train entry point offers on the synthetic
schema; ``build_sequence`` builds one sequence module for any schema (a user's own model).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

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

from torchrec_longseq.data.batch import Batch
from torchrec_longseq.modules.attention import DINAttention, mlp
from torchrec_longseq.modules.din import DIN
from torchrec_longseq.modules.esu import ExactSearchUnit, SearchBasedInterest, WholeHistory
from torchrec_longseq.modules.eta import SimHashSearch
from torchrec_longseq.modules.sdim import SDIM
from torchrec_longseq.modules.sequence import (SequenceArch, SequenceModule, attribute_columns,
                                               behavior_dim)
from torchrec_longseq.modules.sim import HardSearch, SoftSearch, soft_search_tables
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.modules.twin import TwinSearch
from torchrec_longseq.retrieval.kernels import set_kernel
from torchrec_longseq.schema import SequenceSchema, default_schema

if TYPE_CHECKING:  # (data.store imports this module's package at run time)
    from torchrec_longseq.data.store import SampleStore


class LongSeqCTR(nn.Module):
    """Pooled features + sequence modules + MLP -> one logit per sample.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): pooled features.
        over_arch_layers (List[int]): hidden widths of the final MLP (a last layer of 1 is added).
        sequence_arch (Optional[SequenceArch]): the sequences (their EmbeddingCollection and one
            module each); ``None`` for a model of pooled features only.

    Example::

        model = build_model("eta", ModelConfig(), table_sizes)
        logits, aux = model(batch.features, batch.history_time, batch.request_time)
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        over_arch_layers: List[int],
        sequence_arch: Optional[SequenceArch] = None,
    ) -> None:
        super().__init__()
        self.sparse_arch = embedding_bag_collection
        self.sequence_arch = sequence_arch
        # the keys of the first input KJT, in its order: serving builds requests in it (a
        # sharded module reads every later KJT in the order of its first)
        self.feature_keys: Optional[List[str]] = None
        configs = embedding_bag_collection.embedding_bag_configs()
        # a sharded EBC orders its output by shard placement: regroup in this fixed order
        self.pooled_keys = [f for c in configs for f in c.feature_names]
        lookups = list(configs) + list(sequence_arch.embedding_collection.embedding_configs()
                                       if sequence_arch is not None else [])
        # rows of the table each feature is looked up in (kept: a sharded module has no configs)
        self.table_rows: Dict[str, int] = {feature: c.num_embeddings for c in lookups
                                           for feature in c.feature_names}
        in_dim = sum(c.embedding_dim * len(c.feature_names) for c in configs)
        if sequence_arch is not None:
            in_dim += sequence_arch.output_dim
        self.over_arch = nn.Sequential(mlp(in_dim, over_arch_layers), nn.Linear(over_arch_layers[-1], 1))

    @property
    def embedding_collection(self) -> Optional[EmbeddingCollection]:
        return self.sequence_arch.embedding_collection if self.sequence_arch is not None else None

    @torch.no_grad()
    def refresh_derived_tables(self) -> None:
        """Rebuild every per-item derived table (ETA's signatures, ...) from the current
        embeddings now (after loading weights, before reading them outside a forward). Training
        needs no call: ``SequenceArch`` keeps them exact at every forward. A collective under
        DMP."""
        if self.sequence_arch is not None:
            self.sequence_arch.derived.reset()
            self.sequence_arch.refresh_pending()

    def forward(
        self, features: KeyedJaggedTensor, history_time: Optional[torch.Tensor],
        request_time: torch.Tensor,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Returns ``(logits [B], aux_logits)``, a list of ``[B]`` auxiliary logits."""
        if self.feature_keys is None and isinstance(features, KeyedJaggedTensor):
            self.feature_keys = list(features.keys())
        pooled = self.pooled(features)
        aux: List[torch.Tensor] = []
        sequence: Optional[torch.Tensor] = None
        if self.sequence_arch is not None:
            sequence, aux = self.sequence_arch(features, history_time, request_time)
        return self.head(pooled, sequence), aux

    def pooled(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """The pooled features (user, context; avg-pool's history) ``[B, P]``, in a fixed order."""
        return self.pooled_of(self.sparse_arch(features))

    def pooled_of(self, pooled: KeyedTensor) -> torch.Tensor:
        """The EBC's output ``pooled`` as ``[B, P]`` in the order of ``pooled_keys``."""
        return KeyedTensor.regroup([pooled], [self.pooled_keys])[0]

    def head(self, pooled: torch.Tensor, sequence: Optional[torch.Tensor]) -> torch.Tensor:
        """``pooled [B, P]`` and the sequence outputs ``[B, S]`` -> logits ``[B]``."""
        if sequence is not None:
            pooled = torch.cat([pooled, sequence], dim=1)
        return self.over_arch(pooled).squeeze(1)


class LongSeqCTRTrain(nn.Module):
    """Training wrapper: ``batch -> (loss, (loss, logits, labels))`` as TorchRec's ``DLRMTrain``.

    ``loss = beta * BCE(logits) + alpha * sum of BCE(aux_logits)`` over the auxiliary tasks, each
    BCE the mean over the batch's samples, plus the sequence arch's weighted co-occurrence losses
    (``SequenceArch(cooccurrence=...)``, none by default); a batch of zero samples has loss 0
    (and no gradient), not the NaN of a mean over nothing.
    """

    def __init__(self, model: LongSeqCTR, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.alpha, self.beta = alpha, beta

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits, aux = self.model(batch.features, batch.history_time, batch.request_time)
        labels = batch.labels.to(logits.dtype)
        samples = torch.ones_like(labels).sum().clamp(min=1)  # a tensor: traceable, no branch
        loss = self.beta * _bce_sum(logits, labels) / samples
        for extra in aux:
            loss = loss + self.alpha * _bce_sum(extra, labels) / samples
        if self.model.sequence_arch is not None:  # the co-occurrence losses of this forward
            for extra in self.model.sequence_arch.losses:
                loss = loss + extra
        return loss, (loss.detach(), logits.detach(), batch.labels)


def _bce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")


@dataclass
class ModelConfig:
    """Hyper-parameters shared by the model builders.

    ``k`` behaviors are retrieved by SIM / ETA; the ESU has ``num_heads`` heads of
    ``head_dim``; intervals go to ``time_buckets`` log buckets between one minute and ~15
    months; SIM soft search uses a ``search_dim``-wide table; ETA hashes to ``hash_bits`` bits
    and rebuilds its signature table every ``refresh_every`` steps (1 = exact; the same for
    SDIM's code tables and TWIN's key tables); SDIM hashes to ``sdim_bits`` bits in signatures of
    ``sdim_tau`` bits; TWIN keeps ``twin_k`` behaviors and starts its time bias (one value
    per head and interval bucket, shared by search and ESU) at ``twin_bias_init``: ``"zero"``
    (the default since issue 24: the search starts ranking by content, and the bias learns
    what age is worth) or ``"normal"`` (``nn.Embedding``'s N(0, 1), the model before issue 24,
    whose random bias dominated the search; docs/fidelity.md). The short-term branch (and DIN) sees
    the last ``short_window`` behaviors; 0 builds SIM, ETA, TWIN and din-full without one.
    ``esu_evidence`` appends the ESU's per-head evidence to its output, ``esu_similarity`` (a
    table name, e.g. ``"item"``) adds the cosine of the candidate's and the behavior's rows of
    that table to the long-term ESU's logits (SIM, ETA, TWIN, whose search ranks by it too,
    din-full), ``cooccurrence`` weighs a co-occurrence loss over the recent window (all
    opt-in departures from the papers, docs/fidelity.md section 7). ``kernel`` picks the
    implementation of the searches and the attention (``retrieval.kernels.KERNELS``: compiled
    on CPU when built, compiled only, or the torch ops).
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
    twin_bias_init: str = "zero"
    esu_evidence: bool = False
    esu_similarity: Optional[str] = None
    cooccurrence: float = 0.0
    kernel: str = "auto"


MODELS = ["avgpool", "din", "din-full", "sim-hard", "sim-soft", "eta", "sdim", "twin"]
SEQUENCE_MODELS = MODELS[1:]


def build_sequence(name: str, schema: SequenceSchema, tables: Dict[str, EmbeddingConfig],
                   config: ModelConfig, device: Optional[torch.device] = None) -> SequenceModule:
    """The sequence module called ``name`` (one of ``SEQUENCE_MODELS``) over ``schema``, whose
    tables are ``tables`` (the EmbeddingCollection's configs by name, see
    ``sequence.table_configs``). ``device`` places SIM soft search's own search tables."""
    return set_kernel(_build_sequence(name, schema, tables, config, device), config.kernel)


def _build_sequence(name: str, schema: SequenceSchema, tables: Dict[str, EmbeddingConfig],
                    config: ModelConfig, device: Optional[torch.device]) -> SequenceModule:
    d = behavior_dim(schema, tables)
    time = TimeIntervalEmbedding(config.time_embedding_dim, config.time_buckets)
    similarity = similarity_columns(schema, tables, config.esu_similarity)
    if similarity is not None and name in ("din", "sdim"):
        raise ValueError(f"esu_similarity biases the logits of a searched ESU (sim-hard, "
                         f"sim-soft, eta, twin, din-full); {name} has none it could bias")
    if name == "din":
        return DIN(schema, d, config.attention_hidden, time, last_n=config.short_window)
    if name == "sdim":
        return SDIM(schema, tables, config.attention_hidden, time, config.sdim_bits,
                    config.sdim_tau, config.short_window, config.refresh_every)
    if name == "twin":
        # the interval is a cross feature: one logit bias per head, shared by GSU and ESU (and
        # the short-term branch's time feature)
        bias = TimeIntervalEmbedding(config.num_heads, config.time_buckets)
        if config.twin_bias_init == "zero":  # drawn first, so the other parameters draw alike
            nn.init.zeros_(bias.embedding.weight)
        elif config.twin_bias_init != "normal":
            raise ValueError(f"twin_bias_init must be 'zero' or 'normal', got "
                             f"{config.twin_bias_init!r}")
        esu = ExactSearchUnit(d, bias, config.num_heads, config.head_dim, time_as_bias=True,
                              evidence=config.esu_evidence, similarity=similarity)
        search = TwinSearch(schema, tables, esu, config.twin_k, config.refresh_every)
        return SearchBasedInterest(search, esu, _short_term(config, d, config.num_heads),
                                   config.short_window)
    if name == "eta":
        # ETA's paper (and FuxiCTR's ETA): multi-head target attention over the retrieved k and,
        # with its own parameters, over the recent window
        recent = TimeIntervalEmbedding(config.time_embedding_dim, config.time_buckets)
        short_term = (ExactSearchUnit(d, recent, config.num_heads, config.head_dim)
                      if config.short_window else None)
        search = SimHashSearch(schema, tables, config.hash_bits, config.k, config.refresh_every)
        return SearchBasedInterest(search, ExactSearchUnit(d, time, config.num_heads,
                                                           config.head_dim,
                                                           evidence=config.esu_evidence,
                                                           similarity=similarity),
                                   short_term, config.short_window)
    if name in ("din-full", "sim-hard", "sim-soft"):
        if name == "din-full":
            search: nn.Module = WholeHistory(schema)
        elif name == "sim-hard":
            search = HardSearch(schema, config.k)
        else:
            table = soft_search_tables(schema, tables, config.search_dim, device=device)
            projection = config.search_dim * len(table.embedding_configs())
            search = SoftSearch(schema, table, projection, config.k, config.attention_hidden)
        return SearchBasedInterest(
            search, ExactSearchUnit(d, time, config.num_heads, config.head_dim,
                                    evidence=config.esu_evidence, similarity=similarity),
            _short_term(config, d, config.time_embedding_dim), config.short_window)
    raise ValueError(f"unknown sequence model {name!r}; choose from {SEQUENCE_MODELS}")


def similarity_columns(schema: SequenceSchema, tables: Dict[str, EmbeddingConfig],
                       table: Optional[str]) -> Optional[Tuple[int, int]]:
    """The columns ``[start, stop)`` of a behavior row (the schema's attributes side by side)
    that ``table`` fills, for ``ExactSearchUnit(similarity=...)``; ``None`` for no table."""
    if table is None:
        return None
    found = [(cols.start, cols.stop) for a, cols in
             zip(schema.attributes, attribute_columns(schema, tables)) if a.table == table]
    if len(found) != 1:
        raise ValueError(f"esu_similarity names a table that exactly one attribute of the "
                         f"sequence is looked up in; {table!r} fills {len(found)} "
                         f"(its tables: {schema.tables})")
    return found[0]


def build_model(
    name: str, config: ModelConfig, table_sizes: Dict[str, int], device: Optional[torch.device] = None
) -> LongSeqCTR:
    """The model called ``name`` (one of ``MODELS``) on the synthetic schema (``default_schema``)
    for tables of ``table_sizes`` rows (keyed by feature name, as ``SyntheticConfig.table_sizes``).
    ``device="meta"`` builds the tables without memory, for DistributedModelParallel to
    materialise shards."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    d = config.embedding_dim
    schema = default_schema()
    item, category = schema.attributes
    if name == "avgpool":
        _no_cooccurrence(config)
    pooled = [
        EmbeddingBagConfig(name="user", embedding_dim=d, num_embeddings=table_sizes["user_id"],
                           feature_names=["user_id"]),
        EmbeddingBagConfig(name="hour", embedding_dim=d, num_embeddings=table_sizes["context_hour"],
                           feature_names=["context_hour"]),
    ]
    if name == "avgpool":
        # the history averaged on the shard: O(B D) communication whatever L is
        pooled += [
            EmbeddingBagConfig(name=a.table, embedding_dim=d,
                               num_embeddings=table_sizes[a.history_key],
                               feature_names=[a.candidate_key, a.history_key],
                               pooling=PoolingType.MEAN)
            for a in (item, category)]
        ebc = EmbeddingBagCollection(tables=pooled, device=device)
        return LongSeqCTR(ebc, config.over_arch_layers)
    ebc = EmbeddingBagCollection(tables=pooled, device=device)
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name=a.table, embedding_dim=d,
                                num_embeddings=table_sizes[a.history_key],
                                feature_names=[a.candidate_key, a.history_key])
                for a in (item, category)],
        device=device,
    )
    tables = {c.name: c for c in ec.embedding_configs()}
    sequence = build_sequence(name, schema, tables, config, device)
    return set_kernel(LongSeqCTR(ebc, config.over_arch_layers,
                                 SequenceArch(ec, {"history": sequence}, config.cooccurrence)),
                      config.kernel)


def _no_cooccurrence(config: ModelConfig) -> None:
    """avgpool looks no window up: a co-occurrence weight would silently not be there."""
    if config.cooccurrence:
        raise ValueError("cooccurrence weighs a loss over a sequence's looked-up window; "
                         "avgpool pools the history and looks nothing up")


def _short_term(config: ModelConfig, behavior_width: int, context_dim: int) -> Optional[DINAttention]:
    """DIN over the last ``short_window`` behaviors (``None`` for a window of 0: no branch)."""
    if config.short_window == 0:
        return None
    return DINAttention(behavior_width, config.attention_hidden, context_dim)


def build_store_model(models: Dict[str, str], config: ModelConfig, store: "SampleStore",
                      device: Optional[torch.device] = None) -> LongSeqCTR:
    """A model of a prepared sample store (``data.store``): the pooled user, one
    EmbeddingCollection table per id column (item, each attribute, the behavior type), shared by
    the candidate and every sequence, and one module per sequence, ``models[sequence]`` (names of
    ``MODELS``; ``"avgpool"`` for one averages every sequence's history in the pooled features,
    and then every sequence must be ``"avgpool"``). Keys and tables: ``store_schemas``."""
    from torchrec_longseq.data.store import USER_KEY, store_schemas, store_tables

    d, sizes, schemas = config.embedding_dim, store_tables(store), store_schemas(store)
    unknown = {m for m in models.values() if m not in MODELS} | (set(schemas) ^ set(models))
    if unknown:
        raise ValueError(f"models {models} must name one of {MODELS} for each sequence of the "
                         f"store ({sorted(schemas)})")
    pooled = [EmbeddingBagConfig(name="user", embedding_dim=d, num_embeddings=sizes["user"],
                                 feature_names=[USER_KEY])]
    tables = list(dict.fromkeys(a.table for s in schemas.values() for a in s.attributes))

    def features(table: str) -> List[str]:
        keys = [a.candidate_key for s in schemas.values() for a in s.attributes
                if a.table == table and a.candidate_key is not None][:1]
        return keys + [a.history_key for s in schemas.values() for a in s.attributes
                       if a.table == table]

    if set(models.values()) == {"avgpool"}:
        _no_cooccurrence(config)
        pooled += [EmbeddingBagConfig(name=t, embedding_dim=d, num_embeddings=sizes[t],
                                      feature_names=features(t), pooling=PoolingType.MEAN)
                   for t in tables]
        return LongSeqCTR(EmbeddingBagCollection(tables=pooled, device=device),
                          config.over_arch_layers)
    if "avgpool" in models.values():
        raise ValueError("avgpool pools every sequence: it cannot be mixed with other models")
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name=t, embedding_dim=d,
                                                     num_embeddings=sizes[t],
                                                     feature_names=features(t))
                                     for t in tables], device=device)
    configs = {c.name: c for c in ec.embedding_configs()}
    arch = SequenceArch(ec, {name: build_sequence(models[name], schema, configs, config, device)
                             for name, schema in schemas.items()}, config.cooccurrence)
    return set_kernel(LongSeqCTR(EmbeddingBagCollection(tables=pooled, device=device),
                                 config.over_arch_layers, arch), config.kernel)
