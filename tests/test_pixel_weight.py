"""pixel_weight (docs/spec.md sections 1-3): the reference backend against the formula restated
here, independently of hgloss/stencils.py, for every stencil and reduction and for each way a
weight can broadcast; exactness at M = 1; gradients for pred and pixel_weight; the errors. The
fused backends are held to the reference in tests/test_fused_pixel_weight.py."""

import re

import pytest
import torch

import hgloss
from hgloss.modules import HeatmapGradientLoss

from conftest import heatmaps

STENCILS = ("forward", "central", "sobel")
REDUCTIONS = ("mean", "sum", "none")
SHAPE = (3, 4, 7, 6)


def restated_gradient_maps(diff, weight, stencil):
    """(Ax, Mx, Ay, My): the spec's gradient maps on their valid positions (i, j), each with the
    pixel weight at the same (i, j) (forward: the left/top pixel of the pair; central and sobel:
    the centre pixel)."""
    height, width = diff.shape[-2:]
    if stencil == "forward":
        ax = diff[..., :, 1:] - diff[..., :, :-1]
        ay = diff[..., 1:, :] - diff[..., :-1, :]
        return ax, weight[..., :, : width - 1], ay, weight[..., : height - 1, :]
    if stencil == "central":
        ax = (diff[..., :, 2:] - diff[..., :, : max(width - 2, 0)]) / 2
        ay = (diff[..., 2:, :] - diff[..., : max(height - 2, 0), :]) / 2
        return ax, weight[..., :, 1 : width - 1], ay, weight[..., 1 : height - 1, :]
    # sobel: (1/8) sum over u, v in {-1, 0, 1} of v (2 - |u|) D[i+u, j+v] (and u (2 - |v|) for y),
    # i in [1, H-1), j in [1, W-1).
    rows, cols = max(height - 2, 0), max(width - 2, 0)

    def shifted(u, v):
        return diff[..., 1 + u : 1 + u + rows, 1 + v : 1 + v + cols]

    ax = sum(v * (2 - abs(u)) * shifted(u, v) for u in (-1, 0, 1) for v in (-1, 0, 1)) / 8
    ay = sum(u * (2 - abs(v)) * shifted(u, v) for u in (-1, 0, 1) for v in (-1, 0, 1)) / 8
    centre = weight[..., 1 : 1 + rows, 1 : 1 + cols]
    return ax, centre, ay, centre


def restated_loss(pred, target, pixel_weight, stencil, reduction, mse_weight=1.0, grad_weight=1.0,
                  target_weight=None, teacher=None, alpha=0.5):
    """docs/spec.md section 1 with a pixel weight M, written out in float64."""
    soft = target if teacher is None else (1 - alpha) * target + alpha * teacher
    diff = pred - soft
    height, width = diff.shape[-2:]
    weight = pixel_weight.expand(diff.shape)
    value = (weight * diff**2).sum(dim=(-2, -1)) / (height * width)
    ax, mx, ay, my = restated_gradient_maps(diff, weight, stencil)
    count = ax.shape[-2] * ax.shape[-1] + ay.shape[-2] * ay.shape[-1]
    if count:
        gradient = ((mx * ax**2).sum(dim=(-2, -1)) + (my * ay**2).sum(dim=(-2, -1))) / count
    else:
        gradient = torch.zeros_like(value)
    planes = mse_weight * value + grad_weight * gradient
    if target_weight is not None:
        planes = planes * target_weight.reshape(planes.shape)
    if reduction == "none":
        return planes
    if reduction == "sum":
        return planes.sum()
    return planes.sum() / max(planes.numel(), 1)


def weight_of(kind, shape, generator):
    """A pixel weight of one of the broadcast kinds, non-negative, float64."""
    batch, joints, height, width = shape

    def rand(*size):
        return torch.rand(*size, generator=generator, dtype=torch.float64)

    if kind == "full":
        return rand(batch, joints, height, width)
    if kind == "per_sample":
        return rand(batch, 1, height, width)
    if kind == "per_joint_column":
        return rand(1, joints, 1, width)
    if kind == "plane":
        return rand(height, width)
    if kind == "expanded":  # stride 0 along B and K
        return rand(1, 1, height, width).expand(batch, joints, height, width)
    if kind == "non_contiguous":  # a transposed view
        return rand(batch, joints, width, height).transpose(-1, -2)
    raise ValueError(kind)


WEIGHT_KINDS = ("full", "per_sample", "per_joint_column", "plane", "expanded", "non_contiguous")


def inputs(generator, shape=SHAPE):
    pred = heatmaps(shape, generator=generator).requires_grad_(True)
    target = heatmaps(shape, generator=generator)
    return pred, target


def assert_loss_and_grads(ours, theirs, tensors):
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14), (ours, theirs)
    if ours.numel() == 0:
        return
    ours_grads = torch.autograd.grad(ours.sum(), tensors)
    theirs_grads = torch.autograd.grad(theirs.sum(), tensors)
    for mine, ref in zip(ours_grads, theirs_grads):
        assert torch.allclose(mine, ref, rtol=1e-10, atol=1e-13 * max(ref.abs().max().item(), 1.0))


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", WEIGHT_KINDS)
def test_reference_matches_the_restated_formula(stencil, reduction, kind, generator):
    pred, target = inputs(generator)
    weight = weight_of(kind, SHAPE, generator)
    leaf = weight if weight.is_leaf else None
    if leaf is not None:
        leaf.requires_grad_(True)
    ours = hgloss.heatmap_gradient_loss(
        pred, target, stencil=stencil, reduction=reduction, grad_weight=1.5, mse_weight=0.7,
        pixel_weight=weight, backend="reference",
    )
    theirs = restated_loss(pred, target, weight, stencil, reduction, mse_weight=0.7, grad_weight=1.5)
    assert_loss_and_grads(ours, theirs, (pred,) if leaf is None else (pred, leaf))


@pytest.mark.parametrize("stencil", STENCILS)
def test_pixel_weight_with_target_weight_and_teacher(stencil, generator):
    pred, target = inputs(generator)
    teacher = heatmaps(SHAPE, generator=generator)
    target_weight = torch.rand(SHAPE[0], SHAPE[1], 1, generator=generator, dtype=torch.float64).requires_grad_(True)
    weight = weight_of("per_sample", SHAPE, generator).requires_grad_(True)
    ours = hgloss.heatmap_gradient_loss(
        pred, target, target_weight, teacher=teacher, alpha=0.3, stencil=stencil, pixel_weight=weight,
    )
    theirs = restated_loss(pred, target, weight, stencil, "mean", target_weight=target_weight, teacher=teacher,
                           alpha=0.3)
    assert_loss_and_grads(ours, theirs, (pred, target_weight, weight))


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("shape", [(2, 3, 1, 5), (2, 3, 4, 1), (2, 3, 2, 2), (1, 1, 1, 1)], ids=str)
def test_small_planes(stencil, shape, generator):
    """Planes where some or all gradient maps are empty (W = 1, H = 1, sobel on 2x2)."""
    pred, target = inputs(generator, shape)
    weight = weight_of("full", shape, generator)
    ours = hgloss.heatmap_gradient_loss(pred, target, stencil=stencil, pixel_weight=weight, backend="reference")
    assert_loss_and_grads(ours, restated_loss(pred, target, weight, stencil, "mean"), (pred,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["full", "per_sample", "plane", "expanded"])
def test_empty_batch(reduction, kind, generator):
    shape = (0,) + SHAPE[1:]
    pred, target = inputs(generator, shape)
    weight = weight_of(kind, (1,) + SHAPE[1:], generator)
    if kind == "full":
        weight = weight[:0]
    elif kind == "expanded":
        weight = weight[:1].expand(shape)
    ours = hgloss.heatmap_gradient_loss(pred, target, reduction=reduction, pixel_weight=weight, backend="reference")
    expected = torch.zeros((0, SHAPE[1]) if reduction == "none" else (), dtype=torch.float64)
    assert torch.equal(ours, expected)
    if reduction != "none":
        ours.backward()
        assert pred.grad.shape == shape


@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("gradient_form", ["components", "magnitude"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_unit_weight_is_exactly_no_weight(stencil, gradient_form, dtype, generator):
    pred, target = inputs(generator)
    pred = pred.detach().to(dtype).requires_grad_(True)
    target = target.to(dtype)
    kwargs = dict(stencil=stencil, gradient_form=gradient_form, reduction="none", grad_weight=2.0)
    plain = hgloss.heatmap_gradient_loss(pred, target, backend="reference", **kwargs)
    (plain_grad,) = torch.autograd.grad(plain.sum(), pred)
    for ones in (torch.ones(SHAPE, dtype=dtype), torch.ones((), dtype=torch.float64).expand(SHAPE[-2:])):
        weighted = hgloss.heatmap_gradient_loss(pred, target, pixel_weight=ones, backend="reference", **kwargs)
        (weighted_grad,) = torch.autograd.grad(weighted.sum(), pred)
        assert torch.equal(weighted, plain)
        assert torch.equal(weighted_grad, plain_grad)


def test_magnitude_form_weights_each_common_position(generator):
    """The magnitude form: (|grad P| - |grad T|)^2 weighted by M at each position where both
    maps are defined, over the count of those positions."""
    pred, target = inputs(generator)
    weight = weight_of("full", SHAPE, generator)
    ours = hgloss.heatmap_gradient_loss(
        pred, target, stencil="central", gradient_form="magnitude", mse_weight=0.0, pixel_weight=weight,
        reduction="none",
    )
    tiny = torch.finfo(torch.float64).tiny

    def magnitude(x):  # central differences on the interior, where both maps are defined
        ax = (x[..., 1:-1, 2:] - x[..., 1:-1, :-2]) / 2
        ay = (x[..., 2:, 1:-1] - x[..., :-2, 1:-1]) / 2
        return torch.sqrt(ax**2 + ay**2 + tiny)

    gap = magnitude(pred) - magnitude(target)
    theirs = (weight[..., 1:-1, 1:-1] * gap**2).sum(dim=(-2, -1)) / gap[0, 0].numel()
    assert_loss_and_grads(ours, theirs, (pred,))


@pytest.mark.parametrize("stencil", STENCILS)
def test_gradcheck_pred_and_pixel_weight(stencil):
    generator = torch.Generator().manual_seed(7)
    shape = (2, 2, 4, 5)
    pred, target = inputs(generator, shape)
    weight = torch.rand(2, 1, 4, 5, generator=generator, dtype=torch.float64).requires_grad_(True)

    def loss(p, m):
        return hgloss.heatmap_gradient_loss(p, target, stencil=stencil, reduction="none", pixel_weight=m)

    assert torch.autograd.gradcheck(loss, (pred, weight))
    assert torch.autograd.gradgradcheck(loss, (pred, weight))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_passes_pixel_weight(reduction, generator):
    pred, target = inputs(generator)
    target_weight = torch.rand(SHAPE[0], SHAPE[1], generator=generator, dtype=torch.float64)
    weight = weight_of("per_sample", SHAPE, generator)
    for use_target_weight in (True, False):
        module = HeatmapGradientLoss(grad_weight=0.5, stencil="sobel", reduction=reduction,
                                     use_target_weight=use_target_weight)
        expected = hgloss.heatmap_gradient_loss(
            pred, target, target_weight if use_target_weight else None, grad_weight=0.5, stencil="sobel",
            reduction=reduction, pixel_weight=weight,
        )
        assert torch.equal(module(pred, target, target_weight, pixel_weight=weight), expected)
    ohkm = HeatmapGradientLoss(reduction=reduction, ohkm_topk=2)
    planes = hgloss.heatmap_gradient_loss(pred, target, target_weight, reduction="none", pixel_weight=weight)
    per_sample = planes.topk(2, dim=1).values.mean(dim=1)
    expected = {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[reduction]
    assert torch.allclose(ohkm(pred, target, target_weight, pixel_weight=weight), expected, rtol=1e-14)


def test_float32_pred_with_half_weight(generator):
    pred, target = inputs(generator)
    weight = weight_of("plane", SHAPE, generator)
    ours = hgloss.heatmap_gradient_loss(
        pred.detach().float(), target.float(), pixel_weight=weight.half(), backend="reference"
    )
    theirs = restated_loss(pred.detach(), target, weight.half().double(), "forward", "mean")
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), theirs, rtol=1e-5)


# --- errors (docs/spec.md section 2) ---


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64], ids=str)
def test_non_floating_pixel_weight_is_a_type_error(dtype, generator):
    pred, target = inputs(generator)
    with pytest.raises(TypeError, match=r"pixel_weight must have a floating dtype .*got torch\.(int64|bool|complex64)"):
        hgloss.heatmap_gradient_loss(pred, target, pixel_weight=torch.ones(SHAPE, dtype=dtype))


def test_pixel_weight_that_is_not_a_tensor_is_a_type_error(generator):
    pred, target = inputs(generator)
    with pytest.raises(TypeError, match="pixel_weight must be a tensor, got list"):
        hgloss.heatmap_gradient_loss(pred, target, pixel_weight=[1.0])


@pytest.mark.parametrize(
    "shape", [(3, 4, 7, 5), (2, 4, 7, 6), (3, 4, 7), (1, 3, 4, 7, 6), (7, 6, 1), (0, 4, 7, 6), (7,)], ids=str
)
def test_pixel_weight_that_does_not_broadcast_is_a_value_error(shape, generator):
    pred, target = inputs(generator)
    message = f"pixel_weight shape {tuple(shape)!r} does not broadcast to pred shape (3, 4, 7, 6) (B, K, H, W)"
    with pytest.raises(ValueError, match=re.escape(message)):
        hgloss.heatmap_gradient_loss(pred, target, pixel_weight=torch.ones(shape, dtype=torch.float64))


def test_pixel_weight_on_another_device_is_the_devices_error(generator):
    pred, target = inputs(generator)
    with pytest.raises(ValueError, match="all tensors must be on one device, got .*pixel_weight on meta"):
        hgloss.heatmap_gradient_loss(pred, target, pixel_weight=torch.ones(SHAPE, device="meta"))
