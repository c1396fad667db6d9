"""What the synthetic data lets a model learn: an idealised counting scorer against the oracle.

The scorer is built to the category regime's label: it counts the candidate's matches among the
behaviors older than the recent window, ``c = sum_{old j} sigmoid(a s_j + b - 3)`` with a learned
slope ``a`` (starting at 1) and offset ``b`` (at 0), and scores ``MLP([e_t, log(1 + c)])``. Only
the match score ``s_j`` changes between variants:

* ``raw``: ``temperature * e_t . e_j``, the plain dot product of the looked-up embeddings (an
  id matches itself: ETA's SimHash and SDIM's hashing rank by it);
* ``tied``: ``temperature * (W_q e_t) . (W_k e_j) / sqrt(8)`` with ``W_k`` starting equal to
  ``W_q`` (``W_q^T W_k`` starts positive semi-definite, so an id still matches itself);
* ``projected``: the same with ``W_q`` and ``W_k`` drawn apart, as the ESU's and TWIN's
  attention start (a random bilinear form: no id matches itself more than any other).

``e = [item; category]`` (16 each) starts at U(-init, init) (TorchRec's default for 2,000 items
is +-0.022). Adagrad 0.05 on the tables and Adam 3e-3 on the rest, batches of 128 at
``max_seq_len`` 1,000, as ``train.py``'s defaults; AUC and GAUC on 40 test batches (5,120
samples) next to the oracle's::

    .venv/bin/python benchmarks/counting_probe.py --regime category --steps 2000 \\
        --variants raw:10:0.022 projected:10:0.022 tied:10:0.3

Each variant is ``match:temperature:init``. docs/fidelity.md reads the results.
"""

import argparse
import time
from typing import Tuple

import torch
from torch import nn

from torchrec_longseq import jagged
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.batch import Batch
from torchrec_longseq.data.synthetic import REGIMES
from torchrec_longseq.metrics import grouped_auc


class CountingScorer(nn.Module):
    """``MLP([e_t, log(1 + sum_{old j} sigmoid(a s_j + b - 3))])`` (see the module's
    docstring)."""

    def __init__(self, data: SyntheticConfig, match: str, temperature: float, init: float,
                 dim: int = 16) -> None:
        super().__init__()
        self.match, self.temperature, self.window = match, temperature, data.recent_window
        self.item = nn.Embedding(data.num_items, dim)
        self.category = nn.Embedding(data.num_categories, dim)
        for table in (self.item, self.category):
            nn.init.uniform_(table.weight, -init, init)
        self.q = nn.Linear(2 * dim, 32, bias=False)
        self.k = nn.Linear(2 * dim, 32, bias=False)
        if match == "tied":
            self.k.weight.data.copy_(self.q.weight.data)
        self.slope = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(()))
        self.head = nn.Sequential(nn.Linear(2 * dim + 1, 64), nn.ReLU(), nn.Linear(64, 1))

    def tables(self) -> Tuple[nn.Parameter, nn.Parameter]:
        return self.item.weight, self.category.weight

    def forward(self, batch: Batch) -> torch.Tensor:
        """``[B]`` logits."""
        f = batch.features
        offsets = f["hist_item"].offsets()
        n = f["hist_item"].values().numel()
        seg = jagged.segment_ids(offsets, n)
        old = (offsets[1:][seg] - 1 - torch.arange(n)) >= self.window
        target = torch.cat([self.item(f["target_item"].values()),
                            self.category(f["target_category"].values())], dim=1)  # [B, 2d]
        history = torch.cat([self.item(f["hist_item"].values()),
                             self.category(f["hist_category"].values())], dim=1)  # [N, 2d]
        if self.match == "raw":
            score = (target[seg] * history).sum(1)
        else:
            score = (self.q(target)[seg] * self.k(history)).sum(1) / 8 ** 0.5
        hits = torch.sigmoid(self.slope * self.temperature * score + self.offset - 3) * old
        count = jagged.segment_sum(hits.unsqueeze(1), seg, target.size(0))  # [B, 1]
        return self.head(torch.cat([target, torch.log1p(count)], dim=1)).squeeze(1)


def probe(data: SyntheticConfig, variant: str, steps: int) -> Tuple[float, float]:
    """Train one ``match:temperature:init`` variant; returns its test ``(AUC, GAUC)``."""
    match, temperature, init = variant.split(":")
    if match not in ("raw", "tied", "projected"):
        raise ValueError(f"match must be raw, tied or projected, got {match!r}")
    torch.manual_seed(0)
    model = CountingScorer(data, match, float(temperature), float(init))
    tables = list(model.tables())
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    optimizers = [torch.optim.Adagrad(tables, lr=0.05), torch.optim.Adam(dense, lr=3e-3)]
    generator = SyntheticGenerator(data)
    for step in range(steps):
        batch = generator.batch("train", step, 128)
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return scores(data, model)


@torch.no_grad()
def scores(data: SyntheticConfig, model=None) -> Tuple[float, float]:
    """Test ``(AUC, GAUC)`` of ``model`` (``None``: the oracle) on 40 test batches of 128."""
    generator = SyntheticGenerator(data)
    users, logits, labels = [], [], []
    for index in range(40):
        batch, oracle = generator.batch_with_oracle("test", index, 128)
        users.append(batch.user_ids)
        logits.append(oracle if model is None else model(batch).double())
        labels.append(batch.labels)
    u, s, y = torch.cat(users), torch.cat(logits), torch.cat(labels)
    return float(grouped_auc(torch.zeros_like(u), s, y)), float(grouped_auc(u, s, y))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--regime", default="category", choices=list(REGIMES))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--variants", nargs="+",
                   default=["raw:10:0.022", "raw:1:0.3", "tied:10:0.3", "projected:10:0.3"])
    args = p.parse_args()
    data = SyntheticConfig(max_seq_len=args.max_seq_len, regime=args.regime)
    auc, gauc = scores(data)
    print("| regime | scorer | steps | test AUC | test GAUC | seconds |\n|---|---|---|---|---|---|")
    print(f"| {args.regime} | oracle | | {auc:.4f} | {gauc:.4f} | |", flush=True)
    for variant in args.variants:
        start = time.time()
        auc, gauc = probe(data, variant, args.steps)
        print(f"| {args.regime} | {variant} | {args.steps} | {auc:.4f} | {gauc:.4f} | "
              f"{time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
