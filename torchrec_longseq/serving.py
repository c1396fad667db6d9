"""Serving one request: one user, many candidates, the history searched once.

A request is one user with a history of L behaviors and C candidates (hundreds). Scoring it as C
independent samples (``request_batch``, the training layout) copies the history C times and
every O(L) step runs over C copies. ``score_request`` instead (``score_shared``):

1. searches the one history for all C candidates at once (``shared_search``): the compiled
   kernels read a single copy (``offsets=None``: every candidate's segment is the whole history),
   and per-user work (reading the history's signatures or search vectors, bucketing its time
   intervals) is done once, not C times;
2. looks up, once each, the candidates and the distinct history positions that any candidate
   retrieved or that are in the recent window (candidates of one category mostly retrieve the
   same behaviors; ``distinct_positions``), and the user's pooled features (``request_rows``,
   ``shared_pooled``): read straight from the tables of a plain (unsharded) EmbeddingCollection /
   EmbeddingBagCollection (``table_weights``; on CPU the item and category rows side by side in
   one copy, ``kernels.gather_rows``, else an ``index_select`` per feature), or, for any other
   lookup module (sharded, quantized), in one call of it on a KJT built straight from the
   request (``request_features``: every id once);
3. runs the model's own post-lookup code (``attend`` of the sequence module, ``head`` of the
   model) on those rows: the retrieved behaviors as the distinct rows plus each candidate's
   index into them (the ESU builds each distinct behavior's key once), the recent window passed
   once (``offsets=None``: DIN's per-behavior terms are computed once, not C times), so the
   logits equal scoring C independent samples (tested for every model, kernels on and off).

The pooled features are per user except the candidate's own: the user's (and avg-pool's
averaged history, carried by the first candidate only) are looked up once and broadcast.

This covers every model: DIN (last N), SIM hard and soft, ETA and TWIN (a bounded selection per
candidate), SDIM (the user's hash buckets summed once over its distinct behaviors, each candidate
reading its buckets), average pooling (the history averaged once) and the whole-history model
(every behavior looked up once; the attention of all candidates over it is two matrix
products). ``score_request`` scores a model with a sequence module it does not know through
``request_batch``.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.profiler import record_function
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import (
    CONTEXT_HOUR,
    FEATURE_KEYS,
    HIST_CATEGORY,
    HIST_ITEM,
    TARGET_CATEGORY,
    TARGET_ITEM,
    USER_ID,
    Batch,
)
from torchrec_longseq.data.synthetic import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.validation import integer_dtype
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.modules.din import DIN
from torchrec_longseq.modules.esu import SearchBasedInterest, WholeHistory
from torchrec_longseq.modules.lookup import (
    LOOKUP_KEYS,
    SHORT_CATEGORY,
    SHORT_ITEM,
    behavior_rows,
)
from torchrec_longseq.modules.sdim import SDIM, first_occurrences
from torchrec_longseq.modules.eta import SimHashSearch, signature_topk
from torchrec_longseq.modules.sim import (
    SEARCH_HIST,
    SEARCH_HIST_CATEGORY,
    SEARCH_TARGET,
    SEARCH_TARGET_CATEGORY,
    HardSearch,
    SoftSearch,
    search_features,
    search_vectors,
)
from torchrec_longseq.modules.twin import TwinSearch, twin_topk
from torchrec_longseq.retrieval import hard, kernels, topk

# the request features soft search reads: the candidates and the whole history
SEARCH_SOURCE_KEYS = [TARGET_ITEM, TARGET_CATEGORY, HIST_ITEM, HIST_CATEGORY]


@dataclass
class Request:
    """One user's request: the history once, and the candidates to score.

    ``history_* [L]`` oldest first (times strictly before ``request_time``), ``candidate_* [C]``.
    """

    user_id: int
    context_hour: int
    request_time: int
    history_item: torch.Tensor
    history_category: torch.Tensor
    history_time: torch.Tensor
    candidate_item: torch.Tensor
    candidate_category: torch.Tensor

    @property
    def num_candidates(self) -> int:
        return self.candidate_item.numel()


class RequestError(ValueError):
    """A request that does not follow ``Request``'s layout; the message names the field and the
    behavior or candidate."""


# the table (feature) whose ids each field of a request holds
REQUEST_FIELDS = {"user_id": USER_ID, "context_hour": CONTEXT_HOUR,
                  "history_item": HIST_ITEM, "history_category": HIST_CATEGORY,
                  "candidate_item": TARGET_ITEM, "candidate_category": TARGET_CATEGORY}
FIELD_OF_FEATURE = {feature: field for field, feature in REQUEST_FIELDS.items()}
CANDIDATE_KEYS = (TARGET_ITEM, TARGET_CATEGORY)  # one id per candidate; the rest are per user
USER_KEYS = (USER_ID, CONTEXT_HOUR)
# the profiler scopes of score_shared, in order (benchmarks/serving.py --breakdown)
STAGES = ("serving.search", "serving.lookup", "serving.attend", "serving.head")


def check_request(request: Request, rows: Dict[str, int]) -> None:
    """Raise ``RequestError`` naming the field and the behavior or candidate if ``request`` is
    malformed: history fields of one length L and candidate fields of one length C (1-D), ids in
    ``[0, rows)`` of their table (``rows``: ``model.table_rows``), history times non-decreasing
    and strictly before the request time. A few reductions over L: the compiled searches read
    the per-item tables by id without bounds checks, so ``score_request`` runs this first."""
    history = ("history_item", "history_category", "history_time")
    candidates = ("candidate_item", "candidate_category")
    for fields, what in ((history, "behaviors"), (candidates, "candidates")):
        counts = {f: getattr(request, f).numel() for f in fields}
        if len(set(counts.values())) > 1 or any(getattr(request, f).dim() != 1 for f in fields):
            raise RequestError(f"{what}: the fields {list(fields)} must be 1-D of one length, "
                               f"got shapes {[tuple(getattr(request, f).shape) for f in fields]}")
    for field in (*history, *candidates):
        if not integer_dtype(getattr(request, field)):
            raise RequestError(f"{field}: expected integers, got {getattr(request, field).dtype}")
    for field, feature in REQUEST_FIELDS.items():
        ids = getattr(request, field)
        if not isinstance(ids, torch.Tensor):  # the user and the context hour: one int each
            if not 0 <= ids < rows[feature]:
                raise RequestError(f"{field}: id {ids} outside the table of {rows[feature]} rows")
            continue
        if ids.numel() == 0:
            continue
        low, high = torch.aminmax(ids)
        if int(low) < 0 or int(high) >= rows[feature]:
            at = int(((ids < 0) | (ids >= rows[feature])).nonzero()[0, 0])
            where = "" if feature in USER_KEYS else \
                f", {'behavior' if field.startswith('history') else 'candidate'} {at}"
            raise RequestError(f"{field}{where}: id {int(ids[at])} outside the table of "
                               f"{rows[feature]} rows")
    times = request.history_time
    back = times[1:] < times[:-1]
    if back.any():
        at = int(back.nonzero()[0, 0]) + 1
        raise RequestError(f"history_time, behavior {at}: earlier than behavior {at - 1} (the "
                           f"history must be oldest first)")
    if times.numel() > 0 and int(times[-1]) >= request.request_time:  # in order: the last is latest
        at = int((times >= request.request_time).nonzero()[0, 0])
        raise RequestError(f"history_time, behavior {at}: time {int(times[at])} is not before "
                           f"the request time {request.request_time}")


def synthetic_request(data: SyntheticConfig, length: int, candidates: int,
                      seed: int = 0) -> Request:
    """A request of a generated user (the first of test batch ``seed``) with its oldest
    ``length`` behaviors at most (exactly ``length`` when ``data.min_seq_len >= length``) and
    ``candidates`` uniformly random items (for tests and benchmarks)."""
    batch = SyntheticGenerator(data).batch("test", seed, data.candidates_per_request)
    f = batch.features
    n = min(length, int(f[HIST_ITEM].lengths()[0]))
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, data.num_items, (candidates,), generator=g)
    return Request(
        user_id=int(f[USER_ID].values()[0]), context_hour=int(f[CONTEXT_HOUR].values()[0]),
        request_time=int(batch.request_time[0]),
        history_item=f[HIST_ITEM].values()[:n], history_category=f[HIST_CATEGORY].values()[:n],
        history_time=batch.history_time[:n], candidate_item=items,
        candidate_category=items // data.items_per_category)


def request_batch(request: Request) -> Batch:
    """The request as C independent samples in the training layout: every candidate with its
    own copy of the history."""
    c, n = request.num_candidates, request.history_item.numel()
    device = request.history_item.device
    ones = torch.ones(c, dtype=torch.long, device=device)
    lengths = torch.full((c,), n, dtype=torch.long, device=device)
    values = [torch.full((c,), request.user_id, device=device),
              torch.full((c,), request.context_hour, device=device),
              request.candidate_item, request.candidate_category,
              request.history_item.repeat(c), request.history_category.repeat(c)]
    features = KeyedJaggedTensor(
        keys=FEATURE_KEYS, values=torch.cat([v.long() for v in values]),
        lengths=torch.cat([ones, ones, ones, ones, lengths, lengths]).int())
    return Batch(features=features, history_time=request.history_time.repeat(c),
                 request_time=torch.full((c,), request.request_time, device=device),
                 labels=torch.zeros(c, device=device),
                 relevant=torch.zeros(c * n, dtype=torch.bool, device=device))


def request_features(request: Request, keys: List[str], positions: torch.Tensor
                     ) -> KeyedJaggedTensor:
    """The request's features ``keys`` as C samples in which every id appears once: what one
    lookup of the candidates, the user and the history ``positions [M]`` reads.

    Candidate keys (``target_*``) hold each candidate's id; the user, the context hour and the
    history positions (``hist_*``) are carried by the first candidate only, the other samples
    empty; ``short_*`` keys are empty. A module that pools (the EBC) gives the first candidate's
    row for everything per user (``shared_pooled``)."""
    c, device = request.num_candidates, request.history_item.device
    lengths = torch.zeros(len(keys), c, dtype=torch.int32, device=device)
    values = []
    for i, key in enumerate(keys):
        if key in (SHORT_ITEM, SHORT_CATEGORY):
            ids = positions[:0]
        elif key not in FIELD_OF_FEATURE:
            raise KeyError(f"a request has no feature {key!r}")
        else:
            value = getattr(request, FIELD_OF_FEATURE[key])
            if key in CANDIDATE_KEYS:
                ids = value
            elif key in USER_KEYS:
                ids = torch.full((1,), value, dtype=torch.long, device=device)
            else:  # history
                ids = value.index_select(0, positions)
        if key in CANDIDATE_KEYS:
            lengths[i] = 1
        elif c > 0:
            lengths[i, 0] = ids.numel()
        values.append(ids.long())
    counts = [v.numel() for v in values]  # known here: spares the KJT a sum and a sync
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=lengths.flatten(),
                             stride=c, length_per_key=counts,
                             offset_per_key=[sum(counts[:i]) for i in range(len(keys) + 1)])


def table_weights(collection: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """``feature -> [rows, D]``, the weight of the table each feature is looked up in, for a plain
    (unsharded) ``EmbeddingCollection``, or ``EmbeddingBagCollection`` without per-id weights
    and with sum or mean pooling (the pooled row of one id is its row); ``None`` for any other
    lookup module (sharded, quantized: serving calls it on ``request_features``).

    Reading the rows with ``index_select`` gives the same values as the module's forward (tested)
    without its KJT handling, about 60 small operations per call: a third of a request's."""
    if type(collection) is EmbeddingCollection:
        tables, configs = collection.embeddings, collection.embedding_configs()
    elif (type(collection) is EmbeddingBagCollection and not collection.is_weighted()
          and all(c.pooling in (PoolingType.SUM, PoolingType.MEAN)
                  for c in collection.embedding_bag_configs())):
        tables, configs = collection.embedding_bags, collection.embedding_bag_configs()
    else:
        return None
    return {feature: tables[c.name].weight for c in configs for feature in c.feature_names}


def request_rows(model: LongSeqCTR, request: Request,
                 positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(target [C, 2D], rows [U, 2D])``: the item and category rows of the candidates and of
    the history ``positions [U]``, from the tables (``table_weights``) or in one call of the
    EmbeddingCollection on ``request_features``."""
    weights = table_weights(model.embedding_collection)
    if weights is None:
        # LOOKUP_KEYS, in the order training's lookup sends them (a sharded module fixes it)
        embeddings = model.embedding_collection(request_features(request, LOOKUP_KEYS, positions))
        return (behavior_rows(embeddings, TARGET_ITEM, TARGET_CATEGORY),
                behavior_rows(embeddings, HIST_ITEM, HIST_CATEGORY))
    target_tables, history_tables = ([weights[TARGET_ITEM], weights[TARGET_CATEGORY]],
                                     [weights[HIST_ITEM], weights[HIST_CATEGORY]])
    target = kernels.gather_rows(target_tables, [request.candidate_item,
                                                 request.candidate_category], None)
    rows = kernels.gather_rows(history_tables, [request.history_item, request.history_category],
                               positions)
    if target is not None and rows is not None:  # one copy each (CPU, no autograd)
        return target, rows
    items = request.history_item.index_select(0, positions)
    categories = request.history_category.index_select(0, positions)
    return (torch.cat([weights[TARGET_ITEM].index_select(0, request.candidate_item),
                       weights[TARGET_CATEGORY].index_select(0, request.candidate_category)], 1),
            torch.cat([weights[HIST_ITEM].index_select(0, items),
                       weights[HIST_CATEGORY].index_select(0, categories)], 1))


@torch.no_grad()
def shared_search(search: torch.nn.Module, request: Request) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(positions [M], lengths [C])``: what ``search`` retrieves for each candidate, as positions
    into the one history: the searches' own functions with ``offsets=None`` (compiled kernels
    read one copy of the history; their torch-ops paths make copies)."""
    n, c = request.history_item.numel(), request.num_candidates
    if isinstance(search, HardSearch):
        return hard.hard_search(request.history_category, None, request.candidate_category,
                                search.k)
    if isinstance(search, SimHashSearch):
        return signature_topk(search.item_signatures.table, request.history_item,
                              request.candidate_item, search.category_signatures.table,
                              request.history_category, request.candidate_category, None,
                              search.k)
    if isinstance(search, TwinSearch):
        # the history's time biases are bucketed once for all candidates: [L, H]
        bias = search.time_bias(request.request_time - request.history_time)
        return twin_topk(search.item_rows.table, search.category_rows.table,
                         request.history_item, request.history_category, request.candidate_item,
                         request.candidate_category, None, bias, search.num_heads, search.k)
    if isinstance(search, SoftSearch):
        # the history's search vectors are looked up and projected once: [L, P]
        features = request_features(request, SEARCH_SOURCE_KEYS,
                                    torch.arange(n, device=request.history_item.device))
        embeddings = search.search_table(search_features(features, search.with_category))
        behaviors = search.w_b(search_vectors(embeddings, SEARCH_HIST, SEARCH_HIST_CATEGORY,
                                              search.with_category))  # [L, P]
        targets = search.w_a(search_vectors(embeddings, SEARCH_TARGET, SEARCH_TARGET_CATEGORY,
                                            search.with_category))  # [C, P]
        scores = (targets @ behaviors.t()).flatten()  # [C L]: row c scores the history for c
        return jagged.positions_in_copy(
            topk.jagged_topk(scores, jagged.copies_offsets(n, c, scores.device), search.k), n)
    raise TypeError(f"no shared search for {type(search).__name__}")


def shared_pooled(model: LongSeqCTR, request: Request, positions: torch.Tensor) -> torch.Tensor:
    """``[C, P]`` pooled features of the request, the history ``positions`` pooled if the model
    pools history (avg-pool): one EBC call on ``request_features`` (all of the batch's keys);
    each candidate's own columns, and the first candidate's for everything per user (user,
    context, avg-pool's history), broadcast. Features of one id each (no history) from a plain
    EBC are read from its tables (``table_weights``)."""
    c = request.num_candidates
    weights = table_weights(model.sparse_arch)
    if weights is not None and all(key in CANDIDATE_KEYS or key in USER_KEYS
                                   for key in model.pooled_keys):  # one id each: its row
        return torch.cat([
            weights[key].index_select(0, getattr(request, FIELD_OF_FEATURE[key]))
            if key in CANDIDATE_KEYS else
            weights[key][getattr(request, FIELD_OF_FEATURE[key])].unsqueeze(0).expand(c, -1)
            for key in model.pooled_keys], dim=1)
    # the training batch's keys in its order: a sharded EBC fixes the order of its input's keys
    # on the first call and reads every later KJT in that order
    pooled = model.sparse_arch(request_features(request, FEATURE_KEYS, positions))
    if not any(key in CANDIDATE_KEYS for key in model.pooled_keys):
        values = pooled.values() if pooled.keys() == model.pooled_keys else model.pooled_of(pooled)
        return values[:1].expand(c, -1)  # all per user
    return torch.cat([pooled[key] if key in CANDIDATE_KEYS
                      else pooled[key][:1].expand(c, -1) for key in model.pooled_keys], dim=1)


def shared_selection(model: LongSeqCTR, request: Request) -> Optional[
        Tuple[int, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]:
    """What the sequence module reads of the one history, or ``None`` for a module this file does
    not know: ``(window, indices [M], lengths [C], counts [M])``, the recent window's length and
    the long-term positions read: retrieved per candidate (``lengths``; ``None``: every
    candidate reads all ``M``), or, for SDIM, the user's distinct behaviors occurring
    ``counts`` times."""
    arch = model.sequence_arch
    n, device = request.history_item.numel(), request.history_item.device
    if isinstance(arch, DIN):
        return min(n, arch.last_n), torch.zeros(0, dtype=torch.long, device=device), None, None
    if isinstance(arch, SearchBasedInterest) and isinstance(arch.search, WholeHistory):
        return min(n, arch.short_window), torch.arange(n, device=device), None, None
    if isinstance(arch, SearchBasedInterest) and isinstance(
            arch.search, (HardSearch, SimHashSearch, TwinSearch, SoftSearch)):
        return (min(n, arch.short_window), *shared_search(arch.search, request), None)
    if isinstance(arch, SDIM):
        # the user's distinct (item, category) behaviors, each looked up once
        indices, counts = first_occurrences(  # [U] positions
            request.history_item * arch.category_codes.table.size(0) + request.history_category)
        return min(n, arch.short_window), indices, None, counts
    return None


def distinct_positions(indices: torch.Tensor, n: int,
                       window: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(used [U], inverse [M])``: the positions of the history (``n`` behaviors) that the
    search's ``indices [M]`` or the recent ``window`` read, ascending (each looked up once), and
    each index's row among them: ``used[inverse] == indices``, and the window is ``used``'s last
    ``window`` rows (compiled on CPU, ``kernels.distinct_positions``)."""
    found = kernels.distinct_positions(indices, n, window)
    if found is not None:
        return found
    seen = torch.zeros(n, dtype=torch.bool, device=indices.device).index_fill_(0, indices, True)
    seen[n - window:] = True
    return seen.nonzero().squeeze(1), (torch.cumsum(seen, 0) - 1).index_select(0, indices)


@torch.no_grad()
def score_shared(model: LongSeqCTR, request: Request) -> Optional[torch.Tensor]:
    """``[C]`` logits with the history read once, or ``None`` for a sequence module this function
    does not know.

    The history is searched once for all candidates (``shared_selection``); the distinct
    positions any candidate reads, plus the recent window, are looked up once, together with the
    candidates (``request_rows``); each candidate reads its retrieved rows from
    those by index (SDIM: the user's buckets are summed), windows every candidate shares are
    passed once (``offsets=None``), and the model's own ``attend`` and ``head`` finish the job.
    Nothing of size C x L is looked up or gathered. The four stages are the profiler scopes
    ``STAGES``, which ``benchmarks/serving.py --breakdown`` reports.
    """
    arch = model.sequence_arch
    n, c = request.history_item.numel(), request.num_candidates
    device = request.history_item.device
    if c == 0:
        return torch.zeros(0, device=device)
    if arch is None:  # avg-pool: the history is a pooled feature, averaged once
        with record_function(STAGES[3]):
            return model.head(shared_pooled(model, request, torch.arange(n, device=device)), None)
    with record_function(STAGES[0]):
        selection = shared_selection(model, request)
        if selection is None:
            return None
        window, indices, lengths, counts = selection
        used, long_rows = distinct_positions(indices, n, window)
    with record_function(STAGES[1]):  # the candidates, and the used positions once
        target, rows = request_rows(model, request, used)  # [C, 2D], [U, 2D]
        intervals = request.request_time - request.history_time.index_select(0, used)  # [U]
        # the window, shared (offsets None): the last rows, as the used positions ascend
        short, short_intervals = rows[rows.size(0) - window:], intervals[rows.size(0) - window:]
    with record_function(STAGES[2]):
        if isinstance(arch, DIN):
            sequence = arch.attend(target, short, None, short_intervals)
        elif counts is not None:  # SDIM
            long_term = arch.shared_interest(rows.index_select(0, long_rows),
                                             request.history_item.index_select(0, indices),
                                             request.history_category.index_select(0, indices),
                                             counts, request.candidate_item,
                                             request.candidate_category)
            sequence = arch.attend(target, long_term, short, None, short_intervals)
        else:  # each used behavior's key is built once (retrieved_index)
            offsets = None if lengths is None else jagged.lengths_to_offsets(lengths)
            sequence = arch.attend(target, rows, offsets, intervals, short, None,
                                   short_intervals, retrieved_index=long_rows)
    with record_function(STAGES[3]):  # with the pooled features
        return model.head(shared_pooled(model, request, used[:0]), sequence)


@torch.no_grad()
def score_request(model: LongSeqCTR, request: Request) -> torch.Tensor:
    """``[C]`` logits of the request's candidates, the history read once (``score_shared``, see
    the module docstring), or as C independent samples for a sequence module ``score_shared``
    does not know; equal to ``model`` on ``request_batch(request)``. The request is checked first
    (``check_request``: ``RequestError`` naming the field and the behavior or candidate)."""
    check_request(request, model.table_rows)
    logits = score_shared(model, request)
    if logits is None:
        batch = request_batch(request)
        logits, _ = model(batch.features, batch.history_time, batch.request_time)
    return logits
