"""DIN baseline: target attention over the most recent N behaviors."""

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq.data.batch import HIST_ITEM
from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import DINAttention
from torchrec_longseq.modules.lookup import lookup_behaviors
from torchrec_longseq.modules.time import TimeIntervalEmbedding, intervals_of


class DIN(nn.Module):
    """DIN (Zhou et al., KDD 2018) as a sequence module of ``LongSeqCTR``.

    Only the ``last_n`` most recent behaviors are looked up and attended to: the short-term
    baseline (the whole-history upper bound is ``SearchBasedInterest`` with ``WholeHistory``). A
    behavior is its item embedding concatenated with its category embedding (width ``2 D``); the
    attention unit also sees its time-interval embedding, the same time information SIM's and
    ETA's ESU get.

    Args:
        embedding_dim (int): D, the width of the item and category tables.
        attention_hidden (List[int]): hidden widths of DIN's attention MLP.
        time_embedding (TimeIntervalEmbedding): encoder of request time - behavior time.
        last_n (int): how many recent behaviors to use.

    Output: ``[B, 4 D]``, the candidate's embedding and the attention-pooled history.

    Example::

        din = DIN(16, [64, 32], TimeIntervalEmbedding(8), last_n=50)
        out, _ = din(features, history_time, request_time, embedding_collection)
    """

    def __init__(
        self, embedding_dim: int, attention_hidden: List[int],
        time_embedding: TimeIntervalEmbedding, last_n: int = 50,
    ) -> None:
        super().__init__()
        if last_n < 0:
            raise ValueError(f"DIN's window last_n must be >= 0, got {last_n}")
        self.last_n = last_n
        self.time_embedding = time_embedding
        self.attention = DINAttention(2 * embedding_dim, attention_hidden,
                                      time_embedding.embedding.embedding_dim)
        self.output_dim = 4 * embedding_dim

    def forward(
        self,
        features: KeyedJaggedTensor,
        history_time: torch.Tensor,
        request_time: torch.Tensor,
        lookup: EmbeddingCollection,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hist_offsets = features[HIST_ITEM].offsets()
        selected = jagged.last_n(hist_offsets, self.last_n)
        target, behaviors, offsets, _, _ = lookup_behaviors(lookup, features, selected)
        intervals = intervals_of(history_time, request_time, hist_offsets, selected[0])
        return self.attend(target, behaviors, offsets, intervals), None

    def attend(self, target: torch.Tensor, behaviors: torch.Tensor, offsets: Optional[torch.Tensor],
               intervals: torch.Tensor) -> torch.Tensor:
        """After the lookup: ``target [B, 2 D]``, the recent ``behaviors [N, 2 D]`` with
        ``offsets [B + 1]`` (``None``: every candidate's, one user's window) and ``intervals
        [N]`` -> ``[B, 4 D]``."""
        pooled = self.attention(target, behaviors, offsets, self.time_embedding(intervals))
        return torch.cat([target, pooled], dim=1)
