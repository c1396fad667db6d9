"""Top-k per jagged segment, without padding to the longest history."""

from typing import Tuple

import torch

from torchrec_longseq.jagged import lengths_to_offsets, segment_ids


@torch.fx.wrap
def jagged_topk(
    scores: torch.Tensor, offsets: torch.Tensor, k: int, largest: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scored positions of every segment of a jagged score vector.

    Args:
        scores (Tensor): ``[N]`` one score per history value (float or integer).
        offsets (Tensor): ``[B + 1]`` segment offsets into ``scores``.
        k (int): how many to keep per segment; segments shorter than ``k`` keep all.
        largest (bool): keep the largest scores (``False``: the smallest, e.g. Hamming distances).

    Returns:
        ``(indices [M], lengths [B])``: positions into ``scores``, best first within a segment;
        ``lengths = min(L_b, k)``. Ties are broken by recency: the later position wins.

    A segmented sort (segment asc, score best-first, position desc), done as stable sorts over the
    N values: O(N log N) work, memory O(N), whatever the longest segment is.
    """
    n = scores.numel()
    lengths = offsets[1:] - offsets[:-1]
    kept = lengths.clamp(max=k)
    if n == 0 or k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device), kept.clamp(max=0)
    order = torch.arange(n - 1, -1, -1, device=scores.device)  # most recent first
    by_score = torch.sort(scores[order], descending=largest, stable=True).indices
    order = order[by_score]
    seg = segment_ids(offsets, n)
    by_segment = torch.sort(seg[order], stable=True).indices
    order = order[by_segment]
    rank = torch.arange(n, device=scores.device) - offsets[:-1][seg]  # seg is sorted: same layout
    return order[rank < k], kept


@torch.fx.wrap
def select_jagged(
    values: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather ``values[indices]`` and return it with its new ``[B + 1]`` offsets."""
    return values[indices], lengths_to_offsets(lengths)
