"""Per-item tables derived from the item embedding table, kept equal to it during training.

ETA's SimHash signatures (and later SDIM's hash codes and TWIN's pre-projected keys) are a
function of each item's current embedding. Computing them for all L behaviors of every sample
would need the L embeddings, which is what retrieval is meant to avoid. Instead the derived
values live in a per-item buffer, read by id:

* ``refresh(lookup)`` (all rows) builds it from the whole embedding table, at start and, in
  periodic mode, every ``refresh_every`` steps;
* in exact mode (``refresh_every = 1``) the forward pass remembers which item ids it looked up,
  and after the optimizer step ``refresh_touched(tables, lookup)`` re-derives exactly those
  rows: with a sparse (fused, row-wise) optimizer only looked-up rows change, so the table then
  equals deriving from the current embeddings, at O(touched rows) cost.

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

from typing import Callable, List

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingCollection
from torchrec.distributed.types import ShardedTensor

from torchrec_longseq.data.batch import TARGET_ITEM
from torchrec_longseq.modules.lookup import TABLE_OF_KEY


class ItemDerivedTable(nn.Module):
    """A ``[num_items, width]`` buffer with ``table[i] = derive(embedding[i])``.

    The embedding table is the one the lookup key ``key`` reads (``target_item``: the item table,
    ``target_category``: the category table), so the same mechanism serves per-category tables.

    Args:
        num_items (int): rows of the embedding table.
        width (int): columns of a derived row.
        dtype (torch.dtype): e.g. ``torch.int64`` for packed signatures.
        derive (Callable[[Tensor], Tensor]): ``[N, D]`` embeddings -> ``[N, width]``.
        refresh_every (int): 1 = exact (touched rows after every step); N > 1 = whole table every
            N steps (the periodic mode, for comparison).
        key (str): the lookup key whose table the rows come from.
        trained_derive (bool): ``derive`` has trained parameters, so every row changes at every
            step: rebuild the whole table every ``refresh_every`` steps.

    Example::

        table = ItemDerivedTable(10_000, 1, torch.int64, SimHash(16, 64))
        table.refresh(embedding_collection)          # from the whole item table
        signatures = table(item_ids)                 # [N, 1]
    """

    def __init__(self, num_items: int, width: int, dtype: torch.dtype,
                 derive: Callable[[torch.Tensor], torch.Tensor], refresh_every: int = 1,
                 key: str = TARGET_ITEM, trained_derive: bool = False) -> None:
        super().__init__()
        self.key = key
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        self.register_buffer("table", torch.zeros(num_items, width, dtype=dtype))
        self.derive = derive
        self.refresh_every = refresh_every
        self.trained_derive = trained_derive
        self._touched: List[torch.Tensor] = []

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """``[N]`` item ids -> ``[N, width]`` derived rows."""
        return self.table[items]

    def remember(self, items: torch.Tensor) -> None:
        """Record ids looked up in this training step (exact mode only); see ``remember_items``."""
        if self.training and self.exact:
            self._touched.append(items.detach())

    @torch.no_grad()
    def refresh(self, lookup: EmbeddingCollection, chunk: int = 65_536) -> None:
        """Re-derive every row from the current item table (a collective under DMP)."""
        self._touched.clear()
        num_items = self.table.size(0)
        for start in range(0, num_items, chunk):
            items = torch.arange(start, min(start + chunk, num_items), device=self.table.device)
            self.store(items, read_rows(lookup, self.key, items))

    def take_touched(self) -> torch.Tensor:
        """The distinct ids remembered since the last refresh ``[n]``; forgets them."""
        if self._touched:
            items = torch.unique(torch.cat(self._touched))
        else:
            items = torch.zeros(0, dtype=torch.long, device=self.table.device)
        self._touched.clear()
        return items

    @property
    def exact(self) -> bool:
        """Re-derived for exactly the touched rows after every step (else rebuilt periodically)."""
        return self.refresh_every == 1 and not self.trained_derive

    @torch.no_grad()
    def store(self, items: torch.Tensor, embeddings: torch.Tensor) -> None:
        """Derive rows ``items [n]`` from their current ``embeddings [n, D]`` into the table."""
        self.table[items] = self.derive(embeddings).to(self.table.dtype)


@torch.no_grad()
def refresh_touched(tables: List[ItemDerivedTable], lookup: EmbeddingCollection) -> None:
    """Re-derive the rows each table looked up since its last refresh, on every rank (a
    collective under DMP): the union of every rank's touched ids, read with ``read_rows``."""
    for table in tables:
        items = table.take_touched()
        if dist.is_initialized() and dist.get_world_size() > 1:
            items = torch.unique(_all_gather_ids(items))
        table.store(items, read_rows(lookup, table.key, items))


@torch.no_grad()
def read_rows(lookup: EmbeddingCollection, key: str, items: torch.Tensor) -> torch.Tensor:
    """The current rows ``items [n]`` of the table that lookup key ``key`` reads, ``[n, D]``,
    straight from the weights: no lookup round, no autograd.

    An unsharded (or replicated) table is indexed. A sharded one (``ShardedTensor`` in the
    collection's state dict) is read shard by shard, each local shard filling its block of rows
    and columns of a zero ``[n, D]``; under DMP one all_reduce then adds up the ranks' blocks, so
    every rank must pass the same ``items`` (a collective).
    """
    weight = lookup.state_dict()[f"embeddings.{TABLE_OF_KEY[key]}.weight"]
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


@torch.fx.wrap
def remember_items(table: ItemDerivedTable, items: torch.Tensor) -> torch.Tensor:
    """``table.remember(items)`` as an fx leaf, so a traced forward still records the ids."""
    table.remember(items)
    return items


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
