"""ETA (Chen et al. 2021): end-to-end target attention with SimHash retrieval.

ETA's GSU ranks every behavior by the Hamming distance between the SimHash signature of its
embedding and the candidate's, keeps the k closest, and the ESU (shared with SIM) attends over
them. The paper hashes the current embeddings, so retrieval follows training end to end.

What is hashed is the behavior embedding the attention uses, ``e_j = [e_item; e_category]``.
Its SimHash is taken with a block-diagonal projection ``diag(H_item, H_category)``
(``m`` bits per block), so the signature of ``e_j`` is the concatenation of a per-item and a
per-category signature, and the Hamming distance is their sum. Each half lives in its own
derived table (``ItemDerivedTable``: per item, from the item table; per category, from the
category table), re-hashed for exactly the rows each optimizer step touched, so at every step
the signatures equal hashing the current embeddings, while a forward pass reads L int64 words per
sample instead of L embeddings. The same tables are what an inference server loads: serving
needs no embedding lookup of the L behaviors.
"""

from typing import Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.retrieval import kernels, simhash, topk


class SimHashSearch(nn.Module):
    """ETA's GSU: the ``k`` behaviors with the smallest Hamming distance to the candidate.

    Args:
        table_sizes (Tuple[int, int]): rows of the item and of the category table.
        embedding_dim (int): width of the item and category embeddings.
        num_bits (int): m, signature bits per block (1 to 64 or a multiple of 64): ``2 m`` in all.
        k (int): behaviors kept per sample; ties go to the more recent behavior.
        refresh_every (int): 1 = exact signature tables (default), N = re-hash all every N steps.

    The history ids must index the tables (``data.validation.check_batch``, which ``train.py``
    runs on every batch): on CPU the per-sample kernel reads the signatures by id without a
    bounds check, which would cost 30-65% of its scan. (The shared-history search of serving, and
    TWIN's and SDIM's kernels, check their ids.)

    Example::

        search = SimHashSearch((10_000, 100), 16, num_bits=64, k=50)
        search.item_signatures.refresh(embedding_collection)
        search.category_signatures.refresh(embedding_collection)
        indices, lengths, _ = search(features, embedding_collection, history_time, request_time)
    """

    def __init__(self, table_sizes: Tuple[int, int], embedding_dim: int, num_bits: int, k: int,
                 refresh_every: int = 1) -> None:
        super().__init__()
        self.k = topk.check_k(k)
        words = simhash.check_num_bits(num_bits)
        self.item_signatures = ItemDerivedTable(
            table_sizes[0], words, torch.int64, simhash.SimHash(embedding_dim, num_bits, seed=0),
            refresh_every, key=TARGET_ITEM)
        self.category_signatures = ItemDerivedTable(
            table_sizes[1], words, torch.int64, simhash.SimHash(embedding_dim, num_bits, seed=1),
            refresh_every, key=TARGET_CATEGORY)

    def forward(
        self, features: KeyedJaggedTensor, lookup: EmbeddingCollection,
        history_time: Optional[torch.Tensor], request_time: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        hist_item, hist_category = features[HIST_ITEM], features[HIST_CATEGORY]
        indices, lengths = signature_topk(
            self.item_signatures.table, hist_item.values(), features[TARGET_ITEM].values(),
            self.category_signatures.table, hist_category.values(),
            features[TARGET_CATEGORY].values(), hist_item.offsets(), self.k,
        )
        return indices, lengths, None


@torch.fx.wrap
def signature_topk(item_table: torch.Tensor, items: torch.Tensor, target_items: torch.Tensor,
                   category_table: torch.Tensor, categories: torch.Tensor,
                   target_categories: torch.Tensor, offsets: Optional[torch.Tensor],
                   k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hamming top-k of the history against the candidate, signatures read from the tables.

    On CPU the compiled one-pass kernel (``retrieval.kernels``); on GPU, or with
    ``TORCHREC_LONGSEQ_KERNELS=0``, ``simhash_topk`` on the concatenated signatures. Both give
    identical results (tested). ``offsets=None``: one history shared by all candidates
    (serving).
    """
    item_targets, category_targets = item_table[target_items], category_table[target_categories]
    found = kernels.hamming_topk_by_id(item_table, items, item_targets, category_table,
                                       categories, category_targets, offsets, k)
    if found is not None:
        return found
    history = torch.cat([item_table[items], category_table[categories]], dim=1)
    targets = torch.cat([item_targets, category_targets], dim=1)
    if offsets is None:  # the torch ops run the shared history as B copies
        n, b = items.numel(), targets.size(0)
        return jagged.positions_in_copy(simhash.simhash_topk(
            history.repeat(b, 1), jagged.copies_offsets(n, b, items.device), targets, k), n)
    return simhash.simhash_topk(history, offsets, targets, k)
