"""Building the ``longseq`` operators: the cache name (a hash of the sources, the flags, torch's
and Python's versions), the portable flags, and the fallback when no C++ compiler is found: one
warning, wrappers that return ``None``, and a model whose logits equal those with the kernels."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import helpers  # tests/ is on sys.path (conftest.py)
import pytest
import torch

from torchrec_longseq.retrieval import extension, kernels

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


def test_no_compiler_warns_once_and_wrappers_return_none(monkeypatch) -> None:
    """In this process (where the operators may already be loaded): a build that finds no
    compiler warns once, is not retried, and every wrapper returns None."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(extension, "_state", None)  # restored after the test
    monkeypatch.setattr(extension, "_error", None)
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
    env.pop("TORCHREC_LONGSEQ_KERNELS", None)
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
    env.pop("TORCHREC_LONGSEQ_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", FAILING_BUILD], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["found"] == "[None, False, None]"
    assert len(out["warnings"]) == 1 and "the compiler says no" in out["warnings"][0], out
