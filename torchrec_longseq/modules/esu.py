"""The exact search unit (ESU) shared by SIM and ETA, and the search-then-attend module."""

from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import TargetAttention, evidence, head_logits
from torchrec_longseq.modules.sequence import Looked, Selection, SequenceModule
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.retrieval import topk
from torchrec_longseq.schema import SequenceSchema


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
        evidence (bool): also output, per head, ``log(1 + sum_j exp(logit_j))`` over the
            behaviors (``attention.evidence``): how many behaviors match the candidate and how
            strongly, which the softmax average divides away. Not in SIM, ETA or TWIN: an
            opt-in departure (docs/fidelity.md); the output is then ``H * Dh + H`` wide.
        similarity (Optional[Tuple[int, int]]): columns ``[start, stop)`` of ``t`` and ``e_j``
            (one attribute's block, e.g. the item's) whose cosine, as
            ``a_h (cos(t, e_j) - c_h)`` with a learned scale ``a_h`` (starting at
            ``similarity_scale``) and a learned threshold ``c_h`` (starting at 0) per head, is
            added to every head's logit: the match of candidate and behavior by their
            embeddings, without waiting for the projections to learn it. The softmax does not
            see ``c_h`` (one shift for all of a head's behaviors); the evidence does: a
            behavior adds about ``exp(a_h (cos - c_h))`` to its ``1 + sum``, so ``c_h`` is
            the cosine from which a behavior counts. Not in SIM, ETA or TWIN: an opt-in
            departure (docs/fidelity.md section 7.4). Every (candidate, behavior) pair then has
            a logit term of its own, so a shared or indexed history is laid out per pair.
        similarity_scale (float): the scale's start (a cosine near 1 against ~0 for unrelated
            rows: ``exp(scale)`` times the weight).

    Example::

        esu = ExactSearchUnit(32, TimeIntervalEmbedding(8), num_heads=4, head_dim=8)
        out = esu(target, behaviors, offsets, intervals)  # [B, 32]
    """

    def __init__(self, behavior_dim: int, time_embedding: TimeIntervalEmbedding, num_heads: int,
                 head_dim: int, time_as_bias: bool = False, evidence: bool = False,
                 similarity: Optional[Tuple[int, int]] = None,
                 similarity_scale: float = 10.0) -> None:
        super().__init__()
        self.time_embedding = time_embedding
        self.time_as_bias = time_as_bias
        self.evidence = evidence
        self.similarity = similarity
        if similarity is not None:
            start, stop = similarity
            if not 0 <= start < stop <= behavior_dim:
                raise ValueError(f"similarity columns must be [start, stop) within the "
                                 f"{behavior_dim} columns of a behavior, got {similarity}")
            self.similarity_scale = nn.Parameter(torch.full((num_heads,), float(similarity_scale)))
            self.similarity_threshold = nn.Parameter(torch.zeros(num_heads))
        time_dim = time_embedding.embedding.embedding_dim
        if time_as_bias and time_dim != num_heads:
            raise ValueError(f"a time bias needs one value per head: time embedding width "
                             f"{time_dim} != num_heads {num_heads}")
        key_dim = behavior_dim if time_as_bias else behavior_dim + time_dim
        self.attention = TargetAttention(behavior_dim, key_dim, num_heads, head_dim)
        self.output_dim = self.attention.output_dim + (num_heads if evidence else 0)

    def forward(self, target: torch.Tensor, behaviors: torch.Tensor,
                offsets: Optional[torch.Tensor], intervals: torch.Tensor,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``target [B, D]``, ``behaviors [M, D]``, ``offsets [B + 1]`` (``None``: the M
        behaviors are every candidate's), ``intervals [M]`` -> ``[B, output_dim]``: the heads'
        outputs ``[B, H * Dh]``, then with ``evidence`` the heads' evidence ``[B, H]``.

        ``index [M']``: the attended behaviors are ``behaviors[index]`` (jagged by ``offsets``);
        serving passes each distinct behavior of the request once (``behaviors [U, D]``,
        ``intervals [U]``), so its key is built once however many candidates retrieved it."""
        if self.similarity is not None:
            behaviors, offsets, intervals = self._pairs(target, behaviors, offsets, intervals,
                                                        index)
            index = None
        time = self.time_embedding(intervals)
        keys = behaviors if self.time_as_bias else torch.cat([behaviors, time], dim=1)  # [M, Dk]
        bias = self._bias(target, behaviors, offsets, time)  # [M, H] or None
        out = self.attention(target, keys, offsets, bias, index)
        if not self.evidence:
            return out
        attention = self.attention
        return torch.cat([out, evidence(attention.q_proj(target), keys, offsets,
                                        attention.k_proj.weight, attention.num_heads, bias,
                                        index)], dim=1)

    def _pairs(self, target: torch.Tensor, behaviors: torch.Tensor,
               offsets: Optional[torch.Tensor], intervals: torch.Tensor,
               index: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attended behaviors one row per (candidate, behavior) pair: ``behaviors[index]``
        (jagged by ``offsets``), or every candidate's copy of a shared history
        (``offsets=None``) -> ``(behaviors [M, D], offsets [B + 1], intervals [M])``."""
        if offsets is None:
            b, n = target.size(0), behaviors.size(0)
            offsets = jagged.copies_offsets(n, b, behaviors.device)
            index = torch.arange(n, device=behaviors.device).repeat(b)
        if index is not None:
            behaviors, intervals = behaviors.index_select(0, index), intervals.index_select(0, index)
        return behaviors, offsets, intervals

    def _bias(self, target: torch.Tensor, behaviors: torch.Tensor,
              offsets: Optional[torch.Tensor], time: torch.Tensor) -> Optional[torch.Tensor]:
        """``[M, H]`` the logit bias of every attended row: TWIN's time bias and the
        similarity term (``None`` for neither)."""
        bias = time if self.time_as_bias else None
        if self.similarity is None:
            return bias
        start, stop = self.similarity
        seg = jagged.segment_ids(offsets, behaviors.size(0))
        cos = nn.functional.cosine_similarity(target[:, start:stop][seg],
                                              behaviors[:, start:stop], dim=1)  # [M]
        term = (cos.unsqueeze(1) - self.similarity_threshold) * self.similarity_scale  # [M, H]
        return term if bias is None else bias + term

    def logits(self, target: torch.Tensor, behaviors: torch.Tensor, offsets: torch.Tensor,
               intervals: torch.Tensor) -> torch.Tensor:
        """``[N]`` the attention logits of every behavior, averaged over heads."""
        time = self.time_embedding(intervals)
        keys = behaviors if self.time_as_bias else torch.cat([behaviors, time], dim=1)
        seg = jagged.segment_ids(offsets, behaviors.size(0))
        attention = self.attention
        return head_logits(attention.q_proj(target), attention.k_proj(keys), seg,
                           attention.num_heads,
                           self._bias(target, behaviors, offsets, time)).mean(dim=1)


class WholeHistory(nn.Module):
    """The search that keeps everything: every behavior goes to the ESU.

    ``SearchBasedInterest(WholeHistory(schema), ...)`` is the full-length target attention that
    SIM and ETA approximate: the same ESU and short-term branch, with no retrieval (O(L) lookup
    and attention).
    """

    def __init__(self, schema: SequenceSchema) -> None:
        super().__init__()
        self.schema = schema

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]]:
        indices, lengths = jagged.all_positions(features[self.schema.history_keys[0]].offsets())
        return indices, lengths, None

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return torch.arange(intervals.numel(), device=intervals.device), None


class SearchBasedInterest(SequenceModule):
    """Search the whole history on ids, then attend over what was found (SIM, ETA, TWIN).

    ::

        history ids ──► search (GSU) ──► <= k positions ─┐
        last ``short_window`` positions ─────────────────┼─► one EmbeddingCollection lookup
        candidate ───────────────────────────────────────┘      │   (SequenceArch)
              ESU(candidate, retrieved + time) ◄─────────────────┤
              DIN(candidate, recent window)    ◄─────────────────┘

    Only the candidate, the ``<= k`` retrieved and the ``<= short_window`` recent behaviors are
    looked up: ``<= k + short_window + 1`` rows per attribute and sample, whatever L is.

    Args:
        search (nn.Module): a GSU with ``schema``, ``search(features, history_time,
            request_time) -> (indices [M], lengths [B], aux)`` and ``search_request(history,
            candidates, intervals) -> (indices, lengths)`` (``HardSearch``, ``SoftSearch``,
            ``SimHashSearch``, ``TwinSearch``, ``WholeHistory``); ``aux`` is an auxiliary logit
            ``[B]`` or ``None``.
        esu (ExactSearchUnit): attention over the retrieved behaviors.
        short_term (Optional[nn.Module]): the short-term branch over the recent window: DIN's
            activation unit (``DINAttention``, the interval embedded by the ESU's
            ``time_embedding`` as side information; SIM, TWIN) or multi-head target attention
            (an ``ExactSearchUnit`` of its own, as ETA's paper and FuxiCTR's ETA have it);
            ``None`` for none (the long-term path alone: nothing recent is looked up).
        short_window (int): how many recent behaviors the short-term branch sees (0 without one).

    Output: ``[B, D + esu.output_dim + short_term.output_dim]`` (candidate, long-term interest,
    short-term interest; no short-term columns without the branch); the search's auxiliary logit
    is the selection's ``aux``.
    """

    def __init__(self, search: nn.Module, esu: ExactSearchUnit,
                 short_term: Optional[nn.Module], short_window: int) -> None:
        super().__init__()
        if (short_term is None) != (short_window == 0):
            raise ValueError(f"a short-term branch needs a window and a window needs the branch: "
                             f"short_window={short_window}, short_term={short_term}")
        self.schema = search.schema
        self.search_unit = search
        self.esu = esu
        self.short_term = short_term
        self.short_window = short_window
        behavior_dim = esu.attention.q_proj.in_features
        self.output_dim = behavior_dim + esu.output_dim + (
            short_term.output_dim if short_term is not None else 0)

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Selection:
        indices, lengths, aux = self.search_unit.search(features, history_time, request_time)
        return Selection((indices, lengths), self.window(features), aux)

    def window(self, features: KeyedJaggedTensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if self.short_term is None:
            return None
        return jagged.last_n(features[self.schema.history_keys[0]].offsets(), self.short_window)

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Selection:
        indices, lengths = self.search_unit.search_request(history, candidates, intervals)
        n = intervals.numel()
        recent = None
        if self.short_term is not None:
            recent = (jagged.last_positions(n, self.short_window, intervals.device), None)
        return Selection((indices, lengths), recent)

    def attend(self, looked: Looked, selection: Selection) -> torch.Tensor:
        """Everything after the search and the lookup -> ``[B, output_dim]``. Offsets ``None``
        (serving): those behaviors are every candidate's; ``long_index``: the retrieved
        behaviors are ``long[long_index]`` (see ``ExactSearchUnit``)."""
        target = looked.candidates
        long_term = self.esu(target, looked.long, looked.long_offsets, looked.long_intervals,
                             looked.long_index)
        if self.short_term is None:
            return torch.cat([target, long_term], dim=1)
        if isinstance(self.short_term, ExactSearchUnit):  # multi-head target attention (ETA)
            short_term = self.short_term(target, looked.short, looked.short_offsets,
                                         looked.short_intervals)
        else:  # DIN: the interval's embedding as side information
            short_term = self.short_term(target, looked.short, looked.short_offsets,
                                         self.esu.time_embedding(looked.short_intervals))
        return torch.cat([target, long_term, short_term], dim=1)

    @torch.no_grad()
    def attention_topk(self, looked: Looked, lengths: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The reference a search approximates: per sample the top ``max(lengths)`` behaviors of
        ``looked.long`` (the whole history, looked up) by the ESU's own logits, averaged over
        heads (TWIN's GSU consistency; for measuring, not for training)."""
        k = int(lengths.max()) if lengths.numel() else 0
        return topk.jagged_topk(self.esu.logits(looked.candidates, looked.long,
                                                looked.long_offsets, looked.long_intervals),
                                looked.long_offsets, k, kernel=self.esu.attention.kernel)
