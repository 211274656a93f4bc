"""Custom-operator glue for the fused backends: fake implementations and autograd.

The schema and the kernels are C++ (csrc/). `hgloss::heatmap_loss` returns the reduced loss, the
per-plane terms and, when asked, dL/dD for an upstream gradient of 1, computed in the same pass.
The backward only scales that saved gradient by the upstream gradient, in place, and skips even
that when the upstream gradient of a CPU loss is exactly 1 (the usual `loss.backward()`). So a
forward+backward allocates one heatmap-sized buffer, which becomes dL/dpred.

Because the saved gradient is consumed in place, a second backward through the same graph
(retain_graph=True) is refused by autograd's saved-tensor version check instead of returning
wrong values. Double backward raises a clear error.
"""

import torch

from .backends._build import load_extension
from .backends.reference import accumulation_dtype

HAS_EXTENSION = load_extension()


def _fake_heatmap_loss(
    pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, compute_grad
):
    dtype = accumulation_dtype(pred)
    plane_shape = pred.shape[:2]
    loss = pred.new_empty(plane_shape if reduction == "none" else (), dtype=dtype)
    terms = pred.new_empty(plane_shape, dtype=dtype)
    grad = pred.new_empty(pred.shape if compute_grad else (0,), dtype=dtype)
    return loss, terms, grad


def _setup_context(ctx, inputs, output):
    pred, target, teacher, alpha, weight = inputs[:5]
    reduction = inputs[8]
    _, terms, grad = output
    ctx.save_for_backward(grad, terms, alpha)
    ctx.input_dtypes = (pred.dtype, target.dtype, None if teacher is None else teacher.dtype)
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.reduction = reduction
    ctx.num_planes = pred.shape[0] * pred.shape[1]
    # terms and grad are outputs no loss uses; without this autograd would hand the backward
    # tensors of zeros for them, one of them heatmap-sized.
    ctx.set_materialize_grads(False)


def _is_exactly_one(grad_loss: torch.Tensor) -> bool:
    """Whether a scalar upstream gradient is 1, checked only where that costs no device sync."""
    return (
        grad_loss.dim() == 0
        and grad_loss.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and bool(grad_loss == 1)
    )


def _backward(ctx, grad_loss, grad_of_terms, grad_of_saved_gradient):
    if torch.is_grad_enabled() or grad_of_terms is not None or grad_of_saved_gradient is not None:
        raise RuntimeError(
            "hgloss: double backward (and gradients through the op's auxiliary outputs) is not "
            "supported by the fused backends; use backend='reference' for higher-order gradients"
        )
    grad, terms, alpha = ctx.saved_tensors
    pred_dtype, target_dtype, teacher_dtype = ctx.input_dtypes
    needs_pred, needs_target, needs_teacher, _, needs_weight = ctx.needs_input_grad[:5]
    if grad_loss is None:
        return (None,) * 10
    upstream = grad_loss.to(terms.dtype)
    if ctx.reduction == "none":
        plane_upstream = upstream
    elif ctx.reduction == "mean":
        plane_upstream = upstream / max(ctx.num_planes, 1)
    else:
        plane_upstream = upstream

    grad_weight = None
    if needs_weight:
        grad_weight = (plane_upstream * terms).to(ctx.weight_dtype)

    grad_pred = grad_target = grad_teacher = None
    if needs_pred or needs_target or needs_teacher:
        if grad.numel() == 0 and terms.numel() != 0:
            raise RuntimeError("hgloss: the forward ran without compute_grad, so no gradient was saved")
        # dL/dD, written over the saved buffer.
        if ctx.reduction == "none":
            grad_diff = grad.mul_(upstream[:, :, None, None])
        elif _is_exactly_one(upstream):
            grad_diff = grad
        else:
            grad_diff = grad.mul_(upstream)
        if needs_teacher:
            grad_teacher = (grad_diff * -alpha[:, None, None, None]).to(teacher_dtype)
        if needs_target:
            target_scale = -1.0 if alpha is None else (alpha - 1)[:, None, None, None]
            grad_target = (grad_diff * target_scale).to(target_dtype)
        if needs_pred:
            grad_pred = grad_diff.to(pred_dtype)
    return grad_pred, grad_target, grad_teacher, None, grad_weight, None, None, None, None, None


if HAS_EXTENSION:
    torch.library.register_fake("hgloss::heatmap_loss")(_fake_heatmap_loss)
    torch.library.register_autograd("hgloss::heatmap_loss", _backward, setup_context=_setup_context)


def fused_heatmap_loss(pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction):
    """The loss from the operator of the device's fused kernel. `weight` is (B, K) or None."""
    compute_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (pred, target, teacher)
    )
    loss, _, _ = torch.ops.hgloss.heatmap_loss(
        pred, target, teacher, alpha, weight, float(mse_weight), float(grad_weight), stencil, reduction, compute_grad
    )
    return loss
