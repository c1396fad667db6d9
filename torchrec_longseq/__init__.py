"""torchrec-longseq: lifelong user-behavior sequences (SIM, ETA, SDIM, TWIN) as TorchRec modules.

What a user's own model needs::

    from torchrec_longseq import Attribute, SequenceSchema, SequenceArch, build_sequence, table_configs
"""

from torchrec_longseq.models.longseq_ctr import ModelConfig, build_sequence
from torchrec_longseq.modules.derived import StaleDerivedTableError
from torchrec_longseq.retrieval.kernels import KERNELS, set_kernel
from torchrec_longseq.modules.sequence import (Looked, Selection, SequenceArch, SequenceModule,
                                               table_configs)
from torchrec_longseq.schema import Attribute, SequenceSchema, default_schema

__all__ = ["Attribute", "Looked", "ModelConfig", "Selection", "SequenceArch", "SequenceModule",
           "SequenceSchema", "StaleDerivedTableError", "build_sequence", "default_schema",
           "KERNELS", "set_kernel", "table_configs"]
