"""Scaffolding shared by the data, model and module tests.

The small synthetic world (``DATA``, batches of ``B``), a small ``ModelConfig`` and model builder,
per-sample views of jagged values, batches with hand-written or cut histories, and hooks and
checks on what reaches an EmbeddingCollection. Test modules import it as ``helpers``:
``tests/conftest.py`` puts ``tests/`` on ``sys.path``.
"""

from typing import List, Optional, Set

import pytest
import torch
from torchrec import KeyedJaggedTensor

from torchrec_longseq.data.batch import (
    FEATURE_KEYS,
    HIST_CATEGORY,
    HIST_ITEM,
    TARGET_CATEGORY,
    TARGET_ITEM,
    Batch,
)
from torchrec_longseq.data.synthetic import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.validation import check_batch
from torchrec_longseq.models.longseq_ctr import LongSeqCTR, ModelConfig, build_model
from torchrec_longseq.retrieval import extension

# tests of the compiled operators themselves: skipped where no C++ compiler is found (the
# fallback run of .ci/run hides it); where one is, a failing build fails them
needs_compiler = pytest.mark.skipif(extension.compiler() is None,
                                    reason="no C++ compiler: the compiled operators are not built")

DATA = SyntheticConfig(max_seq_len=64, num_users=1000, num_items=1000, num_categories=10,
                       subclusters=10)
TABLES = DATA.table_sizes
B = 16  # samples per batch
D = 8  # embedding_dim of the small models
WINDOW = 3  # short-term window of the small models


# ----------------------------------------------------------------------------- models and batches

def model_config(**overrides) -> ModelConfig:
    """A small ``ModelConfig`` (``D``-dim embeddings, over-arch [16, 8], attention MLP [8],
    short window ``WINDOW``); ``overrides`` replace or add fields."""
    kwargs = dict(embedding_dim=D, over_arch_layers=[16, 8], attention_hidden=[8],
                  short_window=WINDOW)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def build_small_model(name: str, seed: int = 0, data: SyntheticConfig = DATA,
                      refresh: bool = True, **overrides) -> LongSeqCTR:
    """``build_model(name, model_config(**overrides), data.table_sizes)`` after
    ``torch.manual_seed(seed)``; with ``refresh``, derived tables (ETA's signatures, SDIM's codes,
    TWIN's projections) are then built from the initial embeddings (a no-op for other models)."""
    torch.manual_seed(seed)
    model = build_model(name, model_config(**overrides), data.table_sizes)
    if refresh:
        model.refresh_derived_tables()
    return model


def make_batch(index: int = 0, data: SyntheticConfig = DATA, batch_size: int = B) -> Batch:
    return SyntheticGenerator(data).batch("train", index, batch_size)


def run(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits; the model must have no auxiliary output."""
    logits, aux = model(batch.features, batch.history_time, batch.request_time)
    assert aux == []
    return logits


# ----------------------------------------------------------------------------- per-sample values

def per_sample(values: torch.Tensor, lengths: torch.Tensor) -> List[List[int]]:
    out, start = [], 0
    for n in lengths.tolist():
        out.append(values[start:start + n].tolist())
        start += n
    return out


# ----------------------------------------------------------------------------- hand-made batches

def make_features(hist_items: List[List[int]], hist_cats: List[List[int]],
                  target_items: List[int], target_cats: List[int]) -> KeyedJaggedTensor:
    """A batch's KJT (layout of ``data.batch``) from per-sample Python lists."""
    b = len(target_items)
    columns = {
        "user_id": [[0]] * b,
        "context_hour": [[0]] * b,
        TARGET_ITEM: [[t] for t in target_items],
        TARGET_CATEGORY: [[c] for c in target_cats],
        HIST_ITEM: hist_items,
        HIST_CATEGORY: hist_cats,
    }
    values = [v for key in FEATURE_KEYS for sample in columns[key] for v in sample]
    lengths = [len(sample) for key in FEATURE_KEYS for sample in columns[key]]
    return KeyedJaggedTensor(keys=FEATURE_KEYS, values=torch.tensor(values, dtype=torch.long),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def with_histories(batch: Batch, keep: List[int],
                   categories: Optional[List[List[int]]] = None) -> Batch:
    """``batch`` with sample b's history cut to its last ``keep[b]`` behaviors (0: empty) and,
    if given, the history categories replaced by ``categories`` (``keep[b]`` for sample b).
    Users, hours and candidates are kept; the result passes ``check_batch``."""
    features = batch.features.to_dict()
    offsets = features[HIST_ITEM].offsets()
    positions = [p for b, k in enumerate(keep)
                 for p in range(int(offsets[b + 1]) - k, int(offsets[b + 1]))]
    index = torch.tensor(positions, dtype=torch.long)
    new_lengths = torch.tensor(keep, dtype=torch.int32)
    assert (new_lengths <= features[HIST_ITEM].lengths()).all()
    values, lengths = [], []
    for key in FEATURE_KEYS:
        jt = features[key]
        if key == HIST_CATEGORY and categories is not None:
            assert [len(c) for c in categories] == list(keep)
            values.append(torch.tensor([c for cats in categories for c in cats],
                                       dtype=jt.values().dtype))
            lengths.append(new_lengths)
        elif key in (HIST_ITEM, HIST_CATEGORY):
            values.append(jt.values()[index])
            lengths.append(new_lengths)
        else:
            values.append(jt.values())
            lengths.append(jt.lengths().int())
    out = Batch(features=KeyedJaggedTensor(keys=FEATURE_KEYS, values=torch.cat(values),
                                           lengths=torch.cat(lengths)),
                history_time=batch.history_time[index], request_time=batch.request_time,
                labels=batch.labels, relevant=batch.relevant[index])
    check_batch(out, TABLES)
    return out


def sequence_of(model: LongSeqCTR):
    """The one sequence module of a model built by ``build_model``."""
    (module,) = model.sequence_arch.sequences.values()
    return module


def gsu_search(model: LongSeqCTR, batch: Batch):
    """``(indices, lengths)`` of the model's GSU (``search_unit``) on ids only, no lookup; the
    search has no auxiliary logit."""
    indices, lengths, aux = sequence_of(model).search_unit.search(
        batch.features, batch.history_time, batch.request_time)
    assert aux is None
    return indices, lengths


# ----------------------------------------------------------------------------- lookups, gradients

def capture(module: torch.nn.Module) -> List[KeyedJaggedTensor]:
    """The KJTs ``module`` (an EmbeddingCollection) is called with, appended call by call, each
    ``fold``-ed to one sample per batch sample."""
    seen: List[KeyedJaggedTensor] = []
    module.register_forward_pre_hook(lambda mod, args: seen.append(fold(args[0])))
    return seen


def fold(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``SequenceArch``'s lookup KJT has ``P x B`` samples (block ``p`` of B holds part ``p`` of
    every sample: a module's long selection, then its short window); this gives it B samples,
    sample b's values its blocks' values in block order. B is read from a candidate key (one id
    per sample in block 0): the first key named ``target_*`` or ``cand_*``."""
    keys = kjt.keys()
    candidate = next(k for k in keys if k.startswith(("target_", "cand_")))
    b = int(kjt[candidate].lengths().sum())
    stride = kjt.lengths().numel() // len(keys)
    if b == 0 or stride == b:
        return kjt
    values, lengths = [], []
    for key in keys:
        per = per_sample(kjt[key].values(), kjt[key].lengths())
        samples = [sum((per[p * b + i] for p in range(stride // b)), []) for i in range(b)]
        values += [v for sample in samples for v in sample]
        lengths += [len(sample) for sample in samples]
    return KeyedJaggedTensor(keys=keys, values=torch.tensor(values, dtype=torch.long),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def nonzero_rows(grad: Optional[torch.Tensor]) -> Set[int]:
    """Rows of a table's gradient that are not all zero (none for a missing gradient)."""
    if grad is None:
        return set()
    return set(grad.abs().sum(1).nonzero().flatten().tolist())
