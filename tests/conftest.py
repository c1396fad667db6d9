"""Fixtures shared by the tests; the shared helper functions are in ``tests/helpers.py``.

``tests/`` has no ``__init__.py``: test modules are imported by basename, and this conftest puts
``tests/`` on ``sys.path`` (whatever ``--import-mode``) so that they can ``import helpers``, and
``examples/`` so that they can import the examples they keep true (``import own_model``).
"""

import os
import sys

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
_EXAMPLES = os.path.join(os.path.dirname(_TESTS), "examples")  # tests run the examples' code
for _path in (_TESTS, _EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(params=["1", "0"], ids=["kernels", "torch-ops"])
def kernels(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with the compiled CPU kernels (``TORCHREC_LONGSEQ_KERNELS=1``, the default on CPU)
    and with the torch ops (``=0``)."""
    monkeypatch.setenv("TORCHREC_LONGSEQ_KERNELS", request.param)
    return request.param
