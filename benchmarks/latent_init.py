"""Is the similarity regime out of reach because of the item embeddings? Train each model twice.

In the similarity regime (``data.synthetic``) every model stays at chance (docs/fidelity.md).
To see whether the searches and attentions could use the data if the item embeddings were
right, each ``--models`` model is trained for ``--steps`` steps of 128 samples at max L =
``--max-seq-len`` in one process (``twin_diagnosis.train_model``: Adagrad on the tables, Adam on
the rest, d = 8 = the generator's latent dimension) twice, in the same run:

* ``learned``: the item table starts as TorchRec initialises it (what every run does);
* ``latent``: the item table starts as the generator's own unit latents (the embeddings in
  which the label's similarity is a dot product), and is then trained as usual.

It prints test AUC and GAUC on ``--test-batches`` batches of 128 next to the oracle's (the
generator's true logit) on the same samples::

    .venv/bin/python benchmarks/latent_init.py --models eta sim-hard --steps 600
"""

import argparse
from typing import Dict

import torch

from torchrec_longseq.data import SyntheticConfig, SyntheticGenerator
from torchrec_longseq.data.synthetic import item_latents
from torchrec_longseq.metrics import grouped_auc
from torchrec_longseq.models.longseq_ctr import LongSeqCTR, ModelConfig
from twin_diagnosis import train_model


def latent_setup(data: SyntheticConfig):
    """``setup`` for ``train_model``: the sequence item table set to the generator's latents."""
    latents = torch.from_numpy(item_latents(data))

    def setup(model: LongSeqCTR) -> None:
        table = model.sequence_arch.embedding_collection.embeddings["item"].weight
        with torch.no_grad():
            table.copy_(latents)
        model.refresh_derived_tables()

    return setup


@torch.no_grad()
def evaluate(model: LongSeqCTR, data: SyntheticConfig, batches: int) -> Dict[str, float]:
    """Test AUC / GAUC of ``model`` and of the oracle on the same ``batches`` test batches."""
    generator = SyntheticGenerator(data)
    users, labels, logits, oracle = [], [], [], []
    for index in range(batches):
        batch, truth = generator.batch_with_oracle("test", index, 128)
        logits.append(model(batch.features, batch.history_time, batch.request_time)[0])
        users.append(batch.user_ids)
        labels.append(batch.labels)
        oracle.append(truth)
    u, y = torch.cat(users), torch.cat(labels)

    def aucs(scores: torch.Tensor) -> Dict[str, float]:
        return {"auc": float(grouped_auc(torch.zeros_like(u), scores.double(), y)),
                "gauc": float(grouped_auc(u, scores.double(), y))}

    out = {f"model_{k}": v for k, v in aucs(torch.cat(logits)).items()}
    out.update({f"oracle_{k}": v for k, v in aucs(torch.cat(oracle)).items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["eta", "sim-soft", "din-full", "sim-hard"])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--max-seq-len", type=int, default=1000)
    p.add_argument("--test-batches", type=int, default=20)
    p.add_argument("--short-window", type=int, default=50,
                   help="DIN's window (the max L: DIN's unnormalised attention over everything)")
    args = p.parse_args()
    data = SyntheticConfig(max_seq_len=args.max_seq_len, regime="similarity")
    config = ModelConfig(embedding_dim=data.latent_dim, short_window=args.short_window)
    print(f"similarity regime, L = {args.max_seq_len}, {args.steps} steps of 128, d = "
          f"{data.latent_dim}, short window {args.short_window}; test on {args.test_batches} "
          f"batches of 128")
    print("| model | item table starts | test AUC | test GAUC | oracle AUC | oracle GAUC |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for start, setup in (("learned", None), ("latent", latent_setup(data))):
            model = train_model(name, data, args.steps, config, setup)
            r = evaluate(model, data, args.test_batches)
            print(f"| {name} | {start} | {r['model_auc']:.4f} | {r['model_gauc']:.4f} | "
                  f"{r['oracle_auc']:.4f} | {r['oracle_gauc']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
