"""Every fused backend against the reference backend in float64, over the matrix of docs/spec.md: shapes
(empty batch, 1xW, Hx1, tiny, odd, COCO/MPII sizes, big planes), stencils, reductions, teacher
forms, weight shapes, non-contiguous layouts and mixed dtypes, with gradients for every input
and an upstream gradient that is not 1."""

import pytest
import torch

import hgloss

from conftest import FUSED_DEVICES, fused_backend_params, grad_error, heatmaps, loss_error

STENCILS = ["forward", "central", "sobel"]
REDUCTIONS = ["mean", "sum", "none"]
SHAPES = [
    (0, 17, 64, 48),
    (3, 2, 1, 9),
    (3, 2, 9, 1),
    (2, 3, 1, 1),
    (2, 3, 2, 2),
    (2, 3, 3, 3),
    (2, 3, 7, 5),
    (2, 17, 64, 48),
    (1, 4, 96, 72),
    (1, 2, 128, 128),
]
TEACHERS = ["none", "float", "per-sample"]
TOLERANCE = 1e-9  # float64 throughout: both sides are exact up to summation order


def make_case(shape, teacher, weight_shape, generator, requires_grad=True, dtypes=None, device="cpu"):
    dtypes = dtypes or {}
    batch, joints = shape[:2]
    pred = heatmaps(shape, dtypes.get("pred", torch.float64), device, generator)
    target = heatmaps(shape, dtypes.get("target", torch.float64), device, generator)
    inputs = {"pred": pred, "target": target, "teacher": None, "alpha": 0.5, "target_weight": None}
    if teacher != "none":
        inputs["teacher"] = heatmaps(shape, dtypes.get("teacher", torch.float64), device, generator)
        inputs["alpha"] = (
            0.3 if teacher == "float" else torch.rand(batch, generator=generator, dtype=torch.float64).to(device)
        )
    if weight_shape is not None:
        weight = torch.rand((batch, joints) + weight_shape, generator=generator, dtype=torch.float64)
        inputs["target_weight"] = weight.to(device)
    if requires_grad:
        for name in ("pred", "target", "teacher", "target_weight"):
            if inputs[name] is not None:
                inputs[name].requires_grad_(True)
    return inputs


def loss_and_grads(backend, inputs, reduction, stencil, upstream, mse_weight=0.8, grad_weight=1.7):
    loss = hgloss.heatmap_gradient_loss(
        inputs["pred"],
        inputs["target"],
        inputs["target_weight"],
        teacher=inputs["teacher"],
        alpha=inputs["alpha"],
        mse_weight=mse_weight,
        grad_weight=grad_weight,
        stencil=stencil,
        reduction=reduction,
        backend=backend,
    )
    names = [n for n in ("pred", "target", "teacher", "target_weight") if inputs[n] is not None and inputs[n].requires_grad]
    grads = torch.autograd.grad(loss, [inputs[n] for n in names], upstream) if names else ()
    return loss, dict(zip(names, grads))


def upstream_for(reduction, shape, generator):
    if reduction == "none":
        return torch.randn(shape[:2], generator=generator, dtype=torch.float64)
    return torch.tensor(-1.7, dtype=torch.float64)


def assert_matches_reference(backend, inputs, reduction, stencil, generator, tolerance=TOLERANCE):
    upstream = upstream_for(reduction, inputs["pred"].shape, generator).to(inputs["pred"].device)
    loss, grads = loss_and_grads(backend, inputs, reduction, stencil, upstream)
    ref_loss, ref_grads = loss_and_grads("reference", inputs, reduction, stencil, upstream)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert loss_error(loss, ref_loss) <= tolerance, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        ref_grad = ref_grads[name]
        assert grad.shape == ref_grad.shape and grad.dtype == ref_grad.dtype, name
        assert grad_error(grad, ref_grad) <= tolerance, f"d/d{name}: {grad_error(grad, ref_grad)}"


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matrix(backend, shape, stencil, teacher, reduction, generator):
    inputs = make_case(shape, teacher, (1,), generator, device=FUSED_DEVICES[backend])
    assert_matches_reference(backend, inputs, reduction, stencil, generator)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("weight_shape", [None, (), (1,), (1, 1)], ids=["no-weight", "BK", "BK1", "BK11"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_shapes(backend, weight_shape, reduction, generator):
    inputs = make_case((3, 5, 11, 7), "per-sample", weight_shape, generator, device=FUSED_DEVICES[backend])
    assert_matches_reference(backend, inputs, reduction, "sobel", generator)


def non_contiguous(tensor, layout):
    """The same values as `tensor` in a non-contiguous layout."""
    if layout == "channels-last":
        return tensor.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    if layout == "transposed":
        return tensor.detach().transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        batch, joints, height, width = tensor.shape
        padded = torch.zeros(batch, 2 * joints, height + 3, 2 * width, dtype=tensor.dtype, device=tensor.device)
        view = padded[:, ::2, 1 : height + 1, ::2]
        view.copy_(tensor.detach())
        return view
    raise ValueError(layout)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("layout", ["channels-last", "transposed", "sliced"])
@pytest.mark.parametrize("stencil", STENCILS)
def test_non_contiguous(backend, layout, stencil, generator):
    inputs = make_case((2, 3, 9, 6), "per-sample", (1,), generator, requires_grad=False, device=FUSED_DEVICES[backend])
    for name in ("pred", "target", "teacher"):
        inputs[name] = non_contiguous(inputs[name], layout).requires_grad_(True)
        assert not inputs[name].is_contiguous()
    inputs["target_weight"] = inputs["target_weight"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    assert_matches_reference(backend, inputs, "mean", stencil, generator)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize(
    "dtypes",
    [
        {"pred": torch.float32, "target": torch.float64, "teacher": torch.bfloat16},
        {"pred": torch.float16, "target": torch.float32, "teacher": torch.float64},
        {"pred": torch.float64, "target": torch.float16, "teacher": torch.float32},
        {"pred": torch.bfloat16, "target": torch.bfloat16, "teacher": torch.float16},
    ],
    ids=lambda d: "-".join(str(v).removeprefix("torch.") for v in d.values()),
)
def test_mixed_dtypes(backend, dtypes, generator):
    """Mixed input dtypes against the reference on the very same inputs, in each input's dtype."""
    inputs = make_case((2, 3, 16, 12), "per-sample", (1,), generator, dtypes=dtypes, device=FUSED_DEVICES[backend])
    pred_dtype = dtypes["pred"]
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[pred_dtype]
    assert_matches_reference(backend, inputs, "sum", "central", generator, tolerance=tolerance)
