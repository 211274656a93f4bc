"""The registration layer: the fused backends as PyTorch custom operators, loaded on first use.

Operators (namespace hgloss, all with one schema, docs/spec.md section 6):

- ``heatmap_loss`` and ``scale_gradient_``: schema in C++ (csrc/heatmap_loss.cpp), CPU and CUDA
  kernels, autograd in C++ (csrc/autograd/heatmap_loss_autograd.cpp) so that an eager
  forward+backward runs no Python beyond the public function. Loaded with the extension
  hgloss._C the first time a call needs them; their fake implementation is registered here.
- ``triton_heatmap_loss``: defined here from the kernels of hgloss.backends.triton, with its
  fake implementation and an autograd with the C++ one's behaviour, written again in Python so
  that the Triton backend works without the C++ extension. tests/test_operators.py runs both
  operators through the same backward scenarios to keep them in step.

Each operator returns the reduced loss, the per-plane terms and, when asked, dL/dD for an
upstream gradient of 1, all from one pass. The backward only scales that saved gradient by the
upstream gradient, in place (leaving planes whose factor is exactly 1 untouched, as after the
usual ``loss.backward()``), and hands it on as dL/dpred: a forward+backward allocates one
heatmap-sized buffer. A second backward through the same graph (retain_graph=True, as gradcheck
does) finds the buffer consumed and recomputes it with one more forward pass, as does the backward
of a call made with compute_grad=False. When the backward is traced (torch.compile, AOTAutograd,
opcheck) the scaling is a functional multiply instead: a traced graph must not mutate a saved
forward output. Double backward raises a clear error.
"""

import importlib.util
import os

import torch

from . import contract
from .backends import _build

# The operator of each fused backend; "cpu" and "cuda" share one, dispatched by device.
OPERATOR_NAMES = {"cpu": "heatmap_loss", "cuda": "heatmap_loss", "triton": "triton_heatmap_loss"}
DOUBLE_BACKWARD_MESSAGE = (
    "hgloss: double backward is not supported by the fused backends; "
    "use backend='reference' for higher-order gradients"
)

# The operator overload of each fused backend once looked up: calling it directly skips the
# overload packet's name lookups, about a microsecond of a small call.
_operators: dict[str, torch._ops.OpOverload] = {}
_cpp_fakes_registered = False
_triton_loaded: bool | None = None
_triton_backend = None


def _fake_scale_gradient_(grad, scale):
    contract.check_scale_arguments(grad, scale)


def _fake_gaussian_factors(keypoints, weights, height, width, sigma, encoding):
    batch, joints = keypoints.shape[:2]
    factors = keypoints.new_empty((batch, joints, height), dtype=torch.float64)
    return factors, keypoints.new_empty((batch, joints, width), dtype=torch.float64), keypoints.new_empty(
        (batch, joints), dtype=torch.float64
    )


@_build.constant_under_compile
def load_cpp_operators() -> bool:
    """Whether hgloss::heatmap_loss is usable, loading (or building) the extension on the first
    call; registers the operators' fake implementations once."""
    global _cpp_fakes_registered
    if not _build.load_extension():
        return False
    if not _cpp_fakes_registered:
        torch.library.register_fake("hgloss::heatmap_loss")(contract.fake_heatmap_loss)
        torch.library.register_fake("hgloss::scale_gradient_")(_fake_scale_gradient_)
        torch.library.register_fake("hgloss::gaussian_factors")(_fake_gaussian_factors)
        _cpp_fakes_registered = True
    return True


def _triton_can_run() -> bool:
    """Triton runs on a CUDA device, or under its interpreter (TRITON_INTERPRET=1, read when the
    kernels are compiled) on CPU tensors. Elsewhere triton is not even imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    interpreter = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")
    return torch.cuda.is_available() or interpreter


@_build.constant_under_compile
def load_triton_operator() -> bool:
    """Whether hgloss::triton_heatmap_loss is usable here, defining it on the first call."""
    global _triton_loaded
    if _triton_loaded is None:
        _triton_loaded = _triton_can_run()
        if _triton_loaded:
            define_triton_operator()
    return _triton_loaded


def define_triton_operator() -> None:
    """Defines hgloss::triton_heatmap_loss with its fake implementation and autograd, once.
    Tracing the GPU form needs no GPU, which the tests use."""
    global _triton_backend
    if _triton_backend is not None:
        return
    from .backends import triton as triton_backend

    name = "hgloss::triton_heatmap_loss"
    if triton_backend.INTERPRETING:
        # The interpreter runs kernels on CPU tensors, which triton_op cannot trace: a plain
        # custom op with the shared fake implementation.
        torch.library.custom_op(name, mutates_args=())(triton_backend.heatmap_loss)
        torch.library.register_fake(name)(contract.fake_heatmap_loss)
    else:
        # On a GPU, a triton_op: torch.compile sees the kernels, and inductor launches them from
        # its own code, plans the buffers and fuses the caller's arithmetic on the loss.
        torch.library.triton_op(name, mutates_args=())(triton_backend.heatmap_loss)
    torch.library.register_autograd(name, _triton_backward, setup_context=_triton_setup_context)
    _triton_backend = triton_backend


@_build.constant_under_compile
def triton_interpreting() -> bool:
    """Whether the Triton operator runs its kernels in the interpreter, on CPU tensors."""
    return load_triton_operator() and _triton_backend.INTERPRETING


def is_traced(tensor: torch.Tensor) -> bool:
    """Whether a tensor is a tracing stand-in (meta, fake or functional) rather than data; the
    C++ autograd asks the same of the dispatch keys."""
    keys = torch._C._dispatch_keys(tensor)
    return (
        tensor.is_meta
        or keys.has(torch._C.DispatchKey.Python)
        or keys.has(torch._C.DispatchKey.Functionalize)
    )


def _triton_setup_context(ctx, inputs, output):
    pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, _, rows, cols, pixel = inputs
    if pixel is not None and pixel.requires_grad:
        # Called only while grad mode is on. The autograd of a Python operator first sees its
        # inputs here, after the forward: the C++ one refuses the call before its kernel.
        raise ValueError(contract.PIXEL_WEIGHT_GRAD_MESSAGE)
    _, terms, grad = output
    ctx.save_for_backward(grad, terms, pred, target, teacher, alpha, weight, rows, cols, pixel)
    ctx.settings = (mse_weight, grad_weight, stencil, reduction)
    ctx.gradient_consumed = False
    # terms and grad exist for the backward only: no gradient flows through them, and none is
    # materialised for them (one is heatmap-sized).
    ctx.mark_non_differentiable(terms, grad)
    ctx.set_materialize_grads(False)


def _triton_backward(ctx, grad_loss, _grad_of_terms, _grad_of_saved_gradient):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    grads = [None] * 13  # one per forward argument; none for the target's factors or pixel_weight
    if grad_loss is None:
        return tuple(grads)
    grad, terms, pred, target, teacher, alpha, weight, rows, cols, pixel = ctx.saved_tensors
    mse_weight, grad_weight, stencil, reduction = ctx.settings
    needs_pred, needs_target, needs_teacher, _, needs_weight = ctx.needs_input_grad[:5]
    needs_target = needs_target and target is not None
    upstream = grad_loss.to(terms.dtype)

    if needs_weight:
        # For "mean" each plane's share of the upstream gradient is 1/(B*K) of it.
        plane_upstream = upstream / max(terms.numel(), 1) if reduction == "mean" else upstream
        grads[4] = (plane_upstream * terms).to(weight.dtype).reshape(weight.shape)
    if not (needs_pred or needs_target or needs_teacher):
        return tuple(grads)

    # dL/dD for this upstream gradient.
    if is_traced(grad):
        grad_diff = grad * (upstream[:, :, None, None] if reduction == "none" else upstream)
    else:
        if ctx.gradient_consumed or grad.shape != pred.shape:
            # Consumed by an earlier backward, or never computed: one more forward pass.
            _, _, grad = torch.ops.hgloss.triton_heatmap_loss(
                pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, True, rows, cols,
                pixel,
            )
        ctx.gradient_consumed = True
        _triton_backend.scale_gradient_(grad, upstream)
        grad_diff = grad
    if needs_teacher:
        grads[2] = (grad_diff * -alpha[:, None, None, None]).to(teacher.dtype)
    if needs_target:
        grads[1] = (grad_diff * (alpha - 1)[:, None, None, None] if alpha is not None else -grad_diff).to(target.dtype)
    if needs_pred:
        grads[0] = grad_diff.to(pred.dtype)
    return tuple(grads)


def fused_heatmap_loss(
    backend, pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, target_rows=None,
    target_cols=None, pixel_weight=None,
):
    """The loss from the operator of a fused backend, on checked arguments; `weight` is (B, K),
    (B, K, 1), (B, K, 1, 1) or None and `alpha` a (B,) tensor, or None without a teacher. The
    target is a tensor, or (target None) the separable factors of hgloss.targets. A pixel_weight
    must not require grad while grad mode is on (the operators give it no gradient)."""
    compute_grad = torch.is_grad_enabled() and (
        pred.requires_grad
        or (target is not None and target.requires_grad)
        or (teacher is not None and teacher.requires_grad)
    )
    operator = _operators.get(backend)
    if operator is None:
        operator = getattr(torch.ops.hgloss, OPERATOR_NAMES[backend]).default
        _operators[backend] = operator
    if target is None or pixel_weight is not None:
        loss, _, _ = operator(
            pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, compute_grad, target_rows,
            target_cols, pixel_weight,
        )
    else:
        # The plain call passes no optional argument: each one costs a small call time.
        loss, _, _ = operator(
            pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, compute_grad
        )
    return loss
