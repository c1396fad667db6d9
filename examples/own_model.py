"""Lifelong sequences in your own TorchRec model: your keys, your tables, two sequences.

The model below is a ranking engineer's: its features are called ``uid``, ``hour``, ``cand_*``,
``clk_seq_*`` (clicks) and ``buy_seq_*`` (purchases); a behavior has three ids (item, category,
shop) and a timestamp. Adding the long-sequence part takes a schema per sequence and one line per
module: ETA over the clicks (k = 50) and SIM hard search over the purchases (k = 20). Both read
the same EmbeddingCollection in one lookup per step, and ETA's signature tables are kept exact by
the library, whatever the training loop. (The ``--- README`` regions are the README's snippet,
kept equal to it by a test.)

Run on 2 ranks (CPU, gloo), trains and prints the test AUC::

    .venv/bin/torchrun --standalone --nproc_per_node=2 examples/own_model.py --steps 200

The data is the project's synthetic generator renamed to these keys (``own_batch``): your own
pipeline would produce the same KeyedJaggedTensor from your logs.
"""

import argparse
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,
                      EmbeddingConfig, KeyedJaggedTensor)
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_longseq import (Attribute, SequenceArch, SequenceSchema, build_sequence, serving,
                              table_configs)
from torchrec_longseq.data import Batch, SyntheticConfig, SyntheticGenerator
from torchrec_longseq.metrics import CTRMetrics
from torchrec_longseq.models.longseq_ctr import LongSeqCTR, LongSeqCTRTrain, ModelConfig
from torchrec_longseq.train import dense_optimizer, init_distributed, quiet_known_notices, shard

NUM_SHOPS = 50
KEYS = ["uid", "hour", "cand_item", "cand_cate", "cand_shop",
        "clk_seq_item", "clk_seq_cate", "clk_seq_shop", "clk_seq_ts",
        "buy_seq_item", "buy_seq_cate", "buy_seq_shop", "buy_seq_ts"]


def schemas() -> Dict[str, SequenceSchema]:
    """The two behavior sequences of this model, named by its own keys and tables."""
    # --- README: the schemas
    clicks = SequenceSchema(
        attributes=[Attribute("clk_seq_item", "item", candidate_key="cand_item"),
                    Attribute("clk_seq_cate", "cate", candidate_key="cand_cate"),
                    Attribute("clk_seq_shop", "shop", candidate_key="cand_shop")],
        time_key="clk_seq_ts")  # hard search would match the 2nd attribute, the category
    buys = SequenceSchema(
        attributes=[Attribute("buy_seq_item", "item", candidate_key="cand_item"),
                    Attribute("buy_seq_cate", "cate", candidate_key="cand_cate"),
                    Attribute("buy_seq_shop", "shop", candidate_key="cand_shop")],
        time_key="buy_seq_ts", hard_search_key="buy_seq_cate")
    # ---
    return {"clicks": clicks, "buys": buys}


def build_own_model(data: SyntheticConfig, dim: int = 16, clicks_model: str = "eta",
                    buys_model: str = "sim-hard", clicks_k: int = 50, buys_k: int = 20,
                    device: Optional[torch.device] = None) -> LongSeqCTR:
    """The user's model: pooled user and hour, three id tables shared by the candidate and both
    sequences, and the two sequence modules (names of ``build_sequence``, keeping ``clicks_k``
    and ``buys_k`` behaviors)."""
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=data.num_users,
                           feature_names=["uid"]),
        EmbeddingBagConfig(name="hour", embedding_dim=dim, num_embeddings=24,
                           feature_names=["hour"]),
    ], device=device)
    ec = EmbeddingCollection(tables=[
        EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=data.num_items,
                        feature_names=["cand_item", "clk_seq_item", "buy_seq_item"]),
        EmbeddingConfig(name="cate", embedding_dim=dim, num_embeddings=data.num_categories,
                        feature_names=["cand_cate", "clk_seq_cate", "buy_seq_cate"]),
        EmbeddingConfig(name="shop", embedding_dim=dim, num_embeddings=NUM_SHOPS,
                        feature_names=["cand_shop", "clk_seq_shop", "buy_seq_shop"]),
    ], device=device)
    seq = schemas()
    # --- README: the modules, one per sequence, and one arch for all of them
    tables = table_configs(ec)  # your EmbeddingCollection's configs, by table name
    arch = SequenceArch(ec, {
        "clicks": build_sequence(clicks_model, seq["clicks"], tables, ModelConfig(k=clicks_k)),
        "buys": build_sequence(buys_model, seq["buys"], tables, ModelConfig(k=buys_k)),
    })
    # ---
    return LongSeqCTR(ebc, [128, 64], arch)


def own_batch(generator: SyntheticGenerator, split: str, index: int, batch_size: int) -> Batch:
    """A synthetic batch under this model's keys: the history as clicks, every fourth item
    (``item % 4 == 0``) also as a purchase, a shop per item (``item % NUM_SHOPS``), the
    timestamps as KJT keys (both sequences have a ``time_key``: no dense ``history_time``)."""
    batch = generator.batch(split, index, batch_size)
    f = batch.features
    items, cats = f["hist_item"].values(), f["hist_category"].values()
    lengths = f["hist_item"].lengths().long()
    bought = items % 4 == 0
    sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    buy_lengths = torch.zeros_like(lengths).index_add_(0, sample[bought], torch.ones_like(
        sample[bought]))
    one = torch.ones_like(lengths)
    columns = [
        (f["user_id"].values(), one), (f["context_hour"].values(), one),
        (f["target_item"].values(), one), (f["target_category"].values(), one),
        (f["target_item"].values() % NUM_SHOPS, one),
        (items, lengths), (cats, lengths), (items % NUM_SHOPS, lengths),
        (batch.history_time, lengths),
        (items[bought], buy_lengths), (cats[bought], buy_lengths),
        (items[bought] % NUM_SHOPS, buy_lengths), (batch.history_time[bought], buy_lengths),
    ]
    features = KeyedJaggedTensor(keys=KEYS, values=torch.cat([v.long() for v, _ in columns]),
                                 lengths=torch.cat([n for _, n in columns]).int())
    empty = torch.zeros(0, dtype=torch.long)
    return Batch(features=features, history_time=empty, request_time=batch.request_time,
                 labels=batch.labels, relevant=empty.bool())


def own_request(batch: Batch, sample: int, candidates: int, data: SyntheticConfig,
                seed: int = 0) -> serving.Request:
    """Serving: sample ``sample``'s user and histories as one request, with ``candidates`` random
    items to score (``serving.score_request(model, request)`` scores them all, each history
    searched and looked up once)."""
    f = batch.features.to_dict()

    def of_sample(key: str) -> torch.Tensor:
        jt = f[key]
        start = int(jt.offsets()[sample])
        return jt.values()[start:start + int(jt.lengths()[sample])]

    items = torch.randint(0, data.num_items, (candidates,),
                          generator=torch.Generator().manual_seed(seed))
    return serving.Request(
        user={"uid": of_sample("uid"), "hour": of_sample("hour")},
        history={k: of_sample(k) for k in KEYS if "_seq_" in k},
        candidates={"cand_item": items, "cand_cate": items // data.items_per_category,
                    "cand_shop": items % NUM_SHOPS},
        request_time=int(batch.request_time[sample]))


def main(argv: Optional[List[str]] = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--max-seq-len", type=int, default=1000)
    args = p.parse_args(argv)
    quiet_known_notices()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = SyntheticConfig(max_seq_len=args.max_seq_len)
    model = shard(LongSeqCTRTrain(build_own_model(data)), device, "auto", sparse_lr=0.05)
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_optimizer(model, 1e-3)])
    generator = SyntheticGenerator(data)
    for step in range(args.steps):  # derived tables: nothing to call, SequenceArch keeps them
        loss, _ = model(own_batch(generator, "train", step * world + rank, args.batch_size))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    metrics = CTRMetrics(device)
    with torch.no_grad():
        for i in range(args.eval_batches):
            batch = own_batch(generator, "test", i * world + rank, args.batch_size)
            _, (_, logits, labels) = model(batch)
            metrics.update(batch.features["uid"].values(), logits, labels)
    result = metrics.compute()
    if rank == 0:
        print("own model (ETA over clicks, SIM hard over purchases): test " +
              " ".join(f"{k}={v:.4f}" for k, v in result.items()))
    dist.barrier()
    return result["auc"]


if __name__ == "__main__":
    main()
