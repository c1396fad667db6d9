"""``cooccurrence_loss`` against a hand-computed value and a Python-loop reference (hypothesis,
lengths including 0, repeated requests), and its gradient where nothing or one row is kept."""

import math
from typing import List

import helpers
import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_longseq import jagged
from torchrec_longseq.data.batch import HIST_CATEGORY, HIST_ITEM
from torchrec_longseq.models.longseq_ctr import LongSeqCTRTrain
from torchrec_longseq.modules.cooccurrence import cooccurrence_loss


def offsets_of(lengths: List[int]) -> torch.Tensor:
    return torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))])


def reference(rows: torch.Tensor, lengths: List[int], requests: List[int], temperature: float,
              max_rows: int) -> float:
    """The docstring's formula with loops: the first sample of each request, rows in order, at
    most ``max_rows``; every row with another row of its window an anchor."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    kept = []  # (row, sample)
    for b, key in enumerate(requests):
        if key not in requests[:b]:
            kept += [(starts[b] + i, b) for i in range(lengths[b])]
    kept = kept[:max_rows]
    losses = []
    for a, (row_a, sample_a) in enumerate(kept):
        others = [(k, row) for k, (row, _) in enumerate(kept) if k != a]
        positives = [row for k, (row, sample) in enumerate(kept) if k != a and sample == sample_a]
        if not positives:
            continue
        logits = {row: temperature * float(rows[row_a].double() @ rows[row].double())
                  for _, row in others}
        norm = math.log(sum(math.exp(v) for v in logits.values()))
        losses.append(-sum(logits[p] - norm for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def test_by_hand() -> None:
    """Rows 1, 2 (sample 0) and 3 (sample 1), D = 1, temperature 1: the anchors are rows 0 and 1,
    ``-(2 - log(e^2 + e^3) + 2 - log(e^2 + e^6)) / 2``; row 2 has no positive."""
    rows = torch.tensor([[1.0], [2.0], [3.0]])
    got = cooccurrence_loss(rows, offsets_of([2, 1]), torch.tensor([5, 6]), temperature=1.0)
    expected = -(2 - math.log(math.exp(2) + math.exp(3))
                 + 2 - math.log(math.exp(2) + math.exp(6))) / 2
    assert abs(float(got) - expected) < 1e-6


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 5), min_size=0, max_size=6),
       keys=st.lists(st.integers(0, 3), min_size=6, max_size=6),
       max_rows=st.integers(1, 30), seed=st.integers(0, 100))
def test_against_loops(lengths: List[int], keys: List[int], max_rows: int, seed: int) -> None:
    """Random windows (lengths 0 included), requests that repeat (their copies are dropped) and
    a row cap, against ``reference``."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(sum(lengths), 3, generator=generator)
    requests = keys[:len(lengths)]
    got = cooccurrence_loss(rows, offsets_of(lengths), torch.tensor(requests, dtype=torch.long),
                            temperature=2.0, max_rows=max_rows)
    assert abs(float(got) - reference(rows, lengths, requests, 2.0, max_rows)) < 1e-4


def test_copies_of_a_request_change_nothing() -> None:
    """A batch whose requests each come with three copies (a request's candidates) gives the
    loss of the batch of distinct requests."""
    rows = torch.randn(9, 4)
    once = cooccurrence_loss(rows, offsets_of([4, 5]), torch.tensor([10, 20]))
    copies = torch.cat([rows[:4]] * 3 + [rows[4:]] * 3)
    thrice = cooccurrence_loss(copies, offsets_of([4] * 3 + [5] * 3),
                               torch.tensor([10] * 3 + [20] * 3))
    assert torch.allclose(once, thrice)


def test_nothing_to_contrast_is_zero_with_zero_gradient() -> None:
    """No sample, windows of one row, and one kept row: the loss is 0 and its gradient 0, no
    NaN (a row is never its own negative)."""
    for lengths, requests, max_rows in [([], [], 10), ([1, 1, 0], [1, 2, 3], 10), ([3], [1], 1)]:
        rows = torch.randn(sum(lengths), 2, requires_grad=True)
        loss = cooccurrence_loss(rows, offsets_of(lengths),
                                 torch.tensor(requests, dtype=torch.long), max_rows=max_rows)
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert rows.grad is not None and torch.equal(rows.grad, torch.zeros_like(rows))


def test_gradient_pulls_a_window_together() -> None:
    """One step of gradient descent raises the dot product of two rows of one window and lowers
    it against the other request's row."""
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], requires_grad=True)
    cooccurrence_loss(rows, offsets_of([2, 1]), torch.tensor([0, 1]), temperature=1.0).backward()
    moved, rows = (rows - 0.1 * rows.grad).detach(), rows.detach()
    assert float(moved[0] @ moved[1]) > float(rows[0] @ rows[1])
    assert float(moved[0] @ moved[2]) < float(rows[0] @ rows[2])


@pytest.mark.parametrize("name", ["eta", "twin", "sdim", "sim-soft"])
def test_training_loss_adds_the_weighted_window_loss(name: str, monkeypatch) -> None:
    """``ModelConfig(cooccurrence=w)``: the training loss is the plain one plus ``w`` times the
    loss of the last ``WINDOW`` behaviors' rows ([item; category], looked up here in the
    unsharded EmbeddingCollection), keyed by request time; evaluation adds nothing.
    ``SequenceArch.cooccurrence_losses`` (pretraining) gives the same loss and gradient with
    no search and no attention."""
    batch = helpers.make_batch(0)
    plain = LongSeqCTRTrain(helpers.build_small_model(name))
    weighted = LongSeqCTRTrain(helpers.build_small_model(name, cooccurrence=0.5))
    weighted.load_state_dict(plain.state_dict())
    ec = plain.model.embedding_collection
    index, kept = jagged.last_n(batch.features[HIST_ITEM].offsets(), helpers.WINDOW)
    rows = torch.cat([ec.embeddings[table].weight[batch.features[key].values()[index]]
                      for table, key in (("item", HIST_ITEM), ("category", HIST_CATEGORY))], 1)
    window = cooccurrence_loss(rows, jagged.lengths_to_offsets(kept), batch.request_time)
    assert float(window.detach()) > 0
    assert torch.allclose(weighted(batch)[0], plain(batch)[0] + 0.5 * window, atol=1e-6)
    table = ec.embeddings["item"].weight
    expected = torch.autograd.grad(0.5 * window, table)[0]
    arch = weighted.model.sequence_arch
    sequence = arch.sequences["history"]
    monkeypatch.setattr(sequence, "search", None)  # would raise if called
    monkeypatch.setattr(sequence, "attend", None)
    losses = arch.cooccurrence_losses(batch.features, batch.history_time, batch.request_time)
    assert len(losses) == 1
    torch.testing.assert_close(losses[0], 0.5 * window)
    got = torch.autograd.grad(losses[0], weighted.model.embedding_collection.embeddings["item"]
                              .weight)[0]
    torch.testing.assert_close(got, expected)
    assert expected.abs().sum() > 0
    weighted.eval()
    plain.eval()
    monkeypatch.undo()
    assert torch.equal(weighted(batch)[0], plain(batch)[0])


def test_negative_weight_and_no_window_are_refused() -> None:
    """A negative weight at build time; a training forward (or the losses alone) of a model
    without a short-term window (DIN, or ``short_window=0``) instead of a loss that is silently
    never added; the losses alone without a weight."""
    with pytest.raises(ValueError, match="cooccurrence must be a weight >= 0, got -1"):
        helpers.build_small_model("eta", cooccurrence=-1.0)
    for name, overrides in [("din", {}), ("eta", {"short_window": 0})]:
        model = LongSeqCTRTrain(helpers.build_small_model(name, cooccurrence=1.0, **overrides))
        batch = helpers.make_batch(0)
        with pytest.raises(ValueError, match="no sequence of \\['history'\\] has a short-term"):
            model(batch)
        with pytest.raises(ValueError, match="no sequence of \\['history'\\] has a short-term"):
            model.model.sequence_arch.cooccurrence_losses(batch.features, batch.history_time,
                                                          batch.request_time)
    arch = helpers.build_small_model("eta").sequence_arch
    with pytest.raises(ValueError, match="needs a co-occurrence weight > 0"):
        arch.cooccurrence_losses(batch.features, batch.history_time, batch.request_time)
