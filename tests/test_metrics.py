"""GAUC, log loss and CTRMetrics against per-user loops, torch's BCE and hand-computed values."""

import math
from typing import List

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torchmetrics.functional.classification import binary_auroc

from torchrec_longseq.metrics import GAUC, CTRMetrics, LogLoss, grouped_auc


def loop_gauc(groups: List[int], preds: List[float], labels: List[int]) -> float:
    """Per-user torchmetrics AUC, weighted by the user's impressions; one-class users skipped."""
    total, weight = 0.0, 0
    for user in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == user]
        y = [labels[i] for i in idx]
        if len(set(y)) < 2:
            continue
        auc = binary_auroc(torch.tensor([preds[i] for i in idx], dtype=torch.float64),
                           torch.tensor(y), thresholds=None)
        total += float(auc) * len(idx)
        weight += len(idx)
    return total / weight if weight else math.nan


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------- GAUC


def test_grouped_auc_hand_computed() -> None:
    # user 7: preds 0.9(+) 0.1(-) 0.5(+)         -> both positives above the negative: AUC 1
    # user 3: preds 0.6(+) 0.6(-)                -> a tie counts one half: AUC 0.5
    # user 5: a single impression, one class     -> skipped
    # user 9: preds 0.2(+) 0.8(-) 0.4(-) 0.2(-)   -> 0.2 vs 0.8: 0, vs 0.4: 0, vs 0.2: 0.5 -> 1/6
    groups = torch.tensor([7, 3, 7, 5, 9, 3, 9, 7, 9, 9])
    preds = torch.tensor([0.9, 0.6, 0.1, 0.3, 0.2, 0.6, 0.8, 0.5, 0.4, 0.2])
    labels = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 0, 0])
    expected = (1.0 * 3 + 0.5 * 2 + (1 / 6) * 4) / (3 + 2 + 4)
    assert math.isclose(float(grouped_auc(groups, preds, labels)), expected, rel_tol=1e-12)


def test_grouped_auc_no_valid_group_is_nan() -> None:
    assert math.isnan(float(grouped_auc(torch.tensor([1, 1, 2]), torch.tensor([0.1, 0.2, 0.3]),
                                        torch.tensor([1, 1, 0]))))
    assert math.isnan(float(grouped_auc(torch.zeros(0, dtype=torch.long), torch.zeros(0),
                                        torch.zeros(0))))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(
            st.integers(-3, 6),  # group id (negative ids too)
            st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) | st.floats(0, 1, width=32),  # many ties
            st.integers(0, 1),
        ),
        min_size=1,
        max_size=40,
    ),
    float_labels=st.booleans(),
)
def test_grouped_auc_matches_per_user_loop(data: list, float_labels: bool) -> None:
    groups = [d[0] for d in data]
    preds = [d[1] for d in data]
    labels = [d[2] for d in data]
    got = float(grouped_auc(torch.tensor(groups), torch.tensor(preds, dtype=torch.float32),
                            torch.tensor(labels, dtype=torch.float32 if float_labels else torch.long)))
    expected = loop_gauc(groups, [float(torch.tensor(p, dtype=torch.float32)) for p in preds], labels)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert math.isclose(got, expected, rel_tol=1e-6)  # torchmetrics returns float32


def test_grouped_auc_single_group_equals_auroc() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.rand(200, generator=g).round(decimals=1)  # heavy ties
    labels = (torch.rand(200, generator=g) < 0.3).long()
    got = grouped_auc(torch.zeros(200, dtype=torch.long), preds, labels)
    torch.testing.assert_close(got.float(), binary_auroc(preds, labels, thresholds=None))


def test_gauc_metric_streams() -> None:
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 20, (300,), generator=g)
    preds = torch.rand(300, generator=g)
    labels = (torch.rand(300, generator=g) < 0.4).long()
    metric = GAUC()
    for chunk in range(3):
        s = slice(100 * chunk, 100 * (chunk + 1))
        metric.update(groups[s], preds[s], labels[s])
    assert math.isclose(float(metric.compute()), loop_gauc(groups.tolist(), preds.tolist(),
                                                           labels.tolist()), rel_tol=1e-6)


# ------------------------------------------------------------------------------------ log loss


@settings(max_examples=30, deadline=None)
@given(chunks=st.lists(st.integers(1, 20), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_logloss_matches_binary_cross_entropy(chunks: List[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = sum(chunks)
    preds = 0.001 + 0.998 * torch.rand(n, generator=g, dtype=torch.float64)
    labels = (torch.rand(n, generator=g) < 0.5).double()
    metric = LogLoss()
    start = 0
    for size in chunks:
        metric.update(preds[start:start + size].float(), labels[start:start + size])
        start += size
    expected = F.binary_cross_entropy(preds.float().double(), labels)
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-9, atol=1e-12)


def test_logloss_is_finite_at_saturated_predictions() -> None:
    metric = LogLoss()
    metric.update(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0]))
    value = float(metric.compute())
    # probabilities are clamped to [1e-7, 1 - 1e-7]: two maximal errors and one ~0
    assert math.isfinite(value)
    assert math.isclose(value, 2 * -math.log(1e-7) / 3, rel_tol=1e-6)


# ---------------------------------------------------------------------------------- CTRMetrics


@pytest.mark.parametrize("split", [False, True])
def test_ctr_metrics_tiny_example(split: bool) -> None:
    # user 1: logits 2(+) 0(-) 1(+) -> AUC 1;  user 2: 1(+) 1(-) -> 0.5;  user 3: one positive
    users = torch.tensor([1, 1, 1, 2, 2, 3])
    logits = torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    metrics = CTRMetrics(torch.device("cpu"))
    if split:
        metrics.update(users[:4], logits[:4], labels[:4])
        metrics.update(users[4:], logits[4:], labels[4:])
    else:
        metrics.update(users, logits, labels)
    got = metrics.compute()
    assert set(got) == {"auc", "gauc", "logloss"}
    # AUC: positives 2, 1, 1, 0.5 vs negatives 0, 1: 4 wins over 0; over 1: 1 win + 2 ties = 2
    assert math.isclose(got["auc"], 6 / 8, rel_tol=1e-6)
    assert math.isclose(got["gauc"], (1.0 * 3 + 0.5 * 2) / 5, rel_tol=1e-6)
    # BCE with logits: softplus(-l) for positives, softplus(l) for negatives
    expected = (softplus(-2) + softplus(-1) + softplus(-1) + softplus(-0.5)
                + softplus(0) + softplus(1)) / 6
    assert math.isclose(got["logloss"], expected, rel_tol=1e-6)
