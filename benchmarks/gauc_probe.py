"""What a search-then-attend model's long-term branch carries about the candidate (GAUC).

GAUC (per-user AUC over the 4 candidates of a request) asks how well a model ranks one user's
candidates. The generator's true logit reaches ~0.74; the models ~0.51-0.60. This trains
``--model`` (a ``SearchBasedInterest`` model: din-full, sim-hard, sim-soft, eta, twin) for
``--steps`` steps of 128 samples in one process on the ``--regime`` data
(``twin_diagnosis.train_model``), then scores 10 test batches by:

* ``model``: the model's logit; ``oracle``: the generator's true logit;
* ``retrieved_relevant``: how many relevant behaviors the search selected (what retrieval gives
  the ESU to work with);
* ``esu_logsumexp``: the log-sum-exp over the selected behaviors of the ESU's attention logits
  (mean over heads), the softmax's normaliser: how much unnormalised attention mass the
  candidate draws, which the softmax average divides away;
* ``esu_best_logit``: the highest of those logits (how strongly the best match matches).

When ``esu_logsumexp`` ranks one user's candidates better than the model, the ESU's logits know
something its normalised output does not pass on::

    .venv/bin/python benchmarks/gauc_probe.py --model eta --regime similarity

``--run DIR`` reads a ``train.py`` run instead (its last checkpoint, ``--checkpoint-every``;
its model, regime, seed and length from its config) and scores the 40 test batches of 128 that
``quality.py`` tests it on. With ``--esu-similarity`` and ``--esu-evidence`` it splits the path
from the table to the model's score (section 7.6 of docs/fidelity.md; the ``count`` and ``prior``
rows are the similarity regime's rule, not the category regime's):

* ``count_all``: the fixed cosine count of ``counting_probe.CosineCount`` on the run's own
  (trained) item table over every behavior older than the window: what the table holds;
* ``count_retrieved``: the same count over the retrieved behaviors only: what the search passes;
  ``_no_prior`` without the candidate's prior term, ``_any_age`` over the retrieved behaviors of
  the recent window too (the label reads only the older ones); ``prior_only`` the count's
  prior term alone, ``-log(1 + prior_t n_old)`` (``prior_t``: the candidate's mean ``w(cos)``
  against every item; the generator's label has it, from its latents);
* ``evidence``: the evidence columns the over-arch reads (mean over heads), and ``term_only``
  the same ``log(1 + sum_j exp(a_h (cos - c_h)))`` without the ``q . k`` part: what the
  projected logits add to or take from the count; ``term_with_prior`` that term less its own
  prior, ``log(1 + n_old mean_i exp(a_h (cos(t, i) - c_h)))``;

and prints the learned scale ``a_h`` and threshold ``c_h`` of every head, and the GAUC of
``sum_j exp(a (cos_j - c))`` over the retrieved behaviors at other scales ``a`` than the learned
(within one user's candidates ``c`` and the ``log(1 + .)`` do not change the order)::

    .venv/bin/python benchmarks/gauc_probe.py --run runs/q/similarity/eta-L1000-s2
"""

import argparse
from typing import Tuple

import torch

from torchrec_longseq import jagged
from torchrec_longseq.data import Batch, SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.synthetic import REGIMES
from torchrec_longseq.modules.sequence import Selection

from counting_probe import CosineCount, older_than_window
from twin_diagnosis import Scores, esu_probe, train_model


def retrieved_relevant(batch: Batch, selection: Selection) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sample of each retrieved behavior ``[M]`` and each sample's count of retrieved
    relevant behaviors ``[B]`` (``selection.long``'s indices into the batch's history)."""
    indices, lengths = selection.long
    sseg = jagged.segment_ids(jagged.lengths_to_offsets(lengths), indices.numel())
    return sseg, torch.zeros(batch.batch_size).index_add(0, sseg, batch.relevant[indices].float())


def table_of(model, feature: str) -> torch.Tensor:
    """``[rows, D]`` the weight of the sequence table that ``feature`` looks up."""
    ec = model.sequence_arch.embedding_collection
    for config in ec.embedding_configs():
        if feature in config.feature_names:
            return ec.embeddings[config.name].weight.detach()
    raise KeyError(f"no table looks up {feature}")


@torch.no_grad()
def read_run(run: str) -> None:
    """Score a trained run's model on its test batches, splitting the path from its item table
    to its score (the module docstring)."""
    from torchrec_longseq import export, train

    args = train.parse_args(["--config", f"{run}/config.yaml"])
    model, _ = export.from_run(run)
    (arch,) = model.sequence_arch.sequences.values()
    esu = arch.esu
    data = SyntheticConfig(seed=args.seed, max_seq_len=args.max_seq_len, regime=args.regime)
    generator = SyntheticGenerator(data)
    count = CosineCount(table_of(model, "hist_item"), data.recent_window)
    heads = esu.attention.num_heads
    if esu.similarity is not None:
        print("learned scale a_h:", [round(v, 3) for v in esu.similarity_scale.tolist()])
        print("learned threshold c_h:", [round(v, 3) for v in esu.similarity_threshold.tolist()])
        # [items, H] each item's mean exp(a_h (cos - c_h)) against every item: the term's prior
        kernel_prior = torch.exp((count.unit @ count.unit.T).unsqueeze(-1).sub(
            esu.similarity_threshold.double()).mul(esu.similarity_scale.double())).mean(1)
    scores, pairs, recent = Scores(), [], 0.0
    names = ["oracle", "model", "retrieved_relevant", "count_all", "count_retrieved",
             "count_retrieved_no_prior", "count_retrieved_any_age",
             *(["evidence"] if esu.evidence else []),
             "prior_only",
             *(["term_only", "term_with_prior"] if esu.evidence and esu.similarity is not None
               else [])]
    for i in range(args.eval_batches):
        batch, oracle = generator.batch_with_oracle("test", i, args.batch_size)
        f = batch.features
        logits, _ = model(f, batch.history_time, batch.request_time)
        selection = arch.search(f, batch.history_time, batch.request_time)
        indices, _ = selection.long
        b = batch.batch_size
        sseg, found = retrieved_relevant(batch, selection)
        # the count over the retrieved old behaviors only: w(cos) summed where the search looked
        offsets, items = f["hist_item"].offsets(), f["hist_item"].values()
        old = older_than_window(offsets, items.numel(), data.recent_window)
        t = f["target_item"].values()
        cos = (count.unit[t][sseg] * count.unit[items[indices]]).sum(1)
        kept = jagged.segment_sum((count.weight(cos) * old[indices]).unsqueeze(1), sseg, b)
        n_old = jagged.segment_sum(old.double().unsqueeze(1), jagged.segment_ids(
            offsets, items.numel()), b)
        prior = torch.log1p(count.prior[t].unsqueeze(1) * n_old)
        every = jagged.segment_sum(count.weight(cos).unsqueeze(1), sseg, b)  # the window's too
        recent += float((~old[indices]).sum()) / max(indices.numel(), 1) / args.eval_batches
        extra = {"count_retrieved_no_prior": torch.log1p(kept).squeeze(1),
                 "prior_only": -prior.squeeze(1),
                 "count_retrieved_any_age": (torch.log1p(every) - prior).squeeze(1)}
        if esu.evidence:
            looked = model.sequence_arch.look_up(f, batch.history_time, batch.request_time,
                                                 {"history": selection})["history"]
            out = esu(looked.candidates, looked.long, looked.long_offsets, looked.long_intervals,
                      looked.long_index)
            extra["evidence"] = out[:, -heads:].mean(1)
            if esu.similarity is not None:
                long, loffsets, _ = esu._pairs(looked.candidates, looked.long, looked.long_offsets,
                                               looked.long_intervals, looked.long_index)
                start, stop = esu.similarity
                lseg = jagged.segment_ids(loffsets, long.size(0))
                c = torch.nn.functional.cosine_similarity(
                    looked.candidates[:, start:stop][lseg], long[:, start:stop], dim=1)
                term = (c.unsqueeze(1) - esu.similarity_threshold) * esu.similarity_scale
                summed = torch.zeros(b, heads).index_add(0, lseg, torch.exp(term))
                extra["term_only"] = torch.log1p(summed).mean(1)
                extra["term_with_prior"] = (torch.log1p(summed) - torch.log1p(
                    kernel_prior[t] * n_old)).mean(1)
                pairs.append((c, lseg, b))
        scores.add(batch.user_ids, batch.labels, model=logits, oracle=oracle,
                   retrieved_relevant=found, count_all=count(batch),
                   count_retrieved=(torch.log1p(kept) - prior).squeeze(1), **extra)
    print(f"{run}: {args.model}, {args.regime} regime, L = {args.max_seq_len}, seed {args.seed}; "
          f"{args.eval_batches * args.batch_size} test samples:")
    scores.report(names)
    print(f"share of the retrieved behaviors within the last {data.recent_window}: {recent:.3f}")
    if pairs:  # within one user, the threshold only shifts the sum: the GAUC depends on a alone
        grid, scales = Scores(), (2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
        for (c, lseg, b), users, labels in zip(pairs, scores.users, scores.labels):
            grid.add(users, labels, **{f"{a:g}": torch.zeros(b).index_add(
                0, lseg, torch.exp(a * (c - 1))) for a in scales})
        print("GAUC of sum_j exp(a (cos_j - c)) over the retrieved behaviors (any c):")
        print("| a | " + " | ".join(f"{a:g}" for a in scales) + " |")
        print("| GAUC | " + " | ".join(f"{grid.auc(f'{a:g}', True):.4f}" for a in scales) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="eta")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--regime", default="category", choices=list(REGIMES))
    p.add_argument("--table-init", type=float, default=0.0,
                   help="draw the sequence tables from U(-A, A) (default: TorchRec's +-1/sqrt(rows))")
    p.add_argument("--run", help="read a train.py run directory instead of training (see above)")
    args = p.parse_args()
    if args.run:
        read_run(args.run)
        return
    data = SyntheticConfig(max_seq_len=args.max_seq_len, regime=args.regime)

    def setup(model) -> None:
        if args.table_init:
            for name, param in model.named_parameters():
                if "sequence_arch.embedding_collection" in name:
                    param.data.uniform_(-args.table_init, args.table_init)

    model = train_model(args.model, data, args.steps, setup=setup)
    (arch,) = model.sequence_arch.sequences.values()
    generator = SyntheticGenerator(data)
    scores = Scores()
    with torch.no_grad():
        for i in range(10):
            batch, oracle = generator.batch_with_oracle("test", i, 128)
            logits, selection, best, lse = esu_probe(model, arch, batch)
            _, found = retrieved_relevant(batch, selection)
            scores.add(batch.user_ids, batch.labels, model=logits, oracle=oracle,
                       retrieved_relevant=found, esu_logsumexp=lse, esu_best_logit=best)
    print(f"{args.model}, {args.regime} regime, {args.steps} steps, table init "
          f"{args.table_init or 'TorchRec'}; 1,280 test samples:")
    scores.report(["oracle", "model", "retrieved_relevant", "esu_logsumexp", "esu_best_logit"])


if __name__ == "__main__":
    main()
