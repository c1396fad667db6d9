"""General search units (GSU): pick at most k behaviors per sample from a jagged history."""

from torchrec_longseq.retrieval.hard import hard_search
from torchrec_longseq.retrieval.simhash import (
    hamming_distance,
    popcount64,
    SimHash,
    simhash_signatures,
    simhash_topk,
)
from torchrec_longseq.retrieval.topk import jagged_topk

__all__ = [
    "hamming_distance",
    "hard_search",
    "jagged_topk",
    "popcount64",
    "SimHash",
    "simhash_signatures",
    "simhash_topk",
]
