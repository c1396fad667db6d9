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

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, JaggedTensor, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.modules.attention import mlp
from torchrec_longseq.retrieval import hard, topk

SEARCH_TARGET = "search_target_item"
SEARCH_HIST = "search_hist_item"
SEARCH_TARGET_CATEGORY = "search_target_category"
SEARCH_HIST_CATEGORY = "search_hist_category"
SEARCH_KEYS = [SEARCH_TARGET, SEARCH_TARGET_CATEGORY, SEARCH_HIST, SEARCH_HIST_CATEGORY]


class HardSearch(nn.Module):
    """SIM's hard search as a GSU: the ``k`` most recent behaviors of the candidate's category.

    Args:
        k (int): at most this many per sample.
    """

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = topk.check_k(k)

    def forward(
        self, features: KeyedJaggedTensor, lookup: EmbeddingCollection,
        history_time: Optional[torch.Tensor], request_time: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        hist = features[HIST_CATEGORY]
        indices, lengths = hard.hard_search(
            hist.values(), hist.offsets(), features[TARGET_CATEGORY].values(), self.k
        )
        return indices, lengths, None


@torch.fx.wrap
def search_features(features: KeyedJaggedTensor, with_category: bool) -> KeyedJaggedTensor:
    """The candidate and the whole history under the search keys (categories if asked)."""
    keys = SEARCH_KEYS if with_category else [SEARCH_TARGET, SEARCH_HIST]
    source = {SEARCH_TARGET: TARGET_ITEM, SEARCH_TARGET_CATEGORY: TARGET_CATEGORY,
              SEARCH_HIST: HIST_ITEM, SEARCH_HIST_CATEGORY: HIST_CATEGORY}
    jts = [features[source[key]] for key in keys]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat([jt.values() for jt in jts]),
        lengths=torch.cat([jt.lengths() for jt in jts]),
    )


@torch.fx.wrap
def search_vectors(embeddings: Dict[str, JaggedTensor], item_key: str, category_key: str,
                   with_category: bool) -> torch.Tensor:
    """``u``: the item's search embedding, concatenated with its category's if there is one."""
    if not with_category:
        return embeddings[item_key].values()
    return torch.cat([embeddings[item_key].values(), embeddings[category_key].values()], dim=1)


class SoftSearch(nn.Module):
    """SIM's soft search as a GSU, with its auxiliary CTR task.

    Args:
        search_table (EmbeddingCollection): the search space's item table (features
            ``search_target_item``, ``search_hist_item``) and, optionally, category table
            (``search_target_category``, ``search_hist_category``); a behavior's search vector
            ``u`` is the concatenation of the two (width ``S``). DMP shards them like any table.
        projection_dim (int): width of the search space ``W_a u_a``, ``W_b u_i``.
        k (int): behaviors kept per sample.
        aux_hidden (List[int]): hidden widths of the auxiliary CTR MLP.

    Returns ``(indices [M], lengths [B], aux_logits [B])``; ties in score go to the more recent
    behavior. No gradient flows through the choice of the top k; the scores get their gradient
    from the auxiliary task.
    """

    def __init__(self, search_table: EmbeddingCollection, projection_dim: int, k: int,
                 aux_hidden: List[int]) -> None:
        super().__init__()
        self.search_table = search_table
        configs = search_table.embedding_configs()
        self.with_category = any(SEARCH_HIST_CATEGORY in c.feature_names for c in configs)
        search_dim = sum(c.embedding_dim for c in configs)
        self.k = topk.check_k(k)
        self.w_a = nn.Linear(search_dim, projection_dim, bias=False)
        self.w_b = nn.Linear(search_dim, projection_dim, bias=False)
        if projection_dim == search_dim:
            # start as plain inner-product search in the search space (the paper leaves the
            # initialisation open): a behavior then scores highest with the candidate's own
            # item and category vectors, and the auxiliary task refines the space from there
            nn.init.eye_(self.w_a.weight)
            nn.init.eye_(self.w_b.weight)
        self.aux = nn.Sequential(mlp(2 * search_dim, aux_hidden), nn.Linear(aux_hidden[-1], 1))

    def forward(
        self, features: KeyedJaggedTensor, lookup: EmbeddingCollection,
        history_time: Optional[torch.Tensor], request_time: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        embeddings = self.search_table(search_features(features, self.with_category))
        target = search_vectors(embeddings, SEARCH_TARGET, SEARCH_TARGET_CATEGORY,
                                self.with_category)  # [B, S]
        behaviors = search_vectors(embeddings, SEARCH_HIST, SEARCH_HIST_CATEGORY,
                                   self.with_category)  # [N, S]
        hist = embeddings[SEARCH_HIST]
        offsets = jagged.lengths_to_offsets(hist.lengths())
        seg = jagged.segment_ids(offsets, behaviors.size(0))
        scores = (self.w_b(behaviors) * self.w_a(target)[seg]).sum(1)  # [N]
        indices, lengths = topk.jagged_topk(scores.detach(), offsets, self.k)
        weights = jagged.segment_softmax(scores.unsqueeze(1), seg, target.size(0))  # [N, 1]
        pooled = jagged.segment_sum(weights * behaviors, seg, target.size(0))  # [B, S]
        aux = self.aux(torch.cat([pooled, target], dim=1)).squeeze(1)
        return indices, lengths, aux
