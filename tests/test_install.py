"""Installs hgloss as a user would, into a fresh virtual environment that has the pinned torch.

- The wheel of `pip wheel --no-deps --no-build-isolation -w dist .`: built for the baseline x86-64
  (no AVX-512 instruction in hgloss/_C.so), requiring the torch release it was built against, with
  the C++ sources inside; installed, every CPU backend works with the prebuilt extension (triton
  under TRITON_INTERPRET=1, with triton installed into the environment).
- `pip install .` with build isolation, given only setuptools, numpy and ninja (`--no-index`): it
  cannot download torch, so this passing shows it never needs one; the first call compiles the
  shipped sources once and says so, a second process loads them silently.

Each step builds from a copy of the project (no build/ or _C.so of the checkout), with the
environment's pip configuration except where torch must be out of reach. It takes several minutes
(two compilations of the extension); `make test` runs it. Skipped with the reason only when the
pinned torch or the build dependencies cannot be installed (no network and no local wheel).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

from hgloss.backends import _build

pytestmark = pytest.mark.install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_SPEC = f"torch=={torch.__version__.split('+')[0]}"
PROJECT_FILES = ("hgloss", "csrc", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in")
# How long one pip or compile step may take on a loaded 2-core machine.
STEP_TIMEOUT = 1800


def pinned(name: str) -> str:
    """name==version as requirements-dev.txt pins it, or the bare name."""
    with open(os.path.join(ROOT, "requirements-dev.txt")) as file:
        for line in file:
            if re.match(rf"{re.escape(name)}==", line.strip(), re.IGNORECASE):
                return line.split("#")[0].strip()
    return name


def run(command, *, env=None, cwd=None, check=True):
    started = time.perf_counter()
    result = subprocess.run(
        [str(part) for part in command], env=env, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT,
    )
    result.seconds = time.perf_counter() - started
    if check:
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def user_env(**changes) -> dict:
    """The environment of a user's shell in which the venv is not activated: the venv of the test
    run is off PATH, and hgloss is not importable from the checkout."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    own_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(part for part in env.get("PATH", "").split(os.pathsep) if part and part != own_bin)
    for key in ("HGLOSS_CPU_ARCH", "TRITON_INTERPRET"):  # conftest sets TRITON_INTERPRET for this process
        env.pop(key, None)
    env.update(changes)
    return env


def offline_pip_env(**changes) -> dict:
    """pip with no configuration: no index, no find-links of this machine (which may hold torch)."""
    env = user_env(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **changes)
    for key in list(env):
        if key.startswith("PIP_") and key not in ("PIP_CONFIG_FILE", "PIP_DISABLE_PIP_VERSION_CHECK"):
            del env[key]
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def source_tree(workdir):
    """A copy of the project's files, as a fresh clone has them."""
    tree = workdir / "project"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "_build_info.py")
    for name in PROJECT_FILES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, tree / name, ignore=ignore)
        elif os.path.exists(path):
            shutil.copy(path, tree / name)
    return tree


@pytest.fixture(scope="module")
def venv(workdir):
    """A fresh venv with the pinned torch and nothing else: a user's environment."""
    path = workdir / "venv"
    run([sys.executable, "-m", "venv", path])
    python = path / "bin" / "python"
    result = run([python, "-m", "pip", "install", "--quiet", TORCH_SPEC], env=user_env(), check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot install {TORCH_SPEC} into a fresh venv (no network or local wheel?): {result.stderr[-500:]}")
    print(f"\n[install] venv with {TORCH_SPEC}: {result.seconds:.0f} s")
    return python


@pytest.fixture(scope="module")
def links(workdir):
    """A folder with the wheels a user's pip would fetch besides torch: the build backend and
    hgloss's other dependencies. pip is pointed at it alone (--no-index)."""
    folder = workdir / "links"
    requirements = [pinned("setuptools"), pinned("numpy"), pinned("ninja")]
    result = run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", folder, *requirements],
        env=user_env(), check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot download {requirements} (no network or cache?): {result.stderr[-500:]}")
    return folder


@pytest.fixture(scope="module")
def wheel(workdir, source_tree):
    """The wheel of `pip wheel --no-deps --no-build-isolation -w dist .`, with the default flags."""
    dist = workdir / "dist"
    result = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, "."],
        cwd=source_tree, env=user_env(),
    )
    print(f"\n[install] pip wheel --no-deps --no-build-isolation: {result.seconds:.0f} s")
    (path,) = glob.glob(str(dist / "*.whl"))
    return path


SMOKE = """
import os, sys, time, warnings
warnings.simplefilter("error", RuntimeWarning)  # the reference fallback's warning fails the run
import torch, hgloss
from hgloss.backends import _build
assert os.path.dirname(hgloss.__file__).startswith(sys.prefix), hgloss.__file__
backends = sys.argv[1].split(",")
started = time.perf_counter()
available = hgloss.available_backends()
print("first use", round(time.perf_counter() - started, 1), "s; backends", available)
torch.manual_seed(0)
pred = torch.rand(2, 3, 16, 12, dtype=torch.float64, requires_grad=True)
target = torch.rand(2, 3, 16, 12, dtype=torch.float64)
expected = hgloss.heatmap_gradient_loss(pred, target, backend="reference")
expected_grad, = torch.autograd.grad(expected, pred)
for backend in backends:
    assert backend in available, (backend, available)
    dtype = torch.float32 if backend == "triton" else torch.float64
    p = pred.detach().to(dtype).requires_grad_(True)
    loss = hgloss.heatmap_gradient_loss(p, target.to(dtype), backend=backend)
    loss.backward()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert abs(loss.item() - expected.item()) <= tolerance * expected.item(), (backend, loss.item(), expected.item())
    assert torch.allclose(p.grad.double(), expected_grad, rtol=tolerance, atol=1e-9), backend
    print("ok", backend)
print("built for", _build.built_for_torch())
"""


def smoke(python, backends, **env):
    return run([python, "-c", SMOKE, ",".join(backends)], env=user_env(**env), cwd=os.path.dirname(python))


def reinstall(python, *args, env=None):
    run([python, "-m", "pip", "uninstall", "--yes", "--quiet", "hgloss"], env=user_env())
    return run([python, "-m", "pip", "install", *args], env=env or user_env())


def test_the_wheel_is_portable_and_requires_the_torch_it_was_built_for(wheel):
    assert re.search(r"-cp3\d+-cp3\d+-linux_\w+\.whl$", os.path.basename(wheel)), wheel
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("hgloss-0.1.0.dist-info/METADATA").decode()
        build_info = archive.read("hgloss/_build_info.py").decode()
        library = archive.read("hgloss/_C.so")
    requires = re.findall(r"^Requires-Dist: (torch\b[^;\n]*)$", metadata, re.MULTILINE)
    assert requires == [TORCH_SPEC], requires
    assert "Requires-Python: >=3.11" in metadata
    assert f"TORCH_VERSION = {torch.__version__!r}" in build_info
    for name in _build.CPU_SOURCES + _build.CUDA_SOURCES + (os.path.join("include", "hgloss", "stencil.h"),):
        assert f"hgloss/csrc/{name}" in names, name
    if platform.machine() != "x86_64":
        pytest.skip(f"the baseline-ISA check is for x86-64, this is {platform.machine()}")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed: cannot disassemble hgloss/_C.so")
    path = os.path.join(os.path.dirname(wheel), "_C.so")
    with open(path, "wb") as file:
        file.write(library)
    disassembly = run(["objdump", "-d", "--no-show-raw-insn", path]).stdout
    assert "%xmm" in disassembly  # the disassembly is there, and it uses SSE (baseline x86-64)
    wide = [line for line in disassembly.splitlines() if "%zmm" in line or "%ymm" in line]
    assert not wide, f"{len(wide)} AVX/AVX-512 instructions in the default wheel, e.g. {wide[:3]}"


def test_the_installed_wheel_runs_every_cpu_backend_with_the_prebuilt_extension(venv, wheel, links, workdir):
    result = reinstall(venv, "--no-index", "--find-links", links, wheel, env=offline_pip_env())
    print(f"[install] pip install <wheel>: {result.seconds:.1f} s")
    checked = smoke(venv, ["cpu"], TORCH_EXTENSIONS_DIR=str(workdir / "extensions-wheel"))
    assert "compiling" not in checked.stderr, checked.stderr  # the prebuilt hgloss._C, no JIT build
    assert "ok cpu" in checked.stdout
    assert f"built for {torch.__version__}" in checked.stdout
    print(f"[install] first call, wheel: {checked.stdout.splitlines()[0]} ({checked.seconds:.1f} s in all)")


def test_the_installed_wheel_runs_the_triton_backend_under_the_interpreter(venv, wheel, links, workdir):
    requirement = pinned("triton")
    result = run([venv, "-m", "pip", "install", "--quiet", requirement], env=user_env(), check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot install {requirement} into the fresh venv (no network or cache?): {result.stderr[-500:]}")
    print(f"[install] pip install {requirement}: {result.seconds:.0f} s")
    reinstall(venv, "--no-index", "--find-links", links, wheel, env=offline_pip_env())
    checked = smoke(venv, ["triton", "cpu"], TRITON_INTERPRET="1", TORCH_EXTENSIONS_DIR=str(workdir / "extensions-wheel"))
    assert "ok triton" in checked.stdout and "ok cpu" in checked.stdout


def test_pip_install_with_build_isolation_needs_no_torch_and_compiles_on_first_use(venv, links, source_tree, workdir):
    """`pip install .` with only setuptools, numpy and ninja reachable: had the build asked for
    torch, pip would have had to download one and failed."""
    result = reinstall(venv, "-v", "--no-index", "--find-links", links, source_tree, env=offline_pip_env())
    print(f"\n[install] pip install . (build isolation): {result.seconds:.1f} s")
    build_dependencies = result.stdout.split("Installing build dependencies: started")[1].split(
        "Installing build dependencies: finished"
    )[0]
    assert "torch" not in build_dependencies, build_dependencies
    assert f"Requirement already satisfied: torch" in result.stdout  # the user's, untouched
    package = run([venv, "-c", "import hgloss, os; print(os.path.dirname(hgloss.__file__))"], env=user_env(), cwd=workdir)
    installed = package.stdout.strip()
    assert not glob.glob(os.path.join(installed, "_C*.so"))
    assert os.path.isfile(os.path.join(installed, "csrc", "cpu", "heatmap_loss_kernel.cpp"))

    extensions = str(workdir / "extensions-source")
    first = smoke(venv, ["cpu"], TORCH_EXTENSIONS_DIR=extensions)
    assert first.stderr.count("hgloss: compiling the C++ extension (first use only") == 1, first.stderr
    assert "ok cpu" in first.stdout and "built for None" in first.stdout
    print(f"[install] first call after pip install .: {first.stdout.splitlines()[0]} ({first.seconds:.1f} s in all)")
    again = smoke(venv, ["cpu"], TORCH_EXTENSIONS_DIR=extensions)
    assert "compiling" not in again.stderr, again.stderr
    assert "ok cpu" in again.stdout
    print(f"[install] a later process: {again.stdout.splitlines()[0]} ({again.seconds:.1f} s in all)")


# ------------------------------------------------------------------------------------------------
# The pieces, without installing anything


def test_the_default_flags_are_portable_and_leave_the_standard_to_torch(monkeypatch):
    monkeypatch.delenv("HGLOSS_CPU_ARCH", raising=False)
    flags = _build.cpu_compile_flags()
    assert not any(flag.startswith("-std=") for flag in flags), flags  # torch's -std=c++20 stands
    if platform.machine() == "x86_64":
        assert "-march=x86-64" in flags
    assert "-march=native" not in flags
    monkeypatch.setenv("HGLOSS_CPU_ARCH", "native")
    assert "-march=native" in _build.cpu_compile_flags()
    monkeypatch.setenv("HGLOSS_CPU_ARCH", "default")
    assert not any(flag.startswith("-march") for flag in _build.cpu_compile_flags())


def test_an_extension_built_for_another_torch_is_rebuilt_with_a_message_naming_both(monkeypatch):
    built = []
    monkeypatch.setattr(_build, "_loaded", None)
    monkeypatch.setattr(_build, "_failure", None)
    monkeypatch.setattr(_build, "built_for_torch", lambda: "2.0.0+cpu")
    monkeypatch.setattr(_build, "_jit_build", lambda reason="": built.append(reason))
    assert _build.load_extension() is True
    assert built == [f" for torch {torch.__version__} (the installed one was built for torch 2.0.0+cpu)"]


def test_ninja_of_the_ninja_package_is_found_off_path(monkeypatch, tmp_path):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert _build._ninja_on_path() == ninja.BIN_DIR
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/ninja")
    assert _build._ninja_on_path() is None


def test_a_cached_build_loads_without_compiling_or_a_message(monkeypatch, tmp_path, capsys):
    """The message and the compiler run only when no finished build of these sources and flags
    is in TORCH_EXTENSIONS_DIR."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    compiled, loaded = [], []

    def fake_compile(name, build_directory, **kwargs):
        compiled.append(name)
        open(os.path.join(build_directory, f"{name}.so"), "w").close()

    monkeypatch.setattr(cpp_extension, "load", fake_compile)
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    _build._jit_build()
    assert compiled == ["hgloss_C"] and "hgloss: compiling the C++ extension" in capsys.readouterr().err
    _build._jit_build()
    assert compiled == ["hgloss_C"] and capsys.readouterr().err == ""
    assert len(loaded) == 1 and loaded[0].startswith(str(tmp_path))
    monkeypatch.setenv("HGLOSS_CPU_ARCH", "x86-64-v3")  # other flags: another build
    _build._jit_build()
    assert compiled == ["hgloss_C", "hgloss_C"]


def make_variables(*arguments) -> dict:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    database = run([make, "-pn", "-C", ROOT, *arguments], env=user_env()).stdout
    return dict(re.findall(r"^(STAMP|BUILD_INPUTS|BENCH_OUT_ARG) :?= ?(.*)$", database, re.MULTILINE))


def test_make_install_reinstalls_when_torch_or_the_build_settings_change():
    default = make_variables("install")
    assert "hgloss/backends/_build.py" in default["BUILD_INPUTS"]
    assert make_variables("install", "TORCH_SPEC=torch==2.11.0")["STAMP"] != default["STAMP"]
    assert make_variables("install", "HGLOSS_CPU_ARCH=native")["STAMP"] != default["STAMP"]
    assert make_variables("install")["STAMP"] == default["STAMP"]


def test_make_bench_keeps_the_committed_results_unless_asked():
    assert make_variables("bench")["BENCH_OUT_ARG"].startswith("--out benchmarks/results/local/")
    assert make_variables("bench", "UPDATE_RESULTS=1")["BENCH_OUT_ARG"].strip() == ""
