"""TWIN (Chang et al., KDD 2023): one target attention for both the search and the exact stage.

TWIN's consistency-preserving GSU (CP-GSU) ranks the whole history with the *same* attention as
the ESU, so what it keeps is what the ESU would weight most. It stays cheap by splitting the
behavior features in two:

* inherent, item-side features (here ``e_j``, the behavior's attributes side by side, e.g.
  ``[e_item; e_category; e_shop]``): their key projection ``W_k e_j`` does not depend on the
  user, so it is computed once per item and kept in per-item tables. The projection splits by
  blocks, ``W_k e_j = sum_a W_k^a e_a``, so one table per attribute suffices
  (``ItemDerivedTable``). The tables also hold
  ``W_q``'s blocks, so the candidate's query is read by id as well and the whole search runs
  before the sharded lookup;
* user-item cross features (here the time interval): each compressed to one scalar bias per
  head (``ExactSearchUnit(time_as_bias=True)``, a bucketed interval -> ``[H]``).

With the ESU's similarity term (``ModelConfig.esu_similarity``, an opt-in departure,
docs/fidelity.md), each head's logit also holds ``a_h (cos(t_A, e_jA) - c_h)`` for one
attribute ``A``. The cosine is the dot product of unit vectors, so it is an item-side factor
too: table ``A``'s rows keep ``e / |e|`` next to their keys and the candidate's query its own,
scaled by the heads' mean ``a``; the search then ranks by the same logits as the ESU (``c_h`` is
one shift per head, which ranks nothing).

GSU score of behavior ``j`` = mean over heads of ``q_h . k_jh / sqrt(Dh) + bias_h(dt_j)``, the
ESU's own logits; the top ``k`` (100) go to the ESU, which recomputes them from the looked-up
embeddings (with gradient) and attends. As long as the tables are fresh, the GSU's top ``k`` is
exactly the top ``k`` of the full attention logits. The projections are trained, so every row
changes at every step: the tables are rebuilt whole every ``refresh_every`` steps (1 = every
step, exact; an O(catalog) refresh, the nearline refresh of the paper is the periodic mode).

Per behavior the search reads ``H Dh`` floats twice (item and category keys) and does ``H Dh``
multiply-adds: O(L) float work, no embedding lookup and no projection of the L behaviors.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingConfig, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import TargetAttention
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.modules.esu import ExactSearchUnit
from torchrec_longseq.modules.sequence import attribute_columns
from torchrec_longseq.retrieval import kernels, topk
from torchrec_longseq.schema import SequenceSchema


class ProjectedRows:
    """``derive`` of TWIN's tables: an embedding block through ``W_q`` and ``W_k``.

    ``e [N, D] -> [e W_q[:, cols]^T, s, e W_k[:, cols]^T, s]`` (``[N, 2 (H Dh + m)]``), where
    ``cols`` are the columns of ``[e_item; e_category]`` that this table's embeddings fill and
    ``s [N, m]`` the ESU's similarity columns: ``e / |e|`` for the table the similarity term reads
    (``unit``), zeros for the others (``m = 0`` without the term). A plain callable (not a
    module): it reads the ESU's weights without registering them a second time.
    """

    def __init__(self, attention: TargetAttention, cols: slice, similarity_width: int = 0,
                 unit: bool = False) -> None:
        self.attention = attention
        self.cols = cols
        self.similarity_width = similarity_width
        self.unit = unit

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.attention.q_proj.weight[:, self.cols],
                            self.attention.k_proj.weight[:, self.cols]])  # [2 H Dh, D]
        rows = embeddings @ weight.detach().t()
        if not self.similarity_width:
            return rows
        # the unit vector as the ESU's cosine_similarity takes it: e / max(|e|, 1e-8)
        s = (nn.functional.normalize(embeddings, dim=1, eps=1e-8) if self.unit
             else embeddings.new_zeros(embeddings.size(0), self.similarity_width))
        q, k = rows.chunk(2, dim=1)
        return torch.cat([q, s, k, s], dim=1)


def summed_rows(tables: List[torch.Tensor], ids: List[torch.Tensor], cols: slice) -> torch.Tensor:
    """``sum_a tables[a][ids[a], cols]``: one projected block per attribute, added up."""
    out = tables[0][ids[0], cols]
    for table, index in zip(tables[1:], ids[1:]):
        out = out + table[index, cols]
    return out


@torch.fx.wrap
def twin_scores(rows: List[torch.Tensor], ids: List[torch.Tensor], queries: torch.Tensor,
                offsets: torch.Tensor, bias: torch.Tensor, num_heads: int,
                head_dim: int) -> torch.Tensor:
    """The ESU's logits, averaged over heads, for every behavior, from the per-attribute tables.

    ``rows[a] [rows_a, 2 w]`` hold ``[W_q block, s, W_k block, s]`` per id of attribute ``a``
    (``w = H Dh + m``: ``m`` similarity columns, see ``ProjectedRows``), ``ids[a] [N]`` the
    history's ids, ``queries [B, w]`` the candidates' queries (their similarity columns already
    scaled, see ``TwinSearch``), ``bias [N, H]`` the cross-feature biases -> ``[N]``: the mean
    over heads of ``q_h . k_jh / sqrt(Dh) + bias_h``, which is ``q . k / (H sqrt(Dh))`` plus the
    mean bias (without the similarity term's threshold, one constant per sample that ranks
    nothing). ``head_dim``: ``Dh`` (``w`` alone does not give it: ``m`` may be > 0).
    """
    width = rows[0].size(1) // 2
    keys = summed_rows(rows, ids, slice(width, 2 * width))  # [N, w]
    seg = jagged.segment_ids(offsets, ids[0].numel())
    dots = (queries.index_select(0, seg) * keys).sum(dim=1)
    return dots / (num_heads * head_dim**0.5) + bias.mean(dim=1)


class TwinSearch(nn.Module):
    """TWIN's CP-GSU: the ``k`` behaviors with the highest ESU attention logits.

    Args:
        schema (SequenceSchema): the sequence's keys and tables; every attribute gets a table of
            projected rows (the query part is read for the attributes with a candidate key).
        tables (Dict[str, EmbeddingConfig]): the EmbeddingCollection's configs by table name.
        esu (ExactSearchUnit): the ESU (``time_as_bias=True``) whose attention ranks; its time
            bias is shared (the same module), its projections are read into the tables.
        k (int): behaviors kept per sample (TWIN: 100); ties go to the more recent behavior.
        refresh_every (int): rebuild the tables every N steps (1 = exact).

    Example::

        esu = ExactSearchUnit(32, TimeIntervalEmbedding(4), 4, 8, time_as_bias=True)
        search = TwinSearch(default_schema(), table_configs(ec), esu, k=100)
    """

    def __init__(self, schema: SequenceSchema, tables: Dict[str, EmbeddingConfig],
                 esu: ExactSearchUnit, k: int, refresh_every: int = 1) -> None:
        super().__init__()
        if not esu.time_as_bias:
            raise ValueError("TWIN's search needs an ESU with time_as_bias=True")
        self.schema = schema
        self.k = topk.check_k(k)
        self.kernel = "auto"  # retrieval.kernels.set_kernel
        self.num_heads = esu.attention.num_heads
        self.head_dim = esu.attention.head_dim
        self.time_bias = esu.time_embedding
        # the ESU's similarity term a_h cos(t[s], e_j[s]) is in the logits the search ranks by:
        # the table of columns s keeps each row's unit vector next to its keys, the query the
        # candidate's, scaled by the heads' mean a (shared with the ESU, not a copy)
        similarity = esu.similarity
        self.similarity_width = 0 if similarity is None else similarity[1] - similarity[0]
        self.similarity_scale = None if similarity is None else esu.similarity_scale
        width = 2 * (esu.attention.output_dim + self.similarity_width)
        self.rows = nn.ModuleList(
            ItemDerivedTable(tables[a.table].num_embeddings, width, torch.float32,
                             ProjectedRows(esu.attention, cols, self.similarity_width,
                                           unit=similarity == (cols.start, cols.stop)),
                             refresh_every, table=a.table, trained_derive=True)
            for a, cols in zip(schema.attributes, attribute_columns(schema, tables)))
        # which attributes have a candidate (their query blocks make the candidate's query)
        self.matched = [i for i, a in enumerate(schema.attributes) if a.candidate_key is not None]

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]]:
        offsets = features[self.schema.history_keys[0]].offsets()
        with torch.no_grad():
            intervals = request_time[jagged.segment_ids(offsets, history_time.numel())] - history_time
            indices, lengths = twin_topk(
                [r.table for r in self.rows],
                [features[key].values() for key in self.schema.history_keys],
                self._queries([features[a.candidate_key].values() for a in self.schema.matched]),
                offsets, self.time_bias(intervals), self.num_heads, self.k, self.kernel,
                head_dim=self.head_dim)
        return indices, lengths, None

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # the history's time biases are bucketed once for all candidates: [L, H]
        return twin_topk([r.table for r in self.rows],
                         [history[key] for key in self.schema.history_keys],
                         self._queries([candidates[a.candidate_key] for a in self.schema.matched]),
                         None, self.time_bias(intervals), self.num_heads, self.k, self.kernel,
                         head_dim=self.head_dim)

    def _queries(self, candidate_ids: List[torch.Tensor]) -> torch.Tensor:
        """``[B, H Dh + m]``: the candidates' projected queries, summed over their attributes,
        then their similarity columns times ``mean_h a_h * H sqrt(Dh)``, so that the search's
        ``q . k / (H sqrt(Dh))`` adds ``mean_h a_h cos``."""
        width = self.rows[0].table.size(1) // 2
        queries = summed_rows([self.rows[i].table for i in self.matched], candidate_ids,
                              slice(0, width))
        if self.similarity_scale is None:
            return queries
        split = width - self.similarity_width
        factor = self.similarity_scale.mean() * (self.num_heads * self.head_dim**0.5)
        return torch.cat([queries[:, :split], queries[:, split:] * factor], dim=1)


@torch.fx.wrap
def twin_topk(rows: List[torch.Tensor], ids: List[torch.Tensor], queries: torch.Tensor,
              offsets: Optional[torch.Tensor], bias: torch.Tensor, num_heads: int,
              k: int, kernel: str = "auto", *, head_dim: int
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``twin_scores`` per sample (ties to the more recent behavior): on CPU one
    compiled pass per sample (``kernels.twin_topk_by_id``, the mean over heads folded into one dot
    product and the mean bias), elsewhere ``twin_scores`` and ``jagged_topk``.
    ``offsets=None``: one history (and ``bias``) shared by all candidates (serving).
    ``head_dim``: ``Dh`` (the rows' width alone does not give it, see ``twin_scores``).

    The kernel reads two tables by id: with more attributes, those after the first are added up
    per behavior first (one ``[N, 2 H Dh]`` pass); with one, the second is a zero row."""
    width = rows[0].size(1) // 2
    n = ids[0].numel()
    if len(rows) == 2:
        second, second_ids = rows[1], ids[1]
    elif len(rows) == 1:
        second, second_ids = rows[0].new_zeros(1, rows[0].size(1)), torch.zeros_like(ids[0])
    else:
        second = summed_rows(rows[1:], ids[1:], slice(0, 2 * width))
        second_ids = torch.arange(n, device=ids[0].device)
    found = kernels.twin_topk_by_id(rows[0], ids[0], second, second_ids, queries,
                                    bias.mean(dim=1), offsets, k,
                                    1.0 / (num_heads * head_dim**0.5), kernel)
    if found is not None:
        return found
    if offsets is None:  # the torch ops run the shared history as B copies
        b = queries.size(0)
        copies = jagged.copies_offsets(n, b, ids[0].device)
        return jagged.positions_in_copy(twin_topk(
            rows, [i.repeat(b) for i in ids], queries, copies, bias.repeat(b, 1), num_heads, k,
            kernel, head_dim=head_dim), n)
    scores = twin_scores(rows, ids, queries, offsets, bias, num_heads, head_dim)
    return topk.jagged_topk(scores, offsets, k, kernel=kernel)
