"""SDIM (Cao et al., CIKM 2022): long-term interest from hash collisions, no search, no attention.

Every behavior embedding ``x`` gets ``m`` SimHash bits ``sign(R x)`` (``R`` fixed, N(0, 1)); each
run of ``tau`` bits is one signature (an AND of ``tau`` bit matches), so there are ``m / tau``
signatures. For every signature, the behaviors whose signature equals the candidate's are summed
and the sum is l2-normalised; the long-term interest is the mean of these ``m / tau`` vectors.
A behavior thus contributes with a probability that falls with its angle to the candidate, which
approximates target attention without scoring it.

As in ETA (``modules/eta.py``), the hashed vector is the behavior embedding (its attributes with
a candidate key side by side, e.g. ``x = [e_item; e_category]``) and ``R`` is block-diagonal:
the signatures are split between the attributes, each block kept in a code table per attribute
table (``ItemDerivedTable``, exact: re-hashed for the rows each step touched). So the history's
hash codes are read by id, never computed from L embeddings, which is the paper's serving design
(the user's buckets computed once). Defaults ``m = 48, tau = 3``: 16 signatures, 8 per block for
item and category.

Cost in L. The O(L) part is integer work: read a code word per attribute and behavior, XOR with
the candidate's, compare ``m / tau`` groups of ``tau`` bits, and find the distinct behaviors (all
their ids) among those that collide at least once (for two attributes with as many signatures
each, on CPU one compiled pass per sample with a hash map; otherwise a sort). Only those distinct pairs are looked
up in the EmbeddingCollection, with their collision counts as weights: at most
``min(L, catalog)`` rows, in practice a fraction of them. The bucket sums are
``O(distinct x collisions x 2D)`` floats. No top-k and no attention. Every colliding behavior
gets a gradient (there is no retrieval to stop it).

The module also has a short-term DIN branch over the recent window, as SIM and TWIN do (ETA's is a
multi-head target attention), so the long-sequence models differ mainly in their long-term part.
"""

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec import EmbeddingConfig, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import DINAttention
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.modules.sequence import Looked, Selection, SequenceModule
from torchrec_longseq.modules.time import TimeIntervalEmbedding
from torchrec_longseq.retrieval import kernels
from torchrec_longseq.retrieval.simhash import SimHash
from torchrec_longseq.schema import SequenceSchema


def first_occurrences(key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(first [U], counts [U])``: the position of the first occurrence of each distinct value
    of ``key [N]`` (values ascending) and how many times it occurs."""
    unique, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    first = torch.full_like(unique, key.numel()).scatter_reduce(
        0, inverse, torch.arange(key.numel(), device=key.device), reduce="amin")
    return first, counts


def distinct_key(ids: List[torch.Tensor]) -> torch.Tensor:
    """``[N]`` one integer per distinct tuple ``(ids[0][j], ids[1][j], ...)``, ascending in the
    tuples' lexicographic order."""
    return torch.unique(torch.stack(ids, dim=1), dim=0, return_inverse=True)[1]


def signatures(codes: torch.Tensor, tau: int,
               groups_per_word: Union[int, Sequence[int]]) -> torch.Tensor:
    """``[N, W]`` int64 code words -> ``[N, G]`` signatures: bits ``tau g`` to ``tau g + tau - 1``
    of each word, word-major (``G = W * groups_per_word``, or their sum for a count per word),
    values in ``[0, 2^tau)``."""
    if not isinstance(groups_per_word, int):  # a group count per word (per attribute)
        return torch.cat([signatures(codes[:, w:w + 1], tau, g)
                          for w, g in enumerate(groups_per_word)], dim=1)
    shifts = torch.arange(groups_per_word, device=codes.device) * tau
    return ((codes.unsqueeze(-1) >> shifts) & ((1 << tau) - 1)).flatten(1)


@torch.fx.wrap
def collision_weights(
    codes: torch.Tensor,
    target_codes: torch.Tensor,
    offsets: torch.Tensor,
    ids: List[torch.Tensor],
    tau: int,
    groups_per_word: Union[int, Sequence[int]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which behaviors collide with the candidate in which signature, per distinct behavior.

    Args:
        codes (Tensor): ``[N, W]`` int64 hash codes of the jagged history (bits ``tau g`` to
            ``tau g + tau - 1`` of a word form its ``g``-th signature).
        target_codes (Tensor): ``[B, W]`` the candidates' codes.
        offsets (Tensor): ``[B + 1]`` history offsets.
        ids (List[Tensor]): ``[N]`` each the history's ids of one attribute; behaviors with
            equal ``(sample, ids...)`` are one behavior (equal codes, equal rows) and merged.
        tau (int): bits per signature.
        groups_per_word (Union[int, Sequence[int]]): signatures per code word (``G = W *
            groups_per_word`` in all), or a count per word.

    Returns:
        ``(positions [U], lengths [B], weights [U, G])``: one position per distinct
        ``(sample, item, category)`` that collides at least once (grouped by sample, ascending),
        how many per sample, and ``weights[u, g]`` = how many of the sample's behaviors are that
        pair if it collides in signature ``g``, else 0.
    """
    n, b = codes.size(0), offsets.numel() - 1
    seg = jagged.segment_ids(offsets, n)
    match = signatures(codes ^ target_codes[seg], tau, groups_per_word) == 0  # [N, G]
    first, counts = first_occurrences(distinct_key([seg, *ids]))
    weights = counts.unsqueeze(1).to(torch.float32) * match[first]  # [U, G]
    collides = match[first].any(dim=1)
    first, weights = first[collides], weights[collides]
    lengths = torch.bincount(seg[first], minlength=b)
    return first, lengths, weights


@torch.fx.wrap
def collisions_by_id(code_tables: List[torch.Tensor], ids: List[torch.Tensor],
                     target_ids: List[torch.Tensor], all_ids: List[torch.Tensor],
                     offsets: torch.Tensor, tau: int,
                     groups_per_word: Union[int, Sequence[int]], kernel: str = "auto",
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collision_weights`` with the codes read from the per-attribute code tables
    (``code_tables[a] [rows, 1]`` int64, ``ids[a] [N]`` and ``target_ids[a] [B]``); behaviors
    are merged by ``all_ids`` (every attribute of the behavior). With two hashed attributes that
    are the whole behavior, with as many signatures each, on CPU a compiled pass per sample with a hash map
    (``kernels.sdim_collisions``: O(L), distinct pairs in order of first occurrence); otherwise
    the torch ops above (a sort). The two differ only in the order of the distinct behaviors,
    which the bucket sums do not see (tested)."""
    if isinstance(groups_per_word, int) and len(code_tables) == 2 and len(all_ids) == 2:
        found = kernels.sdim_collisions(code_tables[0], ids[0], code_tables[1], ids[1],
                                        target_ids[0], target_ids[1], offsets, tau,
                                        groups_per_word, kernel)
        if found is not None:
            return found
    codes = torch.cat([t[i] for t, i in zip(code_tables, ids)], dim=1)  # [N, A]
    targets = torch.cat([t[i] for t, i in zip(code_tables, target_ids)], dim=1)  # [B, A]
    return collision_weights(codes, targets, offsets, all_ids, tau, groups_per_word)


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


class SDIM(SequenceModule):
    """SDIM as a sequence module: hash-collision interest + short-term DIN.

    Args:
        schema (SequenceSchema): the sequence's keys and tables; the attributes with a candidate
            key are hashed, ``num_bits / A`` bits each (A of them), each into its own code table.
        tables (Dict[str, EmbeddingConfig]): the EmbeddingCollection's configs by table name.
        attention_hidden (List[int]): hidden widths of the short-term DIN unit.
        time_embedding (TimeIntervalEmbedding): the short-term branch's time feature.
        num_bits (int): m, hash bits in all: a multiple of ``tau``, with ``m / tau`` signatures
            (at most 64, at least one per hashed attribute) and at most 64 bits per attribute.
        tau (int): bits per signature.
        short_window (int): recent behaviors of the short-term branch.
        refresh_every (int): 1 = exact code tables, N = re-hash all every N steps.

    Output: ``[B, 3 D]`` (candidate, long-term interest, short-term interest), no auxiliary
    logit; ``D`` is the behavior width.

    Example::

        sdim = SDIM(default_schema(), table_configs(ec), [64, 32], TimeIntervalEmbedding(8))
    """

    def __init__(self, schema: SequenceSchema, tables: Dict[str, EmbeddingConfig],
                 attention_hidden: List[int], time_embedding: TimeIntervalEmbedding,
                 num_bits: int = 48, tau: int = 3, short_window: int = 50,
                 refresh_every: int = 1) -> None:
        super().__init__()
        matched = schema.matched
        n = len(matched)
        num_groups = num_bits // tau if tau > 0 else 0
        # the G = m / tau signatures split over the hashed attributes, the first ones one more
        groups = [num_groups // n + (a < num_groups % n) for a in range(n)]
        if (tau <= 0 or num_bits <= 0 or num_bits % tau or not n <= num_groups <= 64
                or groups[0] * tau > 64):
            raise ValueError(f"SDIM needs tau >= 1 and num_bits a multiple of tau with "
                             f"num_bits / tau signatures in [{n}, 64] (at least one per hashed "
                             f"attribute, {n} here) and at most 64 bits per attribute; got "
                             f"num_bits={num_bits}, tau={tau}")
        self.schema = schema
        self.tau = tau
        self.kernel = "auto"  # retrieval.kernels.set_kernel
        # one count if every attribute has as many signatures (what the compiled pass reads)
        self.groups_per_word: Union[int, List[int]] = (
            groups[0] if len(set(groups)) == 1 else groups)
        self.codes = nn.ModuleList(
            ItemDerivedTable(tables[a.table].num_embeddings, 1, torch.int64,
                             SimHash(tables[a.table].embedding_dim, groups[i] * tau, seed=2 + i),
                             refresh_every, table=a.table)
            for i, a in enumerate(matched))
        dim = sum(tables[a.table].embedding_dim for a in schema.attributes)
        self.time_embedding = time_embedding
        self.short_term = DINAttention(dim, attention_hidden,
                                       time_embedding.embedding.embedding_dim)
        self.short_window = short_window
        self.output_dim = 3 * dim

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Selection:
        matched = self.schema.matched
        offsets = features[self.schema.history_keys[0]].offsets()
        positions, lengths, weights = collisions_by_id(
            [c.table for c in self.codes], [features[a.history_key].values() for a in matched],
            [features[a.candidate_key].values() for a in matched],
            [features[key].values() for key in self.schema.history_keys], offsets, self.tau,
            self.groups_per_word, self.kernel)
        return Selection((positions, lengths), self.window(features), extra=(weights,))

    def window(self, features: KeyedJaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return jagged.last_n(features[self.schema.history_keys[0]].offsets(), self.short_window)

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Selection:
        """The user's distinct behaviors (each looked up once, with how often it occurs), their
        signatures and the candidates'."""
        n, device = intervals.numel(), intervals.device
        matched = self.schema.matched
        first, counts = first_occurrences(  # [U] positions, occurrences
            distinct_key([history[k] for k in self.schema.history_keys]))
        behaviors = self._signatures([history[a.history_key][first] for a in matched])
        targets = self._signatures([candidates[a.candidate_key] for a in matched])
        recent = (jagged.last_positions(n, self.short_window, device), None)
        return Selection((first, None), recent, extra=(counts, behaviors, targets))

    def _signatures(self, ids: List[torch.Tensor]) -> torch.Tensor:
        """``[*, G]`` the signatures of behaviors with attribute ids ``ids``."""
        words = torch.cat([c(i) for c, i in zip(self.codes, ids)], dim=1)
        return signatures(words, self.tau, self.groups_per_word)

    def attend(self, looked: Looked, selection: Selection) -> torch.Tensor:
        """The long-term interest (per sample from the collision weights; for one user's
        request, ``long_offsets=None``, from its buckets summed once) and the short-term branch
        -> ``[B, 3 D]``."""
        if looked.long_offsets is None:
            counts, behaviors, targets = selection.extra
            rows = looked.long if looked.long_index is None else looked.long[looked.long_index]
            long_term = self.shared_interest(rows, counts, behaviors, targets)
        else:
            long_term = bucket_mean(looked.long, looked.long_offsets, selection.extra[0])
        short_term = self.short_term(looked.candidates, looked.short, looked.short_offsets,
                                     self.time_embedding(looked.short_intervals))
        return torch.cat([looked.candidates, long_term, short_term], dim=1)

    def shared_interest(self, behaviors: torch.Tensor, counts: torch.Tensor,
                        signatures_u: torch.Tensor, signatures_c: torch.Tensor) -> torch.Tensor:
        """The long-term interest of C candidates of one user (serving), the paper's way: the
        user's buckets are summed once, ``[G, 2^tau, D]`` (every distinct behavior into the
        bucket of each of its G signatures), and each candidate reads its G buckets; equal to
        ``bucket_mean`` per candidate. ``behaviors [U, D]`` are the user's distinct behaviors,
        occurring ``counts [U]`` times, with signatures ``signatures_u [U, G]``; the candidates'
        are ``signatures_c [C, G]`` -> ``[C, D]``."""
        buckets = 1 << self.tau
        num_groups = signatures_u.size(1)
        groups = torch.arange(num_groups, device=behaviors.device) * buckets
        slot = signatures_u + groups  # [U, G]
        weighted = counts.to(behaviors.dtype).unsqueeze(1) * behaviors  # [U, D]
        sums = behaviors.new_zeros(num_groups * buckets, behaviors.size(1)).index_add(
            0, slot.flatten(), weighted.repeat_interleave(num_groups, dim=0))
        return nn.functional.normalize(sums[signatures_c + groups], dim=-1).mean(dim=1)
