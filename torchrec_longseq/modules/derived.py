"""Per-item tables derived from the item embedding table, kept equal to it during training.

ETA's SimHash signatures (and later SDIM's hash codes and TWIN's pre-projected keys) are a
function of each item's current embedding. Computing them for all L behaviors of every sample
would need the L embeddings, which is what retrieval is meant to avoid. Instead the derived
values live in a per-item buffer, read by id:

* ``refresh(lookup)`` (all rows) builds it from the whole embedding table, at start and, in
  periodic mode, every ``refresh_every`` steps;
* in exact mode (``refresh_every = 1``) every id sent to the EmbeddingCollection in a training
  forward is remembered per embedding table (``DerivedTables.remember``), and at the start of the
  next forward, after the optimizer step, exactly those rows are re-derived
  (``DerivedTables.refresh_pending``): with a sparse (fused, row-wise) optimizer only looked-up
  rows change, so the table then equals deriving from the current embeddings, at O(touched rows)
  cost. ``SequenceArch`` does both; a training loop calls nothing.

The contract is checked, not assumed: at every refresh a few random rows of each source table
(``AUDIT_ROWS``) are compared with their values at the previous refresh; one that changed
although no forward looked it up (a dense optimizer with momentum or weight decay over the table,
another module training it) raises ``StaleDerivedTableError`` saying what to do, instead of
letting the derived tables go silently stale.

A derivation with trained parameters of its own (TWIN's key and query projections) changes every
row at every step, not only the touched ones: such a table (``trained_derive=True``) is rebuilt
whole every ``refresh_every`` steps (1 = every step, exact), an O(catalog) refresh.

Rows are read from the EmbeddingCollection's weights where they live (``read_rows``), not
through a lookup: after a step the rows are on this rank already (its local shards), so a
refresh costs no lookup round. Under DistributedModelParallel the ranks first agree on the ids
(all_gather of every rank's touched ids), then each rank copies what its shards hold of those
rows into a zero ``[n, D]`` block and one all_reduce sums the blocks: every element of a row lives
on exactly one rank whatever the sharding (table-, row-, column-wise), so every rank ends with the
same full rows, derives the same values and the replicated table stays identical on every rank.
"""

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingCollection
from torchrec.distributed.types import ShardedTensor



class ItemDerivedTable(nn.Module):
    """A ``[num_items, width]`` buffer with ``table[i] = derive(embedding[i])``.

    ``table`` names the EmbeddingCollection table the rows are derived from (any attribute's:
    item, category, shop, ...).

    Args:
        num_items (int): rows of the embedding table.
        width (int): columns of a derived row.
        dtype (torch.dtype): e.g. ``torch.int64`` for packed signatures.
        derive (Callable[[Tensor], Tensor]): ``[N, D]`` embeddings -> ``[N, width]``.
        refresh_every (int): 1 = exact (touched rows after every step); N > 1 = whole table every
            N steps (the periodic mode, for comparison).
        table (str): the name of the embedding table the rows come from.
        trained_derive (bool): ``derive`` has trained parameters, so every row changes at every
            step: rebuild the whole table every ``refresh_every`` steps.

    Example::

        c = table_configs(embedding_collection)[name]   # the EmbeddingConfig of table ``name``
        table = ItemDerivedTable(c.num_embeddings, 1, torch.int64,
                                 SimHash(c.embedding_dim, 64), table=c.name)
        table.refresh(embedding_collection)          # from the whole embedding table
        signatures = table(ids)                      # [N, 1]
    """

    def __init__(self, num_items: int, width: int, dtype: torch.dtype,
                 derive: Callable[[torch.Tensor], torch.Tensor], refresh_every: int = 1, *,
                 table: str, trained_derive: bool = False) -> None:
        super().__init__()
        self.source = table
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.register_buffer("table", torch.zeros(num_items, width, dtype=dtype))
        self.derive = derive
        self.refresh_every = refresh_every
        self.trained_derive = trained_derive

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """``[N]`` item ids -> ``[N, width]`` derived rows."""
        return self.table[items]

    @torch.no_grad()
    def refresh(self, lookup: EmbeddingCollection, chunk: int = 65_536) -> None:
        """Re-derive every row from the current item table (a collective under DMP)."""
        num_items = self.table.size(0)
        for start in range(0, num_items, chunk):
            items = torch.arange(start, min(start + chunk, num_items), device=self.table.device)
            self.store(items, read_rows(lookup, self.source, items))

    @property
    def exact(self) -> bool:
        """Re-derived for exactly the touched rows after every step (else rebuilt periodically)."""
        return self.refresh_every == 1 and not self.trained_derive

    @torch.no_grad()
    def store(self, items: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Derive rows ``items [n]`` from their current ``embeddings [n, D]`` into the table."""
        self.table[items] = self.derive(embeddings).to(self.table.dtype)


@torch.no_grad()
def read_rows(lookup: EmbeddingCollection, table: str, items: torch.Tensor) -> torch.Tensor:
    """The current rows ``items [n]`` of the embedding table ``table``, ``[n, D]``,
    straight from the weights: no lookup round, no autograd.

    An unsharded (or replicated) table is indexed. A sharded one (``ShardedTensor`` in the
    collection's state dict) is read shard by shard, each local shard filling its block of rows
    and columns of a zero ``[n, D]``; under DMP one all_reduce then adds up the ranks' blocks, so
    every rank must pass the same ``items`` (a collective).
    """
    weight = lookup.state_dict()[f"embeddings.{table}.weight"]
    if not isinstance(weight, ShardedTensor):
        return weight.detach()[items]
    # the metadata, not the ShardedTensor's own methods: those go through __torch_function__
    # (about 1.7 ms a call here)
    metadata = weight.metadata()
    num_rows, dim = metadata.size
    shards = weight.local_shards()
    if len(shards) == 1 and list(shards[0].metadata.shard_sizes) == [num_rows, dim]:
        rows = shards[0].tensor[items]  # the whole table (table-wise, or one rank)
    else:  # (a rank may hold none of it: the dtype comes from the metadata every rank has)
        rows = torch.zeros(items.numel(), dim, device=items.device,
                           dtype=metadata.tensor_properties.dtype)
        for shard in shards:
            (row, col), (height, width) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            if height == num_rows:  # every row, some columns (column-wise)
                rows[:, col:col + width] = shard.tensor[items]
                continue
            inside = (items >= row) & (items < row + height)
            rows[inside, col:col + width] = shard.tensor[items[inside] - row]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(rows)
    return rows


def _all_gather_ids(items: torch.Tensor) -> torch.Tensor:
    """Concatenate the ``items [n_r]`` of every rank (sizes may differ)."""
    world = dist.get_world_size()
    size = torch.tensor([items.numel()], device=items.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    n = [int(s.item()) for s in sizes]
    padded = items.new_zeros(max(n))
    padded[: items.numel()] = items
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([t[:k] for t, k in zip(gathered, n)])


AUDIT_ROWS = 16  # rows per source table compared at every refresh


class StaleDerivedTableError(RuntimeError):
    """Rows of an embedding table changed that no forward looked up, so the exact derived tables
    built from it are stale."""


class DerivedTables(nn.Module):
    """The derived tables of a model, grouped by the embedding table they derive from.

    A module without parameters or buffers of its own (the tables are registered where they
    live, in their sequence modules; here they are a plain list), so that a traced forward keeps
    its calls (``SequenceArch``'s fx-wrapped ``_remember`` and ``_refresh`` take it as an
    argument). It keeps the ids each training forward looked up and refreshes the tables before
    the next forward.

    * First refresh (or after ``reset``): every table rebuilt whole.
    * Then, once per training forward that happened since: exact tables re-derive the union of
      the looked-up ids of their source table (one read of the rows per source table, however
      many derived tables it has); periodic and trained-derive tables are rebuilt whole every
      ``refresh_every`` training steps.
    * Audit (exact tables): ``AUDIT_ROWS`` random rows per source table, the same on every rank,
      are read along with the touched rows and compared with their previous values.

    Under DMP every call is a collective (ranks run their forwards in lockstep).
    """

    def __init__(self, tables: List[ItemDerivedTable]) -> None:
        super().__init__()
        self.tables = list(tables)  # a plain list: not registered a second time
        self.exact_sources = list(dict.fromkeys(t.source for t in tables if t.exact))
        self._touched: Dict[str, List[torch.Tensor]] = {s: [] for s in self.exact_sources}
        self._steps = 0  # training forwards so far
        self._pending = 0  # training forwards since the last refresh
        self._built = False
        self._audit: Dict[str, Optional[tuple]] = {s: None for s in self.exact_sources}
        self._generator = torch.Generator().manual_seed(0)

    def reset(self) -> None:
        """Rebuild every table at the next refresh (after loading weights)."""
        self._built = False

    def remember(self, keys: List[str], values: List[torch.Tensor],
                 table_of_key: Dict[str, str]) -> None:
        """Record a training forward: ``values[i]`` are the ids looked up under ``keys[i]``."""
        if not self.tables or not self.training:
            return
        self._pending += 1
        for key, ids in zip(keys, values):
            source = table_of_key[key]
            if source in self._touched and ids.numel():
                self._touched[source].append(ids.detach().long())

    @torch.no_grad()
    def refresh_pending(self, lookup: EmbeddingCollection) -> None:
        """Bring every table up to date (see the class docstring); nothing to do -> no work."""
        if not self.tables:
            return
        if not self._built:
            for table in self.tables:
                table.refresh(lookup)
            self._built = True
            self._pending = 0
            for source in self.exact_sources:
                self._touched[source].clear()
                self._audit[source] = None
            return
        if self._pending == 0:
            return
        steps_before, self._steps = self._steps, self._steps + self._pending
        self._pending = 0
        for source in self.exact_sources:
            self._refresh_source(lookup, source)
        for table in self.tables:
            if not table.exact and (self._steps // table.refresh_every
                                    > steps_before // table.refresh_every):
                table.refresh(lookup)

    def _refresh_source(self, lookup: EmbeddingCollection, source: str) -> None:
        """The exact tables of one source table: re-derive its touched rows, audit the rest."""
        touched = self._touched[source]
        items = torch.unique(torch.cat(touched)) if touched else torch.zeros(0, dtype=torch.long)
        touched.clear()
        if dist.is_initialized() and dist.get_world_size() > 1:
            items = torch.unique(_all_gather_ids(items))
        exact = [t for t in self.tables if t.exact and t.source == source]
        num_rows = exact[0].table.size(0)
        audit = torch.randint(0, num_rows, (min(AUDIT_ROWS, num_rows),), generator=self._generator)
        previous = self._audit[source]
        ids = [items.to(exact[0].table.device), audit.to(exact[0].table.device)]
        if previous is not None:
            ids.append(previous[0])
        rows = read_rows(lookup, source, torch.cat(ids))
        n, a = items.numel(), audit.numel()
        for table in exact:
            table.store(items, rows[:n])
        if previous is not None:
            before_ids, before_rows = previous
            now = rows[n + a:]
            moved = (now != before_rows).any(dim=1) & ~torch.isin(before_ids, items)
            if moved.any():
                row = int(before_ids[moved][0])
                raise StaleDerivedTableError(
                    f"embedding table {source!r}: row {row} changed although no forward looked it "
                    f"up, so the exact derived tables of {source!r} "
                    f"({', '.join(type(t.derive).__name__ for t in exact)}) would be stale. Only "
                    f"the looked-up rows may move between two forwards: train the tables with a "
                    f"sparse optimizer (TorchRec's fused / apply_optimizer_in_backward, or SGD "
                    f"without momentum or weight decay), not a dense one such as torch.optim.Adam "
                    f"over the table; or build the module with refresh_every=N to rebuild its "
                    f"derived tables whole every N steps.")
        self._audit[source] = (audit.to(rows.device), rows[n:n + a].clone())
