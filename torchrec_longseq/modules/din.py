"""DIN baseline: target attention over the most recent N behaviors."""

from typing import Dict, List

import torch
from torchrec import KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import DINAttention
from torchrec_longseq.modules.sequence import Looked, Selection, SequenceModule
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.schema import SequenceSchema


class DIN(SequenceModule):
    """DIN (Zhou et al., KDD 2018) as a sequence module.

    Only the ``last_n`` most recent behaviors are looked up and attended to: the short-term
    baseline (the whole-history upper bound is ``SearchBasedInterest`` with ``WholeHistory``). A
    behavior is its attributes' embeddings side by side (width ``D``); the attention unit also
    sees its time-interval embedding, the same time information SIM's and ETA's ESU get.

    Args:
        schema (SequenceSchema): the sequence's keys and tables.
        behavior_dim (int): D, the width of a behavior row (``sequence.behavior_dim``).
        attention_hidden (List[int]): hidden widths of DIN's attention MLP.
        time_embedding (TimeIntervalEmbedding): encoder of request time - behavior time.
        last_n (int): how many recent behaviors to use.

    Output: ``[B, 2 D]``, the candidate's embedding and the attention-pooled history.

    Example::

        din = DIN(default_schema(), 32, [64, 32], TimeIntervalEmbedding(8), last_n=50)
        arch = SequenceArch(embedding_collection, {"recent": din})
    """

    def __init__(self, schema: SequenceSchema, behavior_dim: int, attention_hidden: List[int],
                 time_embedding: TimeIntervalEmbedding, last_n: int = 50) -> None:
        super().__init__()
        if last_n < 0:
            raise ValueError(f"DIN's window last_n must be >= 0, got {last_n}")
        self.schema = schema
        self.last_n = last_n
        self.time_embedding = time_embedding
        self.attention = DINAttention(behavior_dim, attention_hidden,
                                      time_embedding.embedding.embedding_dim)
        self.output_dim = 2 * behavior_dim

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Selection:
        return Selection(jagged.last_n(features[self.schema.history_keys[0]].offsets(),
                                       self.last_n))

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Selection:
        n = intervals.numel()
        return Selection((jagged.last_positions(n, self.last_n, intervals.device), None))

    def attend(self, looked: Looked, selection: Selection) -> torch.Tensor:
        """``[B, 2 D]``: the candidate next to the attention over the recent behaviors (offsets
        ``None``: one user's window, every candidate's)."""
        behaviors, intervals = looked.long, looked.long_intervals
        if looked.long_index is not None:
            behaviors, intervals = behaviors[looked.long_index], intervals[looked.long_index]
        pooled = self.attention(looked.candidates, behaviors, looked.long_offsets,
                                self.time_embedding(intervals))
        return torch.cat([looked.candidates, pooled], dim=1)
