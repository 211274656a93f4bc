"""The Triton operator on a separable target: target None, and the float64 factors target_rows
(B, K, H) and target_cols (B, K, W) of hgloss.targets, G[b, k, i, j] = float32(rows[i] * cols[j]).
Its loss, per-plane terms and dL/dD must be those of the same operator on the target tensor the
factors stand for (targets.materialise), and those of the reference backend on that tensor.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest.py switches it
on before hgloss is imported), slowly, at a cost per kernel operation: the planes are small, the
widest stencil (sobel) is used where it adds something, and the stencils, reductions, dtypes,
optional inputs and factor settings are covered pairwise rather than as a full product. Only the
reference and Triton backends are used, so the C++ extension is never loaded.
"""

import pytest
import torch

import hgloss
from hgloss import functional, ops, targets

from conftest import FUSED_DEVICES, fused_op, grad_error, heatmaps, loss_error

pytestmark = pytest.mark.skipif(
    not ops.load_triton_operator(), reason="Triton unavailable" + functional.why_unavailable("triton")
)

DEVICE = FUSED_DEVICES["triton"]
REDUCTIONS = ["mean", "sum", "none"]
MSE_WEIGHT, GRAD_WEIGHT = 0.8, 1.7
# Every stencil with every reduction, with both dtypes and with and without a teacher, alpha and
# weight; every pair of sigma and encoding.
MATRIX = [
    # stencil, reduction, pred dtype, with teacher+alpha+weight, sigma, encoding
    ("forward", "mean", torch.float64, True, 2.0, "msra"),
    ("forward", "sum", torch.float32, False, 1.5, "udp"),
    ("forward", "none", torch.float64, False, 2.0, "udp"),
    ("central", "mean", torch.float64, False, 1.5, "msra"),
    ("central", "sum", torch.float32, True, 2.0, "msra"),
    ("central", "none", torch.float64, True, 1.5, "udp"),
    ("sobel", "mean", torch.float32, True, 1.5, "udp"),
    ("sobel", "sum", torch.float64, True, 2.0, "udp"),
    ("sobel", "none", torch.float64, False, 1.5, "msra"),
]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def keypoint_factors(shape, sigma, encoding, generator):
    """(rows, cols, keypoint weight) of Gaussian targets for random keypoints. The planes cycle
    through a keypoint inside the map, one on a corner, one outside it (its window reaching in
    or not) and a missing one (weight 0, NaN position)."""
    batch, joints, height, width = shape
    last = torch.tensor([width - 1, height - 1], dtype=torch.float64)
    inside = torch.rand(batch, joints, 2, generator=generator, dtype=torch.float64) * last
    corner = torch.randint(0, 2, (batch, joints, 2), generator=generator).to(torch.float64) * last
    distance = 1 + 8 * torch.rand(batch, joints, 2, generator=generator, dtype=torch.float64)
    below = torch.rand(batch, joints, 2, generator=generator) < 0.5
    outside = torch.where(below, -distance, last + distance)
    kind = (torch.arange(batch * joints) % 4).reshape(batch, joints, 1)
    keypoints = torch.where(kind == 0, inside, torch.where(kind == 1, corner, outside))
    keypoints = torch.where(kind == 3, torch.nan, keypoints)
    keypoint_weight = (kind[..., 0] != 3).to(torch.float64)
    rows, cols, reaches = targets.gaussian_factors(keypoints, keypoint_weight, height, width, sigma, encoding)
    return rows.to(DEVICE), cols.to(DEVICE), keypoint_weight * reaches


def make_case(shape, dtype, with_inputs, generator, sigma=2.0, encoding="msra"):
    """The operator's tensors: pred, the target's factors and, with_inputs, a teacher, a (B,)
    alpha and (B, K) plane weights that are 0 where a keypoint is missing or out of reach."""
    batch, joints = shape[:2]
    rows, cols, keypoint_weight = keypoint_factors(shape, sigma, encoding, generator)
    case = {"pred": heatmaps(shape, dtype, DEVICE, generator), "rows": rows, "cols": cols}
    case.update(teacher=None, alpha=None, weight=None)
    if with_inputs:
        case["teacher"] = heatmaps(shape, dtype, DEVICE, generator)
        case["alpha"] = torch.rand(batch, generator=generator, dtype=torch.float64).to(DEVICE)
        weight = torch.rand(batch, joints, generator=generator, dtype=torch.float64) * keypoint_weight
        case["weight"] = weight.to(DEVICE)
    return case


def triton_outputs(case, stencil, reduction, target=None):
    """(loss, terms, dL/dD) of the Triton operator, on the case's factors or on `target`."""
    factors = (case["rows"], case["cols"]) if target is None else ()
    return fused_op("triton")(
        case["pred"], target, case["teacher"], case["alpha"], case["weight"], MSE_WEIGHT, GRAD_WEIGHT, stencil,
        reduction, True, *factors,
    )


def reference_outputs(case, stencil, reduction):
    """(loss, terms, dL/dD for an upstream gradient of 1) of the reference backend on the
    materialised target, with every input in float64."""
    pred = case["pred"].detach().double().requires_grad_(True)
    common = dict(
        teacher=None if case["teacher"] is None else case["teacher"].double(),
        alpha=0.5 if case["alpha"] is None else case["alpha"].double(),
        mse_weight=MSE_WEIGHT, grad_weight=GRAD_WEIGHT, stencil=stencil, backend="reference",
    )
    target = targets.materialise(case["rows"], case["cols"])
    loss = hgloss.heatmap_gradient_loss(pred, target, case["weight"], reduction=reduction, **common)
    (grad,) = torch.autograd.grad(loss, pred, torch.ones_like(loss))
    terms = hgloss.heatmap_gradient_loss(pred.detach(), target, None, reduction="none", **common)
    return loss, terms, grad


def assert_close(outputs, expected, tolerance):
    """Loss and terms by the largest error relative to the largest value, dL/dD by the relative norm."""
    loss, terms, grad = outputs
    expected_loss, expected_terms, expected_grad = expected
    assert loss.shape == expected_loss.shape and terms.shape == expected_terms.shape
    assert grad.shape == expected_grad.shape
    assert loss_error(loss, expected_loss) <= tolerance
    assert loss_error(terms, expected_terms) <= tolerance
    assert grad_error(grad, expected_grad) <= tolerance


def assert_matches_the_target_tensor(case, stencil, reduction, tolerance):
    """The separable call against the Triton operator on the materialised target, with the same
    output dtypes, and against the reference."""
    outputs = triton_outputs(case, stencil, reduction)
    dense = triton_outputs(case, stencil, reduction, targets.materialise(case["rows"], case["cols"]))
    assert [output.dtype for output in outputs] == [output.dtype for output in dense]
    assert_close(outputs, dense, tolerance)
    assert_close(outputs, reference_outputs(case, stencil, reduction), tolerance)


@pytest.mark.parametrize(
    "stencil, reduction, dtype, with_inputs, sigma, encoding",
    MATRIX,
    ids=[
        f"{stencil}-{reduction}-{str(dtype)[6:]}-{'teacher+weight' if inputs else 'target'}-{encoding}-sigma{sigma}"
        for stencil, reduction, dtype, inputs, sigma, encoding in MATRIX
    ],
)
def test_matches_the_target_tensor(stencil, reduction, dtype, with_inputs, sigma, encoding, generator):
    case = make_case((2, 3, 7, 5), dtype, with_inputs, generator, sigma, encoding)
    assert_matches_the_target_tensor(case, stencil, reduction, TOLERANCE[dtype])


# No sobel: it has no gradient position on a 1 x W or H x 1 plane.
@pytest.mark.parametrize("stencil", ["forward", "central"])
@pytest.mark.parametrize("shape", [(1, 2, 1, 9), (1, 2, 9, 1)], ids=lambda s: "x".join(map(str, s)))
def test_single_row_and_single_column_planes_match_the_target_tensor(shape, stencil, generator):
    case = make_case(shape, torch.float64, True, generator, sigma=1.5, encoding="udp")
    assert_matches_the_target_tensor(case, stencil, "none", TOLERANCE[torch.float64])


def test_a_plane_split_across_tiles_matches_the_target_tensor(generator):
    """Several tiles per plane, on a GPU and under the interpreter alike, with the stencil whose
    taps reach furthest across a tile's edge."""
    from hgloss.backends import triton as triton_backend

    assert triton_backend.launch_shape(100, 90, "sobel")[1] > 1
    case = make_case((1, 1, 100, 90), torch.float64, True, generator, sigma=2.0, encoding="msra")
    assert_matches_the_target_tensor(case, "sobel", "none", TOLERANCE[torch.float64])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_an_empty_batch_matches_the_target_tensor(reduction, generator):
    case = make_case((0, 3, 4, 5), torch.float64, True, generator)
    assert_matches_the_target_tensor(case, "sobel", reduction, TOLERANCE[torch.float64])


def test_a_non_contiguous_pred_matches_the_target_tensor(generator):
    """A transposed pred: its planes are no dense run, so the kernel takes its strided loads."""
    case = make_case((2, 3, 7, 5), torch.float64, True, generator, sigma=2.0, encoding="udp")
    case["pred"] = heatmaps((2, 3, 5, 7), torch.float64, DEVICE, generator).transpose(2, 3)
    assert not case["pred"].is_contiguous()
    assert_matches_the_target_tensor(case, "central", "sum", TOLERANCE[torch.float64])


def test_bfloat16_pred_matches_the_target_tensor(generator):
    """bfloat16 pred and teacher: the same results as on the target tensor, and the float64
    reference on the same values up to the bfloat16 rounding of the returned dL/dD."""
    case = make_case((2, 3, 7, 5), torch.bfloat16, True, generator, sigma=1.5, encoding="msra")
    outputs = triton_outputs(case, "central", "mean")
    dense = triton_outputs(case, "central", "mean", targets.materialise(case["rows"], case["cols"]))
    assert outputs[2].dtype == dense[2].dtype == torch.bfloat16
    assert_close(outputs, dense, TOLERANCE[torch.float32])
    loss, terms, grad = outputs
    expected_loss, expected_terms, expected_grad = reference_outputs(case, "central", "mean")
    assert loss_error(loss, expected_loss) <= TOLERANCE[torch.float32]
    assert loss_error(terms, expected_terms) <= TOLERANCE[torch.float32]
    assert grad_error(grad, expected_grad) <= 2**-8


@pytest.mark.parametrize("stencil, reduction", [("forward", "mean"), ("central", "sum"), ("forward", "none")])
def test_autograd_matches_the_reference(stencil, reduction, generator):
    """Gradients for pred, teacher and weight through the Triton operator's backward, with an
    upstream gradient that is not 1; a second backward through the retained graph recomputes
    dL/dD from the factors."""
    shape = (2, 3, 7, 5)
    case = make_case(shape, torch.float64, True, generator, sigma=2.0, encoding="udp")
    leaves = [case["pred"], case["teacher"], case["weight"]]
    for leaf in leaves:
        leaf.requires_grad_(True)
    if reduction == "none":
        upstream = torch.randn(shape[:2], generator=generator, dtype=torch.float64).to(DEVICE)
    else:
        upstream = torch.tensor(-1.7, dtype=torch.float64, device=DEVICE)

    loss = ops.fused_heatmap_loss(
        "triton", case["pred"], None, case["teacher"], case["alpha"], case["weight"], MSE_WEIGHT, GRAD_WEIGHT,
        stencil, reduction, target_rows=case["rows"], target_cols=case["cols"],
    )
    grads = torch.autograd.grad(loss, leaves, upstream, retain_graph=True)
    again = torch.autograd.grad(loss, leaves, upstream)

    reference_loss = hgloss.heatmap_gradient_loss(
        case["pred"], targets.materialise(case["rows"], case["cols"]), case["weight"], teacher=case["teacher"],
        alpha=case["alpha"], mse_weight=MSE_WEIGHT, grad_weight=GRAD_WEIGHT, stencil=stencil, reduction=reduction,
        backend="reference",
    )
    expected = torch.autograd.grad(reference_loss, leaves, upstream)
    assert loss_error(loss, reference_loss) <= TOLERANCE[torch.float64]
    for grad, second, expected_grad in zip(grads, again, expected):
        assert grad.shape == expected_grad.shape
        assert grad_error(grad, expected_grad) <= TOLERANCE[torch.float64]
        assert torch.equal(second, grad)


def test_the_schema_takes_the_factors_as_optional_tensors():
    schema = str(fused_op("triton").default._schema)
    assert "Tensor? target," in schema
    assert schema.endswith(
        "Tensor? target_rows=None, Tensor? target_cols=None, Tensor? pixel_weight=None) -> (Tensor, Tensor, Tensor)"
    )


@pytest.mark.parametrize("given", ["target and factors", "rows only", "cols only", "neither"])
def test_the_target_comes_as_a_tensor_or_as_both_factors(given, generator):
    case = make_case((2, 3, 7, 5), torch.float64, False, generator)
    rows, cols = case["rows"], case["cols"]
    target, rows, cols = {
        "target and factors": (targets.materialise(rows, cols), rows, cols),
        "rows only": (None, rows, None),
        "cols only": (None, None, cols),
        "neither": (None, None, None),
    }[given]
    with pytest.raises(ValueError, match="give the target as a tensor, or as both target_rows and target_cols"):
        fused_op("triton")(
            case["pred"], target, None, None, None, MSE_WEIGHT, GRAD_WEIGHT, "forward", "mean", False, rows, cols
        )
