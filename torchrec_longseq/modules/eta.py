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

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingConfig, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.modules.derived import ItemDerivedTable
from torchrec_longseq.retrieval import kernels, simhash, topk
from torchrec_longseq.schema import SequenceSchema


class SimHashSearch(nn.Module):
    """ETA's GSU: the ``k`` behaviors with the smallest Hamming distance to the candidate.

    Every attribute of the schema with a candidate key is hashed as one block of the
    block-diagonal projection (``m`` bits each, its own derived table of signatures per row of
    its embedding table); the distance is the sum over the blocks.

    Args:
        schema (SequenceSchema): the sequence's keys and tables.
        tables (Dict[str, EmbeddingConfig]): the EmbeddingCollection's configs by table name.
        num_bits (int): m, signature bits per block (1 to 64 or a multiple of 64).
        k (int): behaviors kept per sample; ties go to the more recent behavior.
        refresh_every (int): 1 = exact signature tables (default), N = re-hash all every N steps.

    Ids outside their tables raise an error naming the position (the compiled kernel, which
    reads the signatures by id, checks them in one vectorised pass first; the torch ops index).

    Example::

        search = SimHashSearch(default_schema(), table_configs(ec), num_bits=64, k=50)
        indices, lengths, _ = search.search(features, history_time, request_time)
    """

    def __init__(self, schema: SequenceSchema, tables: Dict[str, EmbeddingConfig], num_bits: int,
                 k: int, refresh_every: int = 1) -> None:
        super().__init__()
        self.schema = schema
        self.k = topk.check_k(k)
        self.kernel = "auto"  # retrieval.kernels.set_kernel
        words = simhash.check_num_bits(num_bits)
        self.signatures = nn.ModuleList(
            ItemDerivedTable(tables[a.table].num_embeddings, words, torch.int64,
                             simhash.SimHash(tables[a.table].embedding_dim, num_bits, seed=i),
                             refresh_every, table=a.table)
            for i, a in enumerate(schema.matched))

    def search(self, features: KeyedJaggedTensor, history_time: torch.Tensor,
               request_time: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                    Optional[torch.Tensor]]:
        matched = self.schema.matched
        indices, lengths = signature_topk(
            [t.table for t in self.signatures],
            [features[a.history_key].values() for a in matched],
            [features[a.candidate_key].values() for a in matched],
            features[matched[0].history_key].offsets(), self.k, self.kernel)
        return indices, lengths, None

    def search_request(self, history: Dict[str, torch.Tensor], candidates: Dict[str, torch.Tensor],
                       intervals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        matched = self.schema.matched
        return signature_topk([t.table for t in self.signatures],
                              [history[a.history_key] for a in matched],
                              [candidates[a.candidate_key] for a in matched], None, self.k,
                              self.kernel)


def two_blocks(tables: List[torch.Tensor], ids: List[torch.Tensor],
               targets: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor],
                                                     List[torch.Tensor]]:
    """Any number of signature blocks as the two the compiled kernel reads: ``(tables, ids,
    candidate signatures [B, W])`` of two blocks. The first block is read by id; further blocks
    are laid side by side per behavior (one ``[N, W]`` gather, ids ``0..N-1``); a single block
    gets a zero word that adds no distance."""
    first = tables[0][targets[0]]  # [B, W0]
    if len(tables) == 2:
        return tables, ids, [first, tables[1][targets[1]]]
    if len(tables) == 1:
        zero = tables[0].new_zeros(1, 1)
        return ([tables[0], zero], [ids[0], torch.zeros_like(ids[0])],
                [first, zero.expand(first.size(0), 1)])
    n, device = ids[0].numel(), ids[0].device
    rest = torch.cat([t[i] for t, i in zip(tables[1:], ids[1:])], dim=1)  # [N, W]
    rest_targets = torch.cat([t[i] for t, i in zip(tables[1:], targets[1:])], dim=1)  # [B, W]
    return ([tables[0], rest], [ids[0], torch.arange(n, device=device)], [first, rest_targets])


@torch.fx.wrap
def signature_topk(tables: List[torch.Tensor], ids: List[torch.Tensor],
                   targets: List[torch.Tensor], offsets: Optional[torch.Tensor],
                   k: int, kernel: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Hamming top-k of the history against the candidate, signatures read from the tables.

    ``tables[a] [rows_a, W]`` int64 signatures of attribute ``a``, ``ids[a] [N]`` its history
    ids, ``targets[a] [B]`` the candidates' ids; the distance sums over the attributes.
    On CPU the compiled one-pass kernel (``retrieval.kernels``), on CUDA its Triton kernel;
    with ``kernel="torch"`` (or on CUDA without triton) ``simhash_topk`` on the concatenated
    signatures. All give identical results (tested).
    ``offsets=None``: one history shared by all candidates (serving).
    """
    kernels.check_kernel(kernel)
    if kernel != "torch":  # the wrapper returns None where no kernel applies
        (t0, t1), (i0, i1), (c0, c1) = two_blocks(tables, ids, targets)
        found = kernels.hamming_topk_by_id(t0, i0, c0, t1, i1, c1, offsets, k, kernel)
        if found is not None:
            return found
    history = torch.cat([t[i] for t, i in zip(tables, ids)], dim=1)
    candidates = torch.cat([t[i] for t, i in zip(tables, targets)], dim=1)
    if offsets is None:  # the torch ops run the shared history as B copies
        n, b = ids[0].numel(), candidates.size(0)
        return jagged.positions_in_copy(simhash.simhash_topk(
            history.repeat(b, 1), jagged.copies_offsets(n, b, ids[0].device), candidates, k), n)
    return simhash.simhash_topk(history, offsets, candidates, k)
