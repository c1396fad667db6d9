"""GPU check: the CUDA (torch-ops) paths against the CPU paths, then their speed on the GPU.

On CPU the retrieval and the attention run compiled kernels (``retrieval/kernels.py``); on any
other device they run their torch-ops twins. This script feeds the same inputs (random jagged
histories, some of length 0) to both and reports whether they agree:

* exactly, for everything that selects (indices, lengths, signatures, popcounts): SimHash
  signatures (integer-valued inputs, whose dot products are exact in float32; for Gaussian inputs
  every differing bit must come from a projection within rounding of 0), Hamming top-k
  (``retrieval.simhash.simhash_topk``, ``modules.eta.signature_topk``), hard search, jagged top-k,
  with per-sample histories and with one history shared by all candidates (``offsets=None``);
* up to near ties, for float top-k whose scores the two paths round differently (TWIN);
* ``allclose`` in float32 for ``TargetAttention``'s output and gradients, for the models
  (``build_model``: avg-pool, DIN, DIN over the whole history, SIM hard/soft, ETA, SDIM, TWIN;
  logits and every parameter's gradient, then one SGD step and the derived tables it
  refreshes), for ``serving.score_request`` and for the evaluation metrics
  (``metrics.CTRMetrics``); ``data.validation.check_batch`` must raise its own ``BatchError``
  on a bad device batch.

The models need TorchRec. With the CPU-only FBGEMM (``fbgemm-gpu-cpu``, no CUDA kernels) the
few FBGEMM operators TorchRec calls on CUDA tensors are routed through the CPU (copied there and
back; the report lists which); that only moves TorchRec's plumbing, not this project's code.

Then it times the ops at each ``--lengths`` L for ``--candidates`` candidates with L behaviors
each (N = candidates x L in all), on the device (``torch.cuda.synchronize``, warm-up, median of
``--repeats``) next to the CPU of the same machine (the default path, compiled kernels, and the
torch ops with ``kernel="torch"``; median of ``--cpu-repeats``, a single call where one takes
over 2 s), and prints markdown tables; ``OUT/gpu_check.json`` keeps everything::

    python benchmarks/gpu_check.py --lengths 1000 10000 100000 --candidates 64 --k 50 \\
        --embedding-dim 64 --hash-bits 64 --out runs/gpu_check

The "device" side always runs with ``kernel="torch"`` (``retrieval.kernels.set_kernel`` on its
modules, ``kernel=`` to its functions), the CPU side with the default ``"auto"``. ``--device cpu``
thus runs the "device" side on CPU with the kernels off (a smoke test of the script without a
GPU: kernels against torch ops).
"""

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_map

from torchrec_longseq import jagged
from torchrec_longseq.modules.attention import TargetAttention
from torchrec_longseq.retrieval import simhash
from torchrec_longseq.retrieval.kernels import set_kernel
from torchrec_longseq.retrieval.hard import hard_search
from torchrec_longseq.retrieval.topk import jagged_topk

Pair = Tuple[torch.Tensor, torch.Tensor]

# float32 tolerances: the attention op, and whole models (several layers deep)
OP_TOL = dict(rtol=1e-4, atol=1e-5)
MODEL_TOL = dict(rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------ plumbing

def moved(tree, device):
    """Every tensor of a (nested) structure on ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def on_cpu(tree):
    return moved(tree, "cpu")


def random_lengths(g: torch.Generator, batch: int, max_len: int) -> torch.Tensor:
    """``[batch]`` lengths in ``[0, max_len]``: every 5th is 0, one is ``max_len``."""
    lengths = torch.randint(0, max_len + 1, (batch,), generator=g)
    lengths[::5] = 0
    lengths[1] = max_len
    return lengths


def fbgemm_cuda_router() -> Counter:
    """Give every FBGEMM operator that has a CPU kernel but no CUDA kernel (the CPU-only wheel) a
    CUDA kernel that copies its tensors to the CPU, runs the CPU kernel and copies the results
    back. Returns a counter of the operators called that way."""
    import fbgemm_gpu  # noqa: F401  (registers the operators)

    calls: Counter = Counter()
    lib = torch.library.Library("fbgemm", "IMPL")
    fbgemm_cuda_router.lib = lib  # keep the registrations alive
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for qualified in torch._C._dispatch_get_all_op_names():
        if not qualified.startswith("fbgemm::"):
            continue
        if not has(qualified, "CPU") or any(has(qualified, key) for key in (
                "CUDA", "CompositeImplicitAutograd", "CompositeExplicitAutograd")):
            continue
        name = qualified.split("::", 1)[1]
        base, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.fbgemm, base), overload or "default")
        if op._schema.is_mutable:
            continue

        def via_cpu(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            device = next(t.device for t in torch.utils._pytree.tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor) and t.device.type == "cuda")
            return moved(_op(*on_cpu(args), **on_cpu(kwargs)), device)

        lib.impl(name, via_cpu, "CUDA")
        if has(qualified, "AutogradCPU") and not has(qualified, "Autograd"):
            # autograd registered for CPU only: route above autograd, so that the CPU op and the
            # copies record the graph
            lib.impl(name, via_cpu, "AutogradCUDA")
    return calls


# ---------------------------------------------------------------------------------- agreement

class Agreement:
    """Rows of the agreement table: check, result, detail."""

    def __init__(self) -> None:
        self.rows: List[Dict[str, object]] = []

    def add(self, check: str, ok: Optional[bool], detail: str = "") -> None:
        self.rows.append({"check": check, "ok": ok, "detail": detail})
        status = "n/a" if ok is None else ("ok" if ok else "MISMATCH")
        print(f"  {check}: {status} {detail}", flush=True)

    def run(self, check: str, fn: Callable[[], Tuple[Optional[bool], str]]) -> None:
        try:
            ok, detail = fn()
        except Exception as e:  # a device bug shows up here: report it and go on
            where = [f for f in traceback.extract_tb(e.__traceback__)
                     if "torchrec_longseq" in f.filename or "gpu_check" in f.filename]
            at = f" at {Path(where[-1].filename).name}:{where[-1].lineno}" if where else ""
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}{at}"
        self.add(check, ok, detail)


def equal_pairs(a: Pair, b: Pair) -> Tuple[bool, str]:
    a, b = on_cpu(a), on_cpu(b)
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    return same, f"{a[0].numel()} selected"


def same_selections(fn: Callable[..., Pair], args: Tuple, device: str,
                    ks: Tuple[int, ...]) -> Tuple[bool, int]:
    """``fn(*args, k)`` for each ``k``: on CPU (the compiled kernel where there is one) against
    ``fn(..., kernel="torch")`` on ``device`` (the torch ops). Returns (all identical, CPU
    selections in all)."""
    same, selected = True, 0
    for k in ks:
        ref = fn(*args, k)
        got = fn(*moved(args, device), k, kernel="torch")
        same = equal_pairs(ref, got)[0] and same
        selected += ref[0].numel()
    return same, selected


def close(a: torch.Tensor, b: torch.Tensor, tol: Dict[str, float]) -> Tuple[bool, float]:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if a.shape != b.shape:
        return False, float("inf")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    return bool(torch.allclose(a, b, **tol)), diff


def check_popcount(device: str, g: torch.Generator) -> Tuple[bool, str]:
    x = torch.randint(-(2**63), 2**63 - 1, (100_000, 2), dtype=torch.int64, generator=g)
    x[0] = torch.tensor([0, -1])
    x[1] = torch.tensor([-(2**63), 2**63 - 1])
    ref = sum(((x >> i) & 1) for i in range(64))
    same = torch.equal(simhash.popcount64(x), ref) and torch.equal(
        simhash.popcount64(x.to(device)).cpu(), ref)
    y = torch.randint(-(2**63), 2**63 - 1, (100_000, 2), dtype=torch.int64, generator=g)
    same &= torch.equal(simhash.hamming_distance(x, y),
                        simhash.hamming_distance(x.to(device), y.to(device)).cpu())
    return same, "200,000 words, 100,000 distances"


def check_signatures_exact(device: str, g: torch.Generator) -> Tuple[bool, str]:
    """Integer-valued embeddings and projection: every dot product is exact in float32, so the
    bits (ties at exactly 0 included: strict ``>``) must be identical."""
    emb = torch.randint(-3, 4, (5000, 64), generator=g).float()
    same, zeros = True, 0
    for bits in (16, 64, 128):
        proj = torch.randint(-3, 4, (64, bits), generator=g).float()
        zeros += int(((emb @ proj) == 0).sum())
        same &= torch.equal(simhash.simhash_signatures(emb, proj),
                            simhash.simhash_signatures(emb.to(device), proj.to(device),
                                                       kernel="torch").cpu())
    return same, f"m = 16, 64, 128; {zeros} projections exactly 0"


def check_signatures_gaussian(device: str, g: torch.Generator) -> Tuple[bool, str]:
    """Gaussian inputs: rounding may flip a bit whose projection is within rounding of 0; any
    other differing bit is a bug."""
    emb = torch.randn(20_000, 64, generator=g)
    proj = torch.randn(64, 128, generator=g)
    a = simhash.simhash_signatures(emb, proj)
    b = simhash.simhash_signatures(emb.to(device), proj.to(device), kernel="torch").cpu()
    diff_words = a ^ b
    bit = torch.arange(64)
    flipped = ((diff_words.unsqueeze(-1) >> bit) & 1).bool().flatten(1)  # [N, 128]
    p = emb.double() @ proj.double()
    scale = emb.abs().double() @ proj.abs().double()
    unexplained = int((flipped & (p.abs() > 1e-5 * scale)).sum())
    return unexplained == 0, (f"{int(flipped.sum())} of {flipped.numel()} bits differ, "
                              f"{unexplained} not within rounding of 0")


def check_simhash_module(device: str) -> Tuple[bool, str]:
    a = simhash.SimHash(64, 128, seed=3)
    b = simhash.SimHash(64, 128, seed=3, device=device)
    meta = simhash.SimHash(64, 128, seed=3, device="meta").to_empty(device=device)
    meta.reset_parameters()
    same = torch.equal(a.projection, b.projection.cpu()) and torch.equal(
        a.projection, meta.projection.cpu())
    return same, f"projection built on {device} and from meta equals CPU's"


def check_simhash_topk(device: str, g: torch.Generator) -> Tuple[bool, str]:
    """Few distinct distances (8- and 72-bit signatures), so ties (broken by recency) abound."""
    results, selected = [], 0
    for words, mask in ((1, 0xFF), (2, None)):
        lengths = random_lengths(g, 64, 300)
        offsets = jagged.lengths_to_offsets(lengths)
        n = int(offsets[-1])
        hist = torch.randint(-(2**63), 2**63 - 1, (n, words), dtype=torch.int64, generator=g)
        target = torch.randint(-(2**63), 2**63 - 1, (64, words), dtype=torch.int64, generator=g)
        if mask is not None:
            hist, target = hist & mask, target & mask
        else:
            hist[:, 1] &= 0xFF
            target[:, 1] &= 0xFF
        # simhash_topk is torch ops only: the same function on both sides
        same, count = same_selections(
            lambda h, o, t, k, kernel="auto": simhash.simhash_topk(h, o, t, k),
            (hist, offsets, target), device, (0, 1, 7, 50, 400))
        results.append(same)
        selected += count
    return all(results), f"W = 1, 2; k = 0, 1, 7, 50, 400; {selected} selected"


def eta_inputs(g: torch.Generator, bits: int, batch: int, max_len: int):
    items, categories = 500, 20
    item_sig = simhash.SimHash(16, bits, seed=0)(torch.randn(items, 16, generator=g))
    category_sig = simhash.SimHash(16, bits, seed=1)(torch.randn(categories, 16, generator=g))
    lengths = random_lengths(g, batch, max_len)
    n = int(lengths.sum())
    hist_items = torch.randint(0, items, (n,), generator=g)
    hist_categories = torch.randint(0, categories, (n,), generator=g)
    target_items = torch.randint(0, items, (batch,), generator=g)
    target_categories = torch.randint(0, categories, (batch,), generator=g)
    # signature_topk's layout: lists over the hashed attributes (item, category)
    return ([item_sig, category_sig], [hist_items, hist_categories],
            [target_items, target_categories], jagged.lengths_to_offsets(lengths))


def check_signature_topk(device: str, g: torch.Generator, shared: bool) -> Tuple[bool, str]:
    from torchrec_longseq.modules.eta import signature_topk

    results, selected = [], 0
    for bits in (8, 64):
        inputs = list(eta_inputs(g, bits, 64, 400))
        if shared:  # one history (the first non-empty sample's) for all 64 candidates
            start, end = int(inputs[3][1]), int(inputs[3][2])
            inputs[1] = [ids[start:end] for ids in inputs[1]]
            inputs[3] = None
        same, count = same_selections(signature_topk, tuple(inputs), device, (0, 1, 7, 50))
        results.append(same)
        selected += count
    return all(results), f"m = 8, 64 per block; k = 0, 1, 7, 50; {selected} selected"


def check_hard(device: str, g: torch.Generator, shared: bool) -> Tuple[bool, str]:
    results, selected = [], 0
    for categories in (3, 50):
        lengths = random_lengths(g, 64, 400)
        offsets: Optional[torch.Tensor] = jagged.lengths_to_offsets(lengths)
        history = torch.randint(0, categories, (int(lengths.sum()),), generator=g)
        if shared:
            history, offsets = history[: int(lengths[1])], None
        target = torch.randint(0, categories, (64,), generator=g)
        same, count = same_selections(hard_search, (history, offsets, target), device,
                                      (0, 1, 7, 50))
        results.append(same)
        selected += count
    return all(results), f"3 and 50 categories; k = 0, 1, 7, 50; {selected} selected"


def check_jagged_topk(device: str, g: torch.Generator, largest: bool) -> Tuple[bool, str]:
    results, selected = [], 0
    lengths = random_lengths(g, 64, 400)
    offsets = jagged.lengths_to_offsets(lengths)
    n = int(offsets[-1])
    for scores in (torch.randn(n, generator=g),  # distinct
                   torch.randint(0, 10, (n,), generator=g).float(),  # many ties
                   torch.randint(0, 10, (n,), generator=g)):  # integer scores
        same, count = same_selections(
            lambda s, o, k, kernel="auto": jagged_topk(s, o, k, largest, kernel=kernel),
            (scores, offsets), device, (0, 1, 7, 50))
        results.append(same)
        selected += count
    return all(results), f"float, tied float, int scores; k = 0, 1, 7, 50; {selected} selected"


def check_attention(device: str, g: torch.Generator, bias: bool, shared: bool) -> Tuple[bool, str]:
    torch.manual_seed(0)
    att = TargetAttention(query_dim=24, key_dim=40, num_heads=4, head_dim=8)
    att_dev = set_kernel(copy.deepcopy(att).to(device), "torch")
    lengths = random_lengths(g, 64, 300)
    offsets: Optional[torch.Tensor] = jagged.lengths_to_offsets(lengths)
    n = int(lengths.sum())
    if shared:
        n, offsets = 500, None
    query = torch.randn(64, 24, generator=g, requires_grad=True)
    keys = torch.randn(n, 40, generator=g, requires_grad=True)
    b = (torch.randn(n, 4, generator=g) if bias else torch.zeros(0)).requires_grad_()
    grad_out = torch.randn(64, 32, generator=g)
    leaves = [query, keys] + ([b] if bias else [])
    leaves_dev = [t.detach().to(device).requires_grad_() for t in leaves]

    def run(module, q, k, bb, off, grad):
        out = module(q, k, off, bb)
        out.backward(grad)
        return out

    out = run(att, query, keys, b if bias else None, offsets, grad_out)
    out_dev = run(att_dev, leaves_dev[0], leaves_dev[1], leaves_dev[2] if bias else None,
                  None if offsets is None else offsets.to(device), grad_out.to(device))
    pairs = [("out", out, out_dev)] + [
        (name, a.grad, d.grad) for name, a, d in zip(["dq", "dkeys", "dbias"], leaves, leaves_dev)]
    pairs += [(f"d{name}", p.grad, p_dev.grad)
              for (name, p), p_dev in zip(att.named_parameters(), att_dev.parameters())]
    worst, ok = 0.0, True
    for _, a, d in pairs:
        same, diff = close(a, d, OP_TOL)
        ok &= same
        worst = max(worst, diff)
    empty = offsets is not None and bool(
        (out_dev[(lengths == 0).to(device)] == 0).all()) and not bool(out_dev.isnan().any())
    if offsets is not None:
        ok &= empty
    detail = f"{len(pairs)} tensors (output, input and weight gradients), max abs diff {worst:.2e}"
    return ok, detail + ("; empty samples give exact zeros" if offsets is not None else "")


def twin_search(rows: List[torch.Tensor], heads: int):
    """A ``TwinSearch`` on the synthetic schema whose projected-row tables are ``rows`` (item,
    category; ``[rows_a, 2 H Dh]``): what its ``_queries`` reads."""
    from torchrec import EmbeddingConfig

    from torchrec_longseq.modules.esu import ExactSearchUnit
    from torchrec_longseq.modules.time import TimeIntervalEmbedding
    from torchrec_longseq.modules.twin import TwinSearch
    from torchrec_longseq.schema import default_schema

    schema = default_schema()
    width = rows[0].size(1) // 2
    dim = 8  # embedding width of the (unused) tables: only the projected rows are read
    tables = {a.table: EmbeddingConfig(name=a.table, embedding_dim=dim,
                                       num_embeddings=r.size(0),
                                       feature_names=[a.candidate_key, a.history_key])
              for a, r in zip(schema.attributes, rows)}
    esu = ExactSearchUnit(dim * len(rows), TimeIntervalEmbedding(heads), heads, width // heads,
                          time_as_bias=True)
    search = TwinSearch(schema, tables, esu, k=1)
    with torch.no_grad():
        for block, r in zip(search.rows, rows):
            block.table.copy_(r)
    return search


def check_twin(device: str, g: torch.Generator, shared: bool) -> Tuple[bool, str]:
    """TWIN's search scores in float32 with a different summation order on each path: selections
    may differ only where scores tie within rounding (judged on float64 scores)."""
    from torchrec_longseq.modules.twin import twin_scores, twin_topk

    heads, width, items, categories, batch = 4, 32, 500, 20, 64
    item_rows = torch.randn(items, 2 * width, generator=g)
    category_rows = torch.randn(categories, 2 * width, generator=g)
    rows = [item_rows, category_rows]
    lengths = random_lengths(g, batch, 400)
    offsets: Optional[torch.Tensor] = jagged.lengths_to_offsets(lengths)
    n = int(lengths.sum())
    hist_items = torch.randint(0, items, (n,), generator=g)
    hist_categories = torch.randint(0, categories, (n,), generator=g)
    bias = torch.randn(n, heads, generator=g)
    if shared:
        m = int(lengths[1])
        hist_items, hist_categories, bias = hist_items[:m], hist_categories[:m], bias[:m]
        offsets, n = None, m
    target_items = torch.randint(0, items, (batch,), generator=g)
    target_categories = torch.randint(0, categories, (batch,), generator=g)
    targets = [target_items, target_categories]
    # the candidates' projected queries, read by id from the tables on each side
    search = twin_search(rows, heads)
    search_dev = copy.deepcopy(search).to(device)
    inputs = (rows, [hist_items, hist_categories], search._queries(targets), offsets, bias,
              heads)
    inputs_dev = moved((rows, [hist_items, hist_categories]), device) + (
        search_dev._queries(moved(targets, device)),) + moved((offsets, bias), device) + (heads,)
    # reference scores in float64, as per-sample histories
    seg_offsets = offsets if offsets is not None else jagged.copies_offsets(n, batch, "cpu")
    rep = 1 if offsets is not None else batch
    queries64 = copy.deepcopy(search).double()._queries(targets)
    scores64 = twin_scores([r.double() for r in rows],
                           [hist_items.repeat(rep), hist_categories.repeat(rep)], queries64,
                           seg_offsets, bias.double().repeat(rep, 1), heads, search.head_dim)
    exact, explained, unexplained = 0, 0, 0
    for k in (1, 7, 50):
        ref = twin_topk(*inputs, k, head_dim=search.head_dim)
        got = on_cpu(twin_topk(*inputs_dev, k, "torch", head_dim=search.head_dim))
        if not torch.equal(ref[1], got[1]):
            unexplained += batch
            continue
        ref_offsets = jagged.lengths_to_offsets(ref[1])
        for s in range(batch):
            a = ref[0][ref_offsets[s]:ref_offsets[s + 1]]
            d = got[0][ref_offsets[s]:ref_offsets[s + 1]]
            if torch.equal(a, d):
                exact += 1
                continue
            base = 0 if offsets is not None else s * n  # positions: global / in the one history
            sa, sd = scores64[base + a], scores64[base + d]
            # the same scores in the same order up to rounding: a near tie, not a bug
            if torch.allclose(sa, sd, rtol=0, atol=1e-5 * max(1.0, float(sa.abs().max()))):
                explained += 1
            else:
                unexplained += 1
    return unexplained == 0, (f"k = 1, 7, 50 x {batch} samples: {exact} identical, {explained} "
                              f"differ only in near ties (abs score diff <= 1e-5), {unexplained} not")


def check_sdim(device: str, g: torch.Generator) -> Tuple[bool, str]:
    """The CPU kernel lists the distinct colliding pairs in order of first occurrence, the torch
    ops in sorted order: compare them sorted by position within each sample."""
    from torchrec_longseq.modules.sdim import bucket_mean, collisions_by_id

    items, categories, batch, tau, groups = 300, 10, 64, 3, 8
    item_codes = simhash.SimHash(16, 24, seed=2)(torch.randn(items, 16, generator=g))
    category_codes = simhash.SimHash(16, 24, seed=3)(torch.randn(categories, 16, generator=g))
    lengths = random_lengths(g, batch, 300)
    offsets = jagged.lengths_to_offsets(lengths)
    n = int(lengths.sum())
    hist_ids = [torch.randint(0, items, (n,), generator=g),
                torch.randint(0, categories, (n,), generator=g)]
    target_ids = [torch.randint(0, items, (batch,), generator=g),
                  torch.randint(0, categories, (batch,), generator=g)]
    # behaviors are merged by every attribute's ids: here the two hashed ones
    inputs = ([item_codes, category_codes], hist_ids, target_ids, hist_ids, offsets, tau, groups)
    ref = collisions_by_id(*inputs)
    got = on_cpu(collisions_by_id(*moved(inputs, device), "torch"))

    def by_position(found):
        positions, lens, weights = found
        seg = jagged.segment_ids(jagged.lengths_to_offsets(lens), positions.numel())
        order = torch.argsort(seg * (n + 1) + positions)
        return positions[order], lens, weights[order]

    ref_sorted, got_sorted = by_position(ref), by_position(got)
    same = all(torch.equal(a, b) for a, b in zip(ref_sorted, got_sorted))
    behaviors = torch.randn(ref[0].numel(), 16, generator=g)  # one vector per pair, sorted order
    pair_offsets = jagged.lengths_to_offsets(ref[1])
    mean_ref = bucket_mean(behaviors, pair_offsets, ref_sorted[2])
    mean_got = bucket_mean(*moved((behaviors, pair_offsets, got_sorted[2]), device))
    ok_mean, diff = close(mean_ref, mean_got, OP_TOL)
    return same and ok_mean, (f"{ref[0].numel()} colliding pairs, equal as sets per sample: "
                              f"{same}; bucket_mean max abs diff {diff:.1e}")


# ------------------------------------------------------------------------------ whole models

MODEL_NAMES = ["avgpool", "din", "din-full", "sim-hard", "sim-soft", "eta", "sdim", "twin"]


def small_world():
    from torchrec_longseq.data import SyntheticConfig
    from torchrec_longseq.models.longseq_ctr import ModelConfig

    data = SyntheticConfig(max_seq_len=64, num_users=1000, num_items=1000, num_categories=10,
                           subclusters=10)
    config = ModelConfig(embedding_dim=8, over_arch_layers=[16, 8], attention_hidden=[8],
                         short_window=3, k=10, twin_k=10)
    return data, config


def with_empty_histories(batch, every: int = 4):
    """The batch with the histories of samples 0, every, 2 every, ... removed (L = 0)."""
    from torchrec import KeyedJaggedTensor

    from torchrec_longseq.data.batch import FEATURE_KEYS, HIST_CATEGORY, HIST_ITEM, Batch

    f = batch.features.to_dict()
    b = batch.labels.numel()
    lengths = f[HIST_ITEM].lengths().long()
    keep_sample = torch.arange(b) % every != 0
    keep = keep_sample[jagged.segment_ids(jagged.lengths_to_offsets(lengths), int(lengths.sum()))]
    values, lens = [], []
    for key in FEATURE_KEYS:
        if key in (HIST_ITEM, HIST_CATEGORY):
            values.append(f[key].values()[keep])
            lens.append(torch.where(keep_sample, lengths, 0))
        else:
            values.append(f[key].values())
            lens.append(f[key].lengths().long())
    features = KeyedJaggedTensor(keys=FEATURE_KEYS, values=torch.cat(values),
                                 lengths=torch.cat(lens).int())
    return Batch(features=features, history_time=batch.history_time[keep],
                 request_time=batch.request_time, labels=batch.labels,
                 relevant=batch.relevant[keep])


def derived_tables(model) -> Dict[str, torch.Tensor]:
    from torchrec_longseq.modules.derived import ItemDerivedTable

    return {name: m.table for name, m in model.named_modules() if isinstance(m, ItemDerivedTable)}


def compare_tables(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> Tuple[bool, str]:
    if not ref:
        return True, ""
    notes, ok = [], True
    for name, table in ref.items():
        other = got[name].cpu()
        parts = name.split(".")  # e.g. ...search_unit.signatures.0 -> "signatures.0"
        label = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
        if table.is_floating_point():
            same, diff = close(table, other, MODEL_TOL)
            notes.append(f"{label} max abs diff {diff:.1e}")
        else:
            rows = int((table != other).any(1).sum())
            same = rows == 0
            notes.append(f"{label} {rows} rows differ")
        ok &= same
    return ok, "; ".join(notes)


def check_model(name: str, device: str) -> Tuple[bool, str]:
    from torchrec_longseq.data import SyntheticGenerator
    from torchrec_longseq.models.longseq_ctr import build_model
    from torchrec_longseq.modules.esu import SearchBasedInterest

    data, config = small_world()
    batch = with_empty_histories(SyntheticGenerator(data).batch("train", 0, 32))
    torch.manual_seed(0)
    model = build_model(name, config, data.table_sizes)
    model.refresh_derived_tables()
    model_dev = set_kernel(copy.deepcopy(model).to(device), "torch")  # the torch ops throughout
    model_dev.refresh_derived_tables()  # rebuilt on the device from the same embeddings
    notes: List[str] = []
    ok_tables, note = compare_tables(derived_tables(model), derived_tables(model_dev))
    if note:
        notes.append(f"tables rebuilt on {device}: {note}")
    for key, table in derived_tables(model).items():  # go on from identical tables
        derived_tables(model_dev)[key].copy_(table)
    batch_dev = batch.to(device)
    ok = ok_tables

    # the model's one sequence module ("history"); avg-pool has none
    module = (next(iter(model.sequence_arch.sequences.values()))
              if model.sequence_arch is not None else None)
    if isinstance(module, SearchBasedInterest):
        module_dev = next(iter(model_dev.sequence_arch.sequences.values()))
        with torch.no_grad():
            ref = module.search_unit.search(batch.features, batch.history_time,
                                            batch.request_time)
            got = module_dev.search_unit.search(batch_dev.features, batch_dev.history_time,
                                                batch_dev.request_time)
        same, detail = equal_pairs(ref[:2], got[:2])
        notes.append(f"retrieval {'identical' if same else 'DIFFERS'} ({detail})")
        ok &= same

    def step(m, b, opt):
        logits, aux = m(b.features, b.history_time, b.request_time)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
        for extra in aux:  # auxiliary logits (SIM soft search's), empty for the others
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(extra, b.labels)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        opt.step()
        if m.sequence_arch is not None:  # re-derive the rows the step moved (else next forward)
            m.sequence_arch.refresh_pending()
        return logits, grads

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_dev = torch.optim.SGD(model_dev.parameters(), lr=0.5)
    model.train()
    model_dev.train()
    logits, grads = step(model, batch, opt)
    logits_dev, grads_dev = step(model_dev, batch_dev, opt_dev)
    same, diff = close(logits, logits_dev, MODEL_TOL)
    ok &= same
    worst, bad = 0.0, []
    if set(grads) != set(grads_dev):
        bad.append(f"gradient sets differ: {sorted(set(grads) ^ set(grads_dev))}")
    for pname in grads.keys() & grads_dev.keys():
        g_same, g_diff = close(grads[pname], grads_dev[pname], MODEL_TOL)
        worst = max(worst, g_diff)
        if not g_same:
            bad.append(pname)
    ok &= not bad
    notes.append(f"logits max abs diff {diff:.1e}; {len(grads)} gradients max abs diff {worst:.1e}"
                 + (f", not close: {bad}" if bad else ""))
    ok_tables, note = compare_tables(derived_tables(model), derived_tables(model_dev))
    if note:
        notes.append(f"after an SGD step and sequence_arch.refresh_pending(): {note}")
    ok &= ok_tables
    model.eval()
    model_dev.eval()
    with torch.no_grad():
        after, _ = model(batch.features, batch.history_time, batch.request_time)
        after_dev, _ = model_dev(batch_dev.features, batch_dev.history_time,
                                 batch_dev.request_time)
    same, diff = close(after, after_dev, MODEL_TOL)
    ok &= same
    notes.append(f"logits after the step max abs diff {diff:.1e}")
    return ok, "; ".join(notes)


def check_serving(name: str, device: str) -> Tuple[bool, str]:
    from torchrec_longseq.models.longseq_ctr import build_model
    from torchrec_longseq.schema import default_schema
    from torchrec_longseq.serving import Request, score_request, synthetic_request

    data, config = small_world()
    torch.manual_seed(0)
    model = build_model(name, config, data.table_sizes).eval()
    model.refresh_derived_tables()
    model_dev = set_kernel(copy.deepcopy(model).to(device), "torch")
    request = synthetic_request(data, 60, 20)
    # every tensor of the request on the device: the user, history and candidate dicts, the
    # dense history times
    request_dev = Request(user=moved(request.user, device),
                          history=moved(request.history, device),
                          candidates=moved(request.candidates, device),
                          request_time=request.request_time,
                          history_time=moved(request.history_time, device))
    ref = score_request(model, request)
    got = score_request(model_dev, request_dev)
    same, diff = close(ref, got, MODEL_TOL)
    length = request.history[default_schema().item.history_key].numel()
    return same, (f"{ref.numel()} candidates, L = {length}, max abs diff {diff:.1e}")


def check_validation(device: str) -> Tuple[bool, str]:
    """``check_batch`` on a device batch: a good one passes, a bad id raises ``BatchError``."""
    from torchrec_longseq.data import SyntheticGenerator
    from torchrec_longseq.data.validation import BatchError, check_batch

    data, _ = small_world()
    batch = SyntheticGenerator(data).batch("train", 0, 8)
    check_batch(batch.to(device), data.table_sizes)
    bad_sizes = dict(data.table_sizes, hist_item=1)
    try:
        check_batch(batch.to(device), bad_sizes)
    except BatchError as e:
        return True, f"good batch passes; bad id raises BatchError ({str(e)[:60]}...)"
    return False, "a bad id was not reported"


def check_metrics(device: str, g: torch.Generator) -> Tuple[bool, str]:
    """``CTRMetrics`` (AUC, GAUC, log loss) kept on the device, as ``train.evaluate`` does."""
    from torchrec_longseq.metrics import CTRMetrics

    users = torch.randint(0, 50, (4000,), generator=g)
    logits = torch.randn(4000, generator=g).round(decimals=1)  # ties count one half
    labels = (torch.rand(4000, generator=g) < 0.3).float()
    results = []
    for where in ("cpu", device):
        metrics = CTRMetrics(torch.device(where))
        for part in range(4):
            metrics.update(*moved((users[part::4], logits[part::4], labels[part::4]), where))
        results.append(metrics.compute())
    ok = all(abs(results[0][key] - results[1][key]) <= 1e-6 for key in results[0])
    return ok, ", ".join(f"{key} {results[0][key]:.6f} / {results[1][key]:.6f}"
                         for key in results[0])


# ------------------------------------------------------------------------------------- timing

def median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    def call():
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    if first > 2.0 and not device.startswith("cuda"):  # slow CPU calls: one more, timed
        repeats, warmup = 1, 0
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing_ops(length: int, args: argparse.Namespace) -> Dict[str, Tuple[Callable, bool]]:
    """``name -> (make(device, kernel) -> fn, has_cpu_kernel)`` for L = ``length``."""
    g = torch.Generator().manual_seed(length)
    b, d, k = args.candidates, args.embedding_dim, args.k
    n = b * length
    items, categories = 2000, 100
    offsets = torch.arange(b + 1) * length
    hist_items = torch.randint(0, items, (n,), generator=g)
    hist_categories = torch.randint(0, categories, (n,), generator=g)
    target_items = torch.randint(0, items, (b,), generator=g)
    target_categories = torch.randint(0, categories, (b,), generator=g)
    item_emb = torch.randn(items, d, generator=g)
    category_emb = torch.randn(categories, d, generator=g)
    item_sig = simhash.SimHash(d, args.hash_bits, seed=0)(item_emb)
    category_sig = simhash.SimHash(d, args.hash_bits, seed=1)(category_emb)
    projection = simhash.SimHash(d, args.hash_bits, seed=0).projection
    scores = torch.randn(n, generator=g)
    torch.manual_seed(0)
    attention = TargetAttention(2 * d, 2 * d, args.heads, args.head_dim)
    grad_out = torch.randn(b, args.heads * args.head_dim, generator=g)

    def signatures(device, kernel):
        emb = item_emb[hist_items].to(device)  # [N, d]: hashing every behavior's embedding
        proj = projection.to(device)
        return lambda: simhash.simhash_signatures(emb, proj, kernel=kernel)

    def eta_by_id(device, kernel):
        from torchrec_longseq.modules.eta import signature_topk
        inputs = moved(([item_sig, category_sig], [hist_items, hist_categories],
                        [target_items, target_categories], offsets), device)
        return lambda: signature_topk(*inputs, k, kernel)

    def hamming_topk(device, kernel):  # torch ops only
        hist = torch.cat([item_sig[hist_items], category_sig[hist_categories]], 1).to(device)
        tgt = torch.cat([item_sig[target_items], category_sig[target_categories]], 1).to(device)
        off = offsets.to(device)
        return lambda: simhash.simhash_topk(hist, off, tgt, k)

    def hard(device, kernel):
        inputs = moved((hist_categories, offsets, target_categories), device)
        return lambda: hard_search(*inputs, k, kernel=kernel)

    def topk_float(device, kernel):
        inputs = moved((scores, offsets), device)
        return lambda: jagged_topk(*inputs, k, kernel=kernel)

    def attention_inputs(device, kernel):
        att = set_kernel(copy.deepcopy(attention).to(device), kernel)
        query = torch.cat([item_emb[target_items], category_emb[target_categories]], 1)
        keys = torch.cat([item_emb[hist_items], category_emb[hist_categories]], 1)  # [N, 2 d]
        return att, query.to(device), keys.to(device), offsets.to(device)

    def attention_forward(device, kernel):
        att, query, keys, off = attention_inputs(device, kernel)

        def fn():
            with torch.no_grad():
                return att(query, keys, off)
        return fn

    def attention_train(device, kernel):
        att, query, keys, off = attention_inputs(device, kernel)
        keys.requires_grad_()
        grad = grad_out.to(device)

        def fn():
            att(query, keys, off).backward(grad)
            keys.grad = None
        return fn

    return {
        "SimHash signatures of N embeddings": (signatures, False),
        "Hamming top-k, tables by id (eta.signature_topk)": (eta_by_id, True),
        "Hamming top-k, signatures (simhash_topk)": (hamming_topk, False),
        "hard search": (hard, True),
        "jagged top-k, float scores": (topk_float, True),
        "TargetAttention over all N, forward": (attention_forward, True),
        "TargetAttention over all N, forward + backward": (attention_train, True),
    }


def run_timing(args: argparse.Namespace, have_torchrec: bool) -> List[Dict[str, object]]:
    rows: List[Dict[str, object]] = []
    print(f"\n## Timing: {args.candidates} candidates x L behaviors, k = {args.k}, "
          f"d = {args.embedding_dim}, m = {args.hash_bits} per block, attention "
          f"{args.heads} x {args.head_dim} over keys of width {2 * args.embedding_dim}; ms per "
          f"call (median)\n")
    print(f"| op | L | N | CPU ({torch.get_num_threads()} threads) | CPU torch ops | "
          f"{args.device} | CPU / {args.device} |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        ops = timing_ops(length, args)
        for name, (make, has_kernel) in ops.items():
            if "eta" in name and not have_torchrec:
                continue
            row: Dict[str, object] = {"op": name, "L": length, "N": args.candidates * length}
            try:
                row["cpu_ms"] = 1e3 * median_seconds(make("cpu", "auto"), "cpu",
                                                     args.cpu_repeats, 1)
                if has_kernel:
                    row["cpu_torch_ops_ms"] = 1e3 * median_seconds(
                        make("cpu", "torch"), "cpu", args.cpu_repeats, 1)
                row["device_ms"] = 1e3 * median_seconds(make(args.device, "torch"), args.device,
                                                        args.repeats, 3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            if "error" in row:
                print(f"| {name} | {length:,} | {row['N']:,} | error: {row['error']} | | | |")
                continue
            torch_ops = f"{row['cpu_torch_ops_ms']:.2f}" if has_kernel else "(same)"
            print(f"| {name} | {length:,} | {row['N']:,} | {row['cpu_ms']:.2f} | {torch_ops} | "
                  f"{row['device_ms']:.3f} | {row['cpu_ms'] / row['device_ms']:.1f}x |",
                  flush=True)
        del ops
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--hash-bits", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20, help="timed device calls")
    p.add_argument("--cpu-repeats", type=int, default=3, help="timed CPU calls")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--out", default="runs/gpu_check")
    args = p.parse_args()

    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("no CUDA device (use --device cpu for a smoke test)")
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32
        name = torch.cuda.get_device_name()
    else:
        name = "CPU, kernels off"
    print(f"torch {torch.__version__}, device {device}: {name}, CPU threads "
          f"{torch.get_num_threads()}")

    have_torchrec, router_calls = True, None
    try:
        import torchrec  # noqa: F401

        print(f"torchrec {getattr(torchrec, '__version__', '?')}")
        if device.startswith("cuda"):
            router_calls = fbgemm_cuda_router()
    except Exception as e:
        have_torchrec = False
        print(f"torchrec unavailable ({type(e).__name__}: {e}): module and ETA checks skipped")

    g = torch.Generator().manual_seed(0)
    agreement = Agreement()
    print(f"\n## Agreement: CPU (default path: compiled kernels) vs {device} (torch ops)\n")
    agreement.run("popcount64 / hamming_distance", lambda: check_popcount(device, g))
    agreement.run("simhash_signatures, integer inputs",
                  lambda: check_signatures_exact(device, g))
    agreement.run("simhash_signatures, Gaussian inputs",
                  lambda: check_signatures_gaussian(device, g))
    agreement.run("SimHash projection on device / from meta", lambda: check_simhash_module(device))
    agreement.run("simhash_topk", lambda: check_simhash_topk(device, g))
    agreement.run("hard_search", lambda: check_hard(device, g, shared=False))
    agreement.run("hard_search, shared history", lambda: check_hard(device, g, shared=True))
    agreement.run("jagged_topk, largest", lambda: check_jagged_topk(device, g, largest=True))
    agreement.run("jagged_topk, smallest", lambda: check_jagged_topk(device, g, largest=False))
    for bias in (False, True):
        for shared in (False, True):
            label = f"TargetAttention fwd+bwd{', bias' if bias else ''}" \
                    f"{', shared keys' if shared else ''}"
            agreement.run(label, lambda b=bias, s=shared: check_attention(device, g, b, s))
    if have_torchrec:
        agreement.run("eta.signature_topk", lambda: check_signature_topk(device, g, False))
        agreement.run("eta.signature_topk, shared history",
                      lambda: check_signature_topk(device, g, True))
        agreement.run("twin.twin_topk", lambda: check_twin(device, g, False))
        agreement.run("twin.twin_topk, shared history", lambda: check_twin(device, g, True))
        agreement.run("sdim.collisions_by_id + bucket_mean", lambda: check_sdim(device, g))
        if not args.skip_models:
            agreement.run("data.validation.check_batch", lambda: check_validation(device))
            agreement.run("metrics.CTRMetrics (AUC, GAUC, log loss)",
                          lambda: check_metrics(device, g))
            for model_name in MODEL_NAMES:
                agreement.run(f"model {model_name}: train step",
                              lambda m=model_name: check_model(m, device))
            for model_name in MODEL_NAMES:
                agreement.run(f"model {model_name}: serving.score_request",
                              lambda m=model_name: check_serving(m, device))
    if router_calls is not None:
        print(f"\nFBGEMM operators routed through the CPU for CUDA tensors: "
              f"{dict(router_calls) or 'none'}")

    print("\n| check | result | detail |\n|---|---|---|")
    for row in agreement.rows:
        status = "n/a" if row["ok"] is None else ("agree" if row["ok"] else "**MISMATCH**")
        print(f"| {row['check']} | {status} | {row['detail']} |")

    timing = [] if args.skip_timing else run_timing(args, have_torchrec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({
        "args": vars(args), "torch": torch.__version__, "device_name": name,
        "cpu_threads": torch.get_num_threads(), "agreement": agreement.rows,
        "fbgemm_routed_through_cpu": None if router_calls is None else dict(router_calls),
        "timing_ms": timing}, indent=2))


if __name__ == "__main__":
    main()
