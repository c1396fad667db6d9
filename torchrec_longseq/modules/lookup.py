"""Looking up the candidate and selections of its history in one EmbeddingCollection call.

This is where "retrieve, then look up" happens: a sequence module first picks positions in the
history from ids alone (a search), then only the picked ids (and the candidate) go through the
(sharded) EmbeddingCollection, so lookup and all-to-all volume grow with the selection, not with L.

The EmbeddingCollection built by ``build_model`` serves these keys (the same two tables,
``ITEM_TABLE`` and ``CATEGORY_TABLE``)::

    table      keys
    item       target_item      hist_item      short_item
    category   target_category  hist_category  short_category

``hist_*`` carries the long-term selection (the last N for DIN, everything for din-full, the
retrieved k for SIM and ETA), ``short_*`` the recent window of the short-term branch. Every call sends every
key, empty where unused, since a (sharded) EmbeddingCollection expects all its features.
"""

from typing import Dict, Optional, Tuple

import torch
from torchrec import EmbeddingCollection, JaggedTensor, KeyedJaggedTensor

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM

ITEM_TABLE = "item"
CATEGORY_TABLE = "category"
SHORT_ITEM = "short_item"
SHORT_CATEGORY = "short_category"
ITEM_KEYS = [TARGET_ITEM, HIST_ITEM, SHORT_ITEM]
CATEGORY_KEYS = [TARGET_CATEGORY, HIST_CATEGORY, SHORT_CATEGORY]
LOOKUP_KEYS = [TARGET_ITEM, TARGET_CATEGORY, HIST_ITEM, HIST_CATEGORY, SHORT_ITEM, SHORT_CATEGORY]
TABLE_OF_KEY = {key: ITEM_TABLE for key in ITEM_KEYS}
TABLE_OF_KEY.update({key: CATEGORY_TABLE for key in CATEGORY_KEYS})


@torch.fx.wrap
def selection_features(
    features: KeyedJaggedTensor,
    long_indices: torch.Tensor,
    long_lengths: torch.Tensor,
    short_indices: Optional[torch.Tensor],
    short_lengths: Optional[torch.Tensor],
) -> KeyedJaggedTensor:
    """The KJT sent to the EmbeddingCollection: the candidate plus two history selections.

    ``*_indices [M]`` are positions into the history values and ``*_lengths [B]`` their count per
    sample (as every search returns them). ``short_indices = None`` sends no short-term window.
    """
    target_item = features[TARGET_ITEM]
    target_category = features[TARGET_CATEGORY]
    hist_item = features[HIST_ITEM].values()
    hist_category = features[HIST_CATEGORY].values()
    long_item, long_category = hist_item[long_indices], hist_category[long_indices]
    if short_indices is None or short_lengths is None:
        short_item = short_category = hist_item[:0]
        short_lengths = torch.zeros_like(long_lengths)
    else:
        short_item, short_category = hist_item[short_indices], hist_category[short_indices]
    return KeyedJaggedTensor(
        keys=LOOKUP_KEYS,
        values=torch.cat([target_item.values(), target_category.values(), long_item,
                          long_category, short_item, short_category]),
        lengths=torch.cat([target_item.lengths(), target_category.lengths(), long_lengths,
                           long_lengths, short_lengths, short_lengths]).int(),
    )


def behavior_rows(embeddings: Dict[str, JaggedTensor], item: str, category: str) -> torch.Tensor:
    """``[N, 2D]``: the looked-up item embeddings of key ``item`` next to the category
    embeddings of key ``category`` (a behavior, or the candidate, is its item and category)."""
    return torch.cat([embeddings[item].values(), embeddings[category].values()], dim=1)


def lookup_behaviors(
    lookup: EmbeddingCollection,
    features: KeyedJaggedTensor,
    long: Tuple[torch.Tensor, torch.Tensor],
    short: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of the candidate and of two history selections (item and category concatenated).

    Args:
        lookup (EmbeddingCollection): the (sharded) collection with ``LOOKUP_KEYS``.
        features (KeyedJaggedTensor): the batch's features.
        long (Tuple[Tensor, Tensor]): ``(indices, lengths)`` of the long-term selection.
        short (Optional[Tuple[Tensor, Tensor]]): the short-term selection; ``None`` for none.

    Returns:
        ``(target [B, 2D], long [M, 2D], long_offsets [B + 1], short [S, 2D],
        short_offsets [B + 1])``.
    """
    long_indices, long_lengths = long
    short_indices, short_lengths = short if short is not None else (None, None)
    kjt = selection_features(features, long_indices, long_lengths, short_indices, short_lengths)
    embeddings = lookup(kjt)  # one all-to-all for everything this module reads
    return (
        behavior_rows(embeddings, TARGET_ITEM, TARGET_CATEGORY),
        behavior_rows(embeddings, HIST_ITEM, HIST_CATEGORY),
        jagged.lengths_to_offsets(embeddings[HIST_ITEM].lengths()),
        behavior_rows(embeddings, SHORT_ITEM, SHORT_CATEGORY),
        jagged.lengths_to_offsets(embeddings[SHORT_ITEM].lengths()),
    )
