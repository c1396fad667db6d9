"""ETA (Chen et al. 2021): end-to-end target attention with SimHash retrieval.

ETA's GSU ranks every behavior by the Hamming distance between its item's SimHash signature and
the candidate's, keeps the k closest, and the ESU (shared with SIM) attends over them. The
paper hashes the current embeddings, so retrieval follows training end to end. Here the
signatures live in a per-item table (``ItemDerivedTable``) that is re-hashed for exactly the rows
each optimizer step touched, so at every step it equals hashing the current embeddings, while a
forward pass reads L int64 words per sample instead of L embeddings. The same table is what an
inference server loads: serving needs no embedding lookup of the L behaviors.
"""

from typing import Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq.data.batch import HIST_ITEM, TARGET_ITEM
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.retrieval import kernels, simhash


class SimHashSearch(nn.Module):
    """ETA's GSU: the ``k`` behaviors with the smallest Hamming distance to the candidate.

    Args:
        num_items (int): rows of the item table.
        embedding_dim (int): width of the item embedding that is hashed.
        num_bits (int): m, signature bits (32 or a multiple of 64).
        k (int): behaviors kept per sample; ties go to the more recent behavior.
        refresh_every (int): 1 = exact signature table (default), N = re-hash all every N steps.

    Example::

        search = SimHashSearch(10_000, 16, num_bits=64, k=50)
        search.signatures.refresh(embedding_collection)
        indices, lengths, _ = search(features, embedding_collection)
    """

    def __init__(self, num_items: int, embedding_dim: int, num_bits: int, k: int,
                 refresh_every: int = 1) -> None:
        super().__init__()
        self.k = k
        hasher = simhash.SimHash(embedding_dim, num_bits)
        self.signatures = ItemDerivedTable(num_items, simhash.check_num_bits(num_bits), torch.int64,
                                           hasher, refresh_every)

    def forward(
        self, features: KeyedJaggedTensor, lookup: EmbeddingCollection
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        hist = features[HIST_ITEM]
        indices, lengths = signature_topk(self.signatures.table, hist.values(), hist.offsets(),
                                          features[TARGET_ITEM].values(), self.k)
        return indices, lengths, None


@torch.fx.wrap
def signature_topk(table: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor,
                   target_items: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hamming top-k of the history against the candidate, both read from the signature table.

    On CPU the compiled one-pass kernel (``retrieval.kernels``); on GPU, or with
    ``TORCHREC_LONGSEQ_KERNELS=0``, the torch ops of ``simhash_topk``. Both give identical
    results (tested).
    """
    targets = table[target_items]
    found = kernels.hamming_topk_by_id(table, items, offsets, targets, k)
    if found is not None:
        return found
    return simhash.simhash_topk(table[items], offsets, targets, k)
