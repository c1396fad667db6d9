"""What TWIN's search returns after training on the synthetic data, and what ranks it.

Trains TWIN (``build_model("twin")``, defaults: k = 100, 4 heads) for ``--steps`` steps of 128
samples at max L = ``--max-seq-len`` in one process on the ``--regime`` data (Adagrad on the
tables, Adam on the rest; TWIN's tables are rebuilt whole at every forward), then, on 10 test
batches, reports:

* the time bias per interval bucket (mean over heads; bucket 0 = under a minute old) and its
  rank correlation with the bucket (-1: falls monotonically with age);
* test AUC and GAUC, next to the oracle's (the generator's true logit) on the same samples;
* where the search's selections lie (share within the last 50 behaviors, older than 200), the
  share of relevant behaviors among them and the recall of relevant behaviors;
* the search score split into its content part (``q . k / sqrt(Dh)``, mean over heads) and its
  time-bias part: their spread within a sample, and the content part of relevant against other
  behaviors;
* what the ESU's softmax drops: the GAUC of the log-sum-exp of the ESU's logits over the
  selected behaviors (the softmax's normaliser: how much attention mass there is before it is
  normalised away) and of the best logit, against the model's own GAUC.

``--bias-init normal`` starts the time bias N(0, 1) (``nn.Embedding``'s default, what TWIN was
built with before issue 24; the default now starts it at 0); ``--table-init A`` draws the
sequence tables from U(-A, A) instead of TorchRec's default (+-1/sqrt(rows))::

    .venv/bin/python benchmarks/twin_diagnosis.py --steps 400 --regime similarity
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from torchrec_longseq import jagged
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.synthetic import REGIMES
from torchrec_longseq.metrics import grouped_auc
from torchrec_longseq.models.longseq_ctr import LongSeqCTR, LongSeqCTRTrain, ModelConfig, build_model
from torchrec_longseq.modules.sequence import Selection


def train_model(name: str, data: SyntheticConfig, steps: int, config: ModelConfig = ModelConfig(),
                setup: Optional[Callable[[LongSeqCTR], None]] = None) -> LongSeqCTR:
    """``build_model(name)`` after ``torch.manual_seed(0)``, ``setup(model)``, then ``steps``
    steps of 128 training samples (Adagrad 0.05 on the tables, Adam 3e-3 on the rest, as
    train.py's defaults); returns the model in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, config, data.table_sizes)
    if setup is not None:
        setup(model)
    train = LongSeqCTRTrain(model)
    named = list(train.named_parameters())
    tables = [p for n, p in named if ".embeddings." in n or "embedding_bags." in n]
    dense = [p for n, p in named if not (".embeddings." in n or "embedding_bags." in n)]
    optimizers = [torch.optim.Adagrad(tables, lr=0.05), torch.optim.Adam(dense, lr=3e-3)]
    generator = SyntheticGenerator(data)
    start = time.time()
    for step in range(steps):
        loss, _ = train(generator.batch("train", step, 128))
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    print(f"trained {name} {steps} steps in {time.time() - start:.0f} s")
    model.eval()
    return model


@torch.no_grad()
def esu_probe(model: LongSeqCTR, arch, batch) -> Tuple[torch.Tensor, Selection, torch.Tensor,
                                                       torch.Tensor]:
    """``(logits [B], selection, best [B], lse [B])`` of a search-then-attend model on a batch:
    its logits, its search's selection, and per sample the highest ESU attention logit over the
    selected behaviors (mean over heads) and their log-sum-exp (the softmax's normaliser); both
    -inf for a sample with nothing selected."""
    f = batch.features
    logits, _ = model(f, batch.history_time, batch.request_time)
    selection = arch.search(f, batch.history_time, batch.request_time)
    looked = model.sequence_arch.look_up(f, batch.history_time, batch.request_time,
                                         {"history": selection})["history"]
    esu_logits = arch.esu.logits(looked.candidates, looked.long, looked.long_offsets,
                                 looked.long_intervals)  # [M], mean over heads
    seg = jagged.segment_ids(looked.long_offsets, esu_logits.numel())
    b = batch.batch_size
    best = torch.full((b,), float("-inf")).scatter_reduce(0, seg, esu_logits, "amax")
    shift = best.clamp(min=-1e30)  # finite for a sample with nothing selected
    lse = shift + torch.log(torch.zeros(b).index_add(0, seg, torch.exp(esu_logits - shift[seg])))
    return logits, selection, best, lse


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation of two ``[n]`` vectors (no ties expected)."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


class Scores:
    """Per-sample scores of the test samples, for AUC / GAUC by name."""

    def __init__(self) -> None:
        self.users: List[torch.Tensor] = []
        self.labels: List[torch.Tensor] = []
        self.values: Dict[str, List[torch.Tensor]] = {}

    def add(self, users: torch.Tensor, labels: torch.Tensor, **scores: torch.Tensor) -> None:
        self.users.append(users)
        self.labels.append(labels)
        for name, value in scores.items():
            self.values.setdefault(name, []).append(value.double())

    def auc(self, name: str, grouped: bool) -> float:
        users, labels = torch.cat(self.users), torch.cat(self.labels)
        groups = users if grouped else torch.zeros_like(users)
        return float(grouped_auc(groups, torch.cat(self.values[name]), labels))

    def report(self, names: List[str]) -> None:
        for name in names:
            print(f"  {name:<48} AUC {self.auc(name, False):.4f}  GAUC {self.auc(name, True):.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--regime", default="category", choices=list(REGIMES))
    p.add_argument("--bias-init", default="zero", choices=["zero", "normal"])
    p.add_argument("--table-init", type=float, default=0.0)
    args = p.parse_args()
    data = SyntheticConfig(max_seq_len=args.max_seq_len, regime=args.regime)

    def setup(model: LongSeqCTR) -> None:
        if args.table_init:
            for name, param in model.named_parameters():
                if "sequence_arch.embedding_collection" in name:
                    param.data.uniform_(-args.table_init, args.table_init)

    model = train_model("twin", data, args.steps, ModelConfig(twin_bias_init=args.bias_init),
                        setup=setup)
    (arch,) = model.sequence_arch.sequences.values()
    search = arch.search_unit
    generator = SyntheticGenerator(data)
    bias = arch.esu.time_embedding.embedding.weight.detach().mean(1)
    print("time bias per bucket (mean over heads; bucket 0 = under a minute old):")
    print(" ".join(f"{b:+.2f}" for b in bias.tolist()))
    print(f"rank correlation of the bias with the bucket: "
          f"{spearman(bias, torch.arange(bias.numel()).double()):+.2f}")
    scores = Scores()
    recent = old = selected = hits = relevant_all = 0
    content_sd, bias_sd, content_rel, content_other = [], [], [], []
    with torch.no_grad():
        for i in range(10):
            batch, oracle = generator.batch_with_oracle("test", i, 128)
            f = batch.features
            logits, selection, best, lse = esu_probe(model, arch, batch)
            scores.add(batch.user_ids, batch.labels, model=logits, oracle=oracle,
                       esu_logsumexp=lse, esu_best_logit=best)

            indices, lengths = selection.long
            offsets = f["hist_item"].offsets()
            sseg = jagged.segment_ids(jagged.lengths_to_offsets(lengths), indices.numel())
            from_end = offsets[1:][sseg] - 1 - indices
            recent += int((from_end < 50).sum())
            old += int((from_end >= 200).sum())
            selected += indices.numel()
            hits += int(batch.relevant[indices].sum())
            relevant_all += int(batch.relevant.sum())
            n = batch.history_time.numel()
            hseg = jagged.segment_ids(offsets, n)
            rows = [r.table for r in search.rows]
            width = rows[0].size(1) // 2
            heads = search.num_heads
            query = search._queries([f["target_item"].values(), f["target_category"].values()])
            keys = (rows[0][f["hist_item"].values(), width:]
                    + rows[1][f["hist_category"].values(), width:])
            content = (query.view(-1, heads, width // heads)[hseg]
                       * keys.view(-1, heads, width // heads)).sum(-1).mean(1) / (
                           width // heads) ** 0.5
            time_bias = search.time_bias(batch.request_time[hseg] - batch.history_time).mean(1)
            for s in range(len(lengths)):
                m = hseg == s
                if int(m.sum()) > 10:
                    content_sd.append(float(content[m].std()))
                    bias_sd.append(float(time_bias[m].std()))
            content_rel.append(float(content[batch.relevant].mean()))
            content_other.append(float(content[~batch.relevant].mean()))
    print(f"selected {selected}: {recent / selected:.1%} within the last 50 behaviors, "
          f"{old / selected:.1%} older than 200; relevant among them {hits / selected:.2%}; "
          f"recall of relevant behaviors {hits / max(relevant_all, 1):.1%}")
    print(f"spread within a sample (std): content part {statistics.mean(content_sd):.3f}, "
          f"time-bias part {statistics.mean(bias_sd):.3f}; content part of relevant behaviors "
          f"{statistics.mean(content_rel):+.3f}, of the others {statistics.mean(content_other):+.3f}")
    print("scores on 1,280 test samples:")
    scores.report(["oracle", "model", "esu_logsumexp", "esu_best_logit"])


if __name__ == "__main__":
    main()
