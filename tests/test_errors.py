"""docs/spec.md section 2: bad input raises the named error before any kernel runs, and modifies nothing."""

import pytest
import torch

import hgloss

from conftest import fused_backend_params

BACKENDS = fused_backend_params() + ["reference"]


def valid_inputs():
    return {
        "pred": torch.rand(2, 3, 6, 5, requires_grad=True),
        "target": torch.rand(2, 3, 6, 5),
        "target_weight": torch.rand(2, 3, 1),
        "teacher": torch.rand(2, 3, 6, 5),
        "alpha": torch.rand(2),
    }


def call(backend, **changes):
    inputs = valid_inputs()
    inputs.update(changes)
    snapshot = {
        k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }
    pred, target, weight = inputs.pop("pred"), inputs.pop("target"), inputs.pop("target_weight")
    try:
        hgloss.heatmap_gradient_loss(pred, target, weight, backend=backend, **inputs)
    finally:
        # Nothing is modified and no gradient appears, whatever was raised.
        after = {"pred": pred, "target": target, "target_weight": weight, **inputs}
        for name, before in snapshot.items():
            assert torch.equal(after[name].detach(), before), name
        assert pred.grad is None


CASES = [
    # (changes, error, message fragment)
    ({"pred": torch.randint(0, 3, (2, 3, 6, 5))}, TypeError, "pred must have a floating dtype"),
    ({"target": torch.randint(0, 3, (2, 3, 6, 5))}, TypeError, "target must have a floating dtype"),
    ({"teacher": torch.ones(2, 3, 6, 5, dtype=torch.bool)}, TypeError, "teacher must have a floating dtype"),
    ({"target_weight": torch.ones(2, 3, 1, dtype=torch.int64)}, TypeError, "target_weight must have a floating dtype"),
    ({"alpha": torch.ones(2, dtype=torch.int32)}, TypeError, "alpha must have a floating dtype"),
    ({"pred": torch.rand(3, 6, 5)}, ValueError, r"pred must be 4-D \(B, K, H, W\), got shape \(3, 6, 5\)"),
    ({"pred": torch.rand(2, 3, 6, 5, 1)}, ValueError, "pred must be 4-D"),
    ({"pred": torch.rand(2, 3, 0, 5)}, ValueError, "K, H, W >= 1"),
    ({"target": torch.rand(2, 3, 5, 6)}, ValueError, r"target shape \(2, 3, 5, 6\) differs from pred shape \(2, 3, 6, 5\)"),
    ({"teacher": torch.rand(2, 3, 6, 4)}, ValueError, r"teacher shape \(2, 3, 6, 4\) differs"),
    ({"target_weight": torch.rand(2, 3, 2)}, ValueError, r"target_weight shape \(2, 3, 2\) is not one of"),
    ({"target_weight": torch.rand(3, 2)}, ValueError, "target_weight shape"),
    ({"target_weight": torch.rand(2, 3, 1, 1, 1)}, ValueError, "target_weight shape"),
    ({"alpha": torch.rand(3)}, ValueError, r"alpha tensor must have shape \(2,\)"),
    ({"alpha": torch.rand(2, 1)}, ValueError, r"alpha tensor must have shape \(2,\)"),
    ({"alpha": 1.5}, ValueError, r"alpha must be a float in \[0, 1\]"),
    ({"alpha": -0.1}, ValueError, r"alpha must be a float in \[0, 1\]"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be a float in \[0, 1\]"),
    ({"mse_weight": -1.0}, ValueError, "mse_weight must be finite and >= 0, got -1.0"),
    ({"grad_weight": float("inf")}, ValueError, "grad_weight must be finite and >= 0"),
    ({"grad_weight": float("nan")}, ValueError, "grad_weight must be finite and >= 0"),
    ({"grad_weight": "1"}, ValueError, "grad_weight must be a real number"),
    ({"stencil": "scharr"}, ValueError, "unknown stencil 'scharr'"),
    ({"reduction": "avg"}, ValueError, "unknown reduction 'avg'"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("changes,error,message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input(backend, changes, error, message):
    with pytest.raises(error, match=message):
        call(backend, **changes)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        call("gpu")


def test_unavailable_backend_lists_the_available_ones():
    # "triton" on CPU tensors outside the interpreter: tests/test_triton.py, in a subprocess.
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for cpu tensors; available here: \["):
        call("cuda")


def test_tensors_on_different_devices():
    meta_target = torch.empty(2, 3, 6, 5, device="meta")
    with pytest.raises(ValueError, match="all tensors must be on one device, got pred on cpu, target on meta"):
        call("reference", target=meta_target)


def test_weights_are_not_checked():
    """Negative weights are the caller's business (checking them would need a device sync)."""
    inputs = valid_inputs()
    weight = -torch.ones(2, 3)
    loss = hgloss.heatmap_gradient_loss(inputs["pred"], inputs["target"], weight, backend="reference")
    assert loss.item() < 0
