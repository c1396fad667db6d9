"""Target attention over jagged behavior sequences (the exact search unit, ESU).

Both attentions here work on the jagged values directly: a query per sample ``[B, D]`` is
broadcast to its behaviors with ``segment_ids``, scores are computed per behavior ``[N]``, and
the weighted values are summed per sample. Nothing is padded to the longest history, and a sample
with no behavior gets a zero vector (never NaN).
"""

from typing import List, Optional, Tuple

import torch
from torch import nn

from torchrec_longseq import jagged
from torchrec_longseq.retrieval import kernels


def mlp(in_dim: int, layer_sizes: List[int], final_activation: bool = True) -> nn.Sequential:
    """``Linear -> ReLU`` stack; the last layer has no activation unless ``final_activation``.
    The ReLUs work in place (each follows a layer whose output nothing else keeps)."""
    layers: List[nn.Module] = []
    for i, out_dim in enumerate(layer_sizes):
        layers.append(nn.Linear(in_dim, out_dim))
        if final_activation or i < len(layer_sizes) - 1:
            layers.append(nn.ReLU(inplace=True))
        in_dim = out_dim
    return nn.Sequential(*layers)


def head_logits(query: torch.Tensor, keys: torch.Tensor, seg: torch.Tensor, num_heads: int,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product logits per head: projected ``query [B, H * Dh]`` against projected
    ``keys [N, H * Dh]`` of sample ``seg [N]``, plus ``bias [N, H]`` -> ``[N, H]``."""
    head_dim = keys.size(1) // num_heads
    q = query.view(-1, num_heads, head_dim)[seg]  # [N, H, Dh]
    logits = (q * keys.view(-1, num_heads, head_dim)).sum(-1) / head_dim**0.5
    return logits if bias is None else logits + bias


class DINAttention(nn.Module):
    """DIN's activation unit (Zhou et al., KDD 2018) over a jagged history.

    For a query ``q`` (the candidate) and behaviors ``k_j`` of its sample, the weight of ``k_j`` is
    ``MLP([q, k_j, q - k_j, q * k_j, c_j])`` and the output is ``sum_j w_j k_j``, where ``c_j``
    is optional side information of the behavior (here its time-interval embedding, so the unit
    can tell recent from old). As in the paper there is no softmax, so the output keeps the
    intensity of the interest (how many behaviors match). The first layer is evaluated split by
    what each input depends on (see ``_first_layer``).

    Shapes: B samples, N behaviors in all, D the embedding dimension, C the side width.

    Args:
        embedding_dim (int): D, the width of queries and keys.
        hidden (List[int]): widths of the attention MLP's hidden layers.
        context_dim (int): C, width of the side information (0 for none).

    Example::

        att = DINAttention(8, [16])
        out = att(torch.randn(2, 8), torch.randn(5, 8), torch.tensor([0, 3, 5]))  # [2, 8]
    """

    def __init__(self, embedding_dim: int, hidden: List[int], context_dim: int = 0) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.output_dim = embedding_dim
        self.score = nn.Sequential(mlp(4 * embedding_dim + context_dim, hidden),
                                   nn.Linear(hidden[-1], 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, offsets: Optional[torch.Tensor],
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query [B, D]``, ``keys [N, D]``, ``offsets [B + 1]``, ``context [N, C]`` ->
        ``[B, D]``. ``offsets=None``: the N keys (and contexts) are every query's, one user's
        window shared by its candidates (serving); per-key terms are then computed once."""
        w_query, w_key, w_pair, bias = self._first_layer(query.size(1))
        per_query = nn.functional.linear(query, w_query, bias)  # [B, h]
        per_key = [keys] if context is None else [keys, context]
        if offsets is None:
            b, n, h = query.size(0), keys.size(0), w_pair.size(0)
            pairs = (query.unsqueeze(1) * keys.unsqueeze(0)).view(b * n, keys.size(1))  # [B N, D]
            hidden = nn.functional.linear(pairs, w_pair).view(b, n, h)  # [B, N, h], added in place
            hidden = hidden.add_(nn.functional.linear(torch.cat(per_key, dim=1), w_key)).add_(
                per_query.unsqueeze(1))
            return self._weight(hidden).squeeze(2) @ keys  # [B, N] @ [N, D]
        seg = jagged.segment_ids(offsets, keys.size(0))
        inputs = torch.cat(per_key + [query[seg] * keys], dim=1)  # [N, D + C + D]
        hidden = per_query[seg] + nn.functional.linear(inputs, torch.cat([w_key, w_pair], dim=1))
        return jagged.segment_sum(self._weight(hidden) * keys, seg, query.size(0))

    def _first_layer(self, d: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first layer split by what its inputs depend on: ``W [q, k, q - k, q k, c] =
        (W_q + W_d) q + [W_k - W_d, W_c] [k, c] + W_qk (q k)``, so the query's columns run once
        per sample and the key's once per key, and only ``q k`` per pair (the same function at
        under half the multiply-adds). Returns ``(query [h, D], key [h, D + C], pair [h, D],
        bias [h])``."""
        first = self.score[0][0]
        w = first.weight  # columns: q | k | q - k | q * k | context
        w_query = w[:, :d] + w[:, 2 * d:3 * d]
        w_key = torch.cat([w[:, d:2 * d] - w[:, 2 * d:3 * d], w[:, 4 * d:]], dim=1)
        return w_query, w_key, w[:, 3 * d:4 * d].contiguous(), first.bias

    def _weight(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rest of the MLP: the first layer's pre-activation ``[..., h]`` -> ``[..., 1]``."""
        for i, layer in enumerate(self.score[0]):  # its ReLU and the layers after it
            if i > 0:
                hidden = layer(hidden)
        return self.score[1](hidden)


class TargetAttention(nn.Module):
    """Multi-head scaled dot-product attention of the candidate over its retrieved behaviors.

    ``q = W_q t``, ``k_j = W_k z_j``, ``v_j = W_v z_j`` split into H heads of width ``Dh``; per head
    ``softmax_j(q . k_j / sqrt(Dh) + bias_j)`` weights the ``v_j``; heads are concatenated (SIM,
    ETA). ``bias [N, H]`` is optional (TWIN's scalar biases from user-item cross features).
    An empty retrieval yields zeros.

    Args:
        query_dim (int): width of the candidate representation ``t``.
        key_dim (int): width of a behavior representation ``z_j``.
        num_heads (int): H.
        head_dim (int): Dh; the output has ``H * Dh`` columns.

    Example::

        att = TargetAttention(query_dim=8, key_dim=12, num_heads=2, head_dim=4)
        out = att(torch.randn(2, 8), torch.randn(5, 12), torch.tensor([0, 3, 5]))  # [2, 8]
    """

    def __init__(self, query_dim: int, key_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"target attention needs num_heads >= 1 and head_dim >= 1, got "
                             f"{num_heads} and {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel = "auto"  # retrieval.kernels.set_kernel
        self.q_proj = nn.Linear(query_dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(key_dim, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(key_dim, num_heads * head_dim, bias=False)

    @property
    def output_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(self, query: torch.Tensor, keys: torch.Tensor, offsets: Optional[torch.Tensor],
                bias: Optional[torch.Tensor] = None,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query [B, Dq]``, ``keys [N, Dk]``, ``offsets [B + 1]``, ``bias [N, H]`` ->
        ``[B, H * Dh]``. ``offsets=None``: the N keys are every query's (one user's history
        shared by its candidates, serving). ``index [M]``: attend over ``keys[index]`` (and
        ``bias[index]``), jagged by ``offsets`` (serving's distinct behaviors, see ``attend``)."""
        return attend(self.q_proj(query), keys, offsets, self.k_proj.weight, self.v_proj.weight,
                      self.num_heads, bias, index, self.kernel)


def evidence(query: torch.Tensor, keys: torch.Tensor, offsets: Optional[torch.Tensor],
             k_weight: torch.Tensor, num_heads: int, bias: Optional[torch.Tensor] = None,
             index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How much the behaviors match the candidate, per head: ``log(1 + sum_j exp(logit_hj))``,
    the attention mass that ``attend``'s softmax divides away (``jagged.segment_log1p_sum_exp``).
    Inputs as ``attend``'s (``query`` projected, ``keys`` raw) -> ``[B, H]``; 0 for a sample
    with no behavior. ``offsets=None``: every query's behaviors are all N keys."""
    if index is not None:
        keys = keys.index_select(0, index)
        bias = bias.index_select(0, index) if bias is not None else None
    projected = nn.functional.linear(keys, k_weight)  # [N, H Dh]
    if offsets is None:  # one shared history: every query against every key, [B N, H]
        b, n = query.size(0), keys.size(0)
        seg = torch.arange(b, device=keys.device).repeat_interleave(n)
        projected = projected.repeat(b, 1)
        bias = bias.repeat(b, 1) if bias is not None else None
        return jagged.segment_log1p_sum_exp(head_logits(query, projected, seg, num_heads, bias),
                                            seg, b)
    seg = jagged.segment_ids(offsets, keys.size(0))
    return jagged.segment_log1p_sum_exp(head_logits(query, projected, seg, num_heads, bias), seg,
                                        query.size(0))


def projects_shared_keys(num_queries: int, head_dim: int, key_dim: int) -> bool:
    """Whether ``attend`` with keys shared by all ``num_queries`` queries (``offsets=None``)
    projects each key and value once (``2 N H Dh Dk + 2 B N H Dh`` multiply-adds) rather than
    absorbing the projections into the queries (``2 B N H Dk``): the first is fewer when
    ``B (Dk - Dh) > Dh Dk``. Serving's 200 candidates over a shared window or history, Dh = 8:
    4x fewer with Dk = 40, 10x with Dk = 136 (the per-query terms, ``B H Dh Dk`` each, aside).
    A symbolic ``num_queries`` (an exported serving graph, any number of candidates) takes the
    choice for serving's hundreds: projecting wherever ``Dk > Dh``."""
    if isinstance(num_queries, torch.SymInt):
        return key_dim > head_dim
    return num_queries * (key_dim - head_dim) > head_dim * key_dim


@torch.fx.wrap
def attend(query: torch.Tensor, keys: torch.Tensor, offsets: Optional[torch.Tensor],
           k_weight: torch.Tensor, v_weight: torch.Tensor, num_heads: int,
           bias: Optional[torch.Tensor], index: Optional[torch.Tensor] = None,
           kernel: str = "auto") -> torch.Tensor:
    """``TargetAttention`` after the query projection: projected ``query [B, H * Dh]``, raw
    ``keys [N, Dk]``, ``k_weight`` and ``v_weight [H * Dh, Dk]``, ``bias [N, H]``, ``index [M]``
    (optional: the behaviors are ``keys[index]``) -> ``[B, H * Dh]``.

    On CPU the compiled kernel computes it with the projections absorbed: ``q_h . (W_k,h z_j) =
    (W_k,h^T q_h) . z_j`` and ``sum_j w_hj W_v,h z_j = W_v,h sum_j w_hj z_j``, so nothing is
    projected per behavior (``H Dk`` multiply-adds per behavior and head pass instead of
    ``H Dh Dk``), and it reads ``keys[index[n]]`` in place (serving's distinct behaviors, each
    keyed once). Elsewhere (GPU, ``kernel="torch"``) the torch ops gather the indexed
    rows and project the keys and values. The two agree to float rounding (tested).
    ``offsets=None`` (every query attends to all N keys: one user's history in serving) is two
    matrix products, absorbed the same way, unless projecting the shared keys and values once
    costs fewer multiply-adds (``projects_shared_keys``: B above ``Dh Dk / (Dk - Dh)``).
    """
    b, head_dim, key_dim = query.size(0), query.size(1) // num_heads, keys.size(1)
    per_head = query.view(b, num_heads, head_dim).transpose(0, 1)  # [H, B, Dh]
    project = offsets is None and projects_shared_keys(b, head_dim, key_dim)
    if not project:  # the key projection absorbed into the queries
        h_k = k_weight.view(num_heads, head_dim, key_dim)  # [H, Dh, Dk]
        qa = torch.bmm(per_head, h_k).transpose(0, 1) / head_dim**0.5  # [B, H, Dk]
    pooled: Optional[torch.Tensor] = None
    if offsets is not None:
        pooled = kernels.target_attention(qa, keys, offsets, bias, index, kernel)  # [B, H, Dk]
    if pooled is None and index is not None:  # the torch ops read the gathered rows
        keys = keys.index_select(0, index)
        bias = bias.index_select(0, index) if bias is not None else None
    if project:  # each shared key and value projected once
        n = keys.size(0)
        k = nn.functional.linear(keys, k_weight).view(n, num_heads, head_dim)  # [N, H, Dh]
        v = nn.functional.linear(keys, v_weight).view(n, num_heads, head_dim)
        logits = torch.bmm(per_head / head_dim**0.5, k.permute(1, 2, 0))  # [H, B, N]
        if bias is not None:
            logits = logits + bias.t().unsqueeze(1)
        weights = torch.softmax(logits, dim=2)
        return torch.bmm(weights, v.transpose(0, 1)).transpose(0, 1).reshape(  # [B, H Dh]
            b, num_heads * head_dim)
    if offsets is None:  # [B H, Dk] @ [Dk, N]: every query against the shared keys
        n = keys.size(0)
        logits = (qa.reshape(b * num_heads, key_dim) @ keys.t()).view(b, num_heads, n)
        if bias is not None:
            logits = logits + bias.t()
        weights = torch.softmax(logits, dim=2).view(b * num_heads, n)  # [B H, N]
        pooled = (weights @ keys).view(b, num_heads, key_dim)
    if pooled is not None:  # per head: [B, Dk] @ [Dk, Dh]
        h_v = v_weight.view(num_heads, head_dim, key_dim).transpose(1, 2)  # [H, Dk, Dh]
        return torch.bmm(pooled.transpose(0, 1), h_v).transpose(0, 1).reshape(
            b, num_heads * head_dim)
    seg = jagged.segment_ids(offsets, keys.size(0))
    v = nn.functional.linear(keys, v_weight).view(-1, num_heads, head_dim)  # [N, H, Dh]
    scores = head_logits(query, nn.functional.linear(keys, k_weight), seg, num_heads, bias)
    weights = jagged.segment_softmax(scores, seg, query.size(0))  # [N, H]
    out = jagged.segment_sum(weights.unsqueeze(-1) * v, seg, query.size(0))  # [B, H, Dh]
    return out.flatten(1)
