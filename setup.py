"""Builds hgloss and its extension hgloss._C.

The extension holds the operator schema and the CPU kernel; the CUDA kernels are added when a
CUDA build of torch and CUDA_HOME are both present. Without them, the first call on a CUDA tensor
compiles them just in time (hgloss/backends/_build.py).

torch is not a build requirement (pyproject.toml), so that pip never downloads a second torch to
build with. Which build you get depends on whether this script can import torch:

  pip install .                        build isolation hides your torch: no hgloss._C; the C++
                                       sources are shipped in the package (hgloss/csrc/) and the
                                       first call that needs them compiles them once (ninja).
  pip install --no-build-isolation .   hgloss._C is built against the torch you have, and the
  pip wheel --no-deps --no-build-isolation -w dist .
                                       package requires that torch release (torch==X.Y.Z), which
                                       hgloss/_build_info.py also records.

Switches (environment variables):
  HGLOSS_CPU_ARCH=ARCH   -march for the CPU kernel: default x86-64 (baseline, runs on any x86-64
                         CPU); native or x86-64-v3 for a faster local build; "default" for none
  HGLOSS_FORCE_CUDA=1    build the CUDA sources even if torch sees no GPU (needs CUDA_HOME)
  HGLOSS_DISABLE_CUDA=1  never build the CUDA sources
  TORCH_CUDA_ARCH_LIST   the GPU architectures to compile for, as torch reads it
"""

import importlib.util
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# Besides torch, numpy for hgloss.pose and ninja for the just-in-time builds.
BASE_REQUIREMENTS = ["numpy", "ninja>=1.11.1,<2"]
# The oldest torch the Python side and a just-in-time build support.
TORCH_RANGE = "torch>=2.6"


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


def torch_release(version):
    """'2.13.0' for '2.13.0+cpu' or '2.13.0+cu130': the pin matches the CPU and CUDA builds."""
    return version.split("+")[0]


class BuildPy(build_py):
    """Also ships the C++ sources as hgloss/csrc/ for the just-in-time builds, and, when hgloss._C
    is built, hgloss/_build_info.py with the torch it is built for."""

    build_info = None

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads csrc/ and builds hgloss/_C*.so in place
        target = os.path.join(self.build_lib, "hgloss", "csrc")
        shutil.rmtree(target, ignore_errors=True)  # no file of an older checkout stays behind
        suffixes = load_build_settings().SHIPPED_SOURCE_SUFFIXES
        source_root = os.path.join(ROOT, "csrc")
        for folder, _, files in os.walk(source_root):
            for name in sorted(files):
                if name.endswith(suffixes):
                    relative = os.path.relpath(os.path.join(folder, name), source_root)
                    os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
                    self.copy_file(os.path.join(folder, name), os.path.join(target, relative))
        info = os.path.join(self.build_lib, "hgloss", "_build_info.py")
        if self.build_info is None:
            if os.path.exists(info):
                os.remove(info)
            return
        with open(info, "w") as file:
            file.write("# Written by setup.py when it built hgloss._C: what it was built for.\n")
            for key, value in self.build_info.items():
                file.write(f"{key} = {value!r}\n")


def ninja_folder():
    """The folder of the `ninja` package's binary when ninja is not on PATH (an environment that
    is not activated), so that torch's BuildExtension compiles in parallel with it."""
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja
    except ImportError:
        return None
    return getattr(ninja, "BIN_DIR", None)


def extensions():
    """The extension, the commands, the torch requirement and what _build_info.py records."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("hgloss: torch is not importable at build time (build isolation); building without "
              "hgloss._C: the package ships its C++ sources and compiles them on first use. "
              "`pip install --no-build-isolation .` builds it now, against your torch.")
        return [], {"build_py": BuildPy}, TORCH_RANGE, None

    build_settings = load_build_settings()
    cxx_flags = build_settings.cpu_compile_flags()
    sources = [os.path.join("csrc", name) for name in build_settings.CPU_SOURCES]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    extension_class = cpp_extension.CppExtension
    extra_compile_args = {"cxx": cxx_flags}
    with_cuda = cuda_wanted(torch.version.cuda, cpp_extension.CUDA_HOME)
    if with_cuda:
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
    build_key = repr((torch.__version__, extra_compile_args, with_cuda, os.environ.get("TORCH_CUDA_ARCH_LIST")))
    base_build_ext = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)

    class BuildExt(base_build_ext):
        """Rebuilds from scratch when torch or the flags changed since the last build in this
        build folder (setuptools alone looks only at the sources' timestamps), and finds the
        `ninja` package's binary when its environment is not activated."""

        def run(self):
            key_file = os.path.join(self.build_temp, "hgloss-build-key")
            previous = open(key_file).read() if os.path.exists(key_file) else None
            if previous != build_key:
                self.force = True
            folder = ninja_folder()
            if folder:
                os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            super().run()
            os.makedirs(self.build_temp, exist_ok=True)
            with open(key_file, "w") as file:
                file.write(build_key)

    BuildPy.build_info = {
        "TORCH_VERSION": torch.__version__,
        "CPU_ARCH": build_settings.cpu_arch(),
        "WITH_CUDA": with_cuda,
    }
    torch_pin = f"torch=={torch_release(torch.__version__)}"
    return [ext], {"build_ext": BuildExt, "build_py": BuildPy}, torch_pin, BuildPy.build_info


ext_modules, cmdclass, torch_requirement, _ = extensions()

setup(
    packages=find_packages(include=["hgloss", "hgloss.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[torch_requirement, *BASE_REQUIREMENTS],
)
