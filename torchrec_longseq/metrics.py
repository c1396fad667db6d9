"""Evaluation metrics, synced across ranks by torchmetrics: AUC, log loss and GAUC."""

from typing import Dict

import torch
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.utilities.data import dim_zero_cat


def grouped_auc(groups: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """GAUC: the AUC of each group, weighted by the group's number of impressions.

    Groups with only positives or only negatives have no AUC and are left out (as in the DIN
    paper's GAUC). Ties in ``preds`` count one half. Vectorised: one sort, no loop over groups.

    Args:
        groups (Tensor): ``[N]`` group id (the user) of each impression.
        preds (Tensor): ``[N]`` scores.
        labels (Tensor): ``[N]`` 0/1 labels.

    Returns:
        A scalar; NaN when no group has both labels.
    """
    labels = labels.long()
    _, group = torch.unique(groups, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    # rank of each prediction within its group (average rank for ties): sort by (group, pred)
    order = torch.argsort(preds, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g, p = group[order], preds[order]
    new_run = torch.ones_like(g, dtype=torch.bool)
    new_run[1:] = (g[1:] != g[:-1]) | (p[1:] != p[:-1])
    run = torch.cumsum(new_run.long(), 0) - 1
    position = torch.arange(g.numel(), dtype=torch.float64, device=g.device)
    run_first = position.new_zeros(int(run.max()) + 1 if run.numel() else 0)
    run_first = run_first.scatter_reduce(0, run, position, reduce="amin", include_self=False)
    run_last = torch.zeros_like(run_first).scatter_reduce(0, run, position, reduce="amax", include_self=False)
    group_start = position.new_zeros(num_groups).scatter_reduce(
        0, g, position, reduce="amin", include_self=False)
    rank = (run_first[run] + run_last[run]) / 2 - group_start[g] + 1  # 1-based, within group
    y = labels[order].double()
    pos = position.new_zeros(num_groups).index_add(0, g, y)
    count = position.new_zeros(num_groups).index_add(0, g, torch.ones_like(y))
    neg = count - pos
    rank_sum = position.new_zeros(num_groups).index_add(0, g, rank * y)
    valid = (pos > 0) & (neg > 0)
    auc = (rank_sum - pos * (pos + 1) / 2) / (pos * neg).clamp(min=1)
    return (auc * count)[valid].sum() / count[valid].sum()


class GAUC(Metric):
    """Streaming GAUC (see ``grouped_auc``); keeps (group, pred, label) of every impression."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, groups: torch.Tensor, preds: torch.Tensor, labels: torch.Tensor) -> None:
        self.groups.append(groups)
        self.preds.append(preds)
        self.labels.append(labels)

    def compute(self) -> torch.Tensor:
        return grouped_auc(dim_zero_cat(self.groups), dim_zero_cat(self.preds), dim_zero_cat(self.labels))


class LogLoss(Metric):
    """Mean binary cross-entropy of probabilities ``preds`` against ``labels``."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        p = preds.double().clamp(1e-7, 1 - 1e-7)
        y = labels.double()
        self.total += -(y * p.log() + (1 - y) * (1 - p).log()).sum()
        self.count += labels.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class CTRMetrics:
    """AUC, GAUC (grouped by user) and log loss, each synced across ranks on ``compute``."""

    def __init__(self, device: torch.device) -> None:
        self.auc = BinaryAUROC().to(device)
        self.gauc = GAUC().to(device)
        self.logloss = LogLoss().to(device)

    def update(self, users: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        preds = torch.sigmoid(logits.float())
        self.auc.update(preds, labels.long())
        self.gauc.update(users, preds, labels)
        self.logloss.update(preds, labels)

    def compute(self) -> Dict[str, float]:
        return {
            "auc": float(self.auc.compute()),
            "gauc": float(self.gauc.compute()),
            "logloss": float(self.logloss.compute()),
        }
