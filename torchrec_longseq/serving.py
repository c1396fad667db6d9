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

Every step goes through the sequence-module protocol (``modules.sequence``): a module's
``search_request`` says what it reads of the one history, its ``attend`` finishes; nothing here
knows the module types, so a module a user writes against the protocol is served the same way.
This covers every model: DIN (last N), SIM hard and soft, ETA and TWIN (a bounded selection per
candidate), SDIM (the user's hash buckets summed once over its distinct behaviors, each candidate
reading its buckets), average pooling (the history averaged once), the whole-history model (every
behavior looked up once; the attention of all candidates over it is two matrix products), and
several sequences in one model (their rows looked up in one call).

A request names features by the model's own keys (``Request``): per-user features, each
sequence's history keys (and time key), the candidates' keys.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.profiler import record_function
from torchrec import EmbeddingBagCollection, EmbeddingCollection, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import Batch
from torchrec_longseq.data.synthetic import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.validation import MAX_TIME
from torchrec_longseq.models.longseq_ctr import LongSeqCTR
from torchrec_longseq.modules.sequence import Looked, SequenceModule, request_kjt
from torchrec_longseq.retrieval import kernels
from torchrec_longseq.schema import SequenceSchema, default_schema

if TYPE_CHECKING:
    from torchrec_longseq.export import ExportedModel


@dataclass
class Request:
    """One user's request: per-user features and histories once, and the candidates to score.

    Args:
        user (Dict[str, Tensor]): per-user pooled features, key -> ``[n]`` ids (the user id, the
            context), as the EmbeddingBagCollection reads them for one sample.
        history (Dict[str, Tensor]): every history key (and ``time_key``) of every sequence ->
            ``[L_s]``, oldest first (times strictly before ``request_time``).
        candidates (Dict[str, Tensor]): every candidate key -> ``[C]`` ids.
        request_time (int): the request's timestamp.
        history_time (Optional[Tensor]): ``[L]`` timestamps of the sequence whose schema reads
            the dense ``history_time`` (``time_key=None``).
    """

    user: Dict[str, torch.Tensor]
    history: Dict[str, torch.Tensor]
    candidates: Dict[str, torch.Tensor]
    request_time: int
    history_time: Optional[torch.Tensor] = None

    @property
    def num_candidates(self) -> int:
        return next(iter(self.candidates.values())).numel() if self.candidates else 0

    def times(self, schema: SequenceSchema) -> torch.Tensor:
        """``[L]`` the timestamps of ``schema``'s behaviors."""
        if schema.time_key is not None:
            return self.history[schema.time_key]
        if self.history_time is None:
            raise RequestError("history_time: missing (a sequence reads the dense history_time)")
        return self.history_time


class RequestError(ValueError):
    """A request that does not follow ``Request``'s layout; the message names the feature and the
    behavior or candidate."""


# the profiler scopes of score_shared, in order (benchmarks/serving.py --breakdown)
STAGES = ("serving.search", "serving.lookup", "serving.attend", "serving.head")


def sequences(model: LongSeqCTR) -> Dict[str, SequenceModule]:
    return dict(model.sequence_arch.sequences.items()) if model.sequence_arch is not None else {}


def _field(name: str, key: str) -> str:
    return f"{name}[{key!r}]"


# ids and timestamps of a request: signed integers (and uint8), widened to int64 for scoring
REQUEST_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_ids(field: str, ids) -> None:
    if not isinstance(ids, torch.Tensor):
        raise RequestError(f"{field}: expected a 1-D integer tensor, got {type(ids).__name__}")
    if ids.dim() != 1 or ids.dtype not in REQUEST_DTYPES:
        raise RequestError(f"{field}: expected a 1-D integer tensor, got {ids.dtype} of shape "
                           f"{tuple(ids.shape)} (ids and times: int8, int16, int32, int64 or "
                           f"uint8)")


@dataclass
class ServingSpec:
    """What a request must hold for a model: its pooled keys, each sequence's schema and the rows
    of the table of each key; all ``check_request`` reads, kept in an exported artefact so that
    requests are checked without the model (``export``).

    Args:
        pooled_keys (List[str]): the keys the model's EmbeddingBagCollection reads.
        schemas (Dict[str, SequenceSchema]): each sequence module's schema, by module name.
        table_rows (Dict[str, int]): key -> rows of its table.
    """

    pooled_keys: List[str]
    schemas: Dict[str, SequenceSchema]
    table_rows: Dict[str, int]

    @staticmethod
    def of(model: LongSeqCTR) -> "ServingSpec":
        return ServingSpec(list(model.pooled_keys),
                           {name: module.schema for name, module in sequences(model).items()},
                           dict(model.table_rows))


def check_request(request: Request, model: Union[LongSeqCTR, ServingSpec]) -> None:
    """Raise ``RequestError`` naming the feature and the behavior or candidate if ``request`` is
    malformed for ``model`` (or its ``ServingSpec``): every key the model reads present; ids 1-D
    integers in ``[0, rows)`` of their table (``table_rows``); the history keys of one sequence
    of one length L and the candidate keys of one length C; history times non-decreasing and
    strictly before the request time. A few reductions over L: the compiled searches read the
    per-item tables by id without bounds checks, so ``score_request`` runs this first."""
    spec = model if isinstance(model, ServingSpec) else ServingSpec.of(model)
    if isinstance(request.request_time, bool) or not isinstance(request.request_time, int):
        raise RequestError(f"request_time: expected an int, got {request.request_time!r}")
    if not 0 <= request.request_time < MAX_TIME:
        raise RequestError(f"request_time: {request.request_time} outside [0, 2^62)")
    groups = {"user": request.user, "history": request.history,
              "candidates": request.candidates}
    for name, values in groups.items():
        for key, ids in values.items():
            _check_ids(_field(name, key), ids)
        for other, others in groups.items():
            twice = sorted(set(values) & set(others)) if other > name else []
            if twice:
                raise RequestError(f"{_field(name, twice[0])}: also given in {other!r}; a key "
                                   f"belongs to one group")
    if request.history_time is not None:
        _check_ids("history_time", request.history_time)
    counts = {key: ids.numel() for key, ids in request.candidates.items()}
    if len(set(counts.values())) > 1:
        raise RequestError(f"candidates: every candidate key needs one id per candidate, got "
                           f"{counts}")
    for key in spec.pooled_keys:
        if not any(key in values for values in groups.values()):
            raise RequestError(f"feature {key!r} (pooled): missing from the request")
    for name, schema in spec.schemas.items():
        for key in schema.candidate_keys:
            if key not in request.candidates:
                raise RequestError(f"{_field('candidates', key)}: missing (sequence {name!r})")
        missing = [k for k in schema.history_keys + ([schema.time_key] if schema.time_key else [])
                   if k not in request.history]
        if missing:
            raise RequestError(f"{_field('history', missing[0])}: missing (sequence {name!r})")
        times = request.times(schema)
        lengths = {key: request.history[key].numel() for key in schema.history_keys}
        lengths["time"] = times.numel()
        if len(set(lengths.values())) > 1:
            raise RequestError(f"sequence {name!r}: its history keys and times need one value per "
                               f"behavior, got lengths {lengths}")
        back = times[1:] < times[:-1]
        if back.any():
            at = int(back.nonzero()[0, 0]) + 1
            raise RequestError(f"history time of {name!r}, behavior {at}: earlier than behavior "
                               f"{at - 1} (the history must be oldest first)")
        if times.numel() and int(times[0]) < 0:  # in order: the first is the earliest
            raise RequestError(f"history time of {name!r}, behavior 0: {int(times[0])} "
                               f"outside [0, 2^62)")
        if times.numel() > 0 and int(times[-1]) >= request.request_time:
            at = int((times >= request.request_time).nonzero()[0, 0])
            raise RequestError(f"history time of {name!r}, behavior {at}: time {int(times[at])} "
                               f"is not before the request time {request.request_time}")
    for name, values in groups.items():
        for key, ids in values.items():
            rows = spec.table_rows.get(key)
            if rows is None or ids.numel() == 0:
                continue
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= rows:
                at = int(((ids < 0) | (ids >= rows)).nonzero()[0, 0])
                where = {"user": "value", "history": "behavior", "candidates": "candidate"}[name]
                raise RequestError(f"{_field(name, key)}, {where} {at}: id {int(ids[at])} outside "
                                   f"the table of {rows} rows")


def synthetic_request(data: SyntheticConfig, length: int, candidates: int,
                      seed: int = 0) -> Request:
    """A request of a generated user (the first of test batch ``seed``) in the synthetic schema,
    with its oldest ``length`` behaviors at most (exactly ``length`` when ``data.min_seq_len >=
    length``) and ``candidates`` uniformly random items (for tests and benchmarks)."""
    batch = SyntheticGenerator(data).batch("test", seed, data.candidates_per_request)
    f = batch.features
    schema = default_schema()
    item, category = schema.attributes
    n = min(length, int(f[item.history_key].lengths()[0]))
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, data.num_items, (candidates,), generator=g)
    return Request(
        user={key: f[key].values()[:1] for key in ("user_id", "context_hour")},
        history={key: f[key].values()[:n] for key in schema.history_keys},
        candidates={item.candidate_key: items,
                    category.candidate_key: items // data.items_per_category},
        request_time=int(batch.request_time[0]), history_time=batch.history_time[:n])


def request_from_batch(batch: Batch, model: Union[LongSeqCTR, ServingSpec], sample: int = 0,
                       candidates: int = 1) -> Request:
    """Sample ``sample`` of a training batch as a request: its user features and histories, and
    the candidates of samples ``sample`` to ``sample + candidates - 1`` (e.g. an example request
    for ``export``). A key is a candidate key if a schema names it so, a history key if a schema
    reads it as a history or time key, and per user otherwise (a per-candidate feature outside
    the schemas needs a hand-made ``Request``)."""
    spec = model if isinstance(model, ServingSpec) else ServingSpec.of(model)
    if sample < 0 or candidates < 1 or sample + candidates > batch.request_time.numel():
        raise ValueError(f"samples {sample} to {sample + candidates - 1} of a batch of "
                         f"{batch.request_time.numel()}")
    features = batch.features.to_dict()
    candidate_keys = {k for s in spec.schemas.values() for k in s.candidate_keys}
    history_keys = {k for s in spec.schemas.values() for k in s.keys()} - candidate_keys

    def of(key: str, i: int) -> torch.Tensor:
        jt = features[key]
        start = int(jt.offsets()[i])
        return jt.values()[start:start + int(jt.lengths()[i])]

    groups: Dict[str, Dict[str, torch.Tensor]] = {"user": {}, "history": {}, "candidates": {}}
    for key in features:
        if key in candidate_keys:
            groups["candidates"][key] = torch.cat([of(key, i) for i in range(
                sample, sample + candidates)])
        else:
            groups["history" if key in history_keys else "user"][key] = of(key, sample)
    dense = None
    if any(s.time_key is None for s in spec.schemas.values()):
        offsets = features[next(s for s in spec.schemas.values()
                                if s.time_key is None).history_keys[0]].offsets()
        dense = batch.history_time[int(offsets[sample]):int(offsets[sample + 1])]
    return Request(groups["user"], groups["history"], groups["candidates"],
                   int(batch.request_time[sample]), dense)


def model_keys(model: LongSeqCTR) -> List[str]:
    """The keys of the model's input KJT: the order of its first training batch if it has seen
    one (a sharded module reads every later KJT in that order), else every key it reads."""
    if model.feature_keys is not None:
        return model.feature_keys
    keys = list(model.pooled_keys)
    for module in sequences(model).values():
        keys += [k for k in module.schema.keys() if k not in keys]
    return keys


def request_batch(request: Request, model: LongSeqCTR) -> Batch:
    """The request as C independent samples in the training layout: every candidate with its
    own copy of the user's features and histories."""
    c = request.num_candidates
    device = next(iter(request.candidates.values())).device
    values, lengths = [], []
    for key in model_keys(model):
        if key in request.candidates:
            values.append(request.candidates[key])
            lengths.append(torch.ones(c, dtype=torch.long, device=device))
            continue
        ids = request.user.get(key, request.history.get(key))
        if ids is None:
            ids = torch.zeros(0, dtype=torch.long, device=device)
        values.append(ids.repeat(c))
        lengths.append(torch.full((c,), ids.numel(), dtype=torch.long, device=device))
    features = KeyedJaggedTensor(keys=model_keys(model), values=torch.cat([v.long() for v in values]),
                                 lengths=torch.cat(lengths).int())
    dense = request.history_time if request.history_time is not None else \
        torch.zeros(0, dtype=torch.long, device=device)
    return Batch(features=features, history_time=dense.repeat(c),
                 request_time=torch.full((c,), request.request_time, device=device),
                 labels=torch.zeros(c, device=device),
                 relevant=torch.zeros(c * dense.numel(), dtype=torch.bool, device=device))


def request_features(request: Request, keys: List[str],
                     history: Dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """The request as C samples in which every id appears once (``sequence.request_kjt``): what
    one lookup of the candidates, the user and the given history ids reads. Candidate keys hold
    each candidate's id; per-user keys and ``history[key]`` (the ids to look up of a history
    key) are carried by the first candidate only; other keys are empty."""
    return request_kjt(keys, request.candidates, {**history, **request.user})


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


def request_rows(model: LongSeqCTR, request: Request, used: Dict[str, torch.Tensor],
                 modules: Optional[Dict[str, SequenceModule]] = None,
                 ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence ``(candidates [C, D], rows [U, D])``: the candidates' rows (zeros for
    attributes without a candidate key) and the rows of its history positions ``used[name]
    [U]``, every attribute side by side; read from the tables (``table_weights``) or in one call
    of the EmbeddingCollection on ``request_features``."""
    arch = model.sequence_arch
    modules = sequences(model) if modules is None else modules
    c = request.num_candidates
    weights = table_weights(arch.embedding_collection)
    device = next(iter(request.candidates.values())).device

    def zeros(table: str, n: int) -> torch.Tensor:
        return torch.zeros(n, arch.dims[table], device=device)

    out = {}
    if weights is not None:
        for name, module in modules.items():
            schema = module.schema
            positions = used[name]
            matched = schema.matched
            target = None
            if len(matched) == len(schema.attributes):
                target = kernels.gather_rows([weights[a.candidate_key] for a in matched],
                                             [request.candidates[a.candidate_key] for a in matched],
                                             None, arch.kernel)
            if target is None:
                target = torch.cat([
                    weights[a.candidate_key].index_select(0, request.candidates[a.candidate_key])
                    if a.candidate_key is not None else zeros(a.table, c)
                    for a in schema.attributes], dim=1)
            rows = kernels.gather_rows([weights[k] for k in schema.history_keys],
                                       [request.history[k] for k in schema.history_keys],
                                       positions, arch.kernel)
            if rows is None:
                rows = torch.cat([weights[k].index_select(0, request.history[k].index_select(
                    0, positions)) for k in schema.history_keys], dim=1)
            out[name] = (target, rows)
        return out
    # one call for every sequence: a history key carries, on the first sample, the ids at the
    # used positions of each sequence that reads it, one sequence after the other
    ids: Dict[str, List[torch.Tensor]] = {}
    starts: Dict[Tuple[str, str], int] = {}
    for name, module in modules.items():
        for key in module.schema.history_keys:
            starts[(name, key)] = sum(t.numel() for t in ids.get(key, []))
            ids.setdefault(key, []).append(request.history[key].index_select(0, used[name]))
    history = {key: torch.cat(parts) for key, parts in ids.items()}
    embeddings = arch.embedding_collection(request_features(request, arch.lookup_keys, history))
    for name, module in modules.items():
        schema, n = module.schema, used[name].numel()
        target = torch.cat([embeddings[a.candidate_key].values() if a.candidate_key is not None
                            else zeros(a.table, c) for a in schema.attributes], dim=1)
        rows = torch.cat([embeddings[k].values()[starts[(name, k)]:starts[(name, k)] + n]
                          for k in schema.history_keys], dim=1)
        out[name] = (target, rows)
    return out


def shared_pooled(model: LongSeqCTR, request: Request) -> torch.Tensor:
    """``[C, P]`` pooled features of the request: each candidate's own columns, and those of the
    per-user features (and of a pooled history, avg-pool) computed once and broadcast. Features
    of one id each from a plain EBC are read from its tables (``table_weights``); otherwise one
    EBC call on ``request_features`` with the first candidate carrying everything per user."""
    c = request.num_candidates
    weights = table_weights(model.sparse_arch)
    if weights is not None and all(key in request.candidates or (
            key in request.user and request.user[key].numel() == 1)
            for key in model.pooled_keys):  # one id each: its row
        return torch.cat([
            weights[key].index_select(0, request.candidates[key]) if key in request.candidates
            else weights[key].index_select(0, request.user[key]).expand(c, -1)
            for key in model.pooled_keys], dim=1)
    pooled = model.sparse_arch(request_features(request, model_keys(model), request.history))
    return torch.cat([pooled[key] if key in request.candidates
                      else pooled[key][:1].expand(c, -1) for key in model.pooled_keys], dim=1)


def distinct_positions(indices: torch.Tensor, n: int, window: int,
                       kernel: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(used [U], inverse [M])``: the positions of the history (``n`` behaviors) that the
    search's ``indices [M]`` or the recent ``window`` read, ascending (each looked up once), and
    each index's row among them: ``used[inverse] == indices``, and the window is ``used``'s last
    ``window`` rows (compiled on CPU, ``kernels.distinct_positions``)."""
    found = kernels.distinct_positions(indices, n, window, kernel)
    if found is not None:
        return found
    seen = torch.zeros(n, dtype=torch.bool, device=indices.device).index_fill_(0, indices, True)
    seen.index_fill_(0, jagged.tail_positions(n, window, indices.device), True)
    return seen.nonzero().squeeze(1), (torch.cumsum(seen, 0) - 1).index_select(0, indices)


@torch.no_grad()
def score_shared(model: LongSeqCTR, request: Request) -> torch.Tensor:
    """``[C]`` logits with each history read once.

    Every sequence module searches its one history for all candidates (``search_request``); the
    distinct positions any candidate reads, plus the recent window, are looked up once for all
    sequences, together with the candidates (``request_rows``); each candidate reads its rows
    from those by index, windows every candidate shares are passed once (``offsets=None``), and
    the modules' own ``attend`` and the model's ``head`` finish the job. Nothing of size C x L is
    looked up or gathered. The four stages are the profiler scopes ``STAGES``, which
    ``benchmarks/serving.py --breakdown`` reports.
    """
    c = request.num_candidates
    device = next(iter(request.candidates.values())).device
    if c == 0:
        return torch.zeros(0, device=device)
    if model.sequence_arch is None:  # avg-pool: the history is a pooled feature, averaged once
        with record_function(STAGES[3]):
            return model.head(shared_pooled(model, request), None)
    arch = model.sequence_arch
    arch.refresh_pending()
    modules = sequences(model)
    with record_function(STAGES[0]):
        selections, used, inverse, intervals = {}, {}, {}, {}
        for name, module in modules.items():
            schema = module.schema
            n = request.history[schema.history_keys[0]].numel()
            intervals[name] = request.request_time - request.times(schema)  # [L]
            selection = module.search_request(
                {k: request.history[k] for k in schema.history_keys},
                {k: request.candidates[k] for k in schema.candidate_keys}, intervals[name])
            window = selection.short[0].numel() if selection.short is not None else 0
            used[name], inverse[name] = distinct_positions(selection.long[0], n, window,
                                                           arch.kernel)
            selections[name] = selection
    with record_function(STAGES[1]):  # the candidates, and the used positions once
        rows = request_rows(model, request, used, modules)
    with record_function(STAGES[2]):
        outputs = []
        for name, module in modules.items():
            target, found = rows[name]  # [C, D], [U, D]
            selection = selections[name]
            found_intervals = intervals[name].index_select(0, used[name])  # [U]
            window = selection.short[0].numel() if selection.short is not None else 0
            lengths = selection.long[1]
            # the window is shared (offsets None): the last rows, as the used positions ascend
            # its rows by index rather than a slice, so that an exported graph knows their
            # number, min(L, w), where the number of used rows depends on the data
            last = jagged.tail_positions(found.size(0), window, device)
            looked = Looked(target, found,
                            None if lengths is None else jagged.lengths_to_offsets(lengths),
                            found_intervals, found.index_select(0, last), None,
                            found_intervals.index_select(0, last), long_index=inverse[name])
            outputs.append(module.attend(looked, selection))
    with record_function(STAGES[3]):  # with the pooled features
        return model.head(shared_pooled(model, request), torch.cat(outputs, dim=1))


@torch.no_grad()
def score_request(model: LongSeqCTR, request: Request) -> torch.Tensor:
    """``[C]`` logits of the request's candidates, each history read once (``score_shared``, see
    the module docstring); equal to ``model`` on ``request_batch(request, model)``. The request
    is checked first (``check_request``: ``RequestError`` naming the feature and the behavior or
    candidate)."""
    check_request(request, model)
    # ids of any integer type pass the check; the lookups and searches index with int64
    request = Request(user={k: v.long() for k, v in request.user.items()},
                      history={k: v.long() for k, v in request.history.items()},
                      candidates={k: v.long() for k, v in request.candidates.items()},
                      request_time=request.request_time,
                      history_time=None if request.history_time is None
                      else request.history_time.long())
    return score_shared(model, request)


def export(model: LongSeqCTR, path: Union[str, Path], example: Request,
           kernel: Optional[str] = None, ids: Optional[Union[str, Path]] = None) -> Path:
    """Write ``model``'s serving artefact to the directory ``path``: ``score_shared`` exported
    with ``torch.export`` (dynamic history lengths and candidate count) and compiled with
    AOTInductor, with the tables and derived tables it reads and the request layout. ``example``:
    a request in the layout served (which keys are per user, history, per candidate); ``ids``: a
    prepared store whose id mappings the artefact carries. See ``torchrec_longseq.export``."""
    from torchrec_longseq import export as artefact  # torch.export and Inductor: on demand
    return artefact.export(model, path, example, kernel, ids)


def load(path: Union[str, Path]) -> "ExportedModel":
    """A serving artefact written by ``export``: ``load(path)(request) -> [C]`` logits, in any
    process, without the model (``torchrec_longseq.export.ExportedModel``)."""
    from torchrec_longseq import export as artefact
    return artefact.load(path)
