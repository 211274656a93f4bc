"""hgloss.heatmap_gradient_loss: input validation, backend choice, weighting and reduction.

Every check of SPEC section 2 lives here and runs before any kernel; the backends assume valid
input.
"""

import importlib.util
import math
import os
import warnings
from numbers import Real

import torch

from . import ops
from .backends import _build, reference

STENCILS = ("forward", "central", "sobel")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("cuda", "triton", "cpu", "reference")


def _load_triton_backend():
    """hgloss.backends.triton where Triton can run: a CUDA device, or the Triton interpreter
    (TRITON_INTERPRET=1, read when triton compiles the kernels) on CPU tensors. None elsewhere,
    which also spares CPU-only processes importing triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0").lower() in ("", "0", "false", "off"):
        return None
    from .backends import triton as triton_backend

    return triton_backend


_triton = _load_triton_backend()

# The operators of the fused backends, all with the schema of hgloss::heatmap_loss.
_FUSED_OPS = {}
if ops.HAS_EXTENSION:
    # One operator for both: the dispatcher picks the CPU or the CUDA kernel by device.
    _FUSED_OPS["cpu"] = _FUSED_OPS["cuda"] = torch.ops.hgloss.heatmap_loss
if _triton is not None:
    _FUSED_OPS["triton"] = torch.ops.hgloss.triton_heatmap_loss


def _runs_on(name: str, device_type: str | None) -> bool:
    """Whether backend `name` is available here for tensors of `device_type` (None: any device)."""
    if name == "reference":
        return True
    if name == "cpu":
        return ops.HAS_EXTENSION and device_type in (None, "cpu")
    if name == "cuda":
        on_cuda = device_type in (None, "cuda") and torch.version.cuda is not None
        return on_cuda and _build.cuda_failure_reason() is None
    if name == "triton" and _triton is not None:
        on_cuda = torch.cuda.is_available() and device_type in (None, "cuda")
        return on_cuda or (_triton.INTERPRETING and device_type in (None, "cpu"))
    return False


def _why_unavailable(backend: str) -> str:
    if backend == "cpu" and not ops.HAS_EXTENSION:
        return " (the C++ extension did not load)"
    if backend == "cuda":
        return f" ({_build.cuda_failure_reason() or 'the CUDA kernels run on CUDA tensors only'})"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return " (triton is not installed)"
        return " (Triton runs on CUDA tensors, and on CPU tensors only under the interpreter, TRITON_INTERPRET=1)"
    return ""


def available_backends() -> list[str]:
    """The backends usable in this process, fastest first, e.g. ["cpu", "reference"]."""
    return [name for name in BACKENDS if _runs_on(name, None)]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that computes on `device` for a requested name ("auto" included)."""
    if backend == "auto":
        backend = os.environ.get("HGLOSS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS + ("auto",):
            raise ValueError(
                f"HGLOSS_BACKEND={backend!r} is not a backend; expected one of {list(BACKENDS)} or 'auto'"
            )
    if backend == "auto":
        # The interpreter exists for testing Triton kernels; it is never a default for CPU tensors.
        chosen = next(
            name
            for name in BACKENDS
            if _runs_on(name, device.type) and not (name == "triton" and device.type == "cpu")
        )
        if chosen == "cuda":
            try:
                _build.load_cuda_kernels()
            except RuntimeError as error:  # the build failed: the next backend, and say why once
                warnings.warn(f"{error}; falling back", RuntimeWarning, stacklevel=3)
                return resolve_backend("auto", device)
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {list(BACKENDS)}")
    if not _runs_on(backend, device.type):
        usable = [name for name in BACKENDS if _runs_on(name, device.type)]
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors; "
            f"available here: {usable}" + _why_unavailable(backend)
        )
    if backend == "cuda":
        _build.load_cuda_kernels()
    return backend


def _check_floating(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")


def _check_scalar_weight(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def _validate(pred, target, target_weight, teacher, alpha, mse_weight, grad_weight, stencil, reduction):
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("pred and target must be tensors")
    named = {"pred": pred, "target": target, "teacher": teacher, "target_weight": target_weight}
    if isinstance(alpha, torch.Tensor):
        named["alpha"] = alpha
    named = {name: tensor for name, tensor in named.items() if tensor is not None}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
        _check_floating(name, tensor)

    devices = {name: tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")

    if pred.dim() != 4:
        raise ValueError(f"pred must be 4-D (B, K, H, W), got shape {tuple(pred.shape)}")
    batch, joints, height, width = pred.shape
    if joints < 1 or height < 1 or width < 1:
        raise ValueError(f"pred must have K, H, W >= 1, got shape {tuple(pred.shape)}")
    for name in ("target", "teacher"):
        tensor = named.get(name)
        if tensor is not None and tensor.shape != pred.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} differs from pred shape {tuple(pred.shape)}")
    if target_weight is not None:
        accepted = [(batch, joints), (batch, joints, 1), (batch, joints, 1, 1)]
        if tuple(target_weight.shape) not in accepted:
            raise ValueError(
                f"target_weight shape {tuple(target_weight.shape)} is not one of {accepted} "
                f"for pred shape {tuple(pred.shape)}"
            )

    if isinstance(alpha, torch.Tensor):
        if tuple(alpha.shape) != (batch,):
            raise ValueError(f"alpha tensor must have shape ({batch},) for batch size {batch}, got {tuple(alpha.shape)}")
    elif isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1] or a (B,) tensor, got {alpha!r}")

    _check_scalar_weight("mse_weight", mse_weight)
    _check_scalar_weight("grad_weight", grad_weight)
    if stencil not in STENCILS:
        raise ValueError(f"unknown stencil {stencil!r}; expected one of {list(STENCILS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {list(REDUCTIONS)}")


def reduce_plane_losses(plane_losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """"none" keeps (B, K); "sum" adds every plane; "mean" divides by B*K (0 when empty)."""
    if reduction == "none":
        return plane_losses
    total = plane_losses.sum()
    if reduction == "sum":
        return total
    return total / max(plane_losses.numel(), 1)


def heatmap_gradient_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    target_weight: torch.Tensor | None = None,
    *,
    teacher: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 0.5,
    mse_weight: float = 1.0,
    grad_weight: float = 1.0,
    stencil: str = "forward",
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Heatmap MSE plus the MSE of the heatmaps' finite-difference gradients, fused.

    Per plane (b, k), with the soft target T = (1 - a_b) G + a_b S (T = G without a teacher)
    and D = P - T::

        V = mean_ij D^2
        R = (sum Ax(D)^2 + sum Ay(D)^2) / (Nx + Ny)     (0 when the stencil has no position)
        L[b, k] = w[b, k] * (mse_weight * V + grad_weight * R)

    then reduced over (b, k) by `reduction`. Ax, Ay are the `stencil`'s gradient maps ("forward"
    differences, "central" differences or "sobel"), taken on their valid positions only.

    Args:
        pred: (B, K, H, W) predicted heatmaps, float16/bfloat16/float32/float64, any strides.
        target: (B, K, H, W) target heatmaps, any floating dtype.
        target_weight: (B, K), (B, K, 1) or (B, K, 1, 1) per-plane weights, default 1. Values are
            not checked; negative weights are the caller's business.
        teacher: (B, K, H, W) soft-target heatmaps (self-distillation), optional.
        alpha: blend of the teacher into the target, a float in [0, 1] or a (B,) tensor; only
            used with a teacher. No gradient flows to it.
        mse_weight, grad_weight: weights of V and R, finite and >= 0.
        stencil: "forward", "central" or "sobel".
        reduction: "mean", "sum" or "none" (returns the (B, K) plane losses).
        backend: "auto", or one of hgloss.available_backends(). The environment variable
            HGLOSS_BACKEND overrides "auto".

    Returns:
        The loss, float64 for a float64 pred and float32 otherwise.

    The fused backends compute dL/dpred in the forward pass whenever pred (or target, or
    teacher) requires grad and grad mode is on, and the backward only scales it. Evaluate
    validation losses under ``torch.no_grad()`` so they skip that work and its buffer.

    Example::

        >>> pred = torch.rand(32, 17, 64, 48, requires_grad=True)
        >>> target = torch.rand(32, 17, 64, 48)
        >>> loss = hgloss.heatmap_gradient_loss(pred, target, torch.ones(32, 17, 1))
        >>> loss.backward()
    """
    _validate(pred, target, target_weight, teacher, alpha, mse_weight, grad_weight, stencil, reduction)
    backend = resolve_backend(backend, pred.device)
    dtype = reference.accumulation_dtype(pred)
    blend = None
    if teacher is not None:
        if isinstance(alpha, torch.Tensor):
            blend = alpha.detach().to(dtype)
        else:
            blend = torch.full((pred.shape[0],), float(alpha), dtype=dtype, device=pred.device)

    plane_weight = None if target_weight is None else target_weight.reshape(pred.shape[:2])
    if backend in _FUSED_OPS:
        return ops.fused_heatmap_loss(
            _FUSED_OPS[backend],
            pred, target, teacher, blend, plane_weight, mse_weight, grad_weight, stencil, reduction
        )
    terms = reference.plane_terms(pred, target, teacher, blend, mse_weight, grad_weight, stencil)
    if plane_weight is not None:
        terms = terms * plane_weight.to(dtype)
    return reduce_plane_losses(terms, reduction)
