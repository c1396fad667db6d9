"""SDIM (Cao et al., CIKM 2022): long-term interest from hash collisions, no search, no attention.

Every behavior embedding ``x`` gets ``m`` SimHash bits ``sign(R x)`` (``R`` fixed, N(0, 1)); each
run of ``tau`` bits is one signature (an AND of ``tau`` bit matches), so there are ``m / tau``
signatures. For every signature, the behaviors whose signature equals the candidate's are summed
and the sum is l2-normalised; the long-term interest is the mean of these ``m / tau`` vectors.
A behavior thus contributes with a probability that falls with its angle to the candidate, which
approximates target attention without scoring it.

As in ETA (``modules/eta.py``), the hashed vector is the behavior embedding ``x = [e_item;
e_category]`` and ``R`` is block-diagonal: ``m / 2`` bits from the item embedding and ``m / 2``
from the category embedding, each block kept in a per-item / per-category code table
(``ItemDerivedTable``, exact: re-hashed for the rows each step touched). So the history's hash
codes are read by id, never computed from L embeddings, which is the paper's serving design (the
user's buckets computed once). Defaults ``m = 48, tau = 3``: 16 signatures, 8 per block.

Cost in L. The O(L) part is integer work: read two code words per behavior, XOR with the
candidate's, compare ``m / tau`` groups of ``tau`` bits, and find the distinct (item, category)
pairs among the behaviors that collide at least once (on CPU one compiled pass per sample with
a hash map; elsewhere a sort). Only those distinct pairs are looked
up in the EmbeddingCollection, with their collision counts as weights: at most
``min(L, catalog)`` rows, in practice a fraction of them. The bucket sums are
``O(distinct x collisions x 2D)`` floats. No top-k and no attention. Every colliding behavior
gets a gradient (there is no retrieval to stop it).

The module also has a short-term DIN branch over the recent window, as SIM and TWIN do (ETA's is a
multi-head target attention), so the long-sequence models differ mainly in their long-term part.
"""

from typing import List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.modules import derived
from torchrec_longseq.modules.attention import DINAttention
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.modules.esu import looked_up_ids
from torchrec_longseq.modules.lookup import lookup_behaviors
from torchrec_longseq.modules.time import TimeIntervalEmbedding, intervals_of
from torchrec_longseq.retrieval import kernels
from torchrec_longseq.retrieval.simhash import SimHash


def first_occurrences(key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(first [U], counts [U])``: the position of the first occurrence of each distinct value
    of ``key [N]`` (values ascending) and how many times it occurs."""
    unique, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    first = torch.full_like(unique, key.numel()).scatter_reduce(
        0, inverse, torch.arange(key.numel(), device=key.device), reduce="amin")
    return first, counts


def signatures(codes: torch.Tensor, tau: int, groups_per_word: int) -> torch.Tensor:
    """``[N, W]`` int64 code words -> ``[N, G]`` signatures: bits ``tau g`` to ``tau g + tau - 1``
    of each word, word-major (``G = W * groups_per_word``), values in ``[0, 2^tau)``."""
    shifts = torch.arange(groups_per_word, device=codes.device) * tau
    return ((codes.unsqueeze(-1) >> shifts) & ((1 << tau) - 1)).flatten(1)


@torch.fx.wrap
def collision_weights(
    codes: torch.Tensor,
    target_codes: torch.Tensor,
    offsets: torch.Tensor,
    items: torch.Tensor,
    categories: torch.Tensor,
    num_categories: int,
    tau: int,
    groups_per_word: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which behaviors collide with the candidate in which signature, per distinct behavior.

    Args:
        codes (Tensor): ``[N, W]`` int64 hash codes of the jagged history (bits ``tau g`` to
            ``tau g + tau - 1`` of a word form its ``g``-th signature).
        target_codes (Tensor): ``[B, W]`` the candidates' codes.
        offsets (Tensor): ``[B + 1]`` history offsets.
        items, categories (Tensor): ``[N]`` the history's ids; behaviors with equal
            ``(sample, item, category)`` have equal codes and are merged.
        num_categories (int): category ids are below it.
        tau (int): bits per signature.
        groups_per_word (int): signatures per code word (``G = W * groups_per_word`` in all).

    Returns:
        ``(positions [U], lengths [B], weights [U, G])``: one position per distinct
        ``(sample, item, category)`` that collides at least once (grouped by sample, ascending),
        how many per sample, and ``weights[u, g]`` = how many of the sample's behaviors are that
        pair if it collides in signature ``g``, else 0.
    """
    n, b = codes.size(0), offsets.numel() - 1
    seg = jagged.segment_ids(offsets, n)
    match = signatures(codes ^ target_codes[seg], tau, groups_per_word) == 0  # [N, G]
    key = seg * (int(items.max()) + 1 if n else 1) + items
    first, counts = first_occurrences(key * num_categories + categories)
    weights = counts.unsqueeze(1).to(torch.float32) * match[first]  # [U, G]
    collides = match[first].any(dim=1)
    first, weights = first[collides], weights[collides]
    lengths = torch.bincount(seg[first], minlength=b)
    return first, lengths, weights


@torch.fx.wrap
def collisions_by_id(
    item_codes: torch.Tensor, items: torch.Tensor, category_codes: torch.Tensor,
    categories: torch.Tensor, target_items: torch.Tensor, target_categories: torch.Tensor,
    offsets: torch.Tensor, tau: int, groups_per_word: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collision_weights`` with the codes read from the per-item / per-category code tables
    (``[rows, 1]`` int64). On CPU a compiled pass per sample with a hash map
    (``kernels.sdim_collisions``: O(L), distinct pairs in order of first occurrence); elsewhere
    the torch ops above (a sort). The two differ only in the order of the distinct pairs, which
    the bucket sums do not see (tested)."""
    found = kernels.sdim_collisions(item_codes, items, category_codes, categories, target_items,
                                    target_categories, offsets, tau, groups_per_word)
    if found is not None:
        return found
    codes = torch.cat([item_codes[items], category_codes[categories]], dim=1)  # [N, 2]
    targets = torch.cat([item_codes[target_items], category_codes[target_categories]], dim=1)
    return collision_weights(codes, targets, offsets, items, categories,
                             category_codes.size(0), tau, groups_per_word)


@torch.fx.wrap
def bucket_mean(behaviors: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """SDIM's aggregation: per signature the weighted sum of the colliding behaviors, l2-normalised,
    averaged over the ``G`` signatures.

    ``behaviors [U, D]`` (distinct colliding behaviors, ``offsets [B + 1]``), ``weights [U, G]``
    -> ``[B, D]``. A signature with no collision contributes a zero vector (never NaN).
    """
    b, num_groups = offsets.numel() - 1, weights.size(1)
    seg = jagged.segment_ids(offsets, behaviors.size(0))
    u, g = weights.nonzero(as_tuple=True)
    sums = jagged.segment_sum(weights[u, g].unsqueeze(1) * behaviors[u], seg[u] * num_groups + g,
                              b * num_groups).view(b, num_groups, behaviors.size(1))  # [B, G, D]
    return nn.functional.normalize(sums, dim=-1).mean(dim=1)


class SDIM(nn.Module):
    """SDIM as a sequence module of ``LongSeqCTR``: hash-collision interest + short-term DIN.

    Args:
        table_sizes (Tuple[int, int]): rows of the item and of the category table.
        embedding_dim (int): D, width of both tables (a behavior is ``2 D`` wide).
        attention_hidden (List[int]): hidden widths of the short-term DIN unit.
        time_embedding (TimeIntervalEmbedding): the short-term branch's time feature.
        num_bits (int): m, hash bits in all (``m / 2`` per table); ``m / 2`` must be a multiple
            of ``tau`` and at most 64, and ``m / tau`` at most 64.
        tau (int): bits per signature.
        short_window (int): recent behaviors of the short-term branch.
        refresh_every (int): 1 = exact code tables, N = re-hash all every N steps.

    Output: ``[B, 6 D]`` (candidate, long-term interest, short-term interest), no auxiliary logit.

    Example::

        sdim = SDIM((2000, 100), 16, [64, 32], TimeIntervalEmbedding(8))
        out, _ = sdim(features, history_time, request_time, embedding_collection)
    """

    def __init__(self, table_sizes: Tuple[int, int], embedding_dim: int,
                 attention_hidden: List[int], time_embedding: TimeIntervalEmbedding,
                 num_bits: int = 48, tau: int = 3, short_window: int = 50,
                 refresh_every: int = 1) -> None:
        super().__init__()
        block = num_bits // 2
        if tau <= 0 or num_bits % 2 or block % tau or not 0 < block <= 64 or block // tau > 32:
            raise ValueError(f"SDIM needs tau >= 1, num_bits / 2 in [1, 64], a multiple of tau, "
                             f"and at most 64 signatures; got num_bits={num_bits}, tau={tau}")
        self.tau, self.groups_per_word = tau, block // tau
        self.item_codes = ItemDerivedTable(table_sizes[0], 1, torch.int64,
                                           SimHash(embedding_dim, block, seed=2),
                                           refresh_every, key=TARGET_ITEM)
        self.category_codes = ItemDerivedTable(table_sizes[1], 1, torch.int64,
                                               SimHash(embedding_dim, block, seed=3),
                                               refresh_every, key=TARGET_CATEGORY)
        self.time_embedding = time_embedding
        self.short_term = DINAttention(2 * embedding_dim, attention_hidden,
                                       time_embedding.embedding.embedding_dim)
        self.short_window = short_window
        self.output_dim = 6 * embedding_dim

    def forward(
        self,
        features: KeyedJaggedTensor,
        history_time: torch.Tensor,
        request_time: torch.Tensor,
        lookup: EmbeddingCollection,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hist_item, hist_category = features[HIST_ITEM], features[HIST_CATEGORY]
        offsets = hist_item.offsets()
        positions, lengths, weights = collisions_by_id(
            self.item_codes.table, hist_item.values(), self.category_codes.table,
            hist_category.values(), features[TARGET_ITEM].values(),
            features[TARGET_CATEGORY].values(), offsets, self.tau, self.groups_per_word)
        recent = jagged.last_n(offsets, self.short_window)
        target, colliding, colliding_offsets, short, short_offsets = lookup_behaviors(
            lookup, features, (positions, lengths), recent)
        for table in (self.item_codes, self.category_codes):  # re-hashed after the step
            derived.remember_items(table, looked_up_ids(features, table.key, positions, recent[0]))
        long_term = bucket_mean(colliding, colliding_offsets, weights)
        short_intervals = intervals_of(history_time, request_time, offsets, recent[0])
        return self.attend(target, long_term, short, short_offsets, short_intervals), None

    def attend(self, target: torch.Tensor, long_term: torch.Tensor, short: torch.Tensor,
               short_offsets: Optional[torch.Tensor], short_intervals: torch.Tensor) -> torch.Tensor:
        """The short-term branch and the output: ``target [B, 2 D]``, ``long_term [B, 2 D]``,
        the recent ``short [S, 2 D]`` with ``short_offsets [B + 1]`` (``None``: one user's window,
        every candidate's) and ``short_intervals [S]`` -> ``[B, 6 D]``."""
        short_term = self.short_term(target, short, short_offsets,
                                     self.time_embedding(short_intervals))
        return torch.cat([target, long_term, short_term], dim=1)

    def shared_interest(self, behaviors: torch.Tensor, items: torch.Tensor,
                        categories: torch.Tensor, counts: torch.Tensor,
                        target_items: torch.Tensor, target_categories: torch.Tensor) -> torch.Tensor:
        """The long-term interest of C candidates of one user (serving), the paper's way: the
        user's buckets are summed once, ``[G, 2^tau, 2 D]`` (every distinct behavior into the
        bucket of each of its G signatures), and each candidate reads its G buckets; equal to
        ``bucket_mean`` per candidate. ``behaviors [U, 2 D]`` are the user's distinct (item,
        category) pairs ``items, categories [U]``, occurring ``counts [U]`` times ->
        ``[C, 2 D]``."""
        def codes(item_ids: torch.Tensor, category_ids: torch.Tensor) -> torch.Tensor:
            words = torch.cat([self.item_codes(item_ids), self.category_codes(category_ids)], 1)
            return signatures(words, self.tau, self.groups_per_word)  # [*, G]

        buckets = 1 << self.tau
        sig = codes(items, categories)  # [U, G]
        num_groups = sig.size(1)
        slot = sig + torch.arange(num_groups, device=sig.device) * buckets  # [U, G]
        weighted = counts.to(behaviors.dtype).unsqueeze(1) * behaviors  # [U, 2 D]
        sums = behaviors.new_zeros(num_groups * buckets, behaviors.size(1)).index_add(
            0, slot.flatten(), weighted.repeat_interleave(num_groups, dim=0))
        picked = codes(target_items, target_categories) + torch.arange(
            num_groups, device=sig.device) * buckets  # [C, G]
        return nn.functional.normalize(sums[picked], dim=-1).mean(dim=1)
