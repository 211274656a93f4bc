"""Builds hgloss and its extension hgloss._C.

The extension holds the operator schema and the CPU kernel; the CUDA kernels are added when a
CUDA build of torch and CUDA_HOME are both present. Without them, the first call on a CUDA tensor
compiles them just in time (hgloss/backends/_build.py). torch must be importable at build time, so
install with `pip install --no-build-isolation .` (or `make install`).

Switches (environment variables):
  HGLOSS_FORCE_CUDA=1    build the CUDA sources even if torch sees no GPU (needs CUDA_HOME)
  HGLOSS_DISABLE_CUDA=1  never build the CUDA sources
  TORCH_CUDA_ARCH_LIST   the GPU architectures to compile for, as torch reads it
"""

import importlib.util
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def load_build_settings():
    """hgloss/backends/_build.py, the one place the sources and flags are listed, loaded without
    importing the hgloss package (which would need the extension this script builds)."""
    spec = importlib.util.spec_from_file_location("_hgloss_build", os.path.join(ROOT, "hgloss", "backends", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_wanted(torch_cuda_version, cuda_home):
    if os.environ.get("HGLOSS_DISABLE_CUDA", "0") == "1":
        return False
    if os.environ.get("HGLOSS_FORCE_CUDA", "0") == "1":
        if cuda_home is None:
            raise RuntimeError("HGLOSS_FORCE_CUDA=1 but CUDA_HOME is not set and nvcc was not found")
        return True
    return torch_cuda_version is not None and cuda_home is not None


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("hgloss: torch is not importable at build time; building without hgloss._C "
              "(use `pip install --no-build-isolation`)")
        return [], {}

    build_settings = load_build_settings()
    cxx_flags = build_settings.cpu_compile_flags()
    sources = [os.path.join("csrc", name) for name in build_settings.CPU_SOURCES]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    extension_class = cpp_extension.CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    if cuda_wanted(torch.version.cuda, cpp_extension.CUDA_HOME):
        sources += [os.path.join("csrc", name) for name in build_settings.CUDA_SOURCES]
        extension_class = cpp_extension.CUDAExtension
        extra_compile_args["nvcc"] = build_settings.cuda_compile_flags()
    ext = extension_class(
        name="hgloss._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["hgloss", "hgloss.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
