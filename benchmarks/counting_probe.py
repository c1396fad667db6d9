"""What the synthetic data lets a model learn: an idealised counting scorer against the oracle.

The scorer is built to the category regime's label: it counts the candidate's matches among the
behaviors older than the recent window, ``c = sum_{old j} sigmoid(a s_j + b - 3)`` with a learned
slope ``a`` (starting at 1) and offset ``b`` (at 0), and scores ``MLP([e_t, log(1 + c)])``. Only
the match score ``s_j`` changes between variants:

* ``raw``: ``temperature * e_t . e_j``, the plain dot product of the looked-up embeddings (an
  id matches itself: ETA's SimHash and SDIM's hashing rank by it);
* ``cosine``: ``temperature * (cos(e_t, e_j) - 0.6)``, the cosine less the similarity regime's
  floor (a match is sharp whatever the norms: a random pair counts ~0, a near one ~1);
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

Each variant is ``match:temperature:init``. ``--cooccurrence W`` adds the library's
co-occurrence loss (``modules.cooccurrence``) on the item table; ``--readout`` (similarity
regime) trains the table with that loss alone and reads it with a fixed ``CosineCount``, no
clicks. docs/fidelity.md reads the results.
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
from torchrec_longseq.modules.cooccurrence import cooccurrence_loss


def older_than_window(offsets: torch.Tensor, num_values: int, window: int) -> torch.Tensor:
    """``[N]`` bool: the behaviors older than each sample's last ``window`` (``offsets [B+1]``)."""
    seg = jagged.segment_ids(offsets, num_values)
    return (offsets[1:][seg] - 1 - torch.arange(num_values)) >= window


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
        old = older_than_window(offsets, n, self.window)
        target = torch.cat([self.item(f["target_item"].values()),
                            self.category(f["target_category"].values())], dim=1)  # [B, 2d]
        history = torch.cat([self.item(f["hist_item"].values()),
                             self.category(f["hist_category"].values())], dim=1)  # [N, 2d]
        if self.match == "raw":
            score = (target[seg] * history).sum(1)
        elif self.match == "cosine":
            score = nn.functional.cosine_similarity(target[seg], history, dim=1) - 0.6
        else:
            score = (self.q(target)[seg] * self.k(history)).sum(1) / 8 ** 0.5
        hits = torch.sigmoid(self.slope * self.temperature * score + self.offset - 3) * old
        count = jagged.segment_sum(hits.unsqueeze(1), seg, target.size(0))  # [B, 1]
        return self.head(torch.cat([target, torch.log1p(count)], dim=1)).squeeze(1)


def window_loss(model: CountingScorer, batch: Batch) -> torch.Tensor:
    """The library's co-occurrence loss (``modules.cooccurrence``) over the item rows of each
    sample's last ``window`` behaviors, at the match's temperature."""
    index, kept = jagged.last_n(batch.features["hist_item"].offsets(), model.window)
    rows = model.item(batch.features["hist_item"].values()[index])
    return cooccurrence_loss(rows, jagged.lengths_to_offsets(kept), batch.request_time,
                             temperature=model.temperature)


def train_table(model: CountingScorer, optimizer: torch.optim.Optimizer,
                generator: SyntheticGenerator, indices: range) -> None:
    """Steps of the co-occurrence loss alone on ``model``'s item table, one per training batch
    of ``indices``."""
    for index in indices:
        window_loss(model, generator.batch("train", index, 128)).backward()
        optimizer.step()
        optimizer.zero_grad()


def probe(data: SyntheticConfig, variant: str, steps: int, cooccurrence: float = 0.0,
          pretrain: int = 0, freeze_tables: bool = False,
          table_lr: float = 0.05) -> Tuple[float, float]:
    """Train one ``match:temperature:init`` variant; returns its test ``(AUC, GAUC)``.

    ``pretrain`` steps of the co-occurrence loss alone on the item table come first (on
    training batches of their own); ``freeze_tables`` then trains only the scorer on clicks,
    the category table at 0 (the match reads the item part); otherwise the clicks train the
    tables at ``table_lr`` (Adagrad)."""
    match, temperature, init = variant.split(":")
    if match not in ("raw", "cosine", "tied", "projected"):
        raise ValueError(f"match must be raw, cosine, tied or projected, got {match!r}")
    torch.manual_seed(0)
    model = CountingScorer(data, match, float(temperature), float(init))
    generator = SyntheticGenerator(data)
    tables = list(model.tables())
    item = torch.optim.Adagrad([model.item.weight], lr=0.05)
    train_table(model, item, generator, range(100_000, 100_000 + pretrain))
    dense = [p for p in model.parameters() if all(p is not t for t in tables)]
    optimizers = [torch.optim.Adam(dense, lr=3e-3)]
    if freeze_tables:
        for table in tables:
            table.requires_grad_(False)
        model.category.weight.zero_()
    else:
        optimizers.append(torch.optim.Adagrad(tables, lr=table_lr))
    for step in range(steps):
        batch = generator.batch("train", step, 128)
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        if cooccurrence:
            aux = window_loss(model, batch)
            loss = loss + cooccurrence * aux
            if step % 200 == 0:
                print(f"step {step} cooccurrence loss {float(aux.detach()):.3f}", flush=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return scores(data, model)


class CosineCount:
    """A fixed readout of a table ``[num_items, d]``, the similarity regime's label on the table's
    cosines: ``log(1 + sum_{old j} w(cos(t, j))) - log(1 + prior_t * n_old)``, ``w(c) = relu((c -
    floor) / (1 - floor))^2`` and ``prior_t`` the mean of ``w(cos(t, i))`` over all items. On the
    generator's latents it is the oracle less the ages; on a table it says how much of the label
    the table's geometry holds, with nothing trained on clicks."""

    def __init__(self, table: torch.Tensor, window: int, floor: float = 0.5) -> None:
        self.unit = nn.functional.normalize(table.detach().double(), dim=1)
        self.window, self.floor = window, floor
        self.prior = self.weight(self.unit @ self.unit.T).mean(dim=1)

    def weight(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.clamp((cos - self.floor) / (1 - self.floor), min=0) ** 2

    def __call__(self, batch: Batch) -> torch.Tensor:
        f = batch.features
        offsets, items = f["hist_item"].offsets(), f["hist_item"].values()
        seg = jagged.segment_ids(offsets, items.numel())
        old = older_than_window(offsets, items.numel(), self.window).double()
        t = f["target_item"].values()
        cos = (self.unit[t][seg] * self.unit[items]).sum(1)
        evidence = jagged.segment_sum((self.weight(cos) * old).unsqueeze(1), seg, t.numel())
        n_old = jagged.segment_sum(old.unsqueeze(1), seg, t.numel())
        return (torch.log1p(evidence) - torch.log1p(self.prior[t].unsqueeze(1) * n_old)).squeeze(1)


def neighbour_recall(table: torch.Tensor, neighbours: torch.Tensor) -> float:
    """The share of each item's true ``neighbours`` (``[num_items, m]``, itself first) among its
    ``m - 1`` nearest other items by the table's dot product."""
    e = table.detach().double()
    dots = (e @ e.T).fill_diagonal_(float("-inf"))
    nearest = dots.topk(neighbours.size(1) - 1, dim=1).indices
    return float((nearest[:, :, None] == neighbours[:, None, 1:]).any(-1).double().mean())


def readout(data: SyntheticConfig, steps: int, report_every: int = 500) -> None:
    """Train the item table with the co-occurrence loss alone (no clicks; raw:10:0.022's table
    and optimiser) and print ``CosineCount``'s test AUC / GAUC on it every ``report_every``
    steps, next to the generator's latents'."""
    generator = SyntheticGenerator(data)
    neighbours = torch.from_numpy(generator.neighbours)
    auc, gauc = scores(data, CosineCount(torch.from_numpy(generator.latents), data.recent_window))
    print(f"| latents | | {auc:.4f} | {gauc:.4f} | 1.000 |", flush=True)
    torch.manual_seed(0)
    model = CountingScorer(data, "raw", 10.0, 0.022)
    optimizer = torch.optim.Adagrad([model.item.weight], lr=0.05)
    done = 0
    for step in [*range(0, steps, report_every), steps]:
        train_table(model, optimizer, generator, range(done, step))
        done = step
        auc, gauc = scores(data, CosineCount(model.item.weight, data.recent_window))
        print(f"| table | {step} | {auc:.4f} | {gauc:.4f} | "
              f"{neighbour_recall(model.item.weight, neighbours):.3f} |", flush=True)


@torch.no_grad()
def scores(data: SyntheticConfig, model=None) -> Tuple[float, float]:
    """Test ``(AUC, GAUC)`` of ``model`` (a callable ``batch -> [B]`` scores; ``None``: the
    oracle) on 40 test batches of 128."""
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
    p.add_argument("--cooccurrence", type=float, default=0.0,
                   help="weight of the co-occurrence loss over the recent window's item rows "
                        "(modules.cooccurrence; 0: none)")
    p.add_argument("--pretrain", type=int, default=0,
                   help="steps of the co-occurrence loss alone on the item table first")
    p.add_argument("--freeze-tables", action="store_true",
                   help="then train the scorer on clicks with the tables frozen")
    p.add_argument("--table-lr", type=float, default=0.05,
                   help="Adagrad learning rate of the tables on clicks")
    p.add_argument("--readout", action="store_true",
                   help="similarity regime: train the table with the co-occurrence loss alone "
                        "for --steps and read it with CosineCount instead")
    args = p.parse_args()
    data = SyntheticConfig(max_seq_len=args.max_seq_len, regime=args.regime)
    if args.readout:
        if args.regime != "similarity":
            p.error("--readout reads the similarity regime's label: pass --regime similarity")
        print("| table | co-occurrence steps | test AUC | test GAUC | neighbour recall |\n"
              "|---|---|---|---|---|")
        readout(data, args.steps)
        return
    auc, gauc = scores(data)
    print("| regime | scorer | steps | test AUC | test GAUC | seconds |\n|---|---|---|---|---|---|")
    print(f"| {args.regime} | oracle | | {auc:.4f} | {gauc:.4f} | |", flush=True)
    for variant in args.variants:
        start = time.time()
        auc, gauc = probe(data, variant, args.steps, args.cooccurrence, args.pretrain,
                          args.freeze_tables, args.table_lr)
        print(f"| {args.regime} | {variant} | {args.steps} | {auc:.4f} | {gauc:.4f} | "
              f"{time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
