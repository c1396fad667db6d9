"""Small jagged-tensor helpers shared by retrieval and attention.

A jagged batch is passed explicitly as ``values`` (``[N, ...]``, the samples' elements laid end
to end) and ``offsets`` (``[B + 1]``, int64, ``offsets[b]:offsets[b + 1]`` is sample ``b``)::

    lengths  = [2, 0, 3]
    offsets  = [0, 2, 2, 5]
    values   = [a0 a1 | | c0 c1 c2]
    segment  = [0  0  |  | 2  2  2]      (segment_ids)

Histories are in chronological order inside a segment, so a larger position is more recent.
Every helper here is shape-dependent and therefore wrapped for ``torch.fx`` (TorchRec's
``TrainPipelineSparseDist`` traces the model): a traced graph calls them as leaf functions.
``torch.fx.wrap`` patches the name in this module's globals only, so callers write
``jagged.segment_ids(...)`` (module attribute), never ``from ... import segment_ids``.
"""

from typing import Tuple

import torch


@torch.fx.wrap
def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B + 1]`` int64 offsets starting at 0."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    torch.cumsum(lengths.long(), dim=0, out=offsets[1:])
    return offsets


@torch.fx.wrap
def segment_ids(offsets: torch.Tensor, num_values: int) -> torch.Tensor:
    """``[N]`` sample index of every value (``num_values = offsets[-1]``, passed to avoid a sync)."""
    lengths = offsets[1:] - offsets[:-1]
    batch = torch.arange(lengths.numel(), device=offsets.device)
    return torch.repeat_interleave(batch, lengths, output_size=num_values)


@torch.fx.wrap
def all_positions(offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every position, as a selection ``(indices [N], lengths [B])`` like ``last_n``'s."""
    lengths = offsets[1:] - offsets[:-1]
    return torch.arange(int(offsets[-1]), device=offsets.device), lengths


@torch.fx.wrap
def last_n(offsets: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``n`` most recent values of every segment.

    Returns ``(indices [M], lengths [B])``: ``indices`` index into ``values``, chronological within
    a segment; ``lengths = min(L_b, n)``. ``n = 0`` or ``L_b = 0`` select nothing.
    """
    lengths = offsets[1:] - offsets[:-1]
    kept = lengths.clamp(max=n)
    kept_offsets = lengths_to_offsets(kept)
    total = int(kept_offsets[-1])
    seg = segment_ids(kept_offsets, total)
    within = torch.arange(total, device=offsets.device) - kept_offsets[seg]
    indices = offsets[1:][seg] - kept[seg] + within
    return indices, kept


def last_positions(num_values: int, window: int, device: torch.device) -> torch.Tensor:
    """``[min(num_values, window)]`` the positions of the last ``window`` values of one
    ``num_values``-long history (serving's recent window, shared by every candidate)."""
    return tail_positions(num_values, torch.sym_min(num_values, window), device)


def tail_positions(num_values: int, count: int, device: torch.device) -> torch.Tensor:
    """``[count]`` the last ``count <= num_values`` positions of ``num_values``: ``arange(count)
    + (num_values - count)``, written so that symbolic sizes (an exported serving graph) get no
    guard, and ``count`` stays the size even where ``num_values`` depends on the data."""
    return torch.arange(count, device=device) + (num_values - count)


def copies_offsets(num_values: int, copies: int, device: torch.device) -> torch.Tensor:
    """``[copies + 1]`` offsets of ``copies`` back-to-back copies of one ``num_values``-long
    segment (how the torch-ops paths run one history shared by many candidates)."""
    return torch.arange(copies + 1, device=device) * num_values


def positions_in_copy(selection: Tuple[torch.Tensor, torch.Tensor],
                      num_values: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A selection ``(indices, lengths)`` over ``copies_offsets`` copies, as positions into the
    one segment."""
    indices, lengths = selection
    return indices % max(num_values, 1), lengths


@torch.fx.wrap
def segment_sum(values: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``[N, D]`` values summed per segment -> ``[num_segments, D]`` (empty segments give 0)."""
    out = values.new_zeros((num_segments,) + tuple(values.shape[1:]))
    return out.index_add(0, segments, values)


@torch.fx.wrap
def segment_log1p_sum_exp(scores: torch.Tensor, segments: torch.Tensor,
                          num_segments: int) -> torch.Tensor:
    """``log(1 + sum_j exp(scores_j))`` of ``[N, H]`` scores within each segment (per column) ->
    ``[num_segments, H]``: the log-sum-exp with one more score of 0 (a null behavior), so an
    empty segment gives 0, never -inf, and the value grows with both how many scores are high
    and how high they are (the attention mass a softmax divides away)."""
    shape = (num_segments,) + tuple(scores.shape[1:])
    index = segments.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    top = scores.new_zeros(shape).scatter_reduce(  # max(0, the segment's max): stable, finite
        0, index, scores, reduce="amax", include_self=True).detach()
    total = torch.exp(-top).index_add(0, segments, torch.exp(scores - top.gather(0, index)))
    return top + torch.log(total)


@torch.fx.wrap
def segment_softmax(scores: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``[N, H]`` scores within each segment (per column).

    Empty segments simply have no rows, so nothing is ever divided by zero and no NaN appears.
    """
    shape = (num_segments,) + tuple(scores.shape[1:])
    index = segments.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
    seg_max = scores.new_full(shape, float("-inf")).scatter_reduce(
        0, index, scores, reduce="amax", include_self=True
    )
    exp = torch.exp(scores - seg_max.gather(0, index).detach())
    denom = scores.new_zeros(shape).index_add(0, segments, exp)
    return exp / denom.gather(0, index)
