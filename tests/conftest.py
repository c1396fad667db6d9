"""Fixtures shared by the tests; the shared helper functions are in ``tests/helpers.py``.

``tests/`` has no ``__init__.py``: test modules are imported by basename, and this conftest puts
``tests/`` on ``sys.path`` (whatever ``--import-mode``) so that they can ``import helpers``, and
``examples/`` so that they can import the examples they keep true (``import own_model``).
"""

import os
import sys

import pytest

# Without a GPU the Triton kernels' tests (tests/retrieval/test_triton.py) run them under
# Triton's interpreter, on CPU tensors: triton reads TRITON_INTERPRET when a kernel is decorated,
# i.e. when retrieval.triton_kernels is imported, so it is set here, before any test imports it.
# With CUDA the kernels are compiled and the tests run on CUDA tensors.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

_TESTS = os.path.dirname(os.path.abspath(__file__))
_EXAMPLES = os.path.join(os.path.dirname(_TESTS), "examples")  # tests run the examples' code
for _path in (_TESTS, _EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(params=["auto", "torch"], ids=["kernels", "torch-ops"])
def kernels(request) -> str:
    """The ``kernel`` to run with (``retrieval.kernels.KERNELS``): ``"auto"``, the compiled CPU
    operators (the default on CPU), and ``"torch"``, the torch ops. A test applies it itself:
    ``set_kernel(model, kernels)`` after building, or ``kernel=kernels`` to the function."""
    return request.param
