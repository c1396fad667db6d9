"""SIM hard search: behaviors whose id of the matched attribute (the category by default) equals
the target's, most recent first."""

from typing import Optional, Tuple

import torch

from torchrec_longseq import jagged
from torchrec_longseq.jagged import segment_ids
from torchrec_longseq.retrieval import kernels, topk


@torch.fx.wrap
def hard_search(
    history_ids: torch.Tensor,
    offsets: Optional[torch.Tensor],
    target_ids: torch.Tensor,
    k: int,
    kernel: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most recent behaviors whose id (of the matched attribute: the category by
    default, ``SequenceSchema.hard_search_key``) equals the target's (SIM's hard GSU).

    Args:
        history_ids (Tensor): ``[N]`` the matched attribute's id of every behavior,
            chronological per sample.
        offsets (Optional[Tensor]): ``[B + 1]`` history offsets, or ``None``: one history shared
            by all B candidates (serving).
        target_ids (Tensor): ``[B]`` the candidate's id of that attribute.
        k (int): at most this many per sample.
        kernel (str): which implementation runs (``retrieval.kernels.KERNELS``).

    Returns:
        ``(indices [M], lengths [B])``: positions into the history, chronological within a sample
        (so the last one is the most recent match). A sample with no matching behavior (or an
        empty history) gets length 0.

    On CPU a compiled kernel scans each sample from its most recent behavior backwards and stops
    at the ``k``-th match (``retrieval.kernels.hard_topk``); elsewhere (and with
    ``kernel="torch"``) one compare and one cumulative sum over the N behaviors:
    O(N), no sort, no padding. Both give identical results (tested).
    """
    topk.check_k(k)
    for name, t in (("history_ids", history_ids), ("target_ids", target_ids)):
        if t.is_floating_point() or t.dtype == torch.bool:  # 1.7 would match id 1
            raise ValueError(f"{name}: expected integer ids, got {t.dtype}")
    found = kernels.hard_topk(history_ids, offsets, target_ids, k, kernel)
    if found is not None:
        return found
    if offsets is None:  # the torch ops run the shared history as B copies
        n, b = history_ids.numel(), target_ids.numel()
        copies = jagged.copies_offsets(n, b, history_ids.device)
        return jagged.positions_in_copy(
            hard_search(history_ids.repeat(b), copies, target_ids, k, kernel), n)
    n = history_ids.numel()
    batch = target_ids.numel()
    seg = segment_ids(offsets, n)
    match = history_ids == target_ids[seg]
    count = torch.zeros(batch, dtype=torch.long, device=match.device).index_add(
        0, seg, match.long()
    )
    # matches at or after each position within its sample: 1 for the most recent match
    before = torch.cumsum(match.long(), 0) - match.long()
    start = torch.cat([before.new_zeros(1), torch.cumsum(count, 0)[:-1]])
    from_end = count[seg] - (before - start[seg])
    keep = match & (from_end <= k)
    return keep.nonzero().squeeze(1), count.clamp(max=k)
