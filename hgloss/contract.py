"""The contract's rules that every layer shares (docs/spec.md): accepted dtypes and shapes, the
argument checks and their messages, the accumulation and saved-gradient dtypes, the outputs of
the fused operators, and the reduction over planes.

A leaf module: it imports torch and the stencil table only, so the backends, the registration
layer and the public function can all build on it. The C++ operators check their arguments with
the same rules and messages in csrc/heatmap_loss.h; tests/test_operators.py calls every fused
operator directly with the same bad arguments to keep the two in step.
"""

import math
from numbers import Real

import torch

from .stencils import STENCILS

SUPPORTED_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
REDUCTIONS = ("mean", "sum", "none")
# How R compares the gradient maps: component by component, or by magnitude (reference backend only).
GRADIENT_FORMS = ("components", "magnitude")


def accumulation_dtype(pred: torch.Tensor) -> torch.dtype:
    """float64 for a float64 pred, else float32: the dtype of every sum and of the loss."""
    return torch.float64 if pred.dtype == torch.float64 else torch.float32


def saved_gradient_dtype(pred: torch.Tensor) -> torch.dtype:
    """The dtype of the dL/dD a fused forward returns: bfloat16 for a bfloat16 pred (its
    gradient's own dtype, so no float32 copy is kept); otherwise the accumulation dtype. float16
    keeps float32 because a loss-scaled backward multiplies the saved gradient by up to 2^16, and
    float16 would first flush its small values."""
    return torch.bfloat16 if pred.dtype == torch.bfloat16 else accumulation_dtype(pred)


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {tensor.dtype}"
        )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")


def _is_real(value) -> bool:
    """A real number and not a bool; a float is asked first, without the slower ABC check."""
    return type(value) is float or (not isinstance(value, bool) and isinstance(value, Real))


def check_term_weight(name: str, value) -> float:
    """mse_weight or grad_weight as a float: any real number that is finite and >= 0, the same
    for every backend (a Fraction or a large int is converted once, here)."""
    if type(value) is float and 0.0 <= value < math.inf:
        return value
    if not (_is_real(value) or isinstance(value, (torch.SymInt, torch.SymFloat))):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        as_float = math.inf
    # Comparisons rather than math.isfinite, which torch.compile cannot trace on a symbolic
    # float; NaN fails both.
    if not 0.0 <= as_float < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return as_float


# What may follow (B, K) in a plane weight's shape.
_UNIT_TRAILING_SIZES = ((), (1,), (1, 1))


def _tensor_names(weight_name: str) -> tuple[str, ...]:
    """The names of check_loss_arguments's tensors, in its order, for messages."""
    return ("pred", "target", "teacher", weight_name, "alpha", "pixel_weight")


def _raise_for_tensor_type(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    check_dtype(name, value)


def check_loss_arguments(
    pred: torch.Tensor,
    target: torch.Tensor,
    teacher: torch.Tensor | None,
    alpha: float | torch.Tensor | None,
    weight: torch.Tensor | None,
    mse_weight: float,
    grad_weight: float,
    stencil: str,
    reduction: str,
    operator: bool = False,
    pixel_weight: torch.Tensor | None = None,
    target_optional: bool = False,
    weight_name: str | None = None,
) -> tuple[float, float]:
    """Every check of docs/spec.md section 2; returns mse_weight and grad_weight as floats.

    The public function takes a float or (B,) alpha, a (B, K), (B, K, 1) or (B, K, 1, 1)
    target_weight and a pixel_weight broadcastable to (B, K, H, W) (any strides). A fused
    operator (`operator=True`) takes a (B,) alpha tensor, required with a teacher and otherwise
    optional, and the same weight shapes under the name "weight". With
    `target_optional` the target may be None: the caller supplies it in another form (separable
    factors, keypoints) and checks that form itself; `weight_name` names the weight in messages."""
    weight_name = weight_name or ("weight" if operator else "target_weight")
    target_given = isinstance(target, torch.Tensor) or (target_optional and target is None)
    if not isinstance(pred, torch.Tensor) or not target_given:
        raise TypeError("pred and target must be tensors")
    alpha_tensor = alpha if isinstance(alpha, torch.Tensor) else None
    tensors = (pred, target, teacher, weight, alpha_tensor, pixel_weight)
    device = pred.device
    one_device = True
    for position, tensor in enumerate(tensors):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in SUPPORTED_DTYPES:
            _raise_for_tensor_type(_tensor_names(weight_name)[position], tensor)
        one_device = one_device and tensor.device == device
    if not one_device:
        named = zip(_tensor_names(weight_name), tensors)
        listed = ", ".join(f"{name} on {tensor.device}" for name, tensor in named if tensor is not None)
        raise ValueError(f"all tensors must be on one device, got {listed}")

    if pred.dim() != 4:
        raise ValueError(f"pred must be 4-D (B, K, H, W), got shape {_shape(pred)}")
    batch, joints, height, width = pred.shape
    if joints < 1 or height < 1 or width < 1:
        raise ValueError(f"pred must have K, H, W >= 1, got shape {_shape(pred)}")
    for name, tensor in (("target", target), ("teacher", teacher)):
        if tensor is not None and tensor.shape != pred.shape:
            raise ValueError(f"{name} shape {_shape(tensor)} differs from pred shape {_shape(pred)}")
    if weight is not None and not (weight.shape[:2] == pred.shape[:2] and weight.shape[2:] in _UNIT_TRAILING_SIZES):
        accepted = [(batch, joints), (batch, joints, 1), (batch, joints, 1, 1)]
        raise ValueError(f"{weight_name} shape {_shape(weight)} is not one of {accepted} for pred shape {_shape(pred)}")
    if pixel_weight is not None:
        check_pixel_weight_shape(pixel_weight, pred)

    if isinstance(alpha, torch.Tensor):
        if _shape(alpha) != (batch,):
            raise ValueError(f"alpha tensor must have shape ({batch},) for batch size {batch}, got {_shape(alpha)}")
    elif alpha is None:
        if teacher is not None:
            raise ValueError(f"a teacher needs an alpha tensor of shape ({batch},)")
    elif not _is_real(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1] or a (B,) tensor, got {alpha!r}")

    mse_weight = check_term_weight("mse_weight", mse_weight)
    grad_weight = check_term_weight("grad_weight", grad_weight)
    check_choice("stencil", stencil, STENCILS)
    check_choice("reduction", reduction, REDUCTIONS)
    return mse_weight, grad_weight


def broadcasts_to(shape: tuple[int, ...], full: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` broadcasts to exactly `full` (right-aligned, each size equal
    or 1, no more dimensions than `full`)."""
    return len(shape) <= len(full) and all(
        size in (1, wanted) for size, wanted in zip(reversed(shape), reversed(full))
    )


def check_pixel_weight_shape(pixel_weight: torch.Tensor, pred: torch.Tensor) -> None:
    """pixel_weight M must broadcast to pred's (B, K, H, W), e.g. (B, K, H, W), (B, 1, H, W),
    (1, K, 1, W) or (H, W)."""
    if not broadcasts_to(_shape(pixel_weight), _shape(pred)):
        raise ValueError(
            f"pixel_weight shape {_shape(pixel_weight)} does not broadcast to pred shape {_shape(pred)} "
            "(B, K, H, W)"
        )


def check_operator_arguments(
    pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, target_rows=None,
    target_cols=None, pixel_weight=None,
) -> None:
    """The checks of a direct call of a fused operator: as the public function's, except that
    alpha is a (B,) tensor or None (required with a teacher), and that the target is either a
    tensor or separable factors (target_rows, target_cols)."""
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha must be a tensor or None, got {type(alpha).__name__}")
    check_separable_target(pred, target, target_rows, target_cols)
    check_loss_arguments(
        pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, operator=True,
        pixel_weight=pixel_weight, target_optional=True,
    )


# The fused operators give no gradient for a pixel weight; one that asks for it is refused
# rather than left at a silent zero. The C++ autograd raises the same message.
PIXEL_WEIGHT_GRAD_MESSAGE = (
    "pixel_weight requires grad, and only the reference backend differentiates it; "
    "use backend='reference', or pass pixel_weight.detach()"
)


def pixel_weight_wants_grad(pixel_weight: torch.Tensor | None) -> bool:
    """Whether a pixel weight would need a gradient from this call."""
    return pixel_weight is not None and pixel_weight.requires_grad and torch.is_grad_enabled()


def check_separable_target(pred, target, target_rows, target_cols) -> None:
    """A fused operator takes its target as a tensor, or as factors G[i, j] = float32(rows[i] *
    cols[j]) per plane (hgloss.targets): contiguous float64 tensors of shapes (B, K, H) and
    (B, K, W) on pred's device. Exactly one of the two forms."""
    separable = target_rows is not None or target_cols is not None
    if separable == (target is not None) or (separable and (target_rows is None or target_cols is None)):
        raise ValueError("give the target as a tensor, or as both target_rows and target_cols, not both")
    if not separable or not isinstance(pred, torch.Tensor) or pred.dim() != 4:
        return  # pred is checked with the other arguments
    batch, joints, height, width = pred.shape
    for name, factors, size in (("target_rows", target_rows, height), ("target_cols", target_cols, width)):
        if not isinstance(factors, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(factors).__name__}")
        if factors.dtype != torch.float64:
            raise TypeError(f"{name} must be float64, got {factors.dtype}")
        if factors.device != pred.device:
            raise ValueError(
                f"all tensors must be on one device, got pred on {pred.device}, {name} on {factors.device}"
            )
        if _shape(factors) != (batch, joints, size) or not factors.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous tensor of shape {(batch, joints, size)} for pred shape "
                f"{_shape(pred)}, got shape {_shape(factors)}"
            )


def operator_outputs(pred: torch.Tensor, reduction: str, compute_grad: bool):
    """Empty (loss, terms, grad) of a fused operator for this pred: the loss (0-dim, or (B, K) for
    "none") and the (B, K) terms in the accumulation dtype, and dL/dD (B, K, H, W) in the saved
    gradient dtype when compute_grad, else an empty (0,) tensor."""
    dtype = accumulation_dtype(pred)
    planes = pred.shape[:2]
    loss = pred.new_empty(planes if reduction == "none" else (), dtype=dtype)
    terms = pred.new_empty(planes, dtype=dtype)
    grad = pred.new_empty(pred.shape if compute_grad else (0,), dtype=saved_gradient_dtype(pred))
    return loss, terms, grad


def fake_heatmap_loss(
    pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, compute_grad,
    target_rows=None, target_cols=None, pixel_weight=None,
):
    """The fake (meta) implementation shared by every fused operator: the checks, then outputs
    of the right shapes and dtypes."""
    check_operator_arguments(
        pred, target, teacher, alpha, weight, mse_weight, grad_weight, stencil, reduction, target_rows, target_cols,
        pixel_weight,
    )
    return operator_outputs(pred, reduction, compute_grad)


def check_scale_arguments(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """The checks of a direct call of a scale_gradient_ operator: grad a contiguous (B, K, H, W)
    saved gradient, scale one value or one per plane, both on one device."""
    if grad.dim() != 4 or not grad.is_contiguous():
        raise ValueError(f"grad must be a contiguous (B, K, H, W) tensor, got shape {_shape(grad)}")
    if grad.dtype not in (torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"grad must be bfloat16, float32 or float64, got {grad.dtype}")
    if not scale.is_floating_point():
        raise TypeError(f"scale must have a floating dtype, got {scale.dtype}")
    planes = grad.shape[0] * grad.shape[1]
    if scale.numel() not in (1, planes):
        raise ValueError(f"scale must hold 1 or B*K = {planes} values, got {scale.numel()}")
    if scale.device != grad.device:
        raise ValueError(f"all tensors must be on one device, got grad on {grad.device}, scale on {scale.device}")


def reduce_plane_losses(plane_losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none" keeps the planes; "sum" adds them; "mean" divides the sum by their number (0 when
    there is none)."""
    if reduction == "none":
        return plane_losses
    total = plane_losses.sum()
    if reduction == "sum":
        return total
    return total / max(plane_losses.numel(), 1)
