"""Loads the C++ extension hgloss._C on the first call that needs it, building it just in time
from the C++ sources when it is missing. Importing hgloss loads and compiles nothing.

`pip install --no-build-isolation .` (and `pip wheel --no-build-isolation`) builds hgloss._C
ahead of time against the torch it sees, with the CUDA kernels when torch is a CUDA build and nvcc
is found. `pip install .` with build isolation cannot see the user's torch, so it installs the
package without hgloss._C and with its C++ sources (hgloss/csrc/); the first call that needs the
extension compiles them once with torch.utils.cpp_extension (ninja, a dependency), into a folder
of TORCH_EXTENSIONS_DIR named after a hash of the sources, the flags and the torch and Python
versions, and later processes load that library without compiling. The same happens when the
installed hgloss._C was built for another torch release (hgloss/_build_info.py says which). If
that fails too, hgloss warns once and every call uses the reference backend.

The CUDA kernels likewise: when hgloss._C was built without them, the first call on a CUDA tensor
compiles them into a library of their own (csrc/cuda/, about a minute, cached the same way) and
registers them for the CUDA dispatch key.

HGLOSS_DISABLE_EXTENSION=1 skips both, which is how the fallback path is tested.
"""

import hashlib
import importlib
import os
import platform
import shutil
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find_sources() -> str:
    """The C++ sources: hgloss/csrc/ in an installed package (setup.py copies them there), else
    csrc/ beside the package in a checkout or an editable install."""
    candidates = (os.path.join(_PACKAGE, "csrc"), os.path.join(os.path.dirname(_PACKAGE), "csrc"))
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "heatmap_loss.cpp")):
            return candidate
    return candidates[0]


_CSRC = _find_sources()
# Relative to csrc/. setup.py builds the same sources with the same flags.
CPU_SOURCES = (
    "heatmap_loss.cpp",
    os.path.join("autograd", "heatmap_loss_autograd.cpp"),
    os.path.join("cpu", "heatmap_loss_kernel.cpp"),
    os.path.join("cpu", "gaussian_factors_kernel.cpp"),
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
# What setup.py ships in the package (hgloss/csrc/) for the just-in-time builds.
SHIPPED_SOURCE_SUFFIXES = (".cpp", ".h", ".hpp", ".cu", ".cuh")


def cpu_arch() -> str | None:
    """The -march the CPU kernel is compiled for: HGLOSS_CPU_ARCH when set (e.g. native or
    x86-64-v3 for a local build; "default" for the compiler's own default), else the baseline
    x86-64 on x86-64 machines, so that a wheel runs on any x86-64 CPU, and the compiler's default
    elsewhere."""
    arch = os.environ.get("HGLOSS_CPU_ARCH", "").strip()
    if arch:
        return None if arch == "default" else arch
    return "x86-64" if platform.machine().lower() in ("x86_64", "amd64") else None


def cpu_compile_flags() -> list[str]:
    """Flags on top of torch's. torch's cpp_extension picks the C++ standard (c++20 in torch
    2.13) and we add none, so the ahead-of-time and just-in-time builds compile alike. -march is
    the baseline by default (see cpu_arch): the kernel's passes are written to be vectorised,
    and `HGLOSS_CPU_ARCH=native` lets the compiler use AVX2/AVX-512 on the building machine."""
    arch = cpu_arch()
    return ["-O3", "-fopenmp"] + ([f"-march={arch}"] if arch else [])

def cuda_compile_flags() -> list[str]:
    """nvcc flags on top of torch's, which pick the C++ standard and, from TORCH_CUDA_ARCH_LIST
    or the visible GPUs, the architectures. -lineinfo costs nothing at run time and lets
    compute-sanitizer and ncu point at source lines."""
    return ["-O3", "-lineinfo"]


# The operators this version of the Python side registers fake kernels and autograd for.
REQUIRED_OPERATORS = ("heatmap_loss", "scale_gradient_")

_loaded: bool | None = None
_failure: str | None = None


def built_for_torch() -> str | None:
    """The torch version the installed hgloss._C was built against, as setup.py recorded it in
    hgloss/_build_info.py; None when not recorded (a checkout or an editable install)."""
    try:
        from hgloss import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


def _ninja_on_path() -> str | None:
    """A folder to add to PATH so that torch finds ninja: the one holding the ninja of the `ninja`
    package (the scripts folder of this environment, which is not on PATH when the environment
    is not activated). None when ninja is already on PATH or nowhere to be found."""
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and os.path.isfile(os.path.join(folder, "ninja")):
        return folder
    return None


def _build_folder(name: str, sources: list[str], flags: list, extra: tuple = ()) -> str:
    """The folder a just-in-time build of `name` goes to: TORCH_EXTENSIONS_DIR (or torch's
    default) / <name>-<hash of the sources and headers, the flags, torch, Python, compiler>. A
    change of any of them builds afresh in a new folder instead of reusing a stale library."""
    import torch
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    headers = []
    for folder, _, files in os.walk(_CSRC):
        headers += [os.path.join(folder, f) for f in files if f.endswith((".h", ".hpp", ".cuh"))]
    for path in sorted(sources) + sorted(headers):
        digest.update(os.path.relpath(path, _CSRC).encode() + b"\0")
        with open(path, "rb") as file:
            digest.update(file.read())
    facts = (flags, torch.__version__, torch.version.git_version, sys.version, os.environ.get("CXX", ""), extra)
    digest.update(repr(facts).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        cpp_extension.get_default_build_root(),
        f"py{sys.version_info.major}{sys.version_info.minor}_" + ("cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"),
    )
    return os.path.join(root, f"{name}-{digest.hexdigest()[:16]}")


# Written into the build folder once the library built there has loaded.
_BUILT_MARK = "hgloss-built"


def _load_or_compile(name: str, sources: list[str], message: str, extra_hash: tuple = (), **load_arguments) -> None:
    """Loads the library a previous process compiled from these sources and flags, or compiles it
    (printing `message` on stderr first, and only then) and loads it."""
    import torch
    from torch.utils import cpp_extension

    flags = [load_arguments.get(key) for key in sorted(load_arguments)]
    folder = _build_folder(name, sources, flags, extra_hash)
    library = os.path.join(folder, f"{name}.so")
    if os.path.isfile(library) and os.path.isfile(os.path.join(folder, _BUILT_MARK)):
        torch.ops.load_library(library)
        return
    missing = [path for path in sources if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"the C++ sources are not shipped with this install: {missing[0]}")
    print(message, file=sys.stderr, flush=True)
    os.makedirs(folder, exist_ok=True)
    ninja_folder = _ninja_on_path()
    saved_path = os.environ.get("PATH")
    if ninja_folder is not None:
        os.environ["PATH"] = ninja_folder + os.pathsep + (saved_path or "")
    try:
        cpp_extension.load(name=name, sources=sources, build_directory=folder, is_python_module=False, **load_arguments)
    finally:
        if ninja_folder is not None:
            if saved_path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = saved_path
    if os.path.isfile(library):
        with open(os.path.join(folder, _BUILT_MARK), "w") as mark:
            mark.write("loaded once by hgloss\n")


def _jit_build(reason: str = "") -> None:
    _load_or_compile(
        "hgloss_C",
        [os.path.join(_CSRC, name) for name in CPU_SOURCES],
        f"hgloss: compiling the C++ extension{reason} (first use only, about a minute)...",
        extra_include_paths=[os.path.join(_CSRC, "include")],
        extra_cflags=cpu_compile_flags(),
        extra_ldflags=["-fopenmp"],
    )


def load_extension() -> bool:
    """Makes the torch.ops.hgloss operators available; returns whether that worked. Tries once."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if os.environ.get("HGLOSS_DISABLE_EXTENSION", "0") == "1":
        _loaded, _failure = False, "HGLOSS_DISABLE_EXTENSION=1"
        return _loaded
    import torch

    recorded = built_for_torch()
    mismatch = recorded is not None and recorded.split("+")[0] != torch.__version__.split("+")[0]
    try:
        if mismatch:
            raise ImportError(f"hgloss._C was built for torch {recorded}, but torch {torch.__version__} is installed")
        importlib.import_module("hgloss._C")
        _loaded = _has_required_operators()
        if not _loaded:
            _warn(
                "the built hgloss._C is older than the Python package (an operator is missing); "
                "rebuild it with `make install` or `pip install --no-build-isolation .`"
            )
    except ImportError as import_error:
        reason = f" for torch {torch.__version__} (the installed one was built for torch {recorded})" if mismatch else ""
        try:
            _jit_build(reason)
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
    import torch

    # What torch compiles for when TORCH_CUDA_ARCH_LIST is unset: the visible GPUs.
    capabilities = tuple(torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count()))
    _load_or_compile(
        "hgloss_cuda",
        [os.path.join(_CSRC, name) for name in CUDA_SOURCES],
        "hgloss: compiling the CUDA kernels for this GPU (first use on a CUDA tensor only, about a minute)...",
        extra_hash=(os.environ.get("TORCH_CUDA_ARCH_LIST", ""), capabilities, torch.version.cuda),
        extra_include_paths=[os.path.join(_CSRC, "include")],
        extra_cuda_cflags=cuda_compile_flags(),
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
