"""SIM (Pi et al., CIKM 2020): search-based user interest modeling.

Two general search units (GSU) over the whole history, each returning ``<= k`` positions:

* ``HardSearch``: the behaviors of the candidate's category, most recent first
  (``retrieval.hard_search``): O(L) compares on category ids, no embedding at all.
* ``SoftSearch``: top-k of ``(W_b u_i) . (W_a u_a)`` in a learned search space, trained by
  the paper's auxiliary CTR task on the score-weighted sum of the whole sequence concatenated
  with the candidate. The paper's ``e_i`` are the full behavior embeddings; here the search
  space is a separate, small pair of tables (item and category, ``search_dim`` = 8 columns each,
  vs 2 x 16 for the ESU's embeddings), sharded like any table. It is kept consistent with
  training simply by being the tables the auxiliary task trains; its O(L) lookup moves 16
  floats per behavior instead of the ESU's 32, and the ESU's tables stay O(k). The softmax of the scores weights the sum
  (the paper's weights normalised, so the auxiliary input does not grow with L).

Both feed ``SearchBasedInterest``: one lookup of the candidate, the retrieved behaviors and the
recent window, the exact search unit (ESU) with time-interval embeddings over the retrieved, and
the paper's short-term DIN branch over the recent window. The train wrapper's loss is
``alpha * L_gsu + beta * L_esu`` (``LongSeqCTRTrain``; the paper's a = 1 soft, a = 0 hard).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import mlp
from torchrec_longseq.modules.sequence import request_kjt
from torchrec_longseq.retrieval import hard, topk
from torchrec_longseq.schema import Attribute, SequenceSchema


class HardSearch(nn.Module):
    """SIM's hard search as a GSU: the ``k`` most recent behaviors whose ``schema.hard_search``
    attribute (the category by default) equals the candidate's.

    Args:
        schema (SequenceSchema): the sequence's keys; ``hard_search_key`` picks the attribute.
        k (int): at most this many per sample.
    """

    def __init__(self, schema: SequenceSchema, k: int) -> None:
        super().__init__()
        self.schema = schema
        self.k = topk.check_k(k)
        self.kernel = "auto"  # retrieval.kernels.set_kernel

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]]:
        attribute = self.schema.hard_search
        hist = features[attribute.history_key]
        indices, lengths = hard.hard_search(
            hist.values(), hist.offsets(), features[attribute.candidate_key].values(), self.k,
            self.kernel)
        return indices, lengths, None

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        attribute = self.schema.hard_search
        return hard.hard_search(history[attribute.history_key], None,
                                candidates[attribute.candidate_key], self.k, self.kernel)


def soft_search_tables(schema: SequenceSchema, tables: Dict[str, EmbeddingConfig],
                       search_dim: int, history_keys: Optional[Sequence[str]] = None,
                       device: Optional[torch.device] = None) -> EmbeddingCollection:
    """The search space's tables: one ``search_dim``-wide table ``search_<table>`` per chosen
    attribute (``history_keys``; default every attribute with a candidate key), serving that
    attribute's candidate and history keys, with as many rows as its embedding table.

    Initialised in [-0.5, 0.5] (TorchRec's default is +-1/sqrt(rows)): with tiny vectors every
    score is ~0, the softmax of the auxiliary task is uniform and its gradient cannot separate
    behaviors, so soft search would not learn to search."""
    chosen = _chosen(schema, history_keys)
    return EmbeddingCollection(
        tables=[EmbeddingConfig(name=f"search_{a.table}", embedding_dim=search_dim,
                                num_embeddings=tables[a.table].num_embeddings,
                                feature_names=[a.candidate_key, a.history_key],
                                weight_init_min=-0.5, weight_init_max=0.5)
                for a in chosen],
        device=device)


def _chosen(schema: SequenceSchema, history_keys: Optional[Sequence[str]]) -> List[Attribute]:
    if history_keys is None:
        return schema.matched
    unknown = [k for k in history_keys if k not in schema.history_keys]
    if unknown:
        raise ValueError(f"soft search attributes {unknown} are not history keys of the schema "
                         f"({schema.history_keys})")
    chosen = [a for a in schema.attributes if a.history_key in history_keys]
    if not chosen or any(a.candidate_key is None for a in chosen):
        raise ValueError("soft search needs at least one attribute, each with a candidate key")
    return chosen


@torch.fx.wrap
def select_features(features: KeyedJaggedTensor, keys: List[str]) -> KeyedJaggedTensor:
    """``features`` reduced to ``keys``, in that order."""
    jts = [features[key] for key in keys]
    return KeyedJaggedTensor(keys=keys, values=torch.cat([jt.values() for jt in jts]),
                             lengths=torch.cat([jt.lengths() for jt in jts]))


@torch.fx.wrap
def search_vectors(embeddings: Dict[str, JaggedTensor], keys: List[str]) -> torch.Tensor:
    """``u``: the search embeddings of ``keys`` side by side, ``[N, S]``."""
    return torch.cat([embeddings[key].values() for key in keys], dim=1)


class SoftSearch(nn.Module):
    """SIM's soft search as a GSU, with its auxiliary CTR task.

    Args:
        schema (SequenceSchema): the sequence's keys.
        search_table (EmbeddingCollection): the search space (``soft_search_tables``): one table
            per chosen attribute, serving its candidate and history keys; a behavior's search
            vector ``u`` is the concatenation (width ``S``). DMP shards it like any table.
        projection_dim (int): width of the search space ``W_a u_a``, ``W_b u_i``.
        k (int): behaviors kept per sample.
        aux_hidden (List[int]): hidden widths of the auxiliary CTR MLP.

    ``search`` returns ``(indices [M], lengths [B], aux_logits [B])``; ties in score go to the
    more recent behavior. No gradient flows through the choice of the top k; the scores get their
    gradient from the auxiliary task.
    """

    def __init__(self, schema: SequenceSchema, search_table: EmbeddingCollection,
                 projection_dim: int, k: int, aux_hidden: List[int]) -> None:
        super().__init__()
        self.schema = schema
        self.search_table = search_table
        configs = search_table.embedding_configs()
        served = {f for c in configs for f in c.feature_names}
        chosen = [a for a in schema.matched if a.history_key in served]
        if not chosen:
            raise ValueError("the search table serves none of the schema's history keys")
        self.candidate_keys = [a.candidate_key for a in chosen]
        self.history_keys = [a.history_key for a in chosen]
        self.search_keys = [f for c in configs for f in c.feature_names]  # the EC's order
        search_dim = sum(c.embedding_dim for c in configs)
        self.k = topk.check_k(k)
        self.kernel = "auto"  # retrieval.kernels.set_kernel
        self.w_a = nn.Linear(search_dim, projection_dim, bias=False)
        self.w_b = nn.Linear(search_dim, projection_dim, bias=False)
        if projection_dim == search_dim:
            # start as plain inner-product search in the search space (the paper leaves the
            # initialisation open): a behavior then scores highest with the candidate's own
            # item and category vectors, and the auxiliary task refines the space from there
            nn.init.eye_(self.w_a.weight)
            nn.init.eye_(self.w_b.weight)
        self.aux = nn.Sequential(mlp(2 * search_dim, aux_hidden), nn.Linear(aux_hidden[-1], 1))

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]]:
        embeddings = self.search_table(select_features(features, self.search_keys))
        target = search_vectors(embeddings, self.candidate_keys)  # [B, S]
        behaviors = search_vectors(embeddings, self.history_keys)  # [N, S]
        offsets = jagged.lengths_to_offsets(embeddings[self.history_keys[0]].lengths())
        seg = jagged.segment_ids(offsets, behaviors.size(0))
        scores = (self.w_b(behaviors) * self.w_a(target)[seg]).sum(1)  # [N]
        indices, lengths = topk.jagged_topk(scores.detach(), offsets, self.k,
                                            kernel=self.kernel)
        weights = jagged.segment_softmax(scores.unsqueeze(1), seg, target.size(0))  # [N, 1]
        pooled = jagged.segment_sum(weights * behaviors, seg, target.size(0))  # [B, S]
        aux = self.aux(torch.cat([pooled, target], dim=1)).squeeze(1)
        return indices, lengths, aux

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The history's search vectors looked up and projected once: ``[L, P]``."""
        n, c = intervals.numel(), next(iter(candidates.values())).numel()
        features = request_kjt(self.search_keys, candidates, history)
        embeddings = self.search_table(features)
        behaviors = self.w_b(search_vectors(embeddings, self.history_keys))  # [L, P]
        targets = self.w_a(search_vectors(embeddings, self.candidate_keys))  # [C, P]
        scores = _inner_products(targets.detach(), behaviors.detach()).flatten()  # [C L]
        return jagged.positions_in_copy(
            topk.jagged_topk(scores, jagged.copies_offsets(n, c, scores.device), self.k,
                             kernel=self.kernel), n)


def _inner_products(targets: torch.Tensor, behaviors: torch.Tensor) -> torch.Tensor:
    """``targets [C, P]`` against ``behaviors [L, P]``: ``[C, L]``, with each entry's value
    independent of its position: two copies of one behavior (a repeated click) score exactly
    alike, so their tie goes to the more recent one as in the batch path.

    Not a matmul: a BLAS kernel rounds an output column by where it falls in its tiles (on an
    AMD EPYC, ``targets @ behaviors.t()`` scored two copies 3e-8 apart and the older one was
    kept). Here each of the P steps is one multiply and one add per entry, each rounded once
    (IEEE), at every position alike: 2.7x a matmul's time alone (C = 200, L = 10^4, P = 16),
    too little against the top k to move a whole request (``benchmarks/RESULTS.md``).
    """
    columns = behaviors.t().contiguous()  # [P, L]
    scores = targets[:, :1] * columns[0]
    step = torch.empty_like(scores)
    for p in range(1, columns.size(0)):
        torch.mul(targets[:, p:p + 1], columns[p], out=step)
        scores.add_(step)
    return scores
