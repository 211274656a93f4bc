"""Custom-operator glue for the fused backends: fake implementations and autograd.

The schema and the kernels are C++ (csrc/). `hgloss::heatmap_loss_forward` returns the per-plane
terms and, when asked, d(terms)/dD for an upstream gradient of 1. The backward only scales that
saved gradient by the upstream g[b, k], in place, so a forward+backward allocates one
heatmap-sized buffer, which becomes dL/dpred. A second backward through the same graph
(retain_graph=True) is therefore refused by autograd's saved-tensor version check rather than
returning wrong values.
"""

import torch

from .backends._build import load_extension
from .backends.reference import accumulation_dtype

HAS_EXTENSION = load_extension()


def _fake_forward(pred, target, teacher, alpha, mse_weight, grad_weight, stencil, compute_grad):
    dtype = accumulation_dtype(pred)
    terms = pred.new_empty(pred.shape[:2], dtype=dtype)
    grad = pred.new_empty(pred.shape if compute_grad else (0,), dtype=dtype)
    return terms, grad


def _setup_context(ctx, inputs, output):
    pred, target, teacher, alpha = inputs[:4]
    _, grad = output
    ctx.save_for_backward(grad, alpha)
    ctx.input_dtypes = (pred.dtype, target.dtype, None if teacher is None else teacher.dtype)


def _backward(ctx, grad_terms, grad_of_saved_gradient):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "hgloss: double backward is not supported by the fused backends; "
            "use backend='reference' when you need higher-order gradients"
        )
    grad, alpha = ctx.saved_tensors
    pred_dtype, target_dtype, teacher_dtype = ctx.input_dtypes
    needs_pred, needs_target, needs_teacher = ctx.needs_input_grad[:3]
    if not (needs_pred or needs_target or needs_teacher):
        return (None,) * 8
    if grad.numel() == 0 and grad_terms.numel() != 0:
        raise RuntimeError("hgloss: the forward ran without compute_grad, so no gradient was saved")

    # dL/dD = g[b, k] * d(terms)/dD, written over the saved buffer.
    grad_diff = grad.mul_(grad_terms.to(grad.dtype)[:, :, None, None])
    grad_pred = grad_target = grad_teacher = None
    if needs_teacher:
        grad_teacher = (grad_diff * -alpha[:, None, None, None]).to(teacher_dtype)
    if needs_target:
        target_scale = -1.0 if alpha is None else (alpha - 1)[:, None, None, None]
        grad_target = (grad_diff * target_scale).to(target_dtype)
    if needs_pred:
        grad_pred = grad_diff.to(pred_dtype)
    return grad_pred, grad_target, grad_teacher, None, None, None, None, None


if HAS_EXTENSION:
    torch.library.register_fake("hgloss::heatmap_loss_forward")(_fake_forward)
    torch.library.register_autograd(
        "hgloss::heatmap_loss_forward", _backward, setup_context=_setup_context
    )


def fused_plane_terms(pred, target, teacher, alpha, mse_weight, grad_weight, stencil):
    """Per-plane terms from the operator of the device's fused kernel."""
    compute_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (pred, target, teacher)
    )
    terms, _ = torch.ops.hgloss.heatmap_loss_forward(
        pred, target, teacher, alpha, float(mse_weight), float(grad_weight), stencil, compute_grad
    )
    return terms
