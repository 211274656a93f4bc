"""Loads the C++ extension hgloss._C on the first call that needs it, building it just in time
from csrc/ when it is missing. Importing hgloss loads and compiles nothing.

`pip install --no-build-isolation .` builds hgloss._C ahead of time, with the CUDA kernels when
torch is a CUDA build and nvcc is found. When the installed package lacks it (torch was not
importable at build time, or the build was skipped), the sources next to the package are
compiled once with torch.utils.cpp_extension.load (ninja). If that fails too, hgloss warns once
and every call uses the reference backend.

The CUDA kernels likewise: when hgloss._C was built without them, the first call on a CUDA tensor
compiles them into a library of their own (csrc/cuda/, about a minute, cached by torch in
TORCH_EXTENSIONS_DIR) and registers them for the CUDA dispatch key.

HGLOSS_DISABLE_EXTENSION=1 skips both, which is how the fallback path is tested.
"""

import importlib
import os
import sys
import warnings

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
# Relative to csrc/. setup.py builds the same sources with the same flags.
CPU_SOURCES = (
    "heatmap_loss.cpp",
    os.path.join("autograd", "heatmap_loss_autograd.cpp"),
    os.path.join("cpu", "heatmap_loss_kernel.cpp"),
)
# The torch binding and the torch-free kernels, one file per stencil so that they compile in parallel.
CUDA_SOURCES = tuple(
    os.path.join("cuda", name)
    for name in (
        "heatmap_loss_cuda.cu",
        "heatmap_loss_kernel.cu",
        "heatmap_loss_forward.cu",
        "heatmap_loss_central.cu",
        "heatmap_loss_sobel.cu",
    )
)


def cpu_compile_flags() -> list[str]:
    """-march defaults to the building machine's (HGLOSS_CPU_ARCH=x86-64-v3 etc. for portable
    builds): the kernel's passes are written to be vectorised, and AVX2/AVX-512 doubles or
    quadruples their width over the baseline SSE2."""
    return ["-O3", "-std=c++17", "-fopenmp", f"-march={os.environ.get('HGLOSS_CPU_ARCH', 'native')}"]

def cuda_compile_flags() -> list[str]:
    """nvcc flags on top of torch's, which pick the C++ standard and, from TORCH_CUDA_ARCH_LIST
    or the visible GPUs, the architectures. -lineinfo costs nothing at run time and lets
    compute-sanitizer and ncu point at source lines."""
    return ["-O3", "-lineinfo"]


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

    return all(hasattr(torch.ops.hgloss, name) for name in REQUIRED_OPERATORS) and (
        torch._C._dispatch_has_kernel_for_dispatch_key("hgloss::heatmap_loss", "Autograd")
    )


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


_cuda_failure: str | None = None
# Set once the CUDA kernels are known to be registered, so later calls skip every check.
_cuda_ready = False


def constant_under_compile(function):
    """Marks `function` for torch.compile as returning a constant: Dynamo calls it while tracing
    and keeps its result, instead of tracing into the loading code inside it. This is what
    torch.compiler.assume_constant_result does, without importing torch._dynamo (and with it
    triton), which would add more than a second to `import hgloss`."""
    function._dynamo_marked_constant = True
    return function


def cuda_kernels_registered() -> bool:
    """Whether hgloss::heatmap_loss has a CUDA kernel in this process."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("hgloss::heatmap_loss", "CUDA")


def cuda_compiler_home() -> str | None:
    """The CUDA toolkit torch would build with (CUDA_HOME, else the one holding nvcc on PATH)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


@constant_under_compile
def cuda_failure_reason() -> str | None:
    """Why the CUDA kernels cannot be used here, or None when they can (or can be built)."""
    import torch

    if _cuda_ready:
        return None
    if not load_extension():
        return f"the C++ extension did not load: {_failure}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if cuda_kernels_registered():
        return None
    if _cuda_failure is not None:
        return _cuda_failure
    if cuda_compiler_home() is None:
        return (
            "hgloss._C was built without the CUDA kernels and no CUDA compiler was found to build them: "
            "set CUDA_HOME to a CUDA toolkit matching torch.version.cuda "
            f"({torch.version.cuda}), or reinstall with `pip install --no-build-isolation .` where nvcc is "
            "installed; backend='triton' needs no compiler"
        )
    return None


def _compile_cuda_kernels() -> None:
    from torch.utils import cpp_extension

    print(
        "hgloss: compiling the CUDA kernels for this GPU (first use on a CUDA tensor only, about a minute)...",
        file=sys.stderr,
        flush=True,
    )
    cpp_extension.load(
        name="hgloss_cuda",
        sources=[os.path.join(_CSRC, name) for name in CUDA_SOURCES],
        extra_include_paths=[os.path.join(_CSRC, "include")],
        extra_cuda_cflags=cuda_compile_flags(),
        is_python_module=False,
    )


@constant_under_compile
def load_cuda_kernels() -> bool:
    """Registers the CUDA kernels, compiling them on the first call when hgloss._C lacks them.
    Returns True, or raises RuntimeError saying why they are unavailable. Under torch.compile the
    call runs at trace time and its result is a constant of the graph."""
    global _cuda_failure, _cuda_ready
    if _cuda_ready:
        return True
    reason = cuda_failure_reason()
    if reason is not None:
        raise RuntimeError(f"hgloss: the CUDA backend is unavailable: {reason}")
    if cuda_kernels_registered():
        _cuda_ready = True
        return True
    try:
        _compile_cuda_kernels()
    except Exception as error:  # any compiler or loader failure: say so, and never try again
        _cuda_failure = f"compiling the CUDA kernels failed: {error}"
        raise RuntimeError(f"hgloss: {_cuda_failure}") from error
    if not cuda_kernels_registered():
        _cuda_failure = "the compiled CUDA library registered no kernel for hgloss::heatmap_loss"
        raise RuntimeError(f"hgloss: {_cuda_failure}")
    _cuda_ready = True
    return True
