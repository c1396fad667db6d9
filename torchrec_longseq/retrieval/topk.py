"""Top-k per jagged segment, without padding to the longest history."""

from typing import Tuple

import torch

from torchrec_longseq.jagged import segment_ids
from torchrec_longseq.retrieval import kernels


def check_k(k: int) -> int:
    """``k``, how many behaviors a search keeps per sample, checked: ``ValueError`` unless
    ``k >= 0`` (the searches, their modules and the compiled kernels all check it)."""
    if k < 0:
        raise ValueError(f"k (behaviors kept per sample) must be >= 0, got {k}")
    return k


@torch.fx.wrap
def jagged_topk(
    scores: torch.Tensor, offsets: torch.Tensor, k: int, largest: bool = True,
    kernel: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best-scored positions of every segment of a jagged score vector.

    Args:
        scores (Tensor): ``[N]`` one score per history value (float or integer).
        offsets (Tensor): ``[B + 1]`` segment offsets into ``scores``.
        k (int): how many to keep per segment; segments shorter than ``k`` keep all.
        largest (bool): keep the largest scores (``False``: the smallest, e.g. Hamming distances).
        kernel (str): which implementation runs (``retrieval.kernels.KERNELS``).

    Returns:
        ``(indices [M], lengths [B])``: positions into ``scores``, best first within a segment;
        ``lengths = min(L_b, k)``. Ties are broken by recency: the later position wins.

    A segmented sort (segment asc, score best-first, position desc), done as stable sorts over the
    N values: O(N log N) work, memory O(N), whatever the longest segment is. For float scores on
    CPU (largest first) a compiled partial sort per segment runs instead
    (``retrieval.kernels.float_topk``, O(N log k), identical results); scores must not be NaN.
    """
    check_k(k)
    if largest and scores.is_floating_point():
        found = kernels.float_topk(scores, offsets, k, kernel)
        if found is not None:
            return found
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
def jagged_topk_smallest_int(
    scores: torch.Tensor, offsets: torch.Tensor, k: int, max_score: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``jagged_topk(scores, offsets, k, largest=False)`` for small integer scores, in O(N).

    For scores in ``[0, max_score]`` (e.g. Hamming distances, ``max_score = m``) no sort over the
    N values is needed: a per-sample histogram of the scores gives each sample's threshold score
    ``t`` (the smallest with at least ``k`` values ``<= t``); every value below ``t`` is kept, and
    of the values equal to ``t`` the most recent ones fill the remaining places. Only the ``<= k``
    kept values per sample are then sorted, so the output order is exactly ``jagged_topk``'s:
    smallest first, ties broken by recency (later position first).

    Args:
        scores (Tensor): ``[N]`` integers in ``[0, max_score]``.
        offsets (Tensor): ``[B + 1]``.
        k (int): at most this many per sample.
        max_score (int): the largest possible score.

    Returns:
        ``(indices [M], lengths [B])`` with ``lengths = min(L_b, k)``.
    """
    check_k(k)
    n = scores.numel()
    batch = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    kept = lengths.clamp(max=max(k, 0))
    if n == 0 or k <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device), kept
    width = max_score + 1
    seg = segment_ids(offsets, n)
    scores = scores.long()
    histogram = torch.zeros(batch * width, dtype=torch.long, device=scores.device)
    histogram.index_add_(0, seg * width + scores, torch.ones_like(scores))
    at_most = histogram.view(batch, width).cumsum(1)  # [B, width]: values <= t
    # threshold: first t with at_most >= k (samples shorter than k keep everything)
    threshold = (at_most < k).sum(1).clamp(max=max_score)  # [B]
    below = torch.where(threshold > 0,
                        at_most.gather(1, (threshold - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
                        torch.zeros_like(threshold))  # [B] values < t
    t = threshold[seg]
    below_idx = (scores < t).nonzero().squeeze(1)
    # ties at the threshold (a small subset): keep the most recent k - below of each sample
    tie_idx = (scores == t).nonzero().squeeze(1)  # chronological
    tie_seg = seg[tie_idx]
    tie_count = torch.zeros(batch, dtype=torch.long, device=scores.device).index_add_(
        0, tie_seg, torch.ones_like(tie_seg))
    tie_end = torch.cumsum(tie_count, 0)  # one past each sample's last tie
    from_end = tie_end[tie_seg] - 1 - torch.arange(tie_idx.numel(), device=scores.device)
    selected = torch.cat([below_idx, tie_idx[from_end < (k - below)[tie_seg]]])  # <= k per sample
    # order the selection: sample asc, score asc, position desc (small: B * k values)
    sel_seg, sel_score = seg[selected], scores[selected]
    order = torch.argsort(sel_seg * (width * (n + 1)) + sel_score * (n + 1) + (n - selected))
    return selected[order], kept
