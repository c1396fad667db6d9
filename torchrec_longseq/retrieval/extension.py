"""Building and loading the ``longseq`` operators (``torchrec_longseq/csrc/*.cpp``).

``build()`` compiles the sources once per process with ``torch.utils.cpp_extension.load``
(``is_python_module=False``: loading the shared library registers the operators, which are then
``torch.ops.longseq.<op>``). The module goes into the torch extensions cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) under a name keyed by a hash
of the sources, the compiler flags, torch's version and Python's version (``extension_name``):
an unchanged environment loads the cached module in a second or two, and two environments on one
machine (say two torch versions) keep one module each instead of rebuilding each other's.

Where no C++ compiler is found (``$CXX``, else ``c++``, on ``PATH``, as torch looks for it) or
the build or the load fails, ``build()`` warns once (with the end of the compiler's output) and
returns ``False``, and so does every later call in the process without trying again: the kernel
wrappers in ``kernels`` then return ``None`` and their callers take the torch ops.
"""

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from torchrec_longseq import notices

CSRC = Path(__file__).resolve().parent.parent / "csrc"

_lock = threading.Lock()
_state: Optional[bool] = None  # None: not tried in this process; True: loaded; False: failed
_error: Optional[str] = None  # why it failed


def sources(directory: Path = CSRC) -> Dict[str, bytes]:
    """``{file name: contents}`` of the C++ sources and headers, sorted by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.suffix in (".cpp", ".h")}


def compile_flags(machine: Optional[str] = None) -> List[str]:
    """``extra_cflags``: ``-O3``; ``-march=x86-64-v2`` on x86-64 only (no other architecture gets
    an architecture flag; the float loops also carry an x86-64-v3 clone chosen at load time);
    ``-fopenmp`` (``at::parallel_for`` is an OpenMP loop in the headers, serial without it; the
    module then needs libgomp.so.1, which resolves to the copy torch has already loaded); and
    ``-fno-trapping-math`` (nothing reads floating-point exception flags, and without it GCC will
    not vectorize loops with a conditional: the attention's ``exp_in_place`` clamp)."""
    machine = (platform.machine() if machine is None else machine).lower()
    arch = ["-march=x86-64-v2"] if machine in ("x86_64", "amd64") else []
    return ["-O3", *arch, "-fopenmp", "-fno-trapping-math"]


LINK_FLAGS = ["-fopenmp"]


def extension_name(files: Dict[str, bytes], cflags: Sequence[str], ldflags: Sequence[str],
                   torch_version: str, python_version: str) -> str:
    """``longseq_ops_<16 hex digits>``: the cache name, a hash of everything the built module
    depends on (the sources by name and contents, the flags, torch's and Python's versions)."""
    h = hashlib.sha256()
    for name, text in sorted(files.items()):
        h.update(b"file\0" + name.encode() + b"\0" + hashlib.sha256(text).digest())
    for flag in cflags:
        h.update(b"cflag\0" + flag.encode() + b"\0")
    for flag in ldflags:
        h.update(b"ldflag\0" + flag.encode() + b"\0")
    h.update(b"torch\0" + torch_version.encode() + b"\0python\0" + python_version.encode())
    return "longseq_ops_" + h.hexdigest()[:16]


def _python_version() -> str:
    return f"{sys.implementation.cache_tag}-{platform.python_version()}"


def current_name() -> str:
    """This environment's ``extension_name``."""
    return extension_name(sources(), compile_flags(), LINK_FLAGS, torch.__version__,
                          _python_version())


def compiler() -> Optional[str]:
    """The C++ compiler a build would run (``$CXX``, else ``c++``) if it is found, else None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _load(verbose: bool) -> None:
    # cpp_extension's import-time notice on a machine without CUDA (these are CPU operators)
    with notices.quiet([("torch.utils.cpp_extension", "No CUDA runtime is found")]):
        from torch.utils.cpp_extension import load

    # the build runs `ninja` from PATH: make the one installed next to this Python (the lock
    # file's) findable when the virtualenv is not activated
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    paths = [str(CSRC / name) for name in sources() if name.endswith(".cpp")]
    load(name=current_name(), sources=paths, extra_cflags=compile_flags(),
         extra_ldflags=LINK_FLAGS, extra_include_paths=[str(CSRC)], is_python_module=False,
         verbose=verbose)


def build(verbose: bool = False) -> bool:
    """Builds (or loads from the cache) and registers the ``longseq`` operators, once per
    process: True when they are registered. False, after one warning, when no C++ compiler is
    found or the build or the load fails; later calls return False at once (no retry)."""
    global _state, _error
    if _state is not None:
        return _state
    with _lock:
        if _state is not None:
            return _state
        cxx = os.environ.get("CXX", "c++")
        try:
            if compiler() is None:
                raise RuntimeError(f"no C++ compiler found (CXX={cxx!r} is not on PATH)")
            _load(verbose)
            _state = True
        except Exception as e:  # the build's or the load's error, whatever its type
            _error = f"{type(e).__name__}: {e}"
            _state = False
            tail = _error if len(_error) <= 2000 else "..." + _error[-2000:]
            warnings.warn("torchrec_longseq: the compiled CPU kernels are unavailable in this "
                          "process, the torch ops are used instead (same results, slower). "
                          f"Build error: {tail}", RuntimeWarning, stacklevel=3)
        return _state


def available() -> bool:
    """Whether the operators are registered (building them on the first call, see ``build``)."""
    return _state if _state is not None else build()


def error() -> Optional[str]:
    """Why the build or the load failed in this process (None if it did not, or not yet)."""
    return _error


def _reset_for_tests() -> None:
    """Forgets the outcome of this process's build (tests only: a loaded library stays loaded)."""
    global _state, _error
    _state, _error = None, None
