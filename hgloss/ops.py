"""Custom-operator glue for the fused backends: fake implementations and autograd.

The C++ backends' schema, kernels and autograd are in csrc/ (the autograd in
csrc/autograd/heatmap_loss_autograd.cpp, so that eager calls cost no Python); the Triton backend
defines an operator with the same schema, hgloss::triton_heatmap_loss (hgloss/backends/triton.py),
whose autograd is registered here with the same behaviour. Each operator returns the reduced
loss, the per-plane terms and, when asked, dL/dD for an upstream gradient of 1, all from one
pass. The backward only scales that saved gradient by the upstream gradient, in place (leaving
planes whose factor is exactly 1 untouched, as after the usual `loss.backward()`). A
forward+backward therefore allocates one heatmap-sized buffer, and that buffer becomes dL/dpred.

A second backward through the same graph (retain_graph=True, as gradcheck does) finds the saved
buffer consumed and recomputes it with one more forward pass, as does a backward of an op run
with compute_grad=False. When the backward is traced
(torch.compile, AOTAutograd), the scaling is a plain functional multiply instead, since a traced
graph must not mutate a saved forward output. Double backward raises a clear error.
"""

import torch
from torch._subclasses.fake_tensor import is_fake

from .backends._build import load_extension
from .backends.reference import accumulation_dtype

HAS_EXTENSION = load_extension()


def fake_heatmap_loss(
    pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, compute_grad
):
    dtype = accumulation_dtype(pred)
    plane_shape = pred.shape[:2]
    loss = pred.new_empty(plane_shape if reduction == "none" else (), dtype=dtype)
    terms = pred.new_empty(plane_shape, dtype=dtype)
    grad = pred.new_empty(pred.shape if compute_grad else (0,), dtype=saved_gradient_dtype(pred))
    return loss, terms, grad


def saved_gradient_dtype(pred: torch.Tensor) -> torch.dtype:
    """bfloat16 for a bfloat16 pred (its gradient's own dtype, so no float32 copy is kept);
    otherwise the accumulation dtype. float16 keeps float32 because a loss-scaled backward
    multiplies the saved gradient by up to 2^16, and float16 would first flush its small values."""
    return torch.bfloat16 if pred.dtype == torch.bfloat16 else accumulation_dtype(pred)


def _fake_scale_gradient_(grad, scale):
    return None


def register_fused_autograd(name: str, op, scale_gradient_) -> None:
    """The autograd of a fused operator with the schema of hgloss::heatmap_loss. `op` recomputes
    the forward when needed; `scale_gradient_(grad, scale)` multiplies a saved dL/dD in place by
    the upstream gradient (one factor, or one per plane)."""

    def setup_context(ctx, inputs, output):
        pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, _ = inputs
        _, terms, grad = output
        ctx.save_for_backward(grad, terms, pred, target, teacher, alpha, weight)
        ctx.settings = (mse_weight, grad_weight, stencil, reduction)
        ctx.fused_op = op
        ctx.scale_gradient_ = scale_gradient_
        ctx.gradient_consumed = False
        # terms and grad exist for the backward only: no gradient flows through them, and none
        # is materialised for them (one is heatmap-sized).
        ctx.mark_non_differentiable(terms, grad)
        ctx.set_materialize_grads(False)

    torch.library.register_autograd(name, _backward, setup_context=setup_context)


def _is_traced(tensor: torch.Tensor) -> bool:
    """Whether the backward is being traced (torch.compile, AOTAutograd, opcheck) rather than run."""
    return torch.compiler.is_compiling() or is_fake(tensor)


def _grad_diff(ctx, grad, upstream, inputs):
    """dL/dD for this upstream gradient."""
    mse_weight, grad_weight, stencil, reduction = ctx.settings
    if _is_traced(grad):
        return grad * (upstream[:, :, None, None] if reduction == "none" else upstream)
    if ctx.gradient_consumed or grad.shape != inputs[0].shape:
        # Consumed by an earlier backward, or never computed (the op was called with
        # compute_grad=False): one more forward pass.
        _, _, grad = ctx.fused_op(*inputs, mse_weight, grad_weight, stencil, reduction, True)
    ctx.gradient_consumed = True
    ctx.scale_gradient_(grad, upstream)
    return grad


def _backward(ctx, grad_loss, _grad_of_terms, _grad_of_saved_gradient):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "hgloss: double backward is not supported by the fused backends; "
            "use backend='reference' for higher-order gradients"
        )
    grad, terms, pred, target, teacher, alpha, weight = ctx.saved_tensors
    reduction = ctx.settings[3]
    needs_pred, needs_target, needs_teacher, _, needs_weight = ctx.needs_input_grad[:5]
    if grad_loss is None:
        return (None,) * 10
    upstream = grad_loss.to(terms.dtype)

    grad_of_weight = None
    if needs_weight:
        plane_upstream = upstream / max(terms.numel(), 1) if reduction == "mean" else upstream
        grad_of_weight = (plane_upstream * terms).to(weight.dtype)

    grad_pred = grad_target = grad_teacher = None
    if needs_pred or needs_target or needs_teacher:
        grad_diff = _grad_diff(ctx, grad, upstream, (pred, target, teacher, alpha, weight))
        if needs_teacher:
            grad_teacher = (grad_diff * -alpha[:, None, None, None]).to(teacher.dtype)
        if needs_target:
            target_scale = -1.0 if alpha is None else (alpha - 1)[:, None, None, None]
            grad_target = (grad_diff * target_scale).to(target.dtype)
        if needs_pred:
            grad_pred = grad_diff.to(pred.dtype)
    return grad_pred, grad_target, grad_teacher, None, grad_of_weight, None, None, None, None, None


if HAS_EXTENSION:
    torch.library.register_fake("hgloss::heatmap_loss")(fake_heatmap_loss)
    torch.library.register_fake("hgloss::scale_gradient_")(_fake_scale_gradient_)


def fused_heatmap_loss(op, pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction):
    """The loss from a fused operator (`op`, with the schema of hgloss::heatmap_loss). `weight` is
    (B, K) or None."""
    compute_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (pred, target, teacher)
    )
    loss, _, _ = op(
        pred, target, teacher, alpha, weight, float(mse_weight), float(grad_weight), stencil, reduction, compute_grad
    )
    return loss
