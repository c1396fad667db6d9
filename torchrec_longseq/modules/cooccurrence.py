"""A co-occurrence loss over the recent window: item similarity learned from histories.

Clicks alone teach the tables little about which items are alike when relevance is item-level
(docs/fidelity.md, section 7): a candidate meets its few similar old behaviors among hundreds,
and the click's gradient spreads over all of them. A user's recent behaviors, though, come from
a few interests at a time, so behaviors of one window are alike more often than two random
ones. ``cooccurrence_loss`` pulls the rows of one window together and pushes them from the other
requests' windows (a supervised-contrastive loss, in-batch negatives), on the rows the short-term
branch looks up anyway: no extra lookup. It is a departure from the papers (opt-in:
``ModelConfig.cooccurrence``, ``train.py --cooccurrence``), which learn the tables from clicks
alone on far more data.
"""

import torch

from torchrec_longseq import jagged


def cooccurrence_loss(rows: torch.Tensor, offsets: torch.Tensor, requests: torch.Tensor,
                      temperature: float = 10.0, max_rows: int = 4096) -> torch.Tensor:
    """Supervised-contrastive loss of the windows' rows.

    Args:
        rows: ``[S, D]`` the looked-up rows of every sample's window, sample by sample.
        offsets: ``[B + 1]`` each sample's rows in ``rows``.
        requests: ``[B]`` a request key per sample (e.g. the request time): samples with one key
            share one history, so only the first of them is used (its copies would be false
            negatives).
        temperature: the scale of the raw dot products (the tables start near 0).
        max_rows: at most this many rows, the first kept samples' (the cost is ``max_rows^2``).

    Every kept row ``a`` with at least one other row in its window is an anchor:
    ``loss_a = -mean_{p in a's window, p != a} log softmax_{k != a}(temperature r_a . r_k)[p]``
    over the kept rows ``k``; the loss is the anchors' mean, 0 (with a gradient of 0) when there
    is none.
    """
    b = requests.numel()
    seg = jagged.segment_ids(offsets, rows.size(0))
    index = torch.arange(b, device=requests.device)
    _, inverse = torch.unique(requests, return_inverse=True)
    first = torch.full((b,), b, dtype=torch.long, device=requests.device).scatter_reduce(
        0, inverse, index, reduce="amin", include_self=True)
    keep = (first[inverse] == index)[seg]  # [S] rows of the first sample of each request
    kept = torch.nonzero(keep).squeeze(1)[:max_rows]
    x, s = rows.index_select(0, kept), seg.index_select(0, kept)
    eye = torch.eye(kept.numel(), dtype=torch.bool, device=rows.device)
    logits = temperature * x @ x.T  # a row is not its own negative (finite: no NaN for one row)
    logp = logits.masked_fill(eye, torch.finfo(logits.dtype).min).log_softmax(dim=1)
    positive = (s[:, None] == s[None, :]) & ~eye
    count = positive.sum(dim=1)
    per_anchor = -logp.masked_fill(~positive, 0).sum(dim=1) / count.clamp(min=1)
    anchors = count > 0
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)
