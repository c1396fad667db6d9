"""The protocol every sequence module implements, and ``SequenceArch``, which runs it.

A sequence module (DIN, SIM, ETA, SDIM, TWIN, or one a user writes) works in three steps, and
training, evaluation and serving all call exactly these::

    search(features, history_time, request_time) -> Selection     on ids, before any lookup
        │   which history positions to look up: a long-term selection (<= k per sample) and
        │   an optional short-term window, plus an auxiliary logit or module-specific tensors
        ▼
    SequenceArch: ONE EmbeddingCollection call for every sequence of the model
        │   the candidate's attributes, and every attribute of the selected positions
        ▼
    attend(looked: Looked, selection: Selection) -> [B, output_dim]

    search_request(history, candidates, intervals) -> Selection    serving: one user's history
        searched once for all C candidates (positions into that one history)

``SequenceArch`` holds the user's EmbeddingCollection and the modules (one per sequence). Per
step it asks every module for its selection, builds one KJT with the EmbeddingCollection's own
feature names (a history key carries the positions every module selected from that history,
each selection as its own block of B samples; a candidate key its candidate id; see
``look_up``), looks it up once (one input and one output all-to-all under DMP, however many
sequences), splits the rows back and calls each module's ``attend``. Only selected positions are looked up: ``<= k + window + 1`` rows per
attribute, sequence and sample, whatever L is.

It also keeps the per-item derived tables (ETA's signatures, SDIM's codes, TWIN's projected
keys) exact: every id sent to the EmbeddingCollection in a training forward is remembered per
table, and at the start of the next forward, after the optimizer has moved those rows, the
derived rows of those ids are re-derived (``DerivedTables``). The user's training loop does not
have to call anything.
"""

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.cooccurrence import cooccurrence_loss
from torchrec_longseq.modules.derived import DerivedTables, ItemDerivedTable
from torchrec_longseq.modules.time import intervals_of
from torchrec_longseq.schema import SequenceSchema

Part = Tuple[torch.Tensor, Optional[torch.Tensor]]


class Selection(NamedTuple):
    """What a search chose, before any lookup.

    ``long = (indices [M], lengths [B])``: positions into the history values (of the schema's
    keys), grouped by sample; ``lengths=None`` (serving) means every candidate reads all ``M``.
    ``short``: the recent window in the same form, or ``None``. ``aux``: an auxiliary logit
    ``[B]`` (SIM soft search) or ``None``. ``extra``: tensors the module's ``attend`` needs and
    only it reads (SDIM's collision weights).
    """

    long: Part
    short: Optional[Part] = None
    aux: Optional[torch.Tensor] = None
    extra: Tuple[torch.Tensor, ...] = ()


class Looked(NamedTuple):
    """The looked-up rows a module attends over; a row is its attributes' embeddings side by side.

    ``candidates [B, D]`` (zeros in the blocks of attributes without a candidate key);
    ``long [U, D]`` with ``long_offsets [B + 1]`` (``None``: every candidate's), ``long_index
    [M]`` (``None``: the rows in order; serving: the row each position reads, so a behavior
    retrieved by several candidates is looked up once) and ``long_intervals [U]`` (request time
    minus behavior time); ``short [S, D]``, ``short_offsets``, ``short_intervals [S]`` likewise.
    """

    candidates: torch.Tensor
    long: torch.Tensor
    long_offsets: Optional[torch.Tensor]
    long_intervals: torch.Tensor
    short: torch.Tensor
    short_offsets: Optional[torch.Tensor]
    short_intervals: torch.Tensor
    long_index: Optional[torch.Tensor] = None


class SequenceModule(nn.Module):
    """Base class of sequence modules: a ``schema``, an ``output_dim`` and the three methods of
    the module docstring. ``derived_tables()`` lists the per-item tables the module keeps
    (``ItemDerivedTable``; ``SequenceArch`` refreshes them)."""

    schema: SequenceSchema
    output_dim: int

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Selection:
        raise NotImplementedError

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Selection:
        """One history (``history[key] [L]`` per history key, ``intervals [L]``) searched for
        ``C`` candidates (``candidates[key] [C]``): positions into that history."""
        raise NotImplementedError

    def attend(self, looked: Looked, selection: Selection) -> torch.Tensor:
        raise NotImplementedError

    def window(self, features: KeyedJaggedTensor) -> Optional[Part]:
        """The recent window the short-term branch reads (``(indices, lengths)``, as a
        selection's ``short``), or ``None`` for a module without one."""
        return None

    def derived_tables(self) -> List[ItemDerivedTable]:
        return [m for m in self.modules() if isinstance(m, ItemDerivedTable)]


def request_kjt(keys: List[str], candidates: Dict[str, torch.Tensor],
                per_user: Dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """One request (one user, C candidates) as C samples in which every id appears once, in the
    order ``keys``: a candidate key holds each candidate's id (``candidates[key] [C]``), a
    per-user key (a pooled user feature, or the ids of a history to look up once) all its ids on
    the first sample; other keys, and every key for C = 0, are empty. What serving's lookups
    read; the per-key counts are passed along (no sum, no sync, in the KJT)."""
    c = next(iter(candidates.values())).numel()
    device = next(iter(candidates.values())).device
    lengths = torch.zeros(len(keys), c, dtype=torch.int32, device=device)
    values = []
    for i, key in enumerate(keys):
        if key in candidates:
            ids = candidates[key]
            lengths[i] = 1
        else:
            ids = per_user.get(key, torch.zeros(0, dtype=torch.long, device=device))
            ids = ids if c > 0 else ids[:0]
            if c > 0:
                lengths[i, 0] = ids.numel()
        values.append(ids.long())
    counts = [v.numel() for v in values]
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=lengths.flatten(),
                             stride=c, length_per_key=counts,
                             offset_per_key=[sum(counts[:i]) for i in range(len(keys) + 1)])


def table_configs(collection: EmbeddingCollection) -> Dict[str, EmbeddingConfig]:
    """``table name -> EmbeddingConfig`` of a (not yet sharded) EmbeddingCollection."""
    return {c.name: c for c in collection.embedding_configs()}


def attribute_columns(schema: SequenceSchema, tables: Dict[str, EmbeddingConfig]
                      ) -> List[slice]:
    """Per attribute of ``schema``, in order, the columns of a behavior (and candidate) row that
    its table's embedding fills: the attributes' rows side by side."""
    start, columns = 0, []
    for a in schema.attributes:
        dim = tables[a.table].embedding_dim
        columns.append(slice(start, start + dim))
        start += dim
    return columns


def behavior_dim(schema: SequenceSchema, tables: Dict[str, EmbeddingConfig]) -> int:
    """Width of a behavior (and candidate) row: the schema's attributes' widths summed."""
    missing = [a.table for a in schema.attributes if a.table not in tables]
    if missing:
        raise ValueError(f"tables {missing} of the schema are not in the EmbeddingCollection "
                         f"(it has {sorted(tables)})")
    return sum(tables[a.table].embedding_dim for a in schema.attributes)


def history_times(schema: SequenceSchema, features: KeyedJaggedTensor,
                  history_time: Optional[torch.Tensor]) -> torch.Tensor:
    """``[N]`` the timestamps of the schema's behaviors: its ``time_key`` or the dense one."""
    if schema.time_key is not None:
        return features[schema.time_key].values()
    if history_time is None:
        raise ValueError("this sequence reads the dense history_time, but none was given")
    return history_time


class SequenceArch(nn.Module):
    """The user's EmbeddingCollection and one sequence module per behavior sequence.

    Args:
        embedding_collection (EmbeddingCollection): the tables every schema names; each table's
            ``feature_names`` list its schemas' history and candidate keys. DMP shards it.
        sequences (Dict[str, SequenceModule]): name -> module; outputs are concatenated in this
            order.
        cooccurrence (float): weight of the co-occurrence loss (``modules.cooccurrence``) over
            the looked-up short-term window of each sequence that has one (a training forward
            without any is an error), in training forwards; 0 (the default): none. The
            weighted losses of the last forward are in ``losses``, which ``LongSeqCTRTrain``
            adds to the click loss.

    Output of ``forward``: ``([B, sum of output_dim], aux)``, ``aux`` the auxiliary logits
    ``[B]`` of the modules that have one (SIM soft search), in order.

    Example::

        arch = SequenceArch(ec, {"clicks": eta_module, "buys": sim_hard_module})
        out, aux = arch(features, history_time, request_time)
    """

    def __init__(self, embedding_collection: EmbeddingCollection,
                 sequences: Dict[str, SequenceModule], cooccurrence: float = 0.0) -> None:
        super().__init__()
        if not sequences:
            raise ValueError("a SequenceArch needs at least one sequence module")
        if not cooccurrence >= 0:
            raise ValueError(f"cooccurrence must be a weight >= 0, got {cooccurrence}")
        self.cooccurrence = cooccurrence
        self.losses: List[torch.Tensor] = []
        self.embedding_collection = embedding_collection
        self.sequences = nn.ModuleDict(sequences)
        self.kernel = "auto"  # serving's gathers; retrieval.kernels.set_kernel
        configs = embedding_collection.embedding_configs()
        # the EC's keys in one fixed order (a sharded EC reads every later KJT in the order of
        # its first one), and each table's keys and width (kept: a sharded EC has no configs)
        self.lookup_keys: List[str] = [f for c in configs for f in c.feature_names]
        self.table_of_key: Dict[str, str] = {f: c.name for c in configs for f in c.feature_names}
        self.dims: Dict[str, int] = {c.name: c.embedding_dim for c in configs}
        dense_times = [name for name, m in sequences.items() if m.schema.time_key is None]
        if len(dense_times) > 1:
            raise ValueError(f"sequences {dense_times} all read the dense history_time: give "
                             f"each but one a time_key")
        for name, module in sequences.items():
            for attribute in module.schema.attributes:
                for key in (attribute.history_key, attribute.candidate_key):
                    if key is not None and self.table_of_key.get(key) != attribute.table:
                        raise ValueError(
                            f"sequence {name!r}: key {key!r} must be a feature of table "
                            f"{attribute.table!r} in the EmbeddingCollection (its tables serve "
                            f"{self.table_of_key})")
        self.output_dim = sum(m.output_dim for m in sequences.values())
        self.derived = DerivedTables([t for m in sequences.values() for t in m.derived_tables()])

    def forward(self, features: KeyedJaggedTensor, history_time: Optional[torch.Tensor],
                request_time: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        self.refresh_pending()
        selections = {
            name: module.search(features, history_times(module.schema, features, history_time),
                                request_time)
            for name, module in self.sequences.items()}
        looked = self.look_up(features, history_time, request_time, selections)
        outputs = [module.attend(looked[name], selections[name])
                   for name, module in self.sequences.items()]
        aux = [s.aux for s in selections.values() if s.aux is not None]
        self.losses = []
        if self.training and self.cooccurrence > 0:
            self.losses = self._cooccurrence(looked, selections, request_time)
        return torch.cat(outputs, dim=1), aux

    def cooccurrence_losses(self, features: KeyedJaggedTensor, history_time: Optional[torch.Tensor],
                            request_time: torch.Tensor) -> List[torch.Tensor]:
        """The co-occurrence losses (weighted, one per sequence with a window) that a training
        ``forward`` leaves in ``losses``, with only the candidates and the recent windows looked
        up: no search, no attention. What ``train.py --cooccurrence-pretrain`` steps on; the
        derived tables are kept exact as in ``forward``."""
        if not self.cooccurrence > 0:
            raise ValueError("cooccurrence_losses needs a co-occurrence weight > 0 "
                             "(SequenceArch(cooccurrence=w))")
        self.refresh_pending()
        selections = {}
        for name, module in self.sequences.items():
            window = module.window(features)
            if window is not None:
                nothing = (window[0][:0], torch.zeros_like(window[1]))  # no long part
                selections[name] = Selection(nothing, window)
        looked = self.look_up(features, history_time, request_time, selections)
        return self._cooccurrence(looked, selections, request_time)

    def _cooccurrence(self, looked: Dict[str, Looked], selections: Dict[str, Selection],
                      request_time: torch.Tensor) -> List[torch.Tensor]:
        losses = [self.cooccurrence * cooccurrence_loss(
                      looked[name].short, looked[name].short_offsets, request_time)
                  for name, selection in selections.items() if selection.short is not None]
        if not losses:
            raise ValueError(f"cooccurrence is {self.cooccurrence}, but no sequence of "
                             f"{list(self.sequences)} has a short-term window to learn "
                             f"from (DIN's window is its long part; short_window=0 builds "
                             f"none)")
        return losses

    def refresh_pending(self) -> None:
        """Bring the derived tables up to date with the tables (see ``DerivedTables``): the rows
        the last training forward looked up (the optimizer has moved them since), or all rows the
        first time. Called at the start of every forward; call it before reading the derived
        tables elsewhere (export, a checkpoint)."""
        _refresh(self.derived, self.embedding_collection)

    def look_up(self, features: KeyedJaggedTensor, history_time: Optional[torch.Tensor],
                request_time: torch.Tensor,
                selections: Dict[str, Selection]) -> Dict[str, Looked]:
        """The rows of every module's selection, in one EmbeddingCollection call.

        The lookup KJT has ``P x B`` "samples", P the most parts (selections) any history key
        carries: under a history key, block ``p`` of B samples holds part ``p`` (module order,
        each module's long part then its short one), so every part's rows come back as one
        contiguous slice of the key's values, no gather; a candidate key fills block 0; missing
        blocks are empty. (The sharded collection sees a batch of ``P x B`` samples.)::

            hist_item  lengths [long_0 .. long_B-1 | short_0 .. short_B-1]   P = 2
            target_item        [1 .. 1             | 0 .. 0              ]
        """
        batch = request_time.numel()
        # per history key, the parts read from it, in module order; slots[name][kind][key]:
        # which part of ``key`` is module ``name``'s long (0) or short (1) one
        parts: Dict[str, List[Part]] = {}
        slots: Dict[str, List[Dict[str, int]]] = {}
        for name, selection in selections.items():
            slots[name] = [{}, {}]
            for kind, part in enumerate((selection.long, selection.short)):
                if part is None:
                    continue
                for key in self.sequences[name].schema.history_keys:
                    slots[name][kind][key] = len(parts.setdefault(key, []))
                    parts[key].append(part)
        blocks = max([len(p) for p in parts.values()] + [1])
        candidate_keys = {k for m in self.sequences.values() for k in m.schema.candidate_keys}
        values, lengths = [], []
        for key in self.lookup_keys:
            if key in parts:
                ids = features[key].values()
                values.append(torch.cat([ids.index_select(0, p[0]) for p in parts[key]]))
                lengths += [p[1] for p in parts[key]]
                empty = blocks - len(parts[key])
            elif key in candidate_keys:
                values.append(features[key].values())
                lengths.append(features[key].lengths())
                empty = blocks - 1
            else:  # a feature of the collection that no sequence reads
                values.append(request_time.new_zeros(0, dtype=torch.long))
                empty = blocks
            lengths += [request_time.new_zeros(batch, dtype=torch.long)] * empty
        kjt = _lookup_kjt(self.lookup_keys, values, lengths)
        _remember(self.derived, self.lookup_keys, values, self.table_of_key)
        embeddings = self.embedding_collection(kjt)  # one all-to-all for every sequence
        # each part's rows: one split per key (its backward is one concatenation)
        pieces = {key: _split(embeddings[key].values(), parts[key]) for key in parts}
        looked = {}
        for name, selection in selections.items():
            schema = self.sequences[name].schema
            times = history_times(schema, features, history_time)
            offsets = features[schema.history_keys[0]].offsets()
            candidates = torch.cat([
                embeddings[a.candidate_key].values() if a.candidate_key is not None else
                torch.zeros(batch, self.dims[a.table], device=request_time.device)
                for a in schema.attributes], dim=1)  # [B, D]
            found = []
            for kind, part in enumerate((selection.long, selection.short)):
                if part is None:
                    found += [candidates[:0], jagged.lengths_to_offsets(
                        request_time.new_zeros(batch, dtype=torch.long)),
                        request_time.new_zeros(0)]
                    continue
                rows = torch.cat([pieces[key][slots[name][kind][key]]  # [M, D]
                                  for key in schema.history_keys], dim=1)
                assert part[1] is not None
                found += [rows, jagged.lengths_to_offsets(part[1]),
                          intervals_of(times, request_time, offsets, part[0])]
            looked[name] = Looked(candidates, *found)
        return looked


@torch.fx.wrap
def _split(values: torch.Tensor, parts: List[Part]) -> List[torch.Tensor]:
    """A key's looked-up ``values`` cut into its parts' rows: the parts lie one after the other,
    each as many rows as it has positions (known without a sync)."""
    return list(values.split([part[0].numel() for part in parts], dim=0))


@torch.fx.wrap
def _lookup_kjt(keys: List[str], values: List[torch.Tensor],
                lengths: List[torch.Tensor]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=keys, values=torch.cat([v.long() for v in values]),
                             lengths=torch.cat(lengths).int())


# the derived tables' bookkeeping as fx leaves: a traced forward still records the looked-up ids
# (in training mode) and refreshes the tables first

@torch.fx.wrap
def _remember(derived: DerivedTables, keys: List[str], values: List[torch.Tensor],
              table_of_key: Dict[str, str]) -> None:
    derived.remember(keys, values, table_of_key)


@torch.fx.wrap
def _refresh(derived: DerivedTables, collection: EmbeddingCollection) -> None:
    derived.refresh_pending(collection)
