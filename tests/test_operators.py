"""The fused operators called directly, and the rules that live in two languages kept in step
(docs/spec.md sections 2 and 6): the argument checks of hgloss/contract.py and
csrc/heatmap_loss.h, and the autograd of hgloss/ops.py and csrc/autograd/. Also the hardening
of the public API: exact float weights, 64-bit offsets, dynamic shapes under torch.compile,
inference tensors, float8, construction-time checks, torch.func, and a light `import hgloss`."""

import math
import sys
from fractions import Fraction

import pytest
import torch

import hgloss
from hgloss import contract, ops

from conftest import FUSED_DEVICES, fused_backend_params, fused_op, grad_error, heatmaps, loss_error, run_python

ALL_BACKENDS = fused_backend_params() + ["reference"]


def operator_arguments(device="cpu", **changes):
    """Valid arguments of a fused operator, by name, with `changes` applied."""
    generator = torch.Generator().manual_seed(3)
    arguments = {
        "pred": heatmaps((2, 3, 6, 5), torch.float32, device, generator),
        "target": heatmaps((2, 3, 6, 5), torch.float32, device, generator),
        "teacher": heatmaps((2, 3, 6, 5), torch.float32, device, generator),
        "alpha": torch.rand(2, generator=generator).to(device),
        "weight": torch.rand(2, 3, generator=generator).to(device),
        "mse_weight": 1.0,
        "grad_weight": 0.5,
        "stencil": "sobel",
        "reduction": "mean",
        "compute_grad": True,
    }
    arguments.update(changes)
    return list(arguments.values())


BAD_CALLS = [
    # (changes, error, message)
    ({"pred": torch.zeros(2, 3, 6, 5, dtype=torch.int64)}, TypeError,
     "pred must have a floating dtype (float16, bfloat16, float32 or float64), got torch.int64"),
    ({"target": torch.zeros(2, 3, 6, 5, dtype=torch.float8_e4m3fn)}, TypeError,
     "target must have a floating dtype (float16, bfloat16, float32 or float64), got torch.float8_e4m3fn"),
    ({"weight": torch.ones(2, 3, dtype=torch.bool)}, TypeError,
     "weight must have a floating dtype (float16, bfloat16, float32 or float64), got torch.bool"),
    ({"alpha": torch.ones(2, dtype=torch.int32)}, TypeError,
     "alpha must have a floating dtype (float16, bfloat16, float32 or float64), got torch.int32"),
    ({"target": torch.zeros(2, 3, 6, 5, device="meta")}, ValueError,
     "all tensors must be on one device, got pred on cpu, target on meta, teacher on cpu, weight on cpu, alpha on cpu"),
    ({"pred": torch.zeros(3, 6, 5)}, ValueError, "pred must be 4-D (B, K, H, W), got shape (3, 6, 5)"),
    ({"pred": torch.zeros(2, 3, 0, 5)}, ValueError, "pred must have K, H, W >= 1, got shape (2, 3, 0, 5)"),
    ({"target": torch.zeros(2, 3, 5, 6)}, ValueError, "target shape (2, 3, 5, 6) differs from pred shape (2, 3, 6, 5)"),
    ({"target": torch.zeros(2, 3, 600, 500)}, ValueError,
     "target shape (2, 3, 600, 500) differs from pred shape (2, 3, 6, 5)"),
    ({"teacher": torch.zeros(2, 3, 6, 4)}, ValueError, "teacher shape (2, 3, 6, 4) differs from pred shape (2, 3, 6, 5)"),
    ({"weight": torch.ones(2, 3, 2)}, ValueError,
     "weight shape (2, 3, 2) is not one of [(2, 3), (2, 3, 1), (2, 3, 1, 1)] for pred shape (2, 3, 6, 5)"),
    ({"weight": torch.ones(3, 2)}, ValueError,
     "weight shape (3, 2) is not one of [(2, 3), (2, 3, 1), (2, 3, 1, 1)] for pred shape (2, 3, 6, 5)"),
    ({"alpha": torch.ones(3)}, ValueError, "alpha tensor must have shape (2,) for batch size 2, got (3,)"),
    ({"alpha": None}, ValueError, "a teacher needs an alpha tensor of shape (2,)"),
    ({"mse_weight": -1.0}, ValueError, "mse_weight must be finite and >= 0, got -1.0"),
    ({"grad_weight": math.nan}, ValueError, "grad_weight must be finite and >= 0, got nan"),
    ({"grad_weight": math.inf}, ValueError, "grad_weight must be finite and >= 0, got inf"),
    ({"stencil": "scharr"}, ValueError, "unknown stencil 'scharr'; expected one of ['forward', 'central', 'sobel']"),
    ({"reduction": "avg"}, ValueError, "unknown reduction 'avg'; expected one of ['mean', 'sum', 'none']"),
    ({"target_rows": None, "target_cols": None, "pixel_weight": torch.ones(2, 1, 6, 5, dtype=torch.int64)}, TypeError,
     "pixel_weight must have a floating dtype (float16, bfloat16, float32 or float64), got torch.int64"),
    ({"target_rows": None, "target_cols": None, "pixel_weight": torch.ones(6, 5, device="meta")}, ValueError,
     "all tensors must be on one device, got pred on cpu, target on cpu, teacher on cpu, weight on cpu, alpha on cpu, "
     "pixel_weight on meta"),
    ({"target_rows": None, "target_cols": None, "pixel_weight": torch.ones(2, 3, 5, 6)}, ValueError,
     "pixel_weight shape (2, 3, 5, 6) does not broadcast to pred shape (2, 3, 6, 5) (B, K, H, W)"),
    ({"target_rows": None, "target_cols": None, "pixel_weight": torch.ones(1, 2, 3, 6, 5)}, ValueError,
     "pixel_weight shape (1, 2, 3, 6, 5) does not broadcast to pred shape (2, 3, 6, 5) (B, K, H, W)"),
]


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize("changes,error,message", BAD_CALLS, ids=[c[2][:48] for c in BAD_CALLS])
def test_direct_operator_calls_are_checked_with_the_contracts_messages(backend, changes, error, message):
    """The C++ operator (csrc/heatmap_loss.h) and the Triton one (hgloss/contract.py) raise the
    same error with the same message, and before any kernel: a mismatched target that would
    read out of bounds, or a meta target that would return garbage, is refused."""
    device = FUSED_DEVICES[backend]
    arguments = operator_arguments(device, **{k: v.to(device) if isinstance(v, torch.Tensor) and v.device.type != "meta"
                                                else v for k, v in changes.items()})
    with pytest.raises(error) as raised:
        fused_op(backend)(*arguments)
    expected = message if device == "cpu" else message.replace(" on cpu", f" on {arguments[0].device}")
    assert str(raised.value).splitlines()[0] == expected


@pytest.mark.parametrize("changes,error,message", BAD_CALLS, ids=[c[2][:48] for c in BAD_CALLS])
def test_fake_implementation_checks_alike(changes, error, message):
    """Under torch.compile and opcheck the fake implementation stands in for every operator: it
    refuses the same arguments with the same messages."""
    with pytest.raises(error, match=None) as raised:
        contract.fake_heatmap_loss(*operator_arguments(**changes))
    assert str(raised.value) == message


def scale_gradient_op():
    if "cpu" not in hgloss.available_backends():
        pytest.skip("the C++ extension did not load")
    return torch.ops.hgloss.scale_gradient_


@pytest.mark.parametrize(
    "grad,scale,error,message",
    [
        (torch.zeros(2, 3, 4), torch.ones(1), ValueError, "grad must be a contiguous (B, K, H, W) tensor, got shape (2, 3, 4)"),
        (torch.zeros(2, 3, 4, 5).transpose(2, 3), torch.ones(1), ValueError, "grad must be a contiguous (B, K, H, W) tensor"),
        (torch.zeros(2, 3, 4, 5, dtype=torch.float16), torch.ones(1), TypeError, "grad must be bfloat16, float32 or float64"),
        (torch.zeros(2, 3, 4, 5), torch.ones(1, dtype=torch.int64), TypeError, "scale must have a floating dtype"),
        (torch.zeros(2, 3, 4, 5), torch.ones(5), ValueError, "scale must hold 1 or B*K = 6 values, got 5"),
        (torch.zeros(2, 3, 4, 5), torch.ones(1, device="meta"), ValueError, "all tensors must be on one device"),
    ],
)
def test_scale_gradient_calls_are_checked(grad, scale, error, message):
    before = grad.clone()
    for check in (scale_gradient_op(), contract.check_scale_arguments):
        with pytest.raises(error) as raised:
            check(grad, scale)
        assert str(raised.value).startswith(message)
    assert torch.equal(grad, before)


# ------------------------------------------------------------------------------------------------
# The autograd of the C++ and the Triton operators: one behaviour


def gradients_of(backend, wanted, upstream_factors, generator_seed=11):
    """The gradients of the inputs in `wanted`, for each upstream factor in turn through one
    retained graph (None for an input that gets none)."""
    generator = torch.Generator().manual_seed(generator_seed)
    device = FUSED_DEVICES.get(backend, "cpu")
    shape = (2, 3, 7, 5)
    inputs = {
        "pred": heatmaps(shape, device=device, generator=generator),
        "target": heatmaps(shape, device=device, generator=generator),
        "teacher": heatmaps(shape, device=device, generator=generator),
        "target_weight": torch.rand(2, 3, 1, dtype=torch.float64, generator=generator).to(device),
    }
    for name in wanted:
        inputs[name].requires_grad_(True)
    alpha = torch.rand(2, dtype=torch.float64, generator=generator).to(device)
    loss = hgloss.heatmap_gradient_loss(
        inputs["pred"], inputs["target"], inputs["target_weight"], teacher=inputs["teacher"], alpha=alpha,
        stencil="central", reduction="none", backend=backend,
    )
    results = []
    for factor in upstream_factors:
        upstream = torch.full_like(loss, factor)
        results.append(torch.autograd.grad(loss, [inputs[n] for n in wanted], upstream, retain_graph=True, allow_unused=True))
    return results


@pytest.mark.parametrize("backend", fused_backend_params())
@pytest.mark.parametrize(
    "wanted",
    [("pred",), ("target",), ("teacher",), ("target_weight",), ("pred", "target_weight"), ("target", "teacher"),
     ("pred", "target", "teacher", "target_weight")],
    ids="+".join,
)
def test_backward_behaves_as_the_reference(backend, wanted):
    """Every combination of inputs that require grad, through a retained graph three times (the
    first backward consumes the saved gradient in place; the later ones recompute it)."""
    factors = (1.0, -2.5, 0.25)
    fused = gradients_of(backend, wanted, factors)
    reference = gradients_of("reference", wanted, factors)
    for fused_grads, reference_grads in zip(fused, reference):
        for name, grad, ref in zip(wanted, fused_grads, reference_grads):
            assert (grad is None) == (ref is None), name
            assert grad.dtype == ref.dtype and grad_error(grad, ref) <= 1e-12, name


@pytest.mark.parametrize("backend", fused_backend_params())
def test_double_backward_is_refused_with_one_message(backend, generator):
    pred = heatmaps((2, 3, 6, 5), device=FUSED_DEVICES[backend], generator=generator).requires_grad_(True)
    loss = hgloss.heatmap_gradient_loss(pred, pred.detach() * 0.5, backend=backend)
    with pytest.raises(RuntimeError) as raised:
        torch.autograd.grad(loss, pred, create_graph=True)
    assert ops.DOUBLE_BACKWARD_MESSAGE in str(raised.value)


# ------------------------------------------------------------------------------------------------
# Hardening of the public API


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("grad_weight", [1e40, 1e-40, 1 / 3])
def test_float_weights_reach_every_backend_exactly(backend, grad_weight, generator):
    """A float64 loss with grad_weight far outside float32's range (or needing all of float64's
    digits) is the reference's on every backend."""
    device = FUSED_DEVICES.get(backend, "cpu")
    pred = heatmaps((2, 3, 6, 5), device=device, generator=generator).requires_grad_(True)
    target = heatmaps((2, 3, 6, 5), device=device, generator=generator)
    loss = hgloss.heatmap_gradient_loss(pred, target, grad_weight=grad_weight, backend=backend)
    (grad,) = torch.autograd.grad(loss, pred)
    ref = hgloss.heatmap_gradient_loss(pred, target, grad_weight=grad_weight, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref, pred)
    assert torch.isfinite(loss) and loss_error(loss, ref) <= 1e-12
    assert grad_error(grad, ref_grad) <= 1e-12


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_any_real_weight_is_one_float_for_every_backend(backend, generator):
    device = FUSED_DEVICES.get(backend, "cpu")
    pred = heatmaps((2, 3, 6, 5), device=device, generator=generator)
    target = heatmaps((2, 3, 6, 5), device=device, generator=generator)
    for exotic, plain in ((Fraction(1, 2), 0.5), (2**70, float(2**70))):
        exotic_loss = hgloss.heatmap_gradient_loss(pred, target, grad_weight=exotic, mse_weight=exotic, backend=backend)
        plain_loss = hgloss.heatmap_gradient_loss(pred, target, grad_weight=plain, mse_weight=plain, backend=backend)
        assert torch.equal(exotic_loss, plain_loss)
    with pytest.raises(ValueError, match="grad_weight must be finite and >= 0"):
        hgloss.heatmap_gradient_loss(pred, target, grad_weight=10**400, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["pred", "target", "teacher", "target_weight"])
def test_float8_is_refused_everywhere(backend, where):
    inputs = {
        "pred": torch.rand(2, 3, 6, 5), "target": torch.rand(2, 3, 6, 5), "teacher": torch.rand(2, 3, 6, 5),
        "target_weight": torch.rand(2, 3, 1),
    }
    inputs[where] = inputs[where].to(torch.float8_e5m2)
    with pytest.raises(TypeError, match=f"{where} must have a floating dtype .* got torch.float8_e5m2"):
        hgloss.heatmap_gradient_loss(
            inputs["pred"], inputs["target"], inputs["target_weight"], teacher=inputs["teacher"], backend=backend
        )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_teacher_and_target_from_inference_mode(backend, generator):
    """A teacher computed under torch.inference_mode() (and such a target, weight or alpha) can
    be used in a loss whose backward is then taken."""
    device = FUSED_DEVICES.get(backend, "cpu")
    source = [heatmaps((2, 3, 6, 5), device=device, generator=generator) for _ in range(3)]
    with torch.inference_mode():
        target, teacher = source[1] * 1.0, source[2] * 1.0
        weight, alpha = torch.ones(2, 3, 1, dtype=torch.float64, device=device), torch.full((2,), 0.3, device=device)
    assert teacher.is_inference() and target.is_inference()
    pred = source[0].clone().requires_grad_(True)
    loss = hgloss.heatmap_gradient_loss(pred, target, weight, teacher=teacher, alpha=alpha, backend=backend)
    (grad,) = torch.autograd.grad(loss, pred, retain_graph=True)
    (again,) = torch.autograd.grad(loss, pred)  # the retained graph recomputes from the saved inputs
    ref = hgloss.heatmap_gradient_loss(
        pred, source[1], weight.clone(), teacher=source[2], alpha=alpha.clone(), backend="reference"
    )
    (ref_grad,) = torch.autograd.grad(ref, pred)
    assert loss_error(loss, ref) <= 1e-12 and grad_error(grad, ref_grad) <= 1e-12 and grad_error(again, ref_grad) <= 1e-12


@pytest.mark.parametrize("backend", fused_backend_params())
def test_torch_compile_fullgraph_with_dynamic_shapes(backend, generator):
    """dynamic=True makes the float arguments symbolic; validation must not break the graph."""
    torch._dynamo.reset()
    device = FUSED_DEVICES[backend]

    def step(pred, target, grad_weight):
        return hgloss.heatmap_gradient_loss(pred, target, grad_weight=grad_weight, stencil="sobel", backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for shape, grad_weight in (((2, 3, 8, 6), 0.5), ((3, 2, 9, 7), 1.5)):
        pred = heatmaps(shape, torch.float32, device, generator)
        target = heatmaps(shape, torch.float32, device, generator)
        eager_pred, compiled_pred = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
        eager = step(eager_pred, target, grad_weight)
        eager.backward()
        result = compiled(compiled_pred, target, grad_weight)
        result.backward()
        assert loss_error(result, eager) <= 1e-6 and grad_error(compiled_pred.grad, eager_pred.grad) <= 1e-6


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: hgloss.HeatmapGradientLoss(**kw),
        lambda **kw: hgloss.compat.JointsMSELoss(use_target_weight=True, **kw),
        lambda **kw: hgloss.compat.KeypointMSELoss(**kw),
    ],
    ids=["HeatmapGradientLoss", "JointsMSELoss", "KeypointMSELoss"],
)
@pytest.mark.parametrize(
    "setting,message",
    [
        ({"stencil": "bogus"}, "unknown stencil 'bogus'"),
        ({"grad_weight": -1}, "grad_weight must be finite and >= 0, got -1"),
        ({"grad_weight": "1"}, "grad_weight must be a real number"),
        ({"backend": "nope"}, "unknown backend 'nope'"),
    ],
)
def test_modules_check_their_settings_at_construction(make, setting, message):
    with pytest.raises(ValueError, match=message):
        make(**setting)


def test_module_weights_are_checked_at_construction():
    with pytest.raises(ValueError, match="mse_weight must be finite"):
        hgloss.HeatmapGradientLoss(mse_weight=math.nan)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        hgloss.HeatmapGradientLoss(reduction="avg")
    with pytest.raises(ValueError, match="loss_weight must be finite and >= 0"):
        hgloss.compat.KeypointMSELoss(loss_weight=-2.0)


@pytest.mark.parametrize("backend", fused_backend_params())
def test_torch_func_grad_names_the_alternative(backend, generator):
    device = FUSED_DEVICES[backend]
    pred = heatmaps((2, 3, 6, 5), device=device, generator=generator)
    target = heatmaps((2, 3, 6, 5), device=device, generator=generator)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' does not support torch.func transforms.*'reference'"):
        torch.func.grad(lambda p: hgloss.heatmap_gradient_loss(p, target, backend=backend))(pred)


def test_torch_func_grad_under_auto_uses_the_reference(generator, monkeypatch):
    monkeypatch.delenv("HGLOSS_BACKEND", raising=False)
    pred = heatmaps((2, 3, 6, 5), generator=generator)
    target = heatmaps((2, 3, 6, 5), generator=generator)
    grad = torch.func.grad(lambda p: hgloss.heatmap_gradient_loss(p, target, stencil="sobel"))(pred)
    pred.requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(hgloss.heatmap_gradient_loss(pred, target, stencil="sobel", backend="reference"), pred)
    assert grad_error(grad, ref_grad) <= 1e-12


def test_triton_offsets_beyond_int32_are_64_bit():
    """A view whose in-plane offsets pass 2^31 elements (strides 2^29 and 2^30 on a 3 x 3
    plane): the Triton kernel must not wrap around. Run apart, since a wrapped offset can crash
    the process; the storage is reserved, not touched, so it costs little memory."""
    if "triton" not in hgloss.available_backends():
        pytest.skip("Triton unavailable: no GPU and the interpreter is off")
    device = FUSED_DEVICES["triton"]
    result = run_python(
        f"""
        import torch, hgloss
        torch.manual_seed(0)
        pred = torch.empty_strided((1, 1, 3, 3), (0, 0, 2**29, 2**30), dtype=torch.float16, device="{device}")
        values = torch.rand(3, 3).half()
        for i in range(3):
            for j in range(3):
                pred[0, 0, i, j] = values[i, j]
        target = torch.rand(1, 1, 3, 3, device="{device}").half()
        for stencil in ("forward", "sobel"):
            fused = hgloss.heatmap_gradient_loss(pred, target, stencil=stencil, backend="triton").item()
            reference = hgloss.heatmap_gradient_loss(pred, target, stencil=stencil, backend="reference").item()
            print(stencil, fused == reference, fused, reference)
        """,
        TRITON_INTERPRET="1" if device == "cpu" else "0",
    )
    assert result.stdout.count(" True ") == 2, result.stdout


def test_import_is_light_and_compiles_nothing():
    """`import hgloss` adds no pose dependency to what torch imports, loads no extension and
    starts no build; the first call that needs the extension loads it."""
    result = run_python(
        """
        import sys
        import torch
        before = set(sys.modules)
        import hgloss
        added = {name.split(".")[0] for name in set(sys.modules) - before}
        print("added:", sorted(added))
        print("extension loaded:", "hgloss._C" in sys.modules)
        print("dynamo imported:", "torch._dynamo" in sys.modules)
        hgloss.heatmap_gradient_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), backend="cpu")
        print("after a cpu call:", "hgloss._C" in sys.modules)
        """,
        HGLOSS_BACKEND="",
    )
    assert "added: ['hgloss']" in result.stdout
    assert "extension loaded: False" in result.stdout and "dynamo imported: False" in result.stdout
    assert "after a cpu call: True" in result.stdout
    assert "compiling" not in result.stderr


def test_first_call_may_be_under_torch_compile():
    """The extension is loaded while torch.compile traces the very first call of the process."""
    result = run_python(
        """
        import torch, hgloss
        compiled = torch.compile(lambda p, t: hgloss.heatmap_gradient_loss(p, t, backend="cpu"), fullgraph=True)
        pred = torch.rand(2, 3, 8, 6, requires_grad=True)
        target = torch.rand(2, 3, 8, 6)
        loss = compiled(pred, target)
        loss.backward()
        ref = hgloss.heatmap_gradient_loss(pred.detach(), target, backend="reference")
        print("match:", abs(loss.item() - ref.item()) <= 1e-6 * ref.item())
        """,
        HGLOSS_BACKEND="",
    )
    assert "match: True" in result.stdout
