"""What is particular to the Triton backend: where it may run, its multi-tile and packed-plane
launches, bfloat16 under the interpreter, and kernels that compile for real GPUs.

The shared matrices (test_fused_vs_reference.py, test_fused_ops.py) run the Triton backend like
every fused backend: on a GPU when there is one, else under the Triton interpreter."""

import os
import sys

import pytest
import torch

import hgloss
from hgloss import functional

from conftest import FUSED_DEVICES, ROOT, grad_error, heatmaps, loss_error, run_checked, run_python
from test_fused_vs_reference import assert_matches_reference, make_case

needs_triton = pytest.mark.skipif(
    "triton" not in hgloss.available_backends(), reason="Triton unavailable: no GPU and the interpreter is off"
)


def test_triton_on_cpu_tensors_outside_the_interpreter_is_refused():
    result = run_python(
        """
        import torch, hgloss
        try:
            hgloss.heatmap_gradient_loss(torch.rand(2, 3, 8, 6), torch.rand(2, 3, 8, 6), backend="triton")
        except RuntimeError as error:
            print("refused:", error)
        """,
        HGLOSS_BACKEND="",
    )
    assert "refused: backend 'triton' is not available for cpu tensors" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


@needs_triton
def test_auto_never_picks_the_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("HGLOSS_BACKEND", raising=False)
    assert functional.resolve_backend("auto", torch.device("cpu")) in ("cpu", "reference")
    if torch.cuda.is_available():
        assert functional.resolve_backend("auto", torch.device("cuda")) in ("cuda", "triton")


@needs_triton
@pytest.mark.parametrize(
    "shape",
    # Planes larger than a tile on a GPU and under the interpreter alike: several tiles per plane.
    [(1, 2, 100, 90), (2, 1, 1, 9000), (2, 1, 9000, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
def test_planes_split_across_tiles_match_the_reference(shape, stencil, generator):
    from hgloss.backends import triton as triton_backend

    _, tiles, _, _ = triton_backend.launch_shape(shape[2], shape[3], stencil)
    assert tiles > 1
    inputs = make_case(shape, "per-sample", (1,), generator, device=FUSED_DEVICES["triton"])
    assert_matches_reference("triton", inputs, "none", stencil, generator)


@needs_triton
@pytest.mark.parametrize("stencil", ["forward", "central", "sobel"])
def test_small_planes_packed_into_one_program_match_the_reference(stencil, generator):
    from hgloss.backends import triton as triton_backend

    shape = (5, 7, 6, 5)
    _, tiles, planes_per_program, _ = triton_backend.launch_shape(shape[2], shape[3], stencil)
    # 35 planes over programs that hold several, the last one partly empty.
    assert tiles == 1 and 1 < planes_per_program and shape[0] * shape[1] % planes_per_program
    inputs = make_case(shape, "per-sample", (1,), generator, device=FUSED_DEVICES["triton"])
    assert_matches_reference("triton", inputs, "mean", stencil, generator)


@needs_triton
@pytest.mark.parametrize("with_teacher", [False, True], ids=["target", "teacher"])
def test_bfloat16_inputs_are_upcast_before_any_arithmetic(with_teacher, generator):
    """The interpreter computes bfloat16 arithmetic wrongly without an error; the kernels convert
    every load to float32 first, so bfloat16 inputs give the float32 result on the same values."""
    shape, device = (3, 4, 16, 12), FUSED_DEVICES["triton"]
    values = [heatmaps(shape, torch.bfloat16, device, generator) for _ in range(3)]
    alpha = torch.rand(3, generator=generator).to(device)
    teacher = values[2] if with_teacher else None
    pred = values[0].clone().requires_grad_(True)
    loss = hgloss.heatmap_gradient_loss(pred, values[1], teacher=teacher, alpha=alpha, stencil="sobel", backend="triton")
    (grad,) = torch.autograd.grad(loss, pred)

    upcast = [value.double() for value in values]
    upcast[0].requires_grad_(True)
    ref = hgloss.heatmap_gradient_loss(
        upcast[0], upcast[1], teacher=upcast[2] if with_teacher else None, alpha=alpha.double(),
        stencil="sobel", backend="reference",
    )
    (ref_grad,) = torch.autograd.grad(ref, upcast[0])
    assert loss_error(loss, ref) <= 1e-6
    # The gradient itself is returned in bfloat16: one rounding, 2^-9 relative at most.
    assert grad.dtype == torch.bfloat16
    assert grad_error(grad, ref_grad) <= 2**-8


def test_kernels_compile_for_sm80_and_sm90_without_spilling():
    """triton.compile for sm_80 and sm_90 with the nvidia backend shipped in the triton wheel; no
    GPU needed. Catches kernels the interpreter accepts and the GPU compiler does not."""
    pytest.importorskip("triton")
    result = run_checked([sys.executable, os.path.join(ROOT, "tests", "triton_gpu_compile.py")])
    print(result.stdout)
    assert result.stdout.count(" sm_80 ") == result.stdout.count(" sm_90a ") > 20


def test_gpu_registration_traces_with_fake_cuda_tensors():
    """On a GPU the operator is a triton_op, whose body torch.compile traces with fake tensors;
    tracing needs no GPU, so it is checked here with fake CUDA tensors."""
    result = run_python(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from hgloss import ops
        from hgloss.backends import triton as triton_backend
        assert not triton_backend.INTERPRETING
        ops.define_triton_operator()
        with FakeTensorMode():
            pred, target, teacher = (torch.empty(4, 17, 64, 48, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            alpha, weight = torch.empty(4, device="cuda"), torch.empty(4, 17, device="cuda")
            for stencil in ("forward", "central", "sobel"):
                for reduction in ("mean", "none"):
                    loss, terms, grad = torch.ops.hgloss.triton_heatmap_loss(
                        pred, target, teacher, alpha, weight, 1.0, 0.5, stencil, reduction, True
                    )
                    print(stencil, reduction, tuple(loss.shape), tuple(terms.shape), tuple(grad.shape), grad.dtype, grad.device)
        """
    )
    assert result.stdout.count("(4, 17, 64, 48) torch.bfloat16 cuda") == 6
    assert "sobel mean () (4, 17)" in result.stdout and "sobel none (4, 17) (4, 17)" in result.stdout
