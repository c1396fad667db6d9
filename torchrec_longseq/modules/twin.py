"""TWIN (Chang et al., KDD 2023): one target attention for both the search and the exact stage.

TWIN's consistency-preserving GSU (CP-GSU) ranks the whole history with the *same* attention as
the ESU, so what it keeps is what the ESU would weight most. It stays cheap by splitting the
behavior features in two:

* inherent, item-side features (here ``e_j = [e_item; e_category]``): their key projection
  ``W_k e_j`` does not depend on the user, so it is computed once per item and kept in per-item
  tables. The projection splits by blocks, ``W_k e_j = W_k^item e_item + W_k^cat e_category``,
  so one table per embedding table suffices (``ItemDerivedTable``). The tables also hold
  ``W_q``'s blocks, so the candidate's query is read by id as well and the whole search runs
  before the sharded lookup;
* user-item cross features (here the time interval): each compressed to one scalar bias per
  head (``ExactSearchUnit(time_as_bias=True)``, a bucketed interval -> ``[H]``).

GSU score of behavior ``j`` = mean over heads of ``q_h . k_jh / sqrt(Dh) + bias_h(dt_j)``, the
ESU's own logits; the top ``k`` (100) go to the ESU, which recomputes them from the looked-up
embeddings (with gradient) and attends. As long as the tables are fresh, the GSU's top ``k`` is
exactly the top ``k`` of the full attention logits. The projections are trained, so every row
changes at every step: the tables are rebuilt whole every ``refresh_every`` steps (1 = every
step, exact; an O(catalog) refresh, the nearline refresh of the paper is the periodic mode).

Per behavior the search reads ``H Dh`` floats twice (item and category keys) and does ``H Dh``
multiply-adds: O(L) float work, no embedding lookup and no projection of the L behaviors.
"""

from typing import Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.modules.attention import TargetAttention, head_logits
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.modules.esu import ExactSearchUnit
from torchrec_longseq.modules.lookup import lookup_behaviors
from torchrec_longseq.retrieval import kernels, topk


class ProjectedRows:
    """``derive`` of TWIN's tables: an embedding block through ``W_q`` and ``W_k``.

    ``e [N, D] -> [e W_q[:, cols]^T, e W_k[:, cols]^T]`` (``[N, 2 H Dh]``), where ``cols`` are
    the columns of ``[e_item; e_category]`` that this table's embeddings fill. A plain callable
    (not a module): it reads the ESU's weights without registering them a second time.
    """

    def __init__(self, attention: TargetAttention, cols: slice) -> None:
        self.attention = attention
        self.cols = cols

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.attention.q_proj.weight[:, self.cols],
                            self.attention.k_proj.weight[:, self.cols]])  # [2 H Dh, D]
        return embeddings @ weight.detach().t()


@torch.fx.wrap
def twin_scores(item_rows: torch.Tensor, category_rows: torch.Tensor, items: torch.Tensor,
                categories: torch.Tensor, target_items: torch.Tensor,
                target_categories: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor,
                num_heads: int) -> torch.Tensor:
    """The ESU's logits, averaged over heads, for every behavior, from the per-item tables.

    ``*_rows [rows, 2 H Dh]`` hold ``[W_q block, W_k block]`` per id; ``items, categories [N]``
    the history, ``target_* [B]`` the candidates, ``bias [N, H]`` the cross-feature biases ->
    ``[N]``.
    """
    width = item_rows.size(1) // 2
    query = item_rows[target_items, :width] + category_rows[target_categories, :width]  # [B, HDh]
    keys = item_rows[items, width:] + category_rows[categories, width:]  # [N, H Dh]
    seg = jagged.segment_ids(offsets, items.numel())
    return head_logits(query, keys, seg, num_heads, bias).mean(dim=1)


class TwinSearch(nn.Module):
    """TWIN's CP-GSU: the ``k`` behaviors with the highest ESU attention logits.

    Args:
        table_sizes (Tuple[int, int]): rows of the item and of the category table.
        embedding_dim (int): D, width of both tables.
        esu (ExactSearchUnit): the ESU (``time_as_bias=True``) whose attention ranks; its time
            bias is shared (the same module), its projections are read into the tables.
        k (int): behaviors kept per sample (TWIN: 100); ties go to the more recent behavior.
        refresh_every (int): rebuild the tables every N steps (1 = exact).

    Example::

        esu = ExactSearchUnit(32, TimeIntervalEmbedding(4), 4, 8, time_as_bias=True)
        search = TwinSearch((2000, 100), 16, esu, k=100)
        indices, lengths, _ = search(features, lookup, history_time, request_time)
    """

    def __init__(self, table_sizes: Tuple[int, int], embedding_dim: int, esu: ExactSearchUnit,
                 k: int, refresh_every: int = 1) -> None:
        super().__init__()
        if not esu.time_as_bias:
            raise ValueError("TWIN's search needs an ESU with time_as_bias=True")
        self.k = topk.check_k(k)
        self.num_heads = esu.attention.num_heads
        self.time_bias = esu.time_embedding
        width = 2 * esu.attention.output_dim
        d = embedding_dim
        self.item_rows = ItemDerivedTable(
            table_sizes[0], width, torch.float32, ProjectedRows(esu.attention, slice(0, d)),
            refresh_every, key=TARGET_ITEM, trained_derive=True)
        self.category_rows = ItemDerivedTable(
            table_sizes[1], width, torch.float32, ProjectedRows(esu.attention, slice(d, 2 * d)),
            refresh_every, key=TARGET_CATEGORY, trained_derive=True)

    def forward(
        self, features: KeyedJaggedTensor, lookup: EmbeddingCollection,
        history_time: Optional[torch.Tensor], request_time: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if history_time is None or request_time is None:
            raise ValueError("TWIN's search needs history_time and request_time")
        hist_item = features[HIST_ITEM]
        offsets = hist_item.offsets()
        with torch.no_grad():
            intervals = request_time[jagged.segment_ids(offsets, history_time.numel())] - history_time
            indices, lengths = twin_topk(
                self.item_rows.table, self.category_rows.table, hist_item.values(),
                features[HIST_CATEGORY].values(), features[TARGET_ITEM].values(),
                features[TARGET_CATEGORY].values(), offsets, self.time_bias(intervals),
                self.num_heads, self.k)
        return indices, lengths, None


@torch.fx.wrap
def twin_topk(item_rows: torch.Tensor, category_rows: torch.Tensor, items: torch.Tensor,
              categories: torch.Tensor, target_items: torch.Tensor,
              target_categories: torch.Tensor, offsets: Optional[torch.Tensor],
              bias: torch.Tensor, num_heads: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``twin_scores`` per sample (ties to the more recent behavior): on CPU one
    compiled pass per sample (``kernels.twin_topk_by_id``, the mean over heads folded into one dot
    product and the mean bias), elsewhere ``twin_scores`` and ``jagged_topk``.
    ``offsets=None``: one history (and ``bias``) shared by all candidates (serving)."""
    width = item_rows.size(1) // 2
    queries = item_rows[target_items, :width] + category_rows[target_categories, :width]
    head_dim = width // num_heads
    found = kernels.twin_topk_by_id(item_rows, items, category_rows, categories, queries,
                                    bias.mean(dim=1), offsets, k,
                                    1.0 / (num_heads * head_dim**0.5))
    if found is not None:
        return found
    if offsets is None:  # the torch ops run the shared history as B copies
        n, b = items.numel(), target_items.numel()
        copies = jagged.copies_offsets(n, b, items.device)
        return jagged.positions_in_copy(twin_topk(
            item_rows, category_rows, items.repeat(b), categories.repeat(b), target_items,
            target_categories, copies, bias.repeat(b, 1), num_heads, k), n)
    scores = twin_scores(item_rows, category_rows, items, categories, target_items,
                         target_categories, offsets, bias, num_heads)
    return topk.jagged_topk(scores, offsets, k)


@torch.no_grad()
def full_attention_topk(esu: ExactSearchUnit, lookup: EmbeddingCollection,
                        features: KeyedJaggedTensor, history_time: torch.Tensor,
                        request_time: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference TWIN's search approximates: the top ``k`` of the ESU's logits (mean over
    heads) over *every* behavior, computed from embeddings looked up now (O(L) lookup; for
    measuring the search, e.g. its overlap with this, not for training)."""
    offsets = features[HIST_ITEM].offsets()
    everything = jagged.all_positions(offsets)
    target, behaviors, _, _, _ = lookup_behaviors(lookup, features, everything)
    seg = jagged.segment_ids(offsets, behaviors.size(0))
    attention = esu.attention
    bias = esu.time_embedding(request_time[seg] - history_time)
    logits = head_logits(attention.q_proj(target), attention.k_proj(behaviors), seg,
                         attention.num_heads, bias).mean(dim=1)
    return topk.jagged_topk(logits, offsets, k)
