"""Shared helpers: input factories, the accuracy measures of docs/spec.md, and the fused backends to test.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. It is switched
on here, before hgloss (and so triton.jit) sees the kernels; TRITON_INTERPRET=0 in the
environment turns it off.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hgloss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The trainer is the examples' application, importable as `trainer` as the example scripts do.
sys.path.insert(0, os.path.join(ROOT, "examples"))

# Fused backends and the device each computes on. Every one is tested against "reference".
FUSED_DEVICES = {
    "cpu": "cpu",
    "cuda": "cuda",
    "triton": "cuda" if torch.cuda.is_available() else "cpu",
}


def fused_backend_params():
    """pytest params for every fused backend, skipped with the reason when it is unavailable."""
    from hgloss import functional

    params = []
    available = hgloss.available_backends()
    for name in FUSED_DEVICES:
        marks = []
        if name not in available:
            reason = functional.why_unavailable(name).strip(" ()")
            marks.append(pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def interpreted(backend: str) -> bool:
    """Whether the backend's kernels run under the Triton interpreter (CPU tensors, slow)."""
    return backend == "triton" and FUSED_DEVICES[backend] == "cpu"


def fused_op(backend: str):
    """The custom operator behind a fused backend (schema of hgloss::heatmap_loss)."""
    from hgloss import ops

    return getattr(torch.ops.hgloss, ops.OPERATOR_NAMES[backend])


def loss_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """docs/spec.md section 1: max|out - ref| / max(max|ref|, tiny)."""
    out, ref = out.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    scale = max(ref.abs().max().item(), torch.finfo(torch.float64).tiny)
    return (out - ref).abs().max().item() / scale


def grad_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """docs/spec.md section 1: norm(out - ref) / norm(ref); the absolute norm when ref is zero."""
    out, ref = out.double(), ref.double()
    diff = (out - ref).norm().item()
    ref_norm = ref.norm().item()
    return diff / ref_norm if ref_norm > 0 else diff


def heatmaps(shape, dtype=torch.float64, device="cpu", generator=None, kind="gaussian"):
    """Heatmap-like test data: Gaussian blobs plus noise, or plain normal noise."""
    batch, joints, height, width = shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "gaussian" and batch * joints > 0:
        ys = torch.arange(height, dtype=torch.float64).view(1, 1, height, 1)
        xs = torch.arange(width, dtype=torch.float64).view(1, 1, 1, width)
        centre_y = torch.rand(batch, joints, 1, 1, generator=generator, dtype=torch.float64) * height
        centre_x = torch.rand(batch, joints, 1, 1, generator=generator, dtype=torch.float64) * width
        sigma = 1 + 2 * torch.rand(batch, joints, 1, 1, generator=generator, dtype=torch.float64)
        blob = torch.exp(-((ys - centre_y) ** 2 + (xs - centre_x) ** 2) / (2 * sigma**2))
        noise = blob + 0.1 * noise
    return noise.to(dtype=dtype, device=device)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def run_checked(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run argv at the project root in a fresh process, with `env` added to this environment
    (the Triton interpreter off unless `env` turns it on); fail the test on a non-zero exit."""
    result = subprocess.run(
        argv,
        env={**os.environ, "TRITON_INTERPRET": "0", **env},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """run_checked for a snippet of Python code (dedented)."""
    return run_checked([sys.executable, "-c", textwrap.dedent(code)], **env)
