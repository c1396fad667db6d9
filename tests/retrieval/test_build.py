"""Building the ``longseq`` operators: the cache name (a hash of the sources, the flags, torch's
and Python's versions), the portable flags, and the fallback when no C++ compiler is found: one
warning, wrappers that return ``None``, and a model whose logits equal those with the kernels;
and the kernel choice's errors: ``kernel="compiled"`` off CPU or without the operators, and an
unknown kernel."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import helpers  # tests/ is on sys.path (conftest.py)
import pytest
import torch

from torchrec_longseq import ModelConfig, serving, set_kernel
from torchrec_longseq.models.longseq_ctr import build_model
from torchrec_longseq.modules import attention, eta, sdim, twin
from torchrec_longseq.retrieval import extension, hard, kernels, simhash, topk

TESTS = Path(__file__).resolve().parents[1]


def test_extension_name_is_a_hash_of_what_the_module_depends_on() -> None:
    files = {"a.cpp": b"int a;", "common.h": b"#pragma once"}
    flags, link = ["-O3", "-fopenmp"], ["-fopenmp"]
    name = extension.extension_name(files, flags, link, "2.14.1+cpu", "cpython-311-3.11.7")
    assert name.startswith("longseq_ops_") and name.isidentifier()
    assert name == extension.extension_name(dict(reversed(list(files.items()))), flags, link,
                                            "2.14.1+cpu", "cpython-311-3.11.7")
    others = [
        extension.extension_name(files, ["-O3", "-march=x86-64-v2", "-fopenmp"], link,
                                 "2.14.1+cpu", "cpython-311-3.11.7"),  # flags
        extension.extension_name(files, flags, [], "2.14.1+cpu", "cpython-311-3.11.7"),
        extension.extension_name(files, flags, link, "2.15.0+cpu", "cpython-311-3.11.7"),  # torch
        extension.extension_name(files, flags, link, "2.14.1+cu130", "cpython-311-3.11.7"),
        extension.extension_name(files, flags, link, "2.14.1+cpu", "cpython-312-3.12.1"),  # python
        extension.extension_name({**files, "a.cpp": b"int b;"}, flags, link, "2.14.1+cpu",
                                 "cpython-311-3.11.7"),  # sources
        extension.extension_name({**files, "b.cpp": b""}, flags, link, "2.14.1+cpu",
                                 "cpython-311-3.11.7"),
    ]
    assert len({name, *others}) == 1 + len(others)
    # this environment's name covers the package's own sources and torch's version
    assert extension.current_name() == extension.extension_name(
        extension.sources(), extension.compile_flags(), extension.LINK_FLAGS, torch.__version__,
        extension._python_version())
    assert {"common.h", "registration.cpp", "attention.cpp"} <= set(extension.sources())


def test_flags_are_portable() -> None:
    for machine in ("x86_64", "AMD64"):
        assert "-march=x86-64-v2" in extension.compile_flags(machine)
    for machine in ("aarch64", "arm64", "ppc64le", "s390x"):
        flags = extension.compile_flags(machine)
        assert not any(f.startswith(("-march", "-mcpu", "-mtune")) for f in flags)
        assert {"-O3", "-fopenmp", "-fno-trapping-math"} <= set(flags)


def hide_the_compiler(monkeypatch) -> None:
    """In this process (where the operators may already be loaded): the next build finds no
    compiler (``CXX=/nonexistent/c++``, the build state cleared; restored after the test)."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(extension, "_state", None)
    monkeypatch.setattr(extension, "_error", None)


def test_no_compiler_warns_once_and_wrappers_return_none(monkeypatch) -> None:
    """In this process (where the operators may already be loaded): a build that finds no
    compiler warns once, is not retried, and every wrapper returns None."""
    hide_the_compiler(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.build() is False
        assert kernels.build() is False
        ids = torch.tensor([0, 1, 1])
        assert kernels.hard_topk(ids, torch.tensor([0, 2]), torch.tensor([1]), 1) is None
        assert kernels.float_topk(torch.randn(3), torch.tensor([0, 3]), 1) is None
        assert kernels.pack_signs(torch.randn(2, 3)) is None
        assert kernels.distinct_positions(ids, 3, 1) is None
        assert kernels.target_attention(torch.randn(1, 2, 3), torch.randn(3, 3),
                                        torch.tensor([0, 3]), None) is None
        with pytest.raises(RuntimeError, match="no C.. compiler found"):
            kernels._module()
    ours = [w for w in caught if "torchrec_longseq" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "no C++ compiler found" in str(ours[0].message)
    assert "/nonexistent/c++" in extension.error()


NO_COMPILER = textwrap.dedent("""
    import json, sys, warnings
    import torch
    sys.path.insert(0, sys.argv[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import helpers
        from torchrec_longseq.retrieval import extension, kernels
        model = helpers.build_small_model("eta").eval()
        batch = helpers.make_batch()
        with torch.no_grad():
            logits = helpers.run(model, batch)
            again = helpers.run(model, batch)
        found = kernels.hamming_topk_by_id(torch.zeros(3, 1, dtype=torch.long), torch.tensor([0]),
                                           torch.zeros(1, 1, dtype=torch.long),
                                           torch.zeros(3, 1, dtype=torch.long), torch.tensor([0]),
                                           torch.zeros(1, 1, dtype=torch.long),
                                           torch.tensor([0, 1]), 1)
    ours = [str(w.message) for w in caught if "torchrec_longseq" in str(w.message)]
    print(json.dumps({"warnings": ours, "wrapper": repr(found), "error": extension.error(),
                      "loaded": hasattr(torch.ops.longseq, "pack_signs"),
                      "logits": logits.tolist(), "again": again.tolist()}))
""")


def test_model_without_compiler_equals_kernels(tmp_path) -> None:
    """A fresh process with no compiler (``CXX=/nonexistent``, an empty extensions cache): one
    warning, the wrappers return None, and ETA's logits equal this process's with the kernels."""
    if not kernels.build():
        pytest.skip("the longseq operators did not build here: nothing to compare with")
    env = dict(os.environ, CXX="/nonexistent", TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", NO_COMPILER, str(TESTS)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1 and "no C++ compiler found" in out["warnings"][0], out
    assert out["wrapper"] == "None" and "/nonexistent" in out["error"]
    assert not out["loaded"]  # the operators were never registered there
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.so"))
    model = helpers.build_small_model("eta").eval()
    with torch.no_grad():
        logits = helpers.run(model, helpers.make_batch())
    fallback = torch.tensor(out["logits"], dtype=logits.dtype)
    torch.testing.assert_close(fallback, logits, atol=1e-5, rtol=1e-5)
    assert out["logits"] == out["again"]


FAILING_BUILD = textwrap.dedent("""
    import json, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from torchrec_longseq.retrieval import kernels
        found = [kernels.pack_signs(torch.randn(2, 3)), kernels.build(),
                 kernels.float_topk(torch.randn(3), torch.tensor([0, 3]), 1)]
    ours = [str(w.message) for w in caught if "torchrec_longseq" in str(w.message)]
    print(json.dumps({"warnings": ours, "found": repr(found)}))
""")


@pytest.mark.skipif(shutil.which("g++") is None, reason="the fake compiler asks g++ its version")
def test_failing_build_warns_once_with_the_compiler_output(tmp_path) -> None:
    """A compiler that is found but fails (here a script that rejects every source file): one
    warning ending with the compiler's output, no retry, the wrappers return None."""
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\ncase "$*" in *--version*|*-dump*|-v) exec g++ "$@";; esac\n'
                   'echo "csrc: error: the compiler says no" >&2\nexit 1\n')
    cxx.chmod(0o755)
    env = dict(os.environ, CXX=str(cxx), TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, "-c", FAILING_BUILD], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["found"] == "[None, False, None]"
    assert len(out["warnings"]) == 1 and "the compiler says no" in out["warnings"][0], out


# ------------------------------------------------------------------------ the kernel choice

def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _ids(n: int) -> torch.Tensor:
    return _meta(n, dtype=torch.long)


def _codes(rows: int) -> torch.Tensor:
    return _meta(rows, 1, dtype=torch.long)


# every function that takes ``kernel``, on tensors of device "meta" (not CPU)
OFF_CPU = {
    "hard_search": lambda kernel: hard.hard_search(_ids(3), _ids(2), _ids(1), 1, kernel=kernel),
    "jagged_topk": lambda kernel: topk.jagged_topk(_meta(3), _ids(2), 1, kernel=kernel),
    "simhash_signatures": lambda kernel: simhash.simhash_signatures(_meta(2, 4), _meta(4, 64),
                                                                    kernel=kernel),
    "signature_topk": lambda kernel: eta.signature_topk(
        [_codes(5), _codes(3)], [_ids(3), _ids(3)], [_ids(1), _ids(1)], _ids(2), 1, kernel),
    "twin_topk": lambda kernel: twin.twin_topk([_meta(5, 8), _meta(3, 8)], [_ids(3), _ids(3)],
                                               _meta(1, 4), _ids(2), _meta(3, 1), 1, 1, kernel,
                                               head_dim=4),
    "collisions_by_id": lambda kernel: sdim.collisions_by_id(
        [_codes(5), _codes(3)], [_ids(3), _ids(3)], [_ids(1), _ids(1)], [_ids(3), _ids(3)],
        _ids(2), 3, 8, kernel),
    "attend": lambda kernel: attention.attend(_meta(1, 4), _meta(3, 5), _ids(2), _meta(4, 5),
                                              _meta(4, 5), 2, None, None, kernel),
    "distinct_positions": lambda kernel: serving.distinct_positions(_ids(3), 5, 1, kernel),
    "gather_rows": lambda kernel: kernels.gather_rows([_meta(5, 2)], [_ids(3)], None, kernel),
}


@pytest.mark.parametrize("name", list(OFF_CPU))
def test_compiled_kernel_off_cpu_is_an_error(name: str) -> None:
    """``kernel="compiled"`` on tensors of another device (here "meta") raises, naming the
    device, instead of running the torch ops."""
    with pytest.raises(ValueError, match="kernel='compiled' runs on CPU tensors, got meta"):
        OFF_CPU[name]("compiled")


def test_compiled_kernel_without_the_operators_is_an_error(monkeypatch) -> None:
    """Where the operators could not be built (no compiler here), ``kernel="compiled"`` raises
    with the build's error, "auto" takes the torch ops and "torch" needs no build."""
    hide_the_compiler(monkeypatch)
    categories, offsets, targets = torch.tensor([1, 0, 1]), torch.tensor([0, 3]), torch.tensor([1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the build's one warning (tested above)
        assert hard.hard_search(categories, offsets, targets, 1, kernel="torch")[0].tolist() == [2]
        assert extension._state is None  # "torch" does not build
        assert hard.hard_search(categories, offsets, targets, 1)[0].tolist() == [2]  # "auto"
        assert extension._state is False
        calls = [
            lambda: hard.hard_search(categories, offsets, targets, 1, kernel="compiled"),
            lambda: kernels.hard_topk(categories, offsets, targets, 1, "compiled"),
            lambda: topk.jagged_topk(torch.randn(3), offsets, 1, kernel="compiled"),
            lambda: simhash.simhash_signatures(torch.randn(2, 4), torch.randn(4, 64),
                                               kernel="compiled"),
            lambda: serving.distinct_positions(categories, 3, 1, "compiled"),
            lambda: kernels.target_attention(torch.randn(1, 2, 3), torch.randn(3, 3), offsets,
                                             None, None, "compiled"),
        ]
        for call in calls:
            with pytest.raises(RuntimeError, match=r"kernel='compiled', but the compiled "
                               r"operators could not be built: .*/nonexistent/c\+\+"):
                call()


def test_unknown_kernel_is_an_error() -> None:
    """A kernel outside ``KERNELS`` raises ValueError naming the allowed values: from a wrapper,
    a search, ``set_kernel`` and ``ModelConfig``."""
    assert kernels.KERNELS == ("auto", "compiled", "torch")
    allowed = re.escape("kernel must be one of ('auto', 'compiled', 'torch'), got 'cuda'")
    categories, offsets, targets = torch.tensor([1, 0, 1]), torch.tensor([0, 3]), torch.tensor([1])
    for call in [lambda: kernels.check_kernel("cuda"),
                 lambda: kernels.hard_topk(categories, offsets, targets, 1, "cuda"),
                 lambda: hard.hard_search(categories, offsets, targets, 1, kernel="cuda"),
                 lambda: topk.jagged_topk(torch.randn(3), offsets, 1, kernel="cuda")]:
        with pytest.raises(ValueError, match=allowed):
            call()
    model = helpers.build_small_model("sim-hard", refresh=False)
    with pytest.raises(ValueError, match=allowed):
        set_kernel(model, "cuda")
    assert {m.kernel for m in model.modules() if hasattr(m, "kernel")} == {"auto"}  # unchanged
    with pytest.raises(ValueError, match=allowed):
        build_model("sim-hard", ModelConfig(kernel="cuda"), helpers.DATA.table_sizes)
