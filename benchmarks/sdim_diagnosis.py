"""What SDIM's collision buckets hold for a candidate with relevant behaviors, and what survives
the l2-normalised average.

Trains SDIM (``build_model("sdim")``: m = ``--bits`` hash bits in signatures of ``--tau`` bits,
split between the item and the category blocks; short-term DIN over the last 50) for
``--steps`` steps of 128 samples at max L = ``--max-seq-len`` in one process on the ``--regime``
data (``twin_diagnosis.train_model``), then, on 10 test batches, for the samples with at least
one relevant behavior:

* per signature (item block and category block apart): behaviors in the candidate's bucket
  (with multiplicity), relevant ones among them, and the relevant share of the bucket's sum
  (``|R_g| / |S_g|``, the norms of the relevant part and of the whole sum);
* how many of the G signatures a relevant behavior collides in, against any other behavior;
* the long-term vector ``v`` (the mean over signatures of the normalised bucket sums): its
  cosine with the normalised mean of the sample's relevant behaviors, and with the mean of all
  its behaviors older than the recent window (the user's average);
* per-sample scores, AUC and GAUC: the model, the oracle, the number of relevant behaviors,
  ``cos(v, candidate)``, and the same dot product with the bucket sums left unnormalised
  (``mean_g S_g . candidate``), which is what the normalisation drops::

    .venv/bin/python benchmarks/sdim_diagnosis.py --steps 400 --regime similarity
"""

import argparse
import statistics

import torch
from torch import nn

from torchrec_longseq import jagged
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.synthetic import REGIMES
from torchrec_longseq.models.longseq_ctr import ModelConfig

from twin_diagnosis import Scores, train_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--regime", default="category", choices=list(REGIMES))
    p.add_argument("--bits", type=int, default=48)
    p.add_argument("--tau", type=int, default=3)
    args = p.parse_args()
    data = SyntheticConfig(max_seq_len=args.max_seq_len, regime=args.regime)
    model = train_model("sdim", data, args.steps,
                        ModelConfig(sdim_bits=args.bits, sdim_tau=args.tau))
    (sdim,) = model.sequence_arch.sequences.values()
    generator = SyntheticGenerator(data)
    tables = model.embedding_collection.embeddings
    scores = Scores()
    size, rel_in, share = {"item": [], "category": []}, {"item": [], "category": []}, {
        "item": [], "category": []}
    sig_rel, sig_other, cos_rel, cos_avg, recall = [], [], [], [], []
    with torch.no_grad():
        for i in range(10):
            batch, oracle = generator.batch_with_oracle("test", i, 128)
            f = batch.features
            b = batch.batch_size
            logits, _ = model(f, batch.history_time, batch.request_time)
            selection = sdim.search(f, batch.history_time, batch.request_time)
            looked = model.sequence_arch.look_up(f, batch.history_time, batch.request_time,
                                                 {"history": selection})["history"]
            positions, lengths = selection.long
            (weights,) = selection.extra  # [U, G] occurrences if colliding in signature g
            num_groups = weights.size(1)
            half = sdim.groups_per_word if isinstance(sdim.groups_per_word, int) else \
                sdim.groups_per_word[0]
            rows = looked.long  # [U, D]
            useg = jagged.segment_ids(looked.long_offsets, rows.size(0))
            relevant_u = batch.relevant[positions].double()  # the first occurrence is the oldest
            sums = torch.zeros(b, num_groups, rows.size(1)).index_add(
                0, useg, weights.unsqueeze(2) * rows.unsqueeze(1))  # S_g [B, G, D]
            rel_sums = torch.zeros_like(sums).index_add(
                0, useg, (weights * relevant_u.unsqueeze(1).float()).unsqueeze(2) * rows.unsqueeze(1))
            counts = torch.zeros(b, num_groups).index_add(0, useg, weights)
            rel_counts = torch.zeros(b, num_groups).index_add(
                0, useg, weights * relevant_u.unsqueeze(1).float())
            long_term = nn.functional.normalize(sums, dim=-1).mean(1)  # v [B, D]
            candidate = looked.candidates
            # the full history's rows (only for measuring) and its relevant / old means
            offsets = f["hist_item"].offsets()
            hseg = jagged.segment_ids(offsets, batch.history_time.numel())
            full = torch.cat([tables["item"].weight[f["hist_item"].values()],
                              tables["category"].weight[f["hist_category"].values()]], dim=1)
            from_end = offsets[1:][hseg] - 1 - torch.arange(hseg.numel())
            rel = batch.relevant.float().unsqueeze(1)
            rel_mean = torch.zeros(b, full.size(1)).index_add(0, hseg, rel * full)
            old_mean = torch.zeros(b, full.size(1)).index_add(
                0, hseg, (from_end >= data.recent_window).float().unsqueeze(1) * full)
            num_rel = torch.zeros(b).index_add(0, hseg, batch.relevant.double().float())
            # distinct relevant behaviors that collide at least once, of all distinct relevant
            rel_distinct = torch.zeros(b).index_add(0, useg, relevant_u.float())
            scores.add(batch.user_ids, batch.labels, model=logits, oracle=oracle,
                       relevant_count=num_rel,
                       cos_long_term_candidate=nn.functional.cosine_similarity(
                           long_term, candidate, dim=1),
                       unnormalised_sums_dot_candidate=(sums.mean(1) * candidate).sum(1))
            for s in torch.nonzero(num_rel > 0).flatten().tolist():
                for block, cols in (("item", slice(0, half)), ("category", slice(half, None))):
                    c, r = counts[s, cols], rel_counts[s, cols]
                    size[block].append(float(c.mean()))
                    rel_in[block].append(float(r.mean()))
                    norm = sums[s, cols].norm(dim=1)
                    ok = norm > 0
                    if bool(ok.any()):
                        share[block].append(float((rel_sums[s, cols].norm(dim=1)[ok]
                                                   / norm[ok]).mean()))
                cos_rel.append(float(nn.functional.cosine_similarity(long_term[s], rel_mean[s], dim=0)))
                cos_avg.append(float(nn.functional.cosine_similarity(long_term[s], old_mean[s], dim=0)))
                recall.append(float(rel_distinct[s]) / max(float(num_rel[s]), 1.0))
            hits = (weights > 0).sum(1).double()  # signatures each distinct behavior collides in
            sig_rel += hits[relevant_u > 0].tolist()
            sig_other += hits[relevant_u == 0].tolist()
    g = num_groups
    print(f"m = {args.bits}, tau = {args.tau}: {g} signatures ({half} item, {g - half} category); "
          f"{len(cos_rel)} samples with a relevant behavior")
    for block in ("item", "category"):
        print(f"  {block} block, per signature: {statistics.mean(size[block]):.1f} behaviors in the "
              f"candidate's bucket, {statistics.mean(rel_in[block]):.2f} relevant; relevant share "
              f"of the bucket sum |R_g|/|S_g| {statistics.mean(share[block]):.3f}")
    print(f"  signatures collided in (of those colliding at least once): relevant "
          f"{statistics.mean(sig_rel):.1f}, other {statistics.mean(sig_other):.1f}; distinct "
          f"relevant behaviors colliding at least once / relevant positions "
          f"{statistics.mean(recall):.2f}")
    print(f"  cos(v, mean of relevant) {statistics.mean(cos_rel):.3f}; cos(v, mean of old "
          f"behaviors) {statistics.mean(cos_avg):.3f}")
    print("scores on 1,280 test samples:")
    scores.report(["oracle", "model", "relevant_count", "cos_long_term_candidate",
                   "unnormalised_sums_dot_candidate"])


if __name__ == "__main__":
    main()
