"""Looking up the candidate and a selection of its history in one EmbeddingCollection call.

This is where "retrieve, then look up" happens: a sequence module first picks positions in the
history from ids alone (a search), then only the picked ids (and the candidate) go through the
(sharded) EmbeddingCollection, so lookup and all-to-all volume grow with the selection, not with L.
"""

from typing import Optional, Tuple

import torch
from torchrec import EmbeddingCollection, KeyedJaggedTensor

from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM, TARGET_CATEGORY, TARGET_ITEM
from torchrec_longseq import jagged

BEHAVIOR_KEYS = [TARGET_ITEM, TARGET_CATEGORY, HIST_ITEM, HIST_CATEGORY]


@torch.fx.wrap
def behavior_features(
    features: KeyedJaggedTensor, indices: Optional[torch.Tensor], lengths: Optional[torch.Tensor]
) -> KeyedJaggedTensor:
    """The KJT sent to the EmbeddingCollection: the candidate plus the selected behaviors.

    ``indices [M]`` are positions into the history values and ``lengths [B]`` their count per
    sample (as returned by every search); ``None`` keeps the whole history.
    """
    target_item = features[TARGET_ITEM]
    target_category = features[TARGET_CATEGORY]
    hist_item = features[HIST_ITEM]
    hist_category = features[HIST_CATEGORY]
    items, categories = hist_item.values(), hist_category.values()
    if indices is None or lengths is None:
        lengths = hist_item.lengths()
    else:
        items, categories = items[indices], categories[indices]
    return KeyedJaggedTensor(
        keys=BEHAVIOR_KEYS,
        values=torch.cat([target_item.values(), target_category.values(), items, categories]),
        lengths=torch.cat(
            [target_item.lengths(), target_category.lengths(), lengths, lengths]
        ).int(),
    )


def lookup_behaviors(
    lookup: EmbeddingCollection,
    features: KeyedJaggedTensor,
    indices: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings of the candidate and of the selected behaviors (item and category concatenated).

    Returns ``(target [B, 2D], behaviors [M, 2D], offsets [B + 1])``.
    """
    embeddings = lookup(behavior_features(features, indices, lengths))  # one all-to-all
    target = torch.cat(
        [embeddings[TARGET_ITEM].values(), embeddings[TARGET_CATEGORY].values()], dim=1
    )
    hist = embeddings[HIST_ITEM]
    behaviors = torch.cat([hist.values(), embeddings[HIST_CATEGORY].values()], dim=1)
    return target, behaviors, jagged.lengths_to_offsets(hist.lengths())
