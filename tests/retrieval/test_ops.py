"""The ``longseq`` operators (``torchrec_longseq/csrc``) as registered operators: ``opcheck`` of
every schema, fake kernel and autograd registration (with empty segments and length-0
histories), ``torch.compile(fullgraph=True)`` and ``torch.export`` of the searches and the
attention against eager, and the attention's gradients against the torch-ops path."""

import pytest
import torch

from torchrec_longseq.retrieval import kernels

pytestmark = pytest.mark.skipif(not kernels.build(), reason="the longseq operators did not build")

OPS = torch.ops.longseq if kernels.build() else None

# every one of opcheck's tests, also for the operators whose output size depends on the data
# (the selected positions: the fake kernels give it with new_dynamic_size, an unbacked size that
# test_aot_dispatch_dynamic traces through)
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _segments(lengths):
    offsets = torch.tensor([0] + torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist())
    return offsets, offsets[:-1].clone(), offsets[1:].clone()


def _signatures(rows: int, words: int, seed: int) -> torch.Tensor:
    return torch.randint(-(2**62), 2**62, (rows, words), generator=_g(seed))


def _hamming_args(lengths, k: int, words: int = 1):
    n, b = sum(lengths), len(lengths)
    items, cats = _signatures(10, words, 1), _signatures(5, 1, 2)
    item_ids = torch.randint(0, 10, (n,), generator=_g(3))
    cat_ids = torch.randint(0, 5, (n,), generator=_g(4))
    targets = items[torch.randint(0, 10, (b,), generator=_g(5))]
    cat_targets = cats[torch.randint(0, 5, (b,), generator=_g(6))]
    _, starts, ends = _segments(lengths)
    return items, item_ids, targets, cats, cat_ids, cat_targets, starts, ends, k


def _twin_args(lengths, shared: bool, k: int):
    n, b = (lengths[0] if shared else sum(lengths)), len(lengths)
    w = 4
    starts, ends = ((torch.zeros(b, dtype=torch.long), torch.full((b,), n, dtype=torch.long))
                    if shared else _segments(lengths)[1:])
    return (torch.randn(7, 2 * w, generator=_g(1)), torch.randint(0, 7, (n,), generator=_g(2)),
            torch.randn(3, 2 * w, generator=_g(3)), torch.randint(0, 3, (n,), generator=_g(4)),
            torch.randn(b, w, generator=_g(5)), torch.randn(n, generator=_g(6)).round(),
            starts, ends, k, 0.5, shared)


def _sdim_args(lengths):
    n, b = sum(lengths), len(lengths)
    _, starts, ends = _segments(lengths)
    return (torch.randint(0, 2**40, (8, 1), generator=_g(1)),
            torch.randint(0, 8, (n,), generator=_g(2)),
            torch.randint(0, 2**40, (4, 1), generator=_g(3)),
            torch.randint(0, 4, (n,), generator=_g(4)), torch.randint(0, 8, (b,), generator=_g(5)),
            torch.randint(0, 4, (b,), generator=_g(6)), starts, ends, 3, 4)


def _attention_args(lengths, heads: int, key_dim: int, bias: bool, rows=None,
                    dtype=torch.float32, grad: bool = True):
    offsets, _, _ = _segments(lengths)
    b, m = len(lengths), int(offsets[-1])
    n = m if rows is None else rows
    qa = torch.randn(b, heads, key_dim, generator=_g(1), dtype=dtype)
    keys = torch.randn(n, key_dim, generator=_g(2), dtype=dtype)
    bias_t = torch.randn(n, heads, generator=_g(3), dtype=dtype) if bias else None
    index = None if rows is None else torch.randint(0, rows, (m,), generator=_g(4))
    if grad:
        qa.requires_grad_()
        keys.requires_grad_()
        if bias_t is not None:
            bias_t.requires_grad_()
    return qa, keys, offsets, bias_t, index


# (name, op, args, data-dependent output size)
CASES = [
    ("hamming_topk_by_id", "hamming_topk_by_id", _hamming_args([4, 0, 7, 1], 2), True),
    ("hamming_topk_by_id: two words, k above the lengths", "hamming_topk_by_id",
     _hamming_args([3, 5], 9, words=2), True),
    ("hamming_topk_by_id: no segments", "hamming_topk_by_id", _hamming_args([], 2), True),
    ("hamming_topk_shared", "hamming_topk_shared", _hamming_args([6, 6, 6], 4)[:6] + (4,),
     False),
    ("hamming_topk_shared: length-0 history", "hamming_topk_shared",
     _hamming_args([0, 0], 4)[:6] + (4,), False),
    ("hard_topk", "hard_topk",
     (torch.tensor([1, 2, 1, 3, 1, 2, 2]), torch.tensor([1, 5, 2]), torch.tensor([0, 3, 3]),
      torch.tensor([3, 3, 7]), 2), True),
    ("hard_topk_shared", "hard_topk_shared",
     (torch.tensor([1, 2, 1, 3, 1, 2, 2]), torch.tensor([1, 5, 2, 1]), 2), True),
    ("hard_topk_shared: length-0 history", "hard_topk_shared",
     (torch.zeros(0, dtype=torch.long), torch.tensor([1, 5]), 2), True),
    ("float_topk", "float_topk",
     (torch.randn(9, generator=_g()), torch.tensor([0, 4, 4]), torch.tensor([4, 4, 9]), 3), True),
    ("twin_topk_by_id", "twin_topk_by_id", _twin_args([5, 0, 9], False, 3), True),
    ("twin_topk_by_id: shared", "twin_topk_by_id", _twin_args([12, 12], True, 3), True),
    ("twin_topk_by_id: shared length-0 history", "twin_topk_by_id", _twin_args([0, 0], True, 3),
     True),
    ("sdim_collisions", "sdim_collisions", _sdim_args([6, 0, 9]), True),
    ("pack_signs", "pack_signs", (torch.randn(5, 70, generator=_g()),), False),
    ("pack_signs: no rows", "pack_signs", (torch.randn(0, 8),), False),
    ("attention_forward", "attention_forward", _attention_args([3, 0, 4], 2, 5, True), False),
    ("attention_forward: no bias", "attention_forward", _attention_args([3, 0, 4], 3, 4, False),
     False),
    ("attention_forward: indexed", "attention_forward",
     _attention_args([2, 3, 0], 2, 5, True, rows=4), False),
    ("attention_forward: float64, all empty", "attention_forward",
     _attention_args([0, 0], 2, 3, True, dtype=torch.float64), False),
    ("distinct_positions", "distinct_positions", (torch.tensor([4, 1, 4, 7]), 9, 2), True),
    ("distinct_positions: length-0 history", "distinct_positions",
     (torch.zeros(0, dtype=torch.long), 0, 0), True),
    ("gather_rows", "gather_rows",
     ([torch.randn(5, 3, generator=_g(1)), torch.randn(5, 2, generator=_g(2))],
      [torch.tensor([0, 4, 2]), torch.tensor([1, 1, 3])], None), False),
    ("gather_rows: positions", "gather_rows",
     ([torch.randn(5, 3, generator=_g(1))], [torch.tensor([0, 4, 2])], torch.tensor([2, 2, 0])),
     False),
]


def _backward_args(lengths, rows=None, bias=True):
    qa, keys, offsets, bias_t, index = _attention_args(lengths, 2, 5, bias, rows=rows,
                                                       grad=False)
    _, weights = OPS.attention_forward(qa, keys, offsets, bias_t, index)
    grad = torch.randn(qa.shape, generator=_g(7))
    return grad, qa, keys, offsets, weights, index


@pytest.mark.parametrize("name, op, args, dynamic", CASES, ids=[c[0] for c in CASES])
def test_opcheck(name: str, op: str, args, dynamic: bool) -> None:
    torch.library.opcheck(getattr(OPS, op).default, args, test_utils=ALL_UTILS)


@pytest.mark.parametrize("rows", [None, 4])
def test_opcheck_attention_backward(rows) -> None:
    args = _backward_args([3, 0, 4] if rows is None else [2, 3, 0], rows=rows)
    torch.library.opcheck(OPS.attention_backward.default, args, test_utils=ALL_UTILS)


# ---- torch.compile, torch.export and the attention's gradients

def _search_and_attend(items, item_ids, targets, cats, cat_ids, cat_targets, offsets, qa, keys,
                       bias):
    """ETA's Hamming top-k through its wrapper, then the attention over the selected keys."""
    found = kernels.hamming_topk_by_id(items, item_ids, targets, cats, cat_ids, cat_targets,
                                       offsets, 2)
    indices, lengths = found
    agg = kernels.target_attention(qa, keys, offsets, bias)
    return indices, lengths, agg


def test_compile_fullgraph_equals_eager() -> None:
    """``torch.compile(fullgraph=True)`` of the Hamming top-k (a data-dependent output size) and
    the attention, forward and backward. backend="aot_eager": AOT autograd traces the operators
    through their fake kernels and the registered autograd formula (the graph capture this
    checks); inductor's C++ code generation would add minutes on two cores and test nothing more
    of the registrations."""
    items, item_ids, targets, cats, cat_ids, cat_targets, _, _, _ = _hamming_args([4, 0, 7], 2)
    qa, keys, offsets, bias, _ = _attention_args([4, 0, 7], 2, 5, True)
    args = (items, item_ids, targets, cats, cat_ids, cat_targets, offsets, qa, keys, bias)
    eager = _search_and_attend(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_search_and_attend, fullgraph=True, backend="aot_eager")(*args)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected)
    upstream = torch.randn(eager[2].shape, generator=_g(9))
    grads = [torch.autograd.grad((out[2] * upstream).sum(), (qa, keys, bias))
             for out in (eager, compiled)]
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected)


def test_export_and_fx() -> None:
    """``torch.export`` and ``torch.fx`` symbolic tracing keep the operators as graph nodes."""

    class Search(torch.nn.Module):
        def forward(self, categories, targets, starts, ends, qa, keys, offsets):
            indices, lengths = OPS.hard_topk(categories, targets, starts, ends, 2)
            agg, _ = OPS.attention_forward(qa, keys, offsets, None, None)
            return indices, lengths, agg

    qa, keys, offsets, _, _ = _attention_args([3, 0, 4], 2, 5, False, grad=False)
    args = (torch.tensor([1, 2, 1, 3, 1, 2, 2]), torch.tensor([1, 5, 2]), offsets[:-1],
            offsets[1:], qa, keys, offsets)
    exported = torch.export.export(Search(), args)
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert {OPS.hard_topk.default, OPS.attention_forward.default} <= targets
    traced = torch.fx.symbolic_trace(Search())
    for module in (exported.module(), traced):
        for got, expected in zip(module(*args), Search()(*args)):
            torch.testing.assert_close(got, expected)


def _attend_paths(lengths, heads: int, head_dim: int, key_dim: int, with_bias: bool,
                  dtype: torch.dtype):
    """``modules.attention.attend`` (the absorbed projections around the operator) with
    ``kernel="compiled"`` and ``kernel="torch"`` (the torch-ops path): output and the gradients
    of the query, keys, bias and both projections."""
    from torchrec_longseq.modules.attention import attend

    g = _g(11)
    offsets, _, _ = _segments(lengths)
    b, n = len(lengths), int(offsets[-1])
    leaves = [torch.randn(b, heads * head_dim, generator=g, dtype=dtype),
              torch.randn(n, key_dim, generator=g, dtype=dtype),
              torch.randn(heads * head_dim, key_dim, generator=g, dtype=dtype),
              torch.randn(heads * head_dim, key_dim, generator=g, dtype=dtype)]
    if with_bias:
        leaves.append(torch.randn(n, heads, generator=g, dtype=dtype))
    upstream = torch.randn(b, heads * head_dim, generator=g, dtype=dtype)
    results = []
    real = kernels.target_attention
    for kernel in ("compiled", "torch"):
        inputs = [t.clone().requires_grad_() for t in leaves]
        query, keys, k_weight, v_weight = inputs[:4]
        bias = inputs[4] if with_bias else None
        ran = []  # what attend's kernel call returned: the operator's output, or None
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "target_attention", lambda *a: ran.append(real(*a)) or ran[-1])
            out = attend(query, keys, offsets, k_weight, v_weight, heads, bias, None, kernel)
        assert len(ran) == 1 and (ran[0] is None) == (kernel == "torch"), kernel
        results.append([out.detach()] + list(torch.autograd.grad((out * upstream).sum(), inputs)))
    return results


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_gradients_equal_torch_ops(with_bias: bool, dtype: torch.dtype) -> None:
    """The operator's autograd formula (attention_backward, registered on attention_forward)
    against the torch-ops path of ``attend``, with an empty sample and a one-behavior one."""
    kernel, ops = _attend_paths([3, 0, 1, 6], 3, 2, 5, with_bias, dtype)
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else {}
    for got, expected in zip(kernel, ops):
        torch.testing.assert_close(got, expected, **tolerance)


@pytest.mark.parametrize("rows", [None, 4])
def test_attention_gradcheck(rows) -> None:
    """Numerical gradients (float64) of the operator in qa, keys and bias, plain and indexed."""
    qa, keys, offsets, bias, index = _attention_args([2, 0, 1, 3], 3, 4, True, rows=rows,
                                                     dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, b: OPS.attention_forward(q, k, offsets, b, index)[0], (qa, keys, bias))
    assert torch.autograd.gradcheck(
        lambda q, k: OPS.attention_forward(q, k, offsets, None, index)[0], (qa, keys))
