"""pixel_weight in the fused backends (docs/spec.md sections 1, 2 and 6): every fused backend
against the reference backend in float64, for every way a weight broadcasts or is laid out,
over empty batches, 1xW, Hx1, odd and multi-tile planes, every stencil, reduction, teacher form
and target-weight form, with gradients for every input that can require grad; low-precision
dtypes at the spec's tolerances; separable targets; determinism, gradcheck and opcheck; and the
refusal of a pixel weight that asks for a gradient the fused operators do not give."""

import pytest
import torch

import hgloss
from hgloss import contract, targets

from conftest import FUSED_DEVICES, fused_backend_params, fused_op, grad_error, heatmaps, interpreted, loss_error

STENCILS = ("forward", "central", "sobel")
REDUCTIONS = ("mean", "sum", "none")
SHAPES = [(0, 3, 5, 5), (2, 3, 1, 9), (2, 3, 9, 1), (2, 3, 2, 2), (2, 3, 7, 5), (2, 17, 64, 48)]
TOLERANCE = 1e-9


def pixel_weight_of(kind, shape, generator, device="cpu", dtype=torch.float64):
    """A non-negative pixel weight of one broadcast form or layout."""
    batch, joints, height, width = shape

    def rand(*size):
        return torch.rand(*size, generator=generator, dtype=torch.float64).to(device, dtype)

    weights = {
        "full": lambda: rand(batch, joints, height, width),
        "per_sample": lambda: rand(batch, 1, height, width),
        "per_joint_column": lambda: rand(1, joints, 1, width),
        "per_row": lambda: rand(batch, joints, height, 1),
        "plane": lambda: rand(height, width),
        "scalar": lambda: rand(()),
        "expanded": lambda: rand(1, 1, height, width).expand(batch, joints, height, width),
        "transposed": lambda: rand(batch, joints, width, height).transpose(-1, -2),
        "mask": lambda: (rand(batch, 1, height, width) > 0.4).to(dtype),
    }
    return weights[kind]()


KINDS = ("full", "per_sample", "per_joint_column", "per_row", "plane", "scalar", "expanded", "transposed", "mask")


def case(shape, generator, device, teacher="per-sample", target_weight=(1,)):
    batch, joints = shape[:2]
    inputs = {
        "pred": heatmaps(shape, torch.float64, device, generator).requires_grad_(True),
        "target": heatmaps(shape, torch.float64, device, generator).requires_grad_(True),
        "teacher": None,
        "alpha": 0.5,
        "target_weight": None,
    }
    if teacher != "none":
        inputs["teacher"] = heatmaps(shape, torch.float64, device, generator).requires_grad_(True)
        inputs["alpha"] = 0.3 if teacher == "float" else torch.rand(batch, generator=generator).double().to(device)
    if target_weight is not None:
        weight = torch.rand((batch, joints) + target_weight, generator=generator, dtype=torch.float64)
        inputs["target_weight"] = weight.to(device).requires_grad_(True)
    return inputs


def loss_and_grads(backend, inputs, pixel_weight, stencil, reduction, upstream, grad_weight=1.7):
    loss = hgloss.heatmap_gradient_loss(
        inputs["pred"], inputs["target"], inputs["target_weight"], teacher=inputs["teacher"], alpha=inputs["alpha"],
        mse_weight=0.8, grad_weight=grad_weight, stencil=stencil, reduction=reduction, backend=backend,
        pixel_weight=pixel_weight,
    )
    names = [name for name in ("pred", "target", "teacher", "target_weight") if inputs[name] is not None]
    grads = torch.autograd.grad(loss, [inputs[name] for name in names], upstream) if loss.numel() else ()
    return loss, dict(zip(names, grads))


def assert_matches_reference(backend, inputs, pixel_weight, stencil, reduction, generator, tolerance=TOLERANCE,
                             grad_weight=1.7):
    pred = inputs["pred"]
    if reduction == "none":
        upstream = torch.randn(pred.shape[:2], generator=generator, dtype=torch.float64).to(pred.device)
    else:
        upstream = torch.tensor(-1.7, dtype=torch.float64, device=pred.device)
    loss, grads = loss_and_grads(backend, inputs, pixel_weight, stencil, reduction, upstream, grad_weight)
    ref_loss, ref_grads = loss_and_grads("reference", inputs, pixel_weight, stencil, reduction, upstream, grad_weight)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert loss_error(loss, ref_loss) <= tolerance, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.shape == ref_grads[name].shape and grad.dtype == ref_grads[name].dtype, name
        assert grad_error(grad, ref_grads[name]) <= tolerance, f"d/d{name}: {grad_error(grad, ref_grads[name])}"


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_form_matches_the_reference(backend, shape, stencil, kind, generator):
    device = FUSED_DEVICES[backend]
    inputs = case(shape, generator, device)
    pixel_weight = pixel_weight_of(kind, shape, generator, device)
    assert_matches_reference(backend, inputs, pixel_weight, stencil, "mean", generator)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("teacher", ["none", "float", "per-sample"])
@pytest.mark.parametrize("target_weight", [None, (), (1,), (1, 1)], ids=["no-weight", "BK", "BK1", "BK11"])
def test_every_reduction_teacher_and_target_weight(backend, reduction, teacher, target_weight, generator):
    shape, device = (2, 3, 8, 6), FUSED_DEVICES[backend]
    inputs = case(shape, generator, device, teacher, target_weight)
    pixel_weight = pixel_weight_of("per_sample", shape, generator, device)
    assert_matches_reference(backend, inputs, pixel_weight, "central", reduction, generator)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 3, 1, 9), (2, 3, 9, 1), (2, 17, 64, 48)], ids=str)
@pytest.mark.parametrize("kind", [None, "per_sample", "transposed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_without_the_gradient_term(backend, shape, kind, reduction, generator):
    """grad_weight = 0, the MSE of the compat classes, which the cpu kernel computes without
    building the gradient maps."""
    device = FUSED_DEVICES[backend]
    inputs = case(shape, generator, device)
    pixel_weight = None if kind is None else pixel_weight_of(kind, shape, generator, device)
    assert_matches_reference(backend, inputs, pixel_weight, "sobel", reduction, generator, grad_weight=0.0)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("stencil", STENCILS)
def test_planes_over_several_tiles(backend, stencil, generator):
    """Big planes: several tiles per plane in the Triton and CUDA kernels, whose neighbours'
    weighted map entries cross tile edges."""
    shape = (1, 2, 200, 150) if interpreted(backend) else (2, 3, 256, 192)
    device = FUSED_DEVICES[backend]
    inputs = case(shape, generator, device)
    pixel_weight = pixel_weight_of("per_joint_column", shape, generator, device)
    assert_matches_reference(backend, inputs, pixel_weight, stencil, "sum", generator)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("layout", ["channels-last", "sliced"])
def test_non_contiguous_inputs_with_a_pixel_weight(backend, layout, generator):
    shape, device = (2, 3, 9, 6), FUSED_DEVICES[backend]
    inputs = case(shape, generator, device)
    for name in ("pred", "target", "teacher"):
        values = inputs[name].detach()
        if layout == "channels-last":
            moved = values.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        else:
            padded = torch.zeros(2, 6, 12, 12, dtype=values.dtype, device=device)
            moved = padded[:, ::2, 1:10, ::2]
            moved.copy_(values)
        assert not moved.is_contiguous()
        inputs[name] = moved.requires_grad_(True)
    pixel_weight = torch.rand(2, 3, 9, 12, generator=generator, dtype=torch.float64).to(device)[..., ::2]
    assert_matches_reference(backend, inputs, pixel_weight, "sobel", "mean", generator)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize(
    "pred_dtype,weight_dtype,tolerance",
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.float32, torch.float16, 1e-5),
        (torch.float64, torch.bfloat16, 1e-9),
        (torch.float16, torch.float16, 2e-3),
        (torch.bfloat16, torch.float32, 1e-2),
    ],
    ids=str,
)
def test_dtypes_meet_the_spec_tolerances(backend, pred_dtype, weight_dtype, tolerance, generator):
    """Against the reference in float64 on the very same (upcast) inputs."""
    shape, device = (2, 3, 16, 12), FUSED_DEVICES[backend]
    pred = heatmaps(shape, pred_dtype, device, generator).requires_grad_(True)
    target = heatmaps(shape, pred_dtype, device, generator)
    pixel_weight = pixel_weight_of("per_sample", shape, generator, device, weight_dtype)
    loss = hgloss.heatmap_gradient_loss(pred, target, stencil="sobel", backend=backend, pixel_weight=pixel_weight)
    (grad,) = torch.autograd.grad(loss, pred)
    pred64 = pred.detach().double().requires_grad_(True)
    ref = hgloss.heatmap_gradient_loss(
        pred64, target.double(), stencil="sobel", backend="reference", pixel_weight=pixel_weight.double()
    )
    (ref_grad,) = torch.autograd.grad(ref, pred64)
    assert loss.dtype == contract.accumulation_dtype(pred) and grad.dtype == pred_dtype
    assert loss_error(loss, ref) <= tolerance
    assert grad_error(grad, ref_grad) <= tolerance


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("stencil", STENCILS)
def test_separable_target_with_a_pixel_weight(backend, stencil, generator):
    """The operator with a separable target and a pixel weight equals the one with the target
    those factors stand for."""
    shape, device = (2, 4, 11, 9), FUSED_DEVICES[backend]
    keypoints = (torch.rand(2, 4, 2, generator=generator, dtype=torch.float64) * torch.tensor([9.0, 11.0])).to(device)
    rows, cols, _ = targets.gaussian_factors(keypoints, None, 11, 9, 1.5, "udp")
    pred = heatmaps(shape, torch.float32, device, generator)
    pixel_weight = pixel_weight_of("per_sample", shape, generator, device, torch.float32)
    common = (None, None, None, 1.0, 0.5, stencil, "none", True)
    separable = fused_op(backend)(pred, None, *common, rows, cols, pixel_weight)
    tensor = fused_op(backend)(pred, targets.materialise(rows, cols), *common, None, None, pixel_weight)
    for ours, theirs in zip(separable, tensor):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend", fused_backend_params())
def test_results_are_bit_identical_run_to_run(backend, generator):
    shape, device = (3, 5, 24, 20), FUSED_DEVICES[backend]
    inputs = case(shape, generator, device)
    pixel_weight = pixel_weight_of("mask", shape, generator, device)
    upstream = torch.tensor(1.0, dtype=torch.float64)
    first = loss_and_grads(backend, inputs, pixel_weight, "sobel", "mean", upstream)
    second = loss_and_grads(backend, inputs, pixel_weight, "sobel", "mean", upstream)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("stencil", STENCILS)
def test_gradcheck_with_a_pixel_weight(backend, stencil, generator):
    shape, device = (2, 2, 5, 4), FUSED_DEVICES[backend]
    pred, target, teacher = (heatmaps(shape, torch.float64, device, generator).requires_grad_(True) for _ in range(3))
    weight = torch.rand(2, 2, 1, generator=generator, dtype=torch.float64).to(device).requires_grad_(True)
    pixel_weight = pixel_weight_of("per_sample", shape, generator, device)

    def loss(p, g, s, w):
        return hgloss.heatmap_gradient_loss(
            p, g, w, teacher=s, alpha=0.4, stencil=stencil, reduction="none", backend=backend,
            pixel_weight=pixel_weight,
        )

    # fast_mode under the interpreter, as tests/test_fused_ops.py does: random projections of the
    # same Jacobians in a few calls instead of hundreds.
    assert torch.autograd.gradcheck(loss, (pred, target, teacher, weight), fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", fused_backend_params())
def test_opcheck_with_a_pixel_weight(backend, generator):
    shape, device = (2, 3, 6, 5), FUSED_DEVICES[backend]
    for kind in ("full", "expanded", "plane"):
        pred = heatmaps(shape, torch.float32, device, generator).requires_grad_(True)
        target = heatmaps(shape, torch.float32, device, generator)
        pixel_weight = pixel_weight_of(kind, shape, generator, device, torch.float32)
        weight = torch.rand(2, 3, generator=generator).to(device)
        args = (pred, target, None, None, weight, 1.0, 0.5, "sobel", "mean", True, None, None, pixel_weight)
        torch.library.opcheck(fused_op(backend).default, args)


# --- a pixel weight that asks for a gradient ---


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_a_fused_backend_named_for_the_gradient_of_a_pixel_weight_is_a_value_error(backend, generator):
    pred = heatmaps((2, 3, 6, 5), generator=generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), generator=generator)
    pixel_weight = torch.rand(2, 1, 6, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    message = (
        f"the gradient of pixel_weight is computed by the reference backend only, not by '{backend}'; "
        "use backend='reference' or 'auto'"
    )
    with pytest.raises(ValueError) as raised:
        hgloss.heatmap_gradient_loss(pred, target, backend=backend, pixel_weight=pixel_weight)
    assert str(raised.value) == message


def test_auto_differentiates_a_pixel_weight_with_the_reference_and_otherwise_fuses(monkeypatch, generator):
    if "cpu" not in hgloss.available_backends():
        pytest.skip("the C++ extension did not load")
    monkeypatch.setenv("HGLOSS_BACKEND", "cpu")
    pred = heatmaps((2, 3, 6, 5), generator=generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), generator=generator)
    pixel_weight = torch.rand(2, 1, 6, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    reference = hgloss.heatmap_gradient_loss(pred, target, backend="reference", pixel_weight=pixel_weight)
    auto = hgloss.heatmap_gradient_loss(pred, target, pixel_weight=pixel_weight)
    assert torch.equal(auto, reference)
    (auto_grad,) = torch.autograd.grad(auto, pixel_weight)
    (reference_grad,) = torch.autograd.grad(reference, pixel_weight)
    assert torch.equal(auto_grad, reference_grad)
    fused = hgloss.heatmap_gradient_loss(pred, target, pixel_weight=pixel_weight.detach())
    assert fused.grad_fn.name() != reference.grad_fn.name()  # the operator's autograd, not PyTorch's
    with torch.no_grad():
        assert torch.equal(hgloss.heatmap_gradient_loss(pred, target, pixel_weight=pixel_weight), fused.detach())


@pytest.mark.parametrize("backend", fused_backend_params())
def test_the_operators_refuse_a_pixel_weight_that_requires_grad(backend, generator):
    device = FUSED_DEVICES[backend]
    pred = heatmaps((2, 3, 6, 5), torch.float32, device, generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), torch.float32, device, generator)
    pixel_weight = torch.rand(2, 1, 6, 5, generator=generator).to(device).requires_grad_(True)
    args = (pred, target, None, None, None, 1.0, 0.5, "sobel", "mean", True, None, None, pixel_weight)
    with pytest.raises(ValueError) as raised:
        fused_op(backend)(*args)
    assert str(raised.value).splitlines()[0] == contract.PIXEL_WEIGHT_GRAD_MESSAGE
    with torch.no_grad():
        loss, _, _ = fused_op(backend)(*args)
    assert torch.isfinite(loss)
