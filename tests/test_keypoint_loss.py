"""hgloss.keypoint_heatmap_loss: targets built inside the loss from keypoints (docs/spec.md section 7).

The codecs of hgloss.pose are the specification: the targets equal theirs value for value, the loss
equals heatmap_gradient_loss on the codecs' heatmaps and weights, and every fused backend equals the
reference backend over the matrix of shapes, stencils, reductions, teachers, weights, sigmas and
encodings, with gradients, gradcheck, opcheck, determinism and the errors for bad input.
"""

import math

import numpy as np
import pytest
import torch

import hgloss
from hgloss import targets
from hgloss.pose.codecs import MSRAHeatmap, UDPHeatmap

from conftest import fused_backend_params, fused_op, grad_error, heatmaps, interpreted, loss_error

CODECS = {"msra": MSRAHeatmap, "udp": UDPHeatmap}
STENCILS = ["forward", "central", "sobel"]
REDUCTIONS = ["mean", "sum", "none"]
# Non-integer 3 sigma included (1.5, 1.4): the window is int(3 sigma) either way.
SIGMAS = [2.0, 1.5]
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def random_keypoints(batch, joints, height, width, generator, outside=4.0):
    """(B, K, 2) float64 keypoints: most inside the map, some on its border or up to `outside`
    pixels beyond it (their windows may or may not reach it), a few far outside; and (B, K) 0/1
    weights with about a fifth invisible (their keypoints NaN: never read)."""
    size = torch.tensor([width, height], dtype=torch.float64)
    keypoints = torch.rand(batch, joints, 2, generator=generator, dtype=torch.float64) * (size + 2 * outside) - outside
    pick = torch.rand(batch, joints, generator=generator)
    keypoints[pick < 0.1] = torch.tensor([-0.5, 0.0], dtype=torch.float64)  # rounds to the first pixel
    keypoints[(pick >= 0.1) & (pick < 0.15)] = size - 0.5  # rounds to one past the last pixel
    keypoints[(pick >= 0.15) & (pick < 0.2)] = torch.tensor([1e6, -1e6], dtype=torch.float64)
    weights = (torch.rand(batch, joints, generator=generator) > 0.2).to(torch.float64)
    keypoints[weights == 0] = math.nan
    return keypoints, weights


@pytest.mark.parametrize("encoding", list(CODECS))
@pytest.mark.parametrize("sigma", [0.4, 1.0, 1.4, 1.5, 2.0, 3.0, 3.3])
def test_targets_equal_the_codecs(encoding, sigma, generator):
    """Factors multiplied out equal the codec's heatmaps exactly, and the plane weights equal its
    weights, for a crop four times the heatmap (stride 4, or UDP's (in - 1)/(out - 1))."""
    codec = CODECS[encoding]((48, 64), (12, 16), sigma)
    width, height = codec.heatmap_size
    for _ in range(4):
        in_heatmap, visible = random_keypoints(1, 17, height, width, generator, outside=3 * sigma + 2)
        crop_keypoints = (in_heatmap[0] * torch.from_numpy(codec.stride)).nan_to_num(0.0)
        heatmaps_expected, weights_expected = codec.encode(crop_keypoints.numpy(), visible[0].numpy())
        scaled = (crop_keypoints / torch.from_numpy(codec.stride))[None]
        rows, cols, reaches = targets.gaussian_factors(scaled, visible, height, width, sigma, encoding)
        assert np.array_equal(targets.materialise(rows, cols)[0].numpy(), heatmaps_expected)
        assert np.array_equal((visible * reaches)[0].to(torch.float32).numpy(), weights_expected)


@pytest.mark.parametrize("backend", ["reference"] + fused_backend_params())
@pytest.mark.parametrize("encoding", list(CODECS))
def test_loss_equals_the_codecs_targets_with_heatmap_gradient_loss(backend, encoding, generator):
    """keypoint_heatmap_loss = heatmap_gradient_loss on the codec's (heatmaps, weights), loss and
    dL/dpred; the CPU kernel gives the same bits for both (float64 pred, float32 targets)."""
    device = "cuda" if backend == "cuda" else "cpu"
    shape = (2, 5, 16, 12)
    codec = CODECS[encoding]((12, 16), (12, 16), 1.5)
    keypoints, visible = random_keypoints(*shape[:2], 16, 12, generator)
    encoded = [codec.encode(keypoints[b].nan_to_num(0.0).numpy(), visible[b].numpy()) for b in range(shape[0])]
    target = torch.from_numpy(np.stack([heatmaps for heatmaps, _ in encoded])).to(device)
    weights = torch.from_numpy(np.stack([weights for _, weights in encoded])).to(device)
    pred = heatmaps(shape, torch.float64, device, generator).requires_grad_(True)
    teacher = heatmaps(shape, torch.float64, device, generator)
    common = dict(teacher=teacher, alpha=0.3, grad_weight=0.7, backend=backend)
    fused = hgloss.keypoint_heatmap_loss(
        pred, keypoints.to(device), visible.to(device), sigma=1.5, encoding=encoding, **common
    )
    (fused_grad,) = torch.autograd.grad(fused, pred)
    materialised = hgloss.heatmap_gradient_loss(pred, target, weights, **common)
    (materialised_grad,) = torch.autograd.grad(materialised, pred)
    if backend == "cpu":
        assert torch.equal(fused, materialised) and torch.equal(fused_grad, materialised_grad)
    assert loss_error(fused, materialised) <= 1e-12
    assert grad_error(fused_grad, materialised_grad) <= 1e-12


SHAPES = [(0, 17, 64, 48), (3, 2, 1, 9), (3, 2, 9, 1), (2, 3, 7, 5), (2, 17, 64, 48), (1, 2, 128, 96)]
TEACHERS = ["none", "float", "per-sample"]
WEIGHTS = [None, (), (1,)]


def make_inputs(shape, teacher, weight_shape, sigma, generator, device="cpu", dtype=torch.float64):
    batch, joints, height, width = shape
    keypoints, visible = random_keypoints(batch, joints, height, width, generator, outside=3 * sigma + 2)
    inputs = {
        "pred": heatmaps(shape, dtype, device, generator).requires_grad_(True),
        "keypoints": keypoints.to(device),
        "keypoint_weights": None,
        "teacher": None,
        "alpha": 0.5,
    }
    if weight_shape is None:
        inputs["keypoints"] = inputs["keypoints"].nan_to_num(0.0)  # every plane is read
    else:
        scale = 0.5 + torch.rand(batch, joints, generator=generator, dtype=torch.float64)
        inputs["keypoint_weights"] = (visible * scale).reshape((batch, joints) + weight_shape).to(device)
        inputs["keypoint_weights"].requires_grad_(True)
    if teacher != "none":
        inputs["teacher"] = heatmaps(shape, dtype, device, generator).requires_grad_(True)
        inputs["alpha"] = 0.3 if teacher == "float" else torch.rand(batch, generator=generator, dtype=torch.float64).to(device)
    return inputs


def loss_and_grads(backend, inputs, upstream, **settings):
    loss = hgloss.keypoint_heatmap_loss(
        inputs["pred"], inputs["keypoints"], inputs["keypoint_weights"], teacher=inputs["teacher"],
        alpha=inputs["alpha"], mse_weight=0.8, grad_weight=1.7, backend=backend, **settings,
    )
    names = [name for name in ("pred", "teacher", "keypoint_weights") if inputs[name] is not None]
    grads = torch.autograd.grad(loss, [inputs[name] for name in names], upstream.to(loss.dtype))
    return loss, dict(zip(names, grads))


def assert_matches_reference(backend, inputs, reduction, generator, tolerance=1e-9, **settings):
    device = inputs["pred"].device
    shape = inputs["pred"].shape
    upstream = torch.randn(shape[:2], generator=generator) if reduction == "none" else torch.tensor(-1.7)
    upstream = upstream.to(device)
    loss, grads = loss_and_grads(backend, inputs, upstream, reduction=reduction, **settings)
    ref_loss, ref_grads = loss_and_grads("reference", inputs, upstream, reduction=reduction, **settings)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert loss_error(loss, ref_loss) <= tolerance
    for name, ref_grad in ref_grads.items():
        assert grads[name].dtype == ref_grad.dtype and grads[name].shape == ref_grad.shape, name
        assert grad_error(grads[name], ref_grad) <= tolerance, name


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("stencil", STENCILS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_backends_match_the_reference(backend, shape, stencil, reduction, generator):
    """float64, every shape, stencil and reduction; teacher, weight form, sigma and encoding
    vary with the case."""
    if interpreted(backend) and shape[0] * shape[1] * shape[2] * shape[3] > 20000:
        pytest.skip("the Triton interpreter is too slow for the big planes; smaller ones cover the kernel")
    case = SHAPES.index(shape) + 3 * STENCILS.index(stencil) + REDUCTIONS.index(reduction)
    teacher, weight_shape = TEACHERS[case % 3], WEIGHTS[(case // 3) % 3]
    sigma, encoding = SIGMAS[case % 2], list(CODECS)[(case // 2) % 2]
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs(shape, teacher, weight_shape, sigma, generator, device)
    assert_matches_reference(backend, inputs, reduction, generator, sigma=sigma, encoding=encoding, stencil=stencil)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("weight_shape", WEIGHTS, ids=["no-weight", "BK", "BK1"])
@pytest.mark.parametrize("encoding", list(CODECS))
def test_teacher_weight_and_encoding_forms(backend, teacher, weight_shape, encoding, generator):
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((2, 3, 11, 9), teacher, weight_shape, 1.5, generator, device)
    assert_matches_reference(backend, inputs, "mean", generator, sigma=1.5, encoding=encoding)


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_the_spec_tolerance(backend, dtype, generator):
    """Against the reference on the same (upcast) inputs in float64."""
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((2, 4, 16, 12), "per-sample", (), 2.0, generator, device, dtype)
    upcast = dict(inputs)
    upcast["pred"] = inputs["pred"].detach().double().requires_grad_(True)
    upcast["teacher"] = inputs["teacher"].detach().double().requires_grad_(True)
    upstream = torch.tensor(1.0, device=device)
    loss, grads = loss_and_grads(backend, inputs, upstream)
    ref_loss, ref_grads = loss_and_grads("reference", upcast, upstream)
    assert loss.dtype == torch.float32
    assert loss_error(loss, ref_loss) <= TOLERANCES[dtype]
    assert grads["pred"].dtype == dtype
    assert grad_error(grads["pred"], ref_grads["pred"]) <= TOLERANCES[dtype]


@pytest.mark.parametrize("backend", fused_backend_params())
def test_non_contiguous_inputs(backend, generator):
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((3, 4, 10, 8), "per-sample", (), 2.0, generator, device)
    # pred and teacher as (B, K, H, W) views of (K, W, B, H) storage; keypoints strided too.
    inputs["pred"] = inputs["pred"].detach().permute(1, 3, 0, 2).contiguous().permute(2, 0, 3, 1).requires_grad_(True)
    inputs["teacher"] = inputs["teacher"].detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    interleaved = torch.zeros(*inputs["keypoints"].shape, 2, dtype=torch.float64, device=device)
    interleaved[..., 0] = inputs["keypoints"]
    inputs["keypoints"] = interleaved[..., 0]
    assert not inputs["pred"].is_contiguous() and not inputs["keypoints"].is_contiguous()
    assert_matches_reference(backend, inputs, "sum", generator, stencil="sobel")


@pytest.mark.parametrize("backend", fused_backend_params())
def test_deterministic(backend, generator):
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((4, 17, 32, 24), "per-sample", (), 2.0, generator, device, torch.float32)
    first = loss_and_grads(backend, inputs, torch.tensor(1.0, device=device))
    second = loss_and_grads(backend, inputs, torch.tensor(1.0, device=device))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1])


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("stencil", STENCILS)
def test_gradcheck(backend, stencil, generator):
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((2, 3, 6, 5), "per-sample", (), 1.0, generator, device)

    def loss(pred, teacher, keypoint_weights):
        return hgloss.keypoint_heatmap_loss(
            pred, inputs["keypoints"], keypoint_weights, sigma=1.0, teacher=teacher, alpha=inputs["alpha"],
            stencil=stencil, reduction="sum", backend=backend,
        )

    arguments = (inputs["pred"], inputs["teacher"], inputs["keypoint_weights"])
    assert torch.autograd.gradcheck(loss, arguments, fast_mode=interpreted(backend))


@pytest.mark.parametrize("backend", fused_backend_params())
def test_opcheck_with_separable_factors(backend, generator):
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((2, 3, 7, 5), "per-sample", (), 1.5, generator, device)
    rows, cols, reaches = targets.gaussian_factors(inputs["keypoints"], inputs["keypoint_weights"], 7, 5, 1.5, "udp")
    weight = (inputs["keypoint_weights"].detach() * reaches).requires_grad_(True)
    args = (inputs["pred"], None, inputs["teacher"], inputs["alpha"], weight, 0.8, 1.7, "central", "mean", True, rows, cols)
    torch.library.opcheck(fused_op(backend).default, args)


def test_no_gradient_flows_to_the_keypoints(generator):
    inputs = make_inputs((2, 3, 8, 6), "none", (), 2.0, generator)
    keypoints = inputs["keypoints"].requires_grad_(True)
    for backend in hgloss.available_backends():
        hgloss.keypoint_heatmap_loss(inputs["pred"], keypoints, inputs["keypoint_weights"], backend=backend).backward()
        assert keypoints.grad is None and inputs["pred"].grad is not None


def test_module_form(generator):
    inputs = make_inputs((2, 3, 8, 6), "per-sample", (), 1.5, generator)
    criterion = hgloss.KeypointHeatmapLoss(sigma=1.5, encoding="udp", grad_weight=0.4, stencil="central")
    expected = hgloss.keypoint_heatmap_loss(
        inputs["pred"], inputs["keypoints"], inputs["keypoint_weights"], sigma=1.5, encoding="udp", grad_weight=0.4,
        stencil="central", teacher=inputs["teacher"], alpha=0.2,
    )
    got = criterion(inputs["pred"], inputs["keypoints"], inputs["keypoint_weights"], inputs["teacher"], 0.2)
    assert torch.equal(got, expected)
    assert "sigma=1.5, encoding='udp'" in repr(criterion)
    with pytest.raises(ValueError, match="sigma must be a positive finite number"):
        hgloss.KeypointHeatmapLoss(sigma=0.0)
    with pytest.raises(ValueError, match="unknown encoding 'dark'"):
        hgloss.KeypointHeatmapLoss(encoding="dark")


def _bad_calls(pred, keypoints, weights):
    nan_where_weighted = keypoints.clone()
    nan_where_weighted[0, 1, 0] = math.inf
    return [
        (dict(keypoints=keypoints[..., :1]), ValueError, r"keypoints shape \(2, 3, 1\) is not \(B, K, 2\) = \(2, 3, 2\)"),
        (dict(keypoints=keypoints[:1]), ValueError, r"keypoints shape \(1, 3, 2\) is not \(B, K, 2\)"),
        (dict(keypoints=keypoints.long()), TypeError, "keypoints must have a floating dtype"),
        (dict(keypoints=keypoints.tolist()), TypeError, "keypoints must be a tensor, got list"),
        (dict(keypoints=nan_where_weighted), ValueError, r"keypoints must be finite where the keypoint weight is not 0; \(b, k\) = \[\(0, 1\)\]"),
        (dict(keypoint_weights=weights[:, :2]), ValueError, r"keypoint_weights shape \(2, 2\) is not one of"),
        (dict(keypoint_weights=weights.int()), TypeError, "keypoint_weights must have a floating dtype"),
        (dict(sigma=0.0), ValueError, "sigma must be a positive finite number, got 0.0"),
        (dict(sigma=-1.0), ValueError, "sigma must be a positive finite number"),
        (dict(sigma=math.nan), ValueError, "sigma must be a positive finite number"),
        (dict(sigma=True), ValueError, "sigma must be a positive finite number, got True"),
        (dict(encoding="MSRA"), ValueError, r"unknown encoding 'MSRA'; expected one of \['msra', 'udp'\]"),
        (dict(pred=pred[0]), ValueError, "pred must be 4-D"),
        (dict(stencil="prewitt"), ValueError, "unknown stencil 'prewitt'"),
        (dict(alpha=1.5, teacher=pred.detach()), ValueError, "alpha must be a float in"),
    ]


@pytest.mark.parametrize("backend", ["reference"] + fused_backend_params())
def test_bad_input_raises_before_any_work(backend, generator):
    device = "cuda" if backend == "cuda" else "cpu"
    inputs = make_inputs((2, 3, 6, 5), "none", (), 2.0, generator, device)
    pred, keypoints, weights = inputs["pred"], inputs["keypoints"], inputs["keypoint_weights"]
    snapshot = [tensor.detach().clone() for tensor in (pred, keypoints, weights)]
    for changes, error, message in _bad_calls(pred, keypoints, weights):
        arguments = {"pred": pred, "keypoints": keypoints, "keypoint_weights": weights, **changes}
        with pytest.raises(error, match=message):
            hgloss.keypoint_heatmap_loss(
                arguments.pop("pred"), arguments.pop("keypoints"), arguments.pop("keypoint_weights"),
                backend=backend, **arguments,
            )
    for tensor, before in zip((pred, keypoints, weights), snapshot):
        assert torch.equal(tensor.detach().nan_to_num(7.0), before.nan_to_num(7.0))
    assert pred.grad is None


def test_non_finite_keypoints_of_weight_zero_planes_are_never_read(generator):
    inputs = make_inputs((2, 3, 6, 5), "none", (), 2.0, generator)
    weights = inputs["keypoint_weights"].detach().clone()
    weights[1, 2] = 0.0
    keypoints = inputs["keypoints"].clone()
    keypoints[1, 2] = torch.tensor([math.inf, math.nan])
    for backend in hgloss.available_backends():
        loss = hgloss.keypoint_heatmap_loss(inputs["pred"], keypoints, weights, backend=backend, reduction="none")
        assert torch.isfinite(loss).all() and loss[1, 2] == 0


@pytest.mark.parametrize("backend", fused_backend_params())
def test_operator_checks_the_separable_target(backend, generator):
    """The operator refuses both target forms at once, or factors of the wrong dtype, shape or
    layout, before any kernel runs."""
    device = "cuda" if backend == "cuda" else "cpu"
    pred = heatmaps((2, 3, 6, 5), torch.float32, device, generator)
    rows = torch.rand(2, 3, 6, dtype=torch.float64, device=device)
    cols = torch.rand(2, 3, 5, dtype=torch.float64, device=device)
    operator = fused_op(backend)
    settings = (1.0, 1.0, "forward", "mean", False)

    def call(target, target_rows, target_cols):
        return operator(pred, target, None, None, None, *settings, target_rows, target_cols)

    with pytest.raises(ValueError, match="give the target as a tensor, or as both target_rows and target_cols"):
        call(pred, rows, cols)
    with pytest.raises(ValueError, match="give the target as a tensor, or as both"):
        call(None, rows, None)
    with pytest.raises(ValueError, match="give the target as a tensor, or as both"):
        call(None, None, None)
    with pytest.raises(TypeError, match="target_rows must be float64, got torch.float32"):
        call(None, rows.float(), cols)
    with pytest.raises(ValueError, match=r"target_cols must be a contiguous tensor of shape \(2, 3, 5\) for pred shape \(2, 3, 6, 5\), got shape \(2, 3, 6\)"):
        call(None, rows, rows)
    with pytest.raises(ValueError, match="target_rows must be a contiguous tensor"):
        call(None, rows.transpose(0, 1).contiguous().transpose(0, 1), cols)
    loss, _, _ = call(None, rows, cols)
    reference, _, _ = operator(pred, targets.materialise(rows, cols), None, None, None, *settings)
    assert torch.equal(loss, reference)


def test_fused_call_reads_no_target_tensor(monkeypatch, generator):
    """A fused backend never materialises the target: hgloss.targets.materialise is not called."""
    backends = [name for name in hgloss.available_backends() if name != "reference"]
    if not backends:
        pytest.skip("no fused backend here")

    def refuse(*_):
        raise AssertionError("a fused backend built the target tensor")

    monkeypatch.setattr(targets, "materialise", refuse)
    inputs = make_inputs((2, 3, 8, 6), "per-sample", (), 2.0, generator)
    for backend in backends:
        hgloss.keypoint_heatmap_loss(
            inputs["pred"], inputs["keypoints"], inputs["keypoint_weights"], teacher=inputs["teacher"], backend=backend
        ).backward()


@pytest.mark.skipif("cpu" not in hgloss.available_backends(), reason="the C++ extension did not load")
@pytest.mark.parametrize("encoding", list(CODECS))
@pytest.mark.parametrize("sigma", [0.4, 1.4, 1.5, 2.0, 3.3])
def test_cpu_factors_equal_the_reference_factors(encoding, sigma, generator):
    """hgloss::gaussian_factors (C++, used by the cpu backend) against hgloss.targets (PyTorch):
    factors to a rounding of exp, targets and reach exactly."""
    keypoints, weights = random_keypoints(4, 17, 16, 12, generator, outside=3 * sigma + 2)
    ours = torch.ops.hgloss.gaussian_factors(keypoints, weights, 16, 12, sigma, encoding)
    reference = targets.gaussian_factors(keypoints, weights, 16, 12, sigma, encoding)
    for got, expected in zip(ours, reference):
        assert got.dtype == torch.float64 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=0.0)
    assert torch.equal(ours[2], reference[2])
    assert torch.equal(targets.materialise(*ours[:2]), targets.materialise(*reference[:2]))
