"""DINAttention and TargetAttention against dense padded references, forward and backward.

The references pad the jagged keys to ``[B, Lmax, D]``, compute every (sample, position) pair,
mask the padding and reduce densely; they share only the modules' weights, never their code.
TargetAttention is checked on both of its paths: the compiled kernel (projections absorbed) and
the torch ops.
"""

from typing import List, Tuple
from unittest import mock

import pytest

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from torchrec_longseq import set_kernel
from torchrec_longseq.modules import attention
from torchrec_longseq.modules.attention import DINAttention, TargetAttention, mlp

SETTINGS = settings(max_examples=40, deadline=None)
LENGTH = st.one_of(st.just(0), st.integers(0, 6))
LENGTHS = st.lists(LENGTH, min_size=0, max_size=5)
ATOL, RTOL = 1e-5, 1e-4


def offsets_of(lengths: List[int]) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.long)


def pad(keys: torch.Tensor, lengths: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N, D]`` -> ``([B, Lmax, D]`` zero-padded, ``[B, Lmax]`` mask of real positions)."""
    b, lmax = len(lengths), max(lengths, default=0)
    padded = keys.new_zeros(b, lmax, keys.size(1))
    mask = torch.zeros(b, lmax, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lengths):
        padded[i, :n] = keys[start:start + n]
        mask[i, :n] = True
        start += n
    return padded, mask


def din_reference(att: DINAttention, query: torch.Tensor, keys: torch.Tensor,
                  lengths: List[int]) -> torch.Tensor:
    k, mask = pad(keys, lengths)  # [B, Lmax, D]
    q = query.unsqueeze(1).expand_as(k)  # [B, Lmax, D]
    w = att.score(torch.cat([q, k, q - k, q * k], dim=-1)).squeeze(-1)  # [B, Lmax]
    w = torch.where(mask, w, torch.zeros_like(w))
    return (w.unsqueeze(-1) * k).sum(1)  # [B, D]


def target_reference(att: TargetAttention, query: torch.Tensor, keys: torch.Tensor,
                     lengths: List[int]) -> torch.Tensor:
    h, dh = att.num_heads, att.head_dim
    z, mask = pad(keys, lengths)  # [B, Lmax, Dk]
    b, lmax = mask.shape
    q = (query @ att.q_proj.weight.T).view(b, h, 1, dh)  # [B, H, 1, Dh]
    k = (z @ att.k_proj.weight.T).view(b, lmax, h, dh).transpose(1, 2)  # [B, H, Lmax, Dh]
    v = (z @ att.v_proj.weight.T).view(b, lmax, h, dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / dh**0.5  # [B, H, 1, Lmax]
    nonempty = mask.any(1)
    # an empty sample attends to one zero (padding) key instead of nothing, and is zeroed after,
    # so the reference itself has no NaN to mask in the backward pass
    attend = mask.clone()
    attend[~nonempty, :1] = True
    scores = scores.masked_fill(~attend[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # [B, H, 1, Dh]
    out = out.squeeze(2).reshape(b, h * dh)
    return out * nonempty[:, None].to(out.dtype)


def random_inputs(lengths: List[int], dq: int, dk: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    query = (scale * torch.randn(len(lengths), dq, generator=g)).requires_grad_()
    keys = (scale * torch.randn(sum(lengths), dk, generator=g)).requires_grad_()
    return query, keys


def grads(out: torch.Tensor, upstream: torch.Tensor, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return list(torch.autograd.grad((out * upstream).sum(), tensors, allow_unused=True,
                                    materialize_grads=True))


# ---------------------------------------------------------------------------------------- DIN


@SETTINGS
@given(lengths=LENGTHS, dim=st.integers(1, 5), hidden=st.sampled_from([[4], [6, 3]]),
       seed=st.integers(0, 2**31 - 1))
def test_din_attention_matches_padded_reference(lengths: List[int], dim: int, hidden: List[int],
                                                seed: int) -> None:
    torch.manual_seed(seed)
    att = DINAttention(dim, hidden)
    query, keys = random_inputs(lengths, dim, dim, seed)
    out = att(query, keys, offsets_of(lengths))
    ref = din_reference(att, query, keys, lengths)
    assert out.shape == (len(lengths), dim)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    upstream = torch.randn_like(ref)
    params = [query, keys] + list(att.parameters())
    for got, expected in zip(grads(out, upstream, params), grads(ref, upstream, params)):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    # empty samples: exactly zero
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros(dim))


@SETTINGS
@given(batch=st.integers(0, 4), window=st.integers(0, 6), dim=st.integers(1, 5),
       context_dim=st.sampled_from([0, 3]), seed=st.integers(0, 2**31 - 1))
def test_din_attention_shared_window_equals_copies(batch: int, window: int, dim: int,
                                                   context_dim: int, seed: int) -> None:
    """``offsets=None`` (one window for every query, serving) equals giving each query its own
    copy of the window, and the padded reference, forward and backward."""
    torch.manual_seed(seed)
    att = DINAttention(dim, [4, 3], context_dim)
    query = torch.randn(batch, dim, requires_grad=True)
    keys = torch.randn(window, dim, requires_grad=True)
    context = torch.randn(window, context_dim) if context_dim else None
    shared = att(query, keys, None, context)
    copies = att(query, keys.repeat(batch, 1), offsets_of([window] * batch),
                 None if context is None else context.repeat(batch, 1))
    assert shared.shape == (batch, dim)
    torch.testing.assert_close(shared, copies, atol=ATOL, rtol=RTOL)
    if context is None:
        torch.testing.assert_close(shared, din_reference(att, query, keys.repeat(batch, 1),
                                                         [window] * batch), atol=ATOL, rtol=RTOL)
    upstream = torch.randn(batch, dim)
    params = [query, keys, *att.parameters()]
    for g, e in zip(grads(shared, upstream, params), grads(copies, upstream, params)):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


def test_din_attention_hand_computed() -> None:
    """Weights set so that ``w_j = relu(q . k_j) + 0.5``: the MLP reads only the ``q * k`` block."""
    att = DINAttention(2, [1])
    first, last = att.score[0][0], att.score[1]  # Linear(8, 1) inside mlp, final Linear(1, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.float32))
        first.bias.zero_()
        last.weight.fill_(1.0)
        last.bias.fill_(0.5)
    query = torch.tensor([[1.0, 2.0], [3.0, 3.0], [0.5, -1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0],  # sample 0
                         [2.0, 2.0]])  # sample 2; sample 1 is empty
    out = att(query, keys, torch.tensor([0, 3, 3, 4]))
    # sample 0: q.k = 1, 2, -3 -> w = 1.5, 2.5, 0.5 -> 1.5 [1,0] + 2.5 [0,1] + 0.5 [-1,-1]
    # sample 2: q.k = 1 - 2 = -1 -> w = 0.5 -> 0.5 [2, 2]; no softmax, weights are not normalised
    expected = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(out, expected)


def test_din_attention_all_empty() -> None:
    att = DINAttention(3, [4])
    query = torch.randn(4, 3, requires_grad=True)
    keys = torch.zeros(0, 3, requires_grad=True)
    out = att(query, keys, torch.zeros(5, dtype=torch.long))
    assert torch.equal(out, torch.zeros(4, 3))
    out.sum().backward()
    assert torch.equal(query.grad, torch.zeros(4, 3))
    for p in att.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any())


# -------------------------------------------------------------------------- target attention


PATHS = pytest.mark.parametrize("kernels", ["auto", "torch"], ids=["kernel", "torch-ops"])


@PATHS
@SETTINGS
@given(lengths=LENGTHS, dq=st.integers(1, 5), dk=st.integers(1, 5), heads=st.integers(1, 3),
       head_dim=st.integers(1, 4), scale=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_target_attention_matches_dense_reference(kernels: str, lengths: List[int], dq: int,
                                                  dk: int, heads: int, head_dim: int, scale: float,
                                                  seed: int) -> None:
    """``scale = 30`` makes scores large: the segment softmax must subtract its max."""
    check_target_attention(lengths, dq, dk, heads, head_dim, scale, seed, kernels)


def check_target_attention(lengths: List[int], dq: int, dk: int, heads: int, head_dim: int,
                           scale: float, seed: int, kernel: str = "auto") -> None:
    torch.manual_seed(seed)
    att = set_kernel(TargetAttention(dq, dk, heads, head_dim), kernel)
    assert att.output_dim == heads * head_dim
    query, keys = random_inputs(lengths, dq, dk, seed, scale)
    out = att(query, keys, offsets_of(lengths))
    ref = target_reference(att, query, keys, lengths)
    assert out.shape == (len(lengths), heads * head_dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=ATOL * scale, rtol=RTOL)
    upstream = torch.randn_like(ref)
    params = [query, keys, att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]
    got, expected = grads(out, upstream, params), grads(ref, upstream, params)
    for name, g, e in zip(["query", "keys", "q_proj", "k_proj", "v_proj"], got, expected):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, atol=ATOL * scale * scale, rtol=RTOL, msg=name)
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros(heads * head_dim))
            assert torch.equal(got[0][b], torch.zeros(dq))  # no gradient to an empty sample's query


def test_target_attention_matches_sdpa_per_sample() -> None:
    """A second reference: torch's scaled_dot_product_attention, one sample at a time."""
    torch.manual_seed(0)
    att = TargetAttention(query_dim=6, key_dim=5, num_heads=2, head_dim=3)
    lengths = [3, 1, 0, 7]
    query, keys = random_inputs(lengths, 6, 5, 1)
    out = att(query, keys, offsets_of(lengths))
    start = 0
    for b, n in enumerate(lengths):
        z = keys[start:start + n]
        start += n
        if n == 0:
            assert torch.equal(out[b], torch.zeros(6))
            continue
        q = att.q_proj(query[b:b + 1]).view(1, 2, 3).transpose(0, 1)  # [H, 1, Dh]
        k = att.k_proj(z).view(n, 2, 3).transpose(0, 1)  # [H, n, Dh]
        v = att.v_proj(z).view(n, 2, 3).transpose(0, 1)
        expected = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(6)
        torch.testing.assert_close(out[b], expected, atol=ATOL, rtol=RTOL)


@PATHS
def test_target_attention_hand_computed(kernels: str) -> None:
    """One head, identity projections: softmax(q . k / sqrt(2)) weights the keys themselves."""
    att = set_kernel(TargetAttention(query_dim=2, key_dim=2, num_heads=1, head_dim=2), kernels)
    with torch.no_grad():
        for proj in (att.q_proj, att.k_proj, att.v_proj):
            proj.weight.copy_(torch.eye(2))
    s = 2**0.5
    query = torch.tensor([[s * 1.0, 0.0], [1.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # both in sample 0; sample 1 empty
    out = att(query, keys, torch.tensor([0, 2, 2]))
    # scores 1 and 0 -> weights e / (e + 1), 1 / (e + 1)
    e = torch.e
    expected = torch.tensor([[e / (e + 1), 1 / (e + 1)], [0.0, 0.0]])
    torch.testing.assert_close(out, expected)


@PATHS
def test_target_attention_all_empty_has_zero_output_and_gradients(kernels: str) -> None:
    att = set_kernel(TargetAttention(query_dim=4, key_dim=3, num_heads=2, head_dim=2), kernels)
    query = torch.randn(3, 4, requires_grad=True)
    keys = torch.zeros(0, 3, requires_grad=True)
    out = att(query, keys, torch.zeros(4, dtype=torch.long))
    assert torch.equal(out, torch.zeros(3, 4))
    out.sum().backward()
    assert torch.equal(query.grad, torch.zeros(3, 4))
    for p in att.parameters():
        assert p.grad is None or (torch.isfinite(p.grad).all() and not p.grad.any())


def test_target_attention_ignores_keys_of_other_samples() -> None:
    """Changing sample 1's keys leaves sample 0's and 2's outputs unchanged (no leakage)."""
    torch.manual_seed(0)
    att = TargetAttention(query_dim=3, key_dim=3, num_heads=2, head_dim=2)
    lengths = [2, 3, 1]
    query, keys = random_inputs(lengths, 3, 3, 5)
    offsets = offsets_of(lengths)
    out = att(query, keys, offsets)
    changed = keys.detach().clone()
    changed[2:5] += 100.0
    out2 = att(query, changed, offsets)
    assert torch.equal(out[[0, 2]], out2[[0, 2]])
    assert not torch.allclose(out[1], out2[1])


def test_mlp_layers() -> None:
    m = mlp(4, [8, 2], final_activation=False)
    assert [type(x) for x in m] == [nn.Linear, nn.ReLU, nn.Linear]
    m = mlp(4, [8, 2])
    assert [type(x) for x in m] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU]


@PATHS
@pytest.mark.parametrize("projected", [False, True])
@SETTINGS
@given(batch=st.integers(0, 4), window=st.integers(0, 7), heads=st.integers(1, 3),
       with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_target_attention_shared_keys_equal_copies(kernels: str, projected: bool, batch: int,
                                                   window: int, heads: int, with_bias: bool,
                                                   seed: int) -> None:
    """``offsets=None`` (every query attends to all keys: one user's history in serving) equals
    giving each query its own copy of the keys and biases, forward and backward, with the
    projections absorbed into the queries or the shared keys projected once
    (``projects_shared_keys``); no key gives zeros."""
    with mock.patch.object(attention, "projects_shared_keys", lambda *shape: projected):
        torch.manual_seed(seed)
        att = set_kernel(TargetAttention(query_dim=5, key_dim=4, num_heads=heads, head_dim=3),
                         kernels)
        query = torch.randn(batch, 5, requires_grad=True)
        keys = torch.randn(window, 4, requires_grad=True)
        bias = torch.randn(window, heads) if with_bias else None
        shared = att(query, keys, None, bias)
        copies = att(query, keys.repeat(batch, 1), offsets_of([window] * batch),
                     None if bias is None else bias.repeat(batch, 1))
        assert shared.shape == (batch, 3 * heads)
        torch.testing.assert_close(shared, copies, atol=ATOL, rtol=RTOL)
        if window == 0:
            assert torch.equal(shared, torch.zeros(batch, 3 * heads))
        upstream = torch.randn(batch, 3 * heads)
        params = [query, keys, *att.parameters()]
        for g, e in zip(grads(shared, upstream, params), grads(copies, upstream, params)):
            torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


def test_projects_shared_keys_when_it_costs_fewer_multiply_adds() -> None:
    """Projected: ``2 N H Dh (Dk + B)``; absorbed: ``2 B N H Dk`` (and the queries' ``B H Dh
    Dk``). Dh = 8, Dk = 40: projecting wins from B = 11 on; with Dk = Dh it never saves."""
    assert not attention.projects_shared_keys(10, 8, 40)
    assert attention.projects_shared_keys(11, 8, 40)
    assert not attention.projects_shared_keys(10**6, 8, 8)


# ------------------------------------------------------------------------- the ESU's evidence


def evidence_reference(att: TargetAttention, query: torch.Tensor, keys: torch.Tensor,
                       lengths: List[int], bias: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_j exp(logit_hj))`` per sample and head on padded keys: logsumexp over the
    real positions and one 0 (the null behavior)."""
    h, dh = att.num_heads, att.head_dim
    z, mask = pad(keys, lengths)  # [B, Lmax, Dk]
    extra, _ = pad(bias, lengths)  # [B, Lmax, H]
    b, lmax = mask.shape
    q = (query @ att.q_proj.weight.T).view(b, 1, h, dh)
    k = (z @ att.k_proj.weight.T).view(b, lmax, h, dh)
    logits = (q * k).sum(-1) / dh**0.5 + extra  # [B, Lmax, H]
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    return torch.logsumexp(torch.cat([logits, logits.new_zeros(b, 1, h)], dim=1), dim=1)


@SETTINGS
@given(lengths=LENGTHS, dq=st.integers(1, 5), dk=st.integers(1, 5), heads=st.integers(1, 3),
       head_dim=st.integers(1, 4), scale=st.sampled_from([1.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_evidence_matches_padded_reference(lengths: List[int], dq: int, dk: int, heads: int,
                                           head_dim: int, scale: float, seed: int) -> None:
    """Jagged, indexed and shared-keys forms against the padded reference, with gradients;
    an empty sample's evidence is 0."""
    torch.manual_seed(seed)
    att = TargetAttention(dq, dk, heads, head_dim)
    query, keys = random_inputs(lengths, dq, dk, seed, scale)
    bias = torch.randn(keys.size(0), heads)
    offsets = offsets_of(lengths)
    out = attention.evidence(att.q_proj(query), keys, offsets, att.k_proj.weight, heads, bias)
    ref = evidence_reference(att, query, keys, lengths, bias)
    assert out.shape == (len(lengths), heads) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=ATOL * scale * scale, rtol=RTOL)
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros(heads))
    upstream = torch.randn_like(ref)
    params = [query, keys, att.q_proj.weight, att.k_proj.weight]
    for g, e in zip(grads(out, upstream, params), grads(ref, upstream, params)):
        torch.testing.assert_close(g, e, atol=ATOL * scale**3, rtol=1e-3)
    # the same behaviors read through an index (reversed rows of a table)
    index = torch.arange(keys.size(0) - 1, -1, -1)
    indexed = attention.evidence(att.q_proj(query), keys[index], offsets, att.k_proj.weight,
                                 heads, bias[index], index)
    torch.testing.assert_close(indexed, out, atol=ATOL * scale * scale, rtol=RTOL)
    # every query against one shared history equals each query against a copy of it
    if lengths and lengths[0]:
        n0 = lengths[0]
        shared = attention.evidence(att.q_proj(query), keys[:n0], None, att.k_proj.weight,
                                    heads, bias[:n0])
        copies = attention.evidence(att.q_proj(query), keys[:n0].repeat(len(lengths), 1),
                                    offsets_of([n0] * len(lengths)), att.k_proj.weight, heads,
                                    bias[:n0].repeat(len(lengths), 1))
        torch.testing.assert_close(shared, copies, atol=ATOL * scale * scale, rtol=RTOL)


def test_esu_with_evidence_appends_it_to_the_heads_outputs() -> None:
    """The first H Dh columns are the plain ESU's (same weights), the last H the evidence; a
    sample with nothing retrieved gets zeros in both."""
    from torchrec_longseq.modules.esu import ExactSearchUnit
    from torchrec_longseq.modules.time import TimeIntervalEmbedding

    torch.manual_seed(0)
    plain = ExactSearchUnit(6, TimeIntervalEmbedding(4), 2, 3)
    counting = ExactSearchUnit(6, TimeIntervalEmbedding(4), 2, 3, evidence=True)
    counting.load_state_dict(plain.state_dict())
    assert (plain.output_dim, counting.output_dim) == (6, 8)
    target, behaviors = torch.randn(3, 6), torch.randn(5, 6)
    offsets, intervals = torch.tensor([0, 2, 2, 5]), torch.randint(1, 10**7, (5,))
    out = counting(target, behaviors, offsets, intervals)
    torch.testing.assert_close(out[:, :6], plain(target, behaviors, offsets, intervals))
    keys = torch.cat([behaviors, counting.time_embedding(intervals)], dim=1)
    att = counting.attention
    torch.testing.assert_close(out[:, 6:], evidence_reference(att, target, keys, [2, 0, 3],
                                                              torch.zeros(5, 2)))
    assert torch.equal(out[1], torch.zeros(8))


# ------------------------------------------------------------------ the ESU's similarity term


def esu_reference(esu, target: torch.Tensor, behaviors: torch.Tensor, intervals: torch.Tensor,
                  lengths: List[int]) -> torch.Tensor:
    """The ESU on padded behaviors, every (candidate, behavior) pair's logit written out:
    ``q . k / sqrt(Dh) + time bias + scale_h (cos(t[cols], e[cols]) - threshold_h)``; softmax
    over the real positions, then (with ``evidence``) ``log(1 + sum exp)``."""
    att, h = esu.attention, esu.attention.num_heads
    dh = att.head_dim
    time = esu.time_embedding(intervals)
    keys = behaviors if esu.time_as_bias else torch.cat([behaviors, time], dim=1)
    z, mask = pad(keys, lengths)
    e, _ = pad(behaviors, lengths)
    b, lmax = mask.shape
    q = (target @ att.q_proj.weight.T).view(b, 1, h, dh)
    k = (z @ att.k_proj.weight.T).view(b, lmax, h, dh)
    v = (z @ att.v_proj.weight.T).view(b, lmax, h, dh)
    logits = (q * k).sum(-1) / dh**0.5  # [B, Lmax, H]
    if esu.time_as_bias:
        logits = logits + pad(time, lengths)[0]
    start, stop = esu.similarity
    t, x = target[:, None, start:stop], e[:, :, start:stop]
    cos = (t * x).sum(-1) / (t.norm(dim=-1).clamp(min=1e-8) * x.norm(dim=-1).clamp(min=1e-8))
    logits = logits + (cos[:, :, None] - esu.similarity_threshold) * esu.similarity_scale
    logits = logits.masked_fill(~mask[:, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # an empty sample: zeros
    out = (weights[..., None] * v).sum(1).flatten(1)
    if not esu.evidence:
        return out
    mass = torch.logsumexp(torch.cat([logits, logits.new_zeros(b, 1, h)], dim=1), dim=1)
    return torch.cat([out, mass], dim=1)


@SETTINGS
@given(lengths=LENGTHS, cols=st.sampled_from([(0, 3), (2, 5), (0, 5)]),
       time_as_bias=st.booleans(), evidence=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_esu_similarity_matches_padded_reference(lengths: List[int], cols: Tuple[int, int],
                                                 time_as_bias: bool, evidence: bool,
                                                 seed: int) -> None:
    """The similarity term in the jagged, indexed (serving's distinct behaviors) and shared
    (one history for every candidate) layouts against the padded reference, with gradients,
    its logits (averaged over heads) too; a sample with nothing retrieved gets zeros."""
    from torchrec_longseq.modules.esu import ExactSearchUnit
    from torchrec_longseq.modules.time import TimeIntervalEmbedding

    torch.manual_seed(seed)
    heads = 2
    esu = ExactSearchUnit(5, TimeIntervalEmbedding(heads if time_as_bias else 3), heads, 3,
                          time_as_bias=time_as_bias, evidence=evidence, similarity=cols,
                          similarity_scale=4.0)
    with torch.no_grad():
        esu.similarity_scale.copy_(torch.tensor([4.0, -2.0]))
        esu.similarity_threshold.copy_(torch.tensor([0.3, -0.5]))
    target, behaviors = random_inputs(lengths, 5, 5, seed)
    intervals = torch.randint(1, 10**7, (behaviors.size(0),))
    offsets = offsets_of(lengths)
    out = esu(target, behaviors, offsets, intervals)
    ref = esu_reference(esu, target, behaviors, intervals, lengths)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros(esu.output_dim))
    upstream = torch.randn_like(ref)
    params = [target, behaviors, esu.similarity_scale, esu.similarity_threshold,
              esu.attention.k_proj.weight]
    for g, e in zip(grads(out, upstream, params), grads(ref, upstream, params)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)
    index = torch.arange(behaviors.size(0) - 1, -1, -1)  # the behaviors read through an index
    indexed = esu(target, behaviors[index], offsets, intervals[index], index)
    torch.testing.assert_close(indexed, out, atol=ATOL, rtol=RTOL)
    if lengths and lengths[0]:  # every candidate against one shared history = against copies
        n0, b = lengths[0], len(lengths)
        shared = esu(target, behaviors[:n0], None, intervals[:n0])
        copies = esu(target, behaviors[:n0].repeat(b, 1), offsets_of([n0] * b),
                     intervals[:n0].repeat(b))
        torch.testing.assert_close(shared, copies, atol=ATOL, rtol=RTOL)
    if behaviors.size(0):
        logits = esu.logits(target, behaviors, offsets, intervals)
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        att = esu.attention
        keys = behaviors if time_as_bias else torch.cat(
            [behaviors, esu.time_embedding(intervals)], dim=1)
        plain = attention.head_logits(att.q_proj(target), att.k_proj(keys), seg, heads,
                                      esu.time_embedding(intervals) if time_as_bias else None)
        start, stop = cols
        cos = F.cosine_similarity(target[seg, start:stop], behaviors[:, start:stop], dim=1)
        term = (cos[:, None] - esu.similarity_threshold) * esu.similarity_scale
        torch.testing.assert_close(logits, (plain + term).mean(1), atol=ATOL, rtol=RTOL)


def test_esu_similarity_by_hand() -> None:
    """Projections at 0: every head's weights are ``softmax(scale cos)``. A behavior equal to
    the candidate on the columns (cos 1) against an orthogonal one (cos 0), scale 2: weights
    ``e^2 / (e^2 + 1)`` and ``1 / (e^2 + 1)``; the evidence is ``log(1 + e^2 + 1)``. With the
    threshold at 0.5 the weights stay, the evidence is ``log(1 + e^(2 (1 - 0.5)) + e^(2 (0 -
    0.5)))``. Bad columns are refused."""
    from torchrec_longseq.modules.esu import ExactSearchUnit
    from torchrec_longseq.modules.time import TimeIntervalEmbedding

    esu = ExactSearchUnit(2, TimeIntervalEmbedding(1), 1, 2, time_as_bias=True, evidence=True,
                          similarity=(0, 2), similarity_scale=2.0)
    with torch.no_grad():
        esu.attention.q_proj.weight.zero_()
        esu.time_embedding.embedding.weight.zero_()
        esu.attention.v_proj.weight.copy_(torch.eye(2))
    out = esu(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 5.0]]),
              torch.tensor([0, 2]), torch.tensor([60, 60]))
    e2 = torch.exp(torch.tensor(2.0))
    expected = torch.stack([3 * e2 / (e2 + 1), 5 / (e2 + 1), torch.log(2 + e2)])
    torch.testing.assert_close(out[0], expected)
    with torch.no_grad():
        esu.similarity_threshold.fill_(0.5)
    out = esu(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 5.0]]),
              torch.tensor([0, 2]), torch.tensor([60, 60]))
    e = torch.exp(torch.tensor(1.0))
    expected[2] = torch.log(1 + e + 1 / e)
    torch.testing.assert_close(out[0], expected)
    for cols in [(2, 1), (0, 3), (-1, 1)]:
        with pytest.raises(ValueError, match="similarity columns"):
            ExactSearchUnit(2, TimeIntervalEmbedding(1), 1, 2, time_as_bias=True, similarity=cols)
