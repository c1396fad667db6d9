"""The batch every model consumes.

One sample is one (user, request time, candidate item) with the user's behavior history before
the request time, truncated to the most recent ``max_seq_len`` behaviors. Sparse features come as
one KeyedJaggedTensor (keys in this order)::

    key              length per sample   values
    user_id          1                   user id                      (pooled, EBC)
    context_hour     1                   hour of day of the request   (pooled, EBC)
    target_item      1                   candidate item id
    target_category  1                   candidate category id
    hist_item        L_b                 item id of each behavior, oldest first
    hist_category    L_b                 category id of each behavior, aligned with hist_item

    e.g. B = 2, L = [3, 0]:
    hist_item.values   = [i00 i01 i02]      hist_item.lengths = [3, 0]
    history_time       = [t00 t01 t02]      (aligned with hist_item.values)
    request_time       = [T0, T1]           t0j < T0: every behavior is strictly before its request

Dense tensors: ``history_time [N]`` (int64 seconds, non-decreasing within a sample),
``request_time [B]`` (int64 seconds), ``labels [B]`` (float 0/1). ``relevant [N]`` (bool) is the
generator's ground truth: the behaviors that carry the label's signal, for measuring retrieval
recall; models never read it.
"""

from dataclasses import dataclass
from typing import List

import torch
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

USER_ID = "user_id"
CONTEXT_HOUR = "context_hour"
TARGET_ITEM = "target_item"
TARGET_CATEGORY = "target_category"
HIST_ITEM = "hist_item"
HIST_CATEGORY = "hist_category"
FEATURE_KEYS: List[str] = [USER_ID, CONTEXT_HOUR, TARGET_ITEM, TARGET_CATEGORY, HIST_ITEM, HIST_CATEGORY]


@dataclass
class Batch(Pipelineable):
    """A batch in the layout above; movable and pin-able like TorchRec's own ``Batch``."""

    features: KeyedJaggedTensor
    history_time: torch.Tensor
    request_time: torch.Tensor
    labels: torch.Tensor
    relevant: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.labels.numel()

    @property
    def user_ids(self) -> torch.Tensor:
        """``[B]`` the user of each sample (for GAUC)."""
        return self.features[USER_ID].values()

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            features=self.features.to(device=device, non_blocking=non_blocking),
            history_time=self.history_time.to(device=device, non_blocking=non_blocking),
            request_time=self.request_time.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            relevant=self.relevant.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.features.record_stream(stream)
        for t in (self.history_time, self.request_time, self.labels, self.relevant):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            features=self.features.pin_memory(),
            history_time=self.history_time.pin_memory(),
            request_time=self.request_time.pin_memory(),
            labels=self.labels.pin_memory(),
            relevant=self.relevant.pin_memory(),
        )
