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
"""

import argparse

import torch

from torchrec_longseq import jagged
from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.synthetic import REGIMES

from twin_diagnosis import Scores, esu_probe, train_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="eta")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--regime", default="category", choices=list(REGIMES))
    p.add_argument("--table-init", type=float, default=0.0,
                   help="draw the sequence tables from U(-A, A) (default: TorchRec's +-1/sqrt(rows))")
    args = p.parse_args()
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
            b = batch.batch_size
            indices, lengths = selection.long
            sseg = jagged.segment_ids(jagged.lengths_to_offsets(lengths), indices.numel())
            found = torch.zeros(b).index_add(0, sseg, batch.relevant[indices].float())
            scores.add(batch.user_ids, batch.labels, model=logits, oracle=oracle,
                       retrieved_relevant=found, esu_logsumexp=lse, esu_best_logit=best)
    print(f"{args.model}, {args.regime} regime, {args.steps} steps, table init "
          f"{args.table_init or 'TorchRec'}; 1,280 test samples:")
    scores.report(["oracle", "model", "retrieved_relevant", "esu_logsumexp", "esu_best_logit"])


if __name__ == "__main__":
    main()
