"""What TWIN's search returns after training on the synthetic data, and what ranks it.

Trains TWIN (``build_model("twin")``, defaults: k = 100, 4 heads) for ``--steps`` steps of 128
samples at max L = ``--max-seq-len`` in one process (Adagrad on the tables, Adam on the rest;
TWIN's tables are rebuilt whole at every forward), then, on 10 test batches, reports:

* the time bias per interval bucket (mean over heads; bucket 0 = under a minute old);
* test AUC and GAUC;
* where the search's selections lie (share within the last 50 behaviors, older than 200), the
  share of relevant behaviors among them and the recall of relevant behaviors;
* the search score split into its content part (``q . k / sqrt(Dh)``, mean over heads) and its
  time-bias part: their spread within a sample, and the content part of relevant against other
  behaviors.

``--zero-bias`` starts the time bias at 0; ``--table-init A`` draws the sequence tables from
U(-A, A) instead of TorchRec's default (+-1/sqrt(rows))::

    .venv/bin/python benchmarks/twin_diagnosis.py --steps 400
"""

import argparse
import statistics
import time

import torch

from torchrec_longseq import jagged
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.metrics import CTRMetrics
from torchrec_longseq.models.longseq_ctr import LongSeqCTRTrain, ModelConfig, build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--zero-bias", action="store_true")
    p.add_argument("--table-init", type=float, default=0.0)
    args = p.parse_args()
    torch.manual_seed(0)
    data = SyntheticConfig(max_seq_len=args.max_seq_len)
    model = build_model("twin", ModelConfig(), data.table_sizes)
    (arch,) = model.sequence_arch.sequences.values()
    search = arch.search_unit
    if args.zero_bias:
        arch.esu.time_embedding.embedding.weight.data.zero_()
    if args.table_init:
        for name, param in model.named_parameters():
            if "sequence_arch.embedding_collection" in name:
                param.data.uniform_(-args.table_init, args.table_init)
    train = LongSeqCTRTrain(model)
    named = list(train.named_parameters())
    tables = [p for n, p in named if ".embeddings." in n or "embedding_bags." in n]
    dense = [p for n, p in named if not (".embeddings." in n or "embedding_bags." in n)]
    optimizers = [torch.optim.Adagrad(tables, lr=0.05), torch.optim.Adam(dense, lr=3e-3)]
    generator = SyntheticGenerator(data)
    start = time.time()
    for step in range(args.steps):
        loss, _ = train(generator.batch("train", step, 128))
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")
    model.eval()
    bias = arch.esu.time_embedding.embedding.weight.detach().mean(1)
    print("time bias per bucket (mean over heads; bucket 0 = under a minute old):")
    print(" ".join(f"{b:+.2f}" for b in bias.tolist()))
    metrics = CTRMetrics(torch.device("cpu"))
    recent = old = selected = hits = relevant_all = 0
    content_sd, bias_sd, content_rel, content_other = [], [], [], []
    with torch.no_grad():
        for i in range(10):
            batch = generator.batch("test", i, 128)
            f = batch.features
            logits, _ = model(f, batch.history_time, batch.request_time)
            metrics.update(batch.user_ids, logits, batch.labels)
            indices, lengths, _ = search.search(f, batch.history_time, batch.request_time)
            offsets = f["hist_item"].offsets()
            seg = jagged.segment_ids(jagged.lengths_to_offsets(lengths), indices.numel())
            from_end = offsets[1:][seg] - 1 - indices
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
    result = metrics.compute()
    print(f"test AUC {result['auc']:.4f}, GAUC {result['gauc']:.4f}")
    print(f"selected {selected}: {recent / selected:.1%} within the last 50 behaviors, "
          f"{old / selected:.1%} older than 200; relevant among them {hits / selected:.2%}; "
          f"recall of relevant behaviors {hits / max(relevant_all, 1):.1%}")
    print(f"spread within a sample (std): content part {statistics.mean(content_sd):.3f}, "
          f"time-bias part {statistics.mean(bias_sd):.3f}; content part of relevant behaviors "
          f"{statistics.mean(content_rel):+.3f}, of the others {statistics.mean(content_other):+.3f}")


if __name__ == "__main__":
    main()
