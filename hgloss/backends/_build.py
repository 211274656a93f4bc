"""Loads the C++ extension hgloss._C, building it just in time from csrc/ when it is missing.

`pip install --no-build-isolation .` builds hgloss._C ahead of time. When the installed package
lacks it (torch was not importable at build time, or the build was skipped), the sources next
to the package are compiled once with torch.utils.cpp_extension.load (ninja). If that fails too,
hgloss warns once and every call uses the reference backend.

HGLOSS_DISABLE_EXTENSION=1 skips both, which is how the fallback path is tested.
"""

import importlib
import os
import sys
import warnings

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# Relative to csrc/. setup.py builds the same sources with the same flags.
CPU_SOURCES = ("heatmap_loss.cpp", os.path.join("cpu", "heatmap_loss_kernel.cpp"))


def cpu_compile_flags() -> list[str]:
    """-march defaults to the building machine's (HGLOSS_CPU_ARCH=x86-64-v3 etc. for portable
    builds): the kernel's passes are written to be vectorised, and AVX2/AVX-512 doubles or
    quadruples their width over the baseline SSE2."""
    return ["-O3", "-std=c++17", "-fopenmp", f"-march={os.environ.get('HGLOSS_CPU_ARCH', 'native')}"]

# The operators this version of the Python side registers fake kernels and autograd for.
REQUIRED_OPERATORS = ("heatmap_loss", "scale_gradient_")

_loaded: bool | None = None
_failure: str | None = None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = [os.path.join(_CSRC, name) for name in CPU_SOURCES]
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"the C++ sources are not shipped with this install: {missing[0]}")
    print("hgloss: compiling the C++ extension (first use only, about a minute)...", file=sys.stderr)
    cpp_extension.load(
        name="hgloss_C",
        sources=sources,
        extra_include_paths=[os.path.join(_CSRC, "include")],
        extra_cflags=cpu_compile_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )


def load_extension() -> bool:
    """Makes the torch.ops.hgloss operators available; returns whether that worked. Tries once."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if os.environ.get("HGLOSS_DISABLE_EXTENSION", "0") == "1":
        _loaded, _failure = False, "HGLOSS_DISABLE_EXTENSION=1"
        return _loaded
    try:
        importlib.import_module("hgloss._C")
        _loaded = _has_required_operators()
        if not _loaded:
            _warn(
                "the built hgloss._C is older than the Python package (an operator is missing); "
                "rebuild it with `make install` or `pip install --no-build-isolation .`"
            )
    except ImportError as import_error:
        try:
            _jit_build()
            _loaded = True
        except Exception as build_error:  # any compiler or loader failure means: fall back
            _loaded = False
            _warn(f"import failed ({import_error}); JIT build failed ({build_error})")
    return _loaded


def _has_required_operators() -> bool:
    import torch

    return all(hasattr(torch.ops.hgloss, name) for name in REQUIRED_OPERATORS)


def _warn(reason: str) -> None:
    global _failure
    _failure = reason
    warnings.warn(
        f"hgloss: the C++ extension is unavailable, every call uses the reference backend: {reason}",
        RuntimeWarning,
        stacklevel=3,
    )


def failure_reason() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _failure
