"""Data: the batch layout every model consumes, and the synthetic lifelong sequences."""

from torchrec_longseq.data.batch import Batch, FEATURE_KEYS
from torchrec_longseq.data.synthetic import (
    SyntheticConfig,
    SyntheticGenerator,
    SyntheticLifelongSequences,
)

__all__ = ["Batch", "FEATURE_KEYS", "SyntheticConfig", "SyntheticGenerator", "SyntheticLifelongSequences"]
