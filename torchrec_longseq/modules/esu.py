"""The exact search unit (ESU) shared by SIM and ETA, and the search-then-attend module."""

from typing import Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.modules import derived
from torchrec_longseq.modules.attention import TargetAttention
from torchrec_longseq.modules.lookup import lookup_behaviors
from torchrec_longseq.modules.time import TimeIntervalEmbedding, intervals_of


class ExactSearchUnit(nn.Module):
    """Multi-head target attention over retrieved behaviors with time-interval embeddings (SIM's ESU).

    Behavior ``j`` is ``z_j = concat(e_j, e_time(dt_j))`` with ``dt_j = request time - behavior
    time`` (log-bucketed); the candidate ``t`` queries them with ``TargetAttention``, heads
    concatenated. Zero retrieved behaviors give a zero vector.

    With ``time_as_bias`` (TWIN's split of the features), ``z_j = e_j`` holds only the item-side
    (inherent) features and the interval, a user-item cross feature, is compressed to one
    scalar bias per head added to the logits: ``time_embedding`` is then ``num_heads`` wide.

    Args:
        behavior_dim (int): width of ``e_j`` and of the candidate ``t``.
        time_embedding (TimeIntervalEmbedding): the interval encoder.
        num_heads (int): attention heads.
        head_dim (int): width per head; the output is ``num_heads * head_dim``.
        time_as_bias (bool): the interval as a per-head logit bias instead of a key feature.

    Example::

        esu = ExactSearchUnit(32, TimeIntervalEmbedding(8), num_heads=4, head_dim=8)
        out = esu(target, behaviors, offsets, intervals)  # [B, 32]
    """

    def __init__(self, behavior_dim: int, time_embedding: TimeIntervalEmbedding, num_heads: int,
                 head_dim: int, time_as_bias: bool = False) -> None:
        super().__init__()
        self.time_embedding = time_embedding
        self.time_as_bias = time_as_bias
        time_dim = time_embedding.embedding.embedding_dim
        if time_as_bias and time_dim != num_heads:
            raise ValueError(f"a time bias needs one value per head: time embedding width "
                             f"{time_dim} != num_heads {num_heads}")
        key_dim = behavior_dim if time_as_bias else behavior_dim + time_dim
        self.attention = TargetAttention(behavior_dim, key_dim, num_heads, head_dim)
        self.output_dim = self.attention.output_dim

    def forward(self, target: torch.Tensor, behaviors: torch.Tensor,
                offsets: Optional[torch.Tensor], intervals: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``target [B, D]``, ``behaviors [M, D]``, ``offsets [B + 1]`` (``None``: the M
        behaviors are every candidate's), ``intervals [M]`` -> ``[B, H * Dh]``.

        ``index [M']``: the attended behaviors are ``behaviors[index]`` (jagged by ``offsets``);
        serving passes each distinct behavior of the request once (``behaviors [U, D]``,
        ``intervals [U]``), so its key is built once however many candidates retrieved it."""
        time = self.time_embedding(intervals)
        keys = behaviors if self.time_as_bias else torch.cat([behaviors, time], dim=1)  # [M, Dk]
        bias = time if self.time_as_bias else None  # [M, H]
        return self.attention(target, keys, offsets, bias, index)


HISTORY_KEY = {TARGET_ITEM: HIST_ITEM, TARGET_CATEGORY: HIST_CATEGORY}


@torch.fx.wrap
def looked_up_ids(features: KeyedJaggedTensor, key: str, retrieved: torch.Tensor,
                  recent: torch.Tensor) -> torch.Tensor:
    """Ids of ``key``'s table (``target_item`` or ``target_category``) that this step looked up:
    the candidate's and those of the retrieved and recent positions."""
    hist = features[HISTORY_KEY[key]].values()
    return torch.cat([features[key].values(), hist[retrieved], hist[recent]])


class WholeHistory(nn.Module):
    """The search that keeps everything: every behavior goes to the ESU.

    ``SearchBasedInterest(WholeHistory(), ...)`` is the full-length target attention that SIM and
    ETA approximate: the same ESU and short-term branch, with no retrieval (O(L) lookup and
    attention).
    """

    def forward(
        self, features: KeyedJaggedTensor, lookup: EmbeddingCollection,
        history_time: Optional[torch.Tensor], request_time: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        indices, lengths = jagged.all_positions(features[HIST_ITEM].offsets())
        return indices, lengths, None


class SearchBasedInterest(nn.Module):
    """Search the whole history on ids, then attend over what was found (SIM and ETA).

    ::

        history ids ──► search (GSU) ──► <= k positions ─┐
        last ``short_window`` positions ─────────────────┼─► one EmbeddingCollection lookup
        candidate ───────────────────────────────────────┘      │
              ESU(candidate, retrieved + time) ◄─────────────────┤
              DIN(candidate, recent window)    ◄─────────────────┘

    Only the candidate, the ``<= k`` retrieved and the ``<= short_window`` recent behaviors are
    looked up: ``<= k + short_window + 1`` item rows per sample, whatever L is.

    Args:
        search (nn.Module): ``search(features, lookup, history_time, request_time) -> (indices [M],
            lengths [B], aux)``
            (``HardSearch``, ``SoftSearch``, ``SimHashSearch``); ``aux`` is an auxiliary logit
            ``[B]`` or ``None``.
        esu (ExactSearchUnit): attention over the retrieved behaviors.
        short_term (Optional[nn.Module]): the short-term branch over the recent window: DIN's
            activation unit (``DINAttention``, the interval embedded by the ESU's
            ``time_embedding`` as side information; SIM, TWIN) or multi-head target attention
            (an ``ExactSearchUnit`` of its own, as ETA's paper and FuxiCTR's ETA have it);
            ``None`` for none (the long-term path alone: nothing recent is looked up).
        short_window (int): how many recent behaviors the short-term branch sees (0 without one).

    Output: ``[B, 2 D + esu.output_dim + short_term.output_dim]`` (candidate, long-term interest,
    short-term interest; no short-term columns without the branch) and the search's auxiliary
    logit.
    """

    def __init__(self, search: nn.Module, esu: ExactSearchUnit,
                 short_term: Optional[nn.Module], short_window: int) -> None:
        super().__init__()
        if (short_term is None) != (short_window == 0):
            raise ValueError(f"a short-term branch needs a window and a window needs the branch: "
                             f"short_window={short_window}, short_term={short_term}")
        self.search = search
        self.esu = esu
        self.short_term = short_term
        self.short_window = short_window
        behavior_dim = esu.attention.q_proj.in_features
        self.output_dim = behavior_dim + esu.output_dim + (
            short_term.output_dim if short_term is not None else 0)

    def forward(
        self,
        features: KeyedJaggedTensor,
        history_time: torch.Tensor,
        request_time: torch.Tensor,
        lookup: EmbeddingCollection,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        offsets = features[HIST_ITEM].offsets()
        indices, lengths, aux = self.search(features, lookup, history_time, request_time)
        recent = jagged.last_n(offsets, self.short_window) if self.short_term is not None else None
        target, retrieved, retrieved_offsets, short, short_offsets = lookup_behaviors(
            lookup, features, (indices, lengths), recent
        )
        recent_indices = recent[0] if recent is not None else indices[:0]
        for table in self.search.modules():
            if isinstance(table, derived.ItemDerivedTable):  # re-derived after the optimizer step
                derived.remember_items(table, looked_up_ids(features, table.key, indices,
                                                            recent_indices))
        intervals = intervals_of(history_time, request_time, offsets, indices)
        short_intervals = intervals_of(history_time, request_time, offsets, recent_indices)
        return self.attend(target, retrieved, retrieved_offsets, intervals, short, short_offsets,
                           short_intervals), aux

    def attend(self, target: torch.Tensor, retrieved: torch.Tensor,
               retrieved_offsets: Optional[torch.Tensor], intervals: torch.Tensor,
               short: torch.Tensor, short_offsets: Optional[torch.Tensor],
               short_intervals: torch.Tensor,
               retrieved_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Everything after the search and the lookup (serving calls it with looked-up rows it
        shares between candidates): ``target [B, D]``, the retrieved ``[M, D]`` and recent
        ``[S, D]`` behaviors with their offsets ``[B + 1]`` and intervals ``[M]``, ``[S]`` ->
        ``[B, output_dim]``. Offsets ``None``: those behaviors are every candidate's (one user's
        window; with ``WholeHistory``, the user's whole history). ``retrieved_index``: the
        retrieved behaviors are ``retrieved[retrieved_index]`` (see ``ExactSearchUnit``)."""
        long_term = self.esu(target, retrieved, retrieved_offsets, intervals, retrieved_index)
        if self.short_term is None:
            return torch.cat([target, long_term], dim=1)
        if isinstance(self.short_term, ExactSearchUnit):  # multi-head target attention (ETA)
            short_term = self.short_term(target, short, short_offsets, short_intervals)
        else:  # DIN: the interval's embedding as side information
            short_term = self.short_term(target, short, short_offsets,
                                         self.esu.time_embedding(short_intervals))
        return torch.cat([target, long_term, short_term], dim=1)
